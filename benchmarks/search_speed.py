"""Time the offline search on a real-size transformer: Wan2.1-1.3B's config with random weights,
480x832, 81 frames (a 21x30x52 token grid), one prompt, every denoising step profiled, the schedule
solved and, with ``--min-psnr``, verified end to end (decoded videos, dense and accelerated) and tuned.

    python benchmarks/search_speed.py [--steps 50] [--min-psnr 30] [--max-probes 6] [--out-dir benchmarks/results]

Weights are random (no hub here), which does not change the time (the PSNRs it reaches mean nothing). The
text encoder is a tiny UMT5 with Wan's text width; the VAE is Wan's config, random, decoding real-size
videos for the verification. Writes benchmarks/results/search-<gpu>-<date>.json (rows with `seconds`, and
the probes and generations the tuning spent) and the strategy beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from result_files import result_path, run_header, write_result  # noqa: E402

WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def build_pipeline(device="cuda", dtype=torch.bfloat16):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(**WAN_1_3B).to(device, dtype)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=384, d_model=4096, d_kv=64, d_ff=256, num_layers=1,
                                               num_heads=8)).to(device, dtype)
    pipe = WanPipeline(tokenizer=ByT5Tokenizer(), text_encoder=text_encoder, vae=AutoencoderKLWan(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--git-sha", default="unknown")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--steps", type=int, default=50, help="denoising steps (every one profiled)")
    ap.add_argument("--min-psnr", type=float, default=30.0, help="the target to verify and tune to (0: no verification)")
    ap.add_argument("--max-probes", type=int, default=6)
    args = ap.parse_args(argv)
    from vdit_accel.sparsity_search import SearchConfig, search

    t0 = time.perf_counter()
    pipe = build_pipeline()
    build_s = time.perf_counter() - t0
    call = dict(height=args.height, width=args.width, num_frames=args.frames, num_inference_steps=args.steps,
                max_sequence_length=64, output_type="latent")
    t0 = time.perf_counter()
    config = SearchConfig(min_psnr=args.min_psnr or None, max_probes=args.max_probes)
    strategy = search(pipe, ["a red fox running through fresh snow"], config, call_kwargs=call)
    seconds = time.perf_counter() - t0
    verification = strategy.search.get("verification", {})
    tag, today, result = run_header("search_speed.py", None, "cuda", args.git_sha)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    strategy.save(result_path(args.out_dir, "search-strategy-wan1.3b", tag, today))
    result.update({
        "rows": [{"shape": "wan1.3b-81f-480p", "impl": "search" + ("-verified" if verification else ""),
                  "seconds": round(seconds, 1), "pipeline_build_s": round(build_s, 1), "prompts": 1,
                  "profiled_steps": len(strategy.search["profiled_steps"]), "grid": strategy.search["grid"],
                  "candidates": strategy.search["candidates"],
                  "effective_density": strategy.search["accounting"]["effective_density"],
                  "mean_error": strategy.search["mean_error"], "dense_warmup_steps": strategy.dense_warmup_steps,
                  "cost_model": strategy.search["cost_model"]["source"], "probes": len(verification.get("probes", [])),
                  "generations": verification.get("generations", 0), "verdict": verification.get("verdict")}],
    })
    print(json.dumps(result["rows"][0]))
    write_result(args.out_dir, "search", tag, today, result)


if __name__ == "__main__":
    main()
