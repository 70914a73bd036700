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
   rungs above (calibration and validation prompts together), at the chosen warm-up, then at longer ones
   below the cheapest found; 3 of ``max_probes`` are kept for this;
4. and if nothing under the cap (``1 / attention_speedup``) holds: **the most sensitive layers dense**
   (by their share of the solution's proxy error), one, then two.

With ``attention_speedup`` alone the solve runs at its cap and is verified (its PSNR recorded). On a GPU
the speed-up is the measured ratio of self-attention time; if it falls short, the cap shrinks by the
shortfall and the tuning runs again. On a CPU, whose attention runs the reference path, the expected
(cost-model) speed-up stands in, and the record says so. Every probe is recorded.

:func:`tune_ladder` is steps 1-4 over any ladder of candidates (the benchmarks tune uniform patterns with it,
so that they meet a target the same way the search does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

COST_LADDER = (0.03, 0.045, 0.065, 0.09, 0.13, 0.18, 0.25, 0.35, 0.5, 0.7, 1.0)
RESERVED = 3  # probes kept back from the calibration bisection for the held-out prompts


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
    """One candidate (a schedule, or a strategy) verified on one set of prompts. ``rung``: where on the
    ladder it is (a cost cap, or a uniform pattern's configuration)."""

    rung: Any
    min_warmup: int
    dense_layers: tuple[int, ...]
    candidate: Any
    split: str
    measurement: object  # verify.Measurement
    expected_speedup: float
    effective_density: float
    holds: bool

    def to_json(self) -> dict:
        m = self.measurement
        rung = round(self.rung, 4) if isinstance(self.rung, float) else str(self.rung)
        return {"rung": rung, "min_warmup": self.min_warmup, "dense_layers": list(self.dense_layers),
                "split": self.split, "effective_density": round(self.effective_density, 4),
                "expected_attention_speedup": round(self.expected_speedup, 3), **m.summary(), **m.speedups(),
                "holds": self.holds}


@dataclass
class Outcome:
    candidate: Any
    holds: bool
    verdict: str
    probes: list[Probe] = field(default_factory=list)
    final: object | None = None  # the chosen candidate's Measurement on calibration + validation


class Prober:
    """Makes, measures and records probes: ``make(rung, min_warmup, dense_layers) -> candidate``,
    ``measure(candidate, split) -> Measurement`` (``split``: calibration, validation or all),
    ``info(candidate) -> (expected speed-up, effective density)``."""

    def __init__(self, make: Callable, measure: Callable, info: Callable, targets: Targets, on_gpu: bool,
                 progress: Callable[[str], None] = print):
        self.make, self.measure, self.info, self.targets, self.on_gpu = make, measure, info, targets, on_gpu
        self.progress = progress
        self.probes: list[Probe] = []

    def speed_ok(self, expected: float, m) -> bool:
        if self.targets.attention_speedup is None:
            return True
        got = m.speedups()["attention_speedup_measured"] if self.on_gpu else expected
        return got >= self.targets.attention_speedup * (1 - 1e-9)

    def __call__(self, rung, w: int, dense: tuple[int, ...], split: str) -> Probe:
        cand = self.make(rung, w, dense)
        m = self.measure(cand, split)
        expected, density = self.info(cand)
        quality = self.targets.min_psnr is None or m.meets(self.targets.min_psnr, None if split == "all" else split)
        p = Probe(rung, w, dense, cand, split, m, expected, density, quality and self.speed_ok(expected, m))
        self.probes.append(p)
        s = m.summary()
        rung_text = f"cost cap {rung:.3f}" if isinstance(rung, float) else str(rung)
        self.progress(f"probe {len(self.probes)}: {rung_text}, warm-up >= {w}, dense layers {list(dense)} -> effective "
                      f"density {density:.3f}, {split} PSNR min {s.get('psnr_db_min', float('nan')):.2f} dB: "
                      f"{'holds' if p.holds else 'misses'}")
        return p


def cheapest_holding(rungs: list, test: Callable[[Any], Probe], left: Callable[[], bool]) -> Probe | None:
    """The cheapest rung (``rungs`` ascending in cost) whose probe holds, by bisection (holding taken to be
    monotone along the ladder); the top rung is probed only when nothing below it held. None when none
    held (or no probe was left)."""
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


def tune_ladder(probe: Prober, rungs_at: Callable, above: Callable, warmups: list[int], budget: int, *,
                fallback: Callable | None = None) -> Outcome:
    """Steps 1-4 of the module docstring over a ladder. ``rungs_at(w, best)``: the rungs to try with warm-up
    ``w`` (ascending in cost, cheaper than the best probe so far, which may be None); ``above(best)``: the
    rungs costlier than ``best``'s at its warm-up; ``fallback(last probe)``: ``(rung, dense_layers)`` pairs
    to try when nothing held (the most sensitive layers dense), or None."""
    start = len(probe.probes)

    def left(reserve: int = 0) -> bool:
        return len(probe.probes) - start < budget - reserve

    best: Probe | None = None
    for w in warmups:  # 1. the budget, 2. warm-up steps
        found = cheapest_holding(rungs_at(w, best), lambda r: probe(r, w, (), "calibration"), lambda: left(RESERVED))
        best = found or best
    if best is not None:  # 3. the held-out prompts: where they miss, up the ladder (calibration and validation)
        p = probe(best.rung, best.min_warmup, (), "validation")
        if p.holds:
            return Outcome(p.candidate, True, f"holds on the validation prompts at {_rung(best)}, warm-up >= "
                                              f"{best.min_warmup}", final=best.measurement + p.measurement)
        # Up from the calibration's choice: at its warm-up first, then at longer ones (they tend to carry
        # to other prompts better), each only below the cheapest found so far.
        found = None
        for w in [best.min_warmup] + [w for w in warmups if w > best.min_warmup]:
            rungs = [r for r in above(best) if r in rungs_at(w, found)]
            p = cheapest_holding(rungs, lambda r: probe(r, w, (), "all"), left)
            found = p or found
        if found is not None:
            return Outcome(found.candidate, True, f"holds on the validation prompts at {_rung(found)}, warm-up >= "
                                                  f"{found.min_warmup}", final=found.measurement)
    elif fallback is not None and len(probe.probes) > start:  # 4. the most sensitive layers dense
        for rung, dense in fallback(probe.probes[-1]):
            if not left():
                break
            p = probe(rung, 0, dense, "all")
            if p.holds:
                return Outcome(p.candidate, True, f"holds on the validation prompts at {_rung(p)} with layers "
                                                  f"{list(dense)} dense", final=p.measurement)
    tried = probe.probes[start:]
    if not tried:
        return Outcome(None, False, "cannot: no probe ran (max_probes)")

    def worst(p: Probe) -> float:  # judged on the held-out prompts where they were measured
        s = p.measurement.summary("validation") or {"psnr_db_min": -1e9 + p.measurement.summary()["psnr_db_min"]}
        return s["psnr_db_min"]

    closest = max(tried, key=lambda p: (worst(p), -p.effective_density))
    why = f"within {budget} probes (more with max_probes)" if not left() else "under the cap"
    return Outcome(closest.candidate, False,
                   f"cannot: no candidate kept the target on every prompt {why}; kept the closest probed "
                   f"({_rung(closest)}, {closest.split} PSNR min "
                   f"{closest.measurement.summary().get('psnr_db_min', float('nan')):.2f} dB)", final=closest.measurement)


def _rung(p: Probe) -> str:
    return f"cost cap {p.rung:.3f}" if isinstance(p.rung, float) else str(p.rung)


def warmup_ladder(num_steps: int) -> list[int]:
    """Dense warm-ups tried: 0 to half the run, in eighths."""
    return sorted({round(k * num_steps / 8) for k in range(0, 5)})


def tune(solve_at: Callable, measure: Callable, targets: Targets, num_steps: int, *, info: Callable, on_gpu: bool,
         max_probes: int = 12, progress: Callable[[str], None] = print) -> Outcome:
    """Tune the search's solve as the module docstring says. ``solve_at(cost_cap, min_warmup, dense_layers)``
    -> a schedule; ``measure(schedule, split)`` -> a :class:`~.verify.Measurement`; ``info(schedule)`` ->
    (expected speed-up, effective density)."""
    probe = Prober(solve_at, measure, info, targets, on_gpu, progress)
    cap = 1.0 if targets.attention_speedup is None else 1.0 / targets.attention_speedup
    out = None
    for _ in range(3):
        if targets.min_psnr is None:  # a speed target alone: its cap, verified
            p = probe(cap, 0, (), "all")
            verdict = (f"holds: expected attention speed-up {p.expected_speedup:.2f}x at effective density "
                       f"{p.effective_density:.3f}" if p.holds else "does not hold: the speed-up at the cap falls short")
            out = Outcome(p.candidate, p.holds, verdict, final=p.measurement)
        else:
            ladder = sorted({c for c in COST_LADDER if c < cap} | {cap})

            def rungs_at(w, best):
                return [c for c in ladder if c > w / num_steps + 1e-9 and (best is None or c < best.rung)]

            def fallback(last):
                return [(cap, tuple(sorted(_sensitive_layers(last.candidate)[:k]))) for k in (1, 2)] if cap < 1.0 else []

            out = tune_ladder(probe, rungs_at, lambda best: [c for c in ladder if c > best.rung],
                              warmup_ladder(num_steps), max_probes - len(probe.probes), fallback=fallback)
        if out.holds or not on_gpu or targets.attention_speedup is None or out.final is None:
            break
        got = out.final.speedups()["attention_speedup_measured"]
        if got >= targets.attention_speedup or len(probe.probes) >= max_probes:
            break
        cap *= got / targets.attention_speedup  # the measured shortfall, taken off the cap
        progress(f"measured attention speed-up {got:.2f}x < {targets.attention_speedup:.2f}x: cost cap lowered to {cap:.3f}")
    out.probes = probe.probes
    return out


def _sensitive_layers(schedule) -> list[int]:
    """Layers by their share of the schedule's proxy error, largest first (ties: lower index)."""
    share = schedule.layer_error
    return sorted(range(len(share)), key=lambda l: (-share[l], l))
