"""One adapter per diffusers model family: where its self-attention is, and how to read its grid.

An adapter answers these questions about a transformer class (checked against diffusers 0.42.1):

- ``layers(transformer)``: the ordered ``(name, attention module)`` pairs of its video self-attention
  (joint text-video attention included; cross-attention, HunyuanVideo's token refiner and Mochi's
  attention pool excluded);
- ``num_heads`` / ``head_dim``: from its config;
- ``grid(transformer, args, kwargs)``: the :class:`VideoGrid` of a forward call, read in a forward
  pre-hook from the call's inputs and the config's patch sizes: the video (t, h, w) and where text sits
  in the attention sequence (``text_at``). ``text_len`` is the text length the forward was given; the
  backend re-derives it per attention call from the sequence length, because Mochi drops each
  sample's padded text tokens and HunyuanVideo masks them. ``None`` when the call does not tell
  (LTX given only ``video_coords``): the backend then runs such calls dense, with a warning;
- ``timestep(args, kwargs)``: the call's timestep, from which the denoising step is tracked;
- ``calls_sdpa``: True when the processor calls ``F.scaled_dot_product_attention`` itself with
  ``(B, H, S, D)`` (CogVideoX, Mochi) instead of diffusers' ``dispatch_attention_fn``; the patched
  processor then routes that call to our backend (see :mod:`.backend`).

Text padding needs no adapter field: a key-padding ``attn_mask`` (HunyuanVideo's ``[B, 1, 1, S]``,
HunyuanVideo 1.5's ``[B, 1, S, S]``) is recognised, checked and honoured exactly by the backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from vdit_accel.grid import TextAt, VideoGrid


def _arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


@dataclass(frozen=True)
class Adapter:
    family: str
    class_names: tuple[str, ...]
    layers: Callable[[torch.nn.Module], list[tuple[str, torch.nn.Module]]]
    grid: Callable[[torch.nn.Module, tuple, dict], VideoGrid | None]
    timestep: Callable[[tuple, dict], Any]
    calls_sdpa: bool = False

    def num_heads(self, transformer) -> int:
        return int(transformer.config.num_attention_heads)

    def head_dim(self, transformer) -> int:
        return int(transformer.config.attention_head_dim)


def _blocks(*groups: tuple[str, str]):
    """layers(): ``{group}.{i}.{attr}`` for each (ModuleList attribute, attention attribute) in order."""

    def layers(tr):
        return [(f"{g}.{i}.{a}", getattr(blk, a)) for g, a in groups for i, blk in enumerate(getattr(tr, g))]

    return layers


def _timestep_at(index: int):
    return lambda args, kwargs: _arg(args, kwargs, index, "timestep")


def _video_grid(t: int, h: int, w: int, text_len: int, text_at: TextAt) -> VideoGrid:
    return VideoGrid(t, h, w, text_len, text_at if text_len else "none")


def _text_len(args, kwargs, index: int) -> int:
    enc = _arg(args, kwargs, index, "encoder_hidden_states")
    return int(enc.shape[1]) if enc is not None else 0


def _wan_grid(transformer, args, kwargs) -> VideoGrid:
    hidden = _arg(args, kwargs, 0, "hidden_states")  # (B, C, F, H, W)
    p_t, p_h, p_w = transformer.config.patch_size
    _, _, f, h, w = hidden.shape
    return VideoGrid(f // p_t, h // p_h, w // p_w)


def _hunyuan_grid(transformer, args, kwargs) -> VideoGrid:
    hidden = _arg(args, kwargs, 0, "hidden_states")  # (B, C, F, H, W); text after the video
    p, p_t = transformer.config.patch_size, transformer.config.patch_size_t
    _, _, f, h, w = hidden.shape
    return _video_grid(f // p_t, h // p, w // p, _text_len(args, kwargs, 2), "suffix")


def _hunyuan15_grid(transformer, args, kwargs) -> VideoGrid:
    hidden = _arg(args, kwargs, 0, "hidden_states")  # (B, C, F, H, W); image + ByT5 + MLLM tokens after
    p, p_t = transformer.config.patch_size, transformer.config.patch_size_t
    _, _, f, h, w = hidden.shape
    text = _text_len(args, kwargs, 2)
    for index, name in ((5, "encoder_hidden_states_2"), (7, "image_embeds")):
        extra = _arg(args, kwargs, index, name)
        text += int(extra.shape[1]) if extra is not None else 0
    return _video_grid(f // p_t, h // p, w // p, text, "suffix")


def _cogvideox_grid(transformer, args, kwargs) -> VideoGrid:
    hidden = _arg(args, kwargs, 0, "hidden_states")  # (B, F, C, H, W); text before the video
    p, p_t = transformer.config.patch_size, transformer.config.patch_size_t or 1
    _, f, _, h, w = hidden.shape
    return _video_grid(f // p_t, h // p, w // p, _text_len(args, kwargs, 1), "prefix")


def _ltx_grid(transformer, args, kwargs) -> VideoGrid | None:
    # hidden_states arrive packed, (B, S, C); the latent sizes come as keyword arguments.
    hidden = _arg(args, kwargs, 0, "hidden_states")
    sizes = [_arg(args, kwargs, i, n) for i, n in ((4, "num_frames"), (5, "height"), (6, "width"))]
    if any(s is None for s in sizes):
        return None  # LTXConditionPipeline passes video_coords only: no grid to read
    p, p_t = transformer.config.patch_size, transformer.config.patch_size_t
    grid = VideoGrid(int(sizes[0]) // p_t, int(sizes[1]) // p, int(sizes[2]) // p)
    return grid if grid.video_len == hidden.shape[1] else None


def _mochi_grid(transformer, args, kwargs) -> VideoGrid:
    hidden = _arg(args, kwargs, 0, "hidden_states")  # (B, C, F, H, W); no temporal patching
    p = transformer.config.patch_size
    _, _, f, h, w = hidden.shape
    return _video_grid(f, h // p, w // p, _text_len(args, kwargs, 1), "suffix")


WAN = Adapter("wan", ("WanTransformer3DModel",), _blocks(("blocks", "attn1")), _wan_grid, _timestep_at(1))
SKYREELS_V2 = Adapter(
    "skyreels_v2", ("SkyReelsV2Transformer3DModel",), _blocks(("blocks", "attn1")), _wan_grid, _timestep_at(1)
)
HUNYUAN_VIDEO = Adapter(
    "hunyuan_video",
    ("HunyuanVideoTransformer3DModel",),
    _blocks(("transformer_blocks", "attn"), ("single_transformer_blocks", "attn")),
    _hunyuan_grid,
    _timestep_at(1),
)
HUNYUAN_VIDEO_1_5 = Adapter(
    "hunyuan_video_1_5",
    ("HunyuanVideo15Transformer3DModel",),
    _blocks(("transformer_blocks", "attn")),
    _hunyuan15_grid,
    _timestep_at(1),
)
COGVIDEOX = Adapter(
    "cogvideox",
    ("CogVideoXTransformer3DModel",),
    _blocks(("transformer_blocks", "attn1")),
    _cogvideox_grid,
    _timestep_at(2),
    calls_sdpa=True,
)
LTX = Adapter(
    "ltx", ("LTXVideoTransformer3DModel",), _blocks(("transformer_blocks", "attn1")), _ltx_grid, _timestep_at(2)
)
MOCHI = Adapter(
    "mochi",
    ("MochiTransformer3DModel",),
    _blocks(("transformer_blocks", "attn1")),
    _mochi_grid,
    _timestep_at(2),
    calls_sdpa=True,
)

ADAPTERS: tuple[Adapter, ...] = (WAN, SKYREELS_V2, HUNYUAN_VIDEO, HUNYUAN_VIDEO_1_5, COGVIDEOX, LTX, MOCHI)


def adapter_for(transformer) -> Adapter:
    """The adapter of ``transformer``'s class (or of the diffusers class it derives from)."""
    for cls in type(transformer).__mro__:
        for a in ADAPTERS:
            if cls.__name__ in a.class_names:
                return a
    supported = ", ".join(n for a in ADAPTERS for n in a.class_names)
    raise NotImplementedError(
        f"vdit-accel has no adapter for {type(transformer).__name__}; supported transformers: {supported}"
    )
