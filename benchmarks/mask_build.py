"""Cold build time of a layer's per-head block mask on the GPU (every mask cache cleared first).

    python benchmarks/mask_build.py

Not yet run: the numbers in README/notes for the box builder are to come from this script."""
import time

import torch

from vdit_accel import VideoGrid
from vdit_accel.patterns import build_block_mask, clear_mask_caches

grids = {"cog": VideoGrid(13, 30, 45, 226, "prefix"), "wan": VideoGrid(21, 30, 52), "hunyuan": VideoGrid(33, 45, 80, 240, "suffix")}
ratios = [(1.0, 1.0, 1.0), (0.5, 1.5, 1.5), (2.0, 0.6, 0.6), (1.0, 0.5, 2.0)]
for name, g in grids.items():
    for heads, distinct in ((24, 4), (24, 24)):
        pats = [{"kind": "window3d", "t": int(0.1 * ratios[i % 4][0] * g.t) + i // 4 * (distinct > 4),
                 "h": int(0.1 * ratios[i % 4][1] * g.h), "w": int(0.1 * ratios[i % 4][2] * g.w)} for i in range(heads)]
        build_block_mask(pats, g, device="cuda"); torch.cuda.synchronize()  # warm kernels
        ts = []
        for _ in range(3):
            clear_mask_caches(); torch.cuda.synchronize(); t0 = time.perf_counter()
            m = build_block_mask(pats, g, device="cuda"); torch.cuda.synchronize(); ts.append((time.perf_counter() - t0) * 1e3)
        print(f"{name}: {heads} heads, {len({str(p) for p in pats})} distinct patterns: cold build {sorted(ts)[1]:.2f} ms, density {m.density():.3f}")
