"""What the Ascend lowering can honour: each artifact quant type's weight and activation code widths.

A spec (ir/qspec.py) may ask for any integer width 2..8; the Ascend kernels and the artifact store fixed
ones (spec section 3: W8A8 / W8A8_MIX / W8A8_DYNAMIC int8 codes in [-127, 127]; W8A16 int8 storage of codes of
any width 2..8, [-qmax, qmax] (npu_weight_quant_batchmatmul dequantizes every int8 value exactly); W4A16 /
W4A8_DYNAMIC int4 codes in [-7, 7] packed two per byte, W8A8S int8 storage of [-7, 7] or [-127, 127] codes;
activations int8). `unhonoured(spec)` says, before any work, why a spec cannot be lowered as asked (the
driver makes it an exit-2 error naming the pass), so a 6-bit spec is refused rather than silently widened
to 8-bit codes. To support a new width, the lowering and encoder must write codes of that width (with
ir/qnumerics.py) and this table must say so.
"""
from ...ir.qspec import LinearQuantSpec

#: quant type -> (weight widths the lowering writes, activation width or None for float activations)
HONOURED = {
    "W8A8": ({8}, 8),
    "W8A8_MIX": ({8}, 8),
    "W8A8_DYNAMIC": ({8}, 8),
    "W8A8S": ({4, 8}, 8),
    "W8A16": (set(range(2, 9)), None),  # any width 2..8 in the int8 weight: (w + offset) * scale is exact for it
    "W4A16": ({4}, None),
    "W4A8_DYNAMIC": ({4}, 8),
}


def unhonoured(spec: LinearQuantSpec) -> str | None:
    """None when the Ascend lowering writes exactly `spec`; else the reason (one clause, no pass name)."""
    if spec.quant_type not in HONOURED:
        return f"the Ascend lowering has no {spec.quant_type} kernel (it lowers {', '.join(HONOURED)})"
    weight_bits, act_bits = HONOURED[spec.quant_type]
    if spec.weight.bits not in weight_bits:
        allowed = " or ".join(str(b) for b in sorted(weight_bits))
        return (f"{spec.quant_type} stores {allowed}-bit weight codes on Ascend, not {spec.weight.bits}-bit "
                f"(they would be written as {max(weight_bits)}-bit codes)")
    if (spec.activation is None) != (act_bits is None):
        return (f"{spec.quant_type} has {'float' if act_bits is None else f'int{act_bits}'} activations on Ascend, "
                f"the spec asks for {'float' if spec.activation is None else f'int{spec.activation.bits}'}")
    if spec.activation is not None and spec.activation.bits != act_bits:
        return f"{spec.quant_type} quantizes activations to int{act_bits} on Ascend, not int{spec.activation.bits}"
    return None
