"""Choosing a pattern per head: the hardware-aware cost model and the solvers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vdit_accel.kernels import measurements


@dataclass(frozen=True)
class CostModel:
    """Latency of one layer's attention as ``fixed_ms + per_density_ms * mean head density``.

    Measured on the GPU by timing our kernel at a few densities on the real shape
    (:func:`measure_cost_model`, cached on disk per GPU and shape), or, without a GPU, FLOP-proportional
    (``fixed_ms = 0``): the solver needs only relative costs.
    """

    fixed_ms: float
    per_density_ms: float
    source: str

    def head_cost(self, density: torch.Tensor, num_heads: int) -> torch.Tensor:
        """Cost of one head at each candidate density (the layer's cost spread over its heads)."""
        return self.fixed_ms / num_heads + self.per_density_ms * density / num_heads


def flops_cost_model(batch: int, seq_len: int, num_heads: int, head_dim: int, tflops: float = 500.0) -> CostModel:
    dense_ms = 4.0 * batch * num_heads * seq_len**2 * head_dim / (tflops * 1e12) * 1e3
    return CostModel(0.0, dense_ms, f"flops@{tflops:g}TFLOP/s")


def _cost_cache_path(gpu: str, shape: tuple, block: int) -> str:
    return measurements.cache_path("cost", gpu, "x".join(map(str, shape)), f"b{block}")


def measure_cost_model(batch: int, seq_len: int, num_heads: int, head_dim: int, block: int = 128,
                       device="cuda", dtype=torch.bfloat16, timer=None) -> CostModel:
    """Time our sparse kernel at densities 1, 1/2, 1/4, 1/8, 1/16 (banded masks, 3 rounds each) and fit
    a line (:func:`fit_cost_model`).

    Cached on disk per GPU name, shape and block size: a search pays this once per machine, and every
    later search on it reads the same numbers (so timing noise cannot flip its choices between runs).
    ``timer(fn) -> ms`` replaces the CUDA-event timing (tests)."""
    if timer is None and (not torch.cuda.is_available() or torch.device(device).type != "cuda"):
        return flops_cost_model(batch, seq_len, num_heads, head_dim)
    gpu = torch.cuda.get_device_name(device) if timer is None else "test"
    path = _cost_cache_path(gpu, (batch, seq_len, num_heads, head_dim), block)
    d = measurements.load(path)
    if d is not None:
        return CostModel(d["fixed_ms"], d["per_density_ms"], d["source"])
    from vdit_accel.attention import attention
    from vdit_accel.block_mask import BlockMask, cdiv

    if timer is None:
        from triton.testing import do_bench

        timer = lambda fn: do_bench(fn, warmup=10, rep=50, return_mode="median")  # noqa: E731
    q, k, v = (torch.randn(batch, seq_len, num_heads, head_dim, device=device, dtype=dtype) for _ in range(3))
    nb = cdiv(seq_len, block)
    idx = torch.arange(nb, device=device)
    xs, ys = [], []
    for frac in (1.0, 0.5, 0.25, 0.125, 0.0625):
        band = max(0, int(round(frac * nb / 2)))
        blocks = ((idx[:, None] - idx[None, :]).abs() <= band).expand(1, num_heads, nb, nb)
        mask = BlockMask.from_dense(blocks, seq_len, block, block)
        for _ in range(3):  # rounds apart, so that a burst of noise lands in one of them
            xs.append(mask.density())
            ys.append(timer(lambda: attention(q, k, v, mask)))
    model = fit_cost_model(xs, ys, f"measured on {gpu}")
    measurements.store(path, {"fixed_ms": model.fixed_ms, "per_density_ms": model.per_density_ms,
                              "source": model.source, "densities": xs, "ms": ys})
    return model


def fit_cost_model(densities: list[float], ms: list[float], source: str) -> CostModel:
    """``ms ~ fixed + slope * density``: the median of the rounds at each density, a least-squares line
    through them (fixed part clamped at 0), both rounded to 3 significant digits -- timing noise of a few
    per cent moves neither."""
    by: dict[float, list[float]] = {}
    for x, y in zip(densities, ms):
        by.setdefault(round(x, 6), []).append(y)
    xs = torch.tensor(sorted(by), dtype=torch.float64)
    ys = torch.tensor([sorted(by[x])[len(by[x]) // 2] for x in sorted(by)], dtype=torch.float64)
    a = torch.stack([torch.ones_like(xs), xs], 1)
    fixed, slope = torch.linalg.lstsq(a, ys[:, None]).solution.flatten().tolist()

    def sig3(v: float) -> float:
        return float(f"{v:.3g}")

    return CostModel(sig3(max(fixed, 0.0)), sig3(slope), source)


def solve_per_head(error: torch.Tensor, cost: torch.Tensor, budget: float) -> torch.Tensor:
    """Per head, the cheapest candidate whose error is within ``budget`` (ties: lower error).

    ``error`` [..., C], ``cost`` [C] (or broadcastable). Returns candidate indices [...]. A head for
    which nothing fits gets its lowest-error candidate (dense, whose error is 0, is always a candidate).
    """
    cost = cost.expand_as(error).double()
    ok = error <= budget
    key = torch.where(ok, cost, math.inf) + error.double() * 1e-9
    best = key.argmin(-1)
    fallback = error.argmin(-1)
    return torch.where(ok.any(-1), best, fallback)


def solve_lagrangian(error: torch.Tensor, cost: torch.Tensor, *, mean_error: float | None = None,
                     mean_cost: float | None = None, iters: int = 60) -> torch.Tensor:
    """One budget spent across all heads and layers.

    Minimises ``sum cost + lam * sum error`` per head independently, with ``lam`` bisected so that
    the mean error is at most ``mean_error`` (or the mean cost at most ``mean_cost``). Heads where
    sparsity is cheap in error give more, the others less. Returns candidate indices [...].
    """
    cost = cost.expand_as(error).double()
    err = error.double()

    def measure(idx: torch.Tensor) -> tuple[float, float]:
        return err.gather(-1, idx[..., None]).mean().item(), cost.gather(-1, idx[..., None]).mean().item()

    return bisect_lagrangian(lambda lam: (cost + lam * err).argmin(-1), measure, mean_error=mean_error,
                             mean_cost=mean_cost, iters=iters)


def bisect_lagrangian(pick, measure, *, mean_error: float | None = None, mean_cost: float | None = None,
                      iters: int = 60, rel_tol: float = 1e-9):
    """The Lagrangian relaxation's multiplier, bisected: ``pick(lam)`` minimises ``cost + lam * error``
    (a larger ``lam``: more accurate, costlier), ``measure(solution) -> (mean error, mean cost)``.
    With ``mean_error``: the cheapest solution within it; with ``mean_cost``: the most accurate one
    within that cost (where none is, the cheapest: ``lam = 0``). Stops when ``lam`` is known to ``rel_tol``
    (the answer is feasible either way; a coarser ``lam`` can only leave a little on the table)."""
    if (mean_error is None) == (mean_cost is None):
        raise ValueError("give exactly one of mean_error and mean_cost")
    lo, hi = 0.0, 1.0
    # Grow hi until its solution is feasible (error budget) or too costly (cost budget).
    for _ in range(60):
        e, c = measure(pick(hi))
        if (mean_error is not None and e <= mean_error) or (mean_cost is not None and c > mean_cost):
            break
        hi *= 4.0
    for _ in range(iters):
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 16.0
        e, c = measure(pick(mid))
        feasible = e <= mean_error if mean_error is not None else c <= mean_cost
        # Error budget: the cheapest feasible (smallest lam). Cost budget: the most accurate feasible
        # (largest lam whose cost still fits).
        if mean_error is not None:
            lo, hi = (lo, mid) if feasible else (mid, hi)
        else:
            lo, hi = (mid, hi) if feasible else (lo, mid)
        if hi - lo < rel_tol * max(hi, 1e-30):
            break
    return pick(hi if mean_error is not None else lo)
