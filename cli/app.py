"""The ``vdit-accel`` command line: thin commands over the library."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Faster video diffusion transformers.")

_USER_ERRORS = (ValueError, NotImplementedError, FileNotFoundError, OSError, RuntimeError)


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


class _StepTimer:
    """Wall time of a transformer's forward calls (synchronising CUDA around each)."""

    def __init__(self, transformers):
        import torch

        self._torch = torch
        self.seconds = 0.0
        self.calls = 0
        self._t0 = 0.0
        self._handles = []
        for tr in transformers:
            self._handles.append(tr.register_forward_pre_hook(self._pre))
            self._handles.append(tr.register_forward_hook(self._post))

    def _sync(self):
        if self._torch.cuda.is_available():
            self._torch.cuda.synchronize()

    def _pre(self, *_):
        self._sync()
        self._t0 = time.perf_counter()

    def _post(self, *_):
        self._sync()
        self.seconds += time.perf_counter() - self._t0
        self.calls += 1

    def remove(self):
        for h in self._handles:
            h.remove()


def _default_model() -> str:
    """The built-in model a command uses without ``--model``: the trained tiny Wan where its weights are
    installed, else the random-weight tiny Wan (said on stderr)."""
    from vdit_accel.pipelines import trained

    if trained.weights_available():
        return "wan-trained"
    typer.echo(f"no trained weights in {trained.WEIGHTS_DIR}: using the random-weight tiny Wan", err=True)
    return "wan"


def _builtin(model: Optional[str]) -> bool:
    from vdit_accel.pipelines.tiny import TINY_FAMILIES, TRAINED_FAMILIES

    return model in TINY_FAMILIES + TRAINED_FAMILIES


def _load_pipeline(model: Optional[str], device: str, dtype_name: str):
    """``(pipe, defaults)`` of a built-in model (a tiny family name) or a diffusers directory / hub id."""
    import torch

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype_name]
    if _builtin(model):
        from vdit_accel.pipelines import build_tiny_pipeline, tiny_defaults

        return build_tiny_pipeline(model, dtype=dtype).to(device), tiny_defaults(model)
    from diffusers import DiffusionPipeline

    from vdit_accel.pipelines.tiny import TinyDefaults

    try:
        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    except Exception as e:  # diffusers raises many kinds here; report them on one line
        raise ValueError(f"could not load a diffusers pipeline from {model!r}: {type(e).__name__}: {e}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), TinyDefaults(height=480, width=832, frames=81, steps=50, max_sequence_length=512)


@app.command()
def generate(
    prompt: str = typer.Option("a red circle moving left on a blue background", help="Text prompt."),
    model: Optional[str] = typer.Option(None, help="A built-in model (see `vdit-accel models`) or a diffusers pipeline directory or "
                                        "hub id; default: the trained tiny Wan, 'wan-trained'."),
    large: bool = typer.Option(False, "--large", help="The built-in model's large size (wan-trained: 17x256x256, 5,120 video "
                               "tokens, where sparsity matters) instead of its quick default."),
    strategy: Optional[str] = typer.Option(None, help="Strategy file (.json), 'dense', or a uniform pattern such as 'window3d:t=1,h=2,w=2' "
                                           "(default: that pattern; 'dense' with a semantic or segment --order)."),
    order: Optional[str] = typer.Option(None, help="Token order for every head, overriding the strategy's: raster, tiled, semantic "
                                        "or segment, with parameters in short form ('semantic:top_p=0.9,refresh=4')."),
    frames: Optional[int] = typer.Option(None, help="Number of frames (4k+1)."),
    height: Optional[int] = typer.Option(None, help="Height in pixels (multiple of 16)."),
    width: Optional[int] = typer.Option(None, help="Width in pixels (multiple of 16)."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps."),
    seed: int = typer.Option(0, help="Random seed (the same for the dense and the accelerated run)."),
    dense_warmup_steps: Optional[int] = typer.Option(None, help="Override the strategy's dense warm-up steps."),
    block_size: int = typer.Option(128, help="Tokens per block of the sparse masks."),
    quant: Optional[str] = typer.Option(None, help="Quantized attention for every head: fp8, int8 or int4; 'all' runs each "
                                        "mode after the unquantized one and reports its PSNR against dense."),
    compare: bool = typer.Option(True, help="Also run dense (unpatched) with the same seed and report the difference."),
    device: Optional[str] = typer.Option(None, help="cuda or cpu (default: cuda if available)."),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16 (default: bfloat16 on cuda, float32 on cpu)."),
    out: Path = typer.Option(Path("out/video.mp4"), help="Where to write the accelerated video; the report goes beside it (.json)."),
):
    """Generate a video with accelerated attention; report speed and PSNR against dense."""
    try:
        import torch

        import vdit_accel
        from vdit_accel.pipelines import patch_state
        from vdit_accel.video import psnr, write_mp4

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or ("bfloat16" if device == "cuda" else "float32")
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
        from vdit_accel.quant import QUANT_MODES

        if quant is not None and quant != "all" and quant not in QUANT_MODES:
            raise ValueError(f"--quant must be one of {', '.join(QUANT_MODES)} or all, got {quant!r}")
        from vdit_accel.orders import is_dynamic, parse_order

        order_spec = parse_order(order) if order is not None else None
        if strategy is None:  # semantic and segment choose their own key blocks: their pattern is dense
            strategy = "dense" if is_dynamic(order_spec) else "window3d:t=1,h=2,w=2"
        strat = vdit_accel.Strategy.from_spec(strategy, dense_warmup_steps,
                                              quant=quant if quant in QUANT_MODES else None, order=order)
        if out.suffix != ".mp4":
            raise ValueError(f"--out must end in .mp4, got {str(out)!r}")
        model = model or _default_model()
        if large and model != "wan-trained":
            raise ValueError(f"--large is the size of the built-in 'wan-trained' model; with {model!r} give "
                             "--frames, --height and --width")
        pipe, defaults = _load_pipeline(model, device, dtype)
        if large:
            from vdit_accel.pipelines import trained

            frames = frames or trained.LARGE_SIZE["num_frames"]
            height, width = height or trained.LARGE_SIZE["height"], width or trained.LARGE_SIZE["width"]
        frames = frames or defaults.frames
        height, width, steps = height or defaults.height, width or defaults.width, steps or defaults.steps
        if frames < 1 or (frames - 1) % 4:
            raise ValueError(f"--frames must be 4k+1 (1, 5, 9, 13, 17, ...), got {frames}")
        if height < 16 or width < 16 or height % 16 or width % 16:
            raise ValueError(f"--height and --width must be positive multiples of 16, got {height}x{width}")
        if steps < 1:
            raise ValueError(f"--steps must be >= 1, got {steps}")

        transformers = [t for t in (getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None)) if t is not None]
        call = dict(prompt=prompt, height=height, width=width, num_frames=frames, num_inference_steps=steps, output_type="np")
        if _builtin(model):
            call.update(max_sequence_length=defaults.max_sequence_length, **defaults.call_kwargs)

        def run():
            # Untimed one-step warm-up: kernel compilation, library set-up, allocator, first touch.
            pipe(**{**call, "num_inference_steps": 1}, generator=torch.Generator(device="cpu").manual_seed(seed))
            timer = _StepTimer(transformers)
            try:
                t0 = time.perf_counter()
                video = pipe(**call, generator=torch.Generator(device="cpu").manual_seed(seed)).frames[0]
                total = time.perf_counter() - t0
            finally:
                timer.remove()
            return video, {"transformer_s_per_step": timer.seconds / steps, "transformer_calls": timer.calls, "total_s": total}

        report: dict = {"model": model, "prompt": prompt, "seed": seed,
                        "frames": frames, "height": height, "width": width, "steps": steps, "device": device, "dtype": dtype}
        dense_video = None
        if compare:
            typer.echo(f"dense run ({steps} steps) ...", err=True)
            dense_video, report["dense"] = run()
        vdit_accel.patch(pipe, strat, block_size=block_size)
        typer.echo(f"accelerated run ({strat.describe()}) ...", err=True)
        video, report["accelerated"] = run()
        state = patch_state(transformers[0])
        grid = state.grid
        report["strategy"] = strat.describe()
        report["grid"] = {"t": grid.t, "h": grid.h, "w": grid.w, "tokens": grid.seq_len}
        report["block_size"] = block_size
        report["density"] = state.mean_density(grid)
        vdit_accel.unpatch(pipe)
        if dense_video is not None:
            report["psnr_db"] = psnr(video, dense_video)
            report["speedup"] = report["dense"]["transformer_s_per_step"] / report["accelerated"]["transformer_s_per_step"]
        if quant == "all":  # the same strategy once per quantized mode
            report["quant"] = {}
            for mode in QUANT_MODES:
                vdit_accel.patch(pipe, strat, block_size=block_size, quant=mode)
                typer.echo(f"accelerated run, {mode} ...", err=True)
                qvideo, timing = run()
                vdit_accel.unpatch(pipe)
                entry = {**timing, "psnr_db_vs_unquantized": psnr(qvideo, video)}
                if dense_video is not None:
                    entry["psnr_db"] = psnr(qvideo, dense_video)
                    entry["speedup"] = report["dense"]["transformer_s_per_step"] / timing["transformer_s_per_step"]
                report["quant"][mode] = entry
        write_mp4(out, video)
        report["video"] = str(out)
        report_path = out.with_suffix(".json")
        report_path.write_text(json.dumps(report, indent=1) + "\n")
    except _USER_ERRORS as e:
        _fail(str(e))
    summary = {k: report[k] for k in ("video", "density", "psnr_db", "speedup") if k in report}
    if "quant" in report:
        summary["quant_psnr_db"] = {m: round(e.get("psnr_db", e["psnr_db_vs_unquantized"]), 2) for m, e in report["quant"].items()}
    typer.echo(json.dumps(summary))
    typer.echo(f"report: {report_path}", err=True)


@app.command()
def inspect(
    strategy: str = typer.Argument(..., help="Strategy file (.json), 'dense' or a uniform pattern."),
    frames: int = typer.Option(21, help="Latent frames of the grid to measure density on."),
    height: int = typer.Option(30, help="Latent rows (after patchification)."),
    width: int = typer.Option(52, help="Latent columns (after patchification)."),
    heads: int = typer.Option(12, help="Heads per layer (for a uniform strategy)."),
    block_size: int = typer.Option(128, help="Tokens per block."),
):
    """Describe a strategy and its block density on a token grid (default: Wan 480x832, 81 frames)."""
    try:
        from vdit_accel import Strategy, VideoGrid
        from vdit_accel.patterns import build_block_mask, format_pattern

        st = Strategy.from_spec(strategy)
        grid = VideoGrid(frames, height, width)
        n_layers = len(st.layers) if st.layers is not None else 1
        n_heads = len(st.layers[0]) if st.layers is not None else heads
        typer.echo(st.describe())
        densities = []
        for layer in range(n_layers):
            pats = [h.pattern for h in st.layer_heads(layer, n_heads)]
            d = build_block_mask(pats, grid, block_size, block_size).density_per_head().tolist()
            densities += d
            if st.layers is not None:
                typer.echo(f"layer {layer:3d}: " + "  ".join(f"{format_pattern(p)} ({x:.2f})" for p, x in zip(pats, d)))
        typer.echo(f"grid {grid.t}x{grid.h}x{grid.w} = {grid.seq_len} tokens, blocks of {block_size}: "
                   f"mean density {sum(densities) / len(densities):.3f}")
    except _USER_ERRORS as e:
        _fail(str(e))


@app.command()
def search(
    prompts: Optional[Path] = typer.Option(None, help="Text file with one calibration prompt per line (default: two built-in prompts)."),
    model: Optional[str] = typer.Option(None, help="A built-in model or a diffusers pipeline directory or hub id; default: 'wan-trained'."),
    budget: float = typer.Option(0.05, help="Error budget: relative L2 error of a head's output against dense."),
    mode: str = typer.Option("global", help="global: one budget over all heads (Lagrangian); per_head: every head within budget."),
    target_density: Optional[float] = typer.Option(None, help="Instead of a budget: the mean block density to reach with least error."),
    steps: Optional[str] = typer.Option(None, help="Comma-separated denoising steps to profile (default: first, middle, last)."),
    num_inference_steps: Optional[int] = typer.Option(None, help="Denoising steps of each calibration run."),
    frames: Optional[int] = typer.Option(None, help="Frames (4k+1)."),
    height: Optional[int] = typer.Option(None, help="Height in pixels."),
    width: Optional[int] = typer.Option(None, help="Width in pixels."),
    dense_warmup_steps: Optional[int] = typer.Option(None, help="Fix the dense warm-up (default: chosen by the search)."),
    block_size: int = typer.Option(128, help="Block size the strategy will run with."),
    sample_blocks: int = typer.Option(8, help="Query blocks per call on which candidate errors are measured."),
    state_dir: Optional[Path] = typer.Option(None, help="Save progress here after every prompt; rerun to resume."),
    device: Optional[str] = typer.Option(None, help="cuda or cpu (default: cuda if available)."),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16."),
    out: Path = typer.Option(Path("strategy.json"), help="Where to write the strategy file."),
):
    """Search a per-layer, per-head sparse strategy on calibration prompts (torchrun for several GPUs)."""
    import os

    try:
        import torch

        from vdit_accel.sparsity_search import SearchConfig
        from vdit_accel.sparsity_search import search as run_search

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and device != "cpu" else "gloo"
            torch.distributed.init_process_group(backend)
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        rank = torch.distributed.get_rank() if world > 1 else 0
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
        if prompts is None:
            prompt_list = ["a red circle moving left on a blue background", "two squares bouncing off the walls"]
        elif not prompts.is_file():
            raise ValueError(f"--prompts {str(prompts)!r} is not a file")
        else:
            prompt_list = [l.strip() for l in prompts.read_text().splitlines() if l.strip()]
        step_list = [int(x) for x in steps.split(",")] if steps else None
        config = SearchConfig(budget=budget, mode=mode, steps=step_list, dense_warmup_steps=dense_warmup_steps,
                              block_size=block_size, sample_blocks=sample_blocks, target_density=target_density)
        model = model or _default_model()
        pipe, defaults = _load_pipeline(model, device, dtype)
        call = dict(height=height or defaults.height, width=width or defaults.width,
                    num_frames=frames or defaults.frames, num_inference_steps=num_inference_steps or defaults.steps,
                    output_type="latent")
        if _builtin(model):
            call.update(max_sequence_length=defaults.max_sequence_length, **defaults.call_kwargs)
        strategy = run_search(pipe, prompt_list, config, call_kwargs=call, state_dir=state_dir,
                              progress=lambda msg: typer.echo(msg, err=True))
        if rank == 0:
            strategy.save(out)
            typer.echo(json.dumps({"out": str(out), "strategy": strategy.describe(),
                                   "mean_density": strategy.search["mean_density"],
                                   "mean_error": strategy.search["mean_error"], "seconds": strategy.search["seconds"]}))
    except _USER_ERRORS as e:
        _fail(str(e))
    finally:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@app.command()
def models():
    """List the supported model families: their diffusers transformer classes and tiny offline pipelines."""
    from vdit_accel.pipelines import supported_models

    for family, classes in supported_models():
        typer.echo(f"{family:<18} {', '.join(classes)}")


@app.command()
def version():
    """Print versions of vdit-accel and the libraries it runs on."""
    import torch

    import vdit_accel

    parts = [f"vdit-accel {vdit_accel.__version__}", f"torch {torch.__version__}"]
    for mod in ("triton", "diffusers"):
        try:
            parts.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            parts.append(f"{mod} (not installed)")
    typer.echo(", ".join(parts))


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: real-size steps on a GPU, tiny ones on the CPU.")
app.add_typer(bench_app, name="bench")


@bench_app.command("pipeline")
def bench_pipeline(
    shape: list[str] = typer.Option(..., "--shape", help="Shape to run (repeat for several): wan2.1-1.3b-480p, wan2.1-1.3b-720p, wan2.1-14b-720p, hunyuan-720p; tiny-wan, tiny-hunyuan on the CPU."),
    variants: list[str] = typer.Option(None, "--variants", help="Rows to run, comma-separated or repeated (default: all): noop-attention, dense-cudnn, ours-dense, ours-window3d-0.15, flex-window3d-0.15, ours-window3d-0.15-fp8, ours-window3d-0.15-tiled, flex-window3d-0.15-tiled, ours-window3d-0.15-tiled-fp8, ours-searched."),
    reps: Optional[int] = typer.Option(None, help="Timed forwards per row (default: per shape, 1 to 3)."),
    searched_strategy: Optional[Path] = typer.Option(None, help="Strategy file from `vdit-accel search` for the ours-searched row (skipped when it does not fit the model)."),
    block_size: int = typer.Option(128, help="Tokens per block of the sparse masks."),
    device: Optional[str] = typer.Option(None, help="cuda or cpu (default: cuda if available)."),
    git_sha: Optional[str] = typer.Option(None, help="Commit recorded in the result file (default: the package version)."),
    out_dir: Path = typer.Option(Path("."), help="Where e2e-<gpu>-<yyyymmdd>.json is written."),
):
    """Time one denoising step (one transformer forward, batch 1) of real-config transformers with
    random weights: diffusers' attention, ours dense and sparse, FlexAttention on the same masks."""
    from vdit_accel.cli.bench import VARIANTS, markdown_table, run_pipeline_bench

    chosen = [v.strip() for item in (variants or []) for v in item.split(",") if v.strip()] or list(VARIANTS)
    command = " ".join(["vdit-accel bench pipeline", *(f"--shape {s}" for s in shape), "--variants " + ",".join(chosen)]
                       + [f"--{k.replace('_', '-')} {v}" for k, v in (("reps", reps), ("searched_strategy", searched_strategy),
                                                                       ("block_size", block_size), ("device", device),
                                                                       ("out_dir", out_dir)) if v is not None])
    try:
        doc, path = run_pipeline_bench(shape, chosen, reps, out_dir, device, block_size, searched_strategy,
                                       command=command, git_sha=git_sha, log=lambda m: typer.echo(m, err=True))
    except _USER_ERRORS as e:
        _fail(str(e))
    typer.echo(markdown_table(doc))
    typer.echo(f"wrote {path}", err=True)


def main():
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
