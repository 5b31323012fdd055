"""ir/qc_ops.py: the `qc` op vocabulary stands without a backend; a backend brings the kernels and `lower`.

Checked in a fresh interpreter (tests/conftest.py imports the Ascend backend for every test in this process).
"""
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    import qcompiler.passes as P
    from qcompiler.ir import qc_ops
    import sys
    assert "qcompiler.backends.ascend" not in sys.modules and "lower" not in P.REGISTRY
    x = torch.randn(2, 3, 8)
    with FakeTensorMode() as mode:                       # fake kernels need no backend
        y, s = torch.ops.qc.dynamic_quant(mode.from_tensor(x))
        assert y.dtype == torch.int8 and tuple(s.shape) == (2, 3)
    try:
        torch.ops.qc.dynamic_quant(x)
    except RuntimeError as e:
        assert "qcompiler.backends.ascend" in str(e), e
    else:
        raise AssertionError("ran without a kernel")
    import qcompiler.backends.ascend                     # the backend registers kernels and its lowering pass
    y, s = torch.ops.qc.dynamic_quant(x)
    assert y.dtype == torch.int8 and "lower" in P.REGISTRY and P.REGISTRY["lower"].internal
    print("ok")
""")


def test_vocabulary_without_backend_then_kernels_from_the_backend():
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
