"""``patch`` / ``unpatch``: route a diffusers pipeline's self-attention through vdit-accel."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from vdit_accel.block_mask import BlockMask
from vdit_accel.grid import VideoGrid
from vdit_accel.patterns import build_block_mask
from vdit_accel.strategy import Strategy

from .adapters import Adapter, adapter_for
from .backend import current_layer, register_backend

logger = logging.getLogger("vdit_accel")

_STATE_ATTR = "_vdit_state"
_processor_classes: dict[type, type] = {}


def _patched_processor_class(base: type) -> type:
    """The model's own processor class, with our backend and the layer published per call.

    ``functools.wraps`` keeps the base ``__call__`` signature visible to ``inspect.signature``:
    diffusers' ``Attention.forward`` drops keyword arguments the processor does not name.
    """
    cls = _processor_classes.get(base)
    if cls is not None:
        return cls

    @functools.wraps(base.__call__)
    def __call__(self, *args, **kwargs):
        token = current_layer.set((self._vdit_state, self._vdit_layer))
        try:
            return base.__call__(self, *args, **kwargs)
        finally:
            current_layer.reset(token)

    cls = type(f"Vdit{base.__name__}", (base,), {"__call__": __call__, "__module__": __name__})
    _processor_classes[base] = cls
    return cls


class PatchState:
    """What a patched transformer carries: strategy, grid, step, block-mask cache, the originals."""

    def __init__(self, transformer: torch.nn.Module, adapter: Adapter, strategy: Strategy, block_size: int):
        self.adapter = adapter
        self.strategy = strategy
        self.block_size = block_size
        self.num_heads = adapter.num_heads(transformer)
        self.layers = adapter.layers(transformer)
        self.grid: VideoGrid | None = None
        self.step = 0
        self._last_timestep: float | None = None
        self._masks: dict[tuple, BlockMask | None] = {}
        self.originals: dict[str, object] = {}
        self.hook = None
        # Called as observer(layer, step, q, k, v) before each patched self-attention call, q/k/v in
        # (B, S, H, D): how the offline search profiles heads without a second code path.
        self.observers: list = []

    # Forward pre-hook of the transformer: the grid and the denoising step of this call.
    def on_forward(self, module, args, kwargs):
        self.grid = self.adapter.grid(module, args, kwargs)
        t = self.adapter.timestep(args, kwargs)
        if t is not None:
            tv = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
            # Denoising runs from high to low timesteps: a lower one is the next step, an equal one
            # the other half of classifier-free guidance, a higher one a new generation.
            if self._last_timestep is None or tv > self._last_timestep:
                self.step = 0
            elif tv < self._last_timestep:
                self.step += 1
            self._last_timestep = tv

    def reset(self) -> None:
        """Forget the step count (the next call counts as step 0)."""
        self.step, self._last_timestep = 0, None

    def block_mask(self, layer: int, query: torch.Tensor) -> BlockMask | None:
        """The block mask of ``layer`` for the current grid and step; None = dense. Cached."""
        if self.step < self.strategy.dense_warmup_steps:
            return None
        grid = self.grid
        if grid is None or grid.seq_len != query.shape[1]:
            raise RuntimeError(
                f"vdit-accel: the self-attention of layer {layer} got {query.shape[1]} tokens but the "
                f"transformer's forward announced grid {grid}; call the patched transformer's forward, "
                "not its blocks directly"
            )
        key = (grid, layer, query.device)
        if key not in self._masks:
            patterns = self.strategy.layer_patterns(layer, self.num_heads)
            if all(p["kind"] == "dense" for p in patterns):
                self._masks[key] = None
            else:
                self._masks[key] = build_block_mask(patterns, grid, self.block_size, self.block_size, query.device)
        return self._masks[key]

    def mean_density(self, grid: VideoGrid) -> float:
        """Fraction of (query block, key block) pairs visited, over all layers and heads (1.0 = dense)."""
        total = 0.0
        for layer in range(len(self.layers)):
            patterns = self.strategy.layer_patterns(layer, self.num_heads)
            if all(p["kind"] == "dense" for p in patterns):
                total += 1.0
            else:
                total += build_block_mask(patterns, grid, self.block_size, self.block_size).density()
        return total / len(self.layers)


def _transformers_of(obj) -> list[torch.nn.Module]:
    if isinstance(obj, torch.nn.Module):
        return [obj]
    found = [getattr(obj, n, None) for n in ("transformer", "transformer_2")]
    found = [t for t in found if t is not None]
    if not found:
        raise ValueError(f"{type(obj).__name__} has no 'transformer'; pass a diffusers pipeline or its transformer")
    return found


def patch(pipe_or_transformer, strategy: Strategy | str | Path = "dense", *, block_size: int = 128):
    """Route the self-attention of a diffusers video pipeline (or transformer) through vdit-accel.

    Args:
        pipe_or_transformer: a pipeline (its ``transformer`` and, for Wan 2.2, ``transformer_2`` are
            patched) or a transformer model.
        strategy: a :class:`Strategy`, a path to a strategy file, ``"dense"``, or a uniform pattern
            in short form (``"window3d:t=1,h=2,w=2"``).
        block_size: tokens per query and key block of the sparse masks (128 matches the kernels' tiles
            on Hopper; smaller blocks follow a pattern more closely at more per-block overhead).

    Only self-attention (``attn1``) processors are replaced; cross-attention is left alone. The token
    grid is read from each forward call, the denoising step tracked from its timestep, and each block
    mask built once per (grid, layer). Patching twice raises; :func:`unpatch` restores the originals.
    Returns the object it was given.
    """
    strategy = Strategy.from_spec(strategy)
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")
    transformers = _transformers_of(pipe_or_transformer)
    for tr in transformers:
        if hasattr(tr, _STATE_ATTR):
            raise RuntimeError(f"{type(tr).__name__} is already patched by vdit-accel; call unpatch() first")
    plans = []
    for tr in transformers:  # validate everything before changing anything
        adapter = adapter_for(tr)
        layers = adapter.layers(tr)
        strategy.validate_for(type(tr).__name__, len(layers), adapter.num_heads(tr), adapter.head_dim(tr))
        plans.append((tr, adapter))
    backend = register_backend()
    for tr, adapter in plans:
        state = PatchState(tr, adapter, strategy, block_size)
        for i, (name, attn) in enumerate(state.layers):
            orig = attn.processor
            proc = object.__new__(_patched_processor_class(type(orig)))
            proc.__dict__.update(orig.__dict__)
            proc._attention_backend = backend
            proc._vdit_state, proc._vdit_layer = state, i
            state.originals[name] = orig
            attn.processor = proc
        state.hook = tr.register_forward_pre_hook(state.on_forward, with_kwargs=True)
        setattr(tr, _STATE_ATTR, state)
    logger.info("vdit-accel: patched %d transformer(s) with %s", len(plans), strategy.describe())
    return pipe_or_transformer


def unpatch(pipe_or_transformer):
    """Restore the original attention processors exactly and remove our hooks."""
    transformers = _transformers_of(pipe_or_transformer)
    if not any(hasattr(tr, _STATE_ATTR) for tr in transformers):
        raise RuntimeError("not patched by vdit-accel")
    for tr in transformers:
        state: PatchState | None = getattr(tr, _STATE_ATTR, None)
        if state is None:
            continue
        for name, attn in state.layers:
            attn.processor = state.originals[name]
        state.hook.remove()
        delattr(tr, _STATE_ATTR)
    return pipe_or_transformer


def patch_state(transformer) -> PatchState | None:
    """The :class:`PatchState` of a patched transformer (None if not patched)."""
    return getattr(transformer, _STATE_ATTR, None)
