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
    """diffusers backend: (B, S, H, D) in and out, like diffusers' other backends."""
    if _parallel_config is not None:
        raise NotImplementedError(
            "vdit-accel does not support diffusers context parallelism yet; disable enable_parallelism() "
            "or use another attention backend"
        )
    unsupported = [n for n, bad in (("attn_mask", attn_mask is not None), ("is_causal", is_causal),
                                    ("dropout_p", dropout_p > 0), ("enable_gqa", enable_gqa)) if bad]
    if unsupported or key.shape[1] != query.shape[1] or query.shape[-1] != value.shape[-1]:
        why = ", ".join(unsupported) or "cross-attention shapes"
        _warn_once(f"vdit-accel: attention call with {why}: falling back to PyTorch SDPA for such calls")
        return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale)
    ctx = current_layer.get()
    block_mask = None
    if ctx is not None:
        state, layer = ctx
        for observe in state.observers:
            observe(layer, state.step, query, key, value)
        block_mask = state.block_mask(layer, query)
    return attention(query, key, value, block_mask, scale=scale)


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
