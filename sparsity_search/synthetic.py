"""Synthetic heads whose attention truly follows a known pattern (for tests and benchmarks).

Logits are a negative anisotropic squared distance between token coordinates, written as a dot
product ``q_i . k_j = -sum_a alpha_a (c_ia - c_ja)^2`` (expanded: ``2 alpha c_i.c_j - alpha |c_i|^2 -
alpha |c_j|^2``), so a head attends to a box-like neighbourhood whose half-size per axis is its
radius. Kinds: ``window3d`` (t, h, w radii), ``frame_periodic`` (no t term: every frame), ``stripes``
(a large bias on the first frame's keys), ``dense`` (random, diffuse), ``silent`` (V nearly zero).
"""

from __future__ import annotations

import torch

from vdit_accel.grid import VideoGrid

SHARPNESS = 6.0  # logit drop at one radius past the planted radius: the box edge


def _coords(grid: VideoGrid) -> torch.Tensor:
    t, y, x = torch.meshgrid(torch.arange(grid.t), torch.arange(grid.h), torch.arange(grid.w), indexing="ij")
    return torch.stack([t.flatten(), y.flatten(), x.flatten()], 1).double()  # [V, 3]


def planted_head(kind: str, grid: VideoGrid, head_dim: int = 64, generator=None, **radii):
    """(q, k, v) of one head, each [S, head_dim] float32, for a video-only grid."""
    if grid.text_len:
        raise ValueError("planted heads are defined on video-only grids")
    c = _coords(grid)
    v_tok = c.shape[0]
    q = torch.zeros(v_tok, head_dim, dtype=torch.float64)
    k = torch.zeros_like(q)
    v = torch.randn(v_tok, head_dim, generator=generator, dtype=torch.float64)
    if kind in ("window3d", "frame_periodic"):
        axes = [(0, radii.get("t")), (1, radii["h"]), (2, radii["w"])]
        if kind == "frame_periodic":
            axes = axes[1:]
        col = 0
        for axis, r in axes:
            alpha = SHARPNESS / (r + 1.0) ** 2
            ca = c[:, axis]
            # -alpha (ci - cj)^2 = 2 alpha ci cj - alpha ci^2 - alpha cj^2
            q[:, col], k[:, col] = 2 * alpha * ca, ca
            q[:, col + 1], k[:, col + 1] = -alpha * ca**2, 1.0
            q[:, col + 2], k[:, col + 2] = 1.0, -alpha * ca**2
            col += 3
        # A box, not a Gaussian: scale up so that inside the radius logits are within a few units.
    elif kind == "clustered":
        # Tokens belong to `clusters` random semantic groups, scattered over the grid; a token attends
        # its own group (what k-means orders are for).
        n = radii.get("clusters", 16)
        labels = torch.randint(0, n, (v_tok,), generator=generator)
        centres = torch.randn(n, head_dim, generator=generator, dtype=torch.float64)
        centres = centres / centres.norm(dim=1, keepdim=True) * 4.0
        q = centres[labels] + 0.1 * torch.randn(v_tok, head_dim, generator=generator, dtype=torch.float64)
        k = centres[labels] + 0.1 * torch.randn(v_tok, head_dim, generator=generator, dtype=torch.float64)
        # logits q.k ~ 16 within a group, ~0 across groups (after the 1/sqrt(D) fold below: x sqrt(D))
    elif kind == "stripes":
        q[:, 0] = 1.0
        k[:, 0] = torch.where(c[:, 0] == 0, 12.0, 0.0)
    elif kind == "dense":
        q = torch.randn(v_tok, head_dim, generator=generator, dtype=torch.float64) * 0.05
        k = torch.randn(v_tok, head_dim, generator=generator, dtype=torch.float64) * 0.05
        v = v * (v_tok / 8) ** 0.5  # as loud as a head averaging ~8 keys: it matters to the layer
    elif kind == "silent":
        q = torch.randn(v_tok, head_dim, generator=generator, dtype=torch.float64) * 0.05
        k = torch.randn(v_tok, head_dim, generator=generator, dtype=torch.float64) * 0.05
        v = v * 1e-3
    else:
        raise ValueError(f"unknown planted kind {kind!r}")
    # The kernels scale scores by 1/sqrt(head_dim); fold its inverse into q.
    q = q * head_dim**0.5
    return q.float(), k.float(), v.float()
