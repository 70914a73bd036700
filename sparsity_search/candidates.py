"""Candidate patterns of the search: the pattern library with parameter grids sized to the token grid."""

from __future__ import annotations

from vdit_accel.grid import VideoGrid
from vdit_accel.orders.static import tile_shape
from vdit_accel.patterns import DENSE, FramePeriodic, PatternSpec, Radial, Skip, Sta, Stripes, Union, Window1d, Window3d


def radius_ladder(limit: int) -> list[int]:
    """0, 1, 2, 4, 8, 16, ... up to ``limit``: the radii tried per axis ("one step" = one rung)."""
    out, v = [0], 1
    while v <= limit:
        out.append(v)
        v *= 2
    return out


def sta_kernels(tiles: int) -> list[int]:
    """Odd STA window sizes (in tiles) for an axis of ``tiles`` tiles: 1, 3, 5 up to the first that
    covers the axis."""
    out = []
    for k in (1, 3, 5):
        out.append(k)
        if k >= tiles:
            break
    return out


def candidate_patterns(grid: VideoGrid, with_stripes: bool = True, block: int = 128) -> list[PatternSpec]:
    """The search's candidates for one grid, cheapest kinds first; ``dense`` and ``skip`` included.

    - ``stripes:frames=0`` alone (the first frame as global keys);
    - ``frame_periodic`` (the same spatial neighbourhood in every frame) over the radius ladder;
    - ``window3d`` over a ladder of radii per axis (t below the frame count, h and w up to half
      the grid), each also in union with the first-frame stripe;
    - ``window1d`` bands of 0.5, 1, 2 and 4 frames;
    - the peers' masks: ``radial`` with its bands at 1/2, 1 and 2 times the paper's, and ``sta``
      windows of 1, 3, 5 tiles per axis with the ``tiled`` order's tile for ``block`` (its blocks are
      whole tiles in that order; skipped where that tile is not whole columns).
    """
    cands: list[PatternSpec] = [Skip()]
    ts = radius_ladder(grid.t - 1)
    hs = [v for v in radius_ladder(grid.h - 1) if v <= max(1, grid.h // 2)]
    ws = [v for v in radius_ladder(grid.w - 1) if v <= max(1, grid.w // 2)]
    first_frame = Stripes(frames=(0,))
    if grid.t > 1:
        cands.append(first_frame)
    # frame_periodic before window3d: a window3d spanning every frame is the same mask, so it is
    # left out and the more specific name is kept.
    for h in hs:
        for w in ws:
            cands.append(FramePeriodic(h, w))
    for t in ts:
        if t >= grid.t - 1 and grid.t > 1:
            continue
        for h in hs:
            for w in ws:
                win = Window3d(t, h, w)
                cands.append(win)
                if with_stripes and grid.t > 1:
                    cands.append(Union((win, first_frame)))
    for f in (0.5, 1.0, 2.0, 4.0):
        if f < grid.t:
            cands.append(Window1d(f))
    if grid.t > 1:
        cands += [Radial(decay=d) for d in (0.5, 1.0, 2.0)]
    tt, th, tw = tile_shape(grid, block)
    if float(tw).is_integer():
        tile = (tt, th, int(tw))
        counts = [-(-n // side) for n, side in zip((grid.t, grid.h, grid.w), tile)]
        for kt in sta_kernels(counts[0]):
            for kh in sta_kernels(counts[1]):
                for kw in sta_kernels(counts[2]):
                    cands.append(Sta(kt, kh, kw, tile))
    cands.append(DENSE)
    return cands
