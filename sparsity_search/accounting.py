"""What a strategy costs over a whole generation: the one accounting the search, ``inspect`` and the
strategy file share.

A generation of ``num_steps`` denoising steps calls every layer's self-attention once per step (per
guidance branch: the same factor for dense and sparse, left out). At step ``s`` layer ``l``'s heads do
what :meth:`Strategy.heads_at` says -- dense in the global and the layer's own warm-up, else the
pattern of the step range ``s`` is in -- and cost, by the cost model
(:class:`~vdit_accel.sparsity_search.solver.CostModel`), ``fixed_ms + per_density_ms * mean head
density``, where a head's density is its block mask's (pattern in its static order, on the run's grid)
and a dynamic order's is its measured density (the search's ``head_stats``, else 1) plus its per-call
plan and moves in density units (:func:`vdit_accel.orders.order_overhead`). Summed over steps and layers
that is the generation's attention time; the same with every head dense is the dense time.

- ``effective_density``: the mean head density over every (step, layer, head), warm-ups at 1;
- ``expected_attention_speedup``: dense time over the strategy's time (on a GPU with a measured cost
  model: our kernel's latency at each density; without one FLOP-proportional, then ``1 / effective
  density`` exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vdit_accel.grid import VideoGrid
from vdit_accel.orders import block_mask_for_order, order_overhead, static_order
from vdit_accel.patterns import DENSE, build_block_mask_for_pattern
from vdit_accel.strategy import HeadSpec, Strategy

from .solver import CostModel, flops_cost_model


@dataclass(frozen=True)
class Accounting:
    """A strategy's cost over one generation (see the module docstring). Times are the cost model's,
    per attention call summed over layers and steps."""

    num_steps: int
    grid: VideoGrid
    block_size: int
    cost_source: str
    effective_density: float
    attention_ms: float
    dense_ms: float
    per_step_density: tuple[float, ...]  # mean over layers and heads, per step
    dense_steps: int  # leading steps in which every head of every layer is dense
    dense_throughout: bool

    @property
    def expected_attention_speedup(self) -> float:
        return self.dense_ms / self.attention_ms if self.attention_ms > 0 else float("inf")

    def line(self) -> str:
        """One line for people: what the whole run costs."""
        tokens = f"{self.grid.t}x{self.grid.h}x{self.grid.w} = {self.grid.seq_len:,} tokens"
        if self.dense_throughout:
            return (f"runs dense throughout its {self.num_steps} steps ({tokens}): effective density 1.00, "
                    "no attention speed-up")
        return (f"over {self.num_steps} steps ({tokens}, blocks of {self.block_size}): effective density "
                f"{self.effective_density:.3f} (dense warm-ups included), expected attention speed-up "
                f"{self.expected_attention_speedup:.2f}x ({self.cost_source})")

    def to_json(self) -> dict:
        return {"num_steps": self.num_steps, "grid": [self.grid.t, self.grid.h, self.grid.w, self.grid.text_len,
                                                      self.grid.text_at],
                "block_size": self.block_size, "cost_model": self.cost_source,
                "effective_density": round(self.effective_density, 6),
                "expected_attention_speedup": round(self.expected_attention_speedup, 4),
                "attention_ms": round(self.attention_ms, 4), "dense_ms": round(self.dense_ms, 4),
                "dense_steps": self.dense_steps, "dense_throughout": self.dense_throughout,
                "per_step_density": [round(x, 5) for x in self.per_step_density]}


class HeadDensity:
    """Block density of head specs on one grid and block size (each (pattern, order) built once)."""

    def __init__(self, grid: VideoGrid, block_size: int, device=None):
        self.grid, self.block, self.device = grid, block_size, device
        self._cache: dict = {}

    def __call__(self, head: HeadSpec, measured: float | None = None) -> float:
        """The head's density in dense-attention units: its static mask's, or for a dynamic order the
        ``measured`` density (1 when unknown) plus the order's per-call overhead."""
        if head.dynamic:
            base = 1.0 if measured is None else float(measured)
            return base + order_overhead(head.order, self.grid.seq_len, self.device)
        key = (head.pattern, head.order)
        if key not in self._cache:
            if head.order is None:
                m = build_block_mask_for_pattern(head.pattern, self.grid, self.block, self.block, self.device)
            else:
                perm = static_order(head.order, self.grid, self.block, self.device)
                m = block_mask_for_order(head.pattern, self.grid, perm, self.block, self.block)
            self._cache[key] = float(m.float().mean())
        return self._cache[key]


def _measured(strategy: Strategy, layer: int, step: int) -> list[float | None] | None:
    """The search's measured per-head densities of the phase ``step`` is in (None where not recorded)."""
    stats = strategy.head_stats
    for ph in strategy.phases:
        if ph.from_step <= step:
            stats = ph.head_stats
    if stats is None:
        return None
    return [s.get("density") for s in stats[layer]]


def account(strategy: Strategy, grid: VideoGrid, num_steps: int, *, num_layers: int | None = None,
            num_heads: int | None = None, block_size: int = 128, cost_model: CostModel | None = None,
            head_dim: int = 128, device=None, density: HeadDensity | None = None) -> Accounting:
    """The :class:`Accounting` of ``strategy`` over a run of ``num_steps`` steps on ``grid``.

    ``num_layers`` / ``num_heads``: the model's (default: the strategy's ``model``; a uniform strategy
    without them counts one layer of one head, which gives the same densities). ``cost_model``: default
    FLOP-proportional for ``head_dim``."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    n_layers = num_layers or strategy.model.get("num_layers") or 1
    n_heads = num_heads or strategy.model.get("num_heads") or 1
    cost_model = cost_model or flops_cost_model(1, grid.seq_len, n_heads, head_dim)
    density = density or HeadDensity(grid, block_size, device)
    starts = [0, *[s for s in strategy.stage_starts if 0 < s < num_steps]]
    bounds = list(zip(starts, starts[1:] + [num_steps]))
    per_step = [0.0] * num_steps
    total_ms = 0.0
    dense_steps = None
    for a, b in bounds:
        layer_density, all_dense = [], True
        for layer in range(n_layers):
            heads = strategy.heads_at(layer, n_heads, a)
            measured = _measured(strategy, layer, a) or [None] * n_heads
            layer_density.append(sum(density(h, m) for h, m in zip(heads, measured)) / n_heads)
            all_dense &= all(h.pattern == DENSE and not h.dynamic for h in heads)
        if not all_dense and dense_steps is None:
            dense_steps = a
        per_step[a:b] = [sum(layer_density) / n_layers] * (b - a)
        total_ms += (b - a) * sum(cost_model.fixed_ms + cost_model.per_density_ms * d for d in layer_density)
    dense_ms = num_steps * n_layers * (cost_model.fixed_ms + cost_model.per_density_ms)
    return Accounting(num_steps, grid, block_size, cost_model.source, sum(per_step) / num_steps, total_ms, dense_ms,
                      tuple(per_step), num_steps if dense_steps is None else dense_steps, dense_steps is None)


def cost_model_for(grid: VideoGrid, num_heads: int, head_dim: int, block_size: int, device) -> CostModel:
    """The search's cost model: measured on a CUDA ``device`` (cached per GPU and shape), else
    FLOP-proportional."""
    from .solver import measure_cost_model

    if device is not None and torch.device(device).type == "cuda":
        return measure_cost_model(1, grid.seq_len, num_heads, head_dim, block_size, device)
    return flops_cost_model(1, grid.seq_len, num_heads, head_dim)
