"""Pass-manager contract: whole-pipeline validation before work, verifier, error wrapping, instruments."""
import dataclasses

import pytest
import torch

from qcompiler.errors import PassError, QCError
from qcompiler.ir.capture import HFSkeleton
from qcompiler.loading import open_checkpoint
from qcompiler.passes import TAIL, LayerContext, PassManager, PassResult, make_pass
from qcompiler.passes.base import Pass
from qcompiler.passes.instruments import DumpInstrument, TimingInstrument
from qcompiler.passes.registry import register


def pipeline(*names):
    return PassManager([make_pass(n) for n in names])


def test_valid_pipeline():
    props = pipeline("w8a8", *TAIL).validate()
    assert {"captured", "annotated", "observed", "calibrated", "lowered"} <= props


def test_lower_before_scheme_is_rejected_naming_both():
    with pytest.raises(QCError, match=r"pass lower requires \['annotated', 'calibrated'\] from a pass before it; put one of .*w8a8"):
        pipeline("lower", "w8a8").validate()


def test_missing_scheme_is_rejected():
    with pytest.raises(QCError, match=r"pass observe requires \['annotated'\]"):
        pipeline(*TAIL).validate()


def test_scheme_after_lowering_is_rejected():
    pm = PassManager([make_pass("w8a8"), make_pass("observe"), make_pass("calibrate"), make_pass("lower"),
                      make_pass("w8a8")])
    with pytest.raises(QCError, match=r"pass w8a8 must run before lower"):
        pm.validate()


def test_duplicate_pass_is_rejected():
    pm = PassManager([make_pass("w8a8"), make_pass("w8a8")] + [make_pass(n) for n in TAIL])
    with pytest.raises(QCError, match="appears twice"):
        pm.validate()


def test_unknown_pass_and_option():
    with pytest.raises(QCError, match=r"unknown pass 'nope'; available: .*w8a8"):
        make_pass("nope")
    with pytest.raises(QCError, match=r"pass w8a8: unknown option 'alpha'"):
        make_pass("w8a8", {"alpha": "0.5"})


def test_registry_rejects_duplicate_names():
    with pytest.raises(TypeError, match="registered twice"):
        @register
        class Again(Pass):
            name = "w8a8"


@dataclasses.dataclass(frozen=True)
class _Opts:
    ratio: float = 0.5
    on: bool = False
    n: int = 3


class _Typed(Pass):
    name = "typed-options-test"
    Options = _Opts


def test_option_conversion(monkeypatch):
    from qcompiler.passes import registry
    monkeypatch.setitem(registry.REGISTRY, _Typed.name, _Typed)
    p = make_pass(_Typed.name, {"ratio": "0.25", "on": "true", "n": "7"})
    assert p.options == _Opts(0.25, True, 7)
    with pytest.raises(QCError, match=r"option n='x' is not a valid int"):
        make_pass(_Typed.name, {"n": "x"})


@pytest.fixture
def layer(tiny_models):
    ckpt = open_checkpoint(tiny_models["llama"])
    skel = HFSkeleton(ckpt)
    inputs = skel.layer0_inputs(torch.randint(0, 200, (2, 8), generator=torch.Generator().manual_seed(0)))
    return skel.capture_layer(0, inputs), LayerContext(index=0, inputs=inputs, dtype=ckpt.dtype)


class _Boom(Pass):
    name = "boom"

    def run(self, gm, ctx):
        raise RuntimeError("kaboom")


class _Corrupt(Pass):
    name = "corrupt"

    def run(self, gm, ctx):
        node = next(n for n in gm.graph.nodes if n.op == "get_attr")
        node.target = "no.such.tensor"
        return PassResult(gm, modified=True)


def test_failure_names_pass_layer_and_history(layer):
    gm, ctx = layer
    pm = PassManager([make_pass("w8a8"), _Boom()])
    with pytest.raises(PassError, match=r"pass boom failed on layer 0: RuntimeError: kaboom \(passes run before it: w8a8\)"):
        pm.run(gm, ctx)


def test_verifier_runs_after_modifying_pass(layer):
    gm, ctx = layer
    with pytest.raises(PassError, match=r"pass corrupt failed on layer 0: GraphInvalid: .*no\.such\.tensor"):
        PassManager([_Corrupt()]).run(gm, ctx)


def test_instruments_time_and_dump(layer, tmp_path):
    gm, ctx = layer
    timing = TimingInstrument()
    pm = PassManager([make_pass(n) for n in ("w8a8", *TAIL)], instruments=[timing, DumpInstrument(tmp_path)])
    pm.validate()
    pm.run(gm, ctx)
    assert set(timing.seconds) == {"w8a8", "observe", "calibrate", "lower"}
    files = sorted(p.name for p in (tmp_path / "layer000").iterdir())
    # calibrate does not modify the graph: no file for it
    assert files == ["000_capture.txt", "001_w8a8.txt", "002_observe.txt", "004_lower.txt"]
    lowered = (tmp_path / "layer000" / "004_lower.txt").read_text()
    assert "qc.quant_matmul" in lowered and "aten.linear" not in lowered


def test_smooth_after_weight_rounding_is_rejected():
    for first in ("gptq", "awq"):
        pm = PassManager([make_pass(first), make_pass("smooth"), make_pass("w8a8")] + [make_pass(n) for n in TAIL])
        with pytest.raises(QCError, match=rf"pass smooth must run before {first}"):
            pm.validate()


def test_execution_order_is_decide_then_transform():
    """Validation reads --passes as written (smooth before w8a8, msModelSlim's order); run() executes the scheme
    passes first (their own order kept: the first claim wins), then the float transforms, then the rest."""
    names = ("smooth", "gptq", "w8a16", "w8a8", "kv8", *TAIL)
    pm = PassManager([make_pass(n, {"match": "down_proj"} if n == "w8a16" else None) for n in names])
    pm.validate()
    assert pm.names == list(names)
    assert [p.name for p in pm.execution_order()] == ["w8a16", "w8a8", "smooth", "gptq", "kv8", *TAIL]


def test_transforms_read_the_spec_and_records_keep_pipeline_order(layer):
    """smooth reads each Linear's spec from its node (annotated before it ran): down_proj's group follows
    w8a16, the others w8a8d; the report's per-layer records list the passes in pipeline order."""
    from qcompiler.passes.instruments import StatsInstrument
    gm, ctx = layer
    passes = [make_pass("smooth", {"alpha": "0.5"}), make_pass("w8a16", {"match": "down_proj"}),
              make_pass("w8a8d")] + [make_pass(n) for n in TAIL]
    PassManager(passes, instruments=[StatsInstrument()]).run(gm, ctx)
    assert ctx.records["smooth"]["schemes"] == {"input_layernorm": "W8A8_DYNAMIC", "self_attn.v_proj": "W8A8_DYNAMIC",
                                                "post_attention_layernorm": "W8A8_DYNAMIC", "mlp.up_proj": "W8A16"}
    assert list(ctx.records)[:3] == ["smooth", "w8a16", "w8a8d"]


class _Misspelt(Pass):
    name = "misspelt-property-test"
    requires = frozenset({"anotated"})


def test_unknown_property_is_rejected():
    """Properties are the names of passes/properties.py: a typo is an error, not a requirement nobody produces."""
    with pytest.raises(QCError, match=r"pass misspelt-property-test declares unknown IR properties \['anotated'\]"):
        PassManager([make_pass("w8a8"), _Misspelt()]).validate()


def test_properties_are_facts_not_pass_names():
    from qcompiler.passes.properties import KNOWN
    from qcompiler.passes.registry import REGISTRY
    for cls in REGISTRY.values():
        assert cls.requires | cls.produces | cls.forbids <= KNOWN, cls.name
    assert not KNOWN & set(REGISTRY)   # no property is named after a pass
