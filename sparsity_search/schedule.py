"""The search's choice over the whole denoising schedule: per layer a dense warm-up, per step range and
head a candidate, all charged what they cost over the run.

A :class:`ScheduleProblem` holds, for every denoising step ``s`` (errors of steps not profiled are
interpolated between the profiled ones), layer ``l``, head ``h`` and candidate column ``c``, the
proxy error ``error[s, l, h, c]`` (the head's relative L2 output error at that step, see
:class:`~.profile.LayerStats`) and the per-step cost ``cost[l, h, c]`` (the cost model's, or block
density for ``--target-density``). A :class:`Schedule` chooses

- per layer ``l`` a warm-up ``warmup[l]`` (the layer runs dense for its first that many steps, at the
  dense cost; ``num_steps``: dense throughout) from a ladder of eighths of the run;
- ``phases - 1`` boundaries (from a ladder of eighths) that cut the steps into ranges;
- per range, layer and head a column, used at every step of the range past the layer's warm-up.

Its error is the mean of ``error`` over every (step, layer, head) (warm-up steps count 0), its cost
the sum of its per-step costs over the run as a fraction of running dense throughout. :func:`solve`
minimises ``cost + lam * error`` jointly over all of it -- the minimum over boundaries of the sum over
layers of the minimum over warm-ups of the sum over ranges and heads of the minimum over columns, which
is exact -- and bisects ``lam`` until the mean error meets a budget or the cost a cap. So the dense
warm-up is chosen inside the solve and paid for, not picked afterwards for free.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from .solver import bisect_lagrangian


def interpolate_steps(profiled: list[int], values: torch.Tensor, num_steps: int) -> torch.Tensor:
    """``values[i]`` measured at step ``profiled[i]`` (ascending) -> ``[num_steps, ...]``: linear between
    profiled neighbours, the first / last value before / after them."""
    if len(profiled) != values.shape[0] or not profiled:
        raise ValueError(f"{values.shape[0]} values for {len(profiled)} profiled steps")
    out = values.new_empty(num_steps, *values.shape[1:])
    pos = torch.tensor(profiled, dtype=torch.float64)
    for s in range(num_steps):
        j = int(torch.searchsorted(pos, torch.tensor(float(s), dtype=torch.float64), right=True))
        if j == 0:
            out[s] = values[0]
        elif j == len(profiled):
            out[s] = values[-1]
        else:
            a, b = profiled[j - 1], profiled[j]
            f = (s - a) / (b - a)
            out[s] = values[j - 1] * (1 - f) + values[j] * f
    return out


def ladder(num_steps: int, eighths=range(0, 9)) -> list[int]:
    """Steps at the given eighths of the run, rounded, distinct, ascending."""
    return sorted({round(k * num_steps / 8) for k in eighths})


@dataclass
class ScheduleProblem:
    """Everything :func:`solve` chooses from (see the module docstring).

    error: ``[N, L, H, C]`` per step; cost: ``[L, H, C]`` per step (cost-model units); density:
    ``[L, H, C]`` (dense-attention units, a dynamic order's overhead included); dense_cost / its density
    1: one dense head for one step. ``phases``: the number of step ranges (1: one pattern per head for the
    whole run)."""

    error: torch.Tensor
    cost: torch.Tensor
    density: torch.Tensor
    dense_cost: float
    phases: int = 2

    def __post_init__(self):
        n, l, h, c = self.error.shape
        if tuple(self.cost.shape) != (l, h, c) or tuple(self.density.shape) != (l, h, c):
            raise ValueError(f"cost {tuple(self.cost.shape)} and density {tuple(self.density.shape)} must be [L, H, C] = "
                             f"{(l, h, c)}")
        if self.phases < 1:
            raise ValueError(f"phases must be >= 1, got {self.phases}")
        self.error = self.error.double()
        self.cost, self.density = self.cost.double(), self.density.double()
        # The solve's arithmetic in NumPy: many small reductions, where torch's per-call overhead dominates.
        self._err, self._cost, self._density = (x.cpu().numpy() for x in (self.error, self.cost, self.density))
        # prefix sums over steps: the error of any step range in one subtraction
        self._cum = np.concatenate([np.zeros((1, l, h, c)), self._err.cumsum(0)])

    @property
    def num_steps(self) -> int:
        return self.error.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.error.shape[1:])

    def boundary_sets(self) -> list[tuple[int, ...]]:
        """The candidate boundaries: ``phases - 1`` distinct steps of the eighths ladder inside the run."""
        inner = [b for b in ladder(self.num_steps) if 0 < b < self.num_steps]
        return list(itertools.combinations(inner, min(self.phases - 1, len(inner))))


@dataclass(frozen=True)
class Schedule:
    """A solution of :func:`solve`: ``warmup[l]``, ``boundaries`` (the later ranges' first steps),
    ``choice[p, l, h]`` (column per range), and what it adds up to over the run."""

    warmup: tuple[int, ...]
    boundaries: tuple[int, ...]
    choice: torch.Tensor
    error: float  # mean over (step, layer, head)
    cost: float  # fraction of the dense run's cost
    density: float  # effective density (dense warm-ups at 1)
    per_step_error: tuple[float, ...]  # mean over layers and heads, per step
    layer_error: tuple[float, ...]  # each layer's share of the error (sums to ``error``)

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return _ranges(self.boundaries, len(self.per_step_error))


def _ranges(boundaries, n: int) -> list[tuple[int, int]]:
    starts = [0, *boundaries]
    return list(zip(starts, [*boundaries, n]))


def _warmups(problem: ScheduleProblem, min_warmup: int) -> np.ndarray:
    n = problem.num_steps
    return np.array(sorted({w for w in ladder(n) if w >= min_warmup} | {min(max(min_warmup, 0), n)}))


def _evaluate(problem: ScheduleProblem, lam: float, metric: np.ndarray, dense_metric: float, boundaries,
              warmups: np.ndarray, dense_layers: frozenset):
    """For fixed ``lam`` and boundaries: the best warm-up per layer and column per (range, layer, head).
    Returns ``(objective, warm-up index [L], choice [P, L, H])``."""
    n = problem.num_steps
    l, h, _ = problem.shape
    total = np.repeat(warmups[:, None] * float(h * dense_metric), l, 1)  # [K, L]: the warm-up steps, dense
    picks = []
    for a, b in _ranges(boundaries, n):
        start = np.clip(warmups, a, b)  # [K]: the range's first step past each warm-up
        seg = problem._cum[b][None] - problem._cum[start]  # [K, L, H, C]
        obj = (b - start)[:, None, None, None] * metric[None] + lam * seg
        idx = obj.argmin(-1)  # [K, L, H]
        total = total + np.take_along_axis(obj, idx[..., None], -1)[..., 0].sum(-1)
        picks.append(idx)
    if dense_layers:  # forced dense throughout: only the warm-up of the whole run
        forced = sorted(dense_layers)
        total[:, forced] = np.where((warmups != n)[:, None], np.inf, total[:, forced])
    wi = total.argmin(0)  # [L]
    choice = np.stack([pk[wi, np.arange(l)] for pk in picks])  # [P, L, H]
    return float(total[wi, np.arange(l)].sum()), wi, choice


def _summarise(problem: ScheduleProblem, warmup: np.ndarray, boundaries, choice: np.ndarray) -> Schedule:
    n = problem.num_steps
    l, h, _ = problem.shape
    err_steps = np.zeros(n)
    err_layers = np.zeros(l)
    cost = float(warmup.sum()) * h * problem.dense_cost
    density = float(warmup.sum()) * h
    for p, (a, b) in enumerate(_ranges(boundaries, n)):
        cols = choice[p]  # [L, H]
        e = np.take_along_axis(problem._err[a:b], np.broadcast_to(cols[None, ..., None], (b - a, l, h, 1)), -1)[..., 0]
        live = (np.arange(a, b)[:, None] >= warmup[None, :]).astype(np.float64)  # [b-a, L]: past the layer's warm-up
        e = e * live[..., None]
        err_steps[a:b] = e.sum((1, 2)) / (l * h)
        err_layers += e.sum((0, 2)) / (n * l * h)
        steps = live.sum(0)  # [L]
        cost += float((steps[:, None] * np.take_along_axis(problem._cost, cols[..., None], -1)[..., 0]).sum())
        density += float((steps[:, None] * np.take_along_axis(problem._density, cols[..., None], -1)[..., 0]).sum())
    dense_total = n * l * h
    return Schedule(tuple(int(w) for w in warmup), tuple(boundaries), torch.from_numpy(np.ascontiguousarray(choice)),
                    float(err_steps.mean()), cost / (dense_total * problem.dense_cost), density / dense_total,
                    tuple(float(x) for x in err_steps), tuple(float(x) for x in err_layers))


def solve(problem: ScheduleProblem, *, mean_error: float | None = None, mean_cost: float | None = None,
          mean_density: float | None = None, min_warmup: int = 0, dense_layers=()) -> Schedule:
    """The schedule with the least cost whose mean error is at most ``mean_error``, or the least error
    whose cost fraction is at most ``mean_cost`` (or whose effective density is at most ``mean_density``:
    costs then are block densities). ``min_warmup``: every layer dense for at least that many steps;
    ``dense_layers``: layers kept dense throughout. When the cap cannot be met (it is below what the
    warm-ups alone cost), the cheapest schedule is returned: check its ``cost`` / ``density``."""
    if sum(x is not None for x in (mean_error, mean_cost, mean_density)) != 1:
        raise ValueError("give exactly one of mean_error, mean_cost and mean_density")
    by_density = mean_density is not None
    metric = problem._density if by_density else problem._cost
    dense_metric = 1.0 if by_density else problem.dense_cost
    warmups = _warmups(problem, min_warmup)
    dense_layers = frozenset(int(x) for x in dense_layers)
    sets = problem.boundary_sets()

    def pick(lam: float) -> Schedule:
        best = None
        for bs in sets:
            obj, wi, choice = _evaluate(problem, lam, metric, dense_metric, bs, warmups, dense_layers)
            if best is None or obj < best[0] - 1e-12 * abs(obj):
                best = (obj, wi, choice, bs)
        _, wi, choice, bs = best
        return _summarise(problem, warmups[wi], bs, choice)

    def measure(sol: Schedule) -> tuple[float, float]:
        return sol.error, (sol.density if by_density else sol.cost)

    cap = mean_density if by_density else mean_cost
    return bisect_lagrangian(pick, measure, mean_error=mean_error, mean_cost=cap, rel_tol=1e-4)


def solve_per_head(problem: ScheduleProblem, budget: float, warmup: int = 0) -> Schedule:
    """Every head within ``budget`` in every range: per range and head the cheapest column whose mean error
    over the range's steps (past ``warmup``) is at most ``budget`` (dense where none is), the boundaries
    that cost least."""
    from .solver import solve_per_head as per_head

    n = problem.num_steps
    l, h, _ = problem.shape
    warm = np.full(l, min(warmup, n))
    best = None
    for bs in problem.boundary_sets():
        cols = []
        for a, b in _ranges(bs, n):
            a = min(max(a, int(warm[0])), b)
            err = torch.from_numpy((problem._cum[b] - problem._cum[a]) / max(b - a, 1))
            cols.append(per_head(err, problem.cost, budget).numpy())
        sol = _summarise(problem, warm, bs, np.stack(cols))
        if best is None or sol.cost < best.cost - 1e-12:
            best = sol
    return best
