"""The searched strategy against every uniform family, each tuned to the same PSNR target, verified end to end.

    python benchmarks/search_targets.py --model wan-rich --targets 30 35 --ship cli/strategies/wan-rich.json
                                              # the testbed on a GPU (benchmarks/gpu_search_targets.sh)
    python benchmarks/search_targets.py --model wan-trained --frames 9 --height 64 --width 64 --steps 6 \\
        --block-size 16 --targets 25 30 --calibration 1 --validation 2 --max-probes 6   # small, on a CPU

Per target T (dB: every validation video against its dense one, same prompt and seed, and no caption
check regressing):

- ``searched``: ``vdit_accel.sparsity_search.search`` with ``min_psnr=T`` (profile every step, solve the
  schedule, verify on the calibration and validation prompts, tune);
- each uniform family tuned to T the way the search tunes itself (``targets.tune_ladder``: the cheapest
  member of the family's ladder that keeps T on the calibration prompts, bisected, for every dense warm-up
  of 0 to half the run in eighths, then confirmed on the validation prompts, climbing where they miss):
  ``window3d-raster`` and ``window3d-tiled`` (a ladder of windows), ``semantic`` (the dense pattern in the
  semantic order, ``top_p`` ladder, no warm-up: its blocks are chosen per call, so its density is not known
  beforehand and its speed is the measured one only), ``radial`` (Radial Attention's mask, ``decay`` ladder),
  ``sta`` (sliding tile attention in the tiled order, a ladder of windows in tiles).

All rows share one :class:`~vdit_accel.sparsity_search.verify.Verifier` (every dense video generated once).
Per row: the strategy, its effective density and expected attention speed-up (the cost model: measured on
the GPU; FLOP-proportional on a CPU), the measured self-attention and whole-generation speed-ups (CUDA
events on a GPU; on a CPU sparse attention runs PyTorch's reference path, which skips no work, so those
ratios are not the kernels'), the validation and calibration PSNR, SSIM, caption regressions, probes.
Calibration prompts: the demo's and training-like captions (seed 0); validation: the model's held-out
validation captions (seeds 1000 + i). Writes ``search-targets-<device>-<yyyymmdd>.json`` (after every row)
and prints the markdown table; ``--ship PATH`` writes the searched strategy of the highest target that
held, with its measured figures, as the model's shipped strategy (``cli/generate.py`` SHIPPED_STRATEGIES).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from result_files import REPO, RESULTS, run_header, write_result  # noqa: E402

FAMILIES = ("window3d-raster", "window3d-tiled", "semantic", "radial", "sta")


def family_ladder(family: str, grid, block: int) -> list[tuple[str, str | None]]:
    """``(pattern, order)`` members of a uniform family, ascending in block density on ``grid``."""
    from vdit_accel.orders.static import tile_shape
    from vdit_accel.sparsity_search.accounting import HeadDensity
    from vdit_accel.strategy import HeadSpec

    windows = [(0, 1, 1), (0, 2, 2), (1, 1, 1), (1, 2, 2), (1, 3, 3), (1, 4, 4), (2, 4, 4), (2, 6, 6), (3, 8, 8),
               (4, 12, 12), (6, 16, 16)]
    if family.startswith("window3d"):
        order = "tiled" if family.endswith("tiled") else None
        members = [(f"window3d:t={min(t, grid.t - 1)},h={min(h, grid.h - 1)},w={min(w, grid.w - 1)}", order)
                   for t, h, w in windows]
    elif family == "semantic":
        return [("dense", f"semantic:top_p={p}") for p in (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)]  # density grows with top_p
    elif family == "radial":
        members = [(f"radial:decay={d}", None) for d in (0.25, 0.5, 1, 2, 4, 8)]
    elif family == "sta":
        tt, th, tw = tile_shape(grid, block)
        tile = f"{tt}|{th}|{int(tw)}"
        members = [(f"sta:t={a},h={b},w={c},tile={tile}", "tiled")
                   for a, b, c in [(1, 1, 1), (1, 3, 3), (3, 3, 3), (3, 5, 5), (5, 5, 5), (5, 7, 7), (7, 9, 9)]]
    else:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    density = HeadDensity(grid, block)
    seen, out = set(), []
    for pattern, order in sorted(members, key=lambda m: density(HeadSpec(*m))):
        d = round(density(HeadSpec(pattern, order)), 6)
        if d not in seen and d < 1.0:  # one member per density; dense is no member
            seen.add(d)
            out.append((pattern, order))
    return out


def tune_family(family: str, measure, info, targets, on_gpu: bool, grid, block: int, num_steps: int, budget: int,
                progress=print):
    """The cheapest member of ``family`` x dense warm-up that holds (``targets.tune_ladder``); the outcome and
    its probes."""
    from vdit_accel import Strategy
    from vdit_accel.sparsity_search.targets import Prober, tune_ladder, warmup_ladder

    ladder = family_ladder(family, grid, block)

    def make(rung, w, dense):
        return Strategy.uniform(rung[0], order=rung[1], dense_warmup_steps=w)

    prober = Prober(make, measure, info, targets, on_gpu, progress)

    def rungs_at(w, best):
        return [r for r in ladder if best is None or info(make(r, w, ()))[1] < best.effective_density - 1e-9]

    def above(best):
        return ladder[ladder.index(best.rung) + 1:]

    # The semantic order's blocks are chosen per call: its density is not known before it runs, so its members are
    # ordered by top_p and tried without a warm-up (a warm-up would look cheaper only for the plan overhead it skips).
    warmups = [0] if family == "semantic" else warmup_ladder(num_steps)
    out = tune_ladder(prober, rungs_at, above, warmups, budget)
    out.probes = prober.probes
    return out


def row_of(name: str, target: float, strategy, outcome, measurement, accounting: dict, probes: int) -> dict:
    val = measurement.summary("validation") if measurement else {}
    cal = measurement.summary("calibration") if measurement else {}
    dynamic = any(h.dynamic for h in strategy.heads())  # blocks chosen per call: its speed is measured only
    return {"target_db": target, "row": name, "holds": outcome["holds"], "verdict": outcome["verdict"],
            "strategy": strategy.describe(num_steps=accounting["num_steps"]),
            "effective_density": None if dynamic else accounting["effective_density"],
            "expected_attention_speedup": None if dynamic else accounting["expected_attention_speedup"],
            **(measurement.speedups() if measurement else {}),
            "validation_psnr_db_min": val.get("psnr_db_min"), "validation_psnr_db_mean": val.get("psnr_db_mean"),
            "calibration_psnr_db_min": cal.get("psnr_db_min"), "ssim_mean": val.get("ssim_mean"),
            "caption_regressions": val.get("caption_regressions"), "probes": probes,
            "prompt_rows": measurement.rows if measurement else [], "strategy_doc": strategy.to_dict()}


def markdown(doc: dict) -> str:
    """The table: per target, each row's speed-ups at the PSNR it kept."""
    timed = "measured" if doc["gpu"] != "cpu" else "measured on a CPU: reference path, not the kernels'"
    lines = [f"{doc['gpu']}, {doc['date']}: `{doc['model']}` at {'x'.join(map(str, doc['size']))} "
             f"({doc['tokens']:,} tokens), {doc['steps']} steps, {doc['validation']} validation prompts; "
             f"attention / run speed-ups {timed}.", "",
             "| target | row | holds | effective density | attention speed-up, expected | measured | whole run | "
             "validation PSNR min / mean |", "|---|---|---|---|---|---|---|---|"]
    def f(v, fmt, unit=""):
        return "—" if v is None else f"{v:{fmt}}{unit}"

    for r in doc["rows"]:
        lines.append(f"| {r['target_db']:g} dB | {r['row']} | {'yes' if r['holds'] else 'no'} | "
                     f"{f(r['effective_density'], '.3f')} | {f(r['expected_attention_speedup'], '.2f', '×')} | "
                     f"{f(r.get('attention_speedup_measured'), '.2f', '×')} | {f(r.get('run_speedup_measured'), '.2f', '×')} | "
                     f"{f(r['validation_psnr_db_min'], '.1f')} / {f(r['validation_psnr_db_mean'], '.1f')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    from vdit_accel import Strategy
    from vdit_accel.pipelines import toy
    from vdit_accel.pipelines.toy import trained
    from vdit_accel.sparsity_search import SearchConfig, search
    from vdit_accel.sparsity_search.accounting import HeadDensity, account, cost_model_for
    from vdit_accel.sparsity_search.targets import Targets
    from vdit_accel.sparsity_search.verify import Verifier, caption_check_for, jobs_for

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="wan-rich", choices=sorted(trained.MODELS))
    ap.add_argument("--targets", type=float, nargs="+", default=[30.0, 35.0])
    ap.add_argument("--frames", type=int)
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--calibration", type=int, default=2, help="calibration prompts (the demo's, then training-like)")
    ap.add_argument("--validation", type=int, default=4, help="held-out validation captions")
    ap.add_argument("--max-probes", type=int, default=12, help="per row")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    ap.add_argument("--device", default=None)
    ap.add_argument("--ship", type=Path, help="write the searched strategy of the highest target that held here")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--suffix", default="", help="appended to the result file's name (one file per target: '-30db')")
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    spec = trained.model_spec(args.model)
    d = spec.defaults
    size = [args.frames or d.frames, args.height or d.height, args.width or d.width]
    steps = args.steps or d.steps
    pipe = trained.build_trained_pipeline(dtype=torch.bfloat16 if device == "cuda" else torch.float32, model=args.model)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_frames=size[0], height=size[1], width=size[2], num_inference_steps=steps,
                guidance_scale=spec.guidance_scale, max_sequence_length=spec.max_sequence_length)
    rich = spec.scenes == "rich"
    train = toy.sample_rich_scenes(args.calibration, 7) if rich else toy.sample_scenes(args.calibration, 7)
    calibration = (["a red circle moving left on a blue background"] + [s.caption for s in train])[:args.calibration]
    scenes = toy.rich_validation_scenes(args.validation) if rich else toy.validation_scenes(args.validation)
    validation = [s.caption for s in scenes]
    check = caption_check_for(args.model)
    verifier = Verifier(pipe, call, args.block_size, check, progress=print)
    jobs = jobs_for(calibration, validation, 0)
    tg = spec.grid(*size)
    from vdit_accel import VideoGrid

    grid = VideoGrid(*tg)
    transformer = pipe.transformer
    heads, head_dim = transformer.config.num_attention_heads, transformer.config.attention_head_dim
    cost_model = cost_model_for(grid, heads, head_dim, args.block_size, device)
    tag, date, doc = run_header("search_targets.py", argv, device)
    doc.update({"model": args.model, "size": size, "tokens": grid.seq_len, "steps": steps, "block_size": args.block_size,
                "calibration": len(calibration), "validation": len(validation),
                "calibration_prompts": [{"prompt": j.prompt, "seed": j.seed} for j in jobs if j.split == "calibration"],
                "validation_prompts": [{"prompt": j.prompt, "seed": j.seed} for j in jobs if j.split == "validation"],
                "cost_model": {"source": cost_model.source, "fixed_ms": cost_model.fixed_ms,
                               "per_density_ms": cost_model.per_density_ms},
                "note": None if device == "cuda" else ("on a CPU sparse attention runs PyTorch's reference path (no work "
                                                       "skipped): the measured speed-ups are not the kernels'"),
                "rows": []})
    state = tempfile.mkdtemp(prefix="search-targets-")  # one profile for every target (the search resumes it)

    density = HeadDensity(grid, args.block_size)

    def accounting(strategy):
        return account(strategy, grid, steps, num_layers=len(transformer.blocks), num_heads=heads,
                       block_size=args.block_size, cost_model=cost_model, head_dim=head_dim, density=density).to_json()

    def measure(strategy, split):
        return verifier.measure(strategy, [j for j in jobs if split == "all" or j.split == split])

    def info(strategy):
        a = accounting(strategy)
        return a["expected_attention_speedup"], a["effective_density"]

    shipped = None
    for target in args.targets:
        t0 = time.perf_counter()
        cfg = SearchConfig(block_size=args.block_size, min_psnr=target, max_probes=args.max_probes)
        st = search(pipe, calibration, cfg, call_kwargs=call, state_dir=state, validation_prompts=validation,
                    check=check, verifier=verifier, progress=print)
        v = st.search["verification"]
        m = _measurement(v)
        row = row_of("searched", target, st, v, m, st.search["accounting"], len(v["probes"]))
        row["seconds"] = round(time.perf_counter() - t0, 1)
        doc["rows"].append(row)
        write_result(args.out_dir, "search-targets", tag, date, doc, args.suffix)
        if v["holds"]:
            shipped = (target, st, row)
        for family in args.families:
            t0 = time.perf_counter()
            out = tune_family(family, measure, info, Targets(min_psnr=target), device == "cuda", grid, args.block_size,
                              steps, args.max_probes)
            strategy = out.candidate if out.candidate is not None else Strategy.dense()
            row = row_of(family, target, strategy, {"holds": out.holds, "verdict": out.verdict}, out.final,
                         accounting(strategy), len(out.probes))
            row["seconds"] = round(time.perf_counter() - t0, 1)
            doc["rows"].append(row)
            print(markdown(doc))
            write_result(args.out_dir, "search-targets", tag, date, doc, args.suffix)
    path = write_result(args.out_dir, "search-targets", tag, date, doc, args.suffix)
    if args.ship and shipped is not None:
        target, st, row = shipped
        rows = [r for r in row["prompt_rows"] if r["split"] == "validation"]
        same = sum(r.get("check_dense") == r.get("check_accelerated") for r in rows)
        measured = {"file": str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path),
                    "row": f"searched at {target:g} dB", "command": doc["command"], "size": size, "steps": steps,
                    "prompts": len(rows), "psnr_db_mean": row["validation_psnr_db_mean"],
                    "psnr_db_min": row["validation_psnr_db_min"], "ssim_mean": row["ssim_mean"],
                    "same_verdict_as_dense": same, "effective_density": row["effective_density"],
                    "expected_attention_speedup": row["expected_attention_speedup"],
                    "attention_speedup_measured": row.get("attention_speedup_measured"),
                    "run_speedup_measured": row.get("run_speedup_measured"), "timed_on": row.get("timed_on")}
        dataclasses.replace(st, search={**st.search, "measured": measured}).save(args.ship)
        print("shipped", args.ship)
    print(markdown(doc))
    return doc


def _measurement(v: dict):
    """The search's final verification as a Measurement (its rows and time ratios)."""
    from vdit_accel.sparsity_search.verify import Measurement

    return Measurement(v["rows"], v.get("dense_attention_s", 0.0), v.get("attention_s", 0.0),
                       v.get("dense_total_s", 0.0), v.get("total_s", 0.0), v.get("timed_on", "cpu"))


if __name__ == "__main__":
    main()
