"""Example (README "Writing a pass"): a 6-bit weight-only scheme is this one file plus one registry line.

The spec asks for symmetric 6-bit weight codes (qmax 31, ir/qnumerics.py) under the artifact's W8A16 type: the
Ascend lowering stores them in W8A16's int8 weight, where npu_weight_quant_batchmatmul dequantizes every int8
value exactly (backends/ascend/capability.py HONOURED), so vLLM-Ascend and MindIE load it as plain W8A16.
Registered with `register(W6A16)` (tests/examples/test_examples.py does it for the test's duration; a pass of the
package puts `@register` on the class and imports its module in qcompiler/passes/__init__.py).
"""
from qcompiler.ir.qspec import LinearQuantSpec
from qcompiler.passes.scheme import weight_quant
from qcompiler.passes.w8a16 import W8A16


class W6A16(W8A16):
    """W8A16 with 6-bit codes in [-31, 31]: per-channel (group=0) or per-group (group=32/64/128/256)."""
    name = "w6a16"
    summary = "weight-only int6 in W8A16's int8 weight (example pass)"

    def spec(self, group_size=0):
        return LinearQuantSpec(quant_type="W8A16", weight=weight_quant(6, group_size), activation=None,
                               pass_name=self.name)
