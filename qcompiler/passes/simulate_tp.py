"""simulate_tp: simulate N-card tensor parallelism of the communication Linears (msModelSlim's `tp_size`).

msModelSlim: "tp_size: 模拟多卡量化时的卡数 ... 设置为2、4、8、16时，对于通信层的linear会进行模拟多卡，每张卡使用不同的scale
和offset进行量化" (example/Llama/README.md; QuantConfig.simulate_tp, msmodelslim/pytorch/llm_ptq/llm_ptq_tools/
simulate_tp.py `ParallelLinearCol`). The communication Linears are the last Linear before each norm
(anti_outlier/dag_utils/torch_dag_adapter.py `get_allreduce_linear`): `self_attn.o_proj` and `mlp.down_proj`,
row-parallel in both engines: card r holds W[:, shard r] and receives x[..., shard r] (k split in N contiguous
equal parts), computes its partial product, and an all-reduce sums the partial outputs.

What the executable graph then computes is what the engines compute at TP=N from the standard artifact
(lowering reads `meta.TP_SHARDS`; the artifact tensors are unchanged, the engines shard them themselves):
  dynamic (W8A8_DYNAMIC, W4A8_DYNAMIC)  each card quantizes its own x shard per token: per-card per-token scales
        (vllm_ascend/ops/linear_op.py `get_input_parallel` + methods/w8a8_dynamic.py `apply`: npu_dynamic_quant
        runs on the rank's input slice) - the per-card scales msModelSlim simulates;
  static (W8A8, W8A8_MIX, W8A8S)        one input_scale/offset for every card (MindIE atb_llm/utils/weights.py
        `get_multi_weights_row` + `get_per_tensor_sharded` refuse unequal ones), the card's int32 partial sum
        times deq_scale, quant_bias on card 0 only (vllm_ascend methods/w8a8_static.py `apply`, tp_rank == 0);
  weight-only (W8A16, W4A16) and float  the card's partial product, bias on card 0 only (linear_op.py).
Each card's output is in the model dtype; the all-reduce is simulated as a float32 sum rounded once to the model
dtype (*unsure*: HCCL's accumulation precision for bf16/fp16 is not documented here).
Not simulated, because no engine can load them: msModelSlim's per-card static activation scales and per-card
weight scales (saved as `<linear>.tp_list.<i>.*`, save/complex_quantifier.py `generate_weight_of_tp_module`) and
its communication quantization (`reduce_scale` / `gather_scale`, read only by MindIE's ReduceQuant with a closed
all-reduce kernel).
Options: size (cards: 1, 2, 4, 8, 16 as msModelSlim's SUPPORT_TP_SIZES plus 1 = off); match (regex on the full
Linear name; default the communication Linears). Every matched Linear's k must split evenly (and, per-group,
into whole groups): checked from config.json before any work (`check_simulate_tp`).
Requires: annotated (after the scheme passes). Produces: tp_simulated. Forbids: lowered.
"""
import re
from dataclasses import dataclass

from ..errors import QCError
from ..ir import meta
from ..ir.patterns import get_tensor, linear_sites
from .base import Pass, PassResult
from .properties import ANNOTATED, LOWERED, TP_SIMULATED
from .registry import register

TP_SIZES = (1, 2, 4, 8, 16)
COMMUNICATION_LINEARS = r"(self_attn\.o_proj|mlp\.down_proj)$"


@dataclass(frozen=True)
class SimulateTPOptions:
    """size: simulated cards (1 = off). match: regex on the full HF Linear name (default o_proj, down_proj)."""
    size: int = 2
    match: str = COMMUNICATION_LINEARS

    def __post_init__(self):
        if isinstance(self.size, bool) or self.size not in TP_SIZES:
            raise ValueError(f"size must be one of {', '.join(map(str, TP_SIZES))}, got {self.size!r}")
        try:
            re.compile(self.match)
        except (re.error, TypeError) as e:
            raise ValueError(f"match {self.match!r} is not a valid regular expression ({e})") from None


@register
class SimulateTP(Pass):
    name = "simulate_tp"
    summary = ("simulate size= tensor-parallel cards on the communication Linears (o_proj, down_proj): per-card "
               "partial products (per-card per-token scales for dynamic schemes) summed by an all-reduce")
    requires = frozenset({ANNOTATED})
    produces = frozenset({TP_SIMULATED})
    forbids = frozenset({LOWERED})
    Options = SimulateTPOptions

    def run(self, gm, ctx):
        n = self.options.size
        marked = []
        for site in linear_sites(gm):
            if n == 1 or re.search(self.options.match, ctx.prefix + site.name) is None:
                continue
            k = get_tensor(gm, site.weight.target).shape[1]
            if k % n:
                raise QCError(f"simulate_tp: {ctx.prefix}{site.name} has k={k} inputs, not divisible by size={n}")
            site.node.meta[meta.TP_SHARDS] = n
            marked.append(site.name)
        return PassResult(gm, modified=bool(marked), stats={"size": n, "linears": marked})


def check_simulate_tp(passes, config: dict, group_size: int = 0) -> None:
    """Before any work: each Linear a simulate_tp pass marks splits into `size` equal parts of whole groups."""
    from .group_size import model_linear_shapes
    for p in passes:
        if getattr(p, "name", "") != SimulateTP.name or p.options.size == 1:
            continue
        n = p.options.size
        for name, (_, k) in model_linear_shapes(config).items():
            if re.search(p.options.match, name) is None:
                continue
            if k % n or (group_size and (k // n) % group_size):
                need = f"parts of whole {group_size}-groups" if not k % n else "equal parts"
                raise QCError(f"simulate_tp:size={n}: {name} has k={k} inputs, which do not split into {n} {need} "
                              f"(choose another size)")
