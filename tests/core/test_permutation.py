import pytest
import torch

from vdit_accel import BlockMask, VideoGrid
from vdit_accel.patterns import build_block_mask_for_pattern, parse_pattern, token_pattern_mask
from vdit_accel.permutation import block_mask_for_order, blocks_for_recall, inverse, raster_order, tiled_order
from vdit_accel.reference import reference_attention


@pytest.mark.parametrize("grid", [VideoGrid(3, 5, 7), VideoGrid(4, 6, 10, text_len=9, text_at="prefix"),
                                  VideoGrid(2, 4, 6, text_len=5, text_at="suffix")])
def test_tiled_order_is_a_permutation_with_text_kept_whole(grid):
    perm = tiled_order(grid, (2, 2, 4))  # edge tiles of every size: 3, 5 and 7 are not multiples
    assert torch.equal(perm.sort().values, torch.arange(grid.seq_len))
    assert torch.equal(inverse(perm)[perm], torch.arange(grid.seq_len))
    text = torch.arange(grid.text_start, grid.text_start + grid.text_len)
    assert torch.equal(perm[grid.text_start : grid.text_start + grid.text_len], text)
    # The first tile of the video comes first, whole: its tokens are a compact (t, h, w) box.
    v0 = perm[grid.video_start : grid.video_start + 16] - grid.video_start
    t, h, w = v0 // (grid.h * grid.w), (v0 // grid.w) % grid.h, v0 % grid.w
    assert t.max() < 2 and h.max() < 2 and w.max() < 4


@pytest.mark.parametrize("spec", ["window3d:t=1,h=1,w=2", "frame_periodic:h=1,w=1", "stripes:frames=0", "skip"])
def test_block_mask_under_an_order_is_exact(spec):
    grid = VideoGrid(3, 5, 7, text_len=6, text_at="suffix")
    p = parse_pattern(spec)
    tok = token_pattern_mask(p, grid)
    for perm in (raster_order(grid), tiled_order(grid, (1, 2, 4))):
        blocks = block_mask_for_order(p, grid, perm, 16, 8)
        tp = tok[perm][:, perm]
        s = grid.seq_len
        pad = torch.zeros(-(-s // 16) * 16, -(-s // 8) * 8, dtype=torch.bool)
        pad[:s, :s] = tp
        assert torch.equal(blocks, pad.view(-1, 16, pad.shape[1] // 8, 8).any(3).any(1))
    assert torch.equal(block_mask_for_order(p, grid, raster_order(grid), 16, 8), build_block_mask_for_pattern(p, grid, 16, 8))


def test_dense_attention_is_order_invariant_and_sparse_runs_permuted():
    grid = VideoGrid(3, 4, 6, text_len=5, text_at="prefix")
    s = grid.seq_len
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, s, 2, 16, generator=g, dtype=torch.float64) for _ in range(3))
    perm = tiled_order(grid, (2, 2, 2))
    out = reference_attention(q[:, perm], k[:, perm], v[:, perm])[:, inverse(perm)]
    torch.testing.assert_close(out, reference_attention(q, k, v))
    # Sparse under the order: the same token pattern, attended in permuted blocks.
    p = parse_pattern("window3d:t=1,h=1,w=1")
    blocks = block_mask_for_order(p, grid, perm, 8, 8)
    mask = BlockMask.from_dense(blocks.expand(1, 2, *blocks.shape), s, 8, 8)
    out = reference_attention(q[:, perm], k[:, perm], v[:, perm], mask)[:, inverse(perm)]
    assert torch.isfinite(out).all()


def test_blocks_for_recall():
    probs = torch.eye(8)  # each token attends itself: one block per query block
    assert blocks_for_recall(probs, torch.arange(8), 4) == 0.5
    uniform = torch.full((8, 8), 1 / 8)
    assert blocks_for_recall(uniform, torch.arange(8), 4) == 1.0


def test_semantic_order_on_clustered_heads():
    """k-means orders make a clustered head's keys contiguous: >= 1.3x fewer blocks than tiles."""
    from vdit_accel.permutation import semantic_order
    from vdit_accel.sparsity_search.synthetic import planted_head

    grid = VideoGrid(4, 8, 32, text_len=7, text_at="suffix")
    video = VideoGrid(4, 8, 32)
    g = torch.Generator().manual_seed(0)
    q, k, _ = planted_head("clustered", video, 32, g, clusters=12)
    # Add text rows/keys (random) to exercise "text kept whole".
    q = torch.cat([q, torch.randn(7, 32, generator=g)])
    k = torch.cat([k, torch.randn(7, 32, generator=g)])
    qp, qc = semantic_order(q, grid, 12)
    kp, _ = semantic_order(k, grid, 12)
    for perm in (qp, kp):
        assert torch.equal(perm.sort().values, torch.arange(grid.seq_len))
        assert torch.equal(perm[-7:], torch.arange(grid.video_len, grid.seq_len))
    probs = torch.softmax(q.double() @ k.double().T / 32**0.5, -1)
    tiled = blocks_for_recall(probs, tiled_order(grid, (1, 4, 8)), 32)
    semantic = blocks_for_recall(probs, qp, 32, key_perm=kp)
    assert tiled / semantic >= 1.3, (tiled, semantic)
    # Warm start from the previous step's centroids gives the same clusters in no more iterations.
    qp2, _ = semantic_order(q, grid, 12, iters=1, init=qc)
    assert blocks_for_recall(probs, qp2, 32, key_perm=kp) <= semantic + 1e-9


def test_segment_key_order_needs_no_output_inverse_and_packs_heavy_keys():
    from vdit_accel.permutation import segment_key_order

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
