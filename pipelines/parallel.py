"""Ulysses context parallelism: one video generation spread over P processes (one GPU each).

diffusers' ``enable_parallelism(config=ContextParallelConfig(ulysses_degree=P))`` shards a transformer's
sequence over P ranks by a *context-parallel plan* (which module inputs to split, which output to
gather), and each attention call exchanges, by an all-to-all, the sequence shards of all heads for the
whole sequence of ``H / P`` heads. Each rank thus attends the whole sequence of its heads, so a
per-head block-sparse strategy stays exact (the backend applies the patterns of the rank's global
heads: :func:`.backend.local_heads`). :func:`enable_ulysses` applies it to a pipeline's transformers
with the plan each family needs, after :func:`check_ulysses`:

- **Wan 2.1 / 2.2**: diffusers 0.42.1's own plan (``_cp_plan``): the video tokens are split.
- **HunyuanVideo**: diffusers has no plan: its joint attention puts the text after the video, and a
  plain Ulysses exchange of both would interleave them (``[video_0, text_0, video_1, text_1, ...]``)
  under a key-padding mask written for ``[video, text]``. Ours (:func:`_hunyuan_plan`) splits only the
  video (the rotary tables with it) and gathers at ``proj_out``; the text stream is replicated, every
  rank computing it alike. Its attention calls, whatever their backend, run :class:`JointUlysses`: the
  video by diffusers' all-to-all, the rank's heads of the text by slicing, the backend's attention over
  ``[video, text]`` exactly as on one GPU (the same mask), the video back by the reverse all-to-all, the
  text's heads by an all-gather. So the unpatched model is diffusers' attention, parallelised, and the
  patched one ours.
- **CogVideoX, Mochi, SkyReels-V2, HunyuanVideo 1.5** (no plan in diffusers, none of ours), LTX-Video
  (diffusers' plan fails on its pipeline's own call: see ``_REFUSED``) and HunyuanVideo's
  ``token_replace`` image conditioning (it modulates the first frame's tokens apart): refused, before
  any work, with the reason.

Token orders under Ulysses: static ones (``tiled``) are gathered per call inside attention (the
once-per-forward frame of :mod:`.permute` would permute a sharded sequence); ``semantic`` and
``segment`` are refused.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable

import torch

from .adapters import adapter_for
from .patch import _transformers_of

# Families and where their plan comes from.
DIFFUSERS_PLANS = ("wan",)  # the transformer class's own _cp_plan (diffusers 0.42.1)
OUR_PLANS = ("hunyuan_video",)
_NO_PLAN = "diffusers 0.42.1 has no context-parallel plan for it and vdit-accel supplies none"
_REFUSED = {
    "skyreels_v2": f"{_NO_PLAN} (its per-frame timesteps, diffusion forcing, would need one of their own)",
    "cogvideox": f"{_NO_PLAN} (its processors call SDPA directly and its text sits before the video)",
    "mochi": f"{_NO_PLAN} (its processors call SDPA directly and drop padded text per sample)",
    "hunyuan_video_1_5": f"{_NO_PLAN} (its joint attention has image, ByT5 and MLLM tokens after the video)",
    # diffusers' plan: the text mask, split with the text and gathered back as (B, 1, L), broadcasts over
    # the batch where SDPA expects the heads ("output with shape [2, 1, 192, 16] doesn't match the broadcast
    # shape [2, 2, 192, 16]": the tiny LTX pipeline, unpatched, guidance batch 2, 2 gloo ranks, 2026-12).
    "ltx": "diffusers 0.42.1's own plan for it fails on the pipeline's text mask in cross-attention (batch 2)",
}


def check_ulysses(transformer, degree: int, video_tokens: int | None = None) -> None:
    """Raise (``ValueError`` / ``NotImplementedError``, the fix in the message) where Ulysses degree
    ``degree`` cannot run ``transformer`` exactly: a family without a plan, or heads or (given) video
    tokens that ``degree`` does not divide."""
    if not isinstance(degree, int) or degree < 1:
        raise ValueError(f"the Ulysses degree must be an integer >= 1, got {degree!r}")
    adapter = adapter_for(transformer)
    name = type(transformer).__name__
    if adapter.family in _REFUSED:
        raise NotImplementedError(
            f"vdit-accel: Ulysses context parallelism is not supported for {name}: {_REFUSED[adapter.family]}; run "
            f"it on one GPU. Supported under Ulysses: {', '.join(ulysses_classes())}")
    if adapter.family == "hunyuan_video" and getattr(transformer.config, "image_condition_type", None) == "token_replace":
        raise NotImplementedError(
            f"vdit-accel: Ulysses context parallelism is not supported for {name} with image_condition_type="
            "'token_replace' (image-to-video modulates the first frame's tokens apart); run it on one GPU")
    heads = adapter.num_heads(transformer)
    if heads % degree:
        raise ValueError(f"Ulysses degree {degree} does not divide {name}'s {heads} attention heads; use a degree "
                         f"that divides {heads} ({', '.join(str(d) for d in range(2, heads + 1) if heads % d == 0)})")
    if video_tokens is not None and video_tokens % degree:
        raise ValueError(f"Ulysses degree {degree} does not divide the {video_tokens} video tokens of this size: "
                         "choose frames, height and width whose token grid (t x h x w) it divides")


def ulysses_classes() -> tuple[str, ...]:
    """The transformer classes :func:`enable_ulysses` runs."""
    from .adapters import ADAPTERS

    return tuple(c for a in ADAPTERS if a.family in DIFFUSERS_PLANS + OUR_PLANS for c in a.class_names)


def enable_ulysses(pipe_or_transformer, degree: int):
    """Shard a pipeline's transformer(s) (or a transformer) over ``degree`` ranks by Ulysses context
    parallelism; ``torch.distributed`` must be initialised with ``degree`` processes, each on its own
    device. ``degree`` 1 changes nothing. Before or after :func:`vdit_accel.patch` alike. Every rank
    then calls the pipeline with the same inputs and gets the same output.

    Checks every transformer first (:func:`check_ulysses`); each forward then checks that ``degree``
    divides its video tokens. Returns the object it was given."""
    from diffusers import ContextParallelConfig

    transformers = _transformers_of(pipe_or_transformer)
    for tr in transformers:
        check_ulysses(tr, degree)
    if degree == 1:
        return pipe_or_transformer
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise RuntimeError("enable_ulysses needs torch.distributed initialised (run under torchrun, one process a GPU)")
    world = torch.distributed.get_world_size()
    if world != degree:
        raise ValueError(f"Ulysses degree {degree} must equal the number of processes ({world})")
    for tr in transformers:
        family = adapter_for(tr).family
        with _cpu_as_one_device():
            tr.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree),
                                  cp_plan=_hunyuan_plan(tr) if family == "hunyuan_video" else None)
        if family in OUR_PLANS:
            _route_joint(tr)
        tr.register_forward_pre_hook(_check_forward(degree), with_kwargs=True)
    return pipe_or_transformer


@contextlib.contextmanager
def _cpu_as_one_device():
    """diffusers places rank r on device ``r % torch.accelerator.device_count()``: a division by zero on a
    machine without an accelerator (diffusers 0.42.1, torch 2.13; 2026-12). There the CPU is the one device."""
    if torch.accelerator.is_available():
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def _check_forward(degree: int):
    def pre_hook(module, args, kwargs):
        grid = adapter_for(module).grid(module, args, kwargs)
        if grid is None:
            return
        check_ulysses(module, degree, grid.video_len)
        joint = getattr(module._parallel_config, JOINT_ATTR, None)
        if joint is not None:
            joint.text_len = grid.text_len

    return pre_hook


def _hunyuan_plan(transformer) -> dict:
    """HunyuanVideo's context-parallel plan: the video split before the first block (the text mask is
    built over the whole ``[video, text]`` sequence before it), the rotary tables ``(V, D)`` with it, the
    video gathered after ``proj_out``; text not split."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    first = "transformer_blocks.0" if len(transformer.transformer_blocks) else "single_transformer_blocks.0"
    rope = ContextParallelInput(split_dim=0, expected_dims=2, split_output=True)
    return {
        "rope": {0: rope, 1: rope},
        first: {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)},
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


JOINT_ATTR = "_vdit_joint"  # on a transformer's ParallelConfig: its JointUlysses


def _route_joint(transformer) -> None:
    """Make the Ulysses calls of ``transformer``'s joint attention (whatever their backend) run
    :class:`JointUlysses`: it marks the transformer's parallel config, and diffusers' templated
    context-parallel function (which every backend calls under context parallelism) hands calls of a
    marked config to it."""
    from diffusers.models import attention_dispatch

    setattr(transformer._parallel_config, JOINT_ATTR, JointUlysses(transformer._parallel_config.context_parallel_config))
    original = attention_dispatch._templated_context_parallel_attention
    if getattr(original, "_vdit_joint", False):
        return

    @functools.wraps(original)
    def templated(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                  return_lse=False, *, forward_op, backward_op, _parallel_config=None):
        joint = getattr(_parallel_config, JOINT_ATTR, None)
        if joint is None:
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                            forward_op=forward_op, backward_op=backward_op, _parallel_config=_parallel_config)
        if return_lse:
            raise NotImplementedError("vdit-accel: joint Ulysses attention does not return the log-sum-exp")

        def attend(q, k, v, mask):
            return forward_op(None, q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, False, _save_ctx=False,
                              _parallel_config=_parallel_config)

        return joint(query, key, value, attn_mask, attend)

    templated._vdit_joint = True
    attention_dispatch._templated_context_parallel_attention = templated


@dataclass(eq=False)
class JointUlysses:
    """The Ulysses exchange of joint attention whose text, after the video, is replicated on every rank.

    A call gets ``(B, V / P + L, H, D)`` q, k, v (this rank's video shard, then all ``L`` text tokens)
    and the key-padding mask over the whole ``[video, text]`` sequence; it attends ``(B, V + L, H / P,
    D)`` (all video tokens and the text of the rank's heads, in one GPU's order) with the backend's own
    attention ``attend(q, k, v, mask)`` (diffusers' forward op: ours, SDPA, ...) and returns the rank's
    ``(B, V / P + L, H, D)``. ``text_len``: the forward's text tokens, set by the forward pre-hook of
    :func:`enable_ulysses`."""

    cp: object  # diffusers' ContextParallelConfig, set up
    text_len: int = 0

    def __call__(self, query, key, value, attn_mask, attend: Callable) -> torch.Tensor:
        degree, rank = self.cp.ulysses_degree, self.cp._ulysses_local_rank
        group = self.cp._ulysses_mesh.get_group()
        batch, local, heads, dim = query.shape
        text = self.text_len
        shard, head_n = local - text, heads // degree
        if shard < 1 or key.shape != query.shape or (attn_mask is not None and attn_mask.shape[-1] != shard * degree + text):
            raise RuntimeError(
                f"vdit-accel: joint Ulysses attention got {local} tokens with {text} text tokens announced and a mask "
                f"over {None if attn_mask is None else attn_mask.shape[-1]}; call the transformer's forward")
        heads_of_rank = slice(rank * head_n, (rank + 1) * head_n)

        def gather_sequence(x):  # (B, V/P, H, D) -> (B, V, H/P, D), as diffusers' Ulysses exchange
            x = x.reshape(batch, shard, degree, head_n, dim).permute(2, 1, 0, 3, 4).contiguous()
            return all_to_all(x, group).flatten(0, 1).permute(1, 0, 2, 3)

        q, k, v = (torch.cat([gather_sequence(x[:, :shard]), x[:, shard:, heads_of_rank]], dim=1)
                   for x in (query, key, value))
        out = attend(q, k, v, attn_mask)  # (B, V + L, H/P, D)
        video = out[:, :shard * degree].reshape(batch, degree, shard, head_n, dim).permute(1, 3, 0, 2, 4).contiguous()
        video = all_to_all(video, group).flatten(0, 1).permute(1, 2, 0, 3)  # (B, V/P, H, D)
        text_out = all_gather_heads(out[:, shard * degree:], group)  # (B, L, H, D)
        return torch.cat([video, text_out], dim=1)


def all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """diffusers' Ulysses all-to-all (dim 0 split over the ranks), looked up per call (so that a timer
    wrapping diffusers' function times ours too)."""
    from diffusers.models import attention_dispatch

    return attention_dispatch._all_to_all_single(x, group)


def all_gather_heads(x: torch.Tensor, group) -> torch.Tensor:
    """``(B, L, H / P, D)`` of every rank, concatenated over heads in rank order: ``(B, L, H, D)``."""
    local = x.permute(2, 0, 1, 3).contiguous()  # heads first: all_gather_into_tensor stacks along dim 0
    out = local.new_empty((local.shape[0] * torch.distributed.get_world_size(group), *local.shape[1:]))
    torch.distributed.all_gather_into_tensor(out, local, group=group)
    return out.permute(1, 2, 0, 3)
