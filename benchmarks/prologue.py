"""Wan's self-attention prologue (Q/K RMSNorm across heads + RoPE): diffusers' eager code against the fused kernel.

    python benchmarks/prologue.py --out-dir OUT --git-sha SHA     # GPU -> prologue-<gpu>-<date>.json
    python benchmarks/prologue.py --smoke                         # tiny shape, CPU interpreter

For each shape, block 0's self-attention of the real transformer (random weights, bf16; the float32
rotary tables its ``rope`` module makes for the shape's latent grid), on the projected q and k of
random hidden states: ``eager_ms`` -- the lines of diffusers' ``WanAttnProcessor`` between the
projections and the attention call (``norm_q``, ``norm_k``, ``unflatten``, ``apply_rotary_emb`` on both);
``fused_ms`` -- :func:`vdit_accel.kernels.rope.qk_norm_rope`. Median of CUDA-event timings (25 warm-up
calls, 100 timed). ``per_step_saved_ms``: the difference times the transformer's layers. ``mismatch``:
the fraction of output elements whose bits differ from the eager result, ``max_abs_diff`` the largest
difference (both over q and k).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from result_files import run_header, write_result  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def eager_prologue(attn, query, key, rotary_emb):
    """diffusers 0.42 ``WanAttnProcessor.__call__`` from ``attn.norm_q`` to the rotation, verbatim in effect."""
    query = attn.norm_q(query)
    key = attn.norm_k(key)
    query = query.unflatten(2, (attn.heads, -1))
    key = key.unflatten(2, (attn.heads, -1))

    def apply_rotary_emb(hidden_states, freqs_cos, freqs_sin):
        x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
        cos = freqs_cos[..., 0::2]
        sin = freqs_sin[..., 1::2]
        out = torch.empty_like(hidden_states)
        out[..., 0::2] = x1 * cos - x2 * sin
        out[..., 1::2] = x1 * sin + x2 * cos
        return out.type_as(hidden_states)

    return apply_rotary_emb(query, *rotary_emb), apply_rotary_emb(key, *rotary_emb)


def _time(fn, device, warmup=25, reps=100) -> float:
    if device != "cuda":
        fn()
        return float("nan")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def measure(shape: str, device: str) -> dict:
    from vdit_accel.cli.bench import SHAPES, build_transformer
    from vdit_accel.kernels.rope import qk_norm_rope

    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    model, inputs = build_transformer(shape, device, dtype)
    attn = model.blocks[0].attn1
    with torch.no_grad():
        hidden = inputs["hidden_states"]
        rotary = model.rope(hidden)
        seq = rotary[0].shape[1]
        x = torch.randn(1, seq, model.config.num_attention_heads * model.config.attention_head_dim,
                        device=device, dtype=dtype)
        query, key = attn.to_q(x), attn.to_k(x)
        eps = (attn.norm_q.eps, attn.norm_k.eps)

        def fused():
            return qk_norm_rope(query, key, attn.heads, *rotary, attn.norm_q.weight, attn.norm_k.weight, *eps)

        ref, out = eager_prologue(attn, query, key, rotary), fused()
        diff = [(o.float() - r.float()).abs() for o, r in zip(out, ref)]
        mismatch = sum((o != r).sum().item() for o, r in zip(out, ref)) / sum(r.numel() for r in ref)
        eager_ms = _time(lambda: eager_prologue(attn, query, key, rotary), device)
        fused_ms = _time(fused, device)
    layers = len(model.blocks)
    del model, inputs
    return {"shape": shape, "what": SHAPES[shape].what, "tokens": seq, "heads": attn.heads,
            "rope_dtype": str(rotary[0].dtype).replace("torch.", ""), "dtype": str(dtype).replace("torch.", ""),
            "eager_ms": eager_ms, "fused_ms": fused_ms, "speedup": eager_ms / fused_ms, "layers": layers,
            "per_step_saved_ms": (eager_ms - fused_ms) * layers,
            "mismatch": mismatch, "max_abs_diff": max(d.max().item() for d in diff)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["wan2.1-1.3b-480p", "wan2.1-1.3b-720p", "wan2.1-14b-720p"])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--git-sha", default=None)
    args = ap.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    shapes = ["tiny-wan"] if args.smoke else args.shapes
    tag, date, doc = run_header("prologue.py", argv, device)
    doc["git_sha"] = args.git_sha
    doc["rows"] = []
    for shape in shapes:
        row = measure(shape, device)
        doc["rows"].append(row)
        print(json.dumps(row), flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    if not args.smoke:
        write_result(args.out_dir, "prologue", tag, date, doc)


if __name__ == "__main__":
    main()
