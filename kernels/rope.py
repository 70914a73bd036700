"""The self-attention prologue of Wan-style processors in one pass: RMSNorm across heads, then RoPE.

diffusers' ``WanAttnProcessor`` normalises the projected queries and keys with ``torch.nn.RMSNorm``
over all heads (``qk_norm="rms_norm_across_heads"``), then rotates channel pairs ``(2i, 2i + 1)`` of each
head with its float32 ``(cos, sin)`` tables. In eager PyTorch that is about 20 elementwise kernels per
layer, most of them over float32 intermediates twice the size of Q: at real sizes a large part of what a
sparse attention step costs (``benchmarks/prologue.py``; ``benchmarks/RESULTS.md``). Here one launch
reads Q and K once and writes them once, normalised and rotated.

Rounding follows the eager path: the norm in float32, times the weight, rounded once to the input dtype
(as torch's fused ``rms_norm`` does), then the rotation in the tables' precision (float32 for Wan; float64 tables rotate in float64)
rounded to the input dtype through float32 (as PyTorch's double -> bfloat16 cast does). The sum of squares is a
different summation order, so an element can differ from eager PyTorch by one unit in the last place.

This module imports only torch and triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quantize import _device_ctx


@triton.jit
def _norm_rope_rows(X, W, c, s, rows_off, row_mask, H, eps,
                    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                    NORM: tl.constexpr, F64: tl.constexpr):
    """BLOCK_T whole rows (every head) of X: normalised, times the weight, rotated with the rows' tables
    c, s ([BLOCK_T, 1, BLOCK_D // 2]: cos of the even channels, sin of the odd); fp32 [BLOCK_T, BLOCK_H, BLOCK_D]."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    cols = offs_h[:, None] * HEAD_DIM + offs_d[None, :]  # [BLOCK_H, BLOCK_D]
    col_mask = (offs_h < H)[:, None] & (offs_d < HEAD_DIM)[None, :]
    mask = row_mask[:, None, None] & col_mask[None, :, :]
    x = tl.load(X + rows_off[:, None, None] + cols[None, :, :], mask=mask, other=0.0)
    dt = x.dtype
    if NORM:
        xf = x.to(tl.float32)
        ms = tl.sum(tl.sum(xf * xf, 2), 1) / (H * HEAD_DIM).to(tl.float32)
        rstd = 1.0 / tl.sqrt_rn(ms + eps)
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        x = (xf * rstd[:, None, None] * w[None, :, :]).to(dt)
    # Channel pairs (2i, 2i + 1): x1 = even channels, x2 = odd.
    x1, x2 = tl.split(tl.reshape(x, [BLOCK_T, BLOCK_H, BLOCK_D // 2, 2]))
    if F64:
        x1 = x1.to(tl.float64)
        x2 = x2.to(tl.float64)
    else:
        x1 = x1.to(tl.float32)
        x2 = x2.to(tl.float32)
    even = (x1 * c - x2 * s).to(tl.float32)
    odd = (x1 * s + x2 * c).to(tl.float32)
    return tl.reshape(tl.join(even, odd), [BLOCK_T, BLOCK_H, BLOCK_D]), mask, cols


@triton.jit
def _qk_norm_rope_kernel(
    Q, K, QO, KO, WQ, WK, Cos, Sin,
    n_rows, S, H,
    stride_qb, stride_qs, stride_kb, stride_ks, stride_ob, stride_os,
    stride_cb, stride_cs, stride_sb, stride_ss,
    eps_q, eps_k,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    NORM: tl.constexpr, F64: tl.constexpr,
):
    """One pass: each program reads BLOCK_T whole rows of q and of k once and writes them once."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < n_rows
    b = (rows // S).to(tl.int64)
    s = (rows % S).to(tl.int64)
    HALF: tl.constexpr = BLOCK_D // 2
    offs_i = tl.arange(0, HALF)
    pmask = row_mask[:, None] & (offs_i < HEAD_DIM // 2)[None, :]
    c = tl.load(Cos + (b * stride_cb + s * stride_cs)[:, None] + 2 * offs_i[None, :], mask=pmask, other=0.0)
    sn = tl.load(Sin + (b * stride_sb + s * stride_ss)[:, None] + 2 * offs_i[None, :] + 1, mask=pmask, other=0.0)
    if F64:
        c = c.to(tl.float64)[:, None, :]
        sn = sn.to(tl.float64)[:, None, :]
    else:
        c = c.to(tl.float32)[:, None, :]
        sn = sn.to(tl.float32)[:, None, :]
    o_off = b * stride_ob + s * stride_os
    yq, mask, cols = _norm_rope_rows(Q, WQ, c, sn, b * stride_qb + s * stride_qs, row_mask, H, eps_q,
                                     HEAD_DIM, BLOCK_T, BLOCK_H, BLOCK_D, NORM, F64)
    tl.store(QO + o_off[:, None, None] + cols[None, :, :], yq.to(QO.dtype.element_ty), mask=mask)
    yk, mask, cols = _norm_rope_rows(K, WK, c, sn, b * stride_kb + s * stride_ks, row_mask, H, eps_k,
                                     HEAD_DIM, BLOCK_T, BLOCK_H, BLOCK_D, NORM, F64)
    tl.store(KO + o_off[:, None, None] + cols[None, :, :], yk.to(KO.dtype.element_ty), mask=mask)


def _table_view(t: torch.Tensor, batch: int, seq: int, head_dim: int) -> torch.Tensor | None:
    """A rotary table of shape (B or 1, S, 1, D), (B or 1, S, D) or (S, D) as a (B or 1, S, D) view; None
    if it has none of these shapes."""
    if t.dim() == 4:
        if t.shape[2] != 1:
            return None
        t = t[:, :, 0]
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3 or t.shape[0] not in (1, batch) or tuple(t.shape[1:]) != (seq, head_dim):
        return None
    return t


def rope_tables_problem(cos: torch.Tensor, sin: torch.Tensor, batch: int, seq: int, head_dim: int) -> str | None:
    """Why :func:`qk_norm_rope` cannot take these rotary tables for (B, S, D) = (batch, seq, head_dim), or
    None if it can (callers that have another path check this first)."""
    for name, t in (("cos", cos), ("sin", sin)):
        if _table_view(t, batch, seq, head_dim) is None:
            return (f"{name} of shape {tuple(t.shape)} does not fit (B={batch}, S={seq}, D={head_dim}): "
                    f"(B or 1, S, 1, D), (B or 1, S, D) or (S, D) shared by the heads")
    if cos.dtype != sin.dtype or cos.dtype not in (torch.float32, torch.float64):
        return f"cos / sin must both be float32 or float64; got {cos.dtype}, {sin.dtype}"
    return None


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, num_heads: int, cos: torch.Tensor, sin: torch.Tensor,
                 weight_q: torch.Tensor | None = None, weight_k: torch.Tensor | None = None,
                 eps_q: float = 1e-6, eps_k: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of each token's whole ``(H * D)`` row (weights ``weight_q`` / ``weight_k``; both None: no
    norm), then RoPE on channel pairs of each head; returns ``(B, S, H, D)`` contiguous q and k.

    ``q``, ``k``: ``(B, S, H * D)`` with unit channel stride (any token / batch strides: fused QKV
    projections are read in place), fp16 / bf16 / fp32, on CUDA (or the CPU under TRITON_INTERPRET=1).
    ``cos``, ``sin``: ``(1 or B, S, 1, D)``, ``(1 or B, S, D)`` or ``(S, D)``, float32 or float64 (the
    rotation then runs in float64); channel ``2i`` uses ``cos[..., 2i]``, ``2i + 1`` uses
    ``sin[..., 2i + 1]``, as diffusers' Wan processor does.
    """
    if q.shape != k.shape or q.dim() != 3:
        raise ValueError(f"qk_norm_rope: q and k must be (B, S, H*D) of one shape; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}")
    if q.dtype != k.dtype or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"qk_norm_rope: q and k must share a float16/bfloat16/float32 dtype; got {q.dtype}, {k.dtype}")
    B, S, C = q.shape
    if C % num_heads:
        raise ValueError(f"qk_norm_rope: {C} channels do not split into {num_heads} heads")
    D = C // num_heads
    if D % 2:
        raise ValueError(f"qk_norm_rope: head_dim {D} is odd; RoPE rotates channel pairs")
    if q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError("qk_norm_rope: q and k need unit channel stride")
    norm = weight_q is not None
    if norm != (weight_k is not None):
        raise ValueError("qk_norm_rope: pass both norm weights or neither")
    if norm and (weight_q.shape != (C,) or weight_k.shape != (C,)):
        raise ValueError(f"qk_norm_rope: norm weights must be ({C},) (the norm spans all heads); got "
                         f"{tuple(weight_q.shape)}, {tuple(weight_k.shape)}")
    why = rope_tables_problem(cos, sin, B, S, D)
    if why is not None:
        raise ValueError(f"qk_norm_rope: {why}")
    cos, sin = (_table_view(t, B, S, D) for t in (cos, sin))
    cos, sin = (t if t.stride(2) == 1 else t.contiguous() for t in (cos, sin))
    qo = torch.empty((B, S, C), dtype=q.dtype, device=q.device)
    ko = torch.empty_like(qo)
    if B * S == 0:
        return qo.unflatten(2, (num_heads, D)), ko.unflatten(2, (num_heads, D))
    w_q = weight_q.contiguous() if norm else q  # unused when not norm
    w_k = weight_k.contiguous() if norm else k
    block_h, block_d = triton.next_power_of_2(num_heads), triton.next_power_of_2(D)
    # ~8192 elements of a tensor per program (one row of Wan 14B's 40 x 128 is 8192 once padded)
    block_t = max(1, min(16, 8192 // (block_h * block_d)))
    grid = (triton.cdiv(B * S, block_t),)
    with _device_ctx(q):
        _qk_norm_rope_kernel[grid](
            q, k, qo, ko, w_q, w_k, cos, sin,
            B * S, S, num_heads,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), qo.stride(0), qo.stride(1),
            cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1),
            sin.stride(0) if sin.shape[0] > 1 else 0, sin.stride(1),
            float(eps_q), float(eps_k),
            HEAD_DIM=D, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d,
            NORM=norm, F64=cos.dtype == torch.float64, num_warps=8 if block_t * block_h * block_d >= 4096 else 4,
        )
    return qo.unflatten(2, (num_heads, D)), ko.unflatten(2, (num_heads, D))
