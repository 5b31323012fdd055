"""Node-meta keys: the only place their strings are spelled.

Passes communicate through `node.meta[KEY]`; using these constants (never literals) keeps a typo from
silently creating a new key.
"""

#: str, on `aten.linear` nodes: the Linear's path inside its decoder layer (`self_attn.q_proj`).
LINEAR_NAME = "qc_linear"
#: LinearQuantSpec, on `aten.linear` nodes: the decision of an annotation pass (w8a8, ...).
QUANT_SPEC = "qc_quant_spec"
#: str, on observer `call_module` nodes: the name of the observer submodule.
OBSERVER = "qc_observer"
#: str, on nodes a lowering pass created: which artifact Linear they implement.
LOWERED_FROM = "qc_lowered_from"
#: (q: int8 Tensor [n, k] of integer codes, scale: float32 Tensor [n, 1] or [n, k/g]), on `aten.linear`
#: nodes: a weight rounding chosen by an error-compensating pass (gptq, awq clipping); lowering encodes
#: exactly these codes and scales instead of rounding the float weight itself.
WEIGHT_QPARAMS = "qc_weight_qparams"
#: float, on `aten.linear` nodes: fraction of zeros of the weight after the sparse pass pruned it
#: (w8a8s requires it on every Linear it claims).
SPARSITY = "qc_sparsity"
