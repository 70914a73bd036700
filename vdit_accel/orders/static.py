"""Static token orders (raster, tiled): permutations that depend on the grid only, and the exact block
mask of a pattern in such an order."""

from __future__ import annotations

import math

import torch

from ..block_mask import cdiv
from ..grid import VideoGrid
from ..patterns import PatternSpec, _video_reach, parse_pattern
from .spec import OrderSpec, Tiled


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
    (2, 4, 16), (4, 4, 8), (1, 16, 8) and (2, 16, 4) on the ``local3d`` heads, (2, 8, 8) and (2, 16, 4)
    needed the fewest blocks (``benchmarks/RESULTS.md``); (2, 8, 8) is kept for its square face."""
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


def static_order(o: OrderSpec | None, grid: VideoGrid, block: int, device=None) -> torch.Tensor:
    """The permutation ``[S]`` of a static order spec (raster or tiled) on ``grid``."""
    if o is None:
        return raster_order(grid, device)
    if isinstance(o, Tiled):
        return tiled_order(grid, block, o.t, o.h, device)
    raise ValueError(f"order {o} is computed from the data of each call, not from the grid")


def inverse(perm: torch.Tensor) -> torch.Tensor:
    """The inverse permutation (along the last dim): ``inverse(perm)[..., perm[..., i]] = i``."""
    inv = torch.empty_like(perm)
    inv.scatter_(-1, perm, torch.arange(perm.shape[-1], device=perm.device).expand_as(perm))
    return inv


def block_mask_for_order(p: PatternSpec, grid: VideoGrid, perm: torch.Tensor, block_m: int = 128,
                         block_n: int = 128) -> torch.Tensor:
    """Bool [Mb, Nb]: the block mask of pattern ``p`` when the sequence is reordered by ``perm``.

    Exact (a pair is set iff some allowed token pair falls in it), through the token-level pattern
    one query block at a time: O(Mb * S) work — for orders whose blocks are not raster ranges."""
    p = parse_pattern(p)
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

