"""attention_fwd (Triton, dense and block-sparse) against the float64 reference, on the CPU interpreter.

The interpreter garbles bf16, so these run fp16 and fp32; bf16 is checked on the GPU by
benchmarks/attention.py.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from vdit_accel.block_mask import BlockMask  # noqa: E402
from vdit_accel.reference import reference_attention  # noqa: E402

_kern = importlib.import_module("vdit_accel.kernels.attention")
if type(_kern._attn_fwd).__name__ != "InterpretedFunction":
    # Imported earlier in this process without TRITON_INTERPRET: rebuild the kernels interpreted.
    importlib.reload(_kern)
_mod = importlib.import_module("vdit_accel.kernels.attention_configs")  # the autotune cache lives there
attention_fwd = importlib.import_module("vdit_accel.kernels.attention_fwd").attention_fwd

TOL = {torch.float16: 5e-3, torch.float32: 1e-4}


def _cfg(block_m, block_n):
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=1)


def _qkv(b, s, h, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, h, d, generator=g).to(dtype) for _ in range(3)]


def _random_mask(bm, h, s, block_m, block_n, seed):
    """Per-head random block lists: head 0 has an empty query block and a full one (tail included),
    the last head is empty everywhere."""
    g = torch.Generator().manual_seed(seed)
    mb, nb = -(-s // block_m), -(-s // block_n)
    dense = torch.rand(bm, h, mb, nb, generator=g) < 0.5
    dense[:, 0, 0] = False
    dense[:, 0, -1] = True
    dense[:, -1] = False
    return BlockMask.from_dense(dense, s, block_m, block_n)


def _rel_l2(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _check(q, k, v, block_mask=None, config=None, scale=None):
    mask_args = {}
    if block_mask is not None:
        mask_args = dict(
            kv_num_blocks=block_mask.kv_num_blocks, kv_indices=block_mask.kv_indices,
            mask_block_m=block_mask.block_m, mask_block_n=block_mask.block_n,
        )
    out, lse = attention_fwd(q, k, v, **mask_args, scale=scale, return_lse=True, config=config)
    ref, ref_lse = reference_attention(q.double(), k.double(), v.double(), block_mask, scale=scale, return_lse=True)

    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert _rel_l2(out, ref) <= TOL[q.dtype], _rel_l2(out, ref)

    # LSE: -inf exactly where the reference has it, close elsewhere.
    ref_empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), ref_empty)
    lse_tol = 1e-3 if q.dtype == torch.float16 else 1e-4
    torch.testing.assert_close(lse[~ref_empty], ref_lse[~ref_empty], atol=lse_tol, rtol=0)
    # Rows that attend nothing are exactly zero.
    empty_rows = ref_empty.transpose(1, 2)  # (B, S, H)
    assert (out[empty_rows] == 0).all()
    return out, lse, ref_empty


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("s", [77, 150])
def test_dense(dtype, d, s):
    q, k, v = _qkv(2, s, 2, d, dtype, seed=s + d)
    _, _, empty = _check(q, k, v, config=_cfg(32, 32))
    assert not empty.any()


@pytest.mark.parametrize("s", [64, 96])
def test_dense_even_s(s):
    # S a multiple of BLOCK_N: the masked tail step is compiled out.
    q, k, v = _qkv(2, s, 2, 64, torch.float32, seed=s)
    _check(q, k, v, config=_cfg(32, 32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("mask_batch", [1, 2])
@pytest.mark.parametrize(
    "s, mask_blocks, tiles",
    [
        (150, (64, 64), (32, 32)),  # 2 query tiles per mask block, 2 key sub-blocks per mask block
        (77, (32, 32), (16, 16)),
        (96, (64, 64), (32, 32)),  # S % BLOCK_N == 0 but the last mask key block is half empty
        (130, (32, 64), (32, 16)),  # 4 sub-blocks per mask key block, tail of 2 keys
    ],
)
def test_sparse(dtype, mask_batch, s, mask_blocks, tiles):
    q, k, v = _qkv(2, s, 3, 64, dtype, seed=s)
    bm = _random_mask(mask_batch, 3, s, *mask_blocks, seed=s + mask_batch)
    _, _, empty = _check(q, k, v, bm, config=_cfg(*tiles))
    assert empty[:, -1].all() and empty.any() and not empty.all()


def test_head_dim_96():
    q, k, v = _qkv(2, 77, 2, 96, torch.float16, seed=96)
    _check(q, k, v, config=_cfg(32, 32))
    _check(q, k, v, _random_mask(2, 2, 77, 32, 32, seed=1), config=_cfg(32, 32))


def test_fused_qkv_views_and_scale():
    # q, k, v sliced out of one (B, S, 3, H, D) tensor: token stride 3*H*D, not H*D.
    b, s, h, d = 2, 100, 2, 64
    qkv = torch.randn(b, s, 3, h, d, generator=torch.Generator().manual_seed(7)).to(torch.float16)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    _check(q, k, v, config=_cfg(32, 32), scale=0.2)
    _check(q, k, v, _random_mask(1, h, s, 64, 64, seed=3), config=_cfg(32, 32))


def test_default_config_and_no_lse():
    q, k, v = _qkv(1, 70, 2, 64, torch.float32, seed=11)
    bm = _random_mask(1, 2, 70, 64, 64, seed=11)
    out = attention_fwd(q, k, v, bm.kv_num_blocks, bm.kv_indices, 64, 64)
    assert isinstance(out, torch.Tensor)
    ref = reference_attention(q.double(), k.double(), v.double(), bm)
    assert _rel_l2(out, ref) <= TOL[torch.float32]


def test_full_mask_equals_dense():
    q, k, v = _qkv(2, 77, 2, 64, torch.float32, seed=5)
    full = BlockMask.full(77, 2, 32, 32)
    sparse = attention_fwd(q, k, v, full.kv_num_blocks, full.kv_indices, 32, 32, config=_cfg(32, 32))
    dense = attention_fwd(q, k, v, config=_cfg(32, 32))
    torch.testing.assert_close(sparse, dense, atol=1e-6, rtol=0)


# -- validation --------------------------------------------------------------------------------


def test_rejects_bad_inputs():
    q, k, v = _qkv(1, 40, 2, 64, torch.float32, seed=0)
    with pytest.raises(ValueError, match="same shape"):
        attention_fwd(q, k.transpose(1, 2), v)  # (B, H, S, D) passed as k
    with pytest.raises(ValueError, match="4-D"):
        attention_fwd(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="one dtype"):
        attention_fwd(q, k.half(), v)
    with pytest.raises(ValueError, match="stride 1"):
        qt = q.transpose(-1, -2).contiguous().transpose(-1, -2)
        attention_fwd(qt, k, v)
    with pytest.raises(ValueError, match="head_dim 12 is not supported"):
        x = torch.randn(1, 40, 2, 12)
        attention_fwd(x, x, x)
    with pytest.raises(ValueError, match="not supported"):
        x = torch.randn(1, 40, 2, 512)
        attention_fwd(x, x, x)
    with pytest.raises(ValueError, match="dtype"):
        x = torch.randn(1, 40, 2, 64, dtype=torch.float64)
        attention_fwd(x, x, x)


def test_rejects_bad_masks():
    q, k, v = _qkv(2, 77, 2, 64, torch.float32, seed=0)
    bm = _random_mask(1, 2, 77, 32, 32, seed=0)
    num, idx = bm.kv_num_blocks, bm.kv_indices
    with pytest.raises(ValueError, match="both kv_num_blocks and kv_indices"):
        attention_fwd(q, k, v, kv_num_blocks=num)
    with pytest.raises(ValueError, match="int32"):
        attention_fwd(q, k, v, num.long(), idx, 32, 32)
    with pytest.raises(ValueError, match=r"kv_num_blocks must have shape \[Bm, H, Mb\]"):
        attention_fwd(q, k, v, num, idx, 64, 32)  # Mb is 3 for 32-token blocks, 2 for 64
    with pytest.raises(ValueError, match=r"kv_indices must have shape"):
        attention_fwd(q, k, v, num, idx[..., :2], 32, 32)
    with pytest.raises(ValueError, match="batch dim"):
        attention_fwd(q, k, v, num.expand(3, -1, -1), idx.expand(3, -1, -1, -1), 32, 32)
    with pytest.raises(ValueError, match=r"kv_num_blocks must have shape"):
        attention_fwd(q, k, v, num[:, :1], idx[:, :1], 32, 32)  # one head's mask for two heads
    with pytest.raises(ValueError, match="must divide mask_block_m"):
        attention_fwd(q, k, v, num, idx, 32, 32, config=_cfg(64, 32))
    with pytest.raises(ValueError, match="must divide mask_block_n"):
        attention_fwd(q, k, v, num, idx, 32, 32, config=_cfg(32, 64))
    with pytest.raises(ValueError, match="exactly the keys"):
        attention_fwd(q, k, v, config=dict(BLOCK_M=32, BLOCK_N=32))


@pytest.mark.parametrize("sparse", [False, True])
def test_tma_loads(sparse):
    """K/V through tensor descriptors: same function, tails zero-filled by the descriptor."""
    pytest.importorskip("triton.tools.tensor_descriptor")
    b, s, h, d = 2, 77, 2, 64
    qkv = torch.randn(b, s, 3, h, d, generator=torch.Generator().manual_seed(4)).to(torch.float16)
    q, k, v = qkv.unbind(2)
    mask = _random_mask(2, h, s, 32, 32, seed=6) if sparse else None
    _check(q, k, v, mask, config=dict(_cfg(32, 32), tma=True))


def test_autotune_on_cpu_uses_cache_or_default(tmp_path, monkeypatch):
    """Under the interpreter autotune times nothing: it falls back to the default, and a cached
    choice (written by an earlier GPU run) is read back and used."""
    import json

    monkeypatch.setenv("VDIT_AUTOTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(_mod, "_autotuned", {})
    q, k, v = _qkv(1, 77, 2, 64, torch.float32, seed=9)
    ref = reference_attention(q.double(), k.double(), v.double())
    out = attention_fwd(q, k, v, config="autotune")
    assert _rel_l2(out, ref) <= TOL[torch.float32]
    key = f"cpu|{q.dtype}|1x77x2x64|dense|128x128"
    (tmp_path / f"autotune-triton{_mod.triton.__version__}.json").write_text(
        json.dumps({key: dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)}))
    monkeypatch.setattr(_mod, "_autotuned", {})
    assert _rel_l2(attention_fwd(q, k, v, config="autotune"), ref) <= TOL[torch.float32]
    assert _mod._autotuned[key]["BLOCK_M"] == 16
    with pytest.raises(ValueError, match="'autotune'"):
        attention_fwd(q, k, v, config="fast")


def test_autotune_sweep_picks_fastest_and_caches(tmp_path, monkeypatch):
    """The tuning loop itself (timer faked: the interpreter's times mean nothing): every candidate
    runs and is checked, the fastest is kept, written to the cache file and reused."""
    import json

    import triton.testing

    monkeypatch.setenv("VDIT_AUTOTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(_mod, "_autotuned", {})
    monkeypatch.setattr(_mod, "_can_time", lambda q: True)
    seen = []

    def fake_bench(fn, **kw):
        out = fn()
        seen.append(out)
        return 0.5 if len(seen) == 2 else 1.0  # the second candidate "wins"

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    q, k, v = _qkv(1, 40, 1, 64, torch.float32, seed=12)
    mask = _random_mask(1, 1, 40, 128, 64, seed=2)
    mask.kv_num_blocks[:] = 1  # keep one block per row: small and non-empty
    ref = reference_attention(q.double(), k.double(), v.double(), mask)
    out = attention_fwd(q, k, v, mask.kv_num_blocks, mask.kv_indices, mask_block_m=128, mask_block_n=64,
                        config="autotune")
    assert _rel_l2(out, ref) <= TOL[torch.float32]
    assert all(_rel_l2(o, ref) <= TOL[torch.float32] for o in seen)  # every candidate computed it right
    (key, choice), = _mod._autotuned.items()
    assert key.endswith("|sparse|128x64") and choice == _mod.AUTOTUNE_CANDIDATES[64][1]
    assert len(seen) >= 3
    assert json.loads((tmp_path / f"autotune-triton{_mod.triton.__version__}.json").read_text()) == _mod._autotuned
