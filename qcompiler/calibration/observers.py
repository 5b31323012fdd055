"""Observer modules: graph nodes (`call_module`) that record activation statistics and return x unchanged.

Inserted by the `observe` pass on the input edge of quantized Linears, fed by the `calibrate` pass,
read and removed by lowering. Statistics are kept in float32.
"""
import torch


class MinMaxObserver(torch.nn.Module):
    """Running min and max of every value seen (per-tensor)."""

    def __init__(self):
        super().__init__()
        self.min = float("inf")
        self.max = float("-inf")
        self.count = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # min and max in x's own dtype, then to float32: they are picks, and rounding to float32 is monotone, so
        # this equals the extrema of x.float() without its float32 copy (592 MiB for a 7B down_proj input)
        lo, hi = torch.aminmax(x.detach())
        self.min = min(self.min, lo.float().item())
        self.max = max(self.max, hi.float().item())
        self.count += x.numel()
        return x

    @property
    def observed(self) -> bool:
        return self.count > 0

    def range(self) -> tuple[float, float]:
        if not self.observed:
            raise RuntimeError("observer saw no data")
        return self.min, self.max

    def reduce_across_ranks(self) -> None:
        """Several processes (distributed.py): min / max / count over every rank's share (exact); no-op alone."""
        from .. import distributed
        if distributed.world() <= 1:
            return
        self.min, self.max, self.count = reduce_min_max_count(self.min, self.max, self.count)

    def extra_repr(self) -> str:
        return f"min={self.min:.4g}, max={self.max:.4g}, count={self.count}"


def reduce_min_max_count(lo: float, hi: float, count: int) -> tuple[float, float, int]:
    """(min, max, count) over every rank of several processes (exact: min, max and an integer sum)."""
    from .. import distributed
    lo = distributed.all_min(torch.tensor([lo], dtype=torch.float64))
    hi = distributed.all_max(torch.tensor([hi], dtype=torch.float64))
    n = distributed.all_sum(torch.tensor([count], dtype=torch.int64))
    return float(lo.item()), float(hi.item()), int(n.item())
