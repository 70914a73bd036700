"""The ``vdit-accel`` command line: thin commands over the library.

Start-up imports only typer: torch, diffusers and the library load inside the commands, so ``--help``
and ``version`` answer at once. Errors are one line (``error: ...``) with exit status 2.
"""

from __future__ import annotations

import datetime
import io
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
        from . import distributed

        distributed.ARGV[:] = list(args) if args is not None else sys.argv[1:]
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


_ULYSSES_HELP = ("Ulysses context parallelism over P GPUs (Wan 2.1/2.2, HunyuanVideo): run under "
                 "`torchrun --nproc-per-node P -m vdit_accel.cli.app ...`; every process runs, rank 0 prints and writes.")


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
    ulysses: int = typer.Option(1, metavar="P", help=_ULYSSES_HELP),
):
    """Generate a video dense and accelerated; write both, a comparison and a report of speed and PSNR."""
    from .distributed import Ranks, env_rank, init_ranks, leave
    from .generate import GenerateOptions, prepare, run

    opts = GenerateOptions(prompt=prompt, model=model, large=large, strategy=strategy, order=order, frames=frames,
                           height=height, width=width, steps=steps, seed=seed, dense_warmup_steps=dense_warmup_steps,
                           block_size=block_size, quant=quant, compare=compare, device=device, dtype=dtype, out=out,
                           ulysses=ulysses)
    ranks = Ranks()
    try:
        from rich.console import Console

        quiet = {} if env_rank() == 0 else {"file": io.StringIO()}  # only rank 0 prints
        console = Console(stderr=True, markup=False, highlight=False, soft_wrap=True, **quiet)
        plan = prepare(opts, console.print)
        ranks = init_ranks(plan.device) if ulysses > 1 else Ranks(device=plan.device)
        report = run(plan, console, ranks)
    except _USER_ERRORS as e:
        _fail(str(e))
    finally:
        leave()
    if not ranks.speaks:
        return
    summary = {k: report[k] for k in ("video", "density", "psnr_db", "speedup") if k in report}
    if "quant" in report:
        summary["quant_psnr_db"] = {m: round(e.get("psnr_db", e["psnr_db_vs_unquantized"]), 2) for m, e in report["quant"].items()}
    typer.echo(json.dumps(summary))


@_command()
def inspect(
    strategy: str = typer.Argument(..., help="Strategy file (.json), 'dense' or a uniform pattern."),
    latent_frames: Optional[int] = typer.Option(None, metavar="N", show_default="the search's grid, else 21",
                                                help="Latent frames of the token grid to measure density on."),
    latent_height: Optional[int] = typer.Option(None, metavar="N", show_default="the search's grid, else 30",
                                                help="Token rows (latent rows after patchification)."),
    latent_width: Optional[int] = typer.Option(None, metavar="N", show_default="the search's grid, else 52",
                                               help="Token columns (latent columns after patchification)."),
    num_steps: Optional[int] = typer.Option(None, "--num-steps", metavar="N", show_default="the search's, else 50",
                                            help="Denoising steps of the run to account (dense warm-ups included)."),
    heads: int = typer.Option(12, metavar="N", help="Heads per layer (for a uniform strategy)."),
    block_size: Optional[int] = typer.Option(None, metavar="TOKENS", show_default="the search's, else 128",
                                             help="Tokens per block."),
    png: Optional[Path] = typer.Option(None, "--png", metavar="FILE", help="Also draw the strategy (layers x heads: "
                                       "kind as colour, density as shade, warm-ups and quant marked) into FILE."),
    frames: Optional[int] = typer.Option(None, hidden=True),
    height: Optional[int] = typer.Option(None, hidden=True),
    width: Optional[int] = typer.Option(None, hidden=True),
):
    """Describe a strategy: what every head does per step range, and what the whole run costs (effective
    density, expected attention speed-up) on a token grid (default: the search's, else Wan 480x832, 81 frames)."""
    try:
        from .inputs import check_at_least, check_block_size, check_writable

        latent_frames = _deprecated("inspect", "--frames", "--latent-frames", frames, latent_frames)
        latent_height = _deprecated("inspect", "--height", "--latent-height", height, latent_height)
        latent_width = _deprecated("inspect", "--width", "--latent-width", width, latent_width)
        for option, value in (("--latent-frames", latent_frames), ("--latent-height", latent_height),
                              ("--latent-width", latent_width), ("--heads", heads), ("--num-steps", num_steps)):
            check_at_least(option, value)
        if png is not None:
            if png.suffix != ".png":
                raise ValueError(f"--png must end in .png, got {str(png)!r}")
            check_writable("--png", png, [png])
        from vdit_accel import Strategy, VideoGrid
        from vdit_accel.sparsity_search.accounting import HeadDensity, account
        from vdit_accel.sparsity_search.solver import CostModel

        st = Strategy.from_spec(strategy)
        meta = st.search or {}
        searched = meta.get("grid") or [21, 30, 52, 0, "none"]
        block_size = block_size or meta.get("block_size") or 128
        check_block_size(block_size)
        given = (latent_frames, latent_height, latent_width)
        t, h, w = (g if g is not None else d for g, d in zip(given, searched[:3]))
        grid = VideoGrid(t, h, w, *(searched[3:5] if given == (None, None, None) else (0, "none")))
        steps = num_steps or meta.get("num_inference_steps") or 50
        n_layers = st.model.get("num_layers") or (len(st.layers) if st.layers is not None else 1)
        n_heads = st.model.get("num_heads") or (len(st.layers[0]) if st.layers is not None else heads)
        cm = meta.get("cost_model")
        same = [grid.t, grid.h, grid.w, grid.text_len, grid.text_at] == searched and block_size == meta.get("block_size")
        cost_model = CostModel(cm["fixed_ms"], cm["per_density_ms"], cm["source"]) if isinstance(cm, dict) and same else None
        density = HeadDensity(grid, block_size)
        acc = account(st, grid, steps, num_layers=n_layers, num_heads=n_heads, block_size=block_size,
                      cost_model=cost_model, density=density)
        typer.echo(st.describe(num_steps=steps))
        if not acc.dense_throughout and (st.layers is not None or st.phases or st.layer_warmup_steps is not None):
            ranges = [(st, st.dense_warmup_steps)] + [(ph, ph.from_step) for ph in st.phases]
            for part, start in ranges:
                if len(ranges) > 1:
                    typer.echo(f"from step {start}:")
                for layer in range(n_layers):
                    warm = st.layer_warmup(layer)
                    tag = f" (dense for its first {warm} steps)" if warm > st.dense_warmup_steps else ""
                    cells = "  ".join(f"{h.describe()} ({density(h):.2f})" for h in part.layer_heads(layer, n_heads))
                    typer.echo(f"layer {layer:3d}{tag}: {cells}")
        typer.echo(acc.line())
        v = meta.get("verification")
        if v:
            val = v.get("validation") or {}
            typer.echo(f"verified ({'target holds' if v.get('holds') else 'target missed'}): {v.get('verdict')}; "
                       f"validation PSNR min {val.get('psnr_db_min', float('nan')):.2f} dB over {val.get('prompts', 0)} prompts")
        if png is not None:
            from vdit_accel.sparsity_search.picture import write_strategy_picture

            write_strategy_picture(png, st, grid, steps, num_layers=n_layers, num_heads=n_heads, block_size=block_size)
            _say(f"wrote {png}")
    except _USER_ERRORS as e:
        _fail(str(e))


@_command()
def search(
    prompts: Optional[Path] = typer.Option(None, metavar="FILE", show_default="the model's built-in prompts",
                                           help="Text file with one calibration prompt per line."),
    model: Optional[str] = typer.Option(None, metavar="NAME|PATH", show_default="wan-trained",
                                        help="A built-in model or a diffusers pipeline folder or hub id."),
    min_psnr: Optional[float] = typer.Option(None, metavar="DB", help="Target: every validation video at least this PSNR "
                                             "against dense (and no caption check regressing); the search verifies end to "
                                             "end and tunes until it holds, or says it cannot."),
    attention_speedup: Optional[float] = typer.Option(None, metavar="X", help="Target: the run's self-attention time, dense "
                                                      "over accelerated (measured on a GPU; the cost model's on a CPU)."),
    validation_prompts: Optional[Path] = typer.Option(None, metavar="FILE", show_default="the model's held-out captions, "
                                                      "else the calibration prompts with other seeds",
                                                      help="Held-out prompts the targets must hold on, one per line."),
    budget: float = typer.Option(0.05, metavar="FLOAT", help="Without targets: the error budget, a head's relative L2 output "
                                 "error against dense, averaged over every step, layer and head of the run."),
    mode: str = typer.Option("global", metavar="MODE", help="global: one budget over all heads (Lagrangian); per_head: every head within budget."),
    target_density: Optional[float] = typer.Option(None, metavar="FLOAT", help="Instead of a budget: the effective density "
                                                   "over the whole run (dense warm-ups at 1) to reach with least error."),
    profile_steps: Optional[str] = typer.Option(None, metavar="I,J,...", show_default="every step",
                                                help="Comma-separated denoising steps (0-based) to profile."),
    orders: str = typer.Option("raster,tiled", metavar="ORDERS", help="Token orders the search may give a head, "
                               "comma-separated (raster, tiled, semantic:top_p=0.9, ...)."),
    phases: int = typer.Option(2, metavar="N", help="Step ranges with a pattern each (1: one pattern per head for the run)."),
    max_probes: int = typer.Option(12, metavar="N", help="With targets: the most solve-and-generate probes to spend."),
    num_inference_steps: Optional[int] = typer.Option(None, metavar="N", show_default="the model's", help="Denoising steps of each calibration run."),
    frames: Optional[int] = typer.Option(None, metavar="N", show_default="the model's", help="Number of video frames (4k+1 for Wan)."),
    height: Optional[int] = typer.Option(None, metavar="PIXELS", show_default="the model's", help="Height in pixels."),
    width: Optional[int] = typer.Option(None, metavar="PIXELS", show_default="the model's", help="Width in pixels."),
    dense_warmup_steps: Optional[int] = typer.Option(None, metavar="N", show_default="chosen by the search, per layer",
                                                     help="Run at least the first N denoising steps dense."),
    block_size: int = typer.Option(128, metavar="TOKENS", help="Block size the strategy will run with."),
    sample_blocks: int = typer.Option(8, metavar="N", help="Query blocks per call on which candidate errors are measured."),
    state_dir: Optional[Path] = typer.Option(None, metavar="DIR", help="Save progress here after every prompt; rerun to resume."),
    device: Optional[str] = typer.Option(None, metavar="DEVICE", show_default="cuda if available, else cpu", help="cuda or cpu."),
    dtype: Optional[str] = typer.Option(None, metavar="DTYPE", show_default="bfloat16 on cuda, float32 on cpu",
                                        help="float32, bfloat16 or float16."),
    out: Path = typer.Option(Path("strategy.json"), metavar="PATH", help="Where to write the strategy file; its picture "
                             "(and per-step curve) goes beside it as NAME.png."),
    png: bool = typer.Option(True, help="Write the strategy's picture beside it."),
    steps: Optional[str] = typer.Option(None, hidden=True),
):
    """Search a per-layer, per-head strategy over the whole denoising schedule on calibration prompts;
    with --min-psnr / --attention-speedup verify it end to end and tune it (torchrun for several GPUs)."""
    from .distributed import init_ranks, leave, world_size

    world = world_size()
    try:
        from .inputs import check_at_least, check_block_size, check_model, check_writable, default_model, load_pipeline, \
            resolve_device_dtype

        profile_steps = _deprecated("search", "--steps", "--profile-steps", steps, profile_steps)
        for option, value in (("--num-inference-steps", num_inference_steps), ("--frames", frames), ("--height", height),
                              ("--width", width), ("--sample-blocks", sample_blocks), ("--phases", phases),
                              ("--max-probes", max_probes)):
            check_at_least(option, value)
        check_at_least("--dense-warmup-steps", dense_warmup_steps, 0)
        check_block_size(block_size)
        prompt_list = _prompt_file("--prompts", prompts)
        held_out = _prompt_file("--validation-prompts", validation_prompts)
        try:
            step_list = [int(x) for x in profile_steps.split(",")] if profile_steps else None
        except ValueError:
            raise ValueError(f"--profile-steps must be comma-separated step numbers such as 0,20,39, got {profile_steps!r}") from None
        if out.suffix != ".json":
            raise ValueError(f"--out must end in .json, got {str(out)!r}")
        picture = out.with_suffix(".png")
        check_writable("--out", out, [out, picture] if png else [out])
        model = model or default_model(_say)
        check_model(model)

        from vdit_accel.sparsity_search import SearchConfig
        from vdit_accel.sparsity_search import search as run_search
        from vdit_accel.sparsity_search.verify import caption_check_for

        config = SearchConfig(budget=budget, mode=mode, steps=step_list, dense_warmup_steps=dense_warmup_steps,
                              block_size=block_size, sample_blocks=sample_blocks, target_density=target_density,
                              orders=tuple(o.strip() for o in orders.split(",") if o.strip()), phases=phases,
                              min_psnr=min_psnr, attention_speedup=attention_speedup, max_probes=max_probes)
        if prompt_list is None or (config.targets is not None and held_out is None):
            builtin_cal, builtin_val = _builtin_prompts(model)
            prompt_list = prompt_list or builtin_cal
            held_out = held_out or builtin_val
        device, dtype = resolve_device_dtype(device, dtype)
        # (with targets rank 0 verifies end to end while the others wait for its strategy: a long wait)
        ranks = init_ranks(device, datetime.timedelta(hours=3))
        rank, device = ranks.rank, ranks.device
        pipe, defaults = load_pipeline(model, device, dtype)
        call = dict(height=height or defaults.height, width=width or defaults.width,
                    num_frames=frames or defaults.frames, num_inference_steps=num_inference_steps or defaults.steps,
                    output_type="latent")
        from .inputs import builtin_models, check_size

        check_size(pipe, call["num_frames"], call["height"], call["width"])
        if model in builtin_models():
            call.update(max_sequence_length=defaults.max_sequence_length, **defaults.call_kwargs)
        strategy = _search_with_bars(run_search, pipe, prompt_list[rank::world] if world > 1 else prompt_list,
                                     prompt_list, config, call, state_dir, rank,
                                     dict(validation_prompts=held_out, check=caption_check_for(model)))
        if rank == 0:
            _report_search(strategy, out, picture if png else None, block_size)
    except _USER_ERRORS as e:
        _fail(str(e))
    finally:
        leave()


def _report_search(strategy, out: Path, picture: Optional[Path], block_size: int) -> None:
    """Write the strategy (and its picture), print the one-line JSON summary; exit 1 when a target missed."""
    strategy.save(out)
    meta = strategy.search
    acc = meta["accounting"]
    summary = {"out": str(out), "strategy": strategy.describe(num_steps=meta["num_inference_steps"]),
               "summary": meta["summary"], "effective_density": acc["effective_density"],
               "expected_attention_speedup": acc["expected_attention_speedup"], "mean_error": meta["mean_error"],
               "seconds": meta["seconds"]}
    if picture is not None:
        from vdit_accel import VideoGrid
        from vdit_accel.sparsity_search.picture import write_strategy_picture

        write_strategy_picture(picture, strategy, VideoGrid(*meta["grid"]), meta["num_inference_steps"],
                               block_size=block_size)
        summary["picture"] = str(picture)
    v = meta.get("verification")
    if v:
        summary["verification"] = {k: v[k] for k in ("holds", "verdict", "calibration", "validation",
                                                     "attention_speedup_measured", "run_speedup_measured", "timed_on")}
    typer.echo(json.dumps(summary))
    if v and not v["holds"]:
        _say(f"warning: target not met: {v['verdict']} (written to {out} for inspection)")
        raise typer.Exit(1)


def _prompt_file(option: str, path: Optional[Path]) -> Optional[list[str]]:
    """The prompts of a file given to ``option``, one per line (None when not given)."""
    if path is None:
        return None
    if not path.is_file():
        raise ValueError(f"{option} {str(path)!r}: no such file")
    found = [l.strip() for l in path.read_text().splitlines() if l.strip()]
    if not found:
        raise ValueError(f"{option} {str(path)!r} has no prompt (one per line)")
    return found


def _builtin_prompts(model: str) -> tuple[list[str], list[str] | None]:
    """(calibration, validation) prompts for a built-in model: the demo's prompt and a training-like
    caption; for the trained toy models two held-out captions of their validation set (scenes never
    trained on, the ones sampling settings are chosen on), else none (the calibration prompts, other seeds)."""
    from vdit_accel.pipelines.tiny import TRAINED_FAMILIES

    calibration = [DEFAULT_PROMPT, "two squares bouncing off the walls"]
    if model not in TRAINED_FAMILIES:
        return calibration, None
    from vdit_accel.pipelines import toy
    from vdit_accel.pipelines.toy import trained

    scenes = toy.rich_validation_scenes(2) if trained.model_spec(model).scenes == "rich" else toy.validation_scenes(2)
    return calibration, [s.caption for s in scenes]


def _search_with_bars(run_search, pipe, mine, prompt_list, config, call, state_dir, rank, extra):
    """The search with two bars on rank 0: calibration prompts (this rank's), and the steps of the one
    in flight. The search reports each prompt, done or resumed, through ``progress`` once."""
    from . import progress

    if rank != 0:
        return run_search(pipe, prompt_list, config, call_kwargs=call, state_dir=state_dir, progress=_say, **extra)
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
        return run_search(pipe, prompt_list, config, call_kwargs=call, state_dir=state_dir, progress=done, **extra)


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
    out_dir: Path = typer.Option(Path("."), metavar="DIR", help="Where e2e-<gpu>-<yyyymmdd>.json is written "
                                 "(ulysses-<gpu>-<yyyymmdd>-p<P>.json with --ulysses)."),
    ulysses: Optional[int] = typer.Option(None, metavar="P", help=_ULYSSES_HELP + " Each row also times the "
                                          "all-to-all; --ulysses 1 (one process) writes the baseline for --baseline."),
    baseline: Optional[Path] = typer.Option(None, metavar="FILE", help="With --ulysses: the --ulysses 1 result file of "
                                            "the same GPU; each row gets its speed-up over one GPU and the efficiency."),
):
    """Time one denoising step (one transformer forward, batch 1) of real-config transformers with
    random weights: diffusers' attention, ours dense and sparse, FlexAttention on the same masks."""
    from vdit_accel.cli.bench import VARIANTS, markdown_table, run_pipeline_bench, scaling_table

    from .distributed import check_ulysses_world, init_ranks, leave, torchrun_command

    chosen = [v.strip() for item in (variants or []) for v in item.split(",") if v.strip()] or list(VARIANTS)
    command = " ".join(["vdit-accel bench pipeline", *(f"--shape {s}" for s in shape), "--variants " + ",".join(chosen)]
                       + [f"--{k.replace('_', '-')} {v}" for k, v in (("reps", reps), ("searched_strategy", searched_strategy),
                                                                       ("block_size", block_size), ("device", device),
                                                                       ("out_dir", out_dir), ("ulysses", ulysses),
                                                                       ("baseline", baseline)) if v is not None])
    rank = 0
    try:
        check_ulysses_world(ulysses or 1)
        if ulysses is not None and ulysses > 1:
            command = torchrun_command(ulysses)
            ranks = init_ranks(device or ("cuda" if _cuda() else "cpu"))
            device, rank = ranks.device, ranks.rank
        doc, path = run_pipeline_bench(shape, chosen, reps, out_dir, device, block_size, searched_strategy,
                                       command=command, git_sha=git_sha, log=lambda m: typer.echo(m, err=True),
                                       ulysses=ulysses, baseline=baseline)
    except _USER_ERRORS as e:
        _fail(str(e))
    finally:
        leave()
    if rank == 0:
        typer.echo(scaling_table(doc) if ulysses is not None else markdown_table(doc))
        typer.echo(f"wrote {path}", err=True)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main():
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
