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
    quant=None,
    q_index: torch.Tensor | None = None,
):
    """Non-causal softmax attention, dense or block-sparse, optionally quantized.

    Args:
        q, k, v: ``(B, S, H, D)`` — diffusers' layout; read through strides (no copies on CUDA).
        block_mask: key blocks to visit per (batch, head, query block); ``None`` means dense.
            Its batch dim may be 1 (shared) or B.
        scale: softmax scale, default ``1 / sqrt(D)``.
        return_lse: also return the natural log-sum-exp, float32 ``(B, H, S)``.
        quant: ``None`` (fp16/bf16 throughout), a mode of :data:`vdit_accel.quant.QUANT_MODES`
            (``"fp8"``, ``"int8"``, ``"int4"``) for every head, or a sequence of H modes (``None``
            entries unquantized): runs of heads with one mode each go to one kernel launch.
        q_index: int ``[B or 1, H, S]``, a permutation of the tokens per (batch, head): the kernel's
            query position ``i`` is token ``q_index[b, h, i]`` (the block mask's query blocks are
            positions in that order; k and v must already be in the key order). The output stays in
            q's order: on CUDA the kernel reads Q rows and writes output rows through the index, so
            neither moves (a token order's query gather and output scatter, for free).

    Returns:
        ``out`` ``(B, S, H, D)`` in q's dtype; plus ``lse`` when asked.

    On CUDA this runs the Triton kernel (fp16/bf16; head_dim 64, 96, 128, ...). On the CPU it runs
    PyTorch SDPA (with the block mask expanded to tokens; the float32 reference when the LSE is
    asked for; quantized heads through :func:`vdit_accel.quant.reference_quant_attention`, the
    float64 simulation of the kernel's arithmetic at the H100's tile sizes), so the whole
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
    if q_index is not None and (q_index.dim() != 3 or q_index.shape[0] not in (1, q.shape[0])
                                or tuple(q_index.shape[1:]) != (q.shape[2], q.shape[1]) or q_index.is_floating_point()):
        raise ValueError(f"q_index must be an int tensor [1 or B, H, S] = [.., {q.shape[2]}, {q.shape[1]}], "
                         f"got {tuple(q_index.shape)} {q_index.dtype}")
    runs = head_runs(quant, q.shape[2])
    if q_index is not None and not _use_triton(q):  # the PyTorch paths: gather Q, scatter the output
        from .permutation import gather_tokens, scatter_tokens

        idx = q_index.long()
        res = attention(gather_tokens(q, idx), k, v, block_mask, scale=scale, return_lse=return_lse, quant=quant)
        o, lse = res if return_lse else (res, None)
        out = scatter_tokens(o, idx)
        if return_lse:
            lse = torch.empty_like(lse).scatter_(2, idx.expand_as(lse), lse)
        return (out, lse) if return_lse else out
    if len(runs) > 1 or runs[0][2] is not None:
        return _attention_runs(q, k, v, block_mask, scale, return_lse, runs, q_index)
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
        return attention_fwd(q, k, v, scale=scale, return_lse=return_lse, config=config, q_index=q_index, **kw)
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


def head_runs(quant, num_heads: int) -> list[tuple[int, int, str | None]]:
    """``quant`` (None, one mode, or one per head) as maximal runs ``(start, stop, mode)`` of heads."""
    from .quant import QUANT_MODES

    modes = [quant] * num_heads if quant is None or isinstance(quant, str) else list(quant)
    if len(modes) != num_heads:
        raise ValueError(f"quant lists {len(modes)} modes for {num_heads} heads")
    for m in modes:
        if m is not None and m not in QUANT_MODES:
            raise ValueError(f"unknown quantization mode {m!r}; use None or one of {list(QUANT_MODES)}")
    runs, start = [], 0
    for h in range(1, num_heads + 1):
        if h == num_heads or modes[h] != modes[start]:
            runs.append((start, h, modes[start]))
            start = h
    return runs


def _attention_runs(q, k, v, block_mask, scale, return_lse, runs, q_index=None):
    """Each run of heads with its own mode, written into one output."""
    b, s, h, d = q.shape
    out = torch.empty((b, s, h, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, s), dtype=torch.float32, device=q.device) if return_lse else None
    for h0, h1, mode in runs:
        sub = None if block_mask is None else block_mask.head_slice(h0, h1)
        qs, ks, vs = q[:, :, h0:h1], k[:, :, h0:h1], v[:, :, h0:h1]
        qi = None if q_index is None else q_index[:, h0:h1]
        if mode is None:
            res = attention(qs, ks, vs, sub, scale=scale, return_lse=return_lse, q_index=qi)
        elif _use_triton(q):
            from .kernels import attention_fwd

            kw = {}
            if sub is not None:
                kw = dict(kv_num_blocks=sub.kv_num_blocks, kv_indices=sub.kv_indices,
                          mask_block_m=sub.block_m, mask_block_n=sub.block_n)
            config = "autotune" if os.environ.get("VDIT_AUTOTUNE") == "1" else None
            res = attention_fwd(qs, ks, vs, scale=scale, return_lse=return_lse, config=config, quant=mode,
                                out=None if return_lse else out[:, :, h0:h1], q_index=qi, **kw)
        else:
            res = _simulated(qs, ks, vs, sub, scale, mode, return_lse)
        if return_lse:
            res, lse[:, h0:h1] = res
        if res.data_ptr() != out[:, :, h0:h1].data_ptr():
            out[:, :, h0:h1] = res
    return (out, lse) if return_lse else out


def _simulated(q, k, v, block_mask, scale, mode, return_lse):
    """CPU: the quantized kernel's arithmetic, simulated per head at the H100 defaults' tile sizes."""
    from .kernels.attention_fwd import gpu_tiles
    from .quant import reference_quant_attention

    if return_lse:
        raise ValueError("the CPU simulation of quantized attention does not return the log-sum-exp")
    block_m, block_n = gpu_tiles(q.shape[-1], mode)
    if block_mask is not None:
        block_m, block_n = math.gcd(block_m, block_mask.block_m), math.gcd(block_n, block_mask.block_n)
    outs = []
    for h in range(q.shape[2]):
        sub = None if block_mask is None else block_mask.head_slice(h, h + 1)
        outs.append(reference_quant_attention(q[:, :, h : h + 1], k[:, :, h : h + 1], v[:, :, h : h + 1], mode,
                                              sub, block_m, block_n, scale))
    return torch.cat(outs, 2)
