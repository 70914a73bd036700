"""Fused self-attention prologue for Wan-style processors (Wan 2.1 / 2.2, SkyReels-V2).

Their processors normalise Q and K with ``torch.nn.RMSNorm`` across heads and rotate them with float32
rotary tables in eager PyTorch: about 20 elementwise kernels per layer, most over float32
intermediates twice the size of Q (measured: ``benchmarks/results/prologue-*``). A patched processor of these classes runs its self-attention calls as
the processor body does -- the same projections, the same ``dispatch_attention_fn`` call (so our
backend, block masks, token orders and context parallelism apply unchanged), the same output
projection -- but norm and rotation in one Triton pass (:func:`vdit_accel.kernels.rope.qk_norm_rope`),
equal to the eager result up to the sum of squares' order (fp16/bf16: equal bits where the row sums
round alike).

Everything else goes to the model's own processor body: cross-attention, an attention mask
(SkyReels-V2's diffusion forcing), image-conditioning keys, no rotary tables, norms that are not one
``RMSNorm`` over all heads, and tensors the kernel does not run on (the CPU, unless
``VDIT_CPU_TRITON=1`` with ``TRITON_INTERPRET=1``, as for attention). ``patch(..., fused_prologue=False)``
turns it off.
"""

from __future__ import annotations

import importlib
import logging

import torch

from vdit_accel.kernels import use_triton

from .notice import warn_once

logger = logging.getLogger("vdit_accel")

# processor class name -> the diffusers module whose _get_qkv_projections / dispatch_attention_fn it calls
_MODULES = {
    "WanAttnProcessor": "diffusers.models.transformers.transformer_wan",
    "SkyReelsV2AttnProcessor": "diffusers.models.transformers.transformer_skyreels_v2",
}


def _module_for(base: type):
    name = _MODULES.get(base.__name__)
    if name is None:
        return None
    try:
        mod = importlib.import_module(name)
    except ImportError:
        return None
    if getattr(mod, base.__name__, None) is not base or not all(
            hasattr(mod, f) for f in ("_get_qkv_projections", "dispatch_attention_fn")):
        logger.info("vdit-accel: %s's module changed shape; its self-attention keeps the eager prologue",
                    base.__name__)
        return None
    return mod


def fused_body(base: type):
    """The fused self-attention body for processors of class ``base``, or None where there is none.

    The body takes the processor call's arguments and returns the attention output, or None when the
    call is not one it handles (then the caller runs the base body)."""
    mod = _module_for(base)
    if mod is None:
        return None
    from vdit_accel.kernels.rope import rope_tables_problem

    from .op import vdit_qk_norm_rope

    def body(proc, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kwargs):
        if (kwargs or encoder_hidden_states is not None or attention_mask is not None or rotary_emb is None
                or getattr(attn, "add_k_proj", None) is not None or not use_triton(hidden_states)
                or hidden_states.dtype not in (torch.float16, torch.bfloat16, torch.float32)):
            return None
        norms = (attn.norm_q, attn.norm_k)
        if not all(_rms_across(n, attn.inner_dim, hidden_states.dtype) for n in norms):
            return None
        cos, sin = rotary_emb
        why = rope_tables_problem(cos, sin, *hidden_states.shape[:2], attn.inner_dim // attn.heads)
        if why is not None:
            warn_once(f"vdit-accel: {type(proc).__name__}'s rotary tables do not suit the fused prologue ({why}): "
                       "the processor's own prologue runs")
            return None
        query, key, value = mod._get_qkv_projections(attn, hidden_states, None)
        eps = [float(n.eps) if n.eps is not None else torch.finfo(query.dtype).eps for n in norms]
        query, key = vdit_qk_norm_rope(query, key, attn.heads, cos, sin, attn.norm_q.weight, attn.norm_k.weight,
                                  eps[0], eps[1])
        value = value.unflatten(2, (attn.heads, -1))
        out = mod.dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                        backend=proc._attention_backend, parallel_config=proc._parallel_config)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)

    return body


def _rms_across(norm, inner_dim: int, dtype: torch.dtype) -> bool:
    """``norm`` is a ``torch.nn.RMSNorm`` with a ``dtype`` weight over the whole ``inner_dim`` row (all
    heads). (A weight of another dtype would promote the eager result: not what the kernel writes.)"""
    return (type(norm) is torch.nn.RMSNorm and norm.weight is not None and norm.weight.dtype == dtype
            and tuple(norm.normalized_shape) == (inner_dim,))
