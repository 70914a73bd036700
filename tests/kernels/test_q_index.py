"""The kernel's ``q_index``: queries read and outputs written through a token permutation.

Under the interpreter at odd sizes: for fresh random permutations per (batch, head) (and one shared by
the batch), the indexed kernel's output and LSE equal — bit for bit — the plain kernel run on Q gathered
into the order with its output scattered back, dense and block-sparse, unquantized and fp8 / int8 / int4
(the fp8 / int8 Q tiles are quantized from the same rows; int4 gathers Q before quantizing); and they are
close to the float64 reference. The PyTorch path of ``vdit_accel.attention`` does the same by gathers.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from vdit_accel.attention import attention  # noqa: E402
from vdit_accel.block_mask import BlockMask  # noqa: E402
from vdit_accel.reference import reference_attention  # noqa: E402

_kern = importlib.import_module("vdit_accel.kernels.attention")
if type(_kern._attn_fwd).__name__ != "InterpretedFunction":
    # Imported earlier in this process without TRITON_INTERPRET: rebuild the kernels interpreted.
    importlib.reload(_kern)
_fwd = importlib.import_module("vdit_accel.kernels.attention_fwd")


def _perms(bi, h, s, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.stack([torch.randperm(s, generator=g) for _ in range(h)]) for _ in range(bi)])


def _gather(x, idx):
    b, s, h, d = x.shape
    idx = idx.expand(b, h, s)
    return torch.stack([torch.stack([x[bb, idx[bb, hh], hh] for hh in range(h)], 1) for bb in range(b)])


def _scatter(y, idx):
    b, s, h, d = y.shape
    idx = idx.expand(b, h, s)
    out = torch.empty_like(y)
    for bb in range(b):
        for hh in range(h):
            out[bb, idx[bb, hh], hh] = y[bb, :, hh]
    return out


def _mask(h, s, block, seed):
    g = torch.Generator().manual_seed(seed)
    nb = -(-s // block)
    dense = torch.rand(1, h, nb, nb, generator=g) < 0.5
    dense[:, 0, 0] = False  # an empty query block
    dense[:, 0, -1] = True
    return BlockMask.from_dense(dense, s, block, block)


@pytest.mark.parametrize("s,sparse,dtype,quant,shared", [
    (77, False, torch.float32, None, False), (150, True, torch.float16, None, False),
    (150, True, torch.float16, None, True), (96, True, torch.float16, "fp8", False),
    (130, False, torch.float16, "int8", True), (100, True, torch.float16, "int4", False),
])
def test_indexed_queries_equal_gathered_queries(s, sparse, dtype, quant, shared):
    b, h, d = 2, 3, 32
    g = torch.Generator().manual_seed(s)
    q, k, v = (torch.randn(b, s, h, d, generator=g).to(dtype) for _ in range(3))
    idx = _perms(1 if shared else b, h, s, seed=s + 7)
    mask = _mask(h, s, 32, seed=s + 1) if sparse else None
    kw = {}
    if mask is not None:
        kw = dict(kv_num_blocks=mask.kv_num_blocks, kv_indices=mask.kv_indices, mask_block_m=32, mask_block_n=32)
    cfg = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    out, lse = _fwd.attention_fwd(q, k, v, config=cfg, return_lse=True, quant=quant, q_index=idx.int(), **kw)
    base, base_lse = _fwd.attention_fwd(_gather(q, idx), k, v, config=cfg, return_lse=True, quant=quant, **kw)
    assert torch.equal(out, _scatter(base, idx))
    want_lse = torch.empty_like(base_lse).scatter_(2, idx.expand(b, h, s), base_lse)
    assert torch.equal(lse, want_lse)
    if quant is None:  # and the order changed nothing but where rows sit: the reference on gathered q
        ref = reference_attention(_gather(q, idx).double(), k.double(), v.double(), mask)
        tol = 1e-5 if dtype == torch.float32 else 5e-3
        assert ((_scatter(ref, idx) - out.double()).norm() / ref.norm()).item() <= tol


def test_int64_index_and_out_argument():
    s, h, d = 70, 2, 32
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, s, h, d, generator=g).half() for _ in range(3))
    idx = _perms(1, h, s, seed=4)
    cfg = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    big = torch.zeros(1, s, h + 1, d, dtype=torch.float16)
    _fwd.attention_fwd(q, k, v, config=cfg, q_index=idx, out=big[:, :, 1:])
    base = _fwd.attention_fwd(_gather(q, idx), k, v, config=cfg)
    assert torch.equal(big[:, :, 1:], _scatter(base, idx)) and (big[:, :, 0] == 0).all()


def test_q_index_errors():
    q = torch.randn(1, 40, 2, 32).half()
    for bad in (torch.zeros(1, 2, 39, dtype=torch.int32), torch.zeros(2, 2, 40, dtype=torch.int32),
                torch.zeros(1, 2, 40)):
        with pytest.raises(ValueError, match="q_index"):
            _fwd.attention_fwd(q, q, q, q_index=bad)
        with pytest.raises(ValueError, match="q_index"):
            attention(q, q, q, q_index=bad)


@pytest.mark.parametrize("quant", [None, "int8"])
def test_torch_path_gathers_and_scatters(quant):
    """vdit_accel.attention on the CPU (PyTorch SDPA / the quantized simulation) with q_index."""
    s, h, d = 90, 2, 32
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, s, h, d, generator=g) for _ in range(3))
    if quant:
        q, k, v = q.half(), k.half(), v.half()
    idx = _perms(2, h, s, seed=6)
    mask = _mask(h, s, 32, seed=8)
    out = attention(q, k, v, mask, q_index=idx, quant=quant)
    base = attention(_gather(q, idx), k, v, mask, quant=quant)
    torch.testing.assert_close(out, _scatter(base, idx), rtol=0, atol=0)
    if quant is None:
        out, lse = attention(q, k, v, mask, q_index=idx, return_lse=True)
        base, base_lse = attention(_gather(q, idx), k, v, mask, return_lse=True)
        assert torch.equal(lse, torch.empty_like(base_lse).scatter_(2, idx, base_lse))
