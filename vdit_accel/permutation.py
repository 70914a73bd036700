"""Token orders: which token sits at which position of the sequence the kernels see.

An order is a permutation ``perm`` (int64 ``[S]``, or ``[..., S]`` per head): position ``i`` of the
reordered sequence holds original token ``perm[i]``; :func:`inverse` undoes it. A block-sparse kernel
visits whole blocks of consecutive positions, so an order that puts the keys a query block needs into
few blocks makes the same attention cheaper. Text tokens always keep their place (a prefix stays a
prefix, a suffix a suffix) and are attended densely (rows and columns), whatever the order.

Orders (``kind`` of an order spec, :func:`validate_order`):

- ``raster``: diffusers' own order (T-major, then H, then W) — the identity; ``None`` in a strategy.
- ``tiled`` (static, one for all heads and layers): the video cut into slabs of ``t`` frames, each slab
  into strips of ``h`` rows, and each strip read column by column (the ``t x h`` tokens of a column
  together). A block of ``b`` tokens is then a ``(t, h, b / (t h))`` box: one compact 3D tile. Strips
  and slabs are visited in a serpentine (boustrophedon) order, so consecutive tiles always touch:
  where the grid is not a multiple of the tile (edge strips, the last slab), a block that spans two
  strips spans two touching tiles. No resolution is refused. Default tile (:func:`tile_shape`): for
  blocks of 128, ``(2, 8, 8)`` (with (2, 16, 4), the best of 7 shapes measured on the ``local3d`` heads).
  On a grid whose ``w`` is a multiple of the tile width (and ``t``, ``h`` multiples of the tile's), every
  block is exactly one tile of a regular lattice, and a ``window3d`` whose radii are whole multiples of
  the tile's sides visits exactly the key tiles within that many tiles of the query tile, each of them
  wholly reached (sliding-tile attention): the block mask then wastes nothing.
- ``semantic`` (per head, per call; Sparse VideoGen2): k-means of the head's Q rows and, separately,
  of its K rows; video tokens sorted by cluster (clusters contiguous, any size; tokens of a cluster
  keep their relative order); centroids warm-started from the previous call. Key blocks come from the
  centroids: for each query cluster, key clusters by decreasing estimated attention share
  (``softmax(scale * c_q . c_k + log |cluster_k|)``) up to ``top_p`` of it; a (query block, key block)
  pair is visited iff some kept (query cluster, key cluster) pair meets in it (:func:`semantic_block_mask`).
  The head's pattern is not used (it must be ``dense``). The queries never move: the attention kernel
  reads each Q row and writes its output row through the query order (``vdit_accel.attention``'s
  ``q_index``), so the output is in the frame order; K and V are gathered into the key order.
  ``refresh = n`` re-plans every n-th denoising step and reuses the step's orders and mask in between:
  in a patched pipeline (which tracks the step from the timesteps) the calls of one step — the two of
  classifier-free guidance where the pipeline makes two — share its plan; without a step (a bare
  :func:`plan_call`) every n-th call of a layer re-plans. The attention stays exact on the blocks it
  visits; only their choice is older.
- ``segment`` (keys only, per head, per call; PBS-Attn style): inside fixed segments of ``size`` video
  keys, keys sorted by importance (the attention mass that each query block's mean query gives them),
  so the few heavy keys of a segment share its first blocks; key blocks chosen up to ``top_p`` of the
  same estimated mass. Only K and V move, so the output needs no inverse.

Block masks of a pattern under any static order are exact (:func:`block_mask_for_order`); how many
blocks a head needs in an order (:func:`block_density`, :func:`blocks_for_recall`) is what the orders
are measured by.

Measured (``python benchmarks/permutation.py --density`` on the CPU, 64 evenly spread query blocks per
head, blocks of 128, 95% recall; ``benchmarks/results/permutation-density-cpu-20261122.json``): on the
27 ``local3d`` heads the tiled order needs 0.0508 of the blocks against raster's 0.0813 at 21x30x52
(1.60x fewer) and 0.0781 against 0.1180 at 13x30x52 (1.51x); per head 0.94x-2.70x (3 of 27 heads, the
frame-local and wide ones, need slightly more blocks tiled). On the 12 ``clustered`` heads the semantic
order needs 0.1025 against tiled's 0.5651 (5.5x fewer; per head 1.35x-27x) at 21x30x52, 0.1177 against
0.5817 (4.9x) at 13x30x52; its own centroid top-p mask keeps 98% of the mass at 0.24 (0.33) of the
blocks. The key-only segment order does not help these heads (0.65 against tiled's 0.57). GPU timing of
the reordering (H100, wan 480p shape, ``benchmarks/permutation.py --overhead``,
``permutation-overhead-nvidia-h100-80gb-hbm3-20261122.json``, at 33ee997): semantic plan 0.224 ms of GPU
kernels (the K half on a second stream) + 0.15 ms moving K and V (on the second stream too, right after
the key order; Q and the output move inside the attention kernel, which then runs 0.02-0.03 ms faster
than on Q moved first); whole calls against the attention alone (3.16-3.24 ms at density 0.27), timed
in pairs: 8.5% per call re-planned (refresh=1 without a step), 5.8% with guidance's two calls per step
sharing its plan (the patched pipeline's default), 5.8% / 4.5% / 3.8% at refresh 2 / 4 / 8; segment 35%
at 1. The tiled order: 0.006 ms (0.9%).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from .block_mask import cdiv
from .grid import VideoGrid
from .patterns import Pattern, _video_reach, validate_pattern

Order = dict[str, Any]

# -------------------------------------------------------------------------------------------------
# Order specs
# -------------------------------------------------------------------------------------------------

_AUTO = None
# kind -> {param: (type, default)}; None = chosen from the grid and block size.
_ORDER_SCHEMA: dict[str, dict[str, tuple[type, Any]]] = {
    "raster": {},
    "tiled": {"t": (int, _AUTO), "h": (int, _AUTO)},
    "semantic": {"q_clusters": (int, _AUTO), "k_clusters": (int, _AUTO), "top_p": (float, 0.95), "iters": (int, 0),
                 "refresh": (int, 1)},
    "segment": {"size": (int, _AUTO), "top_p": (float, 0.95), "refresh": (int, 1)},
}
ORDER_KINDS = tuple(_ORDER_SCHEMA)
STATIC_KINDS = ("raster", "tiled")  # orders that depend on the grid only (masks built once per grid)
DYNAMIC_KINDS = ("semantic", "segment")  # orders computed from each call's Q/K (masks too)

# What a dynamic order costs per attention call beyond the attention itself, in units of the dense
# attention of the same heads, measured at the wan 480p shape (32760 tokens, 12 heads of 128; H100,
# ``benchmarks/results/permutation-overhead-nvidia-h100-80gb-hbm3-20261122.json`` at 33ee997, dense attention of
# those heads 11.3 ms): (a call on a kept plan — moving K and V, reading Q through the order —, the plan), from
# the paired whole-call overheads at refresh 1 and 8 (semantic 0.271 and 0.122 ms: 0.10 + 0.17 / refresh;
# segment 2.87 at 1). Both grow with S where the attention grows with S^2: :func:`order_overhead` scales them
# by 32760 / S.
_OVERHEAD_REF_TOKENS = 32760
_ORDER_OVERHEAD = {"semantic": (0.10 / 11.3, 0.17 / 11.3), "segment": (0.10 / 11.3, 2.77 / 11.3)}


def order_overhead(o: "Order | None", seq_len: int) -> float:
    """The per-call cost of order ``o`` beyond its attention, as a fraction of dense attention (the unit
    of block density): 0 for static orders (the tiled frame moves once per forward: 0.8% of one sparse
    call at wan 480p), the moves plus the plan over its ``refresh`` for dynamic ones (semantic at
    ``seq_len`` 32760: 0.024 at refresh 1, 0.011 at 8)."""
    o = validate_order(o)
    if o is None or o["kind"] not in DYNAMIC_KINDS:
        return 0.0
    moves, plan = _ORDER_OVERHEAD[o["kind"]]
    return (moves + plan / o["refresh"]) * _OVERHEAD_REF_TOKENS / max(seq_len, 1)


def validate_order(o: Any) -> Order | None:
    """Check an order spec and return it normalised: ``None`` for raster, else a dict with every
    parameter present (``None`` = chosen from the grid). Accepts ``None``, a short-form string
    (``"tiled"``, ``"semantic:top_p=0.9,k_clusters=256"``) or a dict with a ``kind``."""
    if o is None:
        return None
    if isinstance(o, str):
        return parse_order(o)
    if not isinstance(o, dict) or "kind" not in o:
        raise ValueError(f"an order is null (raster), a string or a dict with a 'kind' (one of {', '.join(ORDER_KINDS)}), got {o!r}")
    kind = o["kind"]
    if kind not in _ORDER_SCHEMA:
        raise ValueError(f"unknown order kind {kind!r}; known orders: {', '.join(ORDER_KINDS)}")
    schema = _ORDER_SCHEMA[kind]
    extra = set(o) - set(schema) - {"kind"}
    if extra:
        raise ValueError(f"order {kind!r} takes {sorted(schema) or 'no parameters'}, got unknown {sorted(extra)}")
    if kind == "raster":
        return None
    out: Order = {"kind": kind}
    for name, (typ, default) in schema.items():
        val = o.get(name, default)
        if val is None:
            out[name] = None
        elif typ is int:
            low = 0 if name == "iters" else 1
            if isinstance(val, bool) or not isinstance(val, int) or val < low:
                raise ValueError(f"order {kind!r}: {name!r} must be an int >= {low} (or null: automatic), got {val!r}")
            out[name] = val
        else:
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not 0 < val <= 1:
                raise ValueError(f"order {kind!r}: {name!r} must be a number in (0, 1], got {val!r}")
            out[name] = float(val)
    return out


def parse_order(text: str) -> Order | None:
    """The short form: ``kind`` or ``kind:k=v,k=v`` (``raster``, ``tiled:t=2,h=8``, ``semantic:top_p=0.9``)."""
    text = text.strip()
    if text.startswith("{"):
        try:
            return validate_order(json.loads(text))
        except json.JSONDecodeError as e:
            raise ValueError(f"order {text!r} is not valid JSON: {e}") from None
    kind, _, args = text.partition(":")
    o: dict[str, Any] = {"kind": kind.strip()}
    schema = _ORDER_SCHEMA.get(kind.strip(), {})
    for item in filter(None, (a.strip() for a in args.split(","))):
        name, eq, val = item.partition("=")
        name = name.strip()
        if not eq:
            raise ValueError(f"order {text!r}: expected name=value, got {item!r}")
        typ = schema.get(name, (str, None))[0]
        try:
            o[name] = int(val) if typ is int else float(val) if typ is float else val
        except ValueError:
            raise ValueError(f"order {text!r}: bad value for {name!r}: {val!r}") from None
    return validate_order(o)


def format_order(o: Order | None) -> str:
    """Inverse of :func:`parse_order` (automatic and default parameters left out)."""
    if o is None:
        return "raster"
    schema = _ORDER_SCHEMA[o["kind"]]
    args = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in o.items()
            if k != "kind" and v is not None and v != schema[k][1]]
    return o["kind"] + (":" + ",".join(args) if args else "")


def order_key(o: Order | None) -> str:
    """A hashable, canonical key of an order spec."""
    return json.dumps(o, sort_keys=True)


# -------------------------------------------------------------------------------------------------
# Static orders
# -------------------------------------------------------------------------------------------------


def raster_order(grid: VideoGrid, device=None) -> torch.Tensor:
    return torch.arange(grid.seq_len, device=device)


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(x, 1.0)))))


def tile_shape(grid: VideoGrid, block: int = 128, t: int | None = None, h: int | None = None) -> tuple[int, int, float]:
    """The tile ``(t, h, w)`` of the tiled order: ``t`` frames x ``h`` rows x ``w = block / (t h)`` columns.

    Defaults: ``t = 2`` (1 for blocks under 32 tokens), ``h`` the largest power of two with ``h <= w``
    (a square or 1:2 spatial face): ``(2, 8, 8)`` for blocks of 128, ``(2, 4, 8)`` for 64, ``(2, 8, 16)``
    for 256. Each is capped by the grid (a 1-frame video gets ``t = 1``). ``w`` is a float when ``t h``
    does not divide the block (a block then ends mid-column). Among (1, 8, 16), (2, 8, 8), (4, 8, 4),
    (2, 4, 16), (4, 4, 8), (1, 16, 8) and (2, 16, 4) on the ``local3d`` heads at 21x30x52 and 13x30x52,
    (2, 8, 8) and (2, 16, 4) needed the fewest blocks, within 1% of each other (the others 3-34% more;
    ``benchmarks/results/permutation-density-cpu-20261122.json``); (2, 8, 8) is kept for its square face."""
    if t is None:
        t = 2 if block >= 32 else 1
    if h is None:
        h = _pow2_floor(math.sqrt(block / t))
    if t < 1 or h < 1:
        raise ValueError(f"tile sides must be >= 1, got t={t}, h={h}")
    t, h = min(t, grid.t), min(h, grid.h)
    if t * h > block:
        raise ValueError(f"a tile of t={t} frames x h={h} rows holds more than one block of {block} tokens per column")
    w = block / (t * h)
    return t, h, (int(w) if w.is_integer() else w)


def tiled_order(grid: VideoGrid, block: int = 128, t: int | None = None, h: int | None = None,
                device=None) -> torch.Tensor:
    """The permutation of the tiled order (see the module docstring): slabs of ``t`` frames, strips of
    ``h`` rows, columns in turn, serpentine. Text tokens keep their place."""
    tt, th, _ = tile_shape(grid, block, t, h)
    T, H, W = grid.t, grid.h, grid.w
    ti, yi, xi = torch.meshgrid(torch.arange(T, device=device), torch.arange(H, device=device),
                                torch.arange(W, device=device), indexing="ij")
    slab = ti // tt
    n_strips = cdiv(H, th)
    strip = yi // th
    strip = torch.where(slab % 2 == 1, n_strips - 1 - strip, strip)  # serpentine over strips
    g = slab * n_strips + strip  # the strip's rank in the whole traversal
    col = torch.where(g % 2 == 1, W - 1 - xi, xi)  # serpentine over columns
    key = ((g * W + col) * tt + ti % tt) * th + yi % th
    video = torch.argsort(key.flatten()) + grid.video_start
    return _with_text(video, grid, device)


def _with_text(video: torch.Tensor, grid: VideoGrid, device=None) -> torch.Tensor:
    """Prepend / append the text positions (kept in place) to a video permutation ``[..., V]``."""
    if not grid.text_len:
        return video
    text = torch.arange(grid.text_start, grid.text_start + grid.text_len, device=video.device)
    text = text.expand(*video.shape[:-1], grid.text_len)
    return torch.cat([text, video], -1) if grid.text_at == "prefix" else torch.cat([video, text], -1)


def static_order(o: Order | None, grid: VideoGrid, block: int, device=None) -> torch.Tensor:
    """The permutation ``[S]`` of a static order spec (raster or tiled) on ``grid``."""
    if o is None:
        return raster_order(grid, device)
    if o["kind"] == "tiled":
        return tiled_order(grid, block, o["t"], o["h"], device)
    raise ValueError(f"order {format_order(o)!r} is computed from the data of each call, not from the grid")


def inverse(perm: torch.Tensor) -> torch.Tensor:
    """The inverse permutation (along the last dim): ``inverse(perm)[..., perm[..., i]] = i``."""
    inv = torch.empty_like(perm)
    inv.scatter_(-1, perm, torch.arange(perm.shape[-1], device=perm.device).expand_as(perm))
    return inv


def block_mask_for_order(p: Pattern, grid: VideoGrid, perm: torch.Tensor, block_m: int = 128,
                         block_n: int = 128) -> torch.Tensor:
    """Bool [Mb, Nb]: the block mask of pattern ``p`` when the sequence is reordered by ``perm``.

    Exact (a pair is set iff some allowed token pair falls in it), through the token-level pattern
    one query block at a time: O(Mb * S) work — for orders whose blocks are not raster ranges."""
    p = validate_pattern(p)
    s, device = grid.seq_len, perm.device
    mb, nb = cdiv(s, block_m), cdiv(s, block_n)
    pos = inverse(perm)  # pos[token] = its position in the reordered sequence
    vs, vl = grid.video_start, grid.video_len
    vid_pos = pos[vs : vs + vl]
    key_block = vid_pos // block_n
    qblk = vid_pos // block_m
    mask = torch.zeros(mb, nb, dtype=torch.bool, device=device)
    chunk = max(1, (1 << 22) // max(vl, 1))
    for m0 in range(0, mb, chunk):
        m1 = min(mb, m0 + chunk)
        sel = (qblk >= m0) & (qblk < m1)
        onehot = torch.zeros(m1 - m0, vl, device=device)
        idx = sel.nonzero().squeeze(1)
        onehot[qblk[idx] - m0, idx] = 1.0
        reach = _video_reach(p, grid, onehot.view(m1 - m0, grid.t, grid.h, grid.w)).reshape(m1 - m0, vl)
        mask[m0:m1] = torch.zeros(m1 - m0, nb, device=device).index_add_(1, key_block, reach.float()) > 0
    _dense_text(mask, grid, pos, block_m, block_n)
    return mask


def _text_blocks(grid: VideoGrid, block: int) -> tuple[int, int]:
    """The blocks ``[first, end)`` that hold the text tokens of a sequence where text keeps its place."""
    if not grid.text_len:
        return 0, 0
    return grid.text_start // block, (grid.text_start + grid.text_len - 1) // block + 1


def _dense_text(mask: torch.Tensor, grid: VideoGrid, pos: torch.Tensor | None, block_m: int, block_n: int) -> None:
    """Set the text rows and columns of a block mask ``[..., Mb, Nb]`` (text at positions ``pos[text]``)."""
    if not grid.text_len:
        return
    if pos is None:  # text in place: one range of blocks each way
        (m0, m1), (n0, n1) = _text_blocks(grid, block_m), _text_blocks(grid, block_n)
        mask[..., m0:m1, :] = True
        mask[..., :, n0:n1] = True
        return
    tp = pos[torch.arange(grid.text_start, grid.text_start + grid.text_len, device=mask.device)]
    mask[..., tp // block_m, :] = True
    mask[..., :, tp // block_n] = True


# -------------------------------------------------------------------------------------------------
# Moving tokens
# -------------------------------------------------------------------------------------------------


def _flat_index(idx: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """Row indices into ``x.reshape(B * S * H, D)`` for ``out[b, i, h] = x[b, idx[b, h, i], h]``."""
    s = idx.shape[-1]
    idx = idx.expand(batch, heads, s)
    b = torch.arange(batch, device=idx.device).view(batch, 1, 1)
    h = torch.arange(heads, device=idx.device).view(1, heads, 1)
    return ((b * s + idx) * heads + h).transpose(1, 2).reshape(-1)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``out[b, i, h] = x[b, idx[b, h, i], h]`` for ``x`` (B, S, H, D) and ``idx`` ``[S]`` (every head)
    or ``[B or 1, H, S]`` (per head): one row gather (one Triton launch on the GPU), contiguous out."""
    if idx.dim() == 1:
        return x.index_select(1, idx)
    return gather_tokens_many([x], idx)[0]


def gather_tokens_many(xs: list[torch.Tensor], idx: torch.Tensor) -> list[torch.Tensor]:
    """:func:`gather_tokens` of several tensors of one shape by one index (k and v): one launch on the GPU."""
    if idx.dim() == 1:
        return [x.index_select(1, idx) for x in xs]
    x0 = xs[0]
    if _fast(x0) and len(xs) <= 3 and x0.stride(3) == 1 and all(x.stride() == x0.stride() for x in xs):
        from .kernels.permute import gather_rows

        return gather_rows(xs, idx)
    b, s, h, d = x0.shape
    flat = _flat_index(idx, b, h)
    return [x.reshape(b * s * h, d).index_select(0, flat).view(b, s, h, d) for x in xs]


def scatter_tokens(y: torch.Tensor, idx: torch.Tensor, inv: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of :func:`gather_tokens`: ``out[b, idx[b, h, i], h] = y[b, i, h]``. ``inv``: the
    inverse permutation of ``idx`` if known; on the GPU the scatter is then a gather by it (one launch)."""
    if idx.dim() == 1:
        return torch.empty_like(y).index_copy_(1, idx, y)
    if _fast(y) and y.stride(3) == 1:
        return gather_tokens_many([y], inverse(idx) if inv is None else inv)[0]
    b, s, h, d = y.shape
    out = torch.empty(b * s * h, d, dtype=y.dtype, device=y.device)
    return out.index_copy_(0, _flat_index(idx, b, h), y.reshape(b * s * h, d)).view(b, s, h, d)


# -------------------------------------------------------------------------------------------------
# Semantic order (k-means of Q and of K, per head)
# -------------------------------------------------------------------------------------------------


def _fast(x: torch.Tensor) -> bool:
    """Run the Triton kernels of :mod:`vdit_accel.kernels.permute` (CUDA; on the CPU with
    ``TRITON_INTERPRET=1 VDIT_CPU_TRITON=1``, as :func:`vdit_accel.attention` does)."""
    from .attention import _use_triton

    return _use_triton(x)


def _assign_stats(x: torch.Tensor, c: torch.Tensor, with_sums: bool, store_labels: bool = True):
    """Nearest centroid of each row of ``x`` ``[B, H, N, D]`` among ``c`` ``[B * H, K, D]`` float32
    (``argmax x . c - |c|^2 / 2``, scores in float32 with c rounded to x's dtype), with each cluster's
    size (and row sum). Returns ``(labels [B * H, N] or None, counts float32 [B * H, K], sums or None)``.
    One Triton launch on the GPU (:func:`vdit_accel.kernels.permute.kmeans_assign`); the same in PyTorch
    on the CPU."""
    if _fast(x):
        from .kernels.permute import kmeans_assign

        return kmeans_assign(x, c, with_sums=with_sums, store_labels=store_labels)
    b, h, n, d = x.shape
    xg = x.reshape(b * h, n, d)
    scores = torch.bmm(xg.float(), c.to(x.dtype).float().transpose(1, 2)) - 0.5 * (c.float() ** 2).sum(-1)[:, None, :]
    labels = scores.argmax(-1)
    k = c.shape[1]
    counts = torch.zeros(b * h, k, device=x.device).scatter_add_(1, labels, torch.ones_like(labels, dtype=torch.float32))
    sums = None
    if with_sums:
        sums = torch.zeros(b * h, k, d, device=x.device).scatter_add_(1, labels[..., None].expand(-1, -1, d), xg.float())
    return labels.int() if store_labels else None, counts, sums


def _as_4d(x: torch.Tensor) -> torch.Tensor:
    """``[..., N, D]`` -> ``[B, H, N, D]`` (a view where the leading dims allow)."""
    if x.dim() == 4:
        return x
    return x.reshape(1, -1, *x.shape[-2:])


def kmeans(x: torch.Tensor, k: int, iters: int = 10, init: torch.Tensor | None = None, sample: int | None = None,
           seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means of the rows of ``x`` ``[..., N, D]`` (each leading index its own problem).

    Returns ``(labels [..., N], centroids [..., k, D] float32)``. ``init``: centroids to start from
    (the previous call's: warm start), else ``k`` rows drawn at random (seeded). The ``iters`` Lloyd
    updates use every ``ceil(N / sample)``-th row (all when ``sample`` is None); the returned labels
    are the final assignment of every row. Empty clusters keep their centroid. On the GPU each update
    and the final assignment are one kernel launch each, with no host synchronisation."""
    labels, cent, _ = _kmeans(x, k, iters, init, sample, seed)
    return labels.long(), cent


def _lloyd(c: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """One Lloyd update: each centroid the mean of its rows (``sums / counts``); empty clusters keep theirs."""
    return torch.where(counts[..., None] > 0, sums / counts.clamp_min(1.0)[..., None], c)


def _kmeans(x, k, iters, init, sample, seed=0, stats=None):
    """:func:`kmeans` returning ``(labels int32 [..., N], centroids [..., k, D], (sums [..., k, D], counts
    [..., k]))``, the last two float32 of the final assignment; ``stats``: such a pair from the previous
    call, whose update of ``init`` is where this call starts (see :func:`semantic_orders`)."""
    lead, (n, d) = x.shape[:-2], x.shape[-2:]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= rows; got k={k} for {n} rows")
    x4 = _as_4d(x)
    g = x4.shape[0] * x4.shape[1]
    c = _init_centroids(x4, k, seed) if init is None else init.reshape(g, k, d).float()
    if stats is not None:
        c = _lloyd(c, stats[0].reshape(g, k, d).float(), stats[1].reshape(g, k).float())
    xs = x4 if sample is None or sample >= n else x4[:, :, :: cdiv(n, sample)]  # a strided view: no copy
    for _ in range(iters):
        _, counts, sums = _assign_stats(xs, c, with_sums=True, store_labels=False)
        c = _lloyd(c, sums, counts)
    labels, counts, sums = _assign_stats(x4, c, with_sums=True)
    return labels.view(*lead, n), c.view(*lead, k, d), (sums.view(*lead, k, d), counts.view(*lead, k))


def _init_centroids(x4: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Cold start: ``k`` rows of ``x4`` ``[B, H, N, D]`` drawn at random (seeded), float32 ``[B * H, k, D]``."""
    b, h, n, d = x4.shape
    rows = torch.randperm(n, generator=torch.Generator(device="cpu").manual_seed(seed))[:k].to(x4.device)
    return x4.index_select(2, rows).reshape(b * h, k, d).float()


def default_clusters(grid: VideoGrid, block: int) -> tuple[int, int]:
    """Default cluster counts of the semantic order: ~4 blocks per query cluster, ~2 per key cluster
    (wan 480p, blocks of 128: 64 and 128), at least 2, at most one cluster per 4 video tokens."""
    v = grid.video_len
    return (max(2, min(v // 4, cdiv(v, 4 * block))), max(2, min(v // 4, cdiv(v, 2 * block))))


@dataclass
class SemanticPlan:
    """A semantic order of every (batch, head): positions, cluster extents and centroids.

    ``q_perm`` / ``k_perm``: ``[B, H, S]`` permutations of the sequence (text in place);
    ``q_bounds`` / ``k_bounds``: ``[B, H, K + 1]`` where each cluster starts in the reordered sequence
    (cluster ``c`` spans ``[bounds[c], bounds[c + 1])``; empty clusters are empty ranges);
    ``q_centroids`` / ``k_centroids``: ``[B, H, K, D]`` float32, the ones every token was assigned to;
    ``q_stats`` / ``k_stats``: ``(sums [B, H, K, D], counts [B, H, K])`` float32 of that assignment (pass
    :attr:`warm` to the next call: its centroids start as these updated once by them)."""

    q_perm: torch.Tensor
    k_perm: torch.Tensor
    q_bounds: torch.Tensor
    k_bounds: torch.Tensor
    q_centroids: torch.Tensor
    k_centroids: torch.Tensor
    q_stats: tuple[torch.Tensor, torch.Tensor] | None = None
    k_stats: tuple[torch.Tensor, torch.Tensor] | None = None
    moved: tuple | None = None  # (k, v, k moved, v moved, CUDA event after the move): semantic_orders(v=)

    @property
    def warm(self) -> tuple:
        """What the next call of :func:`semantic_orders` takes as ``init``."""
        return (self.q_centroids, self.k_centroids, self.q_stats, self.k_stats)


def _cluster_order(x: torch.Tensor, grid: VideoGrid, k: int, iters: int, init, sample, stats=None, on_order=None):
    """x [B, S, H, D] -> (perm [B, H, S], bounds [B, H, k + 1], centroids [B, H, k, D], (sums [B, H, k, D],
    counts [B, H, k])); ``on_order(perm, pending)`` is called once the order is queued (see
    :func:`vdit_accel.kernels.permute.kmeans_cluster_order`; ``pending`` is None off the GPU path).

    On the GPU: :func:`vdit_accel.kernels.permute.kmeans_cluster_order` (the
    updates, the assignment and a stable counting sort in ``4 + 2 iters`` launches); else this path."""
    vs, vl = grid.video_start, grid.video_len
    xv = x[:, vs : vs + vl].transpose(1, 2)  # [B, H, V, D], a view
    if _fast(x):
        from .kernels.permute import MAX_CLUSTERS, kmeans_cluster_order

        if 1 <= k <= min(MAX_CLUSTERS, vl):
            b, h = xv.shape[:2]
            c = _init_centroids(xv, k) if init is None else init.reshape(b * h, k, -1)
            step = cdiv(vl, sample) if sample is not None and sample < vl else 1
            st = None if stats is None else (stats[0].reshape(b * h, k, -1), stats[1].reshape(b * h, k))
            hook = None if on_order is None else (lambda perm, pending: on_order(perm.view(b, h, -1), pending))
            perm, bounds, cent, (sums, counts) = kmeans_cluster_order(xv, c, iters, step, vs, grid.seq_len, st,
                                                                      on_order=hook)
            return (perm.view(b, h, -1), bounds.view(b, h, -1), cent.view(b, h, k, -1),
                    (sums.view(b, h, k, -1), counts.view(b, h, k)))
    labels, cent, (sums, counts) = _kmeans(xv, k, iters, init, sample, stats=stats)
    video = torch.sort(labels, dim=-1, stable=True).indices
    if vs:
        video = video + vs
    bounds = torch.nn.functional.pad(counts.long().cumsum(-1), (1, 0))
    if vs:
        bounds = bounds + vs
    perm = _with_text(video, grid)
    if on_order is not None:
        on_order(perm, None)
    return perm, bounds, cent, (sums, counts)


def semantic_orders(q: torch.Tensor, k: torch.Tensor, grid: VideoGrid, q_clusters: int, k_clusters: int,
                    iters: int = 0, init: tuple | None = None, init_iters: int = 8,
                    sample: int | None = 16384, v: torch.Tensor | None = None) -> SemanticPlan:
    """The semantic orders of every head of one call: k-means of Q and of K (``(B, S, H, D)``) apart.

    Cold (``init`` None): ``init_iters`` Lloyd updates from random rows. Warm (``init`` = the previous
    plan's :attr:`SemanticPlan.warm`, or just its ``(q_centroids, k_centroids)``): its centroids updated
    once by its own assignment of every token (an online k-means across calls: the sums come free with
    that assignment, so no pass of this call's is spent on them), then ``iters`` more updates. Updates
    use ``sample`` video tokens (evenly strided); every token is then assigned. Text tokens keep their place.

    On CUDA the K side runs on a second stream while the Q side runs on the current one: their kernels
    are small, latency-bound grids that leave SMs idle alone. The current stream waits for the key order
    only: the K statistics (the next call's) follow it on the second stream, and with ``v`` given, K and V
    are moved into the key order there first (:attr:`SemanticPlan.moved`), beside the query half and the
    block mask. Nothing syncs with the host."""
    n_iter = init_iters if init is None else iters
    qi, ki, qs, ks = (None,) * 4 if init is None else (tuple(init) + (None, None))[:4]
    if not q.is_cuda:
        qp, qb, qc, qst = _cluster_order(q, grid, q_clusters, n_iter, qi, sample, qs)
        kp, kb, kc, kst = _cluster_order(k, grid, k_clusters, n_iter, ki, sample, ks)
        return SemanticPlan(qp, kp, qb, kb, qc, kc, qst, kst)
    main, side = torch.cuda.current_stream(q.device), _side_stream(q.device)
    side.wait_stream(main)  # q, k, v (and the centroids) are written on the current stream
    ready, moved = torch.cuda.Event(), []

    def on_order(perm, pending):  # on the side stream, the key order queued: K and V follow it there
        ready.record(side)
        fused = False
        if v is not None:
            if pending is not None and k.stride(3) == 1 and v.stride() == k.stride():
                from .kernels.permute import gather_rows

                # and K's cluster sums on the way (H100, wan 480p: 0.153 ms with 2 warps, 0.188 with 4; the
                # plain move 0.145)
                k2, v2 = gather_rows([k, v], perm, num_warps=2, cluster_sums=pending)
                fused = True
            else:
                k2, v2 = gather_tokens_many([k, v], perm)
            done = torch.cuda.Event()
            done.record(side)
            for t in (k2, v2):
                t.record_stream(main)
            moved.append((k, v, k2, v2, done))
        return fused

    with torch.cuda.stream(side):
        kp, kb, kc, kst = _cluster_order(k, grid, k_clusters, n_iter, ki, sample, ks, on_order)
    qp, qb, qc, qst = _cluster_order(q, grid, q_clusters, n_iter, qi, sample, qs)
    main.wait_event(ready)
    for t in (kp, kb, kc):  # made on the side stream, used (and freed) on the current one; the statistics
        t.record_stream(main)  # are used by the next plan's K half, on the side stream again
    for t in (k, v, ki, *(ks or ())):  # read on the side stream: not reused before that work is done
        if t is not None:
            t.record_stream(side)
    return SemanticPlan(qp, kp, qb, kb, qc, kc, qst, kst, moved[0] if moved else None)


_SIDE_STREAMS: dict[int, Any] = {}


def _side_stream(device: torch.device):
    """One extra CUDA stream per device for the plans' independent halves."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SIDE_STREAMS:
        _SIDE_STREAMS[idx] = torch.cuda.Stream(device=idx)
    return _SIDE_STREAMS[idx]


def _block_overlap(bounds: torch.Tensor, block: int, n_blocks: int) -> torch.Tensor:
    """Float [..., n_blocks, K]: 1 where block m holds some token of cluster c (ranges from ``bounds``)."""
    lo, hi = bounds[..., :-1], bounds[..., 1:]  # [..., K]
    start = torch.arange(n_blocks, device=bounds.device).view(n_blocks, 1) * block
    return ((lo[..., None, :] < start + block) & (hi[..., None, :] > start) & (hi > lo)[..., None, :]).float()


def top_p_keep(weights: torch.Tensor, top_p: float) -> torch.Tensor:
    """Bool mask of the largest entries of each row of ``weights`` (non-negative, last dim) whose sum
    first reaches ``top_p`` of the row's sum (at least one entry per non-empty row); of equal entries
    the lower index comes first."""
    w, order = weights.sort(dim=-1, descending=True, stable=True)
    total = w.sum(-1, keepdim=True)
    before = w.cumsum(-1) - w  # mass already kept before this entry
    keep_sorted = (before < top_p * total) & (w > 0)
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def semantic_block_mask(plan: SemanticPlan, grid: VideoGrid, top_p: float, block_m: int = 128, block_n: int = 128,
                        scale: float | None = None, lists: bool = False):
    """Bool ``[B, H, Mb, Nb]``: the key blocks of each query block under a semantic plan (see the module
    docstring): key clusters by estimated attention share up to ``top_p``, per query cluster; text rows
    and columns dense. ``scale``: the softmax scale (default ``1 / sqrt(D)``). On the GPU two Triton
    launches (:func:`vdit_accel.kernels.permute.semantic_block_mask`, up to ``MAX_CLUSTERS`` a side); this
    PyTorch path (about 40 small ops) is the reference. ``lists``: return ``(mask, block_mask)``, the
    kernel's :class:`~vdit_accel.block_mask.BlockMask`, written by the same kernels on the GPU (None here)."""
    d = plan.q_centroids.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if _fast(plan.q_centroids):
        from .kernels.permute import MAX_CLUSTERS, semantic_block_mask as fused

        if max(plan.q_centroids.shape[-2], plan.k_centroids.shape[-2]) <= MAX_CLUSTERS:
            out = fused(plan.q_centroids, plan.k_centroids, plan.q_bounds, plan.k_bounds, grid.seq_len, top_p, scale,
                        block_m, block_n, _text_blocks(grid, block_m), _text_blocks(grid, block_n), csr=lists)
            if not lists:
                return out
            from .block_mask import BlockMask

            mask, num, idx = out
            return mask, BlockMask(num, idx, grid.seq_len, block_m, block_n)
    sizes = (plan.k_bounds[..., 1:] - plan.k_bounds[..., :-1]).float()  # [B, H, Kk]
    logits = scale * plan.q_centroids @ plan.k_centroids.transpose(-1, -2) + sizes.log()[..., None, :]
    share = torch.softmax(logits, -1).nan_to_num(0.0)  # [B, H, Kq, Kk]
    keep = top_p_keep(share, top_p).float()
    s = grid.seq_len
    a = _block_overlap(plan.q_bounds, block_m, cdiv(s, block_m))  # [B, H, Mb, Kq]
    b = _block_overlap(plan.k_bounds, block_n, cdiv(s, block_n))  # [B, H, Nb, Kk]
    mask = (a @ keep @ b.transpose(-1, -2)) > 0
    _dense_text(mask, grid, None, block_m, block_n)
    return (mask, None) if lists else mask


# -------------------------------------------------------------------------------------------------
# Key-only segment order (PBS-Attn style)
# -------------------------------------------------------------------------------------------------


def segment_key_order(importance: torch.Tensor, segment: int) -> torch.Tensor:
    """Key-only order (PBS-Attn style): within each segment of ``segment`` consecutive keys, keys
    sorted by decreasing ``importance`` (``[..., S]``, e.g. the attention mass a sample of queries gives
    each key), so that the few heavy keys of a segment share its first blocks.

    Only K and V are reordered (together), so the output needs no inverse permutation; locality
    between segments is kept. Returns the key permutation ``[..., S]``."""
    s = importance.shape[-1]
    seg = torch.arange(s, device=importance.device) // segment
    imp = importance.double()
    # Sort by (segment, -importance): segments stay in place, keys inside move.
    key = seg.double() * 4.0 - imp / imp.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    return torch.argsort(key, dim=-1, stable=True)


def _pooled_mass(q: torch.Tensor, k: torch.Tensor, block: int, scale: float) -> torch.Tensor:
    """Float ``[B, H, Mb, S]``: softmax over keys of each query block's mean query (all heads at once)."""
    b, s, h, d = q.shape
    mb = cdiv(s, block)
    pad = mb * block - s
    qf = torch.nn.functional.pad(q, (0, 0, 0, 0, 0, pad)) if pad else q
    pooled = qf.view(b, mb, block, h, d).sum(2, dtype=torch.float32)  # [B, Mb, H, D]
    if pad:  # the last block's mean over its real rows
        pooled[:, -1] *= block / (block - pad)
    pooled = pooled.mul_(scale / block).transpose(1, 2)  # [B, H, Mb, D]
    logits = torch.matmul(pooled.to(k.dtype), k.transpose(1, 2).transpose(2, 3))  # [B, H, Mb, S] in k's dtype
    return torch.softmax(logits, -1, dtype=torch.float32)


def segment_plan(q: torch.Tensor, k: torch.Tensor, grid: VideoGrid, size: int, top_p: float, block_m: int = 128,
                 block_n: int = 128, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The segment order of every head of one call and its block mask.

    Key importance = the attention mass the mean query of every query block gives each key (one
    ``[Mb, S]`` product per head); video keys sorted by it inside segments of ``size`` video keys (text
    keys stay); key blocks kept per query block by that mass up to ``top_p``; text rows and columns
    dense. Returns ``(k_perm [B, H, S], mask bool [B, H, Mb, Nb])``."""
    b, s, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    mass = _pooled_mass(q, k, block_m, scale)  # [B, H, Mb, S]
    vs, vl = grid.video_start, grid.video_len
    video = segment_key_order(mass[..., vs : vs + vl].sum(-2), size) + vs
    k_perm = _with_text(video, grid)
    nb = cdiv(s, block_n)
    moved = mass.gather(-1, k_perm[:, :, None, :].expand_as(mass))
    pad = nb * block_n - s
    if pad:
        moved = torch.nn.functional.pad(moved, (0, pad))
    mask = top_p_keep(moved.view(*moved.shape[:-1], nb, block_n).sum(-1), top_p)
    _dense_text(mask, grid, None, block_m, block_n)
    return k_perm, mask


# -------------------------------------------------------------------------------------------------
# Measuring an order: blocks needed for a recalled attention mass
# -------------------------------------------------------------------------------------------------


def block_mass(q: torch.Tensor, k: torch.Tensor, block: int, q_perm: torch.Tensor | None = None,
               k_perm: torch.Tensor | None = None, rows: list[int] | None = None, scale: float | None = None) -> torch.Tensor:
    """Float ``[M, Nb]``: the attention mass of one head's query blocks (``q_perm`` order; ``rows``
    picks M of them, default all) in each key block (``k_perm`` order), normalised per query block.

    ``q``, ``k``: ``[S, D]`` in the original order. Computed a few query blocks at a time from the
    scores (never ``S x S``), in float32; ``scale`` default ``1 / sqrt(D)``."""
    s, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    nb = cdiv(s, block)
    qo = q if q_perm is None else q[q_perm]
    ko = (k if k_perm is None else k[k_perm]).float()
    rows = list(range(nb)) if rows is None else list(rows)
    pad = nb * block - s
    out = torch.empty(len(rows), nb, device=q.device)
    chunk = max(1, (1 << 24) // (block * s))
    for i in range(0, len(rows), chunk):
        sel = rows[i : i + chunk]
        qb = torch.stack([torch.nn.functional.pad(qo[m * block : (m + 1) * block], (0, 0, 0, max(0, (m + 1) * block - s)))
                          for m in sel]).float()  # [c, block, D] (padded rows are dropped below)
        p = torch.softmax(scale * qb @ ko.T, -1)
        valid = torch.tensor([min(block, s - m * block) for m in sel], device=q.device)
        p = p * (torch.arange(block, device=q.device)[None, :] < valid[:, None])[..., None]
        if pad:
            p = torch.nn.functional.pad(p, (0, pad))
        out[i : i + len(sel)] = p.view(len(sel), block, nb, block).sum((1, 3)) / valid[:, None]
    return out


def blocks_needed(mass: torch.Tensor, recall: float = 0.95) -> torch.Tensor:
    """Per row of ``mass`` ``[..., Nb]``: how many of its largest blocks first hold ``recall`` of the row."""
    sorted_mass = mass.sort(-1, descending=True).values
    need = (sorted_mass.cumsum(-1) < recall * mass.sum(-1, keepdim=True)).sum(-1) + 1
    return need.clamp(max=mass.shape[-1])


def block_density(q: torch.Tensor, k: torch.Tensor, block: int, recall: float = 0.95, q_perm: torch.Tensor | None = None,
                  k_perm: torch.Tensor | None = None, rows: list[int] | None = None) -> float:
    """Mean fraction of key blocks one head needs, per query block, to keep ``recall`` of its attention
    mass, with queries in ``q_perm`` order and keys in ``k_perm`` order (:func:`block_mass`)."""
    mass = block_mass(q, k, block, q_perm, k_perm, rows)
    return float(blocks_needed(mass, recall).float().mean() / mass.shape[-1])


def blocks_for_recall(probs: torch.Tensor, perm: torch.Tensor, block: int, recall: float = 0.95,
                      key_perm: torch.Tensor | None = None) -> float:
    """:func:`block_density` from explicit probabilities ``[S, S]`` (rows sum to 1; small S only).

    ``key_perm``: a separate order for the keys (default ``perm``)."""
    s = probs.shape[0]
    nb = cdiv(s, block)
    p = probs[perm][:, perm if key_perm is None else key_perm]
    pad = nb * block - s
    if pad:
        p = torch.nn.functional.pad(p, (0, pad, 0, pad))
    mass = p.view(nb, block, nb, block).sum((1, 3))  # [Mb, Nb]
    return float(blocks_needed(mass, recall).float().mean() / nb)


# -------------------------------------------------------------------------------------------------
# Applying orders to one attention call
# -------------------------------------------------------------------------------------------------

_INDEX_CACHE: dict[tuple, torch.Tensor] = {}
_INDEX_CACHE_MAX = 64


def frame_index(o: Order | None, frame: Order | None, grid: VideoGrid, block: int, device) -> torch.Tensor | None:
    """Positions, in the ``frame`` order the tensors arrive in, of the tokens of static order ``o``
    (``[S]``; None when the two orders are the same). Cached per (orders, grid, block, device)."""
    if order_key(o) == order_key(frame):
        return None
    key = (order_key(o), order_key(frame), grid, block, str(device))
    hit = _INDEX_CACHE.get(key)
    if hit is None:
        perm = static_order(o, grid, block, device)
        hit = perm if frame is None else inverse(static_order(frame, grid, block, device))[perm]
        if len(_INDEX_CACHE) >= _INDEX_CACHE_MAX:
            _INDEX_CACHE.pop(next(iter(_INDEX_CACHE)))
        _INDEX_CACHE[key] = hit
    return hit


@dataclass
class CallPlan:
    """Where each head's tokens go for one kernel call, and its block mask.

    ``q_index`` / ``k_index``: ``out[b, i, h] = x[b, index[b, h, i], h]`` (``[B or 1, H, S]``), or ``[S]``
    for every head, or None (the tensors stay as they came); K and V share ``k_index``; the output is
    written back through ``q_index`` (by the kernel, :meth:`kernel_q_index`; or :meth:`gather` /
    :meth:`scatter` for callers that move tensors themselves). ``mask``: bool ``[B or 1, H, Mb, Nb]``
    in the heads' own orders (None: dense). A plan reused across calls (``refresh``) keeps its kernel block mask and the inverse
    of ``q_index`` (:meth:`block_mask`, :meth:`q_inverse`), computed on first use."""

    q_index: torch.Tensor | None
    k_index: torch.Tensor | None
    mask: torch.Tensor | None
    _bm: Any = None
    _moved: tuple | None = None  # K and V already moved by the plan (SemanticPlan.moved): the first gather_kv's
    _q_inv: torch.Tensor | None = None
    _q_index32: torch.Tensor | None = None

    def block_mask(self, seq_len: int, block: int):
        """The kernel's :class:`~vdit_accel.block_mask.BlockMask` of ``mask`` (None when dense); cached
        (or given: the semantic plan's kernel writes it with the mask)."""
        from .block_mask import BlockMask

        if self.mask is None:
            return None
        if self._bm is None or self._bm.seq_len != seq_len or self._bm.block_m != block:
            self._bm = BlockMask.from_dense(self.mask, seq_len, block, block)
        return self._bm

    def kernel_q_index(self, heads: int) -> torch.Tensor | None:
        """``q_index`` as :func:`vdit_accel.attention` takes it (``[B or 1, H, S]``; a shared ``[S]`` order
        as a broadcast view): the kernel reads Q and writes the output through it, so neither moves. On
        CUDA as int32, cached with the plan (H100, 32760 x 12 heads, sparse at 0.27, separate medians: the
        kernel reading an int64 order took 3.235 ms, an int32 one 3.169). Timed in pairs against the kernel
        on Q gathered first, reading through the order costs nothing: 0.03 ms less (its epilogue reads the
        order again rather than holding it across the loop; held, it cost 0.095 ms more)."""
        if self.q_index is None:
            return None
        qi = self.q_index if self.q_index.dim() == 3 else self.q_index.view(1, 1, -1).expand(1, heads, -1)
        if not qi.is_cuda:
            return qi
        if self._q_index32 is None or self._q_index32.shape != qi.shape:
            self._q_index32 = qi.to(torch.int32)
        return self._q_index32

    def gather_kv(self, k: torch.Tensor, v: torch.Tensor):
        """k and v moved into the key order (one launch on the GPU; none when the plan moved these very
        tensors already, beside its query half: it hands them over once)."""
        moved, self._moved = self._moved, None
        if moved is not None and moved[0] is k and moved[1] is v:
            if moved[4] is not None:
                torch.cuda.current_stream(k.device).wait_event(moved[4])
            return moved[2], moved[3]
        if self.k_index is None:
            return k, v
        return tuple(gather_tokens_many([k, v], self.k_index))

    def q_inverse(self) -> torch.Tensor | None:
        """The inverse of a per-head ``q_index`` (the output goes back by a gather with it); cached."""
        if self.q_index is None or self.q_index.dim() == 1:
            return None
        if self._q_inv is None:
            self._q_inv = inverse(self.q_index)
        return self._q_inv

    def gather(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """q, k, v moved into the plan's orders: at most two launches on the GPU (q; k and v together)."""
        if self.q_index is not None:
            q = gather_tokens(q, self.q_index)
        k, v = self.gather_kv(k, v)
        return q, k, v

    def scatter(self, out: torch.Tensor) -> torch.Tensor:
        """The attention output back in the order q arrived in."""
        return out if self.q_index is None else scatter_tokens(out, self.q_index, self.q_inverse())


def plan_call(q: torch.Tensor, k: torch.Tensor, grid: VideoGrid, orders: list[Order | None], frame: Order | None,
              block: int, static_mask: torch.Tensor | None, memory: dict | None = None,
              scale: float | None = None, step: int | None = None, v: torch.Tensor | None = None) -> CallPlan:
    """Plan one attention call whose heads have ``orders`` (one per head; q, k ``(B, S, H, D)`` arrive in
    the ``frame`` order, e.g. tiled when the transformer permuted its hidden states once per forward).

    ``static_mask``: bool ``[1, H, Mb, Nb]`` with each static head's block mask in its own order (rows of
    dynamic heads are ignored), or None (static heads dense). ``memory``: a dict kept by the caller
    between calls of the same layer; semantic heads keep their centroids there (warm start), dynamic
    orders their last plan. ``step``: the denoising step of this call, if known: a dynamic plan is then
    reused while ``0 <= step - (its step) < refresh`` (so the calls of one step share it), else it is
    reused for ``refresh - 1`` calls after the one that made it. ``v``: the call's values, when the caller
    takes K and V from :meth:`CallPlan.gather_kv` right after (a semantic order covering every head then
    moves them on its second stream as soon as the key order exists)."""
    b, s, h, d = q.shape
    if len(orders) != h:
        raise ValueError(f"plan_call got {len(orders)} orders for {h} heads")
    device = q.device
    ident = torch.arange(s, device=device)
    q_rows: list[torch.Tensor | None] = []
    k_rows: list[torch.Tensor | None] = []
    for o in orders:
        if o is None or o["kind"] in STATIC_KINDS:
            idx = frame_index(o, frame, grid, block, device)
            q_rows.append(idx)
            k_rows.append(idx)
        else:
            q_rows.append(None)
            k_rows.append(None)
    dyn_rows: dict[int, torch.Tensor] = {}  # head -> bool [B, Mb, Nb]
    q_dyn: dict[int, torch.Tensor] = {}  # head -> [B, S]
    k_dyn: dict[int, torch.Tensor] = {}
    groups: dict[str, list[int]] = {}
    for hi, o in enumerate(orders):
        if o is not None and o["kind"] in DYNAMIC_KINDS:
            groups.setdefault(order_key(o), []).append(hi)
    memory = {} if memory is None else memory
    replanned = False
    for key, heads in groups.items():
        o = orders[heads[0]]
        plan_key = ("plan", key, tuple(heads), b, grid)
        cached = memory.get(plan_key)
        if cached is not None and (cached[4] < o["refresh"] - 1 if step is None or cached[5] is None
                                   else 0 <= step - cached[5] < o["refresh"]):  # reuse the last plan
            cached[4] += 1
            qp, kp, rows, lists = cached[:4]
        else:
            replanned = True
            if len(heads) == h:
                qs, ks = q, k
            else:
                sel_key = ("heads", tuple(heads), str(device))
                if sel_key not in memory:  # a host-to-device copy (a stream sync): once per layer
                    memory[sel_key] = torch.tensor(heads, device=device)
                qs, ks = q.index_select(2, memory[sel_key]), k.index_select(2, memory[sel_key])
            if o["kind"] == "semantic":
                dq, dk = default_clusters(grid, block)
                nq, nk = o["q_clusters"] or dq, o["k_clusters"] or dk
                nq, nk = min(nq, grid.video_len), min(nk, grid.video_len)
                mem_key = ("semantic", key, tuple(heads), b, grid)
                plan = semantic_orders(qs, ks, grid, nq, nk, o["iters"], memory.get(mem_key),
                                       v=v if len(heads) == h else None)
                memory[mem_key] = plan.warm
                moved = plan.moved
                rows, lists = semantic_block_mask(plan, grid, o["top_p"], block, block, scale, lists=True)
                qp, kp = plan.q_perm, plan.k_perm
            else:  # segment
                moved = None
                size = o["size"] or 8 * block
                kp, rows = segment_plan(qs, ks, grid, size, o["top_p"], block, block, scale)
                qp, lists = None, None
            memory[plan_key] = [qp, kp, rows, lists, 0, step]  # calls since, the step it was made at
        if len(heads) == h:  # one dynamic order covers every head: no per-head assembly
            return _cached_call(memory, ("call", order_key(frame), b, grid), replanned,
                                lambda: CallPlan(qp, kp, rows, lists, moved if replanned else None))
        for j, hi in enumerate(heads):
            dyn_rows[hi] = rows[:, j]
            k_dyn[hi] = kp[:, j]
            if qp is not None:
                q_dyn[hi] = qp[:, j]

    def index(rows: list, dyn: dict) -> torch.Tensor | None:
        if not dyn and all(r is None for r in rows):
            return None
        if not dyn and all(r is not None and (r is rows[0] or torch.equal(r, rows[0])) for r in rows):
            return rows[0]  # one static order for every head: a plain gather along S
        out = torch.empty(b if dyn else 1, h, s, dtype=torch.long, device=device)
        for hi, r in enumerate(rows):
            out[:, hi] = dyn[hi] if hi in dyn else (ident if r is None else r)
        return out

    def mixed_mask() -> torch.Tensor | None:
        if not dyn_rows and static_mask is None:
            return None
        mb, nb = cdiv(s, block), cdiv(s, block)
        base = static_mask if static_mask is not None else torch.ones(1, h, mb, nb, dtype=torch.bool, device=device)
        if dyn_rows:
            base = base.expand(b, h, mb, nb).clone()
            for hi, r in dyn_rows.items():
                base[:, hi] = r
        return base

    def assemble() -> CallPlan:
        return CallPlan(index(q_rows, q_dyn), index(k_rows, k_dyn), mixed_mask())

    if not groups:
        return assemble()
    return _cached_call(memory, ("call", order_key(frame), b, grid), replanned, assemble)


def _cached_call(memory: dict, key: tuple, replanned: bool, build) -> CallPlan:
    """The layer's last :class:`CallPlan` when none of its dynamic plans was recomputed this call (its
    block mask and inverse index are then reused too), else a new one."""
    hit = memory.get(key)
    if replanned or hit is None:
        hit = memory[key] = build()
    return hit


def attend_planned(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: CallPlan, block: int, attend,
                   scale: float | None = None) -> torch.Tensor:
    """Run one call under ``plan``: K, V gathered by ``k_index``, then ``attend(q, k, v, kv_num_blocks,
    kv_indices, block, scale, q_index)`` (None, None = dense), which reads Q and writes the output
    through ``q_index`` (:func:`vdit_accel.attention`'s ``q_index``). The output is in the order q arrived in."""
    k, v = plan.gather_kv(k, v)
    bm = plan.block_mask(q.shape[1], block)
    num, idx = (None, None) if bm is None else (bm.kv_num_blocks, bm.kv_indices)
    return attend(q, k, v, num, idx, block, scale, plan.kernel_q_index(q.shape[2]))
