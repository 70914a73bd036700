"""The public attention entry point: our Triton kernel on CUDA, PyTorch on the CPU."""

from __future__ import annotations

import logging
import math
import os

import torch
import torch.nn.functional as F

from .block_mask import BlockMask
from .reference import reference_attention

logger = logging.getLogger("vdit_accel")


def _use_triton(q: torch.Tensor) -> bool:
    if q.device.type == "cuda":
        return True
    return q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("VDIT_CPU_TRITON") == "1"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask | None = None,
    *,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Non-causal softmax attention, dense or block-sparse.

    Args:
        q, k, v: ``(B, S, H, D)`` — diffusers' layout; read through strides (no copies on CUDA).
        block_mask: key blocks to visit per (batch, head, query block); ``None`` means dense.
            Its batch dim may be 1 (shared) or B.
        scale: softmax scale, default ``1 / sqrt(D)``.
        return_lse: also return the natural log-sum-exp, float32 ``(B, H, S)``.

    Returns:
        ``out`` ``(B, S, H, D)`` in q's dtype; plus ``lse`` when asked.

    On CUDA this runs the Triton kernel (fp16/bf16; head_dim 64, 96, 128, ...). On the CPU it runs
    PyTorch SDPA (with the block mask expanded to tokens; the float32 reference when the LSE is
    asked for), so the whole
    toolkit works without a GPU, slowly. ``VDIT_CPU_TRITON=1`` with ``TRITON_INTERPRET=1`` runs the
    Triton kernel on the CPU instead (for tests). ``VDIT_AUTOTUNE=1`` times a few kernel configs once
    per shape and keeps the fastest (cached on disk); the default path has no tuning cost.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"attention expects q, k, v of one shape (B, S, H, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if block_mask is not None and block_mask.device != q.device:
        block_mask = block_mask.to(q.device)
    if _use_triton(q):
        from .kernels import attention_fwd

        kw = {}
        if block_mask is not None:
            kw = dict(
                kv_num_blocks=block_mask.kv_num_blocks,
                kv_indices=block_mask.kv_indices,
                mask_block_m=block_mask.block_m,
                mask_block_n=block_mask.block_n,
            )
        config = "autotune" if os.environ.get("VDIT_AUTOTUNE") == "1" else None
        return attention_fwd(q, k, v, scale=scale, return_lse=return_lse, config=config, **kw)
    if return_lse:
        return reference_attention(q, k, v, block_mask, scale=scale, return_lse=True, compute_dtype=torch.float32)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    mask = None
    if block_mask is not None:
        mask = block_mask.token_mask()  # [Bm, H, S, S]: the block mask, exactly, at token level
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         scale=scale).transpose(1, 2)
    if mask is not None:  # rows that attend nothing: zeros (SDPA gives NaN there)
        out = out.masked_fill(~mask.any(-1).transpose(1, 2)[..., None], 0.0)
    return out.contiguous()
