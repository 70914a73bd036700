"""Quality and speed of accelerated generations on a trained tiny Wan, measured together: PSNR and
SSIM against dense generations of the same prompts and seeds, the caption check of each, and the
attention and whole-generation time against dense in the same run.

    python benchmarks/quality.py --model wan-rich --out-dir benchmarks/results            # GPU, native size
    python benchmarks/quality.py --model wan-trained --size default --prompts 2 --steps 4 \\
        --only ours-dense,window3d-0.25 --out-dir /tmp/q                                  # CPU smoke

The prompts are the model's held-out check captions (``benchmarks/check_trained.py``'s ``scene_list``,
seeds 1000 + i). ``dense`` = the unpatched pipeline (diffusers' own attention): the reference. Rows:

- calibration, so that a PSNR can be read: ``dense-other-seed`` (dense with other noise seeds: an
  unrelated valid video of the same caption), ``ours-dense`` (our dense kernel: the rounding floor, which
  the denoising steps amplify), ``oracle-D`` (the best a per-head block mask of density ``D`` could do:
  every self-attention call computed exactly on each head's ``D`` largest-mass key blocks of every query
  block in the tiled order, chosen from that very call's exact attention — not a runtime method);
- ``window3d-D`` / ``window3d-D-tiled``: the uniform ``window3d`` whose block density on the size's grid
  (raster / tiled order) is nearest ``D`` = 0.50, 0.25, 0.10 (``cli.bench.window_near``);
- ``semantic``: every head in the semantic order (dense pattern; its density is that of its plans);
- ``fp8`` / ``int8``: dense pattern, every head quantized;
- ``searched-NAME``: each ``--strategy FILE`` (its own warm-up);
- every sparse row also as ``ROW+warmup``: the first ``--warmup`` of the steps dense.

Each row: mean / minimum PSNR (dB) and mean SSIM over the prompts, the caption check's agreement on its
videos, the block density of its sparse steps and over the run, and its time — self-attention
milliseconds summed over the generation (CUDA events around every self-attention call, as ``vdit-accel
bench pipeline`` times them) and the whole generation's seconds, each also as a ratio to the dense row's
(``attn_speedup``, ``gen_speedup``; none for the oracle, which computes the full attention). Each
patched row is warmed up first (one untimed step, every step sparse: kernels compile outside the timing).
On a CPU the sparse and quantized paths run PyTorch references: the times are not the kernels'.
Writes ``<name>-<device>-<yyyymmdd>.json`` (``--name``, default ``quality``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_structure import BLOCK, _Capture, tiled_block_mass  # noqa: E402
from check_trained import run_check  # noqa: E402
from result_files import RESULTS, run_header, write_result  # noqa: E402

TARGETS = (0.5, 0.25, 0.1)
OTHER_SEED = 5000  # dense-other-seed: seeds 5000 + i instead of 1000 + i


@dataclass(frozen=True)
class Row:
    """One way of generating. ``strategy``: a short form or Strategy (``None``: unpatched);
    ``warmup``: dense steps first; ``oracle``: the oracle's block density."""

    name: str
    strategy: object = None
    quant: str | None = None
    order: str | None = None
    warmup: int = 0
    oracle: float | None = None
    seed_base: int = 1000


def plan_rows(grid, steps: int, warmup: int, strategies: list[Path], device) -> list[Row]:
    """Every row of the module docstring, in table order."""
    from vdit_accel import Strategy
    from vdit_accel.cli.bench import window_near

    rows = [Row("dense"), Row("dense-other-seed", seed_base=OTHER_SEED), Row("ours-dense", "dense")]
    base = []
    for d in TARGETS:
        base.append(Row(f"oracle-{d:.2f}", oracle=d))
        base.append(Row(f"window3d-{d:.2f}", window_near(grid, d, device=device)))
        base.append(Row(f"window3d-{d:.2f}-tiled", window_near(grid, d, device=device, order="tiled"), order="tiled"))
    base.append(Row("semantic", "dense", order="semantic"))
    for r in base:
        rows += [r, Row(r.name + "+warmup", r.strategy, r.quant, r.order, warmup, r.oracle)]
    rows += [Row("fp8", "dense", quant="fp8"), Row("int8", "dense", quant="int8")]
    rows += [Row(f"searched-{Path(p).stem}", Strategy.load(p)) for p in strategies]
    return rows


class _Timing:
    """Self-attention milliseconds (CUDA events per call) and wall seconds of one generation."""

    def __init__(self, grid, device: str):
        from vdit_accel.cli.bench import _Clock, _SelfAttentionTimer

        self.cuda = device == "cuda"
        self.timer = _SelfAttentionTimer(grid.video_len, _Clock(self.cuda))

    def run(self, fn):
        sync = torch.cuda.synchronize if self.cuda else (lambda: None)
        self.timer.reset()
        sync()
        t0 = time.perf_counter()
        with self.timer:
            out = fn()
        sync()
        seconds = time.perf_counter() - t0
        ms, calls = self.timer.total()
        return out, {"attn_ms": round(ms, 1), "attn_calls": calls, "seconds": round(seconds, 2)}


def oracle_call(grid, density: float, warmup: int, calls_per_step: int, densities: list):
    """``on_call`` for :class:`attention_structure._Capture`: after ``warmup`` steps, each head's
    ``ceil(density * Nb)`` largest-mass key blocks of each query block (tiled order), computed exactly."""
    from vdit_accel import attention
    from vdit_accel.block_mask import BlockMask
    from vdit_accel.orders.static import tiled_order

    s = grid.video_len
    nb = -(-s // BLOCK)
    keep_n = max(1, math.ceil(density * nb))

    def on_call(forward, layer, q, k, v):
        if forward // calls_per_step < warmup:
            return None
        perm = tiled_order(grid, BLOCK, device=q.device)
        m = tiled_block_mass(q, k, perm)
        idx = m.topk(keep_n, -1).indices
        keep = torch.zeros_like(m, dtype=torch.bool).scatter_(-1, idx, True)
        densities.append(float(keep.float().mean()))
        qt, kt, vt = (x[:, perm] for x in (q, k, v))
        out = attention(qt, kt, vt, BlockMask.from_dense(keep, s))
        res = torch.empty_like(out)
        res[:, perm] = out
        return res

    return on_call


def _plans_density(state) -> float:
    """Mean block density of the last per-call plans (semantic / segment) of every layer of a patched run."""
    dens = [float(entry[2].float().mean()) for mem in state.orders.memory.values() for key, entry in mem.items()
            if isinstance(key, tuple) and key[0] == "plan"]
    if not dens:
        raise RuntimeError("the run made no per-call plan: nothing to measure the density of")
    return sum(dens) / len(dens)


def main(argv: list[str] | None = None) -> dict:
    import vdit_accel
    from vdit_accel.pipelines import patch_state
    from vdit_accel.pipelines.toy import trained
    from vdit_accel.video import psnr, ssim

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="wan-trained", choices=sorted(trained.MODELS))
    ap.add_argument("--weights", type=Path, default=None, help="weights directory (default: shipped in the package)")
    ap.add_argument("--size", choices=("default", "large"), default="large",
                    help="the model's default or large size (wan-rich: both are its native 65x256x448)")
    ap.add_argument("--prompts", type=int, default=20, help="how many check captions")
    ap.add_argument("--steps", type=int, default=None, help="default: the model's")
    ap.add_argument("--guidance-scale", type=float, default=None, help="default: the model's")
    ap.add_argument("--warmup", type=float, default=0.25, help="fraction of the steps the +warmup rows run dense")
    ap.add_argument("--strategy", type=Path, action="append", default=[], help="a searched strategy file (repeat)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--only", default=None, help="comma-separated rows to run (dense always runs: the reference)")
    ap.add_argument("--name", default="quality", help="the result file's name before the device tag")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--git-sha", default=None, help="the commit for the result header (default: the checkout's; the "
                    "device copy's own git HEAD can be stale)")
    args = ap.parse_args(argv)
    spec = trained.model_spec(args.model)
    d = spec.defaults
    steps = args.steps or d.steps
    guidance = args.guidance_scale if args.guidance_scale is not None else spec.guidance_scale
    warmup = int(round(args.warmup * steps))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    size = dict(spec.large) if args.size == "large" else dict(num_frames=d.frames, height=d.height, width=d.width)
    batch = 4 if device == "cuda" else 1
    pipe = trained.build_trained_pipeline(args.weights, dtype=dtype, model=spec).to(device)
    world = spec.scenes

    vdit_accel.patch(pipe, "dense")  # only to read the call grid off the patched model
    pipe(prompt="a red circle moving left", num_inference_steps=1, max_sequence_length=d.max_sequence_length,
         output_type="latent", **size)
    grid = patch_state(pipe.transformer).grid
    vdit_accel.unpatch(pipe)
    rows_to_run = plan_rows(grid, steps, warmup, args.strategy, device)
    if args.only is not None:
        only = set(args.only.split(","))
        unknown = only - {r.name for r in rows_to_run}
        if unknown:
            raise SystemExit(f"--only: no row named {', '.join(sorted(unknown))} "
                             f"(rows: {', '.join(r.name for r in rows_to_run)})")
        rows_to_run = [r for r in rows_to_run if r.name in only or r.name == "dense"]
    timing = _Timing(grid, device)
    calls_per_step = 2 if guidance > 1 else 1

    def generate(row: Row, n: int | None = None, steps_: int = steps):
        return run_check(pipe, size, steps_, guidance, batch, args.prompts if n is None else n,
                         d.max_sequence_length, seed_base=row.seed_base, world=world)

    tag, date, doc = run_header("quality.py", argv, device, sha=args.git_sha)
    doc.update({"model": spec.name, "weights": str(args.weights or spec.weights_dir), "size": size,
                "tokens": grid.seq_len, "grid": [grid.t, grid.h, grid.w], "steps": steps, "guidance_scale": guidance,
                "warmup_steps": warmup, "prompts": args.prompts, "dtype": str(dtype).removeprefix("torch."), "rows": []})
    rows, dense = doc["rows"], None
    for row in rows_to_run:
        t0 = time.perf_counter()
        densities: list[float] = []
        try:
            if row.oracle is not None:
                cap = _Capture(pipe.transformer, grid.video_len, oracle_call(grid, row.oracle, row.warmup,
                                                                             calls_per_step, densities))
                with cap.active():
                    res, t = timing.run(lambda: generate(row))
                density = float(np.mean(densities))
            elif row.strategy is None:
                res, t = timing.run(lambda: generate(row))
                density = 1.0
            else:
                st = vdit_accel.Strategy.from_spec(row.strategy, 0, quant=row.quant, order=row.order)
                vdit_accel.patch(pipe, st)  # warm-up, every step sparse: compile outside the timing
                generate(row, n=min(batch, args.prompts), steps_=1)
                vdit_accel.unpatch(pipe)
                warm = row.warmup if isinstance(row.strategy, str) else None
                st = vdit_accel.Strategy.from_spec(row.strategy, warm, quant=row.quant, order=row.order)
                vdit_accel.patch(pipe, st)
                res, t = timing.run(lambda: generate(row))
                state = patch_state(pipe.transformer)
                density = _plans_density(state) if row.order == "semantic" else state.mean_density(grid)
                vdit_accel.unpatch(pipe)
                row = Row(row.name, st.describe(), row.quant, row.order, st.dense_warmup_steps, None, row.seed_base)
        except Exception as e:  # the table without this row, and the reason in it
            if row.name == "dense":
                raise
            rows.append({"impl": row.name, "error": f"{type(e).__name__}: {e}"})
            print(json.dumps(rows[-1]), flush=True)
            continue
        label = "oracle" if row.oracle is not None else "diffusers' attention" if row.strategy is None else row.strategy
        entry = {"impl": row.name, "strategy": label if isinstance(label, str) else label.describe(), "quant": row.quant, "order": row.order, "warmup_steps": row.warmup,
                 "density": round(density, 4),
                 "effective_density": round((row.warmup + (steps - row.warmup) * density) / steps, 4),
                 "agreement": res["summary"]["agreement"], **t}
        if dense is None:
            dense = (res, t)
        else:
            p = [psnr(a / 255.0, b / 255.0) for a, b in zip(res["videos"], dense[0]["videos"])]
            s = [ssim(a / 255.0, b / 255.0) for a, b in zip(res["videos"], dense[0]["videos"])]
            entry.update(psnr_db=round(float(np.mean(p)), 2), psnr_db_min=round(float(np.min(p)), 2),
                         ssim=round(float(np.mean(s)), 4))
            if row.oracle is None and t["attn_ms"] > 0:
                entry.update(attn_speedup=round(dense[1]["attn_ms"] / t["attn_ms"], 3),
                             gen_speedup=round(dense[1]["seconds"] / t["seconds"], 3))
        entry["wall_s"] = round(time.perf_counter() - t0, 1)
        rows.append(entry)
        print(json.dumps(entry), flush=True)
        write_result(args.out_dir, args.name, tag, date, doc)  # after every row: a cut-off run keeps what it measured
    return doc


if __name__ == "__main__":
    main()
