"""Attention under a key-padding mask of trailing text tokens (HunyuanVideo, HunyuanVideo 1.5).

HunyuanVideo passes a bool ``[B, 1, 1, S]`` mask, HunyuanVideo 1.5 a ``[B, 1, S, S]`` one (valid_i &
valid_j): the text after the video is padded per sample. :func:`key_padded` runs each sample's valid
tokens ``[0, n)`` through our attention exactly -- with the layer plan of the forward's grid restricted
to its first ``n`` tokens (:func:`truncate_block_mask`, in :func:`.op.key_padded_attention`) -- and
gives the padded query rows, whose outputs diffusers discards, what PyTorch's SDPA gives them under
the original mask rows. The lengths are data (read from the mask), so this runs eagerly: called
directly from eager code, and inside the ``vdit::attention`` op given the mask (:mod:`.op`) under
``torch.compile``, where the op is one opaque node and ``fullgraph=True`` holds.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from vdit_accel.block_mask import cdiv

from .notice import warn_once


def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    """PyTorch's SDPA on diffusers' ``(B, S, H, D)`` layout."""
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
        attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
    )
    return out.transpose(1, 2)


def valid_prefix_lengths(mask: torch.Tensor, batch: int, seq: int) -> list[int] | None:
    """Per sample, the n such that the mask lets queries [0, n) see exactly keys [0, n); else None.

    Accepts bool masks of shape [B or 1, 1, 1 or S, S]; rows from n on may hold anything (they are
    padded queries). Cost: one pass over the mask (which diffusers has already materialised).
    """
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[0] not in (1, batch) or mask.shape[1] != 1:
        return None
    if mask.shape[3] != seq or mask.shape[2] not in (1, seq):
        return None
    first = mask[:, 0, 0]  # [Bm, S]: the first query row (a video token, never padding)
    n = first.sum(-1)
    if not torch.equal(first, torch.arange(seq, device=mask.device) < n.unsqueeze(1)):
        return None
    lengths = [int(x) for x in n.tolist()]
    if mask.shape[2] == seq:
        for m, length in zip(mask[:, 0], lengths):
            if not m[:length, :length].all() or m[:length, length:].any():
                return None
    if min(lengths) < 1:
        return None
    return lengths * batch if len(lengths) == 1 and batch > 1 else lengths


def truncate_block_mask(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, n: int, block_m: int,
                        block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A block mask over ``S`` tokens restricted to tokens ``[0, n)``: its first ``cdiv(n, block_m)`` query
    blocks, each listing only its key blocks below ``cdiv(n, block_n)``.

    Relies on what :meth:`BlockMask.from_dense` guarantees: each row lists its visited blocks first, in
    ascending order, so the kept ones are a prefix of the row. With text after the video and text rows
    and columns always dense, this is the mask of the grid whose text is ``n - video_len`` tokens long
    (equal to it except when ``n`` is exactly the video length and the video ends inside a block: that
    block stays dense, as in the forward's grid)."""
    mb, nb = cdiv(n, block_m), cdiv(n, block_n)
    idx = kv_indices[:, :, :mb, :nb]
    listed = torch.arange(nb, device=idx.device) < kv_num_blocks[:, :, :mb, None]
    num = ((idx < nb) & listed).sum(-1, dtype=torch.int32)
    return num.contiguous(), idx.contiguous()


def key_padded(q, k, v, attn_mask: torch.Tensor, scale: float | None, padding_allowed: bool,
               attend_valid: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """``(B, S, H, D)`` attention under a bool key-padding ``attn_mask``: ``attend_valid(q, k, v, n)`` for each
    sample's valid tokens ``[0, n)`` (batch 1), SDPA under the mask's rows for its padded query rows.

    ``padding_allowed``: whether padded keys may exist (text after the video); if not, only an all-valid
    mask is taken. Any other mask falls back to SDPA with the mask, with a warning."""
    seq = q.shape[1]
    lengths = valid_prefix_lengths(attn_mask, q.shape[0], seq)
    if lengths is None or (not padding_allowed and min(lengths) < seq):
        warn_once(
            f"vdit-accel: attention mask of shape {tuple(attn_mask.shape)} and dtype {attn_mask.dtype} is not a "
            "key-padding mask of trailing text tokens: falling back to PyTorch SDPA for such calls"
        )
        return sdpa(q, k, v, attn_mask, scale=scale)
    out = torch.empty_like(q)
    for b, n in enumerate(lengths):
        s = slice(b, b + 1)
        out[s, :n] = attend_valid(q[s, :n], k[s, :n], v[s, :n], n)
        if n < seq:  # padded query rows: exactly what SDPA gives them under the original mask
            mb = attn_mask[s] if attn_mask.shape[0] > 1 else attn_mask
            rows = mb[:, :, n:] if mb.shape[2] == seq else mb
            out[s, n:] = sdpa(q[s, n:], k[s], v[s], rows, scale=scale)
    return out
