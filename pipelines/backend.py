"""Our attention as a backend in diffusers' attention registry.

diffusers routes attention through ``dispatch_attention_fn(q, k, v, ..., backend=...)``, looking the
backend up by an ``AttentionBackendName`` enum member. We add a member ``"vdit"`` to that enum and
register :func:`_vdit_backend` under it. A patched processor is the model's own processor class with
its backend set to ``"vdit"``; around each call it publishes "which layer of which patched model is
running" in a context variable, and the backend turns that into the layer's block mask. So the
processor's own code (projections, norms, RoPE, output) runs unchanged, and a diffusers update to a
processor body needs no change here.
"""

from __future__ import annotations

import contextvars
import enum
import logging
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from vdit_accel.attention import attention

if TYPE_CHECKING:
    from .patch import PatchState

logger = logging.getLogger("vdit_accel")

BACKEND_NAME = "vdit"

# (PatchState, layer index) of the self-attention call in flight, or None outside patched layers.
current_layer: contextvars.ContextVar[tuple["PatchState", int] | None] = contextvars.ContextVar(
    "vdit_current_layer", default=None
)
_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        logger.warning(msg)


def _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale):
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
        attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
    )
    return out.transpose(1, 2)


def _vdit_backend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    _parallel_config=None,
) -> torch.Tensor:
    """diffusers backend: (B, S, H, D) in and out, like diffusers' other backends.

    A boolean key-padding ``attn_mask`` whose valid keys are a prefix of the sequence (HunyuanVideo's
    ``[B, 1, 1, S]``, HunyuanVideo 1.5's ``[B, 1, S, S]`` = valid_i & valid_j) is honoured exactly:
    each sample's valid tokens go through our attention with the grid of its true text length, and
    the padded query rows (whose outputs diffusers discards) through SDPA with the original mask
    rows. Any other mask, causal attention, dropout or GQA falls back to SDPA, with a warning.
    """
    if _parallel_config is not None:
        raise NotImplementedError(
            "vdit-accel does not support diffusers context parallelism yet; disable enable_parallelism() "
            "or use another attention backend"
        )
    unsupported = [n for n, bad in (("is_causal", is_causal), ("dropout_p", dropout_p > 0),
                                    ("enable_gqa", enable_gqa)) if bad]
    if unsupported or key.shape != query.shape or value.shape != query.shape:
        why = ", ".join(unsupported) or "cross-attention shapes"
        _warn_once(f"vdit-accel: attention call with {why}: falling back to PyTorch SDPA for such calls")
        return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale)
    ctx = current_layer.get()
    if attn_mask is None:
        return _attend(query, key, value, scale, ctx)
    lengths = _valid_prefix_lengths(attn_mask, query.shape[0], query.shape[1])
    text_at = ctx[0].grid.text_at if ctx is not None and ctx[0].grid is not None else None
    if lengths is None or (text_at != "suffix" and ctx is not None and min(lengths) < query.shape[1]):
        _warn_once(
            f"vdit-accel: attention mask of shape {tuple(attn_mask.shape)} and dtype {attn_mask.dtype} is not a "
            "key-padding mask of trailing text tokens: falling back to PyTorch SDPA for such calls"
        )
        return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale)
    seq = query.shape[1]
    out = torch.empty_like(query)
    for b, n in enumerate(lengths):
        s = slice(b, b + 1)
        out[s, :n] = _attend(query[s, :n], key[s, :n], value[s, :n], scale, ctx)
        if n < seq:  # padded query rows: exactly what SDPA gives them under the original mask
            mb = attn_mask[b : b + 1] if attn_mask.shape[0] > 1 else attn_mask
            rows = mb[:, :, n:] if mb.shape[2] == seq else mb
            out[s, n:] = _sdpa(query[s, n:], key[s], value[s], rows, 0.0, False, scale)
    return out


def _valid_prefix_lengths(mask: torch.Tensor, batch: int, seq: int) -> list[int] | None:
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


def _attend(query, key, value, scale, ctx) -> torch.Tensor:
    """Our attention over one call's tokens; ``ctx`` (patched layer or None) picks the block mask."""
    block_mask = None
    if ctx is not None:
        state, layer = ctx
        grid = state.grid_for(query.shape[1], layer)
        state.call_grid = grid
        for observe in state.observers:
            observe(layer, state.step, query, key, value)
        block_mask = state.block_mask(layer, query)
    return attention(query, key, value, block_mask, scale=scale)


class _SDPAToBackend(torch.overrides.TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` to our backend while a patched processor runs.

    CogVideoX and Mochi processors call SDPA directly with ``(B, H, S, D)`` instead of diffusers'
    dispatcher. Rather than copy their bodies, the patched processor runs its base ``__call__``
    inside this mode: the SDPA call is redirected, with the layout change made by transposed views
    (no copies), and every other op passes through untouched. The mode is pushed only for the
    processor's call, so nothing outside a patched layer is affected; inside ``__torch_function__``
    the mode is off, so the backend's own SDPA fallback does not recurse.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return _sdpa_through_backend(*args, **kwargs)
        return func(*args, **kwargs)


def _sdpa_through_backend(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                          enable_gqa=False):
    if query.dim() != 4:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    out = _vdit_backend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=attn_mask,
                        dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    return out.transpose(1, 2)


def register_backend():
    """Add ``"vdit"`` to diffusers' attention registry (idempotent). Returns the enum member."""
    from diffusers.models import attention_dispatch as ad

    names = ad.AttentionBackendName
    member = names._value2member_map_.get(BACKEND_NAME)
    if member is None:
        # Enums are closed; extend this one the way enum's own machinery builds members.
        member = str.__new__(names, BACKEND_NAME)
        member._name_ = "VDIT"
        member._value_ = BACKEND_NAME
        member.__objclass__ = names
        type.__setattr__(names, "VDIT", member)
        names._member_map_["VDIT"] = member
        names._value2member_map_[BACKEND_NAME] = member
        names._member_names_.append("VDIT")
    if member not in ad._AttentionBackendRegistry._backends:
        ad._AttentionBackendRegistry.register(member)(_vdit_backend)
    return member
