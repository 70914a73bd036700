import pytest
import torch

from vdit_accel import BlockMask, VideoGrid
from vdit_accel.orders import (ORDERS, CallPlan, Semantic, Tiled, attend_planned, block_density, block_mask_for_order,
                               block_mass, blocks_for_recall, format_order, gather_tokens, gather_tokens_many, inverse,
                               kmeans, parse_order, plan_call, raster_order, scatter_tokens, segment_key_order,
                               semantic_block_mask, semantic_orders, tile_shape, tiled_order)
from vdit_accel.patterns import build_block_mask_for_pattern, parse_pattern, token_pattern_mask
from vdit_accel.reference import reference_attention


def _coords(perm, grid):
    v = perm - grid.video_start
    return v // (grid.h * grid.w), (v // grid.w) % grid.h, v % grid.w


def _attend(q, k, v, num, idx, block, scale, q_index=None):
    """The reference in float64, with ``vdit_accel.attention``'s ``q_index`` contract: query position i
    is token q_index[b, h, i]; the output comes back in q's own order."""
    mask = None if num is None else BlockMask(num, idx, q.shape[1], block, block)
    if q_index is None:
        return reference_attention(q, k, v, mask, scale)
    b, s, h, _ = q.shape
    idx_q = q_index.expand(b, h, s).transpose(1, 2)[..., None].expand(b, s, h, q.shape[-1])  # [B, S, H, D]
    out = reference_attention(q.gather(1, idx_q), k, v, mask, scale)
    return torch.empty_like(out).scatter_(1, idx_q, out)


@pytest.mark.parametrize("grid", [VideoGrid(3, 5, 7), VideoGrid(4, 6, 10, text_len=9, text_at="prefix"),
                                  VideoGrid(5, 7, 9, text_len=5, text_at="suffix"), VideoGrid(1, 3, 50)])
def test_tiled_order_is_a_permutation_of_compact_blocks_with_text_kept_whole(grid):
    block = 16
    perm = tiled_order(grid, block)  # edge tiles of every size: no side is a multiple of the tile
    assert torch.equal(perm.sort().values, torch.arange(grid.seq_len))
    assert torch.equal(perm[inverse(perm)], torch.arange(grid.seq_len))
    text = torch.arange(grid.text_start, grid.text_start + grid.text_len)
    pos = inverse(perm)
    assert torch.equal(pos[text], text)  # text stays where it was, whole
    video = perm[grid.video_start : grid.video_start + grid.video_len]
    tt, th, tw = tile_shape(grid, block)
    volume = {"tiled": [], "raster": []}
    for name, order in (("tiled", video), ("raster", torch.arange(grid.video_len) + grid.video_start)):
        for b0 in range(0, grid.video_len, block):
            t, h, w = _coords(order[b0 : b0 + block], grid)
            ext = (t.max() - t.min() + 1, h.max() - h.min() + 1, w.max() - w.min() + 1)
            volume[name].append(int(ext[0] * ext[1] * ext[2]))
            if name == "tiled":  # one tile, or touching tiles where a strip or slab ends (serpentine order)
                assert ext[0] <= 2 * tt and ext[1] <= 2 * th, (b0, ext)
    assert sum(volume["tiled"]) <= sum(volume["raster"])


def test_tiled_blocks_are_exact_tiles_when_the_grid_is_a_multiple():
    grid, block = VideoGrid(6, 16, 24), 128
    assert tile_shape(grid, block) == (2, 8, 8)
    perm = tiled_order(grid, block)
    boxes = set()
    for b0 in range(0, grid.video_len, block):
        t, h, w = _coords(perm[b0 : b0 + block], grid)
        assert (t.max() - t.min(), h.max() - h.min(), w.max() - w.min()) == (1, 7, 7)
        assert t.min() % 2 == 0 and h.min() % 8 == 0 and w.min() % 8 == 0  # a regular lattice
        boxes.add((int(t.min()), int(h.min()), int(w.min())))
    assert len(boxes) == grid.video_len // block


def test_tile_shape_choices():
    big = VideoGrid(21, 30, 52)
    assert tile_shape(big, 128) == (2, 8, 8)
    assert tile_shape(big, 64) == (2, 4, 8)
    assert tile_shape(big, 256) == (2, 8, 16)
    assert tile_shape(big, 16) == (1, 4, 4)
    assert tile_shape(big, 128, t=1, h=8) == (1, 8, 16)
    assert tile_shape(VideoGrid(1, 6, 40), 128) == (1, 6, 128 / 6)  # capped by the grid; ends mid-column
    with pytest.raises(ValueError, match="more than one block"):
        tile_shape(big, 16, t=4, h=8)


def test_window3d_in_tiles_is_exactly_block_aligned():
    """Radii that are whole multiples of the tile's sides: the block mask visits exactly the key tiles
    within that many tiles of the query tile, and every key of a visited block is reached by some query
    of the query block (sliding-tile attention; nothing wasted). In raster order it is not."""
    grid, block = VideoGrid(6, 16, 24), 128
    tt, th, tw = tile_shape(grid, block)
    p = parse_pattern(f"window3d:t={tt},h={th},w={2 * tw}")
    tok = token_pattern_mask(p, grid)
    for perm, aligned in ((tiled_order(grid, block), True), (raster_order(grid), False)):
        blocks = block_mask_for_order(p, grid, perm, block, block)
        tp = tok[perm][:, perm].view(-1, block, tok.shape[0]).any(1)  # [Mb, S]: keys some query of the block reaches
        tight = all(tp[m].view(-1, block)[n].all() for m, n in blocks.nonzero().tolist())
        assert tight == aligned
    # The tile-level window: query tile (a, b, c) visits key tiles within (1, 1, 2) tiles of it.
    perm = tiled_order(grid, block)
    t, h, w = _coords(perm, grid)
    tile = torch.stack([t // tt, h // th, w // tw], 1).view(-1, block, 3)[:, 0]  # [Mb, 3]
    expected = ((tile[:, None] - tile[None, :]).abs() <= torch.tensor([1, 1, 2])).all(-1)
    assert torch.equal(block_mask_for_order(p, grid, perm, block, block), expected)


@pytest.mark.parametrize("spec", ["window3d:t=1,h=1,w=2", "frame_periodic:h=1,w=1", "stripes:frames=0", "skip"])
def test_block_mask_under_an_order_is_exact(spec):
    grid = VideoGrid(3, 5, 7, text_len=6, text_at="suffix")
    p = parse_pattern(spec)
    tok = token_pattern_mask(p, grid)
    for perm in (raster_order(grid), tiled_order(grid, 16), tiled_order(grid, 8, t=1, h=2)):
        blocks = block_mask_for_order(p, grid, perm, 16, 8)
        tp = tok[perm][:, perm]
        s = grid.seq_len
        pad = torch.zeros(-(-s // 16) * 16, -(-s // 8) * 8, dtype=torch.bool)
        pad[:s, :s] = tp
        assert torch.equal(blocks, pad.view(-1, 16, pad.shape[1] // 8, 8).any(3).any(1))
    assert torch.equal(block_mask_for_order(p, grid, raster_order(grid), 16, 8), build_block_mask_for_pattern(p, grid, 16, 8))


def test_order_specs():
    assert parse_order(None) is None and parse_order("raster") is None and format_order(None) == "raster"
    assert parse_order("tiled") == Tiled() == parse_order({"kind": "tiled"}) and Tiled().t is None
    o = parse_order("semantic:top_p=0.9,k_clusters=32")
    assert o == Semantic(k_clusters=32, top_p=0.9) and (o.q_clusters, o.iters, o.refresh) == (None, 0, 1)
    assert parse_order(format_order(o)) == o and parse_order(o) is o and o.dynamic and not Tiled().dynamic
    assert ORDERS.to_json(o) == {"kind": "semantic", "k_clusters": 32, "top_p": 0.9} and parse_order(ORDERS.to_json(o)) == o
    for bad, match in [("spiral", "unknown order kind"), ("tiled:t=0", "int >= 1"), ("semantic:top_p=1.5", r"\(0, 1\]"),
                       ({"kind": "segment", "width": 3}, "unknown"), (3, "a string or a dict")]:
        with pytest.raises(ValueError, match=match):
            parse_order(bad)


def test_gather_scatter_per_head_round_trip():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 13, 3, 4, generator=g)
    idx = torch.stack([torch.stack([torch.randperm(13, generator=g) for _ in range(3)]) for _ in range(2)])
    y = gather_tokens(x, idx)
    for b in range(2):
        for h in range(3):
            assert torch.equal(y[b, :, h], x[b, idx[b, h], h])
    assert torch.equal(scatter_tokens(y, idx), x)
    one = torch.randperm(13, generator=g)
    assert torch.equal(gather_tokens(x, one), x[:, one]) and torch.equal(scatter_tokens(gather_tokens(x, one), one), x)


def test_dense_attention_is_order_invariant_for_every_kind():
    """Dense attention under any order (per head, Q and K apart, keys only) equals the unpermuted result."""
    grid = VideoGrid(3, 4, 6, text_len=5, text_at="prefix")
    s = grid.seq_len
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, s, 4, 16, generator=g, dtype=torch.float64) for _ in range(3))
    ref = reference_attention(q, k, v)
    orders = [None, parse_order("tiled"), parse_order("semantic:top_p=1,q_clusters=3,k_clusters=5"),
              parse_order("segment:size=20,top_p=1")]
    for frame in (None, parse_order("tiled")):
        qf, kf, vf = q, k, v
        if frame is not None:  # tensors arrive in the tiled frame (permuted once per forward)
            fp = tiled_order(grid, 8)
            qf, kf, vf = q[:, fp], k[:, fp], v[:, fp]
        plan = plan_call(qf, kf, grid, orders, frame, 8, None, {})
        assert plan.q_index.shape == (2, 4, s) and plan.mask.all()  # top_p=1 keeps every block
        out = attend_planned(qf, kf, vf, plan, 8, _attend)
        if frame is not None:
            out = out[:, inverse(fp)]
        torch.testing.assert_close(out, ref)


def test_sparse_tiled_equals_the_token_pattern_in_raster_order():
    """A tiled head with a tile-aligned window3d attends exactly the token pairs of the tile window:
    computed permuted in blocks, it equals raster-order attention with that token mask."""
    grid, block = VideoGrid(4, 8, 16), 64
    tt, th, tw = tile_shape(grid, block)
    p = parse_pattern(f"window3d:t={tt},h={th},w={tw}")
    perm = tiled_order(grid, block)
    blocks = block_mask_for_order(p, grid, perm, block, block)
    s = grid.seq_len
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, s, 2, 16, generator=g, dtype=torch.float64) for _ in range(3))
    plan = plan_call(q, k, grid, [parse_order("tiled")] * 2, None, block, blocks.expand(1, 2, *blocks.shape), {})
    out = attend_planned(q, k, v, plan, block, _attend)
    # The same pairs as a token mask in raster order (blocks of one token).
    pos = inverse(perm)
    tok = blocks[pos[:, None] // block, pos[None, :] // block]
    t, h, w = _coords(torch.arange(s), grid)
    tile = torch.stack([t // tt, h // th, w // tw], 1)
    assert torch.equal(tok, ((tile[:, None] - tile[None, :]).abs() <= 1).all(-1))  # the tile window, exactly
    ref = reference_attention(q, k, v, BlockMask.from_dense(tok.expand(1, 2, s, s), s, 1, 1))
    torch.testing.assert_close(out, ref)


def test_kmeans_recovers_separated_clusters_and_warm_starts():
    g = torch.Generator().manual_seed(2)
    centres = torch.randn(2, 5, 8, generator=g) * 10  # 2 independent problems
    labels = torch.randint(0, 5, (2, 300), generator=g)
    x = centres.gather(1, labels[..., None].expand(2, 300, 8)) + 0.1 * torch.randn(2, 300, 8, generator=g)
    found, cent = kmeans(x, 5, iters=20, sample=120)
    for b in range(2):  # the same partition up to renaming
        pairs = set(zip(found[b].tolist(), labels[b].tolist()))
        assert len(pairs) == len(set(labels[b].tolist()))
    again, cent2 = kmeans(x, 5, iters=0, init=cent)  # warm start, no update: the same labels
    assert torch.equal(again, found) and torch.equal(cent2, cent)
    with pytest.raises(ValueError, match="1 <= k <= rows"):
        kmeans(x, 400)


def test_semantic_plan_clusters_contiguous_text_its_own_kept_cluster():
    from vdit_accel.sparsity_search.synthetic import clustered_head

    video = VideoGrid(4, 8, 16)
    grid = VideoGrid(4, 8, 16, text_len=7, text_at="suffix")
    g = torch.Generator().manual_seed(0)
    qv, kv = clustered_head(video, 6, "scattered", 16.0, 32, g)
    q = torch.cat([qv, torch.randn(7, 32, generator=g)])[None, :, None]  # (1, S, 1, D)
    k = torch.cat([kv, torch.randn(7, 32, generator=g)])[None, :, None]
    plan = semantic_orders(q, k, grid, 8, 12, init_iters=10)
    for perm, bounds, x in ((plan.q_perm, plan.q_bounds, q), (plan.k_perm, plan.k_bounds, k)):
        perm, bounds = perm[0, 0], bounds[0, 0]
        assert torch.equal(perm.sort().values, torch.arange(grid.seq_len))
        assert torch.equal(perm[-7:], torch.arange(grid.video_len, grid.seq_len))  # text in place
        assert bounds[0] == 0 and bounds[-1] == grid.video_len and (bounds.diff() >= 0).all()
        assert len(set(bounds.diff().tolist()) - {0}) > 1  # clusters of different sizes
    # Clusters are contiguous: along the order, the nearest centroid never decreases, and each cluster
    # holds exactly the range its bounds say.
    for perm, bounds, cent, x in ((plan.q_perm, plan.q_bounds, plan.q_centroids, q), (plan.k_perm, plan.k_bounds, plan.k_centroids, k)):
        video = perm[0, 0, : grid.video_len]
        nearest = torch.cdist(x[0, video, 0], cent[0, 0]).argmin(1)
        assert (nearest.diff() >= 0).all()
        assert torch.equal(torch.bincount(nearest, minlength=cent.shape[2]), bounds[0, 0].diff())
    # Most planted groups become one cluster each (k-means from random rows may split or merge a few).
    qc = torch.cdist(qv, plan.q_centroids[0, 0]).argmin(1)
    assert len(set(qc.tolist())) >= 6
    mask = semantic_block_mask(plan, grid, 0.95, 16, 16)[0, 0]
    text_blocks = torch.arange(grid.video_len, grid.seq_len) // 16
    assert mask[text_blocks].all() and mask[:, text_blocks].all()  # text rows and columns always kept
    # The centroid top-p mask keeps most of the true attention mass at a fraction of the blocks.
    mass = block_mass(q[0, :, 0], k[0, :, 0], 16, plan.q_perm[0, 0], plan.k_perm[0, 0])
    recall = (mass * mask).sum(1).mean()
    assert recall > 0.9 and mask.float().mean() < 0.5, (recall, mask.float().mean())
    # Warm start: the previous call's centroids, no update, give the same orders.
    warm = semantic_orders(q, k, grid, 8, 12, iters=0, init=(plan.q_centroids, plan.k_centroids))
    assert torch.equal(warm.q_perm, plan.q_perm) and torch.equal(warm.k_perm, plan.k_perm)
    # Online: each plan's statistics are its tokens' cluster sums and sizes, and the next call (init =
    # plan.warm) starts from their Lloyd update: every centroid the mean of its cluster's tokens.
    for perm, bounds, cent, (sums, counts), x in ((plan.q_perm, plan.q_bounds, plan.q_centroids, plan.q_stats, q),
                                                  (plan.k_perm, plan.k_bounds, plan.k_centroids, plan.k_stats, k)):
        assert torch.equal(counts[0, 0].long(), bounds[0, 0].diff())
        rows = x[0, perm[0, 0], 0]
        ref = torch.stack([rows[lo:hi].float().sum(0) for lo, hi in zip(bounds[0, 0, :-1], bounds[0, 0, 1:])])
        torch.testing.assert_close(sums[0, 0], ref, rtol=1e-5, atol=1e-4)
    online = semantic_orders(q, k, grid, 8, 12, init=plan.warm)
    for cent, (sums, counts), new in ((plan.q_centroids, plan.q_stats, online.q_centroids),
                                      (plan.k_centroids, plan.k_stats, online.k_centroids)):
        want = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], cent)
        torch.testing.assert_close(new, want)


def test_semantic_order_on_clustered_heads_needs_fewer_blocks_than_tiles():
    """k-means orders make a clustered head's keys contiguous: >= 1.3x fewer blocks than tiles."""
    from vdit_accel.sparsity_search.synthetic import clustered_head

    grid = VideoGrid(4, 8, 32)
    g = torch.Generator().manual_seed(0)
    for n, layout, gain in ((12, "scattered", 1.3), (12, "objects", 1.0)):  # objects are local: tiles help too
        q, k = clustered_head(grid, n, layout, 12.0, 32, g)
        plan = semantic_orders(q[None, :, None], k[None, :, None], grid, 16, 24, init_iters=10)
        tp = tiled_order(grid, 32)
        tiled = block_density(q, k, 32, 0.95, tp, tp)
        semantic = block_density(q, k, 32, 0.95, plan.q_perm[0, 0], plan.k_perm[0, 0])
        assert tiled / semantic >= gain, (layout, tiled, semantic)


def test_block_mass_matches_explicit_probabilities():
    g = torch.Generator().manual_seed(4)
    s, d, block = 91, 8, 16  # S not a multiple of the block
    q, k = torch.randn(s, d, generator=g, dtype=torch.float64), torch.randn(s, d, generator=g, dtype=torch.float64)
    qp, kp = torch.randperm(s, generator=g), torch.randperm(s, generator=g)
    probs = torch.softmax(q @ k.T / d**0.5, -1)
    assert block_density(q, k, block, 0.9, qp, kp) == pytest.approx(blocks_for_recall(probs, qp, block, 0.9, kp))
    mass = block_mass(q, k, block, qp, kp, rows=[0, 5])
    p = probs[qp][:, kp]
    expected = torch.nn.functional.pad(p[80:91].mean(0), (0, 5)).view(6, 16).sum(1)  # the short last block
    torch.testing.assert_close(mass[1].double(), expected, rtol=1e-5, atol=1e-6)
    assert blocks_for_recall(torch.eye(8), torch.arange(8), 4) == 0.5
    assert blocks_for_recall(torch.full((8, 8), 1 / 8), torch.arange(8), 4) == 1.0


def test_segment_key_order_needs_no_output_inverse_and_packs_heavy_keys():
    s, seg, block = 256, 64, 16
    g = torch.Generator().manual_seed(3)
    heavy = torch.randperm(s, generator=g)[:24]  # scattered "global" keys every query attends
    logits = torch.randn(s, s, generator=g, dtype=torch.float64) * 0.1
    logits[:, heavy] += 6.0
    probs = torch.softmax(logits, -1)
    importance = probs[::8].sum(0)  # mass from a sample of query rows
    kperm = segment_key_order(importance, seg)
    assert torch.equal(kperm.sort().values, torch.arange(s))
    assert torch.equal(kperm // seg, torch.arange(s) // seg)  # keys never leave their segment
    ident = torch.arange(s)
    assert blocks_for_recall(probs, ident, block, 0.9, key_perm=kperm) < 0.75 * blocks_for_recall(probs, ident, block, 0.9)
    # Keys and values move together, queries do not: the output is already in query order.
    q = torch.randn(1, s, 1, 8, generator=g, dtype=torch.float64)
    k, v = torch.randn(1, s, 1, 8, generator=g, dtype=torch.float64), torch.randn(1, s, 1, 8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(reference_attention(q, k[:, kperm], v[:, kperm]), reference_attention(q, k, v))
    # The runtime plan of a segment head gathers keys only.
    grid = VideoGrid(4, 8, 8)
    plan = plan_call(q, k, grid, [parse_order("segment:size=64,top_p=0.9")], None, block, None, {})
    assert plan.q_index is None and plan.k_index.shape == (1, 1, s)


def test_call_plan_hands_over_moved_kv_once():
    """K and V the plan moved already (on the GPU: beside its query half) go to the first gather_kv of
    those very tensors; any other call gathers."""
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(1, 10, 2, 4, generator=g), torch.randn(1, 10, 2, 4, generator=g)
    idx = torch.stack([torch.randperm(10, generator=g) for _ in range(2)])[None]
    want = gather_tokens_many([k, v], idx)
    fake = (torch.zeros_like(k), torch.zeros_like(v))  # what a plan would hand over: recognisably not a gather
    plan = CallPlan(None, idx, None, None, (k, v, *fake, None))
    assert all(a is b for a, b in zip(plan.gather_kv(k, v), fake))
    assert all(torch.equal(a, b) for a, b in zip(plan.gather_kv(k, v), want))  # once only
    plan = CallPlan(None, idx, None, None, (k, v, *fake, None))
    assert all(torch.equal(a, b) for a, b in zip(plan.gather_kv(k.clone(), v), want))  # other tensors: gathered


def test_refresh_reuses_the_last_plan():
    grid = VideoGrid(2, 4, 8)
    g = torch.Generator().manual_seed(5)
    q, k = (torch.randn(1, grid.seq_len, 2, 8, generator=g) for _ in range(2))
    for spec in ("semantic:refresh=3,q_clusters=4,k_clusters=4", "segment:refresh=3,size=32"):
        o, memory = parse_order(spec), {}
        plans = [plan_call(q + i, k * (i + 1), grid, [o, o], None, 16, None, memory) for i in range(4)]
        assert plans[1].k_index is plans[0].k_index and plans[2].k_index is plans[0].k_index  # calls 2, 3 reuse
        assert plans[3].k_index is not plans[0].k_index  # the 4th plans again
    # With the denoising step known, a plan serves the calls of its step (guidance's two) and of the
    # next refresh - 1 steps; a step back (a new generation) plans again.
    o = parse_order("semantic:q_clusters=4,k_clusters=4,refresh=2")
    memory, steps = {}, [0, 0, 1, 1, 2, 2, 0]
    plans = [plan_call(q + i, k * (i + 1), grid, [o, o], None, 16, None, memory, step=t) for i, t in enumerate(steps)]
    made = [i == 0 or plans[i].k_index is not plans[i - 1].k_index for i in range(len(steps))]
    assert made == [True, False, False, False, True, False, True]
    with pytest.raises(ValueError, match="'refresh' must be an int >= 1"):
        parse_order("semantic:refresh=0")
