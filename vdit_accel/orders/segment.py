"""The key-only segment order (PBS-Attn style)."""

from __future__ import annotations

import math

import torch

from ..block_mask import cdiv
from ..grid import VideoGrid
from .semantic import top_p_keep
from .static import _dense_text, _with_text



def segment_key_order(importance: torch.Tensor, segment: int) -> torch.Tensor:
    """Key-only order (PBS-Attn style): within each segment of ``segment`` consecutive keys, keys
    sorted by decreasing ``importance`` (``[..., S]``, e.g. the attention mass a sample of queries gives
    each key), so that the few heavy keys of a segment share its first blocks.

    Only K and V are reordered (together), so the output needs no inverse permutation; locality
    between segments is kept. Returns the key permutation ``[..., S]``."""
    s = importance.shape[-1]
    seg = torch.arange(s, device=importance.device) // segment
    imp = importance.double()
    # Sort by (segment, -importance): segments stay in place, keys inside move.
    key = seg.double() * 4.0 - imp / imp.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    return torch.argsort(key, dim=-1, stable=True)


def _pooled_mass(q: torch.Tensor, k: torch.Tensor, block: int, scale: float) -> torch.Tensor:
    """Float ``[B, H, Mb, S]``: softmax over keys of each query block's mean query (all heads at once)."""
    b, s, h, d = q.shape
    mb = cdiv(s, block)
    pad = mb * block - s
    qf = torch.nn.functional.pad(q, (0, 0, 0, 0, 0, pad)) if pad else q
    pooled = qf.view(b, mb, block, h, d).sum(2, dtype=torch.float32)  # [B, Mb, H, D]
    if pad:  # the last block's mean over its real rows
        pooled[:, -1] *= block / (block - pad)
    pooled = pooled.mul_(scale / block).transpose(1, 2)  # [B, H, Mb, D]
    logits = torch.matmul(pooled.to(k.dtype), k.transpose(1, 2).transpose(2, 3))  # [B, H, Mb, S] in k's dtype
    return torch.softmax(logits, -1, dtype=torch.float32)


def segment_plan(q: torch.Tensor, k: torch.Tensor, grid: VideoGrid, size: int, top_p: float, block_m: int = 128,
                 block_n: int = 128, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The segment order of every head of one call and its block mask.

    Key importance = the attention mass the mean query of every query block gives each key (one
    ``[Mb, S]`` product per head); video keys sorted by it inside segments of ``size`` video keys (text
    keys stay); key blocks kept per query block by that mass up to ``top_p``; text rows and columns
    dense. Returns ``(k_perm [B, H, S], mask bool [B, H, Mb, Nb])``."""
    b, s, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    mass = _pooled_mass(q, k, block_m, scale)  # [B, H, Mb, S]
    vs, vl = grid.video_start, grid.video_len
    video = segment_key_order(mass[..., vs : vs + vl].sum(-2), size) + vs
    k_perm = _with_text(video, grid)
    nb = cdiv(s, block_n)
    moved = mass.gather(-1, k_perm[:, :, None, :].expand_as(mass))
    pad = nb * block_n - s
    if pad:
        moved = torch.nn.functional.pad(moved, (0, pad))
    mask = top_p_keep(moved.view(*moved.shape[:-1], nb, block_n).sum(-1), top_p)
    _dense_text(mask, grid, None, block_m, block_n)
    return k_perm, mask

