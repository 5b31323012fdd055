"""ir/model_dtype.py: the target-neutral weight quantizer and model-dtype rounding (moved out of the Ascend encoder)."""
import pytest
import torch

from qcompiler.backends.ascend import encode as E
from qcompiler.errors import QCError
from qcompiler.ir import model_dtype as md


def test_quantize_weight_any_width_against_the_held_scale():
    """6-bit codes lie in [-31, 31] (qmax 2**5 - 1) and are computed against the scale rounded to the model
    dtype; exact equality: the formula is written out here."""
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    q, s = md.quantize_weight(w, 6, 16, model_dtype=torch.bfloat16)
    raw = w.reshape(8, 4, 16).abs().amax(-1) / 31
    assert torch.equal(s, raw.to(torch.bfloat16).float())
    expect = torch.round(w.reshape(8, 4, 16) / s.unsqueeze(-1)).clamp(-31, 31).to(torch.int8).reshape(8, 64)
    assert torch.equal(q, expect) and int(q.abs().max()) == 31


def test_the_ascend_encoder_keeps_its_widths():
    """The artifact stores int8 / int4 codes only: the encoder's quantize_weight refuses 6 bits, and for 8 and 4
    bits it returns exactly the neutral quantizer's codes and scales."""
    w = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="8 or 4"):
        E.quantize_weight(w, 6)
    for bits, group in ((8, 0), (4, 16)):
        a, b = E.quantize_weight(w, bits, group, model_dtype="float16"), md.quantize_weight(w, bits, group,
                                                                                            model_dtype="float16")
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_model_dtype_is_float16_or_bfloat16():
    assert md.as_model_dtype("torch.bfloat16") is torch.bfloat16 and md.model_dtype_name(torch.float16) == "float16"
    with pytest.raises(QCError, match="float32"):
        md.as_model_dtype(torch.float32)
