"""Targets people state -- a video PSNR, an attention speed-up -- met by solving, verifying end to end
and adjusting.

The solve (:func:`~.schedule.solve`) minimises a proxy (per-call head errors) under a cost cap; what
people judge is the final video after the whole trajectory, so the cap is tuned on measured videos
(:class:`~.verify.Verifier`). The knobs, in this order:

1. **the budget**: the cost cap ``c`` (the run's attention cost as a fraction of dense), bisected over a
   geometric ladder for the cheapest ``c`` whose calibration videos keep ``min_psnr`` (every prompt,
   and no caption check regressing); the top of the ladder is probed only if nothing below it holds;
2. **warm-up steps**: the same bisection with every layer dense for at least ``W`` steps, for ``W``
   on a ladder of eighths of the run up to half, each only below the cheapest ``c`` found so far (a
   longer warm-up can buy more quality per cost than denser patterns: errors of early steps compound);
3. then the held-out **validation** prompts: if they miss the target, ``c`` is bisected again over the
   rungs above (calibration and validation prompts together); 3 of ``max_probes`` are kept for this;
4. and if nothing under the cap (``1 / attention_speedup``) holds: **the most sensitive layers dense**
   (by their share of the solution's proxy error), one, then two.

With ``attention_speedup`` alone the solve runs at its cap and is verified (its PSNR recorded). On a GPU
the speed-up is the measured ratio of self-attention time; if it falls short, the cap shrinks by the
shortfall and the tuning runs again. On a CPU, whose attention runs the reference path, the expected
(cost-model) speed-up stands in, and the record says so. Every probe is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .schedule import Schedule

COST_LADDER = (0.03, 0.045, 0.065, 0.09, 0.13, 0.18, 0.25, 0.35, 0.5, 0.7, 1.0)


@dataclass(frozen=True)
class Targets:
    """``min_psnr``: dB, every validation video against its dense one (and no caption regression);
    ``attention_speedup``: the run's self-attention time, dense over accelerated."""

    min_psnr: float | None = None
    attention_speedup: float | None = None

    def __post_init__(self):
        if self.min_psnr is None and self.attention_speedup is None:
            raise ValueError("give a target: min_psnr and/or attention_speedup")
        if self.attention_speedup is not None and not self.attention_speedup >= 1.0:
            raise ValueError(f"attention_speedup must be >= 1, got {self.attention_speedup}")

    def to_json(self) -> dict:
        return {"min_psnr": self.min_psnr, "attention_speedup": self.attention_speedup}


@dataclass
class Probe:
    """One solve verified on one set of prompts."""

    cost_cap: float
    min_warmup: int
    dense_layers: tuple[int, ...]
    schedule: Schedule
    split: str
    measurement: object  # verify.Measurement
    expected_speedup: float
    holds: bool

    def to_json(self) -> dict:
        m = self.measurement
        return {"cost_cap": round(self.cost_cap, 4), "min_warmup": self.min_warmup, "dense_layers": list(self.dense_layers),
                "split": self.split, "effective_density": round(self.schedule.density, 4),
                "expected_attention_speedup": round(self.expected_speedup, 3), **m.summary(), **m.speedups(),
                "holds": self.holds}


@dataclass
class Outcome:
    schedule: Schedule | None
    holds: bool
    verdict: str
    probes: list[Probe] = field(default_factory=list)
    final: object | None = None  # the chosen schedule's Measurement on calibration + validation


def tune(solve_at: Callable[..., Schedule], measure: Callable[[Schedule, str], object], targets: Targets,
         num_steps: int, *, expected_speedup: Callable[[Schedule], float], on_gpu: bool, max_probes: int = 12,
         progress: Callable[[str], None] = print) -> Outcome:
    """Tune as the module docstring says. ``solve_at(cost_cap, min_warmup, dense_layers)`` -> a schedule;
    ``measure(schedule, split)`` -> a :class:`~.verify.Measurement` (``split``: ``"calibration"``,
    ``"validation"`` or ``"all"``); ``expected_speedup(schedule)``: the cost model's."""
    probes: list[Probe] = []

    def probe(c: float, w: int, dense: tuple[int, ...], split: str) -> Probe:
        sched = solve_at(c, w, dense)
        m = measure(sched, split)
        exp = expected_speedup(sched)
        quality = targets.min_psnr is None or m.meets(targets.min_psnr, None if split == "all" else split)
        ok = quality and speed_ok(exp, m)
        p = Probe(c, w, dense, sched, split, m, exp, ok)
        probes.append(p)
        s = m.summary()
        progress(f"probe {len(probes)}: cost cap {c:.3f}, warm-up >= {w}, dense layers {list(dense)} -> effective density "
                 f"{sched.density:.3f}, {split} PSNR min {s.get('psnr_db_min', float('nan')):.2f} dB: "
                 f"{'holds' if ok else 'misses'}")
        return p

    def speed_ok(expected: float, m) -> bool:
        if targets.attention_speedup is None:
            return True
        got = m.speedups()["attention_speedup_measured"] if on_gpu else expected
        return got >= targets.attention_speedup * (1 - 1e-9)

    cap = 1.0 if targets.attention_speedup is None else 1.0 / targets.attention_speedup
    for attempt in range(3):
        out = _tune_under(cap, probe, targets, num_steps, max_probes - len(probes), probes)
        if out.holds or not on_gpu or targets.attention_speedup is None or out.schedule is None:
            break
        got = out.final.speedups()["attention_speedup_measured"]
        if got >= targets.attention_speedup:
            break
        cap *= got / targets.attention_speedup  # the measured shortfall, taken off the cap
        progress(f"measured attention speed-up {got:.2f}x < {targets.attention_speedup:.2f}x: cost cap lowered to {cap:.3f}")
    out.probes = probes
    return out


RESERVED = 3  # probes kept back from the calibration bisection for the held-out prompts


def _cheapest(rungs: list[float], test, left) -> "Probe | None":
    """The cheapest rung whose probe holds, by bisection (holding is taken to be monotone in the rung); the
    top rung is probed only when nothing below it held. None when none held (or no probe was left)."""
    lo, hi, best = -1, len(rungs) - 1, None
    while hi - lo > 1 and left():
        mid = (lo + hi) // 2
        p = test(rungs[mid])
        if p.holds:
            hi, best = mid, p
        else:
            lo = mid
    if best is None and rungs and left():
        p = test(rungs[hi])
        best = p if p.holds else None
    return best


def _tune_under(cap: float, probe, targets: Targets, num_steps: int, budget: int, probes: list) -> Outcome:
    start = len(probes)

    def left(reserve: int = 0) -> bool:
        return len(probes) - start < budget - reserve

    if targets.min_psnr is None:  # a speed target alone: its cap, verified
        p = probe(cap, 0, (), "all")
        verdict = (f"holds: expected attention speed-up {p.expected_speedup:.2f}x at effective density "
                   f"{p.schedule.density:.3f}" if p.holds else "does not hold: the speed-up at the cap falls short")
        return Outcome(p.schedule, p.holds, verdict, final=p.measurement)
    ladder = sorted({c for c in COST_LADDER if c < cap} | {cap})
    best: Probe | None = None
    for w in sorted({round(k * num_steps / 8) for k in range(0, 5)}):  # 1. the budget, 2. warm-up steps
        rungs = [c for c in ladder if c > w / num_steps + 1e-9 and (best is None or c < best.cost_cap)]
        found = _cheapest(rungs, lambda c: probe(c, w, (), "calibration"), lambda: left(RESERVED))
        best = found or best
    if best is not None:  # 3. the held-out prompts: where they miss, up the ladder (calibration and validation)
        p = probe(best.cost_cap, best.min_warmup, (), "validation")
        if p.holds:
            return Outcome(p.schedule, True, f"holds on the validation prompts at cost cap {best.cost_cap:.3f}, "
                                             f"warm-up >= {best.min_warmup}", final=best.measurement + p.measurement)
        above = [c for c in ladder if c > best.cost_cap]
        p = _cheapest(above, lambda c: probe(c, best.min_warmup, (), "all"), left)
        if p is not None:
            return Outcome(p.schedule, True, f"holds on the validation prompts at cost cap {p.cost_cap:.3f}, warm-up >= "
                                             f"{best.min_warmup}", final=p.measurement)
    elif cap < 1.0:  # 4. nothing held under a speed cap: the most sensitive layers dense (by their error at the cap)
        base = probes[-1].schedule if len(probes) > start else None
        for k in (1, 2):
            if base is None or not left():
                break
            dense = tuple(sorted(_sensitive_layers(base)[:k]))
            p = probe(cap, 0, dense, "all")
            if p.holds:
                return Outcome(p.schedule, True, f"holds on the validation prompts at cost cap {cap:.3f} with layers "
                                                 f"{list(dense)} dense", final=p.measurement)
    tried = probes[start:]
    if not tried:
        return Outcome(None, False, "cannot: no probe ran (max_probes)")
    def worst(p: Probe) -> float:  # judged on the held-out prompts where they were measured
        s = p.measurement.summary("validation") or {"psnr_db_min": -1e9 + p.measurement.summary()["psnr_db_min"]}
        return s["psnr_db_min"]

    closest = max(tried, key=lambda p: (worst(p), -p.cost_cap))
    why = (f"within {budget} probes (more with max_probes)" if not left() else f"under cost cap {cap:.3f}")
    return Outcome(closest.schedule, False,
                   f"cannot: no strategy kept the target on every prompt {why}; kept the closest probed "
                   f"(cost cap {closest.cost_cap:.3f}, {closest.split} PSNR min "
                   f"{closest.measurement.summary().get('psnr_db_min', float('nan')):.2f} dB)", final=closest.measurement)


def _sensitive_layers(schedule: Schedule) -> list[int]:
    """Layers by their share of the schedule's proxy error, largest first (ties: lower index)."""
    share = schedule.layer_error
    return sorted(range(len(share)), key=lambda l: (-share[l], l))
