"""The offline search: profile a pipeline's heads on calibration prompts, choose what every head does
over the whole denoising schedule, and (given a target) verify the result end to end.

    strategy = search(pipe, ["a cat", "a city at night"], SearchConfig(min_psnr=30),
                      call_kwargs=dict(num_frames=81, ...), validation_prompts=["a dog", ...])
    strategy.save("strategy.json")

1. **Profile.** The pipeline is patched dense (our kernel, no sparsity) and every self-attention call
   at every denoising step (or the ``steps`` given) is scored by :class:`~.profile.HeadProfiler`: each
   candidate's error on sampled query blocks, in each static token order, no S x S matrix.
2. **Solve.** :mod:`.schedule`: per layer a dense warm-up, per step range (early / late) and head a
   candidate, charged what they cost over the whole run (:mod:`.accounting`) -- with an error budget
   (``budget``), a density (``target_density``) or a cost cap.
3. **Verify and adjust** (``min_psnr`` / ``attention_speedup``): :mod:`.targets` generates the
   calibration and held-out validation prompts dense and accelerated (:mod:`.verify`) and tunes the
   cap, the warm-up and the most sensitive layers until the target holds on the validation prompts, or
   says it cannot. Every measured figure and prompt goes into the strategy's ``search`` metadata.

Prompts can be sharded over processes (``torchrun``: each rank profiles its share, the stats are summed;
verification runs on rank 0 and its strategy is sent to every rank); state is saved after every prompt,
per layer, so an interrupted search resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from vdit_accel.orders import format_order, is_dynamic, order_overhead, parse_order
from vdit_accel.strategy import HeadSpec, Phase, Strategy

from .accounting import account, cost_model_for
from .candidates import candidate_patterns
from .profile import HeadProfiler, LayerStats
from .schedule import Schedule, ScheduleProblem, interpolate_steps, solve, solve_per_head
from .solver import CostModel

MODES = ("global", "per_head")


@dataclass
class SearchConfig:
    """What the search does. Field by field:

    budget: the error allowed, as the relative L2 error of a head's output against dense
        (``LayerStats.error``) averaged over every step, layer and head of the run (dense warm-up steps
        count as 0) in ``global`` mode, or per head and step range in ``per_head`` mode.
    mode: ``global`` spends one budget across all heads, layers and steps (Lagrangian): heads where
        sparsity is cheap give more; ``per_head`` holds every head to the budget.
    steps: denoising step indices profiled (default: every step; the errors of steps left out are
        interpolated between their profiled neighbours).
    dense_warmup_steps: None = chosen by the search, per layer, inside the solve (and charged); else
        the least warm-up of every layer.
    block_size: the block size the strategy will run with (masks are scored at it).
    sample_blocks / mass_stride: see :class:`~.profile.HeadProfiler` (precision vs search time; the
        default mass stride 0 measures the sampled blocks only, all the solver needs).
    seed: the generation seed of every calibration prompt (validation prompt ``i``: ``seed + 1000 + i``).
    target_density: instead of an error budget, the effective density over the whole run (dense
        warm-ups at 1) to reach with the least error: for comparing with a uniform pattern at equal cost.
    orders: token orders the search may give a head (:mod:`vdit_accel.orders`; short forms):
        every pattern is scored in each static order (``raster``, ``tiled``; each costs one profiling
        pass), and each dynamic order (``semantic:top_p=0.9``, ...) is one more candidate of its own,
        charged its block density plus its per-call plan and moves
        (:func:`vdit_accel.orders.overhead.order_overhead`: measured on the search's GPU and cached).
    phases: step ranges with a pattern each (2: early / late; 1: one pattern per head for the run).
    min_psnr: a target: every validation video at least this PSNR (dB) against its dense one (and no
        caption check regressing). The search then verifies and tunes end to end (:mod:`.targets`).
    attention_speedup: a target: the run's self-attention time, dense over accelerated (measured on a
        GPU; the cost model's expectation on a CPU).
    max_probes: how many solve-and-generate probes the tuning may spend (each generates the
        calibration prompts once).
    """

    budget: float = 0.05
    mode: str = "global"
    steps: list[int] | None = None
    dense_warmup_steps: int | None = None
    block_size: int = 128
    sample_blocks: int = 8
    mass_stride: int = 0
    seed: int = 0
    target_density: float | None = None
    orders: tuple[str, ...] = ("raster", "tiled")
    phases: int = 2
    min_psnr: float | None = None
    attention_speedup: float | None = None
    max_probes: int = 12

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
        if self.phases < 1:
            raise ValueError(f"phases must be >= 1, got {self.phases}")
        if self.min_psnr is not None and not self.min_psnr > 0:
            raise ValueError(f"min_psnr must be > 0 dB, got {self.min_psnr}")
        if self.attention_speedup is not None and not self.attention_speedup >= 1:
            raise ValueError(f"attention_speedup must be >= 1, got {self.attention_speedup}")
        if self.targets is not None and (self.target_density is not None or self.mode != "global"):
            raise ValueError("min_psnr / attention_speedup tune the global solve: leave out target_density and mode")
        if self.max_probes < 1:
            raise ValueError(f"max_probes must be >= 1, got {self.max_probes}")

    @property
    def targets(self):
        from .targets import Targets

        if self.min_psnr is None and self.attention_speedup is None:
            return None
        return Targets(self.min_psnr, self.attention_speedup)

    def profiling(self) -> dict:
        """The fields that change what is profiled (a saved state is resumable across the others)."""
        return {k: getattr(self, k) for k in ("steps", "block_size", "sample_blocks", "mass_stride", "seed", "orders")}


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
    validation_prompts: list[str] | None = None,
    check: Callable | None = None,
    verifier=None,
) -> Strategy:
    """Search a strategy for ``pipe`` (a diffusers pipeline; its ``transformer``).

    ``call_kwargs`` go to every ``pipe(...)`` call (size, steps, ...); ``num_inference_steps`` sets the
    step count the schedule refers to. ``cost_model``: default measured on the GPU (cached), else
    FLOP-proportional. With targets (``config.min_psnr`` / ``attention_speedup``): ``validation_prompts``
    are the held-out prompts (default: the calibration prompts with other seeds), ``check`` the caption
    check (``check(video, prompt) -> bool | None``), ``verifier`` a :class:`~.verify.Verifier` to use
    instead of one over ``pipe`` (tests). Under ``torch.distributed`` (``torchrun``) each rank profiles
    ``prompts[rank::world]``; every rank returns the same strategy.
    """
    config = config or SearchConfig()
    call_kwargs = dict(call_kwargs or {})
    if not prompts:
        raise ValueError("give at least one calibration prompt")
    t0 = time.perf_counter()
    n_steps = int(call_kwargs.get("num_inference_steps", 50))
    grid, num_layers, num_heads, stats, columns, representative, density = _profile(
        pipe, prompts, config, call_kwargs, state_dir, progress)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    transformer = pipe.transformer
    head_dim = int(transformer.config.attention_head_dim)
    device = next(transformer.parameters()).device
    if cost_model is None:
        cost_model = cost_model_for(grid, num_heads, head_dim, config.block_size, device)
    problem = _problem(stats, columns, density, grid, num_layers, num_heads, n_steps, config, cost_model, device)
    writer = _Writer(problem, columns, representative, density, config, grid, transformer, cost_model, prompts, call_kwargs)
    if config.targets is None:  # (every rank solves the same summed stats)
        return writer.strategy(_solve(problem, config), t0)
    strategy = None
    if not distributed or torch.distributed.get_rank() == 0:
        schedule, meta = _tune(pipe, prompts, validation_prompts, check, verifier, config, call_kwargs, problem, writer,
                               progress)
        strategy = writer.strategy(schedule, t0, meta)
    if distributed:  # rank 0 verified: its strategy for every rank
        box = [strategy.to_dict() if strategy is not None else None]
        torch.distributed.broadcast_object_list(box, src=0)
        strategy = Strategy.from_dict(box[0])
    return strategy


def _profile(pipe, prompts, config: SearchConfig, call_kwargs: dict, state_dir, progress):
    """Profile every prompt of this rank (resuming a saved state). Returns ``(grid, layers, heads, stats
    per (layer, step) summed over ranks, columns, representative column per column, density [L, H, C])``."""
    from vdit_accel.grid import VideoGrid
    from vdit_accel.pipelines import patch, patch_state, unpatch

    n_steps = int(call_kwargs.get("num_inference_steps", 50))
    steps = sorted(set(config.steps if config.steps is not None else range(n_steps)))
    if not steps or steps[0] < 0 or steps[-1] >= n_steps:
        raise ValueError(f"steps {steps} must lie in [0, {n_steps - 1}] (num_inference_steps={n_steps})")
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    world = torch.distributed.get_world_size() if distributed else 1
    transformer = pipe.transformer
    fingerprint = hashlib.sha256(json.dumps(
        [type(transformer).__name__, transformer.config.num_layers if hasattr(transformer.config, "num_layers") else 0,
         config.profiling(), {k: v for k, v in call_kwargs.items() if isinstance(v, (int, float, str))}, rank, world],
        sort_keys=True, default=str).encode()).hexdigest()[:16]
    state_path = Path(state_dir) / f"rank{rank}" if state_dir else None
    state = _State.load(state_path, fingerprint) if state_path else _State(fingerprint)

    patch(pipe, Strategy.dense(), block_size=config.block_size)
    pstate = patch_state(transformer)
    profiler: HeadProfiler | None = None
    wanted = set(steps)

    def observe(layer, step, q, k, v):
        nonlocal profiler
        if step not in wanted:
            return
        grid = pstate.call_grid or pstate.grid  # the tokens of this very call (text included)
        if profiler is None:
            profiler = HeadProfiler(candidate_patterns(grid, block=config.block_size), config.block_size,
                                    config.sample_blocks, config.mass_stride, stats=state.stats,
                                    orders=list(config.orders))
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
            pipe(prompt=prompt, **{**call_kwargs, "output_type": "latent"},
                 generator=torch.Generator("cpu").manual_seed(config.seed))
            g = pstate.call_grid or pstate.grid
            state.grid = (g.t, g.h, g.w, g.text_len, g.text_at)
            state.done.append(prompt)
            if state_path:
                state.save(state_path)
            progress(f"[rank {rank}] prompt {i + 1}/{len(mine)} profiled in {time.perf_counter() - t_prompt:.1f} s: {prompt!r}")
    finally:
        unpatch(pipe)

    if state.grid is None and not distributed:
        raise RuntimeError("no attention call was profiled: check `steps` against num_inference_steps")
    num_layers, num_heads = len(pstate.layers), pstate.num_heads
    grid_t = [list(state.grid) if state.grid else None]
    if distributed:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, grid_t[0])
        grid_t = [g for g in gathered if g]
    grid = VideoGrid(*grid_t[0])
    candidates = candidate_patterns(grid, block=config.block_size)
    device = next(transformer.parameters()).device
    if profiler is None or profiler.candidates != candidates:  # (resumed, or another rank profiled)
        profiler = HeadProfiler(candidates, config.block_size, orders=list(config.orders))
    columns = profiler.columns()  # (pattern, order) per stats column
    stats = state.stats
    if distributed:
        stats = _allreduce(stats, [(l, s) for l in range(num_layers) for s in steps], (num_heads, len(columns)))
    representative, static_density = profiler.column_info(grid, device)  # the observer's masks, if cached
    density = static_density.double().expand(num_layers, num_heads, -1).clone()  # [L, H, C]
    for l in range(num_layers):
        total = LayerStats.zeros(num_heads, len(columns))
        for (layer, _), st in stats.items():
            if layer == l:
                total.add(st)
        measured = total.mean_density()  # data-chosen (dynamic) masks: measured per head
        if measured is not None:
            density[l] = torch.where(static_density.isnan(), measured, density[l])
    if density.isnan().any():
        raise RuntimeError("the search state has no measured densities for the dynamic orders; rerun without --state-dir")
    stats = {key: st for key, st in stats.items() if key[1] in wanted}
    return grid, num_layers, num_heads, stats, columns, representative, density


def _problem(stats, columns, density, grid, num_layers, num_heads, n_steps, config, cost_model, device) -> ScheduleProblem:
    """The profiled errors at every step (interpolated where not profiled) and each column's costs."""
    skip = [i for i, (p, _) in enumerate(columns) if p.kind == "skip"]
    # A step counts as profiled where every layer was observed; the others are interpolated.
    profiled = sorted(s for s in {s for (_, s) in stats}
                      if all((l, s) in stats and float(stats[(l, s)].count) > 0 for l in range(num_layers)))
    if not profiled:
        raise RuntimeError("no step was profiled in every layer: check `steps` against num_inference_steps")
    per_step = [torch.stack([stats[(l, s)].error(skip) for l in range(num_layers)]) for s in profiled]
    error = interpolate_steps(profiled, torch.stack(per_step), n_steps)  # [N, L, H, C]
    overhead = torch.tensor([order_overhead(o, grid.seq_len, device) for _, o in columns], dtype=torch.float64)
    equivalent = density + overhead  # dense-attention units
    cost = cost_model.head_cost(equivalent, num_heads)
    return ScheduleProblem(error, cost, equivalent, float(cost_model.head_cost(torch.tensor(1.0), num_heads)),
                           phases=config.phases)


def _solve(problem: ScheduleProblem, config: SearchConfig) -> Schedule:
    warm = config.dense_warmup_steps or 0
    if config.mode == "per_head":
        return solve_per_head(problem, config.budget, warm)
    if config.target_density is not None:
        return solve(problem, mean_density=config.target_density, min_warmup=warm)
    return solve(problem, mean_error=config.budget, min_warmup=warm)


def _tune(pipe, prompts, validation_prompts, check, verifier, config, call_kwargs, problem: ScheduleProblem,
          writer: "_Writer", progress):
    """Solve, verify end to end, adjust (:func:`.targets.tune`); the schedule and what was measured."""
    from .targets import tune
    from .verify import Verifier, jobs_for

    validation = list(validation_prompts) if validation_prompts else list(prompts)
    jobs = jobs_for(list(prompts), validation, config.seed)
    verifier = verifier or Verifier(pipe, call_kwargs, config.block_size, check, progress)
    cache: dict = {}

    def strategy_of(sched: Schedule) -> Strategy:
        key = (sched.warmup, sched.boundaries, tuple(sched.choice.flatten().tolist()))
        if key not in cache:
            cache[key] = writer.strategy(sched)
        return cache[key]

    def solve_at(c, w, dense):
        return solve(problem, mean_cost=c, min_warmup=max(w, config.dense_warmup_steps or 0), dense_layers=dense)

    def measure(sched, split):
        return verifier.measure(strategy_of(sched), [j for j in jobs if split == "all" or j.split == split])

    def info(sched):
        acc = strategy_of(sched).search["accounting"]
        return acc["expected_attention_speedup"], acc["effective_density"]

    on_gpu = next(pipe.transformer.parameters()).device.type == "cuda"
    out = tune(solve_at, measure, config.targets, problem.num_steps, info=info, on_gpu=on_gpu,
               max_probes=config.max_probes, progress=progress)
    final = out.final
    meta = {"verification": {
        "targets": config.targets.to_json(), "holds": out.holds, "verdict": out.verdict,
        "calibration_prompts": [{"prompt": j.prompt, "seed": j.seed} for j in jobs if j.split == "calibration"],
        "validation_prompts": [{"prompt": j.prompt, "seed": j.seed} for j in jobs if j.split == "validation"],
        "calibration": final.summary("calibration") if final else {},
        "validation": final.summary("validation") if final else {},
        **(final.speedups() if final else {}),
        "speed_note": None if on_gpu else ("timed on a CPU, where sparse attention runs PyTorch's reference path "
                                           "(no work skipped): the measured ratios are not the kernels'; the "
                                           "expected speed-up is the cost model's"),
        "rows": final.rows if final else [],
        "probes": [p.to_json() for p in out.probes],
        "generations": verifier.generations,
    }}
    schedule = out.candidate if out.candidate is not None else solve(problem, mean_cost=1.0)
    return schedule, meta


class _Writer:
    """Turns schedules into strategy files (the run's context held once)."""

    def __init__(self, problem: ScheduleProblem, columns, representative, density, config: SearchConfig, grid,
                 transformer, cost_model: CostModel, prompts, call_kwargs):
        from .accounting import HeadDensity

        self.problem, self.columns, self.density, self.config, self.grid = problem, columns, density, config, grid
        self.representative = torch.tensor(representative)
        self.num_layers, self.num_heads = density.shape[:2]
        self.cost_model, self.prompts, self.call_kwargs = cost_model, list(prompts), call_kwargs
        self.head_dim = int(transformer.config.attention_head_dim)
        self.model = {"class": type(transformer).__name__, "num_layers": self.num_layers, "num_heads": self.num_heads,
                      "head_dim": self.head_dim}
        self.head_density = HeadDensity(grid, config.block_size)
        self.dense_col = next(i for i, (pt, o) in enumerate(columns) if pt.kind == "dense" and o is None)

    def strategy(self, schedule: Schedule, t0: float | None = None, meta_extra: dict | None = None) -> Strategy:
        """The schedule as a strategy: warm-ups, a phase per step range whose heads differ, per-head stats,
        the accounting and the search's metadata (``t0``: when the search began, for its time)."""
        n_steps, L = self.problem.num_steps, self.num_layers
        choice = self.representative[schedule.choice]  # [P, L, H]
        warm = list(schedule.warmup)
        ranges = schedule.ranges
        for l in range(L):
            # A range that the layer's warm-up covers never runs: it shows the next range's heads instead.
            for p in range(len(ranges) - 2, -1, -1):
                if warm[l] >= ranges[p][1]:
                    choice[p, l] = choice[p + 1, l]
            if warm[l] >= n_steps:  # dense throughout: listed as dense
                choice[:, l] = self.dense_col
        per_range = [self._heads(choice[p], ranges[p], warm) for p in range(len(ranges))]
        phases, last = [], per_range[0][0]
        for (a, _), (rows, stats) in list(zip(ranges, per_range))[1:]:
            if rows != last:
                phases.append((a, rows, stats))
                last = rows
        counts: dict = {}
        for rows in [per_range[0][0]] + [r for _, r, _ in phases]:
            for h in (h for row in rows for h in row):  # the default order: the most common static one
                if not h.dynamic:  # (a tiled default permutes the hidden states once per forward)
                    counts[h.order] = counts.get(h.order, 0) + 1
        default = HeadSpec(order=max(counts, key=counts.get) if counts else None)
        w0 = min(warm)
        strategy = Strategy(default=default, layers=per_range[0][0], head_stats=per_range[0][1], dense_warmup_steps=w0,
                            layer_warmup_steps=tuple(warm) if any(w != w0 for w in warm) else None,
                            phases=tuple(Phase(b, default, rows, stats) for b, rows, stats in phases), model=self.model)
        acc = account(strategy, self.grid, n_steps, block_size=self.config.block_size, cost_model=self.cost_model,
                      head_dim=self.head_dim, density=self.head_density)
        if acc.dense_throughout:  # no pattern of it ever runs: said as such, listed as such
            strategy = Strategy(model=self.model)
        return dataclasses.replace(strategy, search={**self._meta(schedule, acc, warm, ranges, t0), **(meta_extra or {})})

    def _heads(self, cols: torch.Tensor, span: tuple[int, int], warm: list[int]):
        """One range's head specs and stats (error: mean over the range's steps the layer runs sparse)."""
        rows, stats = [], []
        for l in range(self.num_layers):
            live = list(range(max(span[0], warm[l]), span[1]))
            row, st = [], []
            for h in range(self.num_heads):
                c = int(cols[l, h])
                err = float(self.problem.error[live, l, h, c].mean()) if live else 0.0
                row.append(HeadSpec(*self.columns[c]))
                st.append({"error": round(err, 6), "density": round(float(self.density[l, h, c]), 6)})
            rows.append(row)
            stats.append(st)
        return rows, stats

    def _meta(self, schedule: Schedule, acc, warm, ranges, t0) -> dict:
        from vdit_accel._version import __version__
        import diffusers

        config, grid, n_steps = self.config, self.grid, self.problem.num_steps
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        meta = {
            "prompts": self.prompts,
            "profiled_steps": sorted(set(config.steps if config.steps is not None else range(n_steps))),
            "num_inference_steps": n_steps,
            "call": {k: v for k, v in self.call_kwargs.items() if isinstance(v, (int, float, str)) and k != "output_type"},
            "budget": config.budget, "mode": config.mode, "target_density": config.target_density,
            "phases": config.phases, "block_size": config.block_size,
            "grid": [grid.t, grid.h, grid.w, grid.text_len, grid.text_at],
            "world_size": torch.distributed.get_world_size() if dist else 1,
            "candidates": len(self.columns), "orders": list(config.orders),
            "cost_model": {"source": self.cost_model.source, "fixed_ms": self.cost_model.fixed_ms,
                           "per_density_ms": self.cost_model.per_density_ms},
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "vdit_accel": __version__},
            "warmup_per_layer": warm, "step_ranges": [list(r) for r in ranges],
            "mean_error": round(schedule.error, 6), "error_per_step": [round(x, 6) for x in schedule.per_step_error],
            "accounting": acc.to_json(), "summary": acc.line(),
        }
        if t0 is not None:
            meta["seconds"] = round(time.perf_counter() - t0, 2)
        return meta
