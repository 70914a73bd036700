"""The offline search: profile a pipeline's heads on calibration prompts, choose a pattern per head.

    strategy = search(pipe, ["a cat", "a city at night"], budget=0.05, call_kwargs=dict(num_frames=81, ...))
    strategy.save("strategy.json")

The pipeline is patched dense (our kernel, no sparsity) and every self-attention call at the chosen
denoising steps is scored by :class:`~.profile.HeadProfiler` (candidate errors and recalled mass,
no S x S matrix). The solver then picks, per head, the cheapest candidate (by the cost model) within
the error budget — per head, or with one budget spread over all heads (Lagrangian) — and the result
is written as a strategy file. Prompts can be sharded over processes (``torchrun``); state is saved
after every prompt, per layer, so an interrupted search resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from vdit_accel.orders import format_order, is_dynamic, order_overhead, parse_order
from vdit_accel.strategy import HeadSpec, Strategy

from .candidates import candidate_patterns
from .profile import HeadProfiler, LayerStats
from .solver import CostModel, flops_cost_model, measure_cost_model, solve_lagrangian, solve_per_head

MODES = ("global", "per_head")


@dataclass
class SearchConfig:
    """What the search does. Field by field:

    budget: the error allowed: per head (``per_head``) or on average over all heads (``global``),
        as the relative L2 error of a head's output against dense (``LayerStats.error``).
    mode: ``global`` spends one budget across all heads and layers (Lagrangian): heads where
        sparsity is cheap give more; ``per_head`` holds every head to the budget.
    steps: denoising step indices profiled (default: first, middle, last of ``num_inference_steps``).
    dense_warmup_steps: None = chosen by the search (the profiled steps whose error would exceed
        the budget by half run dense), else taken as given.
    block_size: the block size the strategy will run with (masks are scored at it).
    sample_blocks / mass_stride: see :class:`~.profile.HeadProfiler` (precision vs search time).
    seed: the generation seed for every calibration prompt.
    target_density: instead of an error budget, the mean block density to reach with the least
        error (Lagrangian on density): for comparing with a uniform pattern at equal cost.
    orders: token orders the search may give a head (:mod:`vdit_accel.orders`; short forms):
        every pattern is scored in each static order (``raster``, ``tiled``), and each dynamic order
        (``semantic:top_p=0.9``, ``segment``, ...) is one more candidate of its own. Each order costs
        one more profiling pass. A dynamic order's cost is its block density plus its per-call plan and
        moves (:func:`vdit_accel.orders.overhead.order_overhead`: measured on the search's GPU once and
        cached, in the same units); static orders cost their density.
    """

    budget: float = 0.05
    mode: str = "global"
    steps: list[int] | None = None
    dense_warmup_steps: int | None = None
    block_size: int = 128
    sample_blocks: int = 8
    mass_stride: int = 1
    seed: int = 0
    target_density: float | None = None
    orders: tuple[str, ...] = ("raster",)

    def __post_init__(self):
        specs = [parse_order(o) for o in self.orders]
        if all(is_dynamic(o) for o in specs):
            raise ValueError(f"orders {list(self.orders)} need a static order (raster or tiled) for the patterns")
        self.orders = tuple(format_order(o) for o in specs)
        if not self.budget > 0:
            raise ValueError(f"budget must be > 0, got {self.budget}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.target_density is not None and not 0 < self.target_density <= 1:
            raise ValueError(f"target_density must be in (0, 1], got {self.target_density}")
        if self.dense_warmup_steps is not None and self.dense_warmup_steps < 0:
            raise ValueError("dense_warmup_steps must be >= 0")


@dataclass
class _State:
    """Everything a resumed search needs: done prompts and per-(layer, step) stats."""

    fingerprint: str
    done: list[str] = field(default_factory=list)
    grid: tuple | None = None
    stats: dict[tuple[int, int], LayerStats] = field(default_factory=dict)

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        by_layer: dict[int, dict[str, torch.Tensor]] = {}
        for (layer, step), st in self.stats.items():
            for name, t in st.tensors().items():
                by_layer.setdefault(layer, {})[f"{step}.{name}"] = t.contiguous()
        for layer, tensors in by_layer.items():
            tmp = directory / f"layer_{layer:03d}.safetensors.tmp"
            save_file(tensors, str(tmp))
            os.replace(tmp, directory / f"layer_{layer:03d}.safetensors")
        meta = {"fingerprint": self.fingerprint, "done": self.done, "grid": self.grid}
        tmp = directory / "progress.json.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, directory / "progress.json")

    @classmethod
    def load(cls, directory: Path, fingerprint: str) -> "_State":
        from safetensors.torch import load_file

        progress = directory / "progress.json"
        if not progress.exists():
            return cls(fingerprint)
        meta = json.loads(progress.read_text())
        if meta["fingerprint"] != fingerprint:
            raise ValueError(
                f"search state in {str(directory)!r} belongs to another search (different model, settings "
                "or candidates); use another --state-dir or delete it"
            )
        state = cls(fingerprint, meta["done"], tuple(meta["grid"]) if meta["grid"] else None)
        for f in sorted(directory.glob("layer_*.safetensors")):
            layer = int(f.name[6:9])
            tensors = load_file(str(f))
            for step in sorted({int(k.split(".")[0]) for k in tensors}):
                names = [n for n in ("err_sq", "ref_sq", "recall", "count", "density") if f"{step}.{n}" in tensors]
                state.stats[(layer, step)] = LayerStats(**{n: tensors[f"{step}.{n}"] for n in names})
        return state


def _allreduce(stats: dict[tuple[int, int], LayerStats], keys: list[tuple[int, int]], shape: tuple[int, int]):
    import torch.distributed as dist

    out = {}
    for key in keys:
        st = stats.get(key) or LayerStats.zeros(*shape)
        flat = torch.cat([t.flatten() for t in st.tensors().values()])
        dist.all_reduce(flat)
        parts, i = {}, 0
        for name, t in st.tensors().items():
            parts[name] = flat[i : i + t.numel()].view_as(t)
            i += t.numel()
        out[key] = LayerStats(**parts)
    return out


def search(
    pipe,
    prompts: list[str],
    config: SearchConfig | None = None,
    *,
    call_kwargs: dict | None = None,
    state_dir: str | Path | None = None,
    progress: Callable[[str], None] = print,
    cost_model: CostModel | None = None,
) -> Strategy:
    """Search a per-layer, per-head strategy for ``pipe`` (a diffusers pipeline; its ``transformer``).

    ``call_kwargs`` go to every ``pipe(...)`` call (size, steps, ...); ``num_inference_steps`` sets the
    step count the ``steps`` of ``config`` refer to. Under ``torch.distributed`` (``torchrun``), each
    rank profiles ``prompts[rank::world]`` and rank 0's result is the merged search (every rank
    returns it).
    """
    from vdit_accel._version import __version__
    from vdit_accel.pipelines import patch, patch_state, unpatch

    config = config or SearchConfig()
    call_kwargs = dict(call_kwargs or {})
    if not prompts:
        raise ValueError("give at least one calibration prompt")
    n_steps = int(call_kwargs.get("num_inference_steps", 50))
    steps = sorted(set(config.steps if config.steps is not None else [0, n_steps // 2, n_steps - 1]))
    if not steps or steps[0] < 0 or steps[-1] >= n_steps:
        raise ValueError(f"steps {steps} must lie in [0, {n_steps - 1}] (num_inference_steps={n_steps})")
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    world = torch.distributed.get_world_size() if distributed else 1
    transformer = pipe.transformer
    fingerprint = hashlib.sha256(json.dumps(
        [type(transformer).__name__, transformer.config.num_layers if hasattr(transformer.config, "num_layers") else 0,
         asdict(config), {k: v for k, v in call_kwargs.items() if isinstance(v, (int, float, str))}, rank, world],
        sort_keys=True, default=str).encode()).hexdigest()[:16]
    state_path = Path(state_dir) / f"rank{rank}" if state_dir else None
    state = _State.load(state_path, fingerprint) if state_path else _State(fingerprint)

    t0 = time.perf_counter()
    patch(pipe, Strategy.dense(), block_size=config.block_size)
    pstate = patch_state(transformer)
    profiler: HeadProfiler | None = None

    def observe(layer, step, q, k, v):
        nonlocal profiler
        if step not in steps:
            return
        grid = pstate.call_grid or pstate.grid  # the tokens of this very call (text included)
        if profiler is None:
            profiler = HeadProfiler(candidate_patterns(grid), config.block_size, config.sample_blocks,
                                    config.mass_stride, stats=state.stats, orders=list(config.orders))
        profiler.observe(layer, step, grid, q, k, v)

    pstate.observers.append(observe)
    mine = prompts[rank::world]
    try:
        for i, prompt in enumerate(mine):
            if prompt in state.done:
                progress(f"[rank {rank}] prompt {i + 1}/{len(mine)} already profiled (resumed): {prompt!r}")
                continue
            t_prompt = time.perf_counter()
            pstate.reset()
            pipe(prompt=prompt, **call_kwargs, generator=torch.Generator("cpu").manual_seed(config.seed))
            g = pstate.call_grid or pstate.grid
            state.grid = (g.t, g.h, g.w, g.text_len, g.text_at)
            state.done.append(prompt)
            if state_path:
                state.save(state_path)
            progress(f"[rank {rank}] prompt {i + 1}/{len(mine)} profiled in {time.perf_counter() - t_prompt:.1f} s: {prompt!r}")
    finally:
        unpatch(pipe)

    from vdit_accel.grid import VideoGrid

    if state.grid is None and not distributed:
        raise RuntimeError("no attention call was profiled: check `steps` against num_inference_steps")
    num_layers, num_heads = len(pstate.layers), pstate.num_heads
    grid_t = [list(state.grid) if state.grid else None]
    if distributed:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, grid_t[0])
        grid_t = [g for g in gathered if g]
    grid = VideoGrid(*grid_t[0])
    candidates = candidate_patterns(grid)
    device = next(transformer.parameters()).device
    if profiler is None or profiler.candidates != candidates:  # (resumed, or another rank profiled)
        profiler = HeadProfiler(candidates, config.block_size, orders=list(config.orders))
    columns = profiler.columns()  # (pattern, order) per stats column
    stats = state.stats
    if distributed:
        stats = _allreduce(stats, [(l, s) for l in range(num_layers) for s in steps], (num_heads, len(columns)))
    representative, static_density = profiler.column_info(grid, device)  # the observer's masks, if cached
    skip = [i for i, (p, _) in enumerate(columns) if p.kind == "skip"]

    def layer_total(layer: int, only_step: int | None = None) -> LayerStats:
        total = LayerStats.zeros(num_heads, len(columns))
        for (l, s), st in stats.items():
            if l == layer and (only_step is None or s == only_step):
                total.add(st)
        return total

    def layer_error(layer: int, only_step: int | None = None) -> torch.Tensor:
        return layer_total(layer, only_step).error(skip)

    err = torch.stack([layer_error(l) for l in range(num_layers)])  # [L, H, C]
    # Block density per (layer, head, column): measured per head for data-chosen (dynamic) masks.
    density = static_density.double().expand(num_layers, num_heads, -1).clone()
    for l in range(num_layers):
        measured = layer_total(l).mean_density()
        if measured is not None:
            density[l] = torch.where(static_density.isnan(), measured, density[l])
    if density.isnan().any():
        raise RuntimeError("the search state has no measured densities for the dynamic orders; rerun without --state-dir")
    head_dim = int(transformer.config.attention_head_dim)
    if cost_model is None:
        cost_model = (measure_cost_model(1, grid.seq_len, num_heads, head_dim, config.block_size, device)
                      if device.type == "cuda" else flops_cost_model(1, grid.seq_len, num_heads, head_dim))
    # Dynamic orders also pay their plan and moves per call (in density units; 0 for static orders).
    overhead = torch.tensor([order_overhead(o, grid.seq_len, device) for _, o in columns], dtype=density.dtype)
    cost = cost_model.head_cost(density + overhead, num_heads)  # [L, H, C]
    if config.target_density is not None:
        choice = solve_lagrangian(err, density, mean_cost=config.target_density)
    elif config.mode == "per_head":
        choice = solve_per_head(err, cost, config.budget)
    else:
        choice = solve_lagrangian(err, cost, mean_error=config.budget)
    choice = torch.tensor(representative)[choice]
    chosen_density = density.gather(-1, choice[..., None])[..., 0]  # [L, H]

    # Dense warm-up: leading profiled steps where this choice's error exceeds the budget by half.
    per_step = {}
    for s in steps:
        e = torch.stack([layer_error(l, s) for l in range(num_layers)]).gather(-1, choice[..., None]).mean().item()
        per_step[s] = e if math.isfinite(e) else None
    warmup = config.dense_warmup_steps
    if warmup is None:
        warmup = 0
        for s in steps:
            if per_step[s] is not None and per_step[s] > 1.5 * config.budget:
                warmup = s + 1
            else:
                break

    layers = [[HeadSpec(*columns[int(c)]) for c in row] for row in choice]
    # The default order: the most common static one (a tiled default is applied once per forward).
    counts: dict = {}
    for row in layers:
        for h in row:
            if not h.dynamic:
                counts[h.order] = counts.get(h.order, 0) + 1
    default_order = max(counts, key=counts.get) if counts else None
    head_stats = [[{"error": round(float(err[l, h, choice[l, h]]), 6), "density": round(float(chosen_density[l, h]), 6)}
                   for h in range(num_heads)] for l in range(num_layers)]
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    import diffusers

    meta = {
        "prompts": list(prompts), "steps": steps, "num_inference_steps": n_steps, "budget": config.budget,
        "mode": config.mode, "block_size": config.block_size, "grid": list(grid_t[0]), "world_size": world,
        "candidates": len(candidates), "cost_model": cost_model.source, "gpu": gpu,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "vdit_accel": __version__},
        "seconds": round(time.perf_counter() - t0, 2), "error_per_step": per_step,
        "mean_error": float(err.gather(-1, choice[..., None]).mean()), "mean_density": float(chosen_density.mean()),
        "orders": list(config.orders),
    }
    return Strategy(
        default=HeadSpec(order=default_order), layers=layers, dense_warmup_steps=int(warmup), head_stats=head_stats,
        model={"class": type(transformer).__name__, "num_layers": num_layers, "num_heads": num_heads,
               "head_dim": head_dim},
        search=meta,
    )
