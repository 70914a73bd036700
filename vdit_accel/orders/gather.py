"""Moving tokens between orders: row gathers of (B, S, H, D) tensors, one Triton launch on the GPU."""

from __future__ import annotations

import torch

from ..kernels import use_triton
from .static import inverse



def _flat_index(idx: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """Row indices into ``x.reshape(B * S * H, D)`` for ``out[b, i, h] = x[b, idx[b, h, i], h]``."""
    s = idx.shape[-1]
    idx = idx.expand(batch, heads, s)
    b = torch.arange(batch, device=idx.device).view(batch, 1, 1)
    h = torch.arange(heads, device=idx.device).view(1, heads, 1)
    return ((b * s + idx) * heads + h).transpose(1, 2).reshape(-1)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``out[b, i, h] = x[b, idx[b, h, i], h]`` for ``x`` (B, S, H, D) and ``idx`` ``[S]`` (every head)
    or ``[B or 1, H, S]`` (per head): one row gather (one Triton launch on the GPU), contiguous out."""
    if idx.dim() == 1:
        return x.index_select(1, idx)
    return gather_tokens_many([x], idx)[0]


def gather_tokens_many(xs: list[torch.Tensor], idx: torch.Tensor) -> list[torch.Tensor]:
    """:func:`gather_tokens` of several tensors of one shape by one index (k and v): one launch on the GPU."""
    if idx.dim() == 1:
        return [x.index_select(1, idx) for x in xs]
    x0 = xs[0]
    if use_triton(x0) and len(xs) <= 3 and x0.stride(3) == 1 and all(x.stride() == x0.stride() for x in xs):
        from ..kernels.permute import gather_rows

        return gather_rows(xs, idx)
    b, s, h, d = x0.shape
    flat = _flat_index(idx, b, h)
    return [x.reshape(b * s * h, d).index_select(0, flat).view(b, s, h, d) for x in xs]


def scatter_tokens(y: torch.Tensor, idx: torch.Tensor, inv: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of :func:`gather_tokens`: ``out[b, idx[b, h, i], h] = y[b, i, h]``. ``inv``: the
    inverse permutation of ``idx`` if known; on the GPU the scatter is then a gather by it (one launch)."""
    if idx.dim() == 1:
        return torch.empty_like(y).index_copy_(1, idx, y)
    if use_triton(y) and y.stride(3) == 1:
        return gather_tokens_many([y], inverse(idx) if inv is None else inv)[0]
    b, s, h, d = y.shape
    out = torch.empty(b * s * h, d, dtype=y.dtype, device=y.device)
    return out.index_copy_(0, _flat_index(idx, b, h), y.reshape(b * s * h, d)).view(b, s, h, d)

