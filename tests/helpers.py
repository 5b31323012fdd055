"""Shared test helpers (imported by tests and by tests/byte_identity.py; never by the package).

Tiny random HF checkpoints (Llama / Qwen2 / Qwen3) with a real tokenizer: the tokenizer is a small
byte-level BPE trained here on a fixed text (tokenizers library), so fast tests need neither the network
nor ../shared. The real SmolLM2 (../shared/models/get_models.py) is built by `smollm2_checkpoints` for the
session fixture `smollm2` (tests/conftest.py), which skips when ../shared is absent.
"""
import json
from pathlib import Path

import torch

TEXT = ("Quantization maps floating point weights and activations to small integers. "
        "The Ascend NPU runs int8 matrix multiplications with int32 accumulation. "
        "A calibration set gives the ranges of the activations of every layer. ") * 20

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BENCH = Path(__file__).resolve().parents[1] / "bench"


def tiny_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def tiny_config(arch: str, vocab: int, layers: int = 2, **overrides):
    """(transformers config, model class) of the tiny `arch` with `layers` decoder layers; `overrides` replace config
    fields."""
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=False)
    config, cls = _tiny_config(arch, common)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config, cls


def _tiny_config(arch: str, common: dict):
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM
        return LlamaConfig(**common), LlamaForCausalLM
    if arch == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM
        return Qwen2Config(**common, use_sliding_window=False), Qwen2ForCausalLM
    if arch == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM
        return Qwen3Config(**common, head_dim=16), Qwen3ForCausalLM
    # mixture of experts (ir/moe.py): 4 experts of 128, top-2: at tp=2 (loader check) each rank holds 2 of w4a8d's
    # 32-groups of down_proj (the loader check takes a w2 scale of 1 group per rank for a per-channel one)
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128, norm_topk_prob=True)
    if arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
        return Qwen3MoeConfig(**common, **moe, head_dim=16), Qwen3MoeForCausalLM
    if arch == "qwen2_moe":
        from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
        return Qwen2MoeConfig(**common, **moe, shared_expert_intermediate_size=64, use_sliding_window=False,
                              qkv_bias=True), Qwen2MoeForCausalLM
    raise ValueError(arch)


def make_tiny_model(folder: Path, arch: str = "llama", dtype=torch.bfloat16, seed: int = 0, layers: int = 2,
                    **overrides) -> Path:
    """Save a tiny random `arch` checkpoint (`layers` decoder layers) with a trained tokenizer into `folder`; returns
    it. `arch`: llama, qwen2, qwen3, or the mixture-of-experts qwen3_moe / qwen2_moe (random routers); `overrides`:
    config fields (e.g. mlp_only_layers=[0])."""
    tok = tiny_tokenizer()
    cfg, cls = tiny_config(arch, len(tok), layers, **overrides)
    torch.manual_seed(seed)
    model = cls(cfg).to(dtype).eval()
    if arch in ("qwen3_moe", "qwen2_moe"):  # transformers initialises the router to zeros: every tie would route
        with torch.no_grad():               # to experts 0..k-1; random routers exercise the routing
            for layer in model.model.layers:
                if hasattr(layer.mlp, "experts"):
                    layer.mlp.gate.weight.normal_(0, 0.5)
    if arch == "qwen2":  # random (non-zero) q/k/v biases, so the bias path is exercised
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.02)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder




def write_calib_file(path: Path) -> Path:
    """10 rows of TEXT in msModelSlim's layout (`inputs_pretokenized`), the tests' calibration file."""
    rows = [{"inputs_pretokenized": TEXT[i * 200:(i + 1) * 200]} for i in range(10)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


# ---------------------------------------------------------------------------------------- one layer graph

def capture_tiny_layer(folder: Path, index: int = 0, seed: int = 1, seqs: int = 4, length: int = 16):
    """(layer `index` of checkpoint `folder` captured as the compiler does, its LayerContext) on `seqs` x
    `length` random token ids (generator seed `seed`)."""
    from qcompiler.ir.capture import HFSkeleton
    from qcompiler.loading import open_checkpoint
    from qcompiler.passes import LayerContext
    ckpt = open_checkpoint(folder)
    skel = HFSkeleton(ckpt)
    ids = torch.randint(0, 250, (seqs, length), generator=torch.Generator().manual_seed(seed))
    inputs = skel.layer0_inputs(ids)
    return skel.capture_layer(index, inputs), LayerContext(index=index, inputs=inputs, dtype=ckpt.dtype)


def sdpa_inputs(gm, ctx):
    """The float q/k/v the attention node of `gm` reads on ctx's inputs (fx Interpreter)."""
    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    seen = {}

    class Spy(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.op == "call_function" and n.target == sdpa:
                seen["args"] = [self.env[a] for a in n.args[:3]]
            return out

    with torch.no_grad():
        Spy(gm).run(ctx.inputs.hidden, *ctx.inputs.position_embeddings)
    return seen["args"]


# ------------------------------------------------------------------ scheme math written out (engine formulas)

def unpack_int4(p: torch.Tensor, dim: int) -> torch.Tensor:
    """Independent int4 unpack (bit ops) of int8 storage: low nibble = even index along `dim`."""
    p = p.to(torch.int16)
    lo, hi = ((p & 0xF) ^ 8) - 8, (((p >> 4) & 0xF) ^ 8) - 8
    return torch.stack([lo, hi], dim=dim + 1).flatten(dim, dim + 1).to(torch.int8)


def per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes as float, float32 scale [..., 1]): symmetric per-token dynamic quantization, absmax / 127."""
    xf = x.float()
    s = xf.abs().amax(-1, keepdim=True) / 127
    s = torch.where(s == 0, torch.ones_like(s), s)
    return torch.clamp(torch.round(xf / s), -128, 127), s


def dynamic_linear(x: torch.Tensor, p: dict, dtype: torch.dtype) -> torch.Tensor:
    """Spec section 3 W8A8_DYNAMIC engine math, written out; weight_scale and bias as the engines hold them
    (model dtype)."""
    xq, s = per_token_int8(x)
    acc = xq.double() @ p["weight"].double().T                  # exact integers
    y = acc.float() * p["weight_scale"].to(dtype).float().T * s
    return (y + p["bias"].to(dtype).float() if "bias" in p else y).to(dtype)


def w4a8_linear(x: torch.Tensor, p: dict, dtype: torch.dtype, group: int) -> torch.Tensor:
    """W4A8_DYNAMIC two-stage per-group (MindIE's A8W4 math), written out: S = dtype(dtype(weight_scale) *
    dtype(weight_scale_second)), exact integer group sums, float32 sum over the groups in order, * per-token s."""
    w = unpack_int4(p["weight"], 0)
    S = (p["weight_scale"].to(dtype) * p["weight_scale_second"].to(dtype)).float()
    xq, s = per_token_int8(x)
    y = None
    for j in range(S.shape[1]):
        acc = (xq[..., j * group:(j + 1) * group].double() @ w[:, j * group:(j + 1) * group].double().T).float()
        term = acc * S[:, j]
        y = term if y is None else y + term
    return (y * s).to(dtype)


# ------------------------------------------------------------------------- passes on one captured layer

def capture_layer_and_output(folder: Path, seed: int = 1):
    """(layer 0 graph, its LayerInputs, model dtype, float32 output) of checkpoint `folder` on 4 x 16 random ids."""
    gm, ctx = capture_tiny_layer(folder, 0, seed=seed)
    with torch.no_grad():
        want = gm(ctx.inputs.hidden, position_embeddings=ctx.inputs.position_embeddings).float()
    return gm, ctx.inputs, ctx.dtype, want


def fresh_layer(layer):
    """(a deep copy of the layer graph, a new LayerContext) from a capture_layer_and_output() tuple."""
    import copy
    from qcompiler.passes import LayerContext
    gm, inputs, dtype, _ = layer
    return copy.deepcopy(gm), LayerContext(index=0, inputs=inputs, dtype=dtype)


def annotate(gm, ctx, passes):
    """Run the scheme passes (Phase.ANNOTATE) among `passes` (Pass objects) on gm in place, in their order: what
    the PassManager does before any float transform (smooth, awq, gptq, sparse read the specs they write)."""
    from qcompiler.passes.base import Phase
    for p in passes:
        if p.phase == Phase.ANNOTATE:
            gm = p.run(gm, ctx).gm
    return gm


def run_passes(gm, ctx, *passes):
    """Run `passes` (names or (name, options)) then the tail (observe, calibrate, lower) on gm in place."""
    from qcompiler.passes import TAIL, PassManager, make_pass
    PassManager([make_pass(*p) if isinstance(p, tuple) else make_pass(p) for p in passes]
                + [make_pass(n) for n in TAIL]).run(gm, ctx)
    return gm


# ---------------------------------------------------------------------------- generation with a KV cache

def recompute_logits(model, ids):
    """Logits [1, L, V] of the full sequence through the ordinary (recomputing) layer graphs."""
    from qcompiler.ir.capture import LayerInputs
    h = model.head.embed(ids)
    pe = model.head.rope(ids.shape[1])
    with torch.inference_mode():
        for i in range(model.layers.num_layers):
            h = model.layers.get(i, LayerInputs(h, pe))(h, position_embeddings=pe)
        return model.head.logits(h).float()


def cached_logits(model, ids, prefill: int):
    """Logits of positions prefill-1 .. L-1: one prefill of `prefill` tokens, then one token per step."""
    from qcompiler.generate import KVCache, decode_layers, forward_cached
    from qcompiler.ir.capture import LayerInputs
    sample = LayerInputs(model.head.embed(ids), model.head.rope(ids.shape[1]))
    layers = decode_layers(model, sample)
    cache = KVCache([s for _, s in layers], 1, ids.shape[1])
    out = []
    with torch.inference_mode():
        h = forward_cached(model, layers, cache, ids[:, :prefill])
        out.append(model.head.logits(h[:, -1:]).float())
        for p in range(prefill, ids.shape[1]):
            h = forward_cached(model, layers, cache, ids[:, p:p + 1])
            out.append(model.head.logits(h).float())
    return torch.cat(out, dim=1), cache


# ------------------------------------------------- a decoder layer written out from the artifact's tensors

def decode_deq_scale(t: torch.Tensor) -> torch.Tensor:
    """An artifact deq_scale as float32: int64 holds the float32 bits in its low 32 bits (float16 models)."""
    import numpy as np
    if t.dtype == torch.int64:
        return torch.from_numpy((t.numpy() & 0xFFFFFFFF).astype(np.uint32).view(np.float32).copy())
    return t.float()


def w8a8_linear(x: torch.Tensor, p: dict, dtype: torch.dtype) -> torch.Tensor:
    """Spec section 3, W8A8 engine math, written out (p: the Linear's artifact tensors by suffix)."""
    recip = (1.0 / p["input_scale"].to(dtype)).to(dtype).float()
    xq = torch.clamp(torch.round(x.float() * recip + p["input_offset"].float()), -128, 127)
    acc = xq.double() @ p["weight"].double().T + p["quant_bias"].double()   # exact integers in float64
    return (acc.float() * decode_deq_scale(p["deq_scale"])).to(dtype)


def _rms(x, w, eps):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def apply_rope(x, cos, sin):
    """Rotary embedding as transformers applies it (x [B, heads, L, D], cos/sin [1, L, D])."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rot * sin.unsqueeze(1)


def linear_params(t: dict, prefix: str) -> dict:
    """The artifact tensors of one Linear, keyed by suffix."""
    return {k[len(prefix) + 1:]: v for k, v in t.items() if k.startswith(prefix + ".")}


def reference_layer(lin, t, i, cfg, h, cos, sin):
    """A decoder layer written out from artifact tensors; `lin(full_linear_name, x)` applies one Linear."""
    import torch.nn.functional as F
    pre = f"model.layers.{i}."
    eps, nh, kvh = cfg["rms_norm_eps"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // nh
    b, s, _ = h.shape
    x = _rms(h, t[pre + "input_layernorm.weight"], eps)
    q = lin(pre + "self_attn.q_proj", x).view(b, s, nh, hd).transpose(1, 2)
    k = lin(pre + "self_attn.k_proj", x).view(b, s, kvh, hd).transpose(1, 2)
    v = lin(pre + "self_attn.v_proj", x).view(b, s, kvh, hd).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    att = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=hd ** -0.5, enable_gqa=True)
    h = h + lin(pre + "self_attn.o_proj", att.transpose(1, 2).reshape(b, s, -1))
    x = _rms(h, t[pre + "post_attention_layernorm.weight"], eps)
    return h + lin(pre + "mlp.down_proj", F.silu(lin(pre + "mlp.gate_proj", x)) * lin(pre + "mlp.up_proj", x))


# ------------------------------------------------------------------------------- the artifact checker

CHECKER = SHARED / "tools" / "check_ascend_artifact.py"


def checker_report(out: Path) -> dict:
    """../shared/tools/check_ascend_artifact.py --json on `out` ({errors, warnings, violations, ...}).
    Skips the calling test (visibly, never a silent pass) when ../shared is absent."""
    import subprocess
    import sys
    import pytest
    if not CHECKER.is_file():
        pytest.skip(f"artifact checker {CHECKER} absent (../shared)")
    r = subprocess.run([sys.executable, str(CHECKER), "--json", str(out)], capture_output=True, text=True)
    try:
        return json.loads(r.stdout)
    except ValueError:
        raise AssertionError(f"checker gave no JSON (exit {r.returncode}): {r.stdout[-1000:]}{r.stderr[-2000:]}")


def assert_checker_clean(out: Path) -> dict:
    """The checker finds 0 errors in `out` (call it last in a test: it skips when the checker is absent)."""
    report = checker_report(out)
    assert report["errors"] == 0, report["violations"]
    return report


# The checker's one wrong rule on MoE artifacts. check_ascend_artifact.py knows the Linear shapes of llama / qwen2 /
# qwen3 only (`expected_model`); for any other model type (qwen3_moe, qwen2_moe) its `check()` takes a Linear's
# (n, k) from the shape of its `.weight` tensor (the `lin_exp is None` branch). A W4A8_DYNAMIC weight is packed
# along n, int8 [n/2, k], in the engine's own parameters (vLLM-Ascend 0.23.0
# vllm_ascend/quantization/methods/w4a8.py: dense AscendW4A8DynamicLinearMethod.get_weight `output_size // 2`;
# experts AscendW4A8DynamicFusedMoEMethod.get_weight_modelslim, w13_weight [E, I, H] = gate and up [I/2, H] each,
# w2_weight [E, H/2, I]), so the checker reads n/2 and then applies its own W4A8 rule (`layout`: weight [n/2, k],
# weight_scale / weight_offset [n, 1], weight_scale_second / weight_offset_second [n, k/g], scale_bias [n, 1] or
# [n, 16], which are the engine's get_pergroup_param / get_dynamic_quant_param_modelslim shapes) at that n: every
# tensor of the Linear is reported as a shape error (6 per Linear; 144 for the 24 expert Linears of a tiny 2-layer,
# 4-expert Qwen3-MoE). `checker_w4a8_misreads` lists exactly those errors; anything else stays an error.
_CHECKER_MODEL_TYPES = ("llama", "qwen2", "qwen3")  # check_ascend_artifact.expected_model's structures


def true_linear_shape(config: dict, linear: str) -> tuple[int, int]:
    """(n, k) of the decoder Linear `linear` (`model.layers.L.<...>.<proj>`) of a qwen3_moe / qwen2_moe
    config.json, from the config alone (as vLLM builds the module): attention q/k/v/o, routed experts
    (moe_intermediate_size), Qwen2-MoE's shared expert (shared_expert_intermediate_size) and a dense layer's MLP
    (intermediate_size)."""
    h, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or h // heads
    kv = config.get("num_key_value_heads") or heads
    proj = linear.rsplit(".", 1)[-1]
    if ".self_attn." in linear:
        return {"q_proj": (heads * head_dim, h), "k_proj": (kv * head_dim, h), "v_proj": (kv * head_dim, h),
                "o_proj": (h, heads * head_dim)}[proj]
    inter = (config["moe_intermediate_size"] if ".mlp.experts." in linear else
             config["shared_expert_intermediate_size"] if ".mlp.shared_expert." in linear else
             config["intermediate_size"])
    return (h, inter) if proj == "down_proj" else (inter, h)


def _w4a8_shapes(n: int, k: int, group: int, row_parallel: bool) -> dict:
    """{suffix: shape} of a W4A8_DYNAMIC Linear [n, k] in msModelSlim's 1.0.0 per-group form, as the engine's
    parameters take it (methods/w4a8.py, see the comment above)."""
    return {"weight": (n // 2, k), "weight_scale": (n, 1), "weight_offset": (n, 1),
            "weight_scale_second": (n, k // group), "weight_offset_second": (n, k // group),
            "scale_bias": (n, 16 if row_parallel else 1)}


def checker_w4a8_misreads(out: Path) -> set:
    """{(tensor, rule, detail)}: the errors check_ascend_artifact.py gives on `out` only because it reads a
    W4A8_DYNAMIC Linear's n from its packed weight (comment above): for each W4A8_DYNAMIC Linear of a model type
    the checker has no structure for, and each of its tensors whose shape is the engine's at the true n (from
    config.json), the error the checker's rule gives at n/2. A tensor without the engine's shape is not listed,
    so the checker's error on it stays an error."""
    from safetensors import safe_open
    desc = json.loads((out / "quant_model_description.json").read_text())
    config = json.loads((out / "config.json").read_text())
    if config.get("model_type") in _CHECKER_MODEL_TYPES:
        return set()
    shapes = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            shapes.update({k: tuple(h.get_slice(k).get_shape()) for k in h.keys()})
    misreads = set()
    for key, qtype in desc.items():
        if qtype != "W4A8_DYNAMIC" or not key.endswith("_proj.weight") or key not in shapes:
            continue
        linear = key[:-len(".weight")]
        n, k = true_linear_shape(config, linear)
        row = linear.endswith(("o_proj", "down_proj"))
        engine = _w4a8_shapes(n, k, desc["group_size"], row)
        misread = _w4a8_shapes(shapes[key][0], k, desc["group_size"], row)  # the checker's n: the packed rows
        for suffix, want in engine.items():
            name = f"{linear}.{suffix}"
            if shapes.get(name) == want and misread[suffix] != want:
                misreads.add((name, f"W4A8_DYNAMIC.{suffix}.shape",
                              f"shape {list(want)}, expected {list(misread[suffix])}"))
    return misreads


def _checker_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("check_ascend_artifact", CHECKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def assert_checker_clean_on_moe(out: Path) -> dict:
    """The checker's errors on the MoE artifact `out` are exactly `checker_w4a8_misreads(out)` (none more; and
    none fewer: once the checker takes n from the config, this says so and the exception goes), and its own
    W4A8_DYNAMIC tensor rules (`check_linear`: shapes, dtypes, finite positive scales, zero offsets), run again
    with each W4A8_DYNAMIC Linear's true (n, k) from config.json, find no error."""
    report = checker_report(out)
    errors = {(v["tensor"], v["rule"], v["detail"]) for v in report["violations"] if v["severity"] == "ERROR"}
    misreads = checker_w4a8_misreads(out)
    assert errors - misreads == set(), sorted(errors - misreads)
    assert misreads - errors == set(), ("the checker no longer misreads these W4A8_DYNAMIC shapes: drop the "
                                        "exception", sorted(misreads - errors))
    mod = _checker_module()
    cfg, model_dtype = mod.check_config(str(out), mod.Report())
    keymap = mod.check_files(str(out), mod.Report())
    weights, rep = mod.Weights(str(out), keymap), mod.Report()
    desc = json.loads((out / "quant_model_description.json").read_text())
    for key, qtype in desc.items():
        if qtype == "W4A8_DYNAMIC" and key.endswith("_proj.weight"):
            n, k = true_linear_shape(cfg, key[:-len(".weight")])
            mod.check_linear(key[:-len(".weight")], qtype, weights, desc, rep, n, k, desc["group_size"],
                             model_dtype == "float16", desc.get("version"), None)
    errors = [v for v in rep if v[0] == "ERROR"]
    assert errors == [], ("checker rules at the true (n, k)", errors)
    return report


# ------------------------------------------------------------------------------ the command line, in tests

def smollm2_checkpoints() -> dict:
    """{'llama': dir, 'qwen2': dir}: the real SmolLM2-135M in both architectures, built (once per machine) by
    ../shared/models/get_models.py into $QC_MODELS (default ~/.cache/qc-models). The build runs under an
    exclusive lock on a file beside that folder: under pytest-xdist every worker asks for it, and get_models.py
    writes its files in place, so a second worker must wait for the first build instead of reading a half-written
    one."""
    import fcntl
    import os
    import subprocess
    import sys
    dest = Path(os.environ.get("QC_MODELS", str(Path.home() / ".cache" / "qc-models")))
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        out = subprocess.run([sys.executable, str(SHARED / "models" / "get_models.py"), "--dest", str(dest)],
                             check=True, capture_output=True, text=True).stdout.split()
    return {"llama": Path(out[0]), "qwen2": Path(out[1])}


#: calibration flags of the CLI tests' tiny compiles
SMALL = ["--calib-samples", "2", "--seq-len", "32"]


def cli_env(**extra) -> dict:
    """Environment of a `python3 -m qcompiler.cli` subprocess: this checkout's package, no progress bars."""
    import os
    env = dict(os.environ, QC_NO_PROGRESS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]), **extra)
    env.pop("QC_DEBUG", None)
    return env


def start_cli(argv, **env):
    """`python3 -m qcompiler.cli ARGV` started in the background (text pipes; `env` added to cli_env)."""
    import subprocess
    import sys
    return subprocess.Popen([sys.executable, "-m", "qcompiler.cli", *map(str, argv)],
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=cli_env(**env))


def run_cli(argv, timeout=600, **env):
    """`python3 -m qcompiler.cli ARGV` to its end: CompletedProcess (text)."""
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "qcompiler.cli", *map(str, argv)],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          env=cli_env(**env), timeout=timeout)


def wait_for_pause(proc, phase, timeout=300) -> list[str]:
    """Read `proc`'s stderr until the QC_TEST_PAUSE marker of `phase` (knobs.py); returns the lines read."""
    import time
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if f"test pause at {phase}" in line:
            return seen
    proc.kill()
    raise AssertionError(f"no pause at {phase}: {''.join(seen)}")


def leftovers(parent: Path, name: str = "out") -> list[str]:
    """Entries of `parent` that a compile into parent/name would have made (OUT, `.OUT.tmp-PID`,
    `.OUT.lock-PID`, `.OUT.old-PID`)."""
    return sorted(p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}."))


def make_old_out(out: Path, note: str = "old") -> Path:
    """A folder that looks like a previous compile's OUT (what --force may replace), with a note file."""
    out.mkdir()
    (out / "qcompile_report.json").write_text("{}")
    (out / "old.txt").write_text(note)
    return out


def expect_error(capsys, argv, *needles) -> str:
    """Run main(argv): exit 2, exactly one 'qcompile: error:' line, the last one, holding every needle."""
    from qcompiler import cli
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in lines if line.startswith("qcompile: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"not one error line:\n{err}"
    for needle in needles:
        assert needle.lower() in errors[0].lower(), f"{needle!r} not in {errors[0]!r}"
    return errors[0]


def rewrite_weights(folder: Path, edit, file: str = "model.safetensors") -> None:
    """Apply `edit(tensors)` to folder/file in place (an OUT's: "quant_model_weights.safetensors")."""
    from safetensors.torch import load_file, save_file
    path = folder / file
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edited_artifact(out: Path, dest: Path, edit) -> Path:
    """A copy of OUT at `dest` with `edit(tensors)` applied to its quant_model_weights.safetensors (a broken
    artifact for a checker or loader to catch)."""
    import shutil
    shutil.copytree(out, dest)
    rewrite_weights(dest, edit, "quant_model_weights.safetensors")
    return dest


def edit_config(folder: Path, **changes) -> None:
    """Update keys of folder/config.json."""
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


#: the commands that read a model folder
MODEL_COMMANDS = ("compile", "eval", "run", "inspect")


def model_command_argv(command: str, model, tmp_path: Path, data) -> list:
    """The smallest argv of `command` on `model` (compile into tmp_path/out, eval/run on one short window)."""
    return {"compile": [model, "-o", tmp_path / "out", "--calib", data, *SMALL],
            "eval": ["eval", model, "--data", data, "--seq-len", "32", "--max-windows", "1"],
            "run": ["run", model, "--prompt", "hello", "--raw", "--max-new-tokens", "1"],
            "inspect": ["inspect", model]}[command]


def expect_refused(capsys, monkeypatch, tmp_path: Path, command: str, model, data, *needles) -> str:
    """`command` on `model` fails with one error line holding every needle; a compile does no work and
    leaves nothing behind."""
    import qcompiler.driver as driver

    def no_work(*a, **k):
        raise AssertionError("work started before the checkpoint was checked")
    monkeypatch.setattr(driver, "_compile_into", no_work)
    line = expect_error(capsys, model_command_argv(command, model, tmp_path, data), *needles)
    assert leftovers(tmp_path) == []
    return line


# ------------------------------------------------------------------------------------ bench scripts

def bench_module(name: str):
    """bench/NAME.py loaded as a module `bench_NAME` (a fresh execution per call; registered in sys.modules,
    where dataclasses resolve their annotations)."""
    import importlib.util
    import sys
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def collect_linear_input_stats(gm, ctx, names, keep_rows: int = 0, seed: int = 0) -> dict:
    """{input node: InputStats} (min, max, absmax, mean |x|) of the inputs of the Linears named in `names`
    (layer-relative, e.g. `mlp.gate_proj`), over `ctx.inputs`; q/k/v (gate/up) share one entry."""
    from qcompiler.calibration.linear_inputs import LayerRunner
    from qcompiler.ir.patterns import linear_sites
    sites = {s.name: s for s in linear_sites(gm)}
    missing = set(names) - set(sites)
    if missing:
        raise KeyError(f"no Linear named {sorted(missing)} in the graph")
    inputs = list(dict.fromkeys(sites[n].input for n in names))
    return LayerRunner(gm, ctx).collect(inputs, hessian=False, abs_mean=True, extrema=True,
                                        keep_rows=keep_rows, seed=seed)


def layer_output_errors(model_dir: Path, out: Path, ids: torch.Tensor) -> list[float]:
    """Per decoder layer: relative L2 error of (output - input) of OUT's executable layer vs the float layer of
    `model_dir`, both fed the float model's hidden states on token ids [batch, seq]."""
    from qcompiler.ir.capture import LayerInputs
    from qcompiler.runtime import load_model
    ref, quant = load_model(model_dir), load_model(out)
    hidden, pe = ref.head.embed(ids), ref.head.rope(ids.shape[1])
    errors = []
    with torch.inference_mode():
        for i in range(ref.layers.num_layers):
            sample = LayerInputs(hidden[:1], pe)
            want = ref.layers.get(i, sample)(hidden, position_embeddings=pe)
            got = quant.layers.get(i, sample)(hidden, position_embeddings=pe)
            delta = (want - hidden).float()
            errors.append(((got - hidden).float() - delta).norm().item() / delta.norm().item())
            hidden = want
    return errors


class ThreadRanks:
    """`world` threads standing in for ranks (qcompiler/distributed.py's collectives patched): every collective
    waits for all of them, then each gets the elementwise sum / min / max of the tensors they gave (what gloo's
    all_reduce returns), or for `gather_rows` their rows concatenated in rank order."""

    def __init__(self, world: int):
        import threading
        self.world, self.barrier, self.local = world, threading.Barrier(world), threading.local()
        self.slots = [None] * world

    def _reduce(self, t, op):
        self.slots[self.local.rank] = t.clone()
        self.barrier.wait()
        out = op(torch.stack(self.slots))
        self.barrier.wait()  # every rank has read the slots before any rank writes the next collective's
        return out

    def _gather_rows(self, x):
        self.slots[self.local.rank] = x.clone()
        self.barrier.wait()
        out = torch.cat(self.slots)
        self.barrier.wait()
        return out

    def patch(self, monkeypatch):
        from qcompiler import distributed
        monkeypatch.setattr(distributed, "world", lambda: self.world)
        monkeypatch.setattr(distributed, "rank", lambda: self.local.rank)
        monkeypatch.setattr(distributed, "gather_rows", self._gather_rows)
        monkeypatch.setattr(distributed, "all_sum", lambda t: self._reduce(t, lambda s: s.sum(0)))
        monkeypatch.setattr(distributed, "all_min", lambda t: self._reduce(t, lambda s: s.min(0).values))
        monkeypatch.setattr(distributed, "all_max", lambda t: self._reduce(t, lambda s: s.max(0).values))

    def run(self, fn, shares):
        """fn(rank, share) on every rank in its own thread; re-raises a rank's exception."""
        import threading
        errors = []

        def body(rank, share):
            self.local.rank = rank
            try:
                fn(rank, share)
            except BaseException as e:  # noqa: BLE001 - handed to the test thread
                errors.append(e)
                self.barrier.abort()
        threads = [threading.Thread(target=body, args=(r, s)) for r, s in enumerate(shares)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]


#: glibc's mmap threshold fixed for peak-RSS measurements (`peak_in_subprocess`, bench/probe_gptq_peak.py): glibc's
#: dynamic one moves with the order of frees, so freed temporaries sometimes stay in the heap
PEAK_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def peak_in_subprocess(script: str) -> float:
    """Run `script` (Python source that resets the peak RSS with /proc/self/clear_refs and prints a peak as the last
    line of its output) in a fresh interpreter from the repository root, with glibc's mmap threshold fixed; returns that number. Skips the calling test
    where /proc/self/clear_refs is absent (not Linux)."""
    import os
    import subprocess
    import sys
    import pytest
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    # a fixed mmap threshold: glibc's dynamic one moves with the order of frees, so freed temporaries sometimes stay
    # in the heap and the peak read 0.1-2.0 units in runs of one script (the smooth search test); with it, 0.20-0.22
    env = dict(os.environ, **PEAK_MALLOC_ENV)
    out = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], env=env,
                         capture_output=True, text=True, timeout=300, check=True).stdout
    return float(out.strip().splitlines()[-1])


def hessian_peak_preamble(k: int = 2048) -> str:
    """Python source of the Hessian-memory problem (GPTQ, SparseGPT): H of a width-`k` Linear (float32 k x k,
    positive definite), a [16, k] weight `w`, and `peak(call)`: the peak RSS of call() above the RSS before it, in
    units of H. The one copy for the tests (`hessian_peak_units`, k 2048) and bench/probe_gptq_peak.py (any k);
    it lives here, beside `peak_in_subprocess`, as the bench scripts already import tests/ helpers and the package
    imports neither."""
    return f"""
import gc, re, torch
def status(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
def peak(call):
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    before = status("VmRSS")
    call()
    return (status("VmHWM") - before) / (k * k * 4)
torch.set_num_threads(1)
k = {int(k)}
g = torch.Generator().manual_seed(0)
x = torch.randn(k // 2, k, generator=g)
h = x.T @ x / x.shape[0] + torch.eye(k); del x
w = torch.randn(16, k, generator=g)
"""


def hessian_peak_units(body: str) -> float:
    """The number `body` prints last, run after `hessian_peak_preamble()` (k 2048, h, w, peak) by
    `peak_in_subprocess`: `body` imports the function, warms it up on a small slice (libraries, kernels) and prints
    peak(...)."""
    return peak_in_subprocess(hessian_peak_preamble() + body)
