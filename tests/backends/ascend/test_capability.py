"""A spec of any width 2..8 can be written (ir/qspec.py); the Ascend backend says before any work whether it
lowers it exactly (backends/ascend/capability.py): a 6-bit weight-only scheme is an exit-2 error naming the
pass, never codes silently written at 8 bits."""
import pytest

from qcompiler.backends.ascend.capability import HONOURED, unhonoured
from qcompiler.ir.qspec import LinearQuantSpec, PerChannel, TensorQuant
from qcompiler.passes import REGISTRY, make_pass
from qcompiler.passes.scheme import SchemePass, weight_quant
from qcompiler.passes.w8a16 import W8A16
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
    six = LinearQuantSpec("W8A16", weight_quant(6), None, "w6a16")
    assert unhonoured(six) == "W8A16 stores 8-bit weight codes on Ascend, not 6-bit (they would be written as 8-bit codes)"
    a4 = LinearQuantSpec("W8A8_DYNAMIC", weight_quant(8), TensorQuant(4, True, PerChannel()), "x")
    assert "int8" in unhonoured(a4) and "int4" in unhonoured(a4)
    assert "no W2A2 kernel" in unhonoured(LinearQuantSpec("W2A2", weight_quant(2), None, "x"))


class W6A16(W8A16):
    """A researcher's 6-bit weight-only scheme: one file, one registry line (not lowerable on Ascend yet)."""
    name = "w6a16"

    def spec(self, group_size=0):
        return LinearQuantSpec(quant_type="W8A16", weight=weight_quant(6, group_size), activation=None,
                               pass_name=self.name)


def test_unhonoured_spec_is_refused_before_any_work(capsys, tmp_path, tiny_models, calib_file, monkeypatch):
    import qcompiler.driver as driver
    monkeypatch.setitem(REGISTRY, "w6a16", W6A16)
    monkeypatch.setattr(driver, "_compile_into", lambda *a, **k: pytest.fail("work started"))
    line = expect_error(capsys, [tiny_models["llama"], "--passes", "w6a16", "--calib", calib_file,
                                 "-o", tmp_path / "out"],
                        "pass w6a16 asks for W8A16: weight int6 sym PerChannel", "not 6-bit")
    assert "\n" not in line and not (tmp_path / "out").exists()
