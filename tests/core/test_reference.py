import pytest
import torch
import torch.nn.functional as F

from vdit_accel import BlockMask, attention
from vdit_accel.reference import reference_attention


def _rand(b, s, h, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, h, d, generator=g, dtype=dtype) for _ in range(3)]


def test_dense_matches_sdpa():
    q, k, v = _rand(2, 37, 3, 16)
    out, lse = reference_attention(q, k, v, return_lse=True)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(out, ref)
    s = torch.einsum("bihd,bjhd->bhij", q, k) / 4.0
    torch.testing.assert_close(lse, torch.logsumexp(s, -1).float())


def test_block_mask_applied_exactly():
    b, s, h, d, bm, bn = 2, 45, 3, 8, 16, 8
    q, k, v = _rand(b, s, h, d, seed=1)
    g = torch.Generator().manual_seed(2)
    blocks = torch.rand(b, h, -(-s // bm), -(-s // bn), generator=g) < 0.5
    blocks[0, 1, 1] = False  # one query block attends nothing
    mask = BlockMask.from_dense(blocks, s, bm, bn)
    out, lse = reference_attention(q, k, v, mask, return_lse=True)
    tok = mask.token_mask()  # [B, H, S, S]
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * d**-0.5
    scores = scores.masked_fill(~tok, float("-inf"))
    p = torch.softmax(scores, -1).nan_to_num(0.0)
    expect = torch.einsum("bhij,bjhd->bihd", p, v)
    torch.testing.assert_close(out, expect)
    rows = slice(bm, 2 * bm)
    assert torch.all(out[0, rows, 1] == 0) and torch.all(lse[0, 1, rows] == float("-inf"))
    assert torch.isfinite(out).all()


def test_public_attention_cpu_paths():
    q, k, v = _rand(1, 50, 2, 16, dtype=torch.float32, seed=3)
    dense = attention(q, k, v)
    torch.testing.assert_close(dense, reference_attention(q, k, v), atol=1e-5, rtol=1e-5)
    full = BlockMask.full(50, 2, 16, 16)
    torch.testing.assert_close(attention(q, k, v, full), dense, atol=1e-5, rtol=1e-5)
    blocks = torch.rand(1, 2, 4, 4, generator=torch.Generator().manual_seed(5)) < 0.5
    blocks[0, 1, 2] = False  # a query block that attends nothing
    sparse = BlockMask.from_dense(blocks, 50, 16, 16)
    torch.testing.assert_close(attention(q, k, v, sparse), reference_attention(q, k, v, sparse), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\(B, S, H, D\)"):
        attention(q, k[:, :10], v)


def test_block_mask_validation():
    with pytest.raises(ValueError, match="needs Mb="):
        BlockMask(torch.zeros(1, 1, 3, dtype=torch.int32), torch.zeros(1, 1, 3, 3, dtype=torch.int32), 100, 16, 16)
    with pytest.raises(ValueError, match="int32"):
        BlockMask(torch.zeros(1, 1, 1), torch.zeros(1, 1, 1, 1), 10, 16, 16)
    # Padding past the count may repeat a listed index without erasing it.
    padded = BlockMask(torch.tensor([[[2]]], dtype=torch.int32), torch.tensor([[[[0, 3, 0, 0]]]], dtype=torch.int32), 64, 64, 16)
    assert padded.to_dense().tolist() == [[[[True, False, False, True]]]]
    m = BlockMask.full(100, 2, 32, 16)
    assert m.density() == 1.0 and m.num_q_blocks == 4 and m.num_kv_blocks == 7
