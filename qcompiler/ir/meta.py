"""Node-meta keys: the only place their strings are spelled.

Passes communicate through `node.meta[KEY]`; using these constants (never literals) keeps a typo from
silently creating a new key.
"""
from dataclasses import dataclass

import torch

#: str, on `aten.linear` nodes: the Linear's path inside its decoder layer (`self_attn.q_proj`).
LINEAR_NAME = "qc_linear"
#: True, on `aten.linear` nodes of a MoE router or shared-expert gate (ir/moe.py): stays float, never a Linear
#: site (ir/patterns.linear_sites skips it).
ROUTER = "qc_router"
#: LinearQuantSpec, on `aten.linear` nodes: the decision of an annotation pass (w8a8, ...).
QUANT_SPEC = "qc_quant_spec"
#: str, on observer `call_module` nodes (identities in the forward): the name of the observer submodule. Activation
#: observers (passes/observe.py) stay until lowering; a pending rewrite's (kv8, fa3) until the calibration forward.
OBSERVER = "qc_observer"
#: str, on nodes a lowering pass created: which artifact Linear they implement.
LOWERED_FROM = "qc_lowered_from"
#: (q: int8 Tensor [n, k] of integer codes, scale: float32 Tensor [n, 1] or [n, k/g]), on `aten.linear`
#: nodes: a weight rounding chosen by an error-compensating pass (gptq, awq clipping); lowering encodes
#: exactly these codes and scales instead of rounding the float weight itself.
WEIGHT_QPARAMS = "qc_weight_qparams"
#: float, on `aten.linear` nodes: fraction of zeros of the weight after the sparse pass pruned it.
SPARSITY = "qc_sparsity"
#: str, on `aten.linear` nodes: the name of the scheme pass that claimed the Linear and needs its weight pruned
#: (w8a8s, w16a16s); the sparse pass refuses to leave such a Linear unpruned.
NEEDS_PRUNING = "qc_needs_pruning"
#: str, on `aten.linear` nodes that stay float in the graph: the artifact quant type their float tensors carry
#: (w16a16s: "W16A16S", a pruned float Linear); lowering records them under that type, unchanged.
FLOAT_QUANT_TYPE = "qc_float_quant_type"
#: int, on `aten.linear` nodes of row-parallel (communication) Linears: the number of simulated tensor-parallel
#: cards (simulate_tp pass); lowering splits the Linear along k into that many partial products and sums them.
TP_SHARDS = "qc_tp_shards"
#: TensorType, on nodes of a graph loaded from an executable graph file (ir/graph_json.py): the dtype and
#: shape its FakeTensor `val` had when it was written (loaded graphs have no `val`).
TENSOR_TYPE = "qc_tensor_type"


@dataclass(frozen=True)
class TensorType:
    """dtype and shape of a node's value; a dynamic dimension is its symbol's name (e.g. 's27')."""
    dtype: torch.dtype
    shape: tuple  # of int | str


def tensor_type(node) -> TensorType | None:
    """The dtype and shape of `node`'s tensor value: from its FakeTensor `val` (captured graphs) or its
    TENSOR_TYPE (loaded graphs); None when it has neither (or is not a single tensor)."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return TensorType(val.dtype, tuple(str(d) if isinstance(d, torch.SymInt) else int(d) for d in val.shape))
    found = node.meta.get(TENSOR_TYPE)
    return found if isinstance(found, TensorType) else None
