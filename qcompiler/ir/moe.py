"""Mixture-of-experts blocks (Qwen3-MoE, Qwen2-MoE) as graphs the passes see: per-expert Linears, explicit routing.

transformers 5 builds a sparse MoE block with its experts fused into 3-D parameters (`experts.gate_up_proj`
[E, 2I, H], `experts.down_proj` [E, H, I]: modeling_qwen3_moe.Qwen3MoeExperts) and a data-dependent loop over
the experts a batch hits, which torch.export cannot capture with dynamic shapes and whose weights have no
per-Linear names. Checkpoints on disk (and msModelSlim's artifacts, and vLLM-Ascend's expert-param mapping)
name every expert Linear separately: `mlp.experts.{e}.gate_proj.weight` [I, H], `up_proj` [I, H],
`down_proj` [H, I], the router `mlp.gate.weight` [E, H] and, for Qwen2-MoE, `mlp.shared_expert.{gate,up,down}_proj`
and `mlp.shared_expert_gate.weight` [1, H] (transformers' save_pretrained writes these names back).

`replace_moe_blocks(model)` swaps every transformers sparse MoE block of a (meta-device) model for a
`SparseMoeBlock` holding exactly those per-expert nn.Linear modules, so the checkpoint's tensor names load
into it with `load_state_dict` and `annotate_linears` names each expert Linear `mlp.experts.{e}.gate_proj`.

Routing, as transformers computes it (modeling_qwen3_moe.Qwen3MoeTopKRouter.forward, Qwen3MoeExperts.forward;
Qwen2-MoE's are the same plus the shared expert):
    logits = x @ gate.weight.T                      (model dtype; the router stays float)
    p = softmax(logits in float32); top_w, top_i = topk(p, k); top_w /= sum(top_w) if norm_topk_prob
    top_w -> model dtype
    out = sum over experts e in index order of expert_e(x) * w[:, e]    (w[:, e] = top_w where e was chosen, else 0)
Every expert runs on every token (dense dispatch: no data-dependent shapes, one graph for every batch); a
token's unchosen experts add an exact 0, so the sum equals transformers' `index_add_` over the chosen ones in
expert order. Per-token math (dynamic per-token activation quantization included) is row-local, so the
result of a token does not depend on which other tokens share the batch.
Cost: E / top-k times the expert FLOPs of a sparse dispatch (calibration, eval and run on CPU); the artifact
is unaffected (engines dispatch sparsely).
Schemes on experts: w8a8d, w4a8d (per-group) and w4a16 (per-group; written in the layout vLLM-Ascend's W4A16
fused-MoE method loads: encode.encode_w4a16_moe), one scheme for all experts of a layer (`moe_fused_groups`).
Statistics on experts: gptq takes each expert's Hessian over the tokens the router sends to it
(passes/gptq.py, `router_index_node`, calibration/linear_inputs `collect(routes=)`); an expert with fewer than
`min_expert_tokens` routed calibration tokens gets RTN (default) or the all-token Hessian, recorded per expert.
fallback measures a layer's whole expert set as one unit on the layer output (where unchosen experts weigh 0),
and --exclude / fallback keep a layer's experts float only all together.
Limits: smooth, awq and sparse would gather statistics from every token at every expert (dense dispatch) and
smoothing the post-attention norm would have to rescale the router too; static-activation schemes (w8a8, w8a8mix)
on experts would need per-expert activation ranges (vLLM-Ascend 0.23.0 registers no W8A8 static fused-MoE method;
W8A8_MIX MoE exists, not written here); w8a16 on experts has no fused-MoE method in any engine read.
`passes/moe_checks.check_expert_passes` refuses those before any work. `routed_token_counts` gives the report the tokens the
router sent to each expert.
"""
from __future__ import annotations

import operator
import re

import torch
import torch.nn.functional as F

#: Linears inside a MoE block that route (the router, Qwen2-MoE's shared-expert gate): always float, no
#: quantization site (ir/patterns.linear_sites skips them). vLLM builds the router as a ReplicatedLinear with the
#: quant config (vllm 0.23.0 models/qwen3_moe.py Qwen3MoeSparseMoeBlock.__init__): its FLOAT description entry gives
#: it the unquantized method (vLLM-Ascend modelslim_config.py is_layer_skipped_ascend); routing stays float there.
ROUTER_LINEAR = re.compile(r"(^|\.)mlp\.(gate|shared_expert_gate)$")
#: an expert Linear's full or layer-relative name: group 1 = expert index
EXPERT_LINEAR = re.compile(r"(?:^|\.)mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)$")
#: transformers MoE block classes this module replaces (model_type -> class name)
MOE_BLOCK_CLASSES = {"qwen3_moe": "Qwen3MoeSparseMoeBlock", "qwen2_moe": "Qwen2MoeSparseMoeBlock"}


def is_router(name: str) -> bool:
    """Whether a Linear name (full or inside the layer) is a MoE router / shared-expert gate (always float)."""
    return ROUTER_LINEAR.search(name) is not None


def is_moe_config(config: dict) -> bool:
    return config.get("model_type") in MOE_BLOCK_CLASSES


def num_experts(config: dict) -> int:
    """Routed experts per MoE layer from a config.json dict: `num_experts`, or `num_local_experts` (the key
    transformers 5 writes for it: configuration_qwen3_moe.Qwen3MoeConfig attribute_map)."""
    return int(config.get("num_experts") or config.get("num_local_experts") or 0)


def is_moe_layer(config: dict, index: int) -> bool:
    """Whether decoder layer `index` has a sparse MoE block, as transformers decides
    (modeling_qwen3_moe.Qwen3MoeDecoderLayer.__init__: not in mlp_only_layers and (index + 1) %
    decoder_sparse_step == 0, with num_experts > 0)."""
    if not is_moe_config(config):
        return False
    experts = num_experts(config)
    step = int(config.get("decoder_sparse_step") or 1)
    return index not in (config.get("mlp_only_layers") or []) and experts > 0 and (index + 1) % step == 0


def moe_mlp_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """{Linear path inside a MoE decoder layer's mlp (quantizable ones, routers excluded): (n, k)}."""
    h, inter, experts = config["hidden_size"], config["moe_intermediate_size"], num_experts(config)
    shapes = {}
    for e in range(experts):
        shapes.update({f"mlp.experts.{e}.gate_proj": (inter, h), f"mlp.experts.{e}.up_proj": (inter, h),
                       f"mlp.experts.{e}.down_proj": (h, inter)})
    shared = config.get("shared_expert_intermediate_size")
    if config.get("model_type") == "qwen2_moe" and shared:
        shapes.update({"mlp.shared_expert.gate_proj": (shared, h), "mlp.shared_expert.up_proj": (shared, h),
                       "mlp.shared_expert.down_proj": (h, shared)})
    return shapes


def moe_fused_groups(config: dict) -> tuple[tuple[str, ...], ...]:
    """Linears of a MoE layer's mlp that must share one scheme: every routed expert's gate/up/down (one group:
    vLLM-Ascend builds one fused-MoE method per layer from the description entries of `experts.0.gate_proj`,
    `experts.0.up_proj`, `experts.0.down_proj` (quantization/modelslim_config.py packed_modules_model_mapping
    "qwen3_moe": experts) and loads every expert's gate/up into w13 and down into w2 of that one scheme), and the
    shared expert's gate/up (a dense MergedColumnParallelLinear)."""
    names = list(moe_mlp_shapes(config))
    groups = [tuple(n for n in names if EXPERT_LINEAR.search(n))]
    if "mlp.shared_expert.gate_proj" in names:
        groups.append(("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"))
    return tuple(groups)


class ExpertMLP(torch.nn.Module):
    """One expert (or the shared expert): down(act(gate(x)) * up(x)), checkpoint names gate_proj/up_proj/down_proj."""

    def __init__(self, hidden: int, inter: int, act):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.up_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.down_proj = torch.nn.Linear(inter, hidden, bias=False)
        self.act_fn = act

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class SparseMoeBlock(torch.nn.Module):
    """A Qwen3-MoE / Qwen2-MoE sparse block with per-expert Linears and explicit dense routing (module docstring)."""

    def __init__(self, hf_config):
        from transformers.activations import ACT2FN
        super().__init__()
        h = hf_config.hidden_size
        self.num_experts = int(hf_config.num_experts)
        self.top_k = int(hf_config.num_experts_per_tok)
        self.norm_topk_prob = bool(hf_config.norm_topk_prob)
        self.gate = torch.nn.Linear(h, self.num_experts, bias=False)
        self.experts = torch.nn.ModuleList(ExpertMLP(h, hf_config.moe_intermediate_size, ACT2FN[hf_config.hidden_act])
                                           for _ in range(self.num_experts))
        self.has_shared_expert = hf_config.model_type == "qwen2_moe" and bool(
            getattr(hf_config, "shared_expert_intermediate_size", 0))
        if self.has_shared_expert:
            self.shared_expert = ExpertMLP(h, hf_config.shared_expert_intermediate_size, ACT2FN[hf_config.hidden_act])
            self.shared_expert_gate = torch.nn.Linear(h, 1, bias=False)

    def routing_weights(self, logits: torch.Tensor) -> torch.Tensor:
        """[T, E] routing weight of every expert per token (model dtype; 0 where the expert is not chosen)."""
        probs = F.softmax(logits, dim=-1, dtype=torch.float)
        top_w, top_i = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        top_w = top_w.to(logits.dtype)
        chosen = top_i.unsqueeze(-1) == torch.arange(self.num_experts, device=logits.device)  # [T, k, E]
        # one k matches each chosen expert (topk indices are distinct): the sum is that weight exactly
        return (chosen.to(logits.dtype) * top_w.unsqueeze(-1)).sum(dim=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = hidden_states.shape
        x = hidden_states.reshape(-1, hidden)
        weights = self.routing_weights(self.gate(x))
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out = out + expert(x) * weights[:, e:e + 1]
        if self.has_shared_expert:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.reshape(batch, seq, hidden)


def replace_moe_blocks(model: torch.nn.Module) -> None:
    """Swap every transformers sparse MoE block of `model` (a *ForCausalLM) for a SparseMoeBlock on the same
    device and dtype (meta stays meta: no memory)."""
    cls_name = MOE_BLOCK_CLASSES.get(getattr(model.config, "model_type", None))
    if cls_name is None:
        return
    for layer in model.model.layers:
        old = layer.mlp
        if type(old).__name__ != cls_name:
            continue
        ref = old.gate.weight
        with torch.device(ref.device):
            new = SparseMoeBlock(model.config).to(ref.dtype)
        layer.mlp = new


#: what `qcompile passes` says about mixture-of-experts models
MOE_PASSES_NOTE = (
    "mixture of experts (Qwen3-MoE, Qwen2-MoE): expert Linears are sites named mlp.experts.{e}.gate_proj/up_proj/"
    "down_proj; all experts of a layer take one scheme, w8a8d, w4a8d or w4a16 (group > 0; vLLM-Ascend's W4A16 "
    "fused-MoE layout), e.g. --passes 'w4a8d:match=mlp\\.experts,w8a8d'; attention takes any scheme, kv8 and fa3 "
    "work; the router (mlp.gate) and Qwen2-MoE's shared_expert_gate stay float. gptq uses each expert's routed "
    "tokens (min_expert_tokens=8, few_tokens=rtn|all below it); fallback and --exclude keep a layer's experts "
    "float only all together. Refused on MoE models: smooth, awq, sparse, and static-activation or w8a16 schemes "
    "on experts.")


def expert_index(name: str) -> int | None:
    """The routed expert a Linear name (full or layer-relative) belongs to; None for any other Linear."""
    m = EXPERT_LINEAR.search(name)
    return int(m.group(1)) if m else None


def router_index_node(gm: torch.fx.GraphModule) -> torch.fx.Node | None:
    """The top-k expert indices [tokens, top_k] of the layer's MoE block (the rows of every expert Linear's input
    are those tokens, in the same order: SparseMoeBlock.forward); None when the layer has no MoE block."""
    nodes = _topk_index_nodes(gm.graph)
    return nodes[0] if nodes else None


def _topk_index_nodes(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """The top-k expert index outputs (getitem 1 of each aten.topk) of a layer graph, in graph order."""
    out = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.topk.default:
            out += [u for u in node.users if u.target is operator.getitem and u.args[1] == 1]
    return out


def routed_token_counts(gm: torch.fx.GraphModule, hidden: torch.Tensor, position_embeddings,
                        batch_size: int) -> list[int] | None:
    """Tokens routed to each expert of the layer's MoE block on `hidden` [N, L, H] (calibration inputs), as the
    graph `gm` routes them (its own router on its own attention output); None when the layer has no MoE block.
    Runs only what the router depends on (a copy of the graph whose output is the top-k indices: attention and
    the norm, no expert)."""
    nodes = _topk_index_nodes(gm.graph)
    if not nodes:
        return None
    graph = torch.fx.Graph()
    env = {}
    graph.graph_copy(gm.graph, env)  # copies every node but the output
    graph.output(env[nodes[0]])
    routed = torch.fx.GraphModule(gm, graph)
    routed.graph.eliminate_dead_code()
    routed.recompile()
    experts = int(next(n for n in gm.graph.nodes if n.op == "call_function"
                       and n.target == torch.ops.aten.topk.default).args[0].meta["val"].shape[-1])
    counts = torch.zeros(experts, dtype=torch.long)
    cos, sin = position_embeddings
    with torch.inference_mode():
        for start in range(0, hidden.shape[0], batch_size):
            index = routed(hidden[start:start + batch_size], cos, sin)
            counts += torch.bincount(index.reshape(-1), minlength=experts)
    return counts.tolist()
