"""Probe: GPTQ's inverse-Hessian factor, the route before vs the reversed-Cholesky route (issue 15, parts 1/4).

Both give the upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 (float32), one thread, float64 work:
  old: L = chol(H); H^-1 = cholesky_inverse(L) (LAPACK potri); U = chol(H^-1, upper)      ~5/3 k^3 flops
  new: L = chol(J H J); U = J L^-1 J (blocked in-place triangular inverse, GEMM)           ~2/3 k^3 flops
(J: reversal; qcompiler/passes/gptq.py `_inverse_cholesky`, `_tril_inverse_`). The old route is copied here
verbatim from the code before the change so that the probe can run both in one process.

Per k (a child process per k, under one acquisition of the heavy lock each): process CPU seconds and wall
seconds of each route, the peak RSS above the process's RSS before the call (VmHWM reset through
/proc/self/clear_refs) in units of H (k^2 float32), max |U_new - U_old| / max |U_old|, the number of float32
entries that differ (and the largest difference in ulps), and max |U^T U H_d - I| of each (over 256 random
columns; U is float32, so ~1e-6 is the floor). H = X^T X / N from correlated random X (k/8 latent factors plus
noise, 1% of the channels x20), N = k. Then a w4a16 GPTQ problem (n x k weight, group 128, the same kind of H
from N = 16 x 512 tokens): codes that differ between the routes, and the output error tr(dW H dW^T) of each
(and RTN's), for a few weight seeds.

    python3 bench/probe_gptq_inverse.py                     # k = 2048 4096 8192, GPTQ n=512 k=4096
    python3 bench/probe_gptq_inverse.py --ks 1024 --gptq-k 1024 --seeds 1     # quick
    python3 bench/probe_gptq_inverse.py --ks --gptq-n 256 --gptq-k 8192 --gptq-tokens 4096 --seeds 2  # N < k

The CPU seconds are extrapolated to k = 18944 (a Qwen2.5-7B down_proj) as t(k) * (18944 / k)^3 from the
largest k measured. Prints one JSON object per line; nothing is written to BENCHMARKS.md (a probe, not a bench).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from common import HeavyLock  # noqa: E402

K_7B_DOWN = 18944


def old_inverse_cholesky(h, damp, *, overwrite=False):
    """qcompiler/passes/gptq.py `_inverse_cholesky` before the change (main 5963e75), verbatim."""
    import torch
    k = h.shape[0]
    diag = torch.arange(k)
    a = torch.empty(k, k, dtype=torch.float64).mT  # column-major [k, k]
    info = torch.empty((), dtype=torch.int32)
    mean = None
    for attempt in range(5):
        a.copy_(h)
        if mean is None:
            mean = a.diagonal().mean().item()
        a[diag, diag] += damp * (10 ** attempt) * mean
        torch.linalg.cholesky_ex(a, out=(a, info))
        if info.item() == 0:
            torch.cholesky_inverse(a, out=a)
            torch.linalg.cholesky_ex(a, upper=True, out=(a, info))
            if info.item() == 0:
                out = h if overwrite else torch.empty(k, k)
                return out.copy_(a)
    raise ValueError("Hessian is not positive definite even with dampening x10^4")


def old_route_buffer(h, damp, order=None, *, dead_to_one=False):
    """The old route's U in the float64 buffer layout GPTQ reads (`_inverse_factor_buffer`: U[i, j] =
    buf[k-1-j, k-1-i]), so that gptq_quantize runs on the old route's float32 U (narrowing is exact here)."""
    import torch
    hp = (h[order][:, order] if order is not None else h).clone()
    if dead_to_one:
        hp.diagonal().masked_fill_(hp.diagonal() == 0, 1.0)
    return old_inverse_cholesky(hp, damp).double().flip(0, 1).T.contiguous()


def _status(key):
    return int(re.search(key + r":\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def hessian(k, tokens, seed):
    """H = X^T X / N, X [tokens, k]: channels mixed from k/8 latent factors plus noise, 1% of channels x20."""
    import torch
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, k // 8, generator=g)
    x = z @ torch.randn(k // 8, k, generator=g) / (k // 8) ** 0.5 + 0.3 * torch.randn(tokens, k, generator=g)
    big = torch.randperm(k, generator=g)[:max(1, k // 100)]
    x[:, big] *= 20
    return (x.T @ x) / tokens


def measure(route, h, damp):
    import torch
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status("VmRSS")
    c0, w0 = time.process_time(), time.perf_counter()
    u = route(h, damp)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    peak = (_status("VmHWM") - before) / (h.shape[0] ** 2 * 4)
    return u, {"cpu_s": round(cpu, 2), "wall_s": round(wall, 2), "peak_xH": round(peak, 2)}


def child_inverse(k, damp):
    import torch
    from qcompiler.passes.gptq import _inverse_cholesky
    torch.set_num_threads(1)
    h = hessian(k, k, seed=k)
    old_inverse_cholesky(h[:64, :64].clone(), damp)  # warm up
    _inverse_cholesky(h[:64, :64].clone(), damp)
    u_old, r_old = measure(old_inverse_cholesky, h, damp)
    u_new, r_new = measure(_inverse_cholesky, h, damp)
    hd = h.double()
    hd.diagonal().add_(damp * hd.diagonal().mean())
    cols = torch.randperm(k, generator=torch.Generator().manual_seed(0))[:256]  # the residual on 256 columns
    eye = torch.eye(k, dtype=torch.float64)[:, cols]

    def resid(u):
        u = u.double()
        return float((u.T @ (u @ hd[:, cols]) - eye).abs().max())

    diff = (u_new != u_old)
    return {"k": k, "old": r_old, "new": r_new,
            "cpu_ratio_old_over_new": round(r_old["cpu_s"] / r_new["cpu_s"], 2),
            "max_rel_diff": float((u_new.double() - u_old.double()).abs().max() / u_old.double().abs().max()),
            "entries_differ": int(diff.sum()), "entries_upper": k * (k + 1) // 2,
            "max_ulps": int((u_new.view(torch.int32) - u_old.view(torch.int32)).abs().max()),
            "new_upper": bool(torch.equal(u_new, u_new.triu())),
            "resid_UtUH_old": resid(u_old), "resid_UtUH_new": resid(u_new)}


def child_gptq(n, k, seeds, damp, tokens=16 * 512):
    import torch
    import qcompiler.passes.gptq as gq
    from qcompiler.backends.ascend.encode import quantize_weight
    from qcompiler.passes.weight_targets import column_scale
    torch.set_num_threads(1)
    h = hessian(k, tokens, seed=7)
    new_route = gq._inverse_factor_buffer  # GPTQ reads its factor through this buffer (narrowed in place)
    rows = []
    for seed in range(seeds):
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(100 + seed)) * 0.02
        q_rtn, scale = quantize_weight(w, 4, 128)
        s = column_scale(scale.float(), k)
        res = {}
        for name, route in (("old", old_route_buffer), ("new", new_route)):
            gq._inverse_factor_buffer = route
            c0 = time.process_time()
            res[name] = gq.gptq_quantize(w, h, scale, 4, damp=damp)
            res[name + "_cpu_s"] = round(time.process_time() - c0, 2)
        gq._inverse_factor_buffer = new_route
        e = {name: gq.output_error(w, res[name].float() * s, h) for name in ("old", "new")}
        e_rtn = gq.output_error(w, q_rtn.float() * s, h)
        rows.append({"n": n, "k": k, "tokens": tokens, "seed": seed, "codes_differ": int((res["old"] != res["new"]).sum()),
                     "codes": n * k, "rows_differ": int((res["old"] != res["new"]).any(1).sum()),
                     "err_old": e["old"], "err_new": e["new"], "err_rtn": e_rtn,
                     "err_new_over_old": e["new"] / e["old"], "cpu_s_old": res["old_cpu_s"],
                     "cpu_s_new": res["new_cpu_s"]})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ks", type=int, nargs="*", default=[2048, 4096, 8192])
    ap.add_argument("--gptq-n", type=int, default=512)
    ap.add_argument("--gptq-k", type=int, default=4096)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--gptq-tokens", type=int, default=16 * 512, help="N of the GPTQ problem's H (N < k: singular)")
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        if a.child[0] == "inverse":
            print(json.dumps(child_inverse(int(a.child[1]), a.damp)))
        else:
            for row in child_gptq(int(a.child[1]), int(a.child[2]), int(a.child[3]), a.damp, int(a.child[4])):
                print(json.dumps(row))
        return
    env = {**os.environ, "QC_HEAVY_LOCK_HELD": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    last = None
    jobs = [["inverse", str(k)] for k in a.ks]
    if a.seeds:
        jobs.append(["gptq", str(a.gptq_n), str(a.gptq_k), str(a.seeds), str(a.gptq_tokens)])
    for job in jobs:
        with HeavyLock(f"probe_gptq_inverse {' '.join(job)}"):
            out = subprocess.run([sys.executable, __file__, "--damp", str(a.damp), "--child", *job], env=env,
                                 cwd=ROOT, capture_output=True, text=True, check=True).stdout
        for line in out.strip().splitlines():
            print(line, flush=True)
            row = json.loads(line)
            if "old" in row and isinstance(row["old"], dict):
                last = row
    if last:
        f = (K_7B_DOWN / last["k"]) ** 3
        print(json.dumps({"extrapolated_k": K_7B_DOWN, "from_k": last["k"], "factor_k3": round(f, 2),
                          "old_cpu_s": round(last["old"]["cpu_s"] * f), "new_cpu_s": round(last["new"]["cpu_s"] * f)}))


if __name__ == "__main__":
    main()
