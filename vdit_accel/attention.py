"""The public attention entry point: our kernels on CUDA, PyTorch on the CPU.

Two ways in, one path: :func:`attention` validates what a user passes (a :class:`BlockMask`, quant
modes as names, a query order) and :func:`planned_attention` takes the same data as a compiled
:class:`~vdit_accel.plan.LayerPlan` holds it (mask tensors, head runs, indices), already checked when
the plan was built -- the per-call path of a patched model, which builds nothing.
"""

from __future__ import annotations

import logging
import math
import os
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from .block_mask import BlockMask
from .kernels import use_triton
from .orders.gather import gather_tokens, gather_tokens_many, scatter_tokens
from .quant import QuantMode
from .reference import reference_attention

logger = logging.getLogger("vdit_accel")


class HeadRun(NamedTuple):
    """Heads ``[start, stop)`` of one call that share a quantization mode (None: unquantized): one
    kernel launch each."""

    start: int
    stop: int
    mode: QuantMode | None


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
        quant: ``None`` (fp16/bf16 throughout), a :class:`~vdit_accel.quant.QuantMode` or its name
            (``"fp8"``, ``"int8"``, ``"int4"``) for every head, or a sequence of H modes (``None``
            entries unquantized): runs of heads with one mode each go to one kernel launch.
        q_index: int ``[B or 1, H, S]``, a permutation of the tokens per (batch, head): the kernel's
            query position ``i`` is token ``q_index[b, h, i]`` (the block mask's query blocks are
            positions in that order; k and v must already be in the key order). The output stays in
            q's order: on CUDA the kernel reads Q rows and writes output rows through the index, so
            neither moves (a token order's query gather and output scatter, for free).

    Returns:
        ``out`` ``(B, S, H, D)`` in q's dtype; plus ``lse`` when asked.

    On CUDA this runs our kernels (fp16/bf16; head_dim 64, 96, 128, ...): on an sm_90 GPU the Gluon
    Hopper kernel where it applies, else the portable Triton kernel (``VDIT_ATTENTION_BACKEND`` forces
    one; see :mod:`vdit_accel.kernels.attention_fwd`). On the CPU it runs
    PyTorch SDPA (with the block mask expanded to tokens; the float32 reference when the LSE is
    asked for; quantized heads through :func:`vdit_accel.quant.reference_quant_attention`, the
    float64 simulation of the kernel's arithmetic at the Hopper defaults' tile sizes), so the whole
    toolkit works without a GPU, slowly. ``VDIT_CPU_TRITON=1`` with ``TRITON_INTERPRET=1`` runs the
    Triton kernel on the CPU instead (for tests). ``VDIT_AUTOTUNE=1`` times a few kernel configs once
    per shape and keeps the fastest (cached on disk); the default path has no tuning cost.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"attention expects q, k, v of one shape (B, S, H, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, s, h, _ = q.shape
    num = idx = None
    block_m = block_n = 128
    if block_mask is not None:
        if block_mask.device != q.device:
            block_mask = block_mask.to(q.device)
        if block_mask.seq_len != s or block_mask.num_heads != h or block_mask.kv_num_blocks.shape[0] not in (1, b):
            raise ValueError(f"the block mask is for seq_len={block_mask.seq_len}, {block_mask.num_heads} heads, batch "
                             f"{block_mask.kv_num_blocks.shape[0]}; the call has S={s}, H={h}, B={b}")
        num, idx, block_m, block_n = block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.block_m, block_mask.block_n
    if q_index is not None and (q_index.dim() != 3 or q_index.shape[0] not in (1, b)
                                or tuple(q_index.shape[1:]) != (h, s) or q_index.is_floating_point()):
        raise ValueError(f"q_index must be an int tensor [1 or B, H, S] = [.., {h}, {s}], "
                         f"got {tuple(q_index.shape)} {q_index.dtype}")
    if q_index is not None and q_index.device != q.device:
        raise ValueError(f"q_index is on {q_index.device} but q is on {q.device}")
    return _run(q, k, v, num, idx, block_m, block_n, head_runs(quant, h), q_index, scale, return_lse)


def planned_attention(q, k, v, kv_num_blocks, kv_indices, block_m: int, block_n: int, runs: Sequence[HeadRun],
                      q_index=None, k_index=None, scale: float | None = None) -> torch.Tensor:
    """:func:`attention` on a layer plan's data (:class:`~vdit_accel.plan.LayerPlan`), which were
    validated when the plan was built for this call's grid: no mask object, no mode parsing.

    ``k_index`` (``[S]`` for every head, or ``[B or 1, H, S]``): K and V are first moved into the key
    order (``k[b, i, h] = k[b, k_index[b, h, i], h]``; one launch on the GPU) -- a static token order
    that differs from the order the tensors arrive in."""
    if k_index is not None:
        k, v = gather_tokens_many([k, v], k_index)
    return _run(q, k, v, kv_num_blocks, kv_indices, block_m, block_n, runs, q_index, scale, False)


def head_runs(quant, num_heads: int) -> tuple[HeadRun, ...]:
    """``quant`` (None, one mode, or one per head; modes or their names) as maximal runs of heads."""
    if quant is None or isinstance(quant, str):
        return (HeadRun(0, num_heads, QuantMode.parse(quant)),)
    modes = [QuantMode.parse(m) for m in quant]
    if len(modes) != num_heads:
        raise ValueError(f"quant lists {len(modes)} modes for {num_heads} heads")
    runs, start = [], 0
    for h in range(1, num_heads + 1):
        if h == num_heads or modes[h] != modes[start]:
            runs.append(HeadRun(start, h, modes[start]))
            start = h
    return tuple(runs)


def _run(q, k, v, num, idx, block_m, block_n, runs, q_index, scale, return_lse):
    """Every run of heads with its own mode, written into one output."""
    if q_index is not None and not use_triton(q):  # the PyTorch paths: gather Q, scatter the output
        qi = q_index.long()
        res = _run(gather_tokens(q, qi), k, v, num, idx, block_m, block_n, runs, None, scale, return_lse)
        o, lse = res if return_lse else (res, None)
        out = scatter_tokens(o, qi)
        if return_lse:
            lse = torch.empty_like(lse).scatter_(2, qi.expand_as(lse), lse)
        return (out, lse) if return_lse else out
    if len(runs) == 1:
        return _run_heads(q, k, v, num, idx, block_m, block_n, runs[0].mode, q_index, scale, return_lse, None)
    b, s, h, d = q.shape
    out = torch.empty((b, s, h, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, s), dtype=torch.float32, device=q.device) if return_lse else None
    for h0, h1, mode in runs:
        sl = slice(h0, h1)
        res = _run_heads(q[:, :, sl], k[:, :, sl], v[:, :, sl], None if num is None else num[:, sl],
                         None if idx is None else idx[:, sl], block_m, block_n, mode,
                         None if q_index is None else q_index[:, sl], scale, return_lse,
                         out[:, :, sl] if not return_lse else None)
        if return_lse:
            res, lse[:, sl] = res
        if res.data_ptr() != out[:, :, sl].data_ptr():
            out[:, :, sl] = res
    return (out, lse) if return_lse else out


def _run_heads(q, k, v, num, idx, block_m, block_n, mode, q_index, scale, return_lse, out):
    """One launch (or its PyTorch stand-in) for heads of one mode."""
    if use_triton(q):
        from .kernels import attention_fwd
        from .kernels.attention_fwd import _check_qkv, launch

        if os.environ.get("VDIT_AUTOTUNE") == "1":
            return attention_fwd(q, k, v, num, idx, block_m, block_n, scale=scale, return_lse=return_lse,
                                 config="autotune", quant=mode, out=out, q_index=q_index)
        _check_qkv(q, k, v)
        if mode is not None and q.dtype == torch.float32:
            raise ValueError("quantized attention takes fp16/bf16 inputs, got float32")
        return launch(q, k, v, num, idx, block_m, block_n, scale, return_lse, None, mode, out, q_index)
    mask = None if num is None else BlockMask(num, idx, q.shape[1], block_m, block_n)
    if mode is not None:
        return _simulated(q, k, v, mask, scale, mode, return_lse)
    if return_lse:
        return reference_attention(q, k, v, mask, scale=scale, return_lse=True, compute_dtype=torch.float32)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    token_mask = None if mask is None else mask.token_mask()  # [Bm, H, S, S]: the block mask, exactly
    res = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=token_mask,
                                         scale=scale).transpose(1, 2)
    if token_mask is not None:  # rows that attend nothing: zeros (SDPA gives NaN there)
        res = res.masked_fill(~token_mask.any(-1).transpose(1, 2)[..., None], 0.0)
    return res.contiguous()


def _simulated(q, k, v, block_mask, scale, mode, return_lse):
    """CPU: the quantized kernel's arithmetic, simulated per head at the Hopper defaults' tile sizes."""
    from .kernels.attention_configs import gpu_tiles
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
