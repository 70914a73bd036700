"""The ``vdit-accel`` command line: thin commands over the library.

Start-up imports only typer: torch, diffusers and the library load inside the commands, so ``--help``
and ``version`` answer at once. Errors are one line (``error: ...``) with exit status 2.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

from .generate import DEFAULT_PROMPT  # light: the module imports torch only inside its functions

try:  # typer >= 0.26 carries its own click, whose exceptions derive from TyperException
    from typer import TyperException as _ParseError
except ImportError:  # earlier typer runs on click
    from click.exceptions import ClickException as _ParseError

_USER_ERRORS = (ValueError, NotImplementedError, FileNotFoundError, OSError, RuntimeError)
_METAVARS = {int: "INT", float: "FLOAT", str: "TEXT", Path: "PATH"}


class _Command(TyperCommand):
    """Conventional help: positional arguments in UPPER case, a value label only on options that take a
    value (flags have none), the usage line ``[OPTIONS] ARG``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for p in self.params:
            if isinstance(p, TyperArgument):
                p.metavar = p.metavar or p.name.upper()
                p.display_type_rich = lambda ctx: None
            elif not getattr(p, "is_flag", False) and p.metavar is None and p.name != "help":
                annotation = getattr(getattr(p, "type_descriptor", None), "annotation", None)
                p.metavar = _METAVARS.get(annotation, "VALUE")

    def collect_usage_pieces(self, ctx):
        args = [p.metavar if p.required else f"[{p.metavar}]" for p in self.params if isinstance(p, TyperArgument)]
        return [self.options_metavar, *args]


class _Group(TyperGroup):
    """Usage errors (an unknown option, a value that is not a number) on one line, exit status 2."""

    def main(self, args=None, prog_name=None, **extra):
        try:
            rv = super().main(args, prog_name or "vdit-accel", standalone_mode=False, **extra)
        except _ParseError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # a bare command: its help, as asked for
                typer.echo(e.format_message(), err=True)
                sys.exit(getattr(e, "exit_code", 2))
            ctx = getattr(e, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            typer.echo(f"error: {e.format_message()}{hint}", err=True)
            sys.exit(getattr(e, "exit_code", 2))
        except typer.Abort:
            typer.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Faster video diffusion transformers.")


def _command(*args, **kwargs):
    return app.command(*args, cls=_Command, **kwargs)


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _say(msg: str) -> None:
    typer.echo(msg, err=True)


def _deprecated(command: str, old: str, new: str, value, current):
    """The value of ``new`` given under its deprecated spelling ``old`` (said on stderr)."""
    if value is None:
        return current
    _say(f"warning: {command} {old} is deprecated, use {new} (same meaning)")
    return value


@_command()
def generate(
    prompt: str = typer.Option(DEFAULT_PROMPT, metavar="TEXT", help="Text prompt."),
    model: Optional[str] = typer.Option(None, metavar="NAME|PATH", show_default="wan-trained",
                                        help="A built-in model (see `vdit-accel models`) or a diffusers pipeline folder or hub id."),
    large: bool = typer.Option(False, "--large", help="The built-in model's large size (wan-trained: 17x256x256, 5,120 video "
                               "tokens, where sparsity matters) instead of its quick default."),
    strategy: Optional[str] = typer.Option(None, metavar="SPEC", show_default="the model's shipped strategy, else window3d:t=1,h=2,w=2",
                                           help="Strategy file (.json), 'dense', or a uniform pattern such as "
                                           "'window3d:t=1,h=2,w=2' ('dense' with a semantic or segment --order)."),
    order: Optional[str] = typer.Option(None, metavar="ORDER", help="Token order for every head, overriding the strategy's: "
                                        "raster, tiled, semantic or segment, with parameters in short form "
                                        "('semantic:top_p=0.9,refresh=4')."),
    frames: Optional[int] = typer.Option(None, metavar="N", show_default="the model's; 17 for wan-trained",
                                         help="Number of video frames (4k+1 for Wan)."),
    height: Optional[int] = typer.Option(None, metavar="PIXELS", show_default="the model's; 128 for wan-trained",
                                         help="Height in pixels (a multiple of one token: 8 for wan-trained)."),
    width: Optional[int] = typer.Option(None, metavar="PIXELS", show_default="the model's; 128 for wan-trained",
                                        help="Width in pixels."),
    steps: Optional[int] = typer.Option(None, metavar="N", show_default="the model's; 40 for wan-trained",
                                        help="Denoising steps."),
    seed: int = typer.Option(0, metavar="INT", help="Random seed (the same for the dense and the accelerated run)."),
    dense_warmup_steps: Optional[int] = typer.Option(None, metavar="N", show_default="the strategy's",
                                                     help="Run the first N denoising steps dense."),
    block_size: int = typer.Option(128, metavar="TOKENS", help="Tokens per block of the sparse masks."),
    quant: Optional[str] = typer.Option(None, metavar="MODE", help="Quantized attention for every head: fp8, int8 or int4; "
                                        "'all' runs each mode after the unquantized one and reports its PSNR against dense."),
    compare: bool = typer.Option(True, help="Also run dense (unpatched) with the same seed: its video, a side-by-side "
                                 "comparison and the PSNR."),
    device: Optional[str] = typer.Option(None, metavar="DEVICE", show_default="cuda if available, else cpu", help="cuda or cpu."),
    dtype: Optional[str] = typer.Option(None, metavar="DTYPE", show_default="bfloat16 on cuda, float32 on cpu",
                                        help="float32, bfloat16 or float16."),
    out: Path = typer.Option(Path("out/video.mp4"), metavar="PATH",
                             help="The accelerated video; beside it NAME-dense.mp4, NAME-compare.mp4 (dense | accelerated | "
                             "difference), NAME-frames.png and the report NAME.json."),
):
    """Generate a video dense and accelerated; write both, a comparison and a report of speed and PSNR."""
    from .generate import GenerateOptions, prepare, run

    opts = GenerateOptions(prompt=prompt, model=model, large=large, strategy=strategy, order=order, frames=frames,
                           height=height, width=width, steps=steps, seed=seed, dense_warmup_steps=dense_warmup_steps,
                           block_size=block_size, quant=quant, compare=compare, device=device, dtype=dtype, out=out)
    try:
        from rich.console import Console

        console = Console(stderr=True, markup=False, highlight=False, soft_wrap=True)
        plan = prepare(opts, console.print)
        report = run(plan, console)
    except _USER_ERRORS as e:
        _fail(str(e))
    summary = {k: report[k] for k in ("video", "density", "psnr_db", "speedup") if k in report}
    if "quant" in report:
        summary["quant_psnr_db"] = {m: round(e.get("psnr_db", e["psnr_db_vs_unquantized"]), 2) for m, e in report["quant"].items()}
    typer.echo(json.dumps(summary))


@_command()
def inspect(
    strategy: str = typer.Argument(..., help="Strategy file (.json), 'dense' or a uniform pattern."),
    latent_frames: int = typer.Option(21, metavar="N", help="Latent frames of the token grid to measure density on."),
    latent_height: int = typer.Option(30, metavar="N", help="Token rows (latent rows after patchification)."),
    latent_width: int = typer.Option(52, metavar="N", help="Token columns (latent columns after patchification)."),
    heads: int = typer.Option(12, metavar="N", help="Heads per layer (for a uniform strategy)."),
    block_size: int = typer.Option(128, metavar="TOKENS", help="Tokens per block."),
    frames: Optional[int] = typer.Option(None, hidden=True),
    height: Optional[int] = typer.Option(None, hidden=True),
    width: Optional[int] = typer.Option(None, hidden=True),
):
    """Describe a strategy and its block density on a token grid (default: Wan 480x832, 81 frames)."""
    try:
        from .inputs import check_at_least, check_block_size

        latent_frames = _deprecated("inspect", "--frames", "--latent-frames", frames, latent_frames)
        latent_height = _deprecated("inspect", "--height", "--latent-height", height, latent_height)
        latent_width = _deprecated("inspect", "--width", "--latent-width", width, latent_width)
        for option, value in (("--latent-frames", latent_frames), ("--latent-height", latent_height),
                              ("--latent-width", latent_width), ("--heads", heads)):
            check_at_least(option, value)
        check_block_size(block_size)
        from vdit_accel import Strategy, VideoGrid
        from vdit_accel.patterns import build_block_mask, format_pattern

        st = Strategy.from_spec(strategy)
        grid = VideoGrid(latent_frames, latent_height, latent_width)
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


@_command()
def search(
    prompts: Optional[Path] = typer.Option(None, metavar="FILE", show_default="two built-in prompts",
                                           help="Text file with one calibration prompt per line."),
    model: Optional[str] = typer.Option(None, metavar="NAME|PATH", show_default="wan-trained",
                                        help="A built-in model or a diffusers pipeline folder or hub id."),
    budget: float = typer.Option(0.05, metavar="FLOAT", help="Error budget: relative L2 error of a head's output against dense."),
    mode: str = typer.Option("global", metavar="MODE", help="global: one budget over all heads (Lagrangian); per_head: every head within budget."),
    target_density: Optional[float] = typer.Option(None, metavar="FLOAT", help="Instead of a budget: the mean block density to reach with least error."),
    profile_steps: Optional[str] = typer.Option(None, metavar="I,J,...", show_default="first, middle, last",
                                                help="Comma-separated denoising steps (0-based) to profile."),
    num_inference_steps: Optional[int] = typer.Option(None, metavar="N", show_default="the model's", help="Denoising steps of each calibration run."),
    frames: Optional[int] = typer.Option(None, metavar="N", show_default="the model's", help="Number of video frames (4k+1 for Wan)."),
    height: Optional[int] = typer.Option(None, metavar="PIXELS", show_default="the model's", help="Height in pixels."),
    width: Optional[int] = typer.Option(None, metavar="PIXELS", show_default="the model's", help="Width in pixels."),
    dense_warmup_steps: Optional[int] = typer.Option(None, metavar="N", show_default="chosen by the search",
                                                     help="Run the first N denoising steps dense."),
    block_size: int = typer.Option(128, metavar="TOKENS", help="Block size the strategy will run with."),
    sample_blocks: int = typer.Option(8, metavar="N", help="Query blocks per call on which candidate errors are measured."),
    state_dir: Optional[Path] = typer.Option(None, metavar="DIR", help="Save progress here after every prompt; rerun to resume."),
    device: Optional[str] = typer.Option(None, metavar="DEVICE", show_default="cuda if available, else cpu", help="cuda or cpu."),
    dtype: Optional[str] = typer.Option(None, metavar="DTYPE", show_default="bfloat16 on cuda, float32 on cpu",
                                        help="float32, bfloat16 or float16."),
    out: Path = typer.Option(Path("strategy.json"), metavar="PATH", help="Where to write the strategy file."),
    steps: Optional[str] = typer.Option(None, hidden=True),
):
    """Search a per-layer, per-head sparse strategy on calibration prompts (torchrun for several GPUs)."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch = None
    try:
        from .inputs import check_at_least, check_block_size, check_model, check_writable, default_model, load_pipeline, \
            resolve_device_dtype

        profile_steps = _deprecated("search", "--steps", "--profile-steps", steps, profile_steps)
        for option, value in (("--num-inference-steps", num_inference_steps), ("--frames", frames), ("--height", height),
                              ("--width", width), ("--sample-blocks", sample_blocks)):
            check_at_least(option, value)
        check_at_least("--dense-warmup-steps", dense_warmup_steps, 0)
        check_block_size(block_size)
        if prompts is None:
            prompt_list = [DEFAULT_PROMPT, "two squares bouncing off the walls"]
        elif not prompts.is_file():
            raise ValueError(f"--prompts {str(prompts)!r}: no such file")
        else:
            prompt_list = [l.strip() for l in prompts.read_text().splitlines() if l.strip()]
            if not prompt_list:
                raise ValueError(f"--prompts {str(prompts)!r} has no prompt (one per line)")
        try:
            step_list = [int(x) for x in profile_steps.split(",")] if profile_steps else None
        except ValueError:
            raise ValueError(f"--profile-steps must be comma-separated step numbers such as 0,20,39, got {profile_steps!r}") from None
        if out.suffix != ".json":
            raise ValueError(f"--out must end in .json, got {str(out)!r}")
        check_writable("--out", out, [out])
        model = model or default_model(_say)
        check_model(model)

        import torch

        from vdit_accel.sparsity_search import SearchConfig
        from vdit_accel.sparsity_search import search as run_search

        config = SearchConfig(budget=budget, mode=mode, steps=step_list, dense_warmup_steps=dense_warmup_steps,
                              block_size=block_size, sample_blocks=sample_blocks, target_density=target_density)
        if world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and device != "cpu" else "gloo"
            torch.distributed.init_process_group(backend)
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        rank = torch.distributed.get_rank() if world > 1 else 0
        device, dtype = resolve_device_dtype(device, dtype)
        pipe, defaults = load_pipeline(model, device, dtype)
        call = dict(height=height or defaults.height, width=width or defaults.width,
                    num_frames=frames or defaults.frames, num_inference_steps=num_inference_steps or defaults.steps,
                    output_type="latent")
        from .inputs import builtin_models, check_size

        check_size(pipe, call["num_frames"], call["height"], call["width"])
        if model in builtin_models():
            call.update(max_sequence_length=defaults.max_sequence_length, **defaults.call_kwargs)
        strategy = _search_with_bars(run_search, pipe, prompt_list[rank::world] if world > 1 else prompt_list,
                                     prompt_list, config, call, state_dir, rank)
        if rank == 0:
            strategy.save(out)
            typer.echo(json.dumps({"out": str(out), "strategy": strategy.describe(),
                                   "mean_density": strategy.search["mean_density"],
                                   "mean_error": strategy.search["mean_error"], "seconds": strategy.search["seconds"]}))
    except _USER_ERRORS as e:
        _fail(str(e))
    finally:
        if world > 1 and torch is not None and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _search_with_bars(run_search, pipe, mine, prompt_list, config, call, state_dir, rank):
    """The search with two bars on rank 0: calibration prompts (this rank's), and the steps of the one
    in flight. The search reports each prompt, done or resumed, through ``progress`` once."""
    from . import progress

    if rank != 0:
        return run_search(pipe, prompt_list, config, call_kwargs=call, state_dir=state_dir, progress=_say)
    bars = progress.bars("")
    with bars:
        prompts_task = bars.add_task("prompts", total=len(mine))
        steps_task = bars.add_task("steps", total=call["num_inference_steps"])

        def done(msg: str):
            bars.console.print(msg, markup=False, highlight=False)
            bars.advance(prompts_task)
            bars.reset(steps_task)

        if progress.takes_step_callback(pipe):
            call = {**call, "callback_on_step_end": progress.step_callback(bars, steps_task)}
        return run_search(pipe, prompt_list, config, call_kwargs=call, state_dir=state_dir, progress=done)


@_command()
def models():
    """List the supported model families: their diffusers transformer classes and tiny offline pipelines."""
    from vdit_accel.pipelines import supported_models

    for family, classes in supported_models():
        typer.echo(f"{family:<18} {', '.join(classes)}")


@_command()
def version():
    """Print versions of vdit-accel and the libraries it runs on."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    import vdit_accel

    parts = [f"vdit-accel {vdit_accel.__version__}"]
    for dist in ("torch", "triton", "diffusers"):
        try:
            parts.append(f"{dist} {installed(dist)}")
        except PackageNotFoundError:
            parts.append(f"{dist} (not installed)")
    typer.echo(", ".join(parts))


bench_app = typer.Typer(cls=TyperGroup, no_args_is_help=True, rich_markup_mode=None, help="Benchmarks: real-size steps on a GPU, tiny ones on the CPU.")
app.add_typer(bench_app, name="bench")


@bench_app.command("pipeline", cls=_Command)
def bench_pipeline(
    shape: list[str] = typer.Option(..., "--shape", metavar="SHAPE", help="Shape to run (repeat for several): wan2.1-1.3b-480p, wan2.1-1.3b-720p, wan2.1-14b-720p, hunyuan-720p; tiny-wan, tiny-hunyuan on the CPU."),
    variants: list[str] = typer.Option(None, "--variants", metavar="ROWS", help="Rows to run, comma-separated or repeated (default: all): noop-attention, dense-cudnn, ours-dense, ours-window3d-0.15, flex-window3d-0.15, ours-window3d-0.15-fp8, ours-window3d-0.15-tiled, flex-window3d-0.15-tiled, ours-window3d-0.15-tiled-fp8, ours-searched."),
    reps: Optional[int] = typer.Option(None, metavar="N", help="Timed forwards per row (default: per shape, 1 to 3)."),
    searched_strategy: Optional[Path] = typer.Option(None, metavar="FILE", help="Strategy file from `vdit-accel search` for the ours-searched row (skipped when it does not fit the model)."),
    block_size: int = typer.Option(128, metavar="TOKENS", help="Tokens per block of the sparse masks."),
    device: Optional[str] = typer.Option(None, metavar="DEVICE", show_default="cuda if available, else cpu", help="cuda or cpu."),
    git_sha: Optional[str] = typer.Option(None, metavar="SHA", help="Commit recorded in the result file (default: the package version)."),
    out_dir: Path = typer.Option(Path("."), metavar="DIR", help="Where e2e-<gpu>-<yyyymmdd>.json is written."),
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
