"""Prepared weight layouts (backends/ascend/layouts.py): the prepared graph computes the same bits as the
loaded one (prefill layer, decode step, generation), and every prepared tensor equals what the artifact's own
tensors (quant_model_weights*.safetensors) give, recomputed here from the spec's formulas (a test that fails
when the prepared layout and the artifact disagree: checked by corrupting one prepared tensor)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from qcompiler import cli
from qcompiler.backends.ascend import kernels, layouts, onednn_linear
from qcompiler.backends.ascend.int4 import unpack_int4
from qcompiler.generate import generate
from qcompiler.ir import qnumerics as qn
from qcompiler.ir.decode import build_decode_graph
from qcompiler.runtime import load_model
from tests.helpers import SMALL

CASES = [("llama", "w8a8,kv8"), ("qwen2", "w8a8d"), ("qwen2", "w8a16"), ("qwen3", "w4a16:group=32,fa3"),
         ("llama", "w4a16:group=0"), ("llama", "w4a8d"), ("llama", "w8a16:group=32")]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def compiled(request, tmp_path_factory, tiny_models, calib_file):
    arch, passes = request.param
    out = tmp_path_factory.mktemp("layouts") / "out"
    assert cli.main([str(tiny_models[arch]), "-o", str(out), "--passes", passes, "--calib", str(calib_file),
                     *SMALL]) == 0
    return out


def _artifact(out) -> dict:
    t = {}
    for f in sorted(out.glob("quant_model_weights*.safetensors")):
        t.update(load_file(f))
    return t


def _unpacked(w: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The artifact's weight as int8 [n, k] (spec sec. 3: int4 packed along k [n, k/2] or along n [n/2, k])."""
    if tuple(w.shape) == (n, k):
        return w
    if tuple(w.shape) == (n, (k + 1) // 2):
        return unpack_int4(w, dim=1, size=k)
    assert tuple(w.shape) == ((n + 1) // 2, k), tuple(w.shape)
    return unpack_int4(w, dim=0, size=n)


def _per_column(t: torch.Tensor, k: int) -> torch.Tensor:
    """[n, 1] or per-group [n, k/g] -> [n, k]."""
    return t.expand(-1, k) if t.shape[1] == 1 else t.repeat_interleave(k // t.shape[1], dim=1)


#: kinds prepared from one artifact tensor per Linear; from several when sibling Linears were merged
#: (layouts.merge_siblings: the Linears' tensors concatenated along n, in the order `from` lists them)
_PER_LINEAR = ("rowwise_codes", "int8_weight", "weight_scale_f32", "bias_f32", "deq_scale_f32", "quant_bias_acc",
               "quant_bias_f32")


def _expected(kind: str, art: list, n_k, dtype) -> torch.Tensor:
    """What a prepared tensor of `kind` must hold, from the artifact tensors it was prepared from."""
    name = kind.split(":")[0]
    if name in _PER_LINEAR and len(art) > 1:  # merged siblings: the concatenation along n
        if name in ("rowwise_codes", "int8_weight"):
            k = n_k[-2] if name == "rowwise_codes" else n_k[1]
            n = n_k[0] if name == "int8_weight" else (n_k[-1] - 8) * (n_k[0] if len(n_k) == 3 else 1)
            int8 = sum(w.shape[0] for w in art) == n  # else int4 packed along n, two channels a byte
            w = torch.cat([_unpacked(w, w.shape[0] * (1 if int8 else 2), k) for w in art])
            return _expected(kind, [w], n_k, dtype)
        return torch.cat([_expected(kind, [a], (a.shape[0],), dtype).reshape(-1) for a in art])
    if name == "pergroup_scale" and len(art) > 2:  # merged siblings: each Linear's pair, concatenated along n
        return torch.cat([_expected(kind, art[i:i + 2], n_k, dtype) for i in range(0, len(art), 2)], dim=-1)
    if name == "dequantized_weight":  # npu_weight_quant_batchmatmul: (w + offset) * scale in x's dtype
        w, scale, offset = art
        n, k = n_k
        return (_unpacked(w, n, k).to(dtype) + _per_column(offset, k).to(dtype)) * _per_column(scale, k).to(dtype)
    if name == "rowwise_codes":  # uint8 [k, n + 8]: row j = W[:, j] + 128, then the float32 bytes of 1.0, -128.0;
        (w,) = art                # in P parts along n ("rowwise_codes:parts=P", P > 1): [P, k, n / P + 8], part p
        parts = int(kind.split("parts=")[1]) if "parts=" in kind else 1  # the same of channels [p n/P, (p+1) n/P)
        k, n = n_k[-2], parts * (n_k[-1] - 8)
        assert len(n_k) == (2 if parts == 1 else 3), (kind, n_k)
        codes = (_unpacked(w, n, k).t().to(torch.int16) + 128).to(torch.uint8)  # [k, n]
        tail = torch.tensor([1.0, -128.0]).view(torch.uint8).expand(k, 8)
        out = torch.stack([torch.cat([c, tail], 1) for c in codes.chunk(parts, dim=1)])
        return out[0] if parts == 1 else out
    if name == "weight_scale_f32":  # W8A8_DYNAMIC: the engines hold weight_scale and bias in the model dtype
        return art[0].to(dtype).float().reshape(-1)
    if name == "bias_f32":
        return art[0].to(dtype).float()
    if name in ("int8_weight", "onednn_packed"):  # past kernels.rowwise_layout_pays: int8 [n, k] (onednn_packed:
        # oneDNN's layout of it, compared through onednn_linear.unpack in `mismatches`; W4A8_DYNAMIC per group:
        # "onednn_packed:group=G:size=S", the int4 weight's columns [G * S, (G + 1) * S) as int8)
        (w,) = art
        if "group=" in kind:
            g, size = (int(kind.split(f"{key}=")[1].split(":")[0]) for key in ("group", "size"))
            n = n_k[0]
            return _unpacked(w, n, w.shape[1])[:, g * size:(g + 1) * size].contiguous()
        return _unpacked(w, *n_k)
    if name == "pergroup_scale":  # two-stage scale dtype(dtype(weight_scale) * dtype(weight_scale_second)) [G, 1, n]
        ws, ws2 = art
        return (ws.to(dtype) * ws2.to(dtype)).float().t().unsqueeze(1)
    if name == "bias":
        return art[0].to(dtype)
    if name == "deq_scale_f32":
        d = art[0]
        if d.dtype == torch.int64:  # low 32 bits are a float32's bits (spec sec. 4, fp16 artifacts)
            d = (d & 0xFFFFFFFF).to(torch.int64).numpy().astype("uint32").view("float32")
            return torch.from_numpy(d.copy())
        return d.float()
    if name == "quant_bias_acc":
        return art[0].to(torch.int64)
    if name == "quant_bias_f32":  # prepared only where float32 holds it and every exact partial sum (kernels)
        assert art[0].abs().max() < 2 ** 24
        return art[0].float()
    if name == "reciprocal_f32":  # vLLM-Ascend W8A8: 1 / input_scale in the model dtype
        return (1 / art[0].to(dtype)).to(dtype).float()
    if name == "offset_f32":
        return art[0].float()
    raise AssertionError(f"no expectation for prepared kind {kind}")


def mismatches(gm, artifact: dict, layer: int, dtype) -> list[str]:
    """Prepared tensors of `gm` (layer `layer`) that differ from what the artifact's tensors give."""
    bad = []
    for name, entry in gm.meta[layouts.PREPARED].items():
        got = getattr(gm, name)
        if onednn_linear.is_packed(got):
            got = onednn_linear.unpack(got)  # the int8 [n, k] it holds, computed through oneDNN's own product
        art = [artifact[f"model.layers.{layer}.{src}"] for src in entry["from"]]
        kind = entry["kind"]
        want = _expected(kind, art, tuple(got.shape), dtype)
        if kind.startswith("quant_bias_acc"):
            got = got.to(torch.int64)
        if got.dtype != want.dtype or not torch.equal(got, want):
            bad.append(f"{name} ({kind} from {entry['from']})")
    return bad


def test_prepared_tensors_equal_the_artifact(compiled, int8_gemm):
    """Every prepared tensor equals what the artifact's tensors give. Where the int8 GEMM is native
    (qnumerics.int8_gemm_native) a full-sequence layer keeps the int8 weight [n, k] that `_int_mm` reads (W8A8: the
    artifact's own tensor, nothing prepared) instead of the row-wise layout its one-row products would read."""
    model = load_model(compiled)
    dtype = model.head.dtype
    artifact = _artifact(compiled)
    kinds = set()
    for i in range(model.layers.num_layers):
        gm = model.layers.get(i, prepared=True)
        record = gm.meta[layouts.PREPARED]
        assert record, "nothing was prepared"
        kinds |= {e["kind"].split(":")[0] for e in record.values()}
        assert mismatches(gm, artifact, i, dtype) == []
        # no qc custom op is left to dispatch, and no packed / encoded tensor is kept next to its prepared form
        assert not any(n.op == "call_function" and str(n.target).startswith("qc.") for n in gm.graph.nodes)
    desc = json.loads((compiled / "quant_model_description.json").read_text())
    quant = desc["model_quant_type"]
    expect = {"W8A8": {"rowwise_codes", "deq_scale_f32", "quant_bias_acc", "reciprocal_f32", "offset_f32"},
              "W8A8_DYNAMIC": {"rowwise_codes", "weight_scale_f32"}, "W4A8_DYNAMIC": {"rowwise_codes", "pergroup_scale"},
              "W8A16": {"dequantized_weight"}, "W4A16": {"dequantized_weight"}}[quant]
    if int8_gemm == "native" and quant in ("W8A8", "W8A8_DYNAMIC"):
        expect = (expect - {"rowwise_codes"}) | ({"int8_weight"} if quant == "W8A8_DYNAMIC" else set())
        assert "rowwise_codes" not in kinds, (quant, kinds)
    if int8_gemm == "onednn" and quant in ("W8A8", "W8A8_DYNAMIC", "W4A8_DYNAMIC"):  # tiny models: quant_bias fits,
        expect = (expect - {"rowwise_codes"}) | {"onednn_packed"}                  # every scale positive
        assert not kinds & {"rowwise_codes", "int8_weight"}, (quant, kinds)
    assert expect <= kinds, (quant, kinds)


def test_artifact_check_fails_on_a_corrupted_layout(compiled):
    model = load_model(compiled)
    gm = model.layers.get(0, prepared=True)
    name = next(iter(gm.meta[layouts.PREPARED]))
    t = getattr(gm, name)
    flat = t.view(-1)
    flat[0] = flat[0] + 1 if not t.dtype.is_floating_point else flat[0] * 2 + 1
    assert mismatches(gm, _artifact(compiled), 0, model.head.dtype) != []


def test_prepared_layer_and_decode_step_compute_the_same_bits(compiled, int8_gemm):
    model = load_model(compiled)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 250, (2, 19), generator=g)
    h_ref = h_prep = model.head.embed(ids)
    pe = model.head.rope(19)
    dtype = model.head.dtype
    with torch.inference_mode():
        for i in range(model.layers.num_layers):
            h_ref = model.layers.get(i)(h_ref, position_embeddings=pe)
            h_prep = model.layers.get(i, prepared=True)(h_prep, position_embeddings=pe)
            assert torch.equal(h_ref, h_prep), i
            # decode step: prefill 11 tokens then 1 token, prepared vs the op graph
            plain, spec = build_decode_graph(model.layers.get(i), dtype)
            prepared, _ = model.layers.decode(i)
            _assert_decode_steps_equal(plain, prepared, spec, model.head, model.head.embed(ids[:1]), i)
    assert generate(model, "quantization", 5, raw=True) == generate(model, "quantization", 5, raw=True,
                                                                     use_cache=False)


def test_wide_layers_keep_the_int8_weight_and_the_same_bits(compiled, monkeypatch):
    """Past kernels.rowwise_layout_pays (k > 2048: 7B widths) the int32 path runs, so the prepared layer keeps the
    int8 weight instead of a row-wise copy it would flip back per call; same tensors as the artifact, same bits as
    the op graph. Forced here on the tiny models by moving the width limit to 0."""
    quant, model, artifact = _int8_activation_case(compiled, monkeypatch, "EXACT_F32_MAX_K", 0)
    ids = torch.randint(0, 250, (2, 19), generator=torch.Generator().manual_seed(5))
    h_ref = h_prep = model.head.embed(ids)
    pe = model.head.rope(19)
    with torch.inference_mode():
        for i in range(model.layers.num_layers):
            gm = model.layers.get(i, prepared=True)
            kinds = {e["kind"].split(":")[0] for e in gm.meta[layouts.PREPARED].values()}
            assert "rowwise_codes" not in kinds, kinds
            # W8A8_DYNAMIC on oneDNN's int8 linear where this host uses it; W8A8 never here: its bias joins no
            # exact product once the width limit is 0 (kernels.exact_bias_fits)
            packed = quant == "W8A8_DYNAMIC" and onednn_linear.applies()
            assert ("int8_weight" in kinds) == (quant == "W8A8_DYNAMIC" and not packed), kinds
            assert ("onednn_packed" in kinds) == packed, kinds
            assert mismatches(gm, artifact, i, model.head.dtype) == []
            h_ref, h_prep = model.layers.get(i)(h_ref, position_embeddings=pe), gm(h_prep, position_embeddings=pe)
            assert torch.equal(h_ref, h_prep), i


def test_split_layout_on_the_tiny_models_gives_the_same_bits(compiled, monkeypatch):
    """The weight in parts along n (kernels.rowwise_parts: 8 on SmolLM2, 1-2 on the tiny models' 32-128 channels):
    8 parts forced on the tiny models by moving the channels a part needs to 4; the prepared tensors equal the
    artifact's (the split layout's formula) and a one-token decode step after a prefill computes the op graph's
    bits."""
    _, model, artifact = _int8_activation_case(compiled, monkeypatch, "ROWWISE_PART_MIN_CHANNELS", 4)
    ids = torch.randint(0, 250, (1, 12), generator=torch.Generator().manual_seed(7))
    dtype = model.head.dtype
    x = model.head.embed(ids)
    with torch.inference_mode():
        for i in range(model.layers.num_layers):
            prepared, spec = model.layers.decode(i)
            kinds = {e["kind"] for e in prepared.meta[layouts.PREPARED].values()}
            assert "rowwise_codes:parts=8" in kinds, kinds
            assert mismatches(prepared, artifact, i, dtype) == []
            plain, _ = build_decode_graph(model.layers.get(i), dtype)
            _assert_decode_steps_equal(plain, prepared, spec, model.head, x, i)


def test_pergroup_fold_flag_follows_the_scales(compiled, monkeypatch):
    """W4A8_DYNAMIC: layouts.py lets a per-group matmul fold its group sums in one call only where
    `kernels.pergroup_fold_applies` (every channel has a positive scale): the artifact's scales qualify; one
    channel with negative scales (a -0 sum possible, kernels._fold_groups) turns it off for that matmul only.
    (Full-sequence layers without oneDNN's packed groups, which `test_pergroup_packs_only_positive_scales` covers.)"""
    if json.loads((compiled / "quant_model_description.json").read_text())["model_quant_type"] != "W4A8_DYNAMIC":
        pytest.skip("no per-group matmul in this case")
    monkeypatch.setattr(onednn_linear, "_DECIDED", [False])
    model = load_model(compiled)
    flags = lambda g: [n.args[5] for n in g.graph.nodes if n.target is kernels.quant_matmul_pergroup_prepared]
    assert set(flags(model.layers.get(0, prepared=True))) == {True}
    gm = model.layers.get(0)
    first = next(n for n in gm.graph.nodes if n.target is torch.ops.qc.quant_matmul_pergroup.default)
    scale = layouts._fetch(gm, first.args[2].target)
    scale[1] = -scale[1].abs()  # channel 1: every two-stage scale negative
    got = flags(layouts.prepare_layer(gm))
    assert got[0] is False and set(got[1:]) == {True}, got


def test_pergroup_packs_only_positive_scales(compiled, monkeypatch):
    """W4A8_DYNAMIC full-sequence layers read one oneDNN-packed weight per group where every two-stage scale is
    positive (`onednn_linear.scales_apply`: a zero sum times a negative scale is -0, which oneDNN's small-row
    kernels return as +0); one channel with negative scales keeps that matmul on the written-out kernel, with
    the same bits as the op graph."""
    if json.loads((compiled / "quant_model_description.json").read_text())["model_quant_type"] != "W4A8_DYNAMIC":
        pytest.skip("no per-group matmul in this case")
    if not onednn_linear._is_exact():
        pytest.skip("no exact oneDNN int8 linear on this CPU")
    monkeypatch.setattr(onednn_linear, "_DECIDED", [True])
    model = load_model(compiled)
    targets = lambda g: [n.target for n in g.graph.nodes if n.op == "call_function" and n.target in (
        kernels.quant_matmul_pergroup_packed, kernels.quant_matmul_pergroup_prepared)]
    assert set(targets(model.layers.get(0, prepared=True))) == {kernels.quant_matmul_pergroup_packed}
    gm = model.layers.get(0)
    first = next(n for n in gm.graph.nodes if n.target is torch.ops.qc.quant_matmul_pergroup.default)
    scale = layouts._fetch(gm, first.args[2].target)
    scale[1] = -scale[1].abs()
    x = model.head.embed(torch.randint(0, 250, (1, 9), generator=torch.Generator().manual_seed(4)))
    pe = model.head.rope(9)
    with torch.inference_mode():
        want = gm(x, position_embeddings=pe)
        prepared = layouts.prepare_layer(gm)
        got = targets(prepared)
        assert got[0] is kernels.quant_matmul_pergroup_prepared, got
        assert set(got[1:]) == {kernels.quant_matmul_pergroup_packed}, got
        assert torch.equal(prepared(x, position_embeddings=pe).view(torch.int16), want.view(torch.int16))


def test_prepare_leaves_graphs_on_another_device_alone():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 4).to("meta"))
    code = gm.code
    assert layouts.prepare_layer(gm) is gm and gm.code == code


@pytest.mark.parametrize("block", [None, 1000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dynamic_quant_fast_equals_reference(dtype, block, monkeypatch):
    """Whole, and in row blocks of 1 (block 1000 < 576 * 2: kernels.CACHE_BLOCK_ELEMENTS moved, and the size from
    which blocks are used), bit for bit."""
    if block:
        monkeypatch.setattr(kernels, "CACHE_BLOCK_ELEMENTS", block)
        monkeypatch.setattr(kernels, "CACHE_BLOCK_FROM_ELEMENTS", block)
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(7, 33, 576, generator=g) * torch.rand(7, 33, 1, generator=g) * 40).to(dtype)
    x[0, 0] = 0
    x[1, 2, :5] = torch.tensor([0.5, 1.5, -2.5, 127, -127], dtype=dtype)
    y, s = kernels.dynamic_quant(x)
    ry, rs = kernels.dynamic_quant_ref(x)
    assert torch.equal(y, ry) and torch.equal(s, rs)


def _assert_decode_steps_equal(plain, prepared, spec, head, x, layer: int) -> None:
    """A prefill of 11 tokens then a 1-token step through the op-graph decode step `plain` and the prepared one,
    each on its own KV cache (16 positions): every output bit-identical. x: hidden states [1, >= 12, hidden]."""
    ca, cb = spec.buffers(1, 16), spec.buffers(1, 16)
    for start, n in ((0, 11), (11, 1)):
        cos, sin = head.rope(n, start=start)
        a = plain(x[:, start:start + n], cos, sin, *ca, torch.tensor(start))
        b = prepared(x[:, start:start + n], cos, sin, *cb, torch.tensor(start))
        assert all(torch.equal(p, q) for p, q in zip(a, b)), (layer, start)
        for cache, outs in ((ca, a), (cb, b)):
            cache[0][:, :, start:start + n], cache[1][:, :, start:start + n] = outs[1], outs[2]


def _int8_activation_case(compiled, monkeypatch, limit: str, value: int):
    """(model_quant_type, loaded model, artifact tensors) of a W8A8 / W8A8_DYNAMIC case with the kernels' `limit`
    set to `value` before the load prepares its layouts; skips the other cases (no int8-activation per-channel
    Linear)."""
    quant = json.loads((compiled / "quant_model_description.json").read_text())["model_quant_type"]
    if quant not in ("W8A8", "W8A8_DYNAMIC"):
        pytest.skip("no int8-activation per-channel Linear in this case")
    monkeypatch.setattr(kernels, limit, value)
    return quant, load_model(compiled), _artifact(compiled)


@pytest.mark.parametrize("part_channels", [None, 32])
def test_decode_steps_merge_sibling_linears(compiled, monkeypatch, part_channels):
    """layouts.merge_siblings in the decode steps (executable.decode): q/k/v and gate/up of an int8-activation
    layer (per-channel or W4A8_DYNAMIC per-group) become one call each (o and down stay), their merged tensors equal the artifact's tensors
    concatenated along n (a corrupted merged weight is caught), and the steps compute the op graph's bits
    (`test_prepared_layer_and_decode_step_compute_the_same_bits` runs these same steps). The full-sequence
    layers keep one call per Linear. part_channels 32: q (64 channels) in 2 parts, k and v (32) in 1, so the
    siblings' layouts differ and must merge all the same."""
    if part_channels is not None:
        monkeypatch.setattr(kernels, "ROWWISE_PART_MIN_CHANNELS", part_channels)
    quant = json.loads((compiled / "quant_model_description.json").read_text())["model_quant_type"]
    if quant not in ("W8A8", "W8A8_DYNAMIC", "W4A8_DYNAMIC"):
        pytest.skip("no int8-activation Linear in this case")
    model = load_model(compiled)
    artifact = _artifact(compiled)
    merged = {kernels.quant_matmul_pertoken_merged, kernels.quant_matmul_merged, kernels.quant_matmul_pergroup_merged}
    single = {kernels.quant_matmul_pertoken_prepared, kernels.quant_matmul_prepared,
              kernels.quant_matmul_pergroup_prepared}
    calls = lambda g, fns: [n for n in g.graph.nodes if n.op == "call_function" and n.target in fns]
    for i in range(model.layers.num_layers):
        step, _ = model.layers.decode(i)
        assert [n.args[-1] for n in calls(step, merged)] == [(64, 32, 32), (128, 128)], i  # tiny: 64 / 2 kv heads
        assert len(calls(step, single)) == 2, i
        record = step.meta[layouts.PREPARED]
        assert sorted(len(e["from"]) for e in record.values() if e["kind"].startswith("rowwise_codes")) == [1, 1, 2, 3]
        assert set(record) == {name for name, _ in step.named_buffers() if name.startswith("prepared_")}
        assert mismatches(step, artifact, i, model.head.dtype) == []
        full = model.layers.get(i, prepared=True)
        assert not calls(full, merged) and len(calls(full, single | {kernels.quant_matmul_pergroup_packed})) == 7
    name = next(n for n, e in record.items() if len(e["from"]) == 3 and e["kind"].startswith("rowwise_codes"))
    getattr(step, name)[-1, 0] ^= 1  # one code of q (channel 0, last input column) in the q/k/v weight
    assert mismatches(step, artifact, model.layers.num_layers - 1, model.head.dtype) == [
        f"{name} ({record[name]['kind']} from {record[name]['from']})"]


def test_decode_steps_lay_out_each_weight_once(compiled, monkeypatch):
    """A decode step lays out each prepared row-wise weight once: the merged q/k/v and gate/up weights are
    concatenated as int8 and laid out after the merge (layouts `_Preparer.lay_out_rowwise`), not laid out per
    sibling and again merged (stop 28's merge did that: 1.4x the build time of the decode steps at startup)."""
    quant = json.loads((compiled / "quant_model_description.json").read_text())["model_quant_type"]
    if quant not in ("W8A8", "W8A8_DYNAMIC", "W4A8_DYNAMIC"):
        pytest.skip("no int8-activation Linear in this case")
    kernels._rowwise_kernel_is_exact()  # its once-per-process check lays out a weight of its own
    made = []
    real = kernels.rowwise_codes
    monkeypatch.setattr(kernels, "rowwise_codes", lambda w, parts=1: made.append(tuple(w.shape)) or real(w, parts))
    model = load_model(compiled)
    step, _ = model.layers.decode(0)
    laid = [e for e in step.meta[layouts.PREPARED].values() if e["kind"].startswith("rowwise_codes")]
    assert len(laid) == 4 and len(made) == 4, made  # q/k/v, o, gate/up, down


@pytest.mark.parametrize("scale_elsewhere", [False, True])
def test_dynamic_quant_scale_as_a_column_only_for_prepared_matmuls(scale_elsewhere):
    """`_codes_as_float` asks `dynamic_quant_codes` for its scale as [..., 1] (`column=True`) only when every
    reader of the scale is a prepared matmul's per-token scale; another reader keeps the [...] scale it expects.
    The graph computes the same bits either way."""
    import operator
    g = torch.Generator().manual_seed(3)
    gm = torch.nn.Module()
    w = torch.randint(-128, 128, (64, 32), generator=g, dtype=torch.int8)
    gm.register_buffer("w", kernels.rowwise_codes(w, 2))
    gm.register_buffer("ws", torch.rand(64, generator=g) / 100)
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    dq = graph.call_function(kernels.dynamic_quant, (x,))
    codes, scale = (graph.call_function(operator.getitem, (dq, i)) for i in (0, 1))
    y = graph.call_function(kernels.quant_matmul_pertoken_prepared,
                            (codes, graph.get_attr("w"), graph.get_attr("ws"), scale, None, torch.bfloat16))
    graph.output((y, graph.call_function(torch.mul, (scale, 2.0))) if scale_elsewhere else y)
    gm = torch.fx.GraphModule(gm, graph)
    xs = (torch.randn(1, 1, 32, generator=g) * 4).bfloat16()
    want = gm(xs)
    layouts._codes_as_float(gm)
    gm.recompile()
    assert dq.target is kernels.dynamic_quant_codes and dq.args == ((x,) if scale_elsewhere else (x, True))
    got = gm(xs)
    for a, b in zip(got if scale_elsewhere else [got], want if scale_elsewhere else [want]):
        assert a.shape == b.shape and torch.equal(a.view(torch.int16 if a.dtype == torch.bfloat16 else a.dtype),
                                                  b.view(torch.int16 if b.dtype == torch.bfloat16 else b.dtype))


def test_short_runs_keep_the_int8_weights(compiled, monkeypatch):
    """prepare_layer(rows=...) packs weights for oneDNN only from onednn_linear.PACK_FROM_ROWS token rows (packing
    costs what about a thousand rows' faster products save: a short eval keeps `_int_mm` on the int8 weights), and
    `qcompile eval` says how many rows each layer will run; both forms compute the op graph's bits."""
    from qcompiler import evaluate
    quant = json.loads((compiled / "quant_model_description.json").read_text())["model_quant_type"]
    if quant != "W8A8_DYNAMIC":
        pytest.skip("W8A8_DYNAMIC shows it")
    if not onednn_linear._is_exact():
        pytest.skip("no exact oneDNN int8 linear on this CPU")
    monkeypatch.setattr(onednn_linear, "_DECIDED", [True])
    monkeypatch.setattr(qn, "_INT8_NATIVE", [True])
    model = load_model(compiled)
    kinds = lambda gm: {e["kind"].split(":")[0] for e in gm.meta[layouts.PREPARED].values()}
    limit = onednn_linear.PACK_FROM_ROWS
    packed, at_limit = model.layers.get(0, prepared=True), model.layers.get(0, prepared=True, rows=limit)
    short = model.layers.get(0, prepared=True, rows=limit - 1)
    assert "onednn_packed" in kinds(packed) and "onednn_packed" in kinds(at_limit)
    assert "onednn_packed" not in kinds(short) and "int8_weight" in kinds(short), kinds(short)
    x = model.head.embed(torch.randint(0, 250, (2, 7), generator=torch.Generator().manual_seed(8)))
    pe = model.head.rope(7)
    with torch.inference_mode():
        want = model.layers.get(0)(x, position_embeddings=pe)
        for gm in (packed, short):
            assert torch.equal(gm(x, position_embeddings=pe).view(torch.int16), want.view(torch.int16))
    seen = []
    real = layouts.prepare_layer
    monkeypatch.setattr(layouts, "prepare_layer", lambda gm, merge=False, rows=None: seen.append(rows) or real(
        gm, merge, rows))
    windows = torch.randint(0, 250, (3, 16), generator=torch.Generator().manual_seed(9))
    evaluate.perplexity(model, windows)
    assert seen == [windows.numel()] * model.layers.num_layers, seen
