"""Layer plans: a strategy compiled, per (token grid, layer), into the data its attention calls read.

A :class:`Strategy` says what every head does in resolution-independent terms (patterns in latent
units, token orders, quantization modes). A call needs tensors: the block mask of the call's grid, the
runs of heads that share a quantization mode, the token orders as indices. :func:`compile_layer_plan`
turns one layer of a strategy into those, once per (grid, device, heads, phase), as an immutable
:class:`LayerPlan`; a patched transformer compiles them in its forward pre-hook, caches them per grid,
and each processor holds a reference to its layer's plan. The attention call then only unpacks the
plan (:meth:`LayerPlan.as_tuple`, the arguments of the ``vdit::attention`` op, as FlexAttention's
``BlockMask.as_tuple()``) -- no strategy lookup, no mask build, no string round trip per call.

Phases: a plan is compiled for the denoising phase it serves -- its ``sparse`` stage (0: the dense
warm-up, every head dense; ``k >= 1``: the strategy's ``k``-th stage, :attr:`Strategy.stage_starts`,
where per-layer warm-ups and the strategy's step ranges change what the heads do) and ``quantized``
(outside the strategy's unquantized first and last steps) -- so the pre-hook picks one of a few plans
per (grid, layer) by the step.

Token orders: heads whose static order (raster, tiled) differs from the order the tensors arrive in
(the transformer's *frame*, see :mod:`vdit_accel.pipelines.permute`) get ``k_index`` (K and V are
gathered into the head's order inside the op) and ``q_index`` (the kernel reads Q and writes the
output through it); the mask is each head's pattern in its own order. Heads with a dynamic order
(semantic, segment) choose their key blocks from each call's data: their plan carries a
:class:`DynamicHeads` instead of a mask, and the call is planned per call
(:func:`vdit_accel.orders.plan.plan_call`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .attention import HeadRun, head_runs
from .block_mask import BlockMask
from .grid import VideoGrid
from .orders.plan import frame_index
from .orders.spec import OrderSpec
from .orders.static import block_mask_for_order, static_order
from .patterns import DENSE, PatternSpec, build_block_mask_for_pattern
from .strategy import Strategy


@dataclass(frozen=True, eq=False)
class DynamicHeads:
    """What a layer with semantic / segment heads needs to plan each call.

    ``orders``: each local head's order (None: raster); ``frame``: the order the tensors arrive in;
    ``static_mask``: bool ``[1, H, Mb, Nb]``, each static head's pattern in its own order (the dynamic
    heads' rows are dense and replaced per call), or None when every static head is dense."""

    orders: tuple[OrderSpec | None, ...]
    frame: OrderSpec | None
    static_mask: torch.Tensor | None


@dataclass(frozen=True, eq=False)
class LayerPlan:
    """One layer's self-attention on one grid, as tensors (immutable; shared by layers that match).

    Args:
        grid: the grid it was compiled for; None for a dense plan, which serves a call of any length.
        heads: the global heads ``[start, stop)`` it covers (under Ulysses context parallelism a rank's
            slice, else all); local head ``h`` of the plan is global head ``heads[0] + h``.
        block_size: tokens per query and key block of the mask.
        kv_num_blocks, kv_indices: the block mask (:class:`~vdit_accel.block_mask.BlockMask`'s int32
            tensors, batch dim 1), or None for dense.
        runs: the heads that share a quantization mode, as :class:`~vdit_accel.attention.HeadRun`.
        q_index: the queries' order for the kernel (int ``[1, H, S]``, int32 on CUDA; a per-call plan's
            may be per sample, ``[B, H, S]``), or None.
        k_index: the keys' order (``[S]`` for every head or ``[1, H, S]``, int64), K and V gathered by it
            in the op, or None.
        dynamic: the per-call planning data of semantic / segment heads, or None.
    """

    grid: VideoGrid | None
    heads: tuple[int, int]
    block_size: int
    kv_num_blocks: torch.Tensor | None = None
    kv_indices: torch.Tensor | None = None
    runs: tuple[HeadRun, ...] = ()
    q_index: torch.Tensor | None = None
    k_index: torch.Tensor | None = None
    dynamic: DynamicHeads | None = None
    op_runs: tuple[int, ...] | None = field(init=False)  # runs as the op's schema takes them

    def __post_init__(self):
        n = self.heads[1] - self.heads[0]
        if not self.runs or self.runs[0].start != 0 or self.runs[-1].stop != n or any(
                a.stop != b.start for a, b in zip(self.runs, self.runs[1:])):
            raise ValueError(f"LayerPlan runs {self.runs} do not cover its {n} heads in order")
        if (self.kv_num_blocks is None) != (self.kv_indices is None):
            raise ValueError("LayerPlan takes kv_num_blocks and kv_indices together")
        if self.kv_num_blocks is not None and self.grid is None:
            raise ValueError("a sparse LayerPlan needs the grid its mask was built for")
        packed = None if len(self.runs) == 1 and self.runs[0].mode is None else tuple(
            x for r in self.runs for x in (r.start, r.stop, 0 if r.mode is None else r.mode.kernel_id))
        object.__setattr__(self, "op_runs", packed)

    @property
    def seq_len(self) -> int | None:
        """The call length the plan serves (None: any)."""
        return None if self.grid is None else self.grid.seq_len

    @property
    def num_heads(self) -> int:
        return self.heads[1] - self.heads[0]

    def serves(self, seq_len: int, heads: tuple[int, int]) -> bool:
        """Whether a call over ``seq_len`` tokens of global heads ``heads`` can use this plan."""
        return self.heads == heads and (self.grid is None or self.grid.seq_len == seq_len)

    def as_tuple(self) -> tuple:
        """The ``vdit::attention`` op's arguments after q, k, v (then ``scale``)."""
        return (self.kv_num_blocks, self.kv_indices, self.block_size, self.block_size, self.op_runs, self.q_index,
                self.k_index)

    def block_mask(self) -> BlockMask | None:
        """The mask as a :class:`BlockMask` (for inspection; None when dense or planned per call)."""
        if self.kv_num_blocks is None:
            return None
        return BlockMask(self.kv_num_blocks, self.kv_indices, self.grid.seq_len, self.block_size, self.block_size)

    @property
    def quant_modes(self) -> tuple:
        """Each local head's quantization mode (None: unquantized)."""
        return tuple(r.mode for r in self.runs for _ in range(r.start, r.stop))

    def density(self) -> float:
        """Fraction of (query block, key block) pairs the plan's static mask visits (1.0 = dense;
        per-call heads count as dense)."""
        if self.dynamic is not None:
            mask = self.dynamic.static_mask
            return 1.0 if mask is None else float(mask.float().mean())
        bm = self.block_mask()
        return 1.0 if bm is None else bm.density()


def layer_signature(strategy: Strategy, layer: int, num_heads: int) -> tuple:
    """What ``layer``'s heads do in every stage, as a key: layers with equal signatures share their plans."""
    if not strategy.phases and strategy.layer_warmup_steps is None:
        return strategy.layer_heads(layer, num_heads)
    return tuple(strategy.stage_heads(layer, num_heads, k) for k in range(1, len(strategy.stage_starts) + 1))


def compile_layer_plan(strategy: Strategy, layer: int, num_heads: int, grid: VideoGrid | None,
                       heads: tuple[int, int], block_size: int, device, *, sparse: bool | int = True,
                       quantized: bool = True, frame: OrderSpec | None = None) -> LayerPlan:
    """``layer`` of ``strategy`` (a model of ``num_heads`` heads) as a :class:`LayerPlan` for attention
    calls over ``grid`` (None: unknown, then dense) of global heads ``heads``, on ``device``.

    ``sparse``: the stage (:meth:`Strategy.stage_at`; True is stage 1, the first after the dense
    warm-up); 0 or False: the dense warm-up (no mask, no orders). ``quantized`` False: every head
    unquantized. ``frame``: the static order the call's tokens arrive in (None: raster)."""
    h0, h1 = heads
    specs = (strategy.stage_heads(layer, num_heads, int(sparse)) if sparse else strategy.layer_heads(layer, num_heads))[h0:h1]
    runs = head_runs([h.quant for h in specs] if quantized else None, h1 - h0)
    patterns, orders = [h.pattern for h in specs], [h.order for h in specs]
    if not sparse or grid is None or all(h.pattern == DENSE and not h.dynamic for h in specs):
        return LayerPlan(None, heads, block_size, runs=runs)
    if any(h.dynamic for h in specs):
        static = None
        if not all(h.pattern == DENSE for h in specs):
            static = _order_masks(patterns, orders, grid, block_size, device)
        return LayerPlan(grid, heads, block_size, runs=runs, dynamic=DynamicHeads(tuple(orders), frame, static))
    # Heads in another order than the one the tokens arrive in read them through an index.
    k_index = _static_index([frame_index(o, frame, grid, block_size, device) for o in orders], grid.seq_len, device)
    q_index = None if k_index is None else _kernel_q_index(k_index, h1 - h0)
    rows = _order_masks(patterns, orders, grid, block_size, device)
    bm = BlockMask.from_dense(rows, grid.seq_len, block_size, block_size)
    return LayerPlan(grid, heads, block_size, bm.kv_num_blocks, bm.kv_indices, runs, q_index, k_index)


_ORDER_MASKS: dict[tuple, torch.Tensor] = {}
_ORDER_MASKS_MAX = 256


def _order_masks(patterns: list[PatternSpec], orders: list[OrderSpec | None], grid: VideoGrid, block: int,
                 device) -> torch.Tensor:
    """Bool ``[1, H, Mb, Nb]``: each head's pattern in its own static order (dynamic heads dense).

    Each distinct (pattern, order) mask is built once per (grid, block, device) and shared by every
    head and layer that has it (a searched strategy costs one build per distinct pattern)."""
    rows = []
    for p, o in zip(patterns, orders):
        if o is not None and o.dynamic:
            p, o = DENSE, None
        key = (p, o, grid, block, str(device))
        hit = _ORDER_MASKS.get(key)
        if hit is None:
            if len(_ORDER_MASKS) >= _ORDER_MASKS_MAX:
                _ORDER_MASKS.pop(next(iter(_ORDER_MASKS)))
            if o is None:
                hit = build_block_mask_for_pattern(p, grid, block, block, device)
            else:
                hit = block_mask_for_order(p, grid, static_order(o, grid, block, device), block, block)
            _ORDER_MASKS[key] = hit
        rows.append(hit)
    return torch.stack(rows).unsqueeze(0)


def clear_plan_caches() -> None:
    """Forget the masks of patterns in static orders (to time a cold build)."""
    _ORDER_MASKS.clear()


def _static_index(rows: list[torch.Tensor | None], seq_len: int, device) -> torch.Tensor | None:
    """Per-head positions (None: the identity) as one index: None if all are the identity, the shared
    ``[S]`` if all heads agree, else ``[1, H, S]``."""
    if all(r is None for r in rows):
        return None
    if all(r is not None and (r is rows[0] or torch.equal(r, rows[0])) for r in rows):
        return rows[0]
    ident = torch.arange(seq_len, device=device)
    return torch.stack([ident if r is None else r for r in rows]).unsqueeze(0)


def _kernel_q_index(index: torch.Tensor, heads: int) -> torch.Tensor:
    """An order as the attention kernel reads queries through it: ``[1, H, S]``, int32 on CUDA (the
    kernel's loads of an int32 order are cheaper than of an int64 one)."""
    qi = index if index.dim() == 3 else index.view(1, 1, -1).expand(1, heads, -1)
    return qi.to(torch.int32).contiguous() if qi.is_cuda else qi
