"""Pure-PyTorch reference attention: the ground truth every kernel is tested against.

Layout is diffusers' ``(B, S, H, D)``. With a :class:`~vdit_accel.block_mask.BlockMask` the reference
applies the mask exactly at token level: token ``i`` attends token ``j`` iff the pair
``(i // block_m, j // block_n)`` is listed for that batch element and head. A row that attends
nothing yields zeros and a log-sum-exp of ``-inf`` (the kernels' convention).
"""

from __future__ import annotations

import math

import torch

from .block_mask import BlockMask


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    compute_dtype: torch.dtype = torch.float64,
):
    """Softmax attention, non-causal, in ``compute_dtype``, one head at a time.

    Args:
        q, k, v: ``(B, S, H, D)``.
        block_mask: optional; its batch dim may be 1 (broadcast) or B, its heads must be H.
        scale: softmax scale, default ``1 / sqrt(D)``.
        return_lse: also return the natural log-sum-exp, float32 ``(B, H, S)``.

    Returns:
        ``out`` in q's dtype (``(B, S, H, D)``), and ``lse`` if asked for.
    """
    b, s, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty_like(q)
    lse = torch.empty(b, h, s, dtype=torch.float32, device=q.device)
    if block_mask is not None:
        if block_mask.seq_len != s or block_mask.num_heads != h or block_mask.kv_num_blocks.shape[0] not in (1, b):
            raise ValueError(
                f"block mask is for seq_len={block_mask.seq_len}, heads={block_mask.num_heads}, "
                f"batch={block_mask.kv_num_blocks.shape[0]}; inputs have S={s}, H={h}, B={b} (mask batch must be 1 or B)"
            )
        block_dense = block_mask.to_dense().to(q.device)
        rows = torch.arange(s, device=q.device) // block_mask.block_m
        cols = torch.arange(s, device=q.device) // block_mask.block_n
    for hi in range(h):
        qh = q[:, :, hi].to(compute_dtype)
        kh = k[:, :, hi].to(compute_dtype)
        vh = v[:, :, hi].to(compute_dtype)
        scores = torch.einsum("bid,bjd->bij", qh, kh) * scale
        if block_mask is not None:
            allowed = block_dense[:, hi][:, rows][:, :, cols]  # [Bm, S, S]
            scores = scores.masked_fill(~allowed, float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)  # [B, S]
        p = torch.exp(scores - row_lse.unsqueeze(-1).clamp_min(torch.finfo(compute_dtype).min))
        p = torch.nan_to_num(p, nan=0.0)
        o = torch.einsum("bij,bjd->bid", p, vh)
        out[:, :, hi] = o.to(q.dtype)
        lse[:, hi] = row_lse.to(torch.float32)
    return (out, lse) if return_lse else out
