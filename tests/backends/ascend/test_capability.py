"""A spec of any width 2..8 can be written (ir/qspec.py); the Ascend backend says before any work whether it
lowers it exactly (backends/ascend/capability.py): a spec it cannot lower (6-bit weights in W8A8_DYNAMIC, whose
int8 weight the per-token kernel reads as 8-bit codes with their own scale) is an exit-2 error naming the pass,
never codes silently written at 8 bits. W8A16 stores any width 2..8 in its int8 weight
(tests/examples/test_w6a16.py)."""
import pytest

from qcompiler.backends.ascend.capability import HONOURED, unhonoured
from qcompiler.ir.qspec import LinearQuantSpec, PerChannel, TensorQuant
from qcompiler.passes import REGISTRY, make_pass
from qcompiler.passes.scheme import SchemePass, weight_quant
from qcompiler.passes.w8a8d import W8A8Dynamic
from tests.helpers import expect_error


def test_every_registered_scheme_is_honoured():
    schemes = [n for n, cls in REGISTRY.items() if isinstance(cls, type) and issubclass(cls, SchemePass)]
    assert {"w8a8", "w8a8d", "w8a8mix", "w8a16", "w4a16", "w4a8d", "w8a8s"} <= set(schemes)
    for name in schemes:
        p = make_pass(name)
        assert unhonoured(p.observed_spec(0)) is None, name
    assert unhonoured(make_pass("w8a8s", {"bits": "8"}).observed_spec(0)) is None
    assert set(HONOURED) >= {make_pass(n).quant_type for n in schemes}


def test_spec_widths_2_to_8_and_the_reasons():
    for bits in range(2, 9):
        TensorQuant(bits, symmetric=True, granularity=PerChannel())
    for bits in (1, 9):
        with pytest.raises(ValueError, match="bits must be an integer in 2..8"):
            TensorQuant(bits, symmetric=True, granularity=PerChannel())
    for bits in range(2, 9):  # W8A16's int8 weight holds any narrower symmetric code exactly
        assert unhonoured(LinearQuantSpec("W8A16", weight_quant(bits), None, "x")) is None
    six = LinearQuantSpec("W8A8_DYNAMIC", weight_quant(6), TensorQuant(8, True, PerChannel()), "w6a8")
    assert unhonoured(six) == ("W8A8_DYNAMIC stores 8-bit weight codes on Ascend, not 6-bit (they would be written "
                               "as 8-bit codes)")
    assert "not 6-bit" in unhonoured(LinearQuantSpec("W4A16", weight_quant(6), None, "x"))
    a4 = LinearQuantSpec("W8A8_DYNAMIC", weight_quant(8), TensorQuant(4, True, PerChannel()), "x")
    assert "int8" in unhonoured(a4) and "int4" in unhonoured(a4)
    assert "no W2A2 kernel" in unhonoured(LinearQuantSpec("W2A2", weight_quant(2), None, "x"))


class W6A8D(W8A8Dynamic):
    """6-bit weights under the per-token W8A8_DYNAMIC kernel: not something the Ascend lowering writes."""
    name = "w6a8d"

    def spec(self, group_size=0):
        base = super().spec(group_size)
        return LinearQuantSpec(quant_type=base.quant_type, weight=weight_quant(6, group_size),
                               activation=base.activation, pass_name=self.name)


def test_unhonoured_spec_is_refused_before_any_work(capsys, tmp_path, tiny_models, calib_file, monkeypatch):
    import qcompiler.driver as driver
    monkeypatch.setitem(REGISTRY, "w6a8d", W6A8D)
    monkeypatch.setattr(driver, "_compile_into", lambda *a, **k: pytest.fail("work started"))
    line = expect_error(capsys, [tiny_models["llama"], "--passes", "w6a8d", "--calib", calib_file,
                                 "-o", tmp_path / "out"],
                        "pass w6a8d asks for W8A8_DYNAMIC: weight int6 sym PerChannel", "not 6-bit")
    assert "\n" not in line and not (tmp_path / "out").exists()
