"""Token orders at run time: where the reordering happens, with as little data movement as possible.

Two places, chosen per transformer forward and per layer:

- **Once per forward** (the *frame*): when the strategy's default order is ``tiled`` and the model is Wan
  (``WanTransformer3DModel``, both transformers of Wan 2.2), CogVideoX (``CogVideoXTransformer3DModel``,
  1.0 and 1.5), HunyuanVideo (``HunyuanVideoTransformer3DModel``), LTX-Video
  (``LTXVideoTransformer3DModel``) or Mochi (``MochiTransformer3DModel``), the video hidden states are
  permuted into the tiled order before the first block and back after the last (a forward pre-hook on the
  first block, a forward hook on the last; HunyuanVideo: its dual-stream blocks then its single-stream
  ones, one frame for both), together with the per-token inputs the blocks read: the rotary tables (a
  forward hook on ``rope``; CogVideoX: the ``image_rotary_emb`` forward argument, in the transformer's
  pre-hook) and per-token timesteps, the per-token modulation (Wan 2.2 TI2V: a forward hook on
  ``condition_embedder``; LTX image-to-video: on ``time_embed``; what the output norm reads after the
  last block stays as it is). Only video tokens move: the blocks of the text families get the video
  hidden states apart from the text (CogVideoX splits them after its patch embedding; HunyuanVideo and
  Mochi keep two streams; LTX's text enters through cross-attention only), and their attention puts the
  text first (CogVideoX) or last (HunyuanVideo, Mochi; padded text masked or dropped per sample), so the
  attention sequence is the tiled order with the text in place (the order the per-call plans and masks
  use). What runs before the first block (patch embedding, positional embeddings) and after the last
  (final norms, projection, unpatchify, CogVideoX 1.5's temporal patches included) sees the raster order.
  Every layer then attends in the tiled order with no gather at all: two row gathers of the hidden states
  and two of the rotary tables per forward, shared by all layers. Blocks see tokens in another order; all
  they do per token (norms, MLPs, modulation, RoPE) is order-free, and self-attention is
  order-equivariant, so the output is the unpermuted one up to rounding (tested). Not framed:
  HunyuanVideo's ``token_replace`` image conditioning (its blocks modulate the first frame's tokens, the
  first ``h * w`` of the sequence, apart), SkyReels-V2 and HunyuanVideo 1.5: their tiled heads gather per
  call. The frame is the same at every step of a grid (dense warm-up included), so diffusers' caches
  (FirstBlockCache, MagCache, ...), which keep block outputs across steps, stay consistent.
- **Per call** (:func:`vdit_accel.orders.plan.plan_call`): heads whose order differs from the frame — a
  ``tiled`` head on another model, a ``raster`` head in a tiled frame, every ``semantic`` and ``segment``
  head — gather their k and v rows into their own key order (one launch) inside the attention call; their
  queries never move: the kernel reads each Q row and writes its output row through the query order
  (``q_index`` of :func:`vdit_accel.attention`; ``segment`` has no query order). Semantic heads keep their
  k-means centroids per layer between calls (warm start).

Under context parallelism (Ulysses) there is no frame: each rank's blocks see a shard of the sequence, so
``tiled`` heads gather per call, inside attention, where the rank has the whole sequence of its heads. Not
supported (clear errors): ``semantic`` and ``segment`` under context parallelism, and attention observers
(the search) while a frame is active (they expect raster order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vdit_accel.orders import Tiled, format_order, inverse, plan_call, static_order
from vdit_accel.plan import LayerPlan

from .op import run_plan


@dataclass(frozen=True)
class _Frame:
    """Where a family's forward is permuted once (the hooks below).

    ``blocks``: its block lists in the order the forward runs them; the frame is entered before the
    first block of the first non-empty list and left after the last block of the last.
    ``rope_dim``: the token dim of the (cos, sin) tables its ``rope`` submodule returns, permuted by a
    forward hook; None where there is no such submodule (CogVideoX gets them as a forward argument).
    """

    blocks: tuple[str, ...]
    rope_dim: int | None = None


# Models whose forward we permute once: family -> its frame hooks.
FRAME_FAMILIES = {
    "wan": _Frame(("blocks",), rope_dim=1),  # rope: (1, S, 1, D) each
    "cogvideox": _Frame(("transformer_blocks",)),  # image_rotary_emb: (S, D) each, a forward argument
    "hunyuan_video": _Frame(("transformer_blocks", "single_transformer_blocks"), rope_dim=0),  # (S, D)
    "ltx": _Frame(("transformer_blocks",), rope_dim=1),  # (B, S, D)
    "mochi": _Frame(("transformer_blocks",), rope_dim=0),  # (S, H, D / 2)
}


def _frame_of(transformer, family: str) -> _Frame | None:
    """The family's frame hooks, or None where the forward cannot be permuted once (per-call gathers
    instead): HunyuanVideo's ``token_replace`` image conditioning modulates the first frame's tokens,
    the first ``h * w`` of the sequence, apart from the others."""
    if family not in FRAME_FAMILIES:
        return None
    if family == "hunyuan_video" and getattr(transformer.config, "image_condition_type", None) == "token_replace":
        return None
    return FRAME_FAMILIES[family]


class OrderRuntime:
    """The token orders of one patched transformer (``state``: its :class:`~.patch.PatchState`): its
    frame hooks and its per-call plans."""

    def __init__(self, transformer: torch.nn.Module, state):
        self.state = state
        self.strategy = state.strategy
        self.block = state.block_size
        default = self.strategy.default.order
        family = state.adapter.family
        frame = _frame_of(transformer, family) if isinstance(default, Tiled) else None
        self.frame_order = default if frame is not None else None
        self.frame: torch.Tensor | None = None  # this forward's frame permutation, on its device
        self._frame_inv: torch.Tensor | None = None
        self._frame_len = 0
        self._frames: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        # (layer, its call in the forward) -> its dynamic plans and warm-start state: a layer called once per
        # sample (a key-padding mask splits the batch) keeps one per sample, and the calls of a step's
        # forwards (guidance's two) meet their own slot's plan
        self.memory: dict[tuple[int, int], dict] = {}
        self._calls: dict[int, int] = {}  # layer -> its calls so far in this forward
        self.hooks = [transformer.register_forward_pre_hook(self.on_forward, with_kwargs=True)]
        if frame is not None:
            blocks = [b for name in frame.blocks for b in getattr(transformer, name)]
            self._rope_dim = frame.rope_dim
            if frame.rope_dim is not None:
                self.hooks.append(transformer.rope.register_forward_hook(self._on_rope))
            if family == "wan":
                self.hooks.append(transformer.condition_embedder.register_forward_hook(self._on_condition))
            elif family == "ltx":
                self.hooks.append(transformer.time_embed.register_forward_hook(self._on_time_embed, with_kwargs=True))
            self.hooks += [
                blocks[0].register_forward_pre_hook(self._on_enter, with_kwargs=True),
                blocks[-1].register_forward_hook(self._on_leave),
            ]

    def remove(self) -> None:
        """Take the hooks off and drop the per-call plans and frames (GPU memory) now: the runtime and its
        patch state refer to each other, so only a garbage-collector pass would free them otherwise."""
        for h in self.hooks:
            h.remove()
        self.hooks = []
        for cache in (self.memory, self._frames):
            cache.clear()
        self.frame = self._frame_inv = None

    # -- the frame (once per forward) ------------------------------------------------------------
    @torch.compiler.disable
    def on_forward(self, module, args, kwargs) -> None:
        """After the patch state's pre-hook: check what orders cannot do, and set this forward's frame."""
        state = self.state
        self.frame = self._frame_inv = None
        self._calls.clear()
        if state.parallel and any(h.dynamic for h in self.strategy.heads()):
            raise NotImplementedError(
                "vdit-accel: semantic and segment token orders are not supported under context parallelism; "
                "use a static order (raster, tiled) with enable_parallelism()"
            )
        grid = state.grid
        if self.frame_order is None or grid is None or state.parallel:  # sharded: tiled heads gather per call
            return
        if state.observers:
            raise NotImplementedError(
                "vdit-accel: attention observers (e.g. the sparsity search) expect raster order, but this strategy "
                f"permutes the hidden states ({format_order(self.frame_order)}); patch a strategy without 'order'"
            )
        hidden = args[0] if args else kwargs["hidden_states"]
        key = (grid, str(hidden.device))
        if key not in self._frames:
            # The video part of the tiled order (text, if any, keeps its place): the blocks get the video
            # hidden states alone.
            start = grid.video_start
            perm = static_order(self.frame_order, grid, self.block, hidden.device)
            perm = perm[start:start + grid.video_len] - start
            self._frames = {key: (perm, inverse(perm))}  # the last grid's only
        self.frame, self._frame_inv = self._frames[key]
        self._frame_len = grid.video_len
        return self._forward_rotary(args, kwargs)

    def _forward_rotary(self, args, kwargs):
        """CogVideoX's rotary tables, ``image_rotary_emb`` (cos, sin), each ``(V, D)``: a forward argument
        every block gets as it is, so permuted here, once per forward."""
        if self.state.adapter.family != "cogvideox":
            return None
        index = 5  # CogVideoXTransformer3DModel.forward(hidden_states, encoder_hidden_states, timestep,
        #            timestep_cond, ofs, image_rotary_emb, ...)
        rope = args[index] if len(args) > index else kwargs.get("image_rotary_emb")
        if rope is None:  # CogVideoX 2B: sin-cos positions added in the patch embedding, before the frame
            return None
        rope = tuple(self._take(t, 0, self.frame, "the rotary table") for t in rope)
        if len(args) > index:
            return (*args[:index], rope, *args[index + 1:]), kwargs
        return args, {**kwargs, "image_rotary_emb": rope}

    def _take(self, x: torch.Tensor, dim: int, index: torch.Tensor, what: str) -> torch.Tensor:
        if x.shape[dim] != self._frame_len:
            raise NotImplementedError(
                f"vdit-accel: {what} has {x.shape[dim]} tokens along dim {dim} where the video has {self._frame_len}; "
                f"the tiled frame cannot permute it (use order 'tiled' per head, which gathers inside attention)"
            )
        return x.index_select(dim, index)

    @torch.compiler.disable
    def _on_rope(self, module, args, out):
        if self.frame is None:
            return out
        return tuple(self._take(t, self._rope_dim, self.frame, "the rotary table") for t in out)

    @torch.compiler.disable
    def _on_condition(self, module, args, out):
        # (temb, timestep_proj, text, image): per-token timesteps (Wan 2.2 TI2V) make timestep_proj
        # (B, S, 6 * C); temb stays in raster order (the output norm reads it after the last block).
        if self.frame is None or out[1].dim() != 3:
            return out
        return (out[0], self._take(out[1], 1, self.frame, "the per-token timestep embedding"), *out[2:])

    @torch.compiler.disable
    def _on_time_embed(self, module, args, kwargs, out):
        # LTX: (temb, embedded_timestep), each (B * N, C) for N timesteps per sample; per-token timesteps
        # (LTX image-to-video) make N the video length. embedded_timestep stays in raster order (the
        # output modulation reads it after the last block).
        batch = kwargs.get("batch_size")
        if self.frame is None or batch is None or out[0].shape[0] == batch:
            return out
        temb = out[0].unflatten(0, (batch, -1))
        return (self._take(temb, 1, self.frame, "the per-token timestep embedding").flatten(0, 1), *out[1:])

    @torch.compiler.disable
    def _on_enter(self, module, args, kwargs):
        if self.frame is None:
            return None
        if args:
            return (self._take(args[0], 1, self.frame, "hidden_states"), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self._take(kwargs["hidden_states"], 1, self.frame, "hidden_states")}

    @torch.compiler.disable
    def _on_leave(self, module, args, out):
        if self.frame is None:
            return out
        if isinstance(out, tuple):  # CogVideoX, HunyuanVideo, Mochi: (video, text); the text was never permuted
            return (self._take(out[0], 1, self._frame_inv, "the last block's output"), *out[1:])
        return self._take(out, 1, self._frame_inv, "the last block's output")

    # -- one attention call with per-call plans ---------------------------------------------------------
    @torch.compiler.disable
    def attend(self, proc, plan, query, key, value, scale) -> torch.Tensor:
        """Our attention for one call of a layer whose plan has semantic / segment heads (the backend
        calls this): the call's token orders and block mask from its data (:func:`plan_call`), K and V
        moved into the key order, Q read and the output written through the query order by the kernel."""
        layer, block, dyn = proc._vdit_layer, self.block, plan.dynamic
        slot = self._calls.get(layer, 0)
        self._calls[layer] = slot + 1
        call = plan_call(query, key, plan.grid, list(dyn.orders), dyn.frame, block, dyn.static_mask,
                         self.memory.setdefault((layer, slot), {}), scale, self.state.known_step, value)
        key, value = call.gather_kv(key, value)
        bm = call.block_mask(query.shape[1], block)
        this_call = LayerPlan(plan.grid, plan.heads, block, bm.kv_num_blocks, bm.kv_indices, plan.runs,
                              call.kernel_q_index(query.shape[2]))
        return run_plan(query, key, value, this_call, scale)
