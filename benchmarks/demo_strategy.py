"""The default demo's strategy on ``wan-trained``: does the accelerated video keep the dense one?

    python benchmarks/demo_strategy.py --prompts 8 --out-dir benchmarks/results \\
        --strategy cli/strategies/wan-trained.json --strategy window3d:t=1,h=2,w=2

What ``vdit-accel generate`` does, per prompt: the dense run (the unpatched pipeline, diffusers'
attention) and the accelerated run (patched with each ``--strategy``), same prompt and seed, batch 1,
at the model's default size (17x128x128, 40 steps, guidance 5; ``--size large``: 17x256x256). The
prompts: the demo's own (seed 0), then the held-out check captions of
``vdit_accel.pipelines.toy.check_scenes()`` with seeds 1000 + i (as ``benchmarks/check_trained.py``).

Per strategy and prompt: PSNR and SSIM of the accelerated frames against the dense ones, and the
caption check (``toy.check_video``) of both videos; per strategy: mean and minimum PSNR, the
agreement of the check on dense and on accelerated videos (and on how many prompts the two verdicts
are the same), the block density of the sparse steps and over the whole run (dense warm-up steps count
as 1.0). On a CPU the sparse attention runs PyTorch's reference path, so the seconds are not the
kernels' speed. Writes ``demo-strategy-<device>-<yyyymmdd>.json`` (``--name``).
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
from result_files import RESULTS, run_header, write_result  # noqa: E402

DEMO_PROMPT = "a red circle moving left on a blue background"


def prompts_and_seeds(n: int, with_demo: bool = True) -> list[tuple[str, int]]:
    """The demo's prompt with seed 0 (if ``with_demo``), then check captions with seeds 1000 + i, ``n`` in all."""
    from vdit_accel.pipelines import toy

    singles, _ = toy.check_scenes()
    jobs = [(DEMO_PROMPT, 0)] if with_demo else []
    jobs += [(s.caption, 1000 + i) for i, s in enumerate(singles)]
    return jobs[:n]


def generate_one(pipe, prompt: str, seed: int, size: dict, steps: int, guidance: float, max_sequence_length: int) -> np.ndarray:
    """One video as ``vdit-accel generate`` makes it (float frames in [0, 1])."""
    out = pipe(prompt=prompt, height=size["height"], width=size["width"], num_frames=size["num_frames"],
               num_inference_steps=steps, guidance_scale=guidance, max_sequence_length=max_sequence_length,
               output_type="np", generator=torch.Generator(device="cpu").manual_seed(seed))
    return np.asarray(out.frames[0], np.float32)


def main(argv: list[str] | None = None) -> dict:
    import vdit_accel
    from vdit_accel.pipelines import toy
    from vdit_accel.pipelines import patch_state
    from vdit_accel.pipelines.toy import trained
    from vdit_accel.video import psnr, ssim

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--strategy", action="append", required=True,
                    help="a strategy file or short form (repeat); 'NAME@N' runs it with a dense warm-up of N steps")
    ap.add_argument("--prompts", type=int, default=8, help="how many prompts: the demo's, then check captions")
    ap.add_argument("--no-demo-prompt", action="store_true", help="check captions only")
    ap.add_argument("--size", choices=("default", "large"), default="default")
    ap.add_argument("--steps", type=int, default=trained.TRAINED_DEFAULTS.steps)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--device", default=None)
    ap.add_argument("--name", default="demo-strategy")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    d = trained.TRAINED_DEFAULTS
    size = dict(trained.LARGE_SIZE) if args.size == "large" else dict(num_frames=d.frames, height=d.height, width=d.width)
    guidance = d.call_kwargs["guidance_scale"]
    pipe = trained.build_trained_pipeline(dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    jobs = prompts_and_seeds(args.prompts, not args.no_demo_prompt)

    def gen(prompt, seed):
        return generate_one(pipe, prompt, seed, size, args.steps, guidance, d.max_sequence_length)

    t0 = time.perf_counter()
    dense = [gen(p, s) for p, s in jobs]
    dense_ok = [toy.check_video(v, p)["ok"] for v, (p, _) in zip(dense, jobs)]
    dense_s = time.perf_counter() - t0
    print(json.dumps({"dense": True, "ok": dense_ok, "seconds": round(dense_s, 1)}), flush=True)
    tag, date, doc = run_header("demo_strategy.py", argv, device)
    doc.update({"model": "wan-trained", "size": size, "steps": args.steps, "guidance_scale": guidance,
                "dtype": str(dtype).replace("torch.", ""), "block_size": args.block_size,
                "prompts": [{"prompt": p, "seed": s, "dense_check_ok": ok} for (p, s), ok in zip(jobs, dense_ok)],
                "dense_seconds": round(dense_s, 1),
                "note": ("on a CPU the sparse attention runs PyTorch's reference path (SDPA with the block mask "
                         "expanded to tokens): seconds are not the kernels' speed") if device == "cpu" else None,
                "rows": []})
    for spec in args.strategy:
        name, _, warm = spec.partition("@")
        strategy = vdit_accel.Strategy.from_spec(name, int(warm) if warm else None)
        vdit_accel.patch(pipe, strategy, block_size=args.block_size)
        t0 = time.perf_counter()
        try:
            videos = [gen(p, s) for p, s in jobs]
            state = patch_state(pipe.transformer)
            density = state.mean_density(state.grid)
            tokens = state.grid.seq_len
        finally:
            vdit_accel.unpatch(pipe)
        secs = time.perf_counter() - t0
        p = [psnr(a, b) for a, b in zip(videos, dense)]
        ok = [toy.check_video(v, q)["ok"] for v, (q, _) in zip(videos, jobs)]
        warmup = strategy.dense_warmup_steps
        row = {"strategy": spec, "describe": strategy.describe(), "tokens": tokens,
               "density_sparse_steps": round(density, 4),
               "density_over_run": round((warmup + (args.steps - warmup) * density) / args.steps, 4),
               "psnr_db": [round(x, 2) for x in p], "psnr_db_mean": round(float(np.mean(p)), 2),
               "psnr_db_min": round(float(np.min(p)), 2),
               "ssim_mean": round(float(np.mean([ssim(a, b) for a, b in zip(videos, dense)])), 4),
               "check_ok": ok, "agreement": round(float(np.mean(ok)), 3),
               "dense_agreement": round(float(np.mean(dense_ok)), 3),
               "same_verdict_as_dense": int(sum(a == b for a, b in zip(ok, dense_ok))), "seconds": round(secs, 1)}
        doc["rows"].append(row)
        print(json.dumps(row), flush=True)
        write_result(args.out_dir, args.name, tag, date, doc)  # after every row: a cut-off run keeps what it measured
    return doc


if __name__ == "__main__":
    main()
