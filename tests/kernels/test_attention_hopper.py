"""The Hopper Gluon kernel (kernels/attention_hopper.py) and its place behind the launcher.

On the CPU: the kernel's twin (kernels/attention_hopper_twin.py: its partitions, mbarrier protocol, tiles
and arithmetic in PyTorch, on random interleavings) against the float64 reference at odd S, batch 2,
empty query blocks, per-head masks, q_index, LSE; and the launcher's choice of back end. On an sm_90 GPU
(skipped elsewhere): the kernel itself against the reference and the twin, the same cases, bf16 and fp16.
Its sm_90 compilation (triton 3.6 and the installed one) is in test_compile_sm90.py.
"""

import importlib
import logging

import pytest
import torch

from vdit_accel.block_mask import BlockMask
from vdit_accel.kernels.attention_hopper_twin import hopper_twin
from vdit_accel.reference import reference_attention

_fwd = importlib.import_module("vdit_accel.kernels.attention_fwd")


def _rel(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _qkv(b, s, h, d, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, h, d, generator=g).to(device=device, dtype=dtype) for _ in range(3)]


def _perms(bi, h, s, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.stack([torch.randperm(s, generator=g) for _ in range(h)]) for _ in range(bi)])


def _gather(x, idx):
    idx = idx.long().expand(x.shape[0], x.shape[2], x.shape[1])
    return torch.stack([torch.stack([x[b, idx[b, h], h] for h in range(x.shape[2])], 1) for b in range(x.shape[0])])


def _scatter(y, idx):
    idx = idx.long().expand(y.shape[0], y.shape[2], y.shape[1])
    out = torch.empty_like(y)
    for b in range(y.shape[0]):
        for h in range(y.shape[2]):
            out[b, idx[b, h], h] = y[b, :, h]
    return out


def _mask(bm, h, s, block, seed, block_n=None):
    """Per-head random lists; head 0: an empty query block and a full one (tail included); last head empty."""
    block_n = block_n or block
    g = torch.Generator().manual_seed(seed)
    mb, nb = -(-s // block), -(-s // block_n)
    dense = torch.rand(bm, h, mb, nb, generator=g) < 0.5
    dense[:, 0, 0] = False
    dense[:, 0, -1] = True
    dense[:, -1] = False
    return BlockMask.from_dense(dense, s, block, block_n)


def _expected(q, k, v, mask, q_index):
    """float64 reference (out, lse) for the kernel's contract, q_index included (Q gathered, out scattered)."""
    qq = q if q_index is None else _gather(q, q_index)
    ref, lse = reference_attention(qq.double(), k.double(), v.double(), mask, return_lse=True)
    if q_index is not None:
        ref = _scatter(ref, q_index)
        lse = torch.empty_like(lse).scatter_(2, q_index.long().expand_as(lse).to(lse.device), lse)
    return ref, lse


def _check(out, lse, ref, ref_lse, tol):
    assert out.shape == ref.shape and not out.isnan().any() and not lse.isnan().any()
    assert _rel(out, ref) <= tol, _rel(out, ref)
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse).cpu(), empty.cpu())
    torch.testing.assert_close(lse[~empty].double(), ref_lse[~empty].double(), atol=2e-3, rtol=0)
    assert (out[empty.transpose(1, 2)] == 0).all()


# Twin tiles: small, so that small inputs visit several CTAs, key blocks and ring wrap-arounds.
TWIN = dict(block_m=16, block_n=32)


@pytest.mark.parametrize("s,sparse,q_indexed,stages,dtype", [
    (150, False, False, 2, torch.float16), (97, False, False, 3, torch.float32), (150, True, False, 2, torch.float16),
    (173, True, True, 2, torch.float16), (128, True, False, 2, torch.float32), (61, False, True, 2, torch.float16),
])
def test_twin_matches_reference(s, sparse, q_indexed, stages, dtype):
    """Odd S (tails in the last key block and the last CTA), batch 2, per-head masks with empty query
    blocks and an empty head, q_index (one order per batch and head), LSE; three interleavings each."""
    b, h, d = 2, 3, 32
    q, k, v = _qkv(b, s, h, d, dtype, seed=s)
    mask = _mask(b, h, s, 32, seed=s + 1) if sparse else None
    idx = _perms(b, h, s, seed=s + 2).int() if q_indexed else None
    ref, ref_lse = _expected(q, k, v, mask, idx)
    args = (mask.kv_num_blocks, mask.kv_indices, 32, 32) if sparse else ()
    outs = []
    for seed in range(3):
        out, lse = hopper_twin(q, k, v, *args, return_lse=True, q_index=idx, num_stages=stages, seed=seed, **TWIN)
        _check(out, lse, ref, ref_lse, 5e-3 if dtype == torch.float16 else 1e-5)
        outs.append(out)
    assert all(torch.equal(outs[0], o) for o in outs[1:])  # the interleaving changes no bit


def test_twin_mask_blocks_larger_than_tiles():
    """Mask blocks of 64 x 64 over tiles of 2 x 16 query rows and 32 keys (SUB = 2 kernel key blocks a mask
    block, the last one cut by S); a shared (batch 1) mask."""
    b, s, h, d = 2, 170, 2, 16
    q, k, v = _qkv(b, s, h, d, torch.float16, seed=9)
    mask = _mask(1, h, s, 64, seed=10)
    ref, ref_lse = _expected(q, k, v, mask, None)
    out, lse = hopper_twin(q, k, v, mask.kv_num_blocks, mask.kv_indices, 64, 64, return_lse=True, seed=4, **TWIN)
    _check(out, lse, ref, ref_lse, 5e-3)


def test_twin_refuses_tiles_that_straddle_mask_blocks():
    q = torch.zeros(1, 64, 1, 16)
    mask = _mask(1, 1, 64, 16, seed=0)
    with pytest.raises(ValueError, match="block_m"):
        hopper_twin(q, q, q, mask.kv_num_blocks, mask.kv_indices, 16, 16, **TWIN)


# -- the launcher's choice ----------------------------------------------------------------------------


def test_backend_choice_on_cpu(monkeypatch, caplog):
    q = torch.zeros(1, 64, 2, 64, dtype=torch.float16)
    monkeypatch.setenv("VDIT_ATTENTION_BACKEND", "triton")
    assert _fwd.backend_for(q, q, q) == "triton"
    monkeypatch.setenv("VDIT_ATTENTION_BACKEND", "gluon")
    with pytest.raises(ValueError, match="cannot take this call: not a CUDA device"):
        _fwd.backend_for(q, q, q)
    monkeypatch.setenv("VDIT_ATTENTION_BACKEND", "cuda")
    with pytest.raises(ValueError, match="VDIT_ATTENTION_BACKEND"):
        _fwd.backend_for(q, q, q)
    monkeypatch.setenv("VDIT_ATTENTION_BACKEND", "auto")
    monkeypatch.setattr(_fwd, "_logged", set())
    with caplog.at_level(logging.INFO, logger="vdit_accel"):
        assert _fwd.backend_for(q, q, q) == "triton"
        assert _fwd.backend_for(q, q, q) == "triton"
    said = [r.getMessage() for r in caplog.records if "portable Triton kernel" in r.getMessage()]
    assert len(said) == 1 and "not a CUDA device" in said[0]  # once per reason


def test_hopper_reasons(monkeypatch):
    """What sends a call on an sm_90 GPU to the Triton kernel (device facts stubbed: no GPU here)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(_fwd, "_gluon_import_error", lambda: None)

    class FakeCuda(torch.Tensor):
        @property
        def device(self):
            return torch.device("cuda", 0)

    def t(*shape, dtype=torch.bfloat16):
        return torch.zeros(*shape, dtype=dtype).as_subclass(FakeCuda)

    q = t(1, 256, 2, 128)
    reason = lambda x=q, quant=None, config=None, mask=None, mm=128, mn=128: _fwd._hopper_reason(  # noqa: E731
        x, x, x, mask, mm, mn, quant, config)
    assert reason() is None
    assert "head_dim 96" in reason(t(1, 256, 2, 96))
    assert "float32" in reason(t(1, 256, 2, 64, dtype=torch.float32))
    assert "quant=fp8" in reason(quant="fp8")
    assert "config" in reason(config={"BLOCK_M": 64})
    assert "mask blocks (64, 128)" in reason(mask=torch.zeros(1), mm=64)
    assert "16-byte" in reason(t(1, 256, 2, 129)[..., :128])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "not Hopper" in reason()


# -- on the GPU -----------------------------------------------------------------------------------------

_sm90 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
gpu = pytest.mark.skipif(not _sm90, reason="needs an sm_90 (Hopper) GPU")


@gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("s,sparse,q_indexed,mask_m,mask_n", [
    (1000, False, False, 0, 0), (777, True, False, 128, 128), (1000, True, True, 128, 128), (333, False, True, 0, 0),
    (1024, False, False, 0, 0), (901, True, False, 256, 256), (700, True, False, 128, 64),
])
def test_gluon_kernel_on_gpu(monkeypatch, d, dtype, s, sparse, q_indexed, mask_m, mask_n):
    """The Gluon kernel against float64 (tolerance: twice PyTorch's own error at the dtype, at least 1e-2 x
    that for bf16) and against the twin run with the kernel's own tiles."""
    monkeypatch.setenv("VDIT_ATTENTION_BACKEND", "gluon")
    b, h = 2, 3
    qkv = torch.randn(b, s, 3, h, d, device="cuda", dtype=dtype, generator=torch.Generator("cuda").manual_seed(s))
    q, k, v = qkv.unbind(2)  # fused-qkv views: strided (B, S, H, D)
    mask = None
    if sparse:
        mask = _mask(b, h, s, mask_m, seed=s, block_n=mask_n).to("cuda")
    idx = _perms(b, h, s, seed=s + 2).int().cuda() if q_indexed else None
    args = (mask.kv_num_blocks, mask.kv_indices, mask_m, mask_n) if sparse else ()
    assert _fwd.backend_for(q, k, v, mask.kv_num_blocks if sparse else None, mask_m, mask_n) == "gluon"
    out, lse = _fwd.attention_fwd(q, k, v, *args, return_lse=True, q_index=idx)
    ref, ref_lse = _expected(q, k, v, mask, idx)
    torch_low = reference_attention(q if idx is None else _gather(q, idx), k, v, mask, compute_dtype=dtype)
    torch_err = _rel(torch_low if idx is None else _scatter(torch_low, idx), ref)
    _check(out, lse, ref, ref_lse, max(2 * torch_err, 1e-2))
    twin, twin_lse = hopper_twin(q.cpu(), k.cpu(), v.cpu(), *(a.cpu() if torch.is_tensor(a) else a for a in args),
                                 return_lse=True, q_index=None if idx is None else idx.cpu(),
                                 block_m=_fwd._HOPPER_BLOCK_M, block_n=128 if not sparse else min(128, mask_n),
                                 num_stages=_fwd._HOPPER_STAGES[d])
    assert _rel(out.cpu(), twin) < 5e-3  # the same arithmetic, up to exp2 / fma rounding


@gpu
def test_gluon_and_triton_back_ends_agree(monkeypatch):
    """One call through each back end: the same contract (out argument slice, LSE, batch-1 shared mask)."""
    q, k, v = _qkv(2, 1234, 4, 128, torch.bfloat16, seed=3, device="cuda")
    mask = _mask(1, 4, 1234, 128, seed=4).to("cuda")
    res = {}
    for name in ("gluon", "triton"):
        monkeypatch.setenv("VDIT_ATTENTION_BACKEND", name)
        big = torch.zeros(2, 1234, 6, 128, device="cuda", dtype=torch.bfloat16)
        _, lse = _fwd.attention_fwd(q, k, v, mask.kv_num_blocks, mask.kv_indices, return_lse=True, out=big[:, :, 1:5])
        assert (big[:, :, 0] == 0).all() and (big[:, :, 5] == 0).all()
        res[name] = (big[:, :, 1:5].clone(), lse)
    assert _rel(res["gluon"][0], res["triton"][0]) < 1e-2
    fin = ~torch.isneginf(res["triton"][1])
    assert torch.equal(fin, ~torch.isneginf(res["gluon"][1]))
    assert (res["gluon"][1][fin] - res["triton"][1][fin]).abs().max() < 1e-2
