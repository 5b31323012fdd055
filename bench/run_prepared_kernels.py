#!/usr/bin/env python3
"""Per-Linear cost of the qc ops as the graph called them before (per-call dequantize / unpack / scale
decoding, custom-op dispatch) against their prepared form (backends/ascend/layouts.py), SmolLM2's largest
Linear shape ([M, 576] x [1536, 576]), random tensors, one thread, median process CPU time (robust on a shared
machine); each pair is checked bit-identical first. No model, no lock needed.

    python3 bench/run_prepared_kernels.py      -> bench/results/prepared_kernels.md
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch, time, statistics
torch.set_num_threads(1)
from qcompiler.backends.ascend import kernels as K, ops  # noqa
from qcompiler.backends.ascend.int4 import pack_int4
g = torch.Generator().manual_seed(0)
def t(f, n):
    f(); f(); xs=[]
    for _ in range(n):
        c=time.process_time(); f(); xs.append(time.process_time()-c)
    return statistics.median(xs)*1e3
n, k, G = 1536, 576, 64
w8 = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
w4 = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
sc = torch.rand(n, k // G, generator=g) * 1e-2; off = torch.zeros(n, k // G)
sc1 = torch.rand(n, 1, generator=g) * 1e-2; off1 = torch.zeros(n, 1)
rows = []
out = []
for M, reps in ((1, 200), (512, 10)):
    x = torch.randn(M, k, generator=g).to(torch.bfloat16)
    for name, w, s, o, gs, p in (("w8a16 per-channel", w8, sc1, off1, 0, 0), ("w4a16 group 64", pack_int4(w4, 0), sc, off, G, 2)):
        op = lambda: torch.ops.qc.weight_quant_matmul(x, w, s, o, None, gs, p)
        W = K.dequantize_weight(w, s, o, gs, p, k, torch.bfloat16)
        prep = lambda: K.weight_quant_matmul_prepared(x, W, None)
        assert torch.equal(op(), prep())
        a, b = t(op, reps), t(prep, reps)
        rows.append((name, M, a, b))
    xq = torch.randint(-128, 128, (M, k), dtype=torch.int8, generator=g); ps = torch.rand(M, generator=g)
    ws = torch.rand(n, 1, generator=g) * 1e-2
    op = lambda: torch.ops.qc.quant_matmul_pertoken(xq, w8, ws, ps, None, 0, torch.bfloat16)
    wsf, _ = K.pertoken_operands(ws, None, torch.bfloat16)
    prep = lambda: K.quant_matmul_pertoken_prepared(xq, w8, wsf, ps, None, torch.bfloat16)
    assert torch.equal(op(), prep())
    rows.append(("w8a8d matmul+epilogue", M, t(op, reps), t(prep, reps)))
    op = lambda: torch.ops.qc.dynamic_quant(x); prep = lambda: K.dynamic_quant(x); ref = lambda: K.dynamic_quant_ref(x)
    rows.append(("dynamic_quant (ref vs fast)", M, t(ref, reps), t(prep, reps)))
    xb = x
    rows.append(("bf16 x @ W.T (float model, for scale)", M, t(lambda: xb @ W.T, reps), None))
out.append("| kernel, [M, 576] x [1536, 576] | M | op per call (ms CPU) | prepared (ms CPU) | speed-up |")
out.append("|---|---|---|---|---|")
for name, M, a, b in rows:
    out.append(f"| {name} | {M} | {a:.3f} | " + ("- | - |" if b is None else f"{b:.3f} | {a / b:.1f}x |"))
text = "\n".join(out) + "\n"
res = Path(__file__).resolve().parent / "results"
res.mkdir(exist_ok=True)
(res / "prepared_kernels.md").write_text(text)
print(text)
