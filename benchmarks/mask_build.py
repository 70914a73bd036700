"""Cold build time of a layer's per-head block mask on the GPU (every mask cache cleared first).

    python benchmarks/mask_build.py [--out-dir benchmarks/results]

Writes mask-build-<gpu>-<date>.json (median of 3 cold builds per grid and head set)."""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from result_files import run_header, write_result  # noqa: E402
from vdit_accel import VideoGrid  # noqa: E402
from vdit_accel.patterns import build_block_mask, clear_mask_caches  # noqa: E402

grids = {"cog": VideoGrid(13, 30, 45, 226, "prefix"), "wan": VideoGrid(21, 30, 52), "hunyuan": VideoGrid(33, 45, 80, 240, "suffix")}
ratios = [(1.0, 1.0, 1.0), (0.5, 1.5, 1.5), (2.0, 0.6, 0.6), (1.0, 0.5, 2.0)]
ap = argparse.ArgumentParser()
ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
args = ap.parse_args()
rows = []
for name, g in grids.items():
    for heads, distinct in ((24, 4), (24, 24)):
        pats = [{"kind": "window3d", "t": int(0.1 * ratios[i % 4][0] * g.t) + i // 4 * (distinct > 4),
                 "h": int(0.1 * ratios[i % 4][1] * g.h), "w": int(0.1 * ratios[i % 4][2] * g.w)} for i in range(heads)]
        build_block_mask(pats, g, device="cuda"); torch.cuda.synchronize()  # warm kernels
        ts = []
        for _ in range(3):
            clear_mask_caches(); torch.cuda.synchronize(); t0 = time.perf_counter()
            m = build_block_mask(pats, g, device="cuda"); torch.cuda.synchronize(); ts.append((time.perf_counter() - t0) * 1e3)
        rows.append(dict(grid=name, heads=heads, distinct_patterns=len({str(p) for p in pats}), cold_build_ms=round(sorted(ts)[1], 3),
                         density=round(m.density(), 4)))
        print(rows[-1], flush=True)
tag, date, doc = run_header("mask_build.py", None, "cuda")
write_result(args.out_dir, "mask-build", tag, date, {**doc, "rows": rows})
