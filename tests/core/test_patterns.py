import itertools
import json
import math

import pytest
import torch

from vdit_accel import BlockMask, VideoGrid
from vdit_accel.patterns import PATTERNS as REGISTRY
from vdit_accel.patterns import (
    build_block_mask,
    build_block_mask_for_pattern,
    format_pattern,
    parse_pattern,
    token_pattern_mask,
)

PATTERNS = [
    "dense",
    "skip",
    "window1d:frames=0.5",
    "window3d:t=0,h=1,w=1",
    "window3d:t=1,h=2,w=3",
    "frame_periodic:h=1,w=1",
    "frame_periodic:h=0,w=2,every=2",
    "stripes:frames=0",
    "stripes:frames=-1,tokens=5|-3",
    "window3d:t=0,h=1,w=1+stripes:frames=0",
    "radial",
    "radial:decay=0.5,min_band=1,sink=0",
    "sta:t=1,h=3,w=3,tile=1|2|2",
    "sta:t=3,h=1,w=3,tile=2|2|3",
    "radial:decay=2+sta:t=1,h=1,w=1,tile=1|3|3",
]
GRIDS = [
    VideoGrid(3, 5, 7),
    VideoGrid(4, 3, 6, text_len=11, text_at="prefix"),
    VideoGrid(2, 4, 5, text_len=9, text_at="suffix"),
    VideoGrid(9, 3, 4),  # enough frames for every radial group: bands, then thinned frame distances
]


def _coords(grid):
    t, h, w = torch.meshgrid(torch.arange(grid.t), torch.arange(grid.h), torch.arange(grid.w), indexing="ij")
    return t.flatten(), h.flatten(), w.flatten()


def _brute_force(p, grid):
    """The token-level rule of each kind, written directly from its definition."""
    t, y, x = _coords(grid)
    dt = (t[:, None] - t[None, :]).abs()
    dy = (y[:, None] - y[None, :]).abs()
    dx = (x[:, None] - x[None, :]).abs()
    v = grid.video_len
    kind = p.kind
    if kind == "dense":
        return torch.ones(v, v, dtype=torch.bool)
    if kind == "skip":
        return torch.zeros(v, v, dtype=torch.bool)
    if kind == "window1d":
        i = torch.arange(v)
        return (i[:, None] - i[None, :]).abs() <= round(p.frames * grid.h * grid.w)
    if kind == "window3d":
        return (dt <= p.t) & (dy <= p.h) & (dx <= p.w)
    if kind == "frame_periodic":
        return ((t[:, None] - t[None, :]) % p.every == 0) & (dy <= p.h) & (dx <= p.w)
    if kind == "stripes":
        col = torch.zeros(v, dtype=torch.bool)
        for f in p.frames:
            col |= t == (f % grid.t)
        for tok in p.tokens:
            col[tok % v] = True
        return col[None, :].expand(v, v)
    if kind == "radial":
        frame, narrow = grid.h * grid.w, p.min_band * grid.w
        pos = y * grid.w + x
        dp = (pos[:, None] - pos[None, :]).abs()
        out = (dt == 0) | (t[None, :] < p.sink).expand(v, v)
        for d in range(1, grid.t):
            band = p.decay * frame / 2 ** d.bit_length()
            if band >= narrow:
                out |= (dt == d) & (dp <= int(band))
            else:
                split = 2 ** math.ceil(math.log2(narrow / band))
                if d % split == 0:
                    out |= (dt == d) & (dp <= int(narrow))
        return out
    if kind == "sta":
        ok = torch.ones(v, v, dtype=torch.bool)
        for c, side, size, k in zip((t, y, x), p.tile, (grid.t, grid.h, grid.w), (p.t, p.h, p.w)):
            tile, n, r = c // side, -(-size // side), k // 2
            if 2 * r + 1 < n:
                ok &= (tile.clamp(r, n - 1 - r)[:, None] - tile[None, :]).abs() <= r
        return ok
    if kind == "union":
        out = torch.zeros(v, v, dtype=torch.bool)
        for q in p.of:
            out |= _brute_force(q, grid)
        return out
    raise AssertionError(kind)


@pytest.mark.parametrize("spec,grid", list(itertools.product(PATTERNS, GRIDS)))
def test_token_rule_and_block_mask(spec, grid):
    p = parse_pattern(spec)
    tok = token_pattern_mask(p, grid)
    # Token level: the video part follows the definition; text rows and columns are dense.
    vs, vl = grid.video_start, grid.video_len
    assert torch.equal(tok[vs : vs + vl, vs : vs + vl], _brute_force(p, grid))
    if grid.text_len:
        ts = grid.text_start
        assert tok[ts : ts + grid.text_len].all() and tok[:, ts : ts + grid.text_len].all()
    # Block level: a pair is visited iff some token pair in it is allowed (odd block sizes vs S).
    for bm, bn in [(16, 16), (32, 16), (8, 32)]:
        blk = build_block_mask_for_pattern(p, grid, bm, bn)
        s = grid.seq_len
        pad = torch.zeros(-(-s // bm) * bm, -(-s // bn) * bn, dtype=torch.bool)
        pad[:s, :s] = tok
        expect = pad.view(-1, bm, pad.shape[1] // bn, bn).any(3).any(1)
        assert torch.equal(blk, expect), (spec, grid, bm, bn)


def test_block_mask_per_head_and_cache():
    grid = VideoGrid(3, 8, 8)
    pats = [parse_pattern(s) for s in ("dense", "window3d:t=0,h=1,w=1", "skip", "window3d:t=0,h=1,w=1")]
    bm = build_block_mask(pats, grid, 32, 32)
    assert isinstance(bm, BlockMask) and bm.kv_num_blocks.shape == (1, 4, 6)
    d = bm.density_per_head()
    assert d[0] == 1.0 and d[2] == 0.0 and 0 < d[1] < 1 and d[1] == d[3]
    assert build_block_mask(pats, grid, 32, 32) is bm  # cached
    # The CSR form round-trips to the dense block form, indices ascending.
    dense = torch.stack([build_block_mask_for_pattern(p, grid, 32, 32) for p in pats]).unsqueeze(0)
    assert torch.equal(bm.to_dense(), dense)
    for h in range(4):
        for m in range(6):
            n = int(bm.kv_num_blocks[0, h, m])
            idx = bm.kv_indices[0, h, m, :n]
            assert torch.all(idx[1:] > idx[:-1])


def test_density_shrinks_with_window():
    grid = VideoGrid(21, 30, 52)  # Wan2.1 480p, 81 frames
    dens = [
        build_block_mask([parse_pattern(f"window3d:t={t},h={h},w={w}")], grid).density()
        for t, h, w in [(20, 29, 51), (3, 10, 20), (1, 4, 8), (0, 1, 1)]
    ]
    assert dens[0] == 1.0
    assert all(a > b for a, b in zip(dens, dens[1:])), dens
    assert dens[-1] < 0.1


def test_skip_keeps_text_dense():
    grid = VideoGrid(2, 4, 4, text_len=8, text_at="suffix")
    blk = build_block_mask_for_pattern({"kind": "skip"}, grid, 8, 8)
    assert blk[-1].all() and blk[:, -1].all()  # the text block row and column
    assert not blk[:-1, :-1].any()


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"kind": "nope"}, "unknown pattern kind"),
        ({"kind": "window3d", "t": 1, "h": 1}, "needs parameter 'w'"),
        ({"kind": "window3d", "t": -1, "h": 1, "w": 1}, "int >= 0"),
        ({"kind": "window3d", "t": 1, "h": 1, "w": 1, "x": 2}, "unknown"),
        ({"kind": "window1d", "frames": 0}, "number > 0"),
        ({"kind": "union", "of": []}, "non-empty"),
        ({"kind": "stripes", "frames": ["a"]}, "list of ints"),
        ("window3d:t=one,h=1,w=1", "bad value"),
        (42, "a pattern is a string or a dict"),
        ({"kind": "window3d", "t": True, "h": 1, "w": 1}, "'t' must be an int"),
        ("sta:t=2,h=3,w=3", "odd int"),
        ("sta:t=1,h=1,w=1,tile=2|8", "three ints"),
        ("radial:decay=0", "number > 0"),
        ("radial:sink=-1", "int >= 0"),
    ],
)
def test_validation_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_pattern(bad)


@pytest.mark.parametrize("spec", PATTERNS)
def test_short_form_round_trip(spec):
    p = parse_pattern(spec)
    assert parse_pattern(format_pattern(p)) == p and format_pattern(p) == spec
    assert parse_pattern(p) is p and parse_pattern(REGISTRY.to_json(p)) == p and hash(p) == hash(parse_pattern(spec))
    assert parse_pattern(json.dumps(REGISTRY.to_json(p))) == p


def test_grid_validation():
    with pytest.raises(ValueError, match="text_at"):
        VideoGrid(2, 2, 2, text_len=4)
    with pytest.raises(ValueError, match="positive int"):
        VideoGrid(0, 2, 2)
    g = VideoGrid(2, 3, 4, text_len=5, text_at="prefix")
    assert (g.seq_len, g.video_start, g.text_start) == (29, 5, 0)


def test_block_mask_exact_on_random_grids():
    """Blocks spanning several whole frames, single rows, odd tails: box test == token truth."""
    g = torch.Generator().manual_seed(0)
    specs = ["window3d:t=1,h=0,w=1", "frame_periodic:h=1,w=0,every=3", "window1d:frames=0.3", "stripes:tokens=3|-2",
             "radial:decay=0.7,min_band=0.5", "sta:t=3,h=1,w=3,tile=2|3|2"]
    for _ in range(12):
        t, h, w = (int(x) for x in torch.randint(1, 7, (3,), generator=g))
        text = int(torch.randint(0, 9, (1,), generator=g))
        grid = VideoGrid(t, h, w, text, ("prefix", "suffix")[text % 2] if text else "none")
        bm, bn = (int(2 ** x) for x in torch.randint(0, 6, (2,), generator=g))
        for spec in specs:
            tok = token_pattern_mask(parse_pattern(spec), grid)
            s = grid.seq_len
            pad = torch.zeros(-(-s // bm) * bm, -(-s // bn) * bn, dtype=torch.bool)
            pad[:s, :s] = tok
            expect = pad.view(-1, bm, pad.shape[1] // bn, bn).any(3).any(1)
            assert torch.equal(build_block_mask_for_pattern(parse_pattern(spec), grid, bm, bn), expect), (spec, grid, bm, bn)


def test_mask_build_is_fast_at_real_size():
    import time

    grid = VideoGrid(33, 45, 80, text_len=240, text_at="suffix")  # HunyuanVideo 720p, 129 frames
    t0 = time.perf_counter()
    m = build_block_mask([parse_pattern("window3d:t=2,h=6,w=10"), parse_pattern("frame_periodic:h=3,w=3")], grid)
    assert time.perf_counter() - t0 < 10.0  # CPU; a GPU build is milliseconds
    assert 0 < m.density() < 1


@pytest.mark.parametrize("spec", ["radial:decay=0.5", "sta:t=3,h=3,w=3,tile=2|4|4", "sta:t=1,h=1,w=3,tile=1|2|3"])
@pytest.mark.parametrize("grid", [VideoGrid(5, 6, 7), VideoGrid(4, 8, 8, text_len=5, text_at="suffix")])
def test_peer_patterns_exact_in_the_tiled_order(spec, grid):
    """In the tiled order too, a block is visited iff some token pair in it is allowed (odd grids, text)."""
    from vdit_accel.orders.static import block_mask_for_order, static_order
    from vdit_accel.orders.spec import Tiled

    p = parse_pattern(spec)
    for block in (16, 32):
        perm = static_order(Tiled(), grid, block)
        tok = _token_mask_with_text(p, grid)[perm][:, perm]  # the token mask in the tiled order
        s = grid.seq_len
        pad = torch.zeros(-(-s // block) * block, -(-s // block) * block, dtype=torch.bool)
        pad[:s, :s] = tok
        expect = pad.view(-1, block, pad.shape[1] // block, block).any(3).any(1)
        assert torch.equal(block_mask_for_order(p, grid, perm, block, block), expect), (spec, grid, block)


def _token_mask_with_text(p, grid):
    out = torch.zeros(grid.seq_len, grid.seq_len, dtype=torch.bool)
    vs, vl = grid.video_start, grid.video_len
    out[vs : vs + vl, vs : vs + vl] = _brute_force(p, grid)
    ts = grid.text_start
    out[ts : ts + grid.text_len] = True
    out[:, ts : ts + grid.text_len] = True
    return out


def test_sta_in_its_tiled_order_visits_whole_tiles_only():
    """STA's point: with the tiled order's own tile, every visited block is a tile the window covers
    entirely (no partly used block), where the same window in raster order wastes most of its blocks."""
    from vdit_accel.orders.static import block_mask_for_order, static_order, tile_shape
    from vdit_accel.orders.spec import Tiled

    grid, block = VideoGrid(6, 8, 16), 32
    tile = tile_shape(grid, block)[:2] + (int(tile_shape(grid, block)[2]),)
    p = parse_pattern(f"sta:t=1,h=3,w=3,tile={'|'.join(map(str, tile))}")
    perm = static_order(Tiled(), grid, block)
    tok = token_pattern_mask(p, grid)[perm][:, perm]
    blocks = block_mask_for_order(p, grid, perm, block, block)
    used = tok.view(grid.seq_len // block, block, grid.seq_len // block, block).float().mean((1, 3))
    assert torch.equal(used[blocks], torch.ones(int(blocks.sum())))  # every visited block fully used
    assert blocks.float().mean() < build_block_mask_for_pattern(p, grid, block, block).float().mean()


def test_radial_density_halves_with_frame_distance():
    """The radial mask's O(n log n) shape at a real grid: far frame pairs are thinned, near ones banded,
    frame 0 is a sink for every query."""
    grid = VideoGrid(21, 30, 52)
    p = parse_pattern("radial")
    bands = p.bands(grid)
    assert bands[0] == 30 * 52 and bands[1] == 30 * 52 // 2 and bands[2] == bands[3] == 30 * 52 // 4
    kept = [d for d in range(1, 21) if bands[d] >= 0]
    assert kept == [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20]  # under 2 rows from d = 8: every 2nd, then 4th
    assert bands[8] == bands[20] == 2 * 52
    m = build_block_mask_for_pattern(p, grid)
    assert m[:, 0].all()  # the first key block (frame 0) is a sink
    assert 0.2 < m.float().mean() < 0.6
