"""Token orders: which token sits at which position of the sequence the kernels see.

An order is a permutation ``perm`` (int64 ``[S]``, or ``[..., S]`` per head): position ``i`` of the
reordered sequence holds original token ``perm[i]``; :func:`.static.inverse` undoes it. A block-sparse
kernel visits whole blocks of consecutive positions, so an order that puts the keys a query block needs
into few blocks makes the same attention cheaper. Text tokens always keep their place (a prefix stays a
prefix, a suffix a suffix) and are attended densely (rows and columns), whatever the order.

Orders (the kinds of :mod:`.spec`; short forms ``tiled``, ``semantic:top_p=0.9,refresh=4``):

- ``raster``: diffusers' own order (T-major, then H, then W) — the identity; ``None`` in a strategy.
- ``tiled`` (static, one for all heads and layers): the video cut into slabs of ``t`` frames, each slab
  into strips of ``h`` rows, and each strip read column by column (the ``t x h`` tokens of a column
  together). A block of ``b`` tokens is then a ``(t, h, b / (t h))`` box: one compact 3D tile. Strips
  and slabs are visited in a serpentine (boustrophedon) order, so consecutive tiles always touch:
  where the grid is not a multiple of the tile (edge strips, the last slab), a block that spans two
  strips spans two touching tiles. No resolution is refused. Default tile (:func:`tile_shape`): for
  blocks of 128, ``(2, 8, 8)``.
  On a grid whose ``w`` is a multiple of the tile width (and ``t``, ``h`` multiples of the tile's), every
  block is exactly one tile of a regular lattice, and a ``window3d`` whose radii are whole multiples of
  the tile's sides visits exactly the key tiles within that many tiles of the query tile, each of them
  wholly reached (sliding-tile attention): the block mask then wastes nothing.
- ``semantic`` (per head, per call; Sparse VideoGen2): k-means of the head's Q rows and, separately,
  of its K rows; video tokens sorted by cluster (clusters contiguous, any size; tokens of a cluster
  keep their relative order); centroids warm-started from the previous call. Key blocks come from the
  centroids: for each query cluster, key clusters by decreasing estimated attention share
  (``softmax(scale * c_q . c_k + log |cluster_k|)``) up to ``top_p`` of it; a (query block, key block)
  pair is visited iff some kept (query cluster, key cluster) pair meets in it (:func:`.semantic.semantic_block_mask`).
  The head's pattern is not used (it must be ``dense``). The queries never move: the attention kernel
  reads each Q row and writes its output row through the query order (``vdit_accel.attention``'s
  ``q_index``), so the output is in the frame order; K and V are gathered into the key order.
  ``refresh = n`` re-plans every n-th denoising step and reuses the step's orders and mask in between:
  in a patched pipeline (which tracks the step from the timesteps) the calls of one step — the two of
  classifier-free guidance where the pipeline makes two — share its plan; without a step (a bare
  :func:`.plan.plan_call`) every n-th call of a layer re-plans. The attention stays exact on the blocks it
  visits; only their choice is older.
- ``segment`` (keys only, per head, per call; PBS-Attn style): inside fixed segments of ``size`` video
  keys, keys sorted by importance (the attention mass that each query block's mean query gives them),
  so the few heavy keys of a segment share its first blocks; key blocks chosen up to ``top_p`` of the
  same estimated mass. Only K and V move, so the output needs no inverse.

Block masks of a pattern under any static order are exact (:func:`.static.block_mask_for_order`); how
many blocks a head needs in an order (:mod:`.density`) is what the orders are measured by (measurements:
``benchmarks/RESULTS.md``).

Modules: :mod:`.spec` (the typed order specs), :mod:`.static` (raster and tiled permutations, masks of
patterns in an order), :mod:`.gather` (moving tokens), :mod:`.semantic` (online k-means, its plans and
masks), :mod:`.segment` (the key-only order), :mod:`.plan` (one attention call's orders and mask),
:mod:`.density` (how many blocks a head needs in an order), :mod:`.overhead` (what a dynamic order
costs per call).
"""

from .density import block_density, block_mass, blocks_for_recall, blocks_needed
from .gather import gather_tokens, gather_tokens_many, scatter_tokens
from .overhead import order_overhead
from .plan import CallPlan, attend_planned, frame_index, plan_call
from .segment import segment_key_order, segment_plan
from .semantic import SemanticPlan, default_clusters, kmeans, semantic_block_mask, semantic_orders, top_p_keep
from .spec import ORDERS, OrderSpec, Segment, Semantic, Tiled, format_order, is_dynamic, parse_order
from .static import block_mask_for_order, inverse, raster_order, static_order, tile_shape, tiled_order

__all__ = ["ORDERS", "OrderSpec", "Tiled", "Semantic", "Segment", "parse_order", "format_order", "is_dynamic",
           "raster_order", "tiled_order", "tile_shape", "static_order", "inverse", "block_mask_for_order",
           "gather_tokens", "gather_tokens_many", "scatter_tokens", "kmeans", "default_clusters", "SemanticPlan",
           "semantic_orders", "semantic_block_mask", "top_p_keep", "segment_key_order", "segment_plan",
           "block_mass", "blocks_needed", "block_density", "blocks_for_recall", "CallPlan", "plan_call",
           "frame_index", "attend_planned", "order_overhead"]
