"""The sparse-pattern library: small, resolution-independent descriptions that become block masks.

A pattern is a typed spec (:mod:`vdit_accel.spec`; ``Window3d(t=1, h=2, w=2)``, short form
``window3d:t=1,h=2,w=2``) with parameters in latent units (frames, rows, columns of the patched grid), so
that one strategy applies at any resolution:

=================  ==========================================  ================================================
kind               parameters                                  query token (t, y, x) attends key (t', y', x') iff
=================  ==========================================  ================================================
``dense``          —                                           always
``window1d``       ``frames`` (float > 0)                      ``|i - j| <= frames * h * w`` in raster order
                                                               (a diagonal band measured in frames' worth of tokens)
``window3d``       ``t``, ``h``, ``w`` (ints >= 0)             ``|t-t'| <= t and |y-y'| <= h and |x-x'| <= w``
``frame_periodic`` ``h``, ``w`` (ints >= 0), ``every`` (>= 1)  ``(t - t') % every == 0 and |y-y'| <= h and |x-x'| <= w``
                                                               (the same spatial neighbourhood in other frames)
``stripes``        ``frames`` (list of ints, negative from     ``t'`` is one of ``frames`` (global key columns)
                   the end), ``tokens`` (list of video token
                   indices, negative from the end)
``radial``         ``decay`` (> 0), ``min_band`` (rows, > 0),  Radial Attention's O(n log n) mask: ``t'`` is a
                   ``sink`` (frames, >= 0)                     sink frame (``t' < sink``), or ``t == t'``, or, at
                                                               frame distance ``d = |t - t'|`` (group
                                                               ``g = bit_length(d)``), the in-frame raster indices
                                                               ``p = y * w + x`` lie within the band
                                                               ``b = decay * h * w / 2**g`` (halving as ``d``
                                                               doubles); below ``min_band`` rows the band stays at
                                                               ``min_band`` rows and only every ``s``-th frame
                                                               distance is kept (``s`` the power of two that
                                                               brings ``b * s`` to ``min_band`` rows)
``sta``            ``t``, ``h``, ``w`` (odd kernel sizes in     sliding tile attention: the grid is cut into tiles
                   tiles), ``tile`` (frames, rows, columns     of ``tile`` tokens; the key's tile lies in the
                   of one tile)                                ``t x h x w`` tiles around the query's tile, the
                                                               window's centre clamped so that it stays inside
                                                               the grid (as STA does)
``skip``           —                                           never: the head's video rows output zeros
``union``          ``of`` (list of patterns)                   any of them
=================  ==========================================  ================================================

Text tokens (joint attention) are always attended densely, rows and columns, whatever the pattern —
also under ``skip``, which silences only the video rows.

``radial`` and ``sta`` are the peers' masks as pattern kinds (Radial Attention, Li et al. 2025; Sliding
Tile Attention, Zhang et al. 2025), resolution-independent like the others: the radial bands are
fractions of a frame, the STA window whole tiles. STA's tiles are compact blocks in the ``tiled``
order (:mod:`vdit_accel.orders.static`) when ``tile`` is that order's tile (``(2, 8, 8)`` for blocks of
128 tokens): there every visited block is a whole tile the window covers, no block is partly used.

A block mask visits the (query block, key block) pair iff *some* token pair in it is allowed, so the
block mask is a superset of the token pattern at block granularity; the kernel then attends every
token pair of a visited block. Masks are built by dilating each query block's token set on the
(t, h, w) grid — cost O(Mb · S), once per (grid, pattern), never per call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .block_mask import BlockMask, cdiv
from .grid import VideoGrid
from .spec import Spec, SpecRegistry


class PatternSpec(Spec):
    """A sparse pattern (base class of the kinds below)."""

    family = "pattern"


@dataclass(frozen=True)
class Dense(PatternSpec):
    """Every key."""

    kind = "dense"


@dataclass(frozen=True)
class Skip(PatternSpec):
    """No key: the head's video rows output zeros (its text rows stay dense)."""

    kind = "skip"


@dataclass(frozen=True)
class Window1d(PatternSpec):
    """A diagonal band in raster order, ``frames`` frames' worth of tokens each side."""

    kind = "window1d"
    frames: float

    def check(self):
        if not self.frames > 0:
            raise self.invalid("frames", "a number > 0", self.frames)


@dataclass(frozen=True)
class Window3d(PatternSpec):
    """Keys within ``t`` frames, ``h`` rows and ``w`` columns of the query."""

    kind = "window3d"
    t: int
    h: int
    w: int

    def check(self):
        for name in ("t", "h", "w"):
            if getattr(self, name) < 0:
                raise self.invalid(name, "an int >= 0", getattr(self, name))


@dataclass(frozen=True)
class FramePeriodic(PatternSpec):
    """The same ``h`` x ``w`` neighbourhood in every ``every``-th frame."""

    kind = "frame_periodic"
    h: int
    w: int
    every: int = 1

    def check(self):
        for name in ("h", "w"):
            if getattr(self, name) < 0:
                raise self.invalid(name, "an int >= 0", getattr(self, name))
        if self.every < 1:
            raise self.invalid("every", "an int >= 1", self.every)


@dataclass(frozen=True)
class Radial(PatternSpec):
    """Radial Attention's static mask: the frame itself, sink frames, and bands of the in-frame raster
    index whose width halves each time the frame distance doubles (see the module docstring). The
    defaults thin frame pairs where the band would drop under two rows: about where Radial Attention's
    own mask (its floor is one block of 128 tokens) thins them at Wan 480p."""

    kind = "radial"
    decay: float = 1.0
    min_band: float = 2.0
    sink: int = 1

    def check(self):
        for name in ("decay", "min_band"):
            if not getattr(self, name) > 0:
                raise self.invalid(name, "a number > 0", getattr(self, name))
        if self.sink < 0:
            raise self.invalid("sink", "an int >= 0", self.sink)

    def bands(self, grid: VideoGrid) -> list[int]:
        """Per frame distance ``d`` in ``[0, grid.t)``: the largest in-frame index distance ``|p - p'|``
        attended (``h * w`` for the frame itself), or -1 where that frame distance is left out."""
        frame = grid.h * grid.w
        narrow = self.min_band * grid.w
        out = [frame]
        for d in range(1, grid.t):
            band = self.decay * frame / 2 ** d.bit_length()
            split = 1
            while band * split < narrow * (1 - 1e-12):
                split *= 2
            out.append(int(band + 1e-9) if split == 1 else (int(narrow + 1e-9) if d % split == 0 else -1))
        return out


@dataclass(frozen=True)
class Sta(PatternSpec):
    """Sliding tile attention: whole tiles of ``tile`` = (frames, rows, columns) tokens, a window of
    ``t x h x w`` tiles (odd sizes) centred on the query's tile and clamped inside the grid."""

    kind = "sta"
    t: int
    h: int
    w: int
    tile: tuple[int, ...] = (2, 8, 8)

    def check(self):
        for name in ("t", "h", "w"):
            v = getattr(self, name)
            if v < 1 or v % 2 == 0:
                raise self.invalid(name, "an odd int >= 1 (a window of whole tiles centred on the query's)", v)
        if len(self.tile) != 3 or min(self.tile) < 1:
            raise self.invalid("tile", "three ints >= 1 (frames|rows|columns)", list(self.tile))

    def axes(self, grid: VideoGrid) -> list[tuple[int, int, int]]:
        """Per axis (t, y, x): ``(tile side, tiles on the grid, window radius in tiles)``."""
        return [(s, cdiv(n, s), k // 2) for s, n, k in zip(self.tile, (grid.t, grid.h, grid.w), (self.t, self.h, self.w))]


def _sta_reach_matrix(n: int, r: int, device) -> torch.Tensor:
    """Bool ``[n, n]``: query tile i reaches key tile j (window of radius r, centre clamped inside)."""
    i = torch.arange(n, device=device)
    if 2 * r + 1 >= n:
        return torch.ones(n, n, dtype=torch.bool, device=device)
    centre = i.clamp(r, n - 1 - r)
    return (centre[:, None] - i[None, :]).abs() <= r


@dataclass(frozen=True)
class Stripes(PatternSpec):
    """Global key columns: whole frames (negative: from the end) and single video tokens."""

    kind = "stripes"
    frames: tuple[int, ...] = ()
    tokens: tuple[int, ...] = ()


@dataclass(frozen=True)
class Union(PatternSpec):
    """Any of several patterns (short form: joined by ``+``)."""

    kind = "union"
    joins = True
    of: tuple[PatternSpec, ...]

    def check(self):
        if not self.of:
            raise self.invalid("of", "a non-empty list", list(self.of))


PATTERNS = SpecRegistry("pattern", [Dense, Skip, Window1d, Window3d, FramePeriodic, Stripes, Radial, Sta, Union],
                       examples={"window1d": "window1d:frames=1.5", "window3d": "window3d:t=1,h=2,w=2",
                                 "frame_periodic": "frame_periodic:h=1,w=1,every=2", "sta": "sta:t=3,h=3,w=3",
                                 "union": "window3d:t=1,h=1,w=1+stripes:frames=0"},
                       join=Union)
PATTERN_KINDS = PATTERNS.names
DENSE = Dense()


def parse_pattern(x) -> PatternSpec:
    """A pattern from its short form (``kind`` or ``kind:k=v,k=v``; ``+`` joins a union; lists with
    ``|``: ``stripes:frames=0|-1``), its JSON object (a dict or its text), or a pattern (returned as it
    is). Examples: ``dense``, ``window3d:t=1,h=2,w=2``, ``window3d:t=1,h=1,w=1+stripes:frames=0``."""
    return PATTERNS.parse(x)


def format_pattern(p: PatternSpec) -> str:
    """The short form of ``p`` (inverse of :func:`parse_pattern`)."""
    return PATTERNS.format(p)


# ---------------------------------------------------------------------------------------------
# Pattern -> block mask
# ---------------------------------------------------------------------------------------------


def _dilate(x: torch.Tensor, dim: int, r: int) -> torch.Tensor:
    """Binary dilation of ``x`` (bool) by ``r`` along ``dim``: O(numel) through a cumulative sum."""
    n = x.shape[dim]
    r = min(r, n - 1)
    if r <= 0:
        return x
    c = torch.cumsum(x.to(torch.int32), dim)
    c = torch.cat([torch.zeros_like(c.narrow(dim, 0, 1)), c], dim)  # c[i] = sum of x[:i]
    hi = torch.arange(n, device=x.device).add(r + 1).clamp_max(n)
    lo = torch.arange(n, device=x.device).sub(r).clamp_min(0)
    return (c.index_select(dim, hi) - c.index_select(dim, lo)) > 0


def _video_reach(p: PatternSpec, grid: VideoGrid, q_onehot: torch.Tensor) -> torch.Tensor:
    """Which video keys some query of each group reaches.

    ``q_onehot``: float ``[G, T, H, W]`` — 1 where the group (a query block) has a video token.
    Returns bool ``[G, T, H, W]`` over the keys.
    """
    g, t, h, w = q_onehot.shape
    kind = p.kind
    if kind == "dense":
        any_q = q_onehot.flatten(1).amax(1) > 0
        return any_q.view(g, 1, 1, 1).expand(g, t, h, w).clone()
    if kind == "skip":
        return torch.zeros(g, t, h, w, dtype=torch.bool, device=q_onehot.device)
    if kind == "union":
        out = torch.zeros(g, t, h, w, dtype=torch.bool, device=q_onehot.device)
        for sub in p.of:
            out |= _video_reach(sub, grid, q_onehot)
        return out
    if kind == "window3d":
        x = q_onehot > 0
        for dim, r in ((1, p.t), (2, p.h), (3, p.w)):
            x = _dilate(x, dim, r)
        return x
    if kind == "frame_periodic":
        x = _dilate(_dilate(q_onehot > 0, 2, p.h), 3, p.w)
        every = p.every
        # Frames grouped by residue mod `every`: key frame t' is reached if any query frame t with
        # t = t' (mod every) reaches (y', x').
        pad = cdiv(t, every) * every - t
        x = torch.cat([x, x.new_zeros(g, pad, h, w)], 1)
        xr = x.view(g, -1, every, h, w).any(1)  # [G, every, H, W]
        return xr.repeat(1, cdiv(t, every), 1, 1)[:, :t]
    if kind == "window1d":
        flat = q_onehot.reshape(g, -1)
        radius = int(round(p.frames * h * w))
        pos = torch.arange(flat.shape[1], device=flat.device)
        big = flat.shape[1] + radius + 1
        lo = torch.where(flat > 0, pos, big).amin(1)
        hi = torch.where(flat > 0, pos, -big).amax(1)
        reach = (pos >= (lo - radius).unsqueeze(1)) & (pos <= (hi + radius).unsqueeze(1))
        return reach.view(g, t, h, w)
    if kind == "radial":
        x = (q_onehot > 0).reshape(g, t, h * w)
        bands = p.bands(grid)
        dist = (torch.arange(t)[:, None] - torch.arange(t)[None, :]).abs()
        table = torch.tensor(bands)[dist]  # [T, T]: the band between query frame i and key frame j
        out = torch.zeros(g, t, h * w, dtype=torch.bool, device=q_onehot.device)
        for band in sorted({b for b in bands if b >= 0}):
            pairs = (table == band).to(q_onehot.device, torch.float32)  # [T (query), T (key)]
            out |= torch.einsum("gtf,ts->gsf", _dilate(x, 2, band).float(), pairs) > 0
        if p.sink:
            out[:, : p.sink] |= x.flatten(1).any(1)[:, None, None]
        return out.view(g, t, h, w)
    if kind == "sta":
        x = q_onehot > 0
        for dim, (side, n, r) in zip((1, 2, 3), p.axes(grid)):
            size = x.shape[dim]
            pad = n * side - size
            if pad:
                x = torch.cat([x, x.new_zeros(*x.shape[:dim], pad, *x.shape[dim + 1:])], dim)
            tiles = x.unflatten(dim, (n, side)).any(dim + 1)  # the tiles some query of the group is in
            reach = _sta_reach_matrix(n, r, x.device).float()
            tiles = torch.tensordot(tiles.float(), reach, dims=([dim], [0])).movedim(-1, dim) > 0
            x = tiles.repeat_interleave(side, dim).narrow(dim, 0, size)
        return x
    if kind == "stripes":
        any_q = (q_onehot.flatten(1).amax(1) > 0).view(g, 1)
        cols = torch.zeros(t * h * w, dtype=torch.bool, device=q_onehot.device)
        for f in p.frames:
            if -t <= f < t:
                cols.view(t, h * w)[f] = True
        for i in p.tokens:
            if -cols.numel() <= i < cols.numel():
                cols[i] = True
        return (any_q & cols.view(1, -1)).view(g, t, h, w)
    raise AssertionError(f"unvalidated pattern kind {kind!r}")


def _block_boxes(starts: torch.Tensor, ends: torch.Tensor, grid: VideoGrid):
    """Each block's video tokens as at most 5 boxes of the (t, h, w) grid.

    A block holds the raster range ``[starts, ends)`` of video indices (``ends <= starts``: none).
    Such a range is a partial row, then full rows to the end of its frame, then full frames, then
    full rows, then a partial row. Returns ``lo, hi`` int64 ``[N, 5, 3]`` (inclusive (t, y, x)
    bounds per box) and ``valid`` bool ``[N, 5]``.
    """
    H, W = grid.h, grid.w
    n = starts.numel()
    a, last = starts, ends - 1  # inclusive video indices
    nonempty = ends > starts
    ra, rb = a // W, last // W  # first and last row (row = t * H + y)
    one_row = ra == rb
    # Rows fully covered: [r0, r1].
    r0 = torch.where(a % W == 0, ra, ra + 1)
    r1 = torch.where((last + 1) % W == 0, rb, rb - 1)
    lo = torch.zeros(n, 5, 3, dtype=torch.long, device=starts.device)
    hi = torch.zeros_like(lo)
    valid = torch.zeros(n, 5, dtype=torch.bool, device=starts.device)

    def put(i, ok, t0, t1, y0, y1, x0, x1):
        lo[:, i, 0], hi[:, i, 0], lo[:, i, 1], hi[:, i, 1], lo[:, i, 2], hi[:, i, 2] = t0, t1, y0, y1, x0, x1
        valid[:, i] = ok & nonempty

    full_w = torch.full_like(a, W - 1)
    zero = torch.zeros_like(a)
    # 0: the first row, partial (or the whole block when it sits in one row).
    x_end0 = torch.where(one_row, last % W, full_w)
    put(0, one_row | (a % W != 0), ra // H, ra // H, ra % H, ra % H, a % W, x_end0)
    # 4: the last row, partial.
    put(4, ~one_row & ((last + 1) % W != 0), rb // H, rb // H, rb % H, rb % H, zero, last % W)
    # Full rows [r0, r1], not in the one-row case: rows of r0's frame, full frames, rows of r1's frame.
    rows_ok = ~one_row & (r0 <= r1)
    f0, f1 = r0 // H, r1 // H
    same_frame = f0 == f1
    y_end1 = torch.where(same_frame, r1 % H, torch.full_like(a, H - 1))
    put(1, rows_ok & (same_frame | (r0 % H != 0)), f0, f0, r0 % H, y_end1, zero, full_w)
    ff0 = torch.where(r0 % H == 0, f0, f0 + 1)
    ff1 = torch.where((r1 + 1) % H == 0, f1, f1 - 1)
    put(2, rows_ok & ~same_frame & (ff0 <= ff1), ff0, ff1, zero, torch.full_like(a, H - 1), zero, full_w)
    put(3, rows_ok & ~same_frame & ((r1 + 1) % H != 0), f1, f1, zero, r1 % H, zero, full_w)
    return lo, hi, valid


def _near(qlo, qhi, klo, khi, r):
    """[Mb, Nb, 5, 5]: intervals [qlo, qhi] and [klo, khi] come within distance r."""
    return (qlo[:, None, :, None] <= khi[None, :, None, :] + r) & (klo[None, :, None, :] <= qhi[:, None, :, None] + r)


def _block_reach(p: PatternSpec, grid: VideoGrid, q, k, q_range, k_range, device) -> torch.Tensor:
    """Bool [Mb, Nb]: some video query of block m reaches some video key of block n under p."""
    (qlo, qhi, qv), (klo, khi, kv) = q, k
    both = qv[:, None, :, None] & kv[None, :, None, :]
    has_q = qv.any(1)[:, None]
    has_k = kv.any(1)[None, :]
    kind = p.kind
    if kind == "dense":
        return has_q & has_k
    if kind == "skip":
        return torch.zeros(qv.shape[0], kv.shape[0], dtype=torch.bool, device=device)
    if kind == "union":
        out = torch.zeros(qv.shape[0], kv.shape[0], dtype=torch.bool, device=device)
        for sub in p.of:
            out |= _block_reach(sub, grid, q, k, q_range, k_range, device)
        return out
    if kind == "window3d":
        ok = both
        for axis, r in ((0, p.t), (1, p.h), (2, p.w)):
            ok = ok & _near(qlo[..., axis], qhi[..., axis], klo[..., axis], khi[..., axis], r)
        return ok.flatten(2).any(-1)
    if kind == "frame_periodic":
        ok = both
        for axis, r in ((1, p.h), (2, p.w)):
            ok = ok & _near(qlo[..., axis], qhi[..., axis], klo[..., axis], khi[..., axis], r)
        # Some t - t' in [qlo_t - khi_t, qhi_t - klo_t] is a multiple of `every`.
        dmin = qlo[:, None, :, None, 0] - khi[None, :, None, :, 0]
        dmax = qhi[:, None, :, None, 0] - klo[None, :, None, :, 0]
        every = p.every
        ok = ok & (torch.div(dmax, every, rounding_mode="floor") * every >= dmin)
        return ok.flatten(2).any(-1)
    if kind == "radial":
        # Every box is a range of frames x a range of in-frame raster indices (one partial row, or
        # full-width rows), so the achievable frame distances and the nearest in-frame distance of two
        # boxes are intervals: the pair is allowed iff the widest band over those distances covers it.
        bands = torch.tensor(p.bands(grid), device=device)
        widest = torch.stack([torch.cummax(torch.cat([bands[i:], bands.new_full((i,), -1)]), 0).values
                              for i in range(grid.t)])  # [dmin, dmax - dmin]: max band over [dmin, dmax]
        qt0, qt1, kt0, kt1 = qlo[:, None, :, None, 0], qhi[:, None, :, None, 0], klo[None, :, None, :, 0], khi[None, :, None, :, 0]
        w = grid.w
        qp0, qp1 = (qlo[..., 1] * w + qlo[..., 2])[:, None, :, None], (qhi[..., 1] * w + qhi[..., 2])[:, None, :, None]
        kp0, kp1 = (klo[..., 1] * w + klo[..., 2])[None, :, None, :], (khi[..., 1] * w + khi[..., 2])[None, :, None, :]
        zero = torch.zeros((), dtype=torch.long, device=device)
        # (boxes that are not valid hold arbitrary bounds: clamped to index the table, masked by `both`)
        dmin = torch.maximum(torch.maximum(kt0 - qt1, qt0 - kt1), zero).clamp_max(grid.t - 1)
        dmax = torch.maximum(torch.maximum(qt1 - kt0, kt1 - qt0).clamp_max(grid.t - 1), dmin)
        near = torch.maximum(torch.maximum(kp0 - qp1, qp0 - kp1), zero)
        ok = (widest[dmin, dmax - dmin] >= near) | (kt0 < p.sink)
        return (both & ok).flatten(2).any(-1)
    if kind == "sta":
        ok = both
        for axis, (side, n, r) in enumerate(p.axes(grid)):
            if 2 * r + 1 >= n:
                continue
            c0 = (qlo[..., axis] // side).clamp(r, n - 1 - r)[:, None, :, None]
            c1 = (qhi[..., axis] // side).clamp(r, n - 1 - r)[:, None, :, None]
            k0, k1 = (klo[..., axis] // side)[None, :, None, :], (khi[..., axis] // side)[None, :, None, :]
            ok = ok & (k0 <= c1 + r) & (c0 - r <= k1)
        return ok.flatten(2).any(-1)
    if kind == "window1d":
        radius = int(round(p.frames * grid.h * grid.w))
        (qa, qb), (ka, kb) = q_range, k_range  # video index ranges [a, b)
        ok = (qa[:, None] <= kb[None, :] - 1 + radius) & (ka[None, :] <= qb[:, None] - 1 + radius)
        return ok & has_q & has_k
    if kind == "stripes":
        vl = grid.video_len
        cols = torch.zeros(vl, dtype=torch.bool, device=device)
        frame = cols.view(grid.t, grid.h * grid.w)
        for f in p.frames:
            if -grid.t <= f < grid.t:
                frame[f] = True
        for i in p.tokens:
            if -vl <= i < vl:
                cols[i] = True
        csum = torch.cat([torch.zeros(1, dtype=torch.long, device=device), cols.long().cumsum(0)])
        ka, kb = k_range
        hit = csum[kb.clamp(min=0)] - csum[ka.clamp(max=vl)] > 0
        return has_q & hit[None, :] & has_k
    raise AssertionError(f"unvalidated pattern kind {kind!r}")


def _video_ranges(grid: VideoGrid, block: int, n_blocks: int, device):
    """Per block: the video index range [a, b) it holds (empty when b <= a)."""
    start = torch.arange(n_blocks, device=device) * block - grid.video_start
    a = start.clamp(0, grid.video_len)
    b = (start + block).clamp(0, grid.video_len)
    return a, b


_BOXES: dict[tuple, tuple] = {}  # (grid, block, device) -> per-block video ranges and boxes
_CACHE: dict[tuple, BlockMask] = {}  # (patterns, grid, blocks, device) -> a layer's BlockMask
_PATTERN_CACHE: dict[tuple, torch.Tensor] = {}  # (pattern, grid, blocks, device) -> bool [Mb, Nb]
_CACHE_MAX = 256


def _cached(cache: dict, key, make):
    hit = cache.get(key)
    if hit is None:
        if len(cache) >= _CACHE_MAX:
            cache.pop(next(iter(cache)))
        hit = cache[key] = make()
    return hit


def clear_mask_caches() -> None:
    """Forget every cached block mask, per-pattern mask and block geometry (to time a cold build)."""
    for cache in (_BOXES, _CACHE, _PATTERN_CACHE):
        cache.clear()


def _blocks_of(grid: VideoGrid, block: int, n_blocks: int, device):
    """Video ranges and boxes of every block: they depend on the grid and block size only, so all
    patterns (and layers) share them."""

    def make():
        rng = _video_ranges(grid, block, n_blocks, device)
        return rng, _block_boxes(*rng, grid)

    return _cached(_BOXES, (grid, block, str(device)), make)


def build_block_mask_for_pattern(
    p: PatternSpec, grid: VideoGrid, block_m: int = 128, block_n: int = 128, device=None
) -> torch.Tensor:
    """Bool ``[Mb, Nb]`` block-level mask of one pattern on one grid (raster token order).

    Exact: a pair is set iff some (query, key) token pair in it is allowed (tests check this
    against :func:`token_pattern_mask`). Each block's tokens are cut into at most 5 boxes of the
    grid, and the pattern is tested box against box: O(Mb * Nb) work, no token-level tensor.
    """
    p = parse_pattern(p)
    s = grid.seq_len
    mb, nb = cdiv(s, block_m), cdiv(s, block_n)
    q_range, q = _blocks_of(grid, block_m, mb, device)
    k_range, k = _blocks_of(grid, block_n, nb, device)
    mask = _block_reach(p, grid, q, k, q_range, k_range, device)
    if grid.text_len:
        text = torch.arange(grid.text_start, grid.text_start + grid.text_len, device=device)
        mask[text // block_m, :] = True  # text rows attend everything
        mask[:, text // block_n] = True  # every row attends the text columns
    return mask


def build_block_mask(
    patterns: list[PatternSpec], grid: VideoGrid, block_m: int = 128, block_n: int = 128, device=None
) -> BlockMask:
    """One :class:`BlockMask` for a layer: ``patterns[h]`` is head h's pattern (batch dim 1).

    Cached per (patterns, grid, blocks, device), and each distinct pattern's block mask is cached
    across layers too: a searched strategy costs one build per distinct pattern, not per head.
    """
    patterns = tuple(parse_pattern(p) for p in patterns)
    dev = str(device)
    key = (patterns, grid, block_m, block_n, dev)

    def make():
        rows = [
            _cached(_PATTERN_CACHE, (p, grid, block_m, block_n, dev),
                    lambda p=p: build_block_mask_for_pattern(p, grid, block_m, block_n, device))
            for p in patterns
        ]
        return BlockMask.from_dense(torch.stack(rows).unsqueeze(0), grid.seq_len, block_m, block_n)

    return _cached(_CACHE, key, make)


def token_pattern_mask(p: PatternSpec, grid: VideoGrid) -> torch.Tensor:
    """Bool ``[S, S]``: the token-level pattern itself (for tests and small grids only)."""
    p = parse_pattern(p)
    vl = grid.video_len
    eye = torch.eye(vl).view(vl, grid.t, grid.h, grid.w)
    reach = _video_reach(p, grid, eye).reshape(vl, vl)
    s = grid.seq_len
    out = torch.zeros(s, s, dtype=torch.bool)
    vs = grid.video_start
    out[vs : vs + vl, vs : vs + vl] = reach
    if grid.text_len:
        ts = grid.text_start
        out[ts : ts + grid.text_len, :] = True
        out[:, ts : ts + grid.text_len] = True
    return out
