"""One denoising step of real video DiTs at real size: dense cuDNN against our kernels.

    python benchmarks/e2e.py                              # Wan2.1-1.3B at 480p and 720p
    python benchmarks/e2e.py --shapes wan2.1-14b-720p --reps 2

Transformers are built from their real configs with random weights (the speed is the same as with
trained ones), in bf16 on the GPU, and called once per step with batch 1 (one transformer forward).
Rows (BENCHMARKS.md format, `ms` = step time, `attn_ms` = the step's self-attention time):

- `dense-cudnn`: diffusers' own attention path with PyTorch SDPA held to its cuDNN backend;
- `ours-dense`: patched with the dense strategy (our Triton kernel);
- `ours-window3d-0.15`: a uniform `window3d` whose block density is nearest 0.15 on that grid;
- `flex-window3d-0.15`: the same patch and block masks, attention computed by FlexAttention (compiled);
- `noop-attention` (the floor): self-attention replaced by a copy of V.

`attn_ms` of a row = its step time minus the no-op step time; peak memory is `max_memory_allocated`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
import time
from pathlib import Path

import torch

SHAPES = {  # name: (family, config, latent (frames, height, width), text tokens)
    "wan2.1-1.3b-480p": ("wan", "1.3b", (21, 60, 104)),
    "wan2.1-1.3b-720p": ("wan", "1.3b", (21, 90, 160)),
    "wan2.1-14b-720p": ("wan", "14b", (21, 90, 160)),
}
WAN = {
    "1.3b": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
    "14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
}
WAN_COMMON = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WINDOWS = [(t, h, w) for t in (1, 2, 3, 4) for h, w in ((6, 10), (8, 12), (10, 16), (12, 20), (14, 24))]


def build(shape: str, device="cuda", dtype=torch.bfloat16):
    from diffusers import WanTransformer3DModel

    family, size, (f, h, w) = SHAPES[shape]
    with torch.device(device):
        model = WanTransformer3DModel(**WAN_COMMON, **WAN[size]).to(dtype).eval().requires_grad_(False)
    g = torch.Generator(device).manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 16, f, h, w, device=device, dtype=dtype, generator=g),
        timestep=torch.tensor([500], device=device),
        encoder_hidden_states=torch.randn(1, 512, 4096, device=device, dtype=dtype, generator=g),
        return_dict=False,
    )
    return model, inputs


def window_near(grid, target: float) -> str:
    from vdit_accel.patterns import build_block_mask

    best = min(WINDOWS, key=lambda r: abs(build_block_mask(
        [{"kind": "window3d", "t": r[0], "h": r[1], "w": r[2]}], grid).density() - target))
    return f"window3d:t={best[0]},h={best[1]},w={best[2]}"


def flex_attention_fn():
    """Our backend's attention computed by FlexAttention (compiled) on the same block mask."""
    from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    cache = {}

    def fn(q, k, v, block_mask=None, *, scale=None, return_lse=False):
        key = id(block_mask)
        if key not in cache:
            cache[key] = FlexBlockMask.from_kv_blocks(
                block_mask.kv_num_blocks, block_mask.kv_indices, BLOCK_SIZE=(block_mask.block_m, block_mask.block_n),
                seq_lengths=(block_mask.seq_len, block_mask.seq_len))
        out = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=cache[key], scale=scale)
        return out.transpose(1, 2)

    return fn


def time_step(model, inputs, reps: int) -> tuple[float, float]:
    torch.cuda.synchronize()
    with torch.no_grad():
        model(**inputs)  # warm-up: compilation, masks, allocator
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(**inputs)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2], torch.cuda.max_memory_allocated() / 2**30


def run_shape(shape: str, reps: int, variants: list[str]) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import vdit_accel
    from vdit_accel.grid import VideoGrid
    from vdit_accel.pipelines import op as vdit_op
    from vdit_accel.pipelines import patch_state

    model, inputs = build(shape)
    _, _, (f, h, w) = SHAPES[shape]
    grid = VideoGrid(f, h // 2, w // 2)
    window = window_near(grid, 0.15)
    plans = {
        "dense-cudnn": (None, None),
        "ours-dense": ("dense", None),
        "ours-window3d-0.15": (window, None),
        "flex-window3d-0.15": (window, flex_attention_fn()),
        "noop-attention": ("dense", lambda q, k, v, block_mask=None, **kw: v.clone()),  # a copy: ops may not alias
    }
    rows, original = [], vdit_op.attention  # what the vdit::attention op calls
    for name in ["noop-attention"] + [v for v in variants if v != "noop-attention"]:
        strategy, attention_fn = plans[name]
        row = {"shape": shape, "impl": name, "tokens": grid.seq_len, "ms": None, "attn_ms": None}
        try:
            if strategy is not None:
                vdit_accel.patch(model, strategy)
            if attention_fn is not None:
                vdit_op.attention = attention_fn
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                row["ms"], row["peak_gib"] = time_step(model, inputs, reps)
            if strategy is not None:
                st = patch_state(model)
                row["density"] = round(st.mean_density(st.grid), 4)
                row["strategy"] = strategy
        except Exception as exc:  # one failing variant records its error; the run goes on
            row["error"] = f"{type(exc).__name__}: {exc}"[:400]
        finally:
            vdit_op.attention = original
            if patch_state(model) is not None:
                vdit_accel.unpatch(model)
        rows.append(row)
        print(json.dumps(row), flush=True)
    floor = rows[0]["ms"]
    dense = next((r["ms"] for r in rows if r["impl"] == "dense-cudnn"), None)
    for r in rows:
        if r["ms"] is not None and floor is not None:
            r["attn_ms"] = round(r["ms"] - floor, 2) if r["impl"] != "noop-attention" else 0.0
        if r["ms"] is not None and dense is not None:
            r["speedup_vs_dense_cudnn"] = round(dense / r["ms"], 3)
    del model, inputs
    torch.cuda.empty_cache()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["wan2.1-1.3b-480p", "wan2.1-1.3b-720p"])
    ap.add_argument("--variants", nargs="+", default=["dense-cudnn", "ours-dense", "ours-window3d-0.15", "flex-window3d-0.15"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--git-sha", default="unknown")
    args = ap.parse_args(argv)
    import diffusers
    import triton

    gpu = torch.cuda.get_device_name()
    today = dt.date.today()
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    result = {"gpu": gpu, "date": today.isoformat(),
              "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
              "versions": {"torch": torch.__version__, "triton": triton.__version__, "diffusers": diffusers.__version__,
                           "vdit_accel": args.git_sha},
              "protocol": f"one transformer forward (batch 1, bf16, random weights), median of {args.reps} after a warm-up",
              "rows": []}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"e2e-{slug}-{today:%Y%m%d}.json"
    t0 = time.perf_counter()
    for shape in args.shapes:
        result["rows"] += run_shape(shape, args.reps, args.variants)
        path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n| shape | impl | density | step ms | self-attn ms | speed-up vs dense cuDNN | peak GiB |\n|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['shape']} | {r['impl']} | {r.get('density', 1.0)} | {r['ms']} | {r['attn_ms']} | "
              f"{r.get('speedup_vs_dense_cudnn')} | {r.get('peak_gib', 0):.1f} |" + (f" ERROR {r['error']}" if 'error' in r else ""))
    print(f"\nwrote {path} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
