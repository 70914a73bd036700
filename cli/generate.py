"""``vdit-accel generate``: one prompt, generated dense and accelerated; the difference measured and shown.

Everything that can be checked is checked before the first denoising step (:func:`prepare`): the
options, the output files, the strategy (parsed, then validated against the model's layers, heads and
head_dim, and its block masks built on the run's token grid during a one-step warm-up). Then the dense
run (the unpatched pipeline: diffusers' own attention), the accelerated run, and the outputs, all
beside ``--out``::

    out/video.mp4          the accelerated video
    out/video-dense.mp4    the dense one (same prompt and seed)
    out/video-compare.mp4  dense | accelerated | amplified difference, side by side, labelled
    out/video-frames.png   six frames of each, one row per video
    out/video.json         the report

With ``--ulysses P`` (under ``torchrun --nproc-per-node P``) every run is spread over P processes by
Ulysses context parallelism (:mod:`vdit_accel.pipelines.parallel`; the dense run is diffusers' attention
parallelised the same way); every rank runs, rank 0 alone prints and writes the files.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .distributed import Ranks, check_ulysses_world
from .inputs import check_at_least, check_block_size, check_model, check_size, check_ulysses_size, check_writable, \
    default_model, load_pipeline, resolve_device_dtype, transformers_of

DEFAULT_PROMPT = "a red circle moving left on a blue background"
UNIFORM_DEFAULT = "window3d:t=1,h=2,w=2"
# The strategy a built-in model runs without --strategy: measured on that model to keep its videos
# (wan-trained: benchmarks/demo_strategy.py; wan-rich, once searched on a GPU: benchmarks/search_targets.py
# --ship; the figures are in the file's "search" metadata). A model without its file runs the uniform default.
_STRATEGIES_DIR = Path(__file__).resolve().parent / "strategies"
SHIPPED_STRATEGIES = {name: _STRATEGIES_DIR / f"{name}.json" for name in ("wan-trained", "wan-rich")
                      if (_STRATEGIES_DIR / f"{name}.json").is_file()}
DIFF_GAIN = 8.0

# Where to see the kernels' speed-up: a committed GPU result (tests/cli check these figures against it).
GPU_COMMAND = "vdit-accel bench pipeline --shape wan2.1-1.3b-480p"
GPU_RESULT = {"file": "benchmarks/results/e2e-nvidia-h100-80gb-hbm3-20261122.json", "gpu": "NVIDIA H100 80GB HBM3",
              "shape": "wan2.1-1.3b-480p", "impl": "ours-window3d-0.15", "dense_impl": "dense-cudnn",
              "dense_ms": 646.27, "ms": 291.44, "density": 0.1412}


@dataclass
class GenerateOptions:
    """The command's options, as given (None: left out)."""

    prompt: str = DEFAULT_PROMPT
    model: str | None = None
    large: bool = False
    strategy: str | None = None
    order: str | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    seed: int = 0
    dense_warmup_steps: int | None = None
    block_size: int = 128
    quant: str | None = None
    compare: bool = True
    device: str | None = None
    dtype: str | None = None
    out: Path = Path("out/video.mp4")
    ulysses: int = 1


@dataclass(frozen=True)
class Outputs:
    """The files a run writes, named after ``--out``."""

    video: Path
    dense: Path | None
    compare: Path | None
    frames: Path
    report: Path

    @classmethod
    def beside(cls, out: Path, with_dense: bool) -> "Outputs":
        def sibling(tag: str, suffix: str) -> Path:
            return out.with_name(f"{out.stem}-{tag}{suffix}")

        return cls(video=out, dense=sibling("dense", ".mp4") if with_dense else None,
                   compare=sibling("compare", ".mp4") if with_dense else None,
                   frames=sibling("frames", ".png"), report=out.with_suffix(".json"))

    def files(self) -> list[Path]:
        return [p for p in (self.video, self.dense, self.compare, self.frames, self.report) if p is not None]


@dataclass
class Plan:
    """A checked job: what :func:`run` needs."""

    opts: GenerateOptions
    model: str
    device: str
    dtype: str
    strategy: object  # vdit_accel.Strategy
    strategy_source: str  # where the strategy came from, in words
    shipped: bool  # the model's shipped strategy (its measured figures are in its file)
    outputs: Outputs


def prepare(opts: GenerateOptions, say) -> Plan:
    """Check everything that needs no model; raise ``ValueError`` (one line, the fix in it)."""
    for option, value in (("--frames", opts.frames), ("--height", opts.height), ("--width", opts.width),
                          ("--steps", opts.steps)):
        check_at_least(option, value)
    check_at_least("--seed", opts.seed, 0)
    check_at_least("--dense-warmup-steps", opts.dense_warmup_steps, 0)
    check_block_size(opts.block_size)
    check_ulysses_world(opts.ulysses)
    device, dtype = resolve_device_dtype(opts.device, opts.dtype)
    from vdit_accel.quant import QUANT_MODES

    if opts.quant is not None and opts.quant != "all" and opts.quant not in QUANT_MODES:
        raise ValueError(f"--quant must be one of {', '.join(QUANT_MODES)} or all, got {opts.quant!r}")
    if opts.out.suffix != ".mp4":
        raise ValueError(f"--out must end in .mp4, got {str(opts.out)!r}")
    outputs = Outputs.beside(opts.out, opts.compare)
    check_writable("--out", opts.out, outputs.files())
    model = opts.model or default_model(say)
    check_model(model)
    if opts.large and model not in _trained_names():
        raise ValueError(f"--large is a size of the built-in trained models ({', '.join(_trained_names())}); "
                         f"with {model!r} give --frames, --height and --width")
    strategy, source, shipped = _strategy(opts, model)
    if opts.ulysses > 1 and any(h.dynamic for h in strategy.heads()):
        raise ValueError("semantic and segment token orders do not run under --ulysses; use raster or tiled")
    return Plan(opts, model, device, dtype, strategy, source, shipped, outputs)


def _strategy(opts: GenerateOptions, model: str):
    """``(Strategy, where it came from, whether it is the model's shipped one)``: ``--strategy``, else the
    model's shipped strategy, else the uniform default; ``--order`` / ``--dense-warmup-steps`` / ``--quant``
    applied."""
    import vdit_accel
    from vdit_accel.orders import is_dynamic, parse_order
    from vdit_accel.quant import QUANT_MODES

    order = parse_order(opts.order) if opts.order is not None else None
    spec, source, shipped = opts.strategy, f"--strategy {opts.strategy}", False
    if spec is None and is_dynamic(order):
        spec, source = "dense", "dense (a semantic or segment --order chooses its own key blocks)"
    elif spec is None and model in SHIPPED_STRATEGIES:
        spec, source = SHIPPED_STRATEGIES[model], f"shipped for {model} ({SHIPPED_STRATEGIES[model].name})"
        changed = [o for o, v in (("--dense-warmup-steps", opts.dense_warmup_steps), ("--quant", opts.quant),
                                  ("--order", opts.order)) if v is not None]
        shipped = not changed  # as measured; with overrides it is another strategy
        source += f", changed by {', '.join(changed)}" if changed else ""
    elif spec is None:
        spec, source = UNIFORM_DEFAULT, f"uniform default {UNIFORM_DEFAULT}"
    quant = opts.quant if opts.quant in QUANT_MODES else None
    return vdit_accel.Strategy.from_spec(spec, opts.dense_warmup_steps, quant=quant, order=opts.order), source, shipped


# -- the runs ------------------------------------------------------------------------------------


class _StepTimer:
    """Wall time of a transformer's forward calls (synchronising CUDA around each)."""

    def __init__(self, transformers):
        import torch

        self._cuda = torch.cuda.is_available()
        self._sync = torch.cuda.synchronize
        self.seconds, self.calls, self._t0 = 0.0, 0, 0.0
        self._handles = [h for tr in transformers
                         for h in (tr.register_forward_pre_hook(self._pre), tr.register_forward_hook(self._post))]

    def _pre(self, *_):
        if self._cuda:
            self._sync()
        self._t0 = time.perf_counter()

    def _post(self, *_):
        if self._cuda:
            self._sync()
        self.seconds += time.perf_counter() - self._t0
        self.calls += 1

    def remove(self):
        for h in self._handles:
            h.remove()


class _Runner:
    """Runs the pipeline: untimed one-step warm-ups, timed runs with a progress bar."""

    def __init__(self, pipe, call: dict, seed: int, console):
        from . import progress

        self.pipe, self.call, self.seed, self.console = pipe, call, seed, console
        self.steps = call["num_inference_steps"]
        self.transformers = transformers_of(pipe)
        self._progress = progress
        self._callback = progress.takes_step_callback(pipe)

    def _generator(self):
        import torch

        return torch.Generator(device="cpu").manual_seed(self.seed)

    def warm_up(self):
        """One untimed step (not decoded): kernel compilation, library set-up, allocator, first touch."""
        self.pipe(**{**self.call, "num_inference_steps": 1, "output_type": "latent"}, generator=self._generator())

    def checked_warm_up(self, strategy, block_size: int):
        """The untimed step patched with ``strategy`` with every step sparse (so its kernels compile
        here, not in the timed run): :func:`vdit_accel.patch` validates the strategy against the model,
        the step reads the token grid, and every layer's block masks are built on it. Returns ``(grid,
        mean block density)``; the pipeline is left unpatched."""
        import vdit_accel
        from vdit_accel.pipelines import patch_state

        vdit_accel.patch(self.pipe, vdit_accel.Strategy.from_spec(strategy, dense_warmup_steps=0), block_size=block_size)
        try:
            self.warm_up()
            state = patch_state(self.transformers[0])
            return state.grid, state.mean_density(state.grid)
        finally:
            vdit_accel.unpatch(self.pipe)

    def timed(self, label: str, strategy=None, block_size: int = 128):
        """``(frames [T, H, W, 3] float in [0, 1], timing)`` of one whole generation, with a bar; patched
        with ``strategy`` if given (unpatched after)."""
        import vdit_accel

        if strategy is not None:
            vdit_accel.patch(self.pipe, strategy, block_size=block_size)
        timer = _StepTimer(self.transformers)
        bars = self._progress.bars("steps", self.console)
        try:
            with bars:
                task = bars.add_task(label, total=self.steps if self._callback else None)
                extra = {"callback_on_step_end": self._progress.step_callback(bars, task)} if self._callback else {}
                t0 = time.perf_counter()
                video = self.pipe(**self.call, **extra, generator=self._generator()).frames[0]
                total = time.perf_counter() - t0
                bars.update(task, completed=self.steps, total=self.steps)
        finally:
            timer.remove()
            if strategy is not None:
                vdit_accel.unpatch(self.pipe)
        return video, {"transformer_s_per_step": timer.seconds / self.steps, "transformer_calls": timer.calls,
                       "total_s": total}


def run(plan: Plan, console, ranks: Ranks = Ranks()) -> dict:
    """Load the model, finish the checks, run dense and accelerated, write the outputs; the report.
    Under ``--ulysses P``: on ``ranks.device``, the pipeline parallelised; files from rank 0 only."""
    import vdit_accel
    from vdit_accel.pipelines.toy import trained
    from vdit_accel.quant import QUANT_MODES
    from vdit_accel.video import comparison_frames, difference, frame_strip, psnr, ssim, write_mp4, write_png

    opts, strat = plan.opts, plan.strategy
    pipe, defaults = load_pipeline(plan.model, ranks.device or plan.device, plan.dtype)
    frames, height, width = opts.frames, opts.height, opts.width
    if opts.large:
        large = trained.model_spec(plan.model).large
        frames, height, width = frames or large["num_frames"], height or large["height"], width or large["width"]
    frames, height, width = frames or defaults.frames, height or defaults.height, width or defaults.width
    steps = opts.steps or defaults.steps
    check_size(pipe, frames, height, width)
    check_ulysses_size(pipe, opts.ulysses, frames, height, width)
    if strat.dense_warmup_steps >= steps:
        raise ValueError(f"the strategy runs its first {strat.dense_warmup_steps} steps dense but the run has {steps}: "
                         "nothing would be accelerated (lower --dense-warmup-steps or raise --steps)")
    call = dict(prompt=opts.prompt, height=height, width=width, num_frames=frames, num_inference_steps=steps,
                output_type="np")
    if plan.model in _builtin_names():
        call.update(max_sequence_length=defaults.max_sequence_length, **defaults.call_kwargs)
    if opts.ulysses > 1:
        from vdit_accel.pipelines.parallel import enable_ulysses

        enable_ulysses(pipe, opts.ulysses)
    runner = _Runner(pipe, call, opts.seed, console)

    grid, density = runner.checked_warm_up(strat, opts.block_size)  # before any long run
    report: dict = {"model": plan.model, "prompt": opts.prompt, "seed": opts.seed, "frames": frames, "height": height,
                    "width": width, "steps": steps, "device": plan.device, "dtype": plan.dtype, "ulysses": opts.ulysses,
                    "grid": {"t": grid.t, "h": grid.h, "w": grid.w, "tokens": grid.seq_len},
                    "strategy": strat.describe(), "strategy_source": plan.strategy_source,
                    "block_size": opts.block_size, "density": density,
                    "density_with_warmup": _effective_density(strat, grid, steps, opts.block_size)}
    say = console.print
    say(f"{plan.model}: '{opts.prompt}', {frames}x{height}x{width} ({grid.t}x{grid.h}x{grid.w} = {grid.seq_len:,} tokens), "
        f"{steps} steps, seed {opts.seed}, {plan.device} {plan.dtype}")
    say(f"strategy: {plan.strategy_source}: {strat.describe()}; block density {density:.2f} on the sparse steps, "
        f"{report['density_with_warmup']:.2f} over the run")
    if plan.shipped:
        report["strategy_measured"] = measured_summary(strat, [frames, height, width], steps)
        say("  " + report["strategy_measured"])

    dense_video = None
    if opts.compare:
        runner.warm_up()
        dense_video, report["dense"] = runner.timed("dense")
    video, report["accelerated"] = runner.timed("accelerated", strat, opts.block_size)
    if dense_video is not None:
        report["psnr_db"] = psnr(video, dense_video)
        report["ssim"] = ssim(video, dense_video)
        report["speedup"] = report["dense"]["transformer_s_per_step"] / report["accelerated"]["transformer_s_per_step"]
    if opts.quant == "all":  # the same strategy once per quantized mode
        report["quant"] = {}
        for mode in QUANT_MODES:
            qstrat = vdit_accel.Strategy.from_spec(strat, quant=mode)
            runner.checked_warm_up(qstrat, opts.block_size)
            qvideo, timing = runner.timed(mode, qstrat, opts.block_size)
            entry = {**timing, "psnr_db_vs_unquantized": psnr(qvideo, video)}
            if dense_video is not None:
                entry["psnr_db"] = psnr(qvideo, dense_video)
                entry["speedup"] = report["dense"]["transformer_s_per_step"] / timing["transformer_s_per_step"]
            report["quant"][mode] = entry
    caption_check = _caption_check(plan.model, opts.prompt, {"dense": dense_video, "accelerated": video})
    if caption_check:
        report["caption_check"] = caption_check
    report["notes"] = notes(report, plan)
    if not ranks.speaks:
        return report

    out = plan.outputs
    out.video.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(out.video, video)
    report["outputs"] = {"accelerated": str(out.video)}
    if dense_video is not None:
        write_mp4(out.dense, dense_video)
        write_mp4(out.compare, comparison_frames(dense_video, video, DIFF_GAIN))
        write_png(out.frames, frame_strip({"dense": dense_video, "accelerated": video,
                                           f"|diff| x{DIFF_GAIN:g}": difference(dense_video, video, DIFF_GAIN)}))
        report["outputs"].update(dense=str(out.dense), compare=str(out.compare))
    else:
        write_png(out.frames, frame_strip({"accelerated": video}))
    report["outputs"].update(frames=str(out.frames), report=str(out.report))
    report["video"] = str(out.video)
    out.report.write_text(json.dumps(report, indent=1, default=_json_default) + "\n")

    if dense_video is not None:
        say(f"PSNR {report['psnr_db']:.1f} dB, SSIM {report['ssim']:.3f} against the dense video"
            + (f"; caption check: dense {_ok(caption_check['dense'])}, accelerated {_ok(caption_check['accelerated'])}"
               if caption_check else ""))
    for note in report["notes"]:
        say(note)
    say("wrote " + ", ".join(report["outputs"].values()))
    return report


def _effective_density(strategy, grid, steps: int, block_size: int) -> float:
    """The block density over the whole run: every step's, dense warm-ups (global and per layer) at 1, each
    step range at its patterns' (the search's accounting)."""
    from vdit_accel.sparsity_search.accounting import account

    return account(strategy, grid, steps, block_size=block_size).effective_density


def _trained_names() -> tuple[str, ...]:
    from vdit_accel.pipelines.tiny import TRAINED_FAMILIES

    return TRAINED_FAMILIES


def _builtin_names():
    from .inputs import builtin_models

    return builtin_models()


def _ok(result: dict) -> str:
    return "reads as the caption" if result["ok"] else "does not read as the caption"


def _json_default(x):
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def _caption_check(model: str, prompt: str, videos: dict) -> dict | None:
    """The toy-video caption check (:func:`vdit_accel.pipelines.toy.caption_check`) of each video, where
    the model is one trained on toy videos and the prompt is one of their captions."""
    if model not in _trained_names():
        return None
    from vdit_accel.pipelines import toy

    checks = {name: toy.caption_check(v, prompt) for name, v in videos.items() if v is not None}
    return None if any(c is None for c in checks.values()) else checks


def measured_summary(strategy, size: list[int], steps: int) -> str:
    """What a shipped strategy's file says was measured (``search.measured``, written from
    ``benchmarks/demo_strategy.py``'s result), and whether this run is at that size."""
    m = (strategy.search or {}).get("measured")
    if not m:
        return "not measured on this model"
    n = m["prompts"]
    at = "" if list(size) == m["size"] and steps == m["steps"] else "; this run's size or steps differ: not measured here"
    return (f"measured on this model at {'x'.join(map(str, m['size']))}, {m['steps']} steps ({m['file']}): "
            f"PSNR {m['psnr_db_mean']:.1f} dB mean, {m['psnr_db_min']:.1f} min against dense over {n} prompts; "
            f"caption check {m['same_verdict_as_dense']} of {n} the same as dense's{at}")


def gpu_figure() -> str:
    r = GPU_RESULT
    return (f"one Wan2.1-1.3B 480x832 step {r['dense_ms']:.0f} -> {r['ms']:.0f} ms ({r['dense_ms'] / r['ms']:.2f}x) "
            f"at {r['density']:.2f} block density, {r['gpu']}, random weights, speed only ({r['file']})")


def notes(report: dict, plan: Plan) -> list[str]:
    """What the run shows and does not, in plain words (also in the report)."""
    out = []
    speed = report.get("speedup")
    tiny = plan.model in _builtin_names()
    if plan.device.startswith("cpu"):
        out.append(
            ("speed-up {:.2f}x: ".format(speed) if speed is not None else "")
            + "on a CPU the sparse attention runs PyTorch's reference path (SDPA with the block mask expanded to "
            "every token pair), which skips no work, so this run shows the videos, not the kernels' speed. "
            f"The speed-up is a GPU result: `{GPU_COMMAND}` on a CUDA GPU; committed: {gpu_figure()}.")
    elif tiny:
        out.append(
            ("speed-up {:.2f}x: ".format(speed) if speed is not None else "")
            + f"at {report['grid']['tokens']:,} tokens attention is a small part of this tiny model's step, so "
            "sparsity has little to save here; the kernels pay at real sizes: "
            f"`{GPU_COMMAND}`; committed: {gpu_figure()}.")
    if report["density"] >= 1.0 and not plan.strategy.uses_orders():
        out.append("the strategy is dense everywhere: the accelerated run is our dense kernel, no sparsity.")
    return out
