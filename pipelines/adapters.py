"""One adapter per diffusers model family: where its self-attention is, and how to read its grid.

An adapter answers four questions about a transformer class:

- ``layers(transformer)``: the ordered ``(name, attention module)`` pairs of its self-attention;
- ``num_heads`` / ``head_dim``: from its config;
- ``grid(transformer, args, kwargs)``: the :class:`VideoGrid` of a forward call, read in a forward
  pre-hook from the call's inputs and the config's patch sizes;
- ``timestep(args, kwargs)``: the call's timestep, from which the denoising step is tracked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from vdit_accel.grid import VideoGrid


def _arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


@dataclass(frozen=True)
class Adapter:
    family: str
    class_names: tuple[str, ...]
    layers: Callable[[torch.nn.Module], list[tuple[str, torch.nn.Module]]]
    grid: Callable[[torch.nn.Module, tuple, dict], VideoGrid]
    timestep: Callable[[tuple, dict], Any]

    def num_heads(self, transformer) -> int:
        return int(transformer.config.num_attention_heads)

    def head_dim(self, transformer) -> int:
        return int(transformer.config.attention_head_dim)


def _wan_grid(transformer, args, kwargs) -> VideoGrid:
    hidden = _arg(args, kwargs, 0, "hidden_states")  # (B, C, F, H, W)
    p_t, p_h, p_w = transformer.config.patch_size
    _, _, f, h, w = hidden.shape
    return VideoGrid(f // p_t, h // p_h, w // p_w)


WAN = Adapter(
    family="wan",
    class_names=("WanTransformer3DModel",),
    layers=lambda tr: [(f"blocks.{i}.attn1", blk.attn1) for i, blk in enumerate(tr.blocks)],
    grid=_wan_grid,
    timestep=lambda args, kwargs: _arg(args, kwargs, 1, "timestep"),
)

ADAPTERS: tuple[Adapter, ...] = (WAN,)


def adapter_for(transformer) -> Adapter:
    name = type(transformer).__name__
    for a in ADAPTERS:
        if name in a.class_names:
            return a
    supported = ", ".join(n for a in ADAPTERS for n in a.class_names)
    raise NotImplementedError(f"vdit-accel has no adapter for {name}; supported transformers: {supported}")
