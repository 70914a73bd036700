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


# -------------------------------------------------------------------------------------------------
# Head sets for measuring token orders (benchmarks/permutation.py, tests/core/test_orders.py)
# -------------------------------------------------------------------------------------------------

# local3d: attention decaying with 3D distance, logits = -1/2 sum_a ((c_a - c'_a) / sigma_a)^2 (a
# Gaussian in latent frames, rows and columns), every combination of sigma_t in {0.5, 1, 2} frames,
# sigma_h in {1, 2, 4} rows and sigma_w / sigma_h in {0.5, 1, 2}: 27 heads, from nearly frame-local
# and a few tokens wide to ~+-4 frames x +-8 rows x +-16 columns at 95% of the mass; no diffuse floor,
# no sink tokens (a head with those is not "local"). Fixed before any order was measured on them.
LOCAL3D_SIGMAS = tuple((st, sh, sh * r) for st in (0.5, 1.0, 2.0) for sh in (1.0, 2.0, 4.0) for r in (0.5, 1.0, 2.0))

# clustered: every video token belongs to one of n semantic groups and attends its own group: the
# query and key of a token are its group's centre plus noise (0.3 of the centre's norm per token),
# centres random directions, the logit inside a group is `gap`, across groups ~0. Groups are either
# scattered over the video (labels drawn per token) or objects (the Voronoi cells of n random seeds
# in (t, h, w), so groups are contiguous regions). n in {8, 32, 128} x layout x gap in {8, 16}: 12 heads.
CLUSTERED_SPECS = tuple((n, layout, gap) for n in (8, 32, 128) for layout in ("scattered", "objects") for gap in (8.0, 16.0))

HEAD_SETS = ("local3d", "clustered")


def local3d_head(grid: VideoGrid, sigma: tuple[float, float, float], head_dim: int = 16):
    """(q, k) ``[V, head_dim]`` float32 of one Gaussian 3D-local head (see :data:`LOCAL3D_SIGMAS`); the
    kernels' ``1 / sqrt(head_dim)`` is folded into q. Coordinates are centred (smaller logits' terms)."""
    if head_dim < 6:
        raise ValueError("a local3d head needs head_dim >= 6")
    c = _coords(grid)
    c = c - c.mean(0)
    q = torch.zeros(c.shape[0], head_dim, dtype=torch.float64)
    k = torch.zeros_like(q)
    for a, s in enumerate(sigma):
        alpha = 0.5 / s**2
        # -alpha (ci - cj)^2 = 2 alpha ci cj - alpha cj^2 - alpha ci^2; the last term is the same for
        # every key of a query, which softmax ignores.
        q[:, 2 * a], k[:, 2 * a] = 2 * alpha * c[:, a], c[:, a]
        q[:, 2 * a + 1], k[:, 2 * a + 1] = 1.0, -alpha * c[:, a] ** 2
    return (q * head_dim**0.5).float(), k.float()


def clustered_head(grid: VideoGrid, n: int, layout: str, gap: float, head_dim: int = 64, generator=None):
    """(q, k) ``[V, head_dim]`` float32 of one clustered head (see :data:`CLUSTERED_SPECS`)."""
    v_tok = grid.video_len
    if layout == "scattered":
        labels = torch.randint(0, n, (v_tok,), generator=generator)
    elif layout == "objects":
        c = _coords(grid)
        seeds = torch.rand(n, 3, generator=generator, dtype=torch.float64) * torch.tensor([grid.t, grid.h, grid.w])
        labels = torch.cdist(c, seeds).argmin(1)
    else:
        raise ValueError(f"unknown clustered layout {layout!r}; use 'scattered' or 'objects'")
    centres = torch.randn(n, head_dim, generator=generator, dtype=torch.float64)
    centres = centres / centres.norm(dim=1, keepdim=True) * gap**0.5
    noise = 0.3 * gap**0.5 / head_dim**0.5
    q = centres[labels] + noise * torch.randn(v_tok, head_dim, generator=generator, dtype=torch.float64)
    k = centres[labels] + noise * torch.randn(v_tok, head_dim, generator=generator, dtype=torch.float64)
    return (q * head_dim**0.5).float(), k.float()


def head_set(name: str, grid: VideoGrid, head_dim: int = 64, seed: int = 0):
    """(q, k, specs) of a named head set on a video-only grid: q, k ``[H, V, head_dim]`` float32 (scale
    folded into q), ``specs`` one description per head. ``name``: ``local3d`` or ``clustered``."""
    if grid.text_len:
        raise ValueError("head sets are defined on video-only grids")
    g = torch.Generator().manual_seed(seed)
    if name == "local3d":
        heads = [local3d_head(grid, s, head_dim) for s in LOCAL3D_SIGMAS]
        specs = [{"sigma_t": s[0], "sigma_h": s[1], "sigma_w": s[2]} for s in LOCAL3D_SIGMAS]
    elif name == "clustered":
        heads = [clustered_head(grid, n, layout, gap, head_dim, g) for n, layout, gap in CLUSTERED_SPECS]
        specs = [{"groups": n, "layout": layout, "gap": gap} for n, layout, gap in CLUSTERED_SPECS]
    else:
        raise ValueError(f"unknown head set {name!r}; use one of {HEAD_SETS}")
    return torch.stack([h[0] for h in heads]), torch.stack([h[1] for h in heads]), specs
