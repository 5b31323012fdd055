"""bench/run_memory.py's bound: the issue's head + 2 layers + calibration, plus GPTQ's Hessian work."""
from tests.helpers import bench_module

rm = bench_module("run_memory")


def _row(preset: str, passes: str) -> dict:
    spec = rm.sc.resolve(preset)
    return {"settings": {"preset": preset, "passes": passes, "calib_samples": 16, "seq_len": 512},
            **rm.sizes(spec)}


def test_bound_adds_the_widest_hessian_and_its_float64_factor_for_gptq_and_sparse_only():
    # Qwen2.5-7B: the widest Linear input is down_proj's 18944; H float32 + the float64 k x k factor buffer.
    hessian = 3 * 4 * 18944**2
    plain = rm.bound_bytes(_row("qwen2.5-7b-layers2", "w8a16"))
    assert rm.bound_bytes(_row("qwen2.5-7b-layers2", "smooth,w8a8")) == plain
    assert rm.bound_bytes(_row("qwen2.5-7b-layers2", "gptq,w4a16")) == plain + hessian
    assert rm.bound_bytes(_row("qwen2.5-7b-layers2", "sparse,w8a8s")) == plain + hessian
    assert rm.bound_bytes(_row("qwen2.5-7b-layers2", "awq,gptq:act_order=true,w4a16")) == plain + hessian
    # the bound itself: bf16 head + 2 layers + 16 x 512 hidden states in and out (3.01 GiB at 7B)
    assert round(plain / 2**30, 2) == 3.01


def test_hessian_work_reads_the_head_width_where_it_is_the_widest_input():
    # o_proj's input is heads x head_dim, wider than hidden when head_dim is set larger (Qwen3 style)
    cfg = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "head_dim": 32}
    assert rm.hessian_work_bytes(cfg) == 3 * 4 * 128**2
    assert rm.hessian_work_bytes(dict(cfg, head_dim=16)) == 3 * 4 * 96**2
