"""Quality of accelerated generations on the trained tiny Wan (``"wan-trained"``): PSNR and SSIM
against dense generations of the same prompts and seeds, and the caption check of each.

    python benchmarks/quality.py --out-dir benchmarks/results                      # GPU: large size
    python benchmarks/quality.py --size default --prompts 4 --out-dir /tmp/q       # CPU, quicker

The prompts are the held-out check captions of ``vdit_accel.toyvideo.check_scenes()`` (seeds 1000 + i,
as ``benchmarks/check_trained.py``). Dense = the unpatched pipeline (diffusers' own attention). Rows:

- ``ours-dense``: our dense kernel: the floor (two correct attentions differ in rounding, and 20
  guided denoising steps amplify it);
- ``window3d-0.50`` / ``-0.25`` / ``-0.10``: the uniform ``window3d`` whose block density on the
  size's grid is nearest 50 / 25 / 10 % (``cli.bench.window_near``), every step sparse;
- ``fp8`` / ``int8`` / ``int4``: dense pattern, every head quantized (no bf16 steps);
- ``semantic`` / ``semantic-refresh2`` / ``-refresh8`` / ``semantic-iters1``: every head in the semantic
  token order (k-means of Q and K per head and call, key blocks up to 95% of the centroid-estimated mass;
  ``refresh=n``: the plan recomputed every n-th denoising step and reused in between — with guidance,
  the step's two calls share it; ``iters=1``: one more Lloyd update on a sample of each plan's
  tokens), dense pattern; ``density`` is then the mean block density of the plans the run made
  (``runtime_density``);
- ``searched``: ``vdit-accel search``'s strategy (global budget 0.05) found on 4 training captions
  (never the check captions) at the same size (``--no-search`` skips it).

Each row: mean and minimum PSNR (dB) and mean SSIM over the prompts, the mean block density, the check's
agreement on the accelerated videos (dense's is the ``dense`` row), seconds. On a CPU the quantized
modes run their float64 simulation of the GPU arithmetic. Writes ``<name>-<device>-<yyyymmdd>.json``
(``--name``, default ``quality``); ``--only semantic,semantic-refresh2`` runs those rows (and ``dense``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_trained import run_check  # noqa: E402
from result_files import run_header, write_result  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = ("dense", "ours-dense", "window3d-0.50", "window3d-0.25", "window3d-0.10", "fp8", "int8", "int4", "semantic",
        "semantic-refresh2", "semantic-refresh8", "semantic-iters1", "searched")


def main(argv: list[str] | None = None) -> dict:
    import vdit_accel
    from vdit_accel import toyvideo
    from vdit_accel.cli.bench import window_near
    from vdit_accel.pipelines import patch_state, trained
    from vdit_accel.quant import QUANT_MODES
    from vdit_accel.video import psnr, ssim

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", type=Path, default=None, help="weights directory (default: shipped in the package)")
    ap.add_argument("--size", choices=("default", "large"), default="large")
    ap.add_argument("--prompts", type=int, default=20, help="how many check captions (of 20)")
    ap.add_argument("--steps", type=int, default=trained.TRAINED_DEFAULTS.steps)
    ap.add_argument("--guidance-scale", type=float, default=trained.GUIDANCE_SCALE)
    ap.add_argument("--no-search", action="store_true", help="skip the searched strategy")
    ap.add_argument("--device", default=None)
    ap.add_argument("--only", default=None, help="comma-separated rows to run (dense always runs: the reference)")
    ap.add_argument("--name", default="quality", help="the result file's name before the device tag")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    only = None if args.only is None else set(args.only.split(","))
    if only is not None and only - set(ROWS):
        raise SystemExit(f"--only: no row named {', '.join(sorted(only - set(ROWS)))} (rows: {', '.join(ROWS)})")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    d = trained.TRAINED_DEFAULTS
    size = dict(trained.LARGE_SIZE) if args.size == "large" else dict(num_frames=d.frames, height=d.height, width=d.width)
    batch = 4 if device == "cuda" else 1
    pipe = trained.build_trained_pipeline(args.weights, dtype=dtype).to(device)

    def generate():
        t0 = time.perf_counter()
        res = run_check(pipe, size, args.steps, args.guidance_scale, batch, args.prompts, d.max_sequence_length)
        return res, time.perf_counter() - t0

    rows = []
    dense, secs = generate()
    rows.append({"impl": "dense", "density": 1.0, "agreement": dense["summary"]["agreement"], "seconds": round(secs, 1)})
    print(json.dumps(rows[-1]), flush=True)

    variants = [("ours-dense", "dense", None, None)]
    vdit_accel.patch(pipe, "window3d:t=1,h=1,w=1")  # only to read the call grid off the patched model
    pipe(prompt="a red circle moving left", num_inference_steps=1, max_sequence_length=d.max_sequence_length,
         output_type="latent", **size)
    grid = patch_state(pipe.transformer).grid
    vdit_accel.unpatch(pipe)
    for target in (0.5, 0.25, 0.1):
        variants.append((f"window3d-{target:.2f}", window_near(grid, target), None, None))
    for mode in QUANT_MODES:
        variants.append((mode, "dense", mode, None))
    variants += [("semantic", "dense", None, "semantic"), ("semantic-refresh2", "dense", None, "semantic:refresh=2"),
                 ("semantic-refresh8", "dense", None, "semantic:refresh=8"),
                 ("semantic-iters1", "dense", None, "semantic:iters=1")]
    assert [v[0] for v in variants] == [r for r in ROWS if r not in ("dense", "searched")]
    if only is not None:
        variants = [v for v in variants if v[0] in only]
    if not args.no_search and (only is None or "searched" in only):
        from vdit_accel.sparsity_search import SearchConfig, search

        t0 = time.perf_counter()
        calib = [s.caption for s in toyvideo.sample_scenes(4, 77, split="train")]
        call = dict(num_inference_steps=args.steps, max_sequence_length=d.max_sequence_length, output_type="latent",
                    guidance_scale=args.guidance_scale, **size)
        try:
            strategy = search(pipe, calib, SearchConfig(budget=0.05), call_kwargs=call)
        except Exception as e:  # the table without this row, and the reason in it
            rows.append({"impl": "searched", "error": f"{type(e).__name__}: {e}"})
            print(json.dumps(rows[-1]), flush=True)
        else:
            print(f"search: {strategy.describe()} in {time.perf_counter() - t0:.0f} s", flush=True)
            variants.append(("searched", strategy, None, None))
    for name, strategy, quant, order in variants:
        vdit_accel.patch(pipe, strategy, quant=quant, order=order)
        res, secs = generate()
        state = patch_state(pipe.transformer)
        density = _plans_density(state) if order else state.mean_density(grid)
        vdit_accel.unpatch(pipe)
        p = [psnr(a / 255.0, b / 255.0) for a, b in zip(res["videos"], dense["videos"])]
        s = [ssim(a / 255.0, b / 255.0) for a, b in zip(res["videos"], dense["videos"])]
        rows.append({"impl": name, "strategy": strategy if isinstance(strategy, str) else strategy.describe(),
                     "quant": quant, **({"order": order} if order else {}), "density": round(density, 4),
                     "psnr_db": round(float(np.mean(p)), 2),
                     "psnr_db_min": round(float(np.min(p)), 2), "ssim": round(float(np.mean(s)), 4),
                     "agreement": res["summary"]["agreement"], "seconds": round(secs, 1)})
        print(json.dumps(rows[-1]), flush=True)

    tag, date, doc = run_header("quality.py", argv, device)
    doc.update({"model": "wan-trained", "weights": str(args.weights or trained.WEIGHTS_DIR), "size": size,
                "tokens": grid.seq_len, "steps": args.steps, "guidance_scale": args.guidance_scale,
                "prompts": args.prompts, "dtype": str(dtype).replace("torch.", ""), "rows": rows})
    write_result(args.out_dir, args.name, tag, date, doc)
    return doc


def _plans_density(state) -> float:
    """Mean block density of the last per-call plans (semantic / segment) of every layer of a patched run."""
    dens = [float(entry[2].float().mean()) for mem in state.orders.memory.values() for key, entry in mem.items()
            if isinstance(key, tuple) and key[0] == "plan"]
    if not dens:
        raise RuntimeError("the run made no per-call plan: nothing to measure the density of")
    return sum(dens) / len(dens)


if __name__ == "__main__":
    main()
