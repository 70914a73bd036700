"""End-to-end verification: whole generations dense and accelerated, compared as people compare them.

For each job (a prompt, a seed, and whether it is a calibration or a held-out validation prompt) the
pipeline generates the decoded video twice with the same seed: dense (the unpatched pipeline,
diffusers' own attention; once per job, cached) and patched with the strategy. Measured per job:
PSNR and SSIM of the accelerated frames against the dense ones and, where the model has one, the
caption check of both videos (``check(video, prompt) -> bool``; for the trained toy models
:func:`vdit_accel.pipelines.toy.check_video`): a caption that the dense video passes and the accelerated one
fails is a regression. Timed per run: the self-attention modules (every patched layer's attention
module, projections included; CUDA events on a GPU) and the whole call. Before the first timed run of
a strategy an untimed one-step run compiles its kernels.

On a CPU the sparse attention runs PyTorch's reference path, which skips no work: the measured time
ratios there are not the kernels' and are reported as such (``device``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch


@dataclass(frozen=True)
class Job:
    prompt: str
    seed: int
    split: str  # "calibration" or "validation"


def jobs_for(calibration: list[str], validation: list[str], seed: int) -> list[Job]:
    """Calibration prompts with the search's seed, validation prompts with seeds ``seed + 1000 + i``."""
    return ([Job(p, seed, "calibration") for p in calibration]
            + [Job(p, seed + 1000 + i, "validation") for i, p in enumerate(validation)])


class _AttentionClock:
    """Time spent in the self-attention modules of the transformers while installed."""

    def __init__(self, modules: list[torch.nn.Module], cuda: bool):
        self.cuda, self.seconds = cuda, 0.0
        self._events: list = []
        self._t0 = 0.0
        self._hooks = [h for m in modules for h in (m.register_forward_pre_hook(self._pre),
                                                     m.register_forward_hook(self._post))]

    def _pre(self, *_):
        if self.cuda:
            self._events.append([torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)])
            self._events[-1][0].record()
        else:
            self._t0 = time.perf_counter()

    def _post(self, *_):
        if self.cuda:
            self._events[-1][1].record()
        else:
            self.seconds += time.perf_counter() - self._t0

    def stop(self) -> float:
        for h in self._hooks:
            h.remove()
        if self.cuda:
            torch.cuda.synchronize()
            self.seconds += sum(a.elapsed_time(b) for a, b in self._events) / 1e3
        return self.seconds


@dataclass
class Run:
    video: np.ndarray
    attention_s: float
    total_s: float


@dataclass
class Measurement:
    """One strategy verified on some jobs: per job its figures, and the time ratios over them."""

    rows: list[dict] = field(default_factory=list)
    dense_attention_s: float = 0.0
    attention_s: float = 0.0
    dense_total_s: float = 0.0
    total_s: float = 0.0
    device: str = "cpu"

    def __add__(self, other: "Measurement") -> "Measurement":
        """Both measurements' jobs and times together (one strategy measured in two goes)."""
        return Measurement(self.rows + other.rows, self.dense_attention_s + other.dense_attention_s,
                           self.attention_s + other.attention_s, self.dense_total_s + other.dense_total_s,
                           self.total_s + other.total_s, self.device)

    def split(self, name: str) -> list[dict]:
        return [r for r in self.rows if r["split"] == name]

    def summary(self, split: str | None = None) -> dict:
        rows = self.rows if split is None else self.split(split)
        if not rows:
            return {}
        p = [r["psnr_db"] for r in rows]
        out = {"prompts": len(rows), "psnr_db_min": round(min(p), 3), "psnr_db_mean": round(float(np.mean(p)), 3),
               "ssim_mean": round(float(np.mean([r["ssim"] for r in rows])), 4)}
        checked = [r for r in rows if r.get("check_dense") is not None]
        if checked:
            out["caption_regressions"] = sum(bool(r["check_dense"]) and not r["check_accelerated"] for r in checked)
            out["captions_dense"] = sum(bool(r["check_dense"]) for r in checked)
            out["captions_accelerated"] = sum(bool(r["check_accelerated"]) for r in checked)
        return out

    def speedups(self) -> dict:
        return {"attention_speedup_measured": round(self.dense_attention_s / max(self.attention_s, 1e-12), 4),
                "run_speedup_measured": round(self.dense_total_s / max(self.total_s, 1e-12), 4),
                "attention_s": round(self.attention_s, 3), "dense_attention_s": round(self.dense_attention_s, 3),
                "total_s": round(self.total_s, 3), "dense_total_s": round(self.dense_total_s, 3),
                "timed_on": self.device}

    def meets(self, min_psnr: float | None, split: str | None = None) -> bool:
        """Whether every job of ``split`` keeps ``min_psnr`` dB and no caption check regresses."""
        s = self.summary(split)
        if not s:
            return False
        return (min_psnr is None or s["psnr_db_min"] >= min_psnr) and not s.get("caption_regressions", 0)


def _psnr_for_json(x: float) -> float:
    return 999.0 if math.isinf(x) else round(float(x), 3)  # identical videos: JSON has no infinity


class Verifier:
    """Generates jobs dense (cached) and accelerated with a strategy, and measures them (module docstring).

    ``call_kwargs``: what every ``pipe(...)`` call gets (size, steps, guidance, ...); its ``output_type`` is
    replaced by ``"np"`` (decoded frames in [0, 1]). ``check``: the caption check, or None."""

    def __init__(self, pipe, call_kwargs: dict, block_size: int, check: Callable | None = None,
                 progress: Callable[[str], None] = print):
        from vdit_accel.pipelines import adapter_for

        self.pipe, self.block_size, self.check, self.progress = pipe, block_size, check, progress
        self.call = {**call_kwargs, "output_type": "np"}
        self.call.pop("callback_on_step_end", None)
        transformers = [t for t in (getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None)) if t is not None]
        self.modules = [attn for tr in transformers for _, attn in adapter_for(tr).layers(tr)]
        self.cuda = next(transformers[0].parameters()).device.type == "cuda"
        self._dense: dict[tuple[str, int], Run] = {}
        self._checks: dict[tuple[str, int], bool | None] = {}
        self.generations = 0

    def _run(self, job: Job) -> Run:
        clock = _AttentionClock(self.modules, self.cuda)
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            out = self.pipe(prompt=job.prompt, **self.call, generator=torch.Generator("cpu").manual_seed(job.seed))
            if self.cuda:
                torch.cuda.synchronize()
        finally:
            attention = clock.stop()
        self.generations += 1
        return Run(np.asarray(out.frames[0], np.float32), attention, time.perf_counter() - t0)

    def _warm_up(self, strategy=None) -> None:
        """One untimed step (kernels compiled, masks built), every step sparse."""
        from vdit_accel.pipelines import patch, unpatch
        from vdit_accel.strategy import Strategy

        call = {**self.call, "num_inference_steps": 1, "output_type": "latent"}
        if strategy is not None:
            patch(self.pipe, Strategy.from_spec(strategy, dense_warmup_steps=0), block_size=self.block_size)
        try:
            self.pipe(prompt="warm-up", **call, generator=torch.Generator("cpu").manual_seed(0))
        finally:
            if strategy is not None:
                unpatch(self.pipe)

    def dense(self, job: Job) -> Run:
        key = (job.prompt, job.seed)
        if key not in self._dense:
            if not self._dense:
                self._warm_up()
            self._dense[key] = self._run(job)
            self._checks[key] = None if self.check is None else self.check(self._dense[key].video, job.prompt)
        return self._dense[key]

    def measure(self, strategy, jobs: list[Job]) -> Measurement:
        """``strategy`` (a :class:`~vdit_accel.Strategy`) on ``jobs``, against their dense videos."""
        from vdit_accel.pipelines import patch, unpatch
        from vdit_accel.video import psnr, ssim

        dense = [self.dense(j) for j in jobs]
        self._warm_up(strategy)
        out = Measurement(device="cuda" if self.cuda else "cpu")
        patch(self.pipe, strategy, block_size=self.block_size)
        try:
            runs = [self._run(j) for j in jobs]
        finally:
            unpatch(self.pipe)
        for job, d, r in zip(jobs, dense, runs):
            row = {"prompt": job.prompt, "seed": job.seed, "split": job.split,
                   "psnr_db": _psnr_for_json(psnr(r.video, d.video)), "ssim": round(ssim(r.video, d.video), 5)}
            dense_ok = self._checks[(job.prompt, job.seed)]
            if dense_ok is not None:
                row["check_dense"], row["check_accelerated"] = bool(dense_ok), bool(self.check(r.video, job.prompt))
            out.rows.append(row)
            out.dense_attention_s += d.attention_s
            out.attention_s += r.attention_s
            out.dense_total_s += d.total_s
            out.total_s += r.total_s
        return out


def caption_check_for(model: str | None) -> Callable | None:
    """The caption check of a built-in trained toy model (None for any other model): a prompt that is
    not one of the toy captions is not checked (None)."""
    from vdit_accel.pipelines.tiny import TRAINED_FAMILIES

    if model not in TRAINED_FAMILIES:
        return None
    from vdit_accel.pipelines import toy

    def check(video: np.ndarray, prompt: str):
        result = toy.caption_check(video, prompt)
        return None if result is None else bool(result["ok"])

    return check
