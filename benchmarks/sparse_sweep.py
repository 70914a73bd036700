"""The sparse kernel's launch configs on the e2e's masks: index prefetch, warp specialization, stages.

    python benchmarks/sparse_sweep.py --out-dir OUT --git-sha SHA   # GPU -> attention-sweep-prefetch-<gpu>-<date>.json

Shapes: Wan2.1-1.3B at 480p (21x30x52 latent grid, 32760 tokens) and 720p (21x45x80, 75600), 12 heads,
head_dim 128, bf16 random q, k, v (B = 1). Masks: ``tiled`` -- the ``window3d`` pattern of
``vdit-accel bench pipeline``'s ``ours-window3d-0.15-tiled`` rows in the tiled order (the same blocks for
every head), and ``full`` (480p only) -- every key block listed, through the sparse loop, against the
dense kernel: what the sparse loop itself costs. ``ms``: triton's do_bench median; ``bit_equal``: the
output equals the first config's of the same mode bit for bit (the configs change no arithmetic;
fp8 with BLOCK_M=128 quantizes Q per 128-row tile, so it differs). A config that does not compile on
the installed triton is reported with its error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from result_files import run_header, write_result  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
_B = dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, tma=True)
_F = dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3, tma=True)
CONFIGS = {
    "bf16 ws": (None, dict(_B, warp_specialize=True)),
    "bf16": (None, _B),
    "bf16 prefetch": (None, dict(_B, prefetch_idx=True)),
    "bf16 ws prefetch": (None, dict(_B, warp_specialize=True, prefetch_idx=True)),
    "bf16 prefetch s2": (None, dict(_B, prefetch_idx=True, num_stages=2)),
    "fp8": ("fp8", _F),
    "fp8 prefetch": ("fp8", dict(_F, prefetch_idx=True)),
    "fp8 prefetch s4": ("fp8", dict(_F, prefetch_idx=True, num_stages=4)),
    "fp8 128x128 prefetch": ("fp8", dict(_B, prefetch_idx=True)),
}
SHAPES = {"wan2.1-1.3b-480p": ((21, 30, 52), "window3d:t=2,h=8,w=12"),
          "wan2.1-1.3b-720p": ((21, 45, 80), "window3d:t=4,h=8,w=12")}


def main(argv=None):
    from triton.testing import do_bench

    from vdit_accel import Strategy
    from vdit_accel.block_mask import BlockMask
    from vdit_accel.grid import VideoGrid
    from vdit_accel.kernels.attention_fwd import attention_fwd
    from vdit_accel.orders import block_mask_for_order, static_order

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--git-sha", default=None)
    args = ap.parse_args(argv)
    tag, date, doc = run_header("sparse_sweep.py", argv, "cuda")
    doc["git_sha"] = args.git_sha
    import triton

    doc["versions"]["triton"] = triton.__version__
    doc["rows"] = rows = []
    H, D = 12, 128
    for shape, (fhw, window) in SHAPES.items():
        grid = VideoGrid(*fhw)
        S, nb = grid.seq_len, -(-grid.seq_len // 128)
        st = Strategy.from_spec(window, order="tiled")
        p, o = st.default.pattern, st.default.order
        tiled = block_mask_for_order(p, grid, static_order(o, grid, 128, "cuda"), 128, 128).cuda()
        masks = {"tiled": BlockMask.from_dense(tiled[None, None].expand(1, H, -1, -1).contiguous(), S, 128, 128)}
        if S < 50000:
            masks["full"] = BlockMask.from_dense(torch.ones(1, H, nb, nb, dtype=torch.bool, device="cuda"), S, 128, 128)
        g = torch.Generator("cuda").manual_seed(0)
        q, k, v = (torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        for quant in (None, "fp8"):
            ms = do_bench(lambda: attention_fwd(q, k, v, quant=quant))
            rows.append({"shape": shape, "mask": "none (dense kernel)", "config": quant or "bf16", "density": 1.0,
                         "ms": ms})
            print(json.dumps(rows[-1]), flush=True)
        for mname, m in masks.items():
            first = {}
            for cname, (quant, cfg) in CONFIGS.items():
                row = {"shape": shape, "mask": mname, "config": cname, "launch": cfg, "density": m.density()}
                try:
                    call = (q, k, v, m.kv_num_blocks, m.kv_indices, 128, 128)
                    out = attention_fwd(*call, config=cfg, quant=quant)
                    row["bit_equal"] = torch.equal(out, first.setdefault(quant, out))
                    row["ms"] = do_bench(lambda: attention_fwd(*call, config=cfg, quant=quant))
                except Exception as e:  # a config this triton cannot compile
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    write_result(args.out_dir, "attention-sweep-prefetch", tag, date, doc)


if __name__ == "__main__":
    main()
