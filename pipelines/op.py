"""``vdit::attention``: our attention as a PyTorch custom op, so that ``torch.compile`` sees one opaque call.

Its arguments are a :class:`~vdit_accel.plan.LayerPlan`'s (``plan.as_tuple()``): the block mask as two
tensors (``kv_num_blocks``, ``kv_indices``; both ``None`` = dense), the index tensors of static token
orders, and ints that are the same for every layer of a strategy (block sizes; the head runs of
quantized modes). A compiled graph therefore takes a layer's plan as tensor inputs: all layers of one
mask shape share one graph, where a per-layer Python object or int would specialise (and recompile) it
per layer. The implementation is :func:`vdit_accel.attention.planned_attention` -- the Triton kernel on
CUDA, the PyTorch reference path on the CPU; the fake implementation only says the output's shape,
dtype and (contiguous) layout.

Inference only: the ops' autograd formulas raise :data:`INFERENCE_ONLY` on backward (the Triton kernels
have no backward; without a formula PyTorch's own message would not say what to do). A call from eager
code that records autograd (grad enabled, an input requiring grad) goes through the op for that reason.

Under a key-padding mask of trailing text (:mod:`.key_padding`) the op takes the mask: the valid lengths
are data, so the whole per-sample computation is one opaque call.
"""

from __future__ import annotations

from typing import Sequence

import torch

from vdit_accel.attention import HeadRun, planned_attention
from vdit_accel.plan import LayerPlan
from vdit_accel.quant import QuantMode

from .key_padding import key_padded, truncate_block_mask

INFERENCE_ONLY = (
    "vdit-accel attention is inference-only: it has no backward. To train, vdit_accel.unpatch() the model (or, "
    "after set_attention_backend('vdit'), set one of diffusers' backends such as 'native') and train with "
    "diffusers' attention; for inference, run under torch.no_grad() or torch.inference_mode()"
)


def _records_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def run_plan(q, k, v, plan: LayerPlan, scale: float | None) -> torch.Tensor:
    """Attention under a layer plan: while torch.compile traces, the :func:`vdit_attention` op (one opaque
    graph node taking the plan's tensors), and whenever autograd records (so that a backward meets our
    refusal); from other eager code its implementation directly, with the plan's head runs as they are
    -- the op's dispatch (autograd and redispatch layers in Python) would be pure per-call overhead there."""
    if torch.compiler.is_compiling() or _records_grad(q, k, v):
        return vdit_attention(q, k, v, *plan.as_tuple(), scale=scale)
    return planned_attention(q, k, v, plan.kv_num_blocks, plan.kv_indices, plan.block_size, plan.block_size,
                             plan.runs, plan.q_index, plan.k_index, scale)


def run_dense(q, k, v, scale: float | None) -> torch.Tensor:
    """Dense, unquantized attention outside any plan (``set_attention_backend("vdit")`` without patch)."""
    if torch.compiler.is_compiling() or _records_grad(q, k, v):
        return vdit_attention(q, k, v, None, None, 0, 0, scale=scale)
    return planned_attention(q, k, v, None, None, 0, 0, (HeadRun(0, q.shape[2], None),), scale=scale)


def run_key_padded(q, k, v, attn_mask: torch.Tensor, plan: LayerPlan | None, scale: float | None,
                   padding_allowed: bool) -> torch.Tensor:
    """Attention under a bool key-padding ``attn_mask`` (:func:`key_padded_attention`) with
    ``plan``'s mask over the whole sequence (None: dense): the ``vdit::attention`` op, given the mask, while
    torch.compile traces (or autograd records), else its implementation directly."""
    if plan is None:
        num = idx = None
        bm = bn = 0
        op_runs, runs = None, (HeadRun(0, q.shape[2], None),)
    else:
        num, idx, bm, bn, op_runs = plan.kv_num_blocks, plan.kv_indices, plan.block_size, plan.block_size, plan.op_runs
        runs = plan.runs
    if torch.compiler.is_compiling() or _records_grad(q, k, v):
        return vdit_attention(q, k, v, num, idx, bm, bn, op_runs, scale=scale, key_padding_mask=attn_mask,
                              padding_allowed=padding_allowed)
    return key_padded_attention(q, k, v, attn_mask, num, idx, bm, bn, runs, scale, padding_allowed)


def key_padded_attention(q, k, v, attn_mask, kv_num_blocks, kv_indices, block_m: int, block_n: int,
                         runs: Sequence[HeadRun], scale: float | None, padding_allowed: bool) -> torch.Tensor:
    """:func:`.key_padding.key_padded` with our attention under ``kv_num_blocks`` / ``kv_indices``, the
    layer plan's mask over all ``S`` tokens (None: dense), restricted to each sample's valid tokens.
    (Through this module's ``planned_attention``, like every call of ours: one place to swap it.)"""
    seq = q.shape[1]

    def attend_valid(qs, ks, vs, n):
        num, idx = kv_num_blocks, kv_indices
        if num is not None and n < seq:
            num, idx = truncate_block_mask(num, idx, n, block_m, block_n)
        return planned_attention(qs, ks, vs, num, idx, block_m, block_n, runs, scale=scale)

    return key_padded(q, k, v, attn_mask, scale, padding_allowed, attend_valid)


def _head_runs(quant_runs: Sequence[int] | None, num_heads: int) -> tuple[HeadRun, ...]:
    """The op schema's flattened ``(start, stop, kernel_id)`` runs (None: all heads unquantized) as runs."""
    if not quant_runs:
        return (HeadRun(0, num_heads, None),)
    return tuple(HeadRun(quant_runs[i], quant_runs[i + 1], QuantMode.from_kernel_id(quant_runs[i + 2]))
                 for i in range(0, len(quant_runs), 3))


def _refuse_backward(ctx, *grads):
    raise RuntimeError(INFERENCE_ONLY)


def _no_context(ctx, inputs, output):
    pass


@torch.library.custom_op("vdit::attention", mutates_args=())
def vdit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor | None,
    kv_indices: torch.Tensor | None,
    block_m: int,
    block_n: int,
    quant_runs: Sequence[int] | None = None,
    q_index: torch.Tensor | None = None,
    k_index: torch.Tensor | None = None,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    padding_allowed: bool = True,
) -> torch.Tensor:
    """Non-causal attention over ``(B, S, H, D)`` q, k, v; a contiguous ``(B, S, H, D)`` out in q's dtype.

    ``kv_num_blocks`` int32 ``[B or 1, H, Mb]`` and ``kv_indices`` int32 ``[B or 1, H, Mb, Nb]`` are a
    :class:`~vdit_accel.block_mask.BlockMask` over ``S = q.shape[1]`` tokens in blocks of
    ``(block_m, block_n)``; pass both as ``None`` for dense attention (block sizes then unused).
    ``quant_runs``: None (every head unquantized) or ``(start, stop, QuantMode.kernel_id)`` per run of
    heads, flattened (:attr:`LayerPlan.op_runs`; ints, so a compiled graph specialises per run layout).
    ``q_index``: int ``[B or 1, H, S]``, the queries' token order (see :func:`vdit_accel.attention`);
    ``k_index``: ``[S]`` or ``[B or 1, H, S]``, K and V gathered into the keys' order first. The output
    stays in q's order.
    ``key_padding_mask``: a bool ``[B or 1, 1, 1 or S, S]`` mask of trailing padded tokens (no token orders
    then; :func:`key_padded_attention`: each sample over its valid tokens, the block mask
    restricted to them; other masks go to SDPA, with a warning); ``padding_allowed`` False takes only
    an all-valid mask.
    """
    if (kv_num_blocks is None) != (kv_indices is None):
        raise ValueError("vdit::attention takes kv_num_blocks and kv_indices together (both None = dense)")
    runs = _head_runs(quant_runs, q.shape[2])
    if key_padding_mask is not None:
        if q_index is not None or k_index is not None:
            raise ValueError("vdit::attention takes a key_padding_mask only without token orders (q_index, k_index)")
        return key_padded_attention(q, k, v, key_padding_mask, kv_num_blocks, kv_indices, block_m, block_n, runs,
                                    scale, padding_allowed).contiguous()
    return planned_attention(q, k, v, kv_num_blocks, kv_indices, block_m, block_n, runs, q_index, k_index,
                             scale).contiguous()


@vdit_attention.register_fake
def _(q, k, v, kv_num_blocks, kv_indices, block_m, block_n, quant_runs=None, q_index=None, k_index=None, scale=None,
      key_padding_mask=None, padding_allowed=True):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


vdit_attention.register_autograd(_refuse_backward, setup_context=_no_context)


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


vdit_qk_norm_rope.register_autograd(_refuse_backward, setup_context=_no_context)
