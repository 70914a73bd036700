"""``vdit::attention``: our attention as a PyTorch custom op, so that ``torch.compile`` sees one opaque call.

The block mask enters as two tensors (``kv_num_blocks``, ``kv_indices``; both ``None`` = dense) and two
ints that are the same for every layer (the mask's block sizes). A compiled graph therefore takes a
layer's mask as a tensor input: all layers of one block shape share one graph, where a per-layer Python
object or int would specialise (and recompile) it per layer. The implementation is
:func:`vdit_accel.attention` — the Triton kernel on CUDA, the PyTorch reference path on the CPU; the
fake implementation only says the output's shape, dtype and (contiguous) layout.
"""

from __future__ import annotations

import torch

from vdit_accel.attention import attention
from vdit_accel.block_mask import BlockMask


@torch.library.custom_op("vdit::attention", mutates_args=())
def vdit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor | None,
    kv_indices: torch.Tensor | None,
    block_m: int,
    block_n: int,
    scale: float | None,
    quant: str = "",
    q_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Non-causal attention over ``(B, S, H, D)`` q, k, v; a contiguous ``(B, S, H, D)`` out in q's dtype.

    ``kv_num_blocks`` int32 ``[B or 1, H, Mb]`` and ``kv_indices`` int32 ``[B or 1, H, Mb, Nb]`` are a
    :class:`~vdit_accel.block_mask.BlockMask` over ``S = q.shape[1]`` tokens in blocks of
    ``(block_m, block_n)``; pass both as ``None`` for dense attention (block sizes then unused).
    ``quant``: ``""`` (unquantized), one mode for every head, or one per head joined by commas (an
    empty entry: that head unquantized) — a string, so a compiled graph specialises per mode pattern.
    ``q_index``: int ``[B or 1, H, S]``, the queries' token order (see :func:`vdit_accel.attention`); the
    output stays in q's order.
    """
    if (kv_num_blocks is None) != (kv_indices is None):
        raise ValueError("vdit::attention takes kv_num_blocks and kv_indices together (both None = dense)")
    mask = None if kv_num_blocks is None else BlockMask(kv_num_blocks, kv_indices, q.shape[1], block_m, block_n)
    return attention(q, k, v, mask, scale=scale, quant=decode_quant(quant), q_index=q_index).contiguous()


def encode_quant(modes) -> str:
    """Per-head modes (None = unquantized) as the op's string: "" if none, the mode if all equal."""
    modes = list(modes)
    if all(m is None for m in modes):
        return ""
    if all(m == modes[0] for m in modes):
        return modes[0]
    return ",".join(m or "" for m in modes)


def decode_quant(quant: str):
    if not quant:
        return None
    return [m or None for m in quant.split(",")] if "," in quant else quant


@vdit_attention.register_fake
def _(q, k, v, kv_num_blocks, kv_indices, block_m, block_n, scale, quant="", q_index=None):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@torch.library.custom_op("vdit::qk_norm_rope", mutates_args=())
def vdit_qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    num_heads: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    weight_q: torch.Tensor | None,
    weight_k: torch.Tensor | None,
    eps_q: float,
    eps_k: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`vdit_accel.kernels.rope.qk_norm_rope` as one opaque call for ``torch.compile``: ``(B, S, H * D)``
    q and k in, contiguous ``(B, S, H, D)`` q and k out."""
    from vdit_accel.kernels.rope import qk_norm_rope

    qo, ko = qk_norm_rope(q, k, num_heads, cos, sin, weight_q, weight_k, eps_q, eps_k)
    return qo, ko


@vdit_qk_norm_rope.register_fake
def _(q, k, num_heads, cos, sin, weight_q, weight_k, eps_q, eps_k):
    shape = (*q.shape[:2], num_heads, q.shape[2] // num_heads)
    return (torch.empty(shape, dtype=q.dtype, device=q.device), torch.empty(shape, dtype=k.dtype, device=k.device))
