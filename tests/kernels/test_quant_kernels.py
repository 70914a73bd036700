"""The quantizers (kernels/quantize.py) and the quantized attention kernel against their PyTorch twins
(vdit_accel.quant), on the CPU interpreter at odd sizes.

The interpreter rounds fp32 -> e4m3 wrongly (ties away, and a carry into the exponent is dropped);
the kernels then round in fp32 arithmetic first (``_to_e4m3(..., EMULATE=True)``), exactly. On the
GPU the hardware conversion is used: benchmarks/attention.py --quant-checks compares it with the
simulation there.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from vdit_accel.block_mask import BlockMask  # noqa: E402
from vdit_accel.quant import (  # noqa: E402
    dit_like_qkv,
    quantize_rows_reference,
    quantize_v_reference,
    reference_quant_attention,
)

_qz = importlib.import_module("vdit_accel.kernels.quantize")
_kern = importlib.import_module("vdit_accel.kernels.attention")
if type(_kern._attn_fwd).__name__ != "InterpretedFunction":  # imported earlier without TRITON_INTERPRET
    _qz = importlib.reload(_qz)
    importlib.reload(_kern)
_fwd = importlib.import_module("vdit_accel.kernels.attention_fwd")


def _rel(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _assert_same_codes(got, want):
    """Bit-exact, up to values that sit on a rounding tie where the interpreter's fp32 scaling and
    PyTorch's differ by an ulp: at most 0.1% of the elements, one e4m3 / integer step apart."""
    assert got.dtype == want.dtype and got.shape == want.shape
    diff = got.view(torch.uint8) != want.view(torch.uint8)
    assert diff.float().mean() <= 1e-3
    if diff.any():
        a, b = got[diff].float(), want[diff].float()
        assert ((a - b).abs() <= torch.maximum(a.abs(), b.abs()) * 0.125 + 1).all()


def test_channel_stats():
    x = torch.randn(2, 301, 3, 24, generator=torch.Generator().manual_seed(0)) * 3 + 1
    mean, mx, mn = _qz.channel_stats(x)
    torch.testing.assert_close(mean, x.mean(1), atol=1e-5, rtol=1e-5)
    assert torch.equal(mx, x.amax(1)) and torch.equal(mn, x.amin(1))


@pytest.mark.parametrize("mode,group,smooth,group_mean", [
    ("fp8", 32, False, False), ("fp8", 64, True, False), ("int8", 32, True, False), ("int4", 1, True, True),
])
def test_quantize_rows_matches_reference(mode, group, smooth, group_mean):
    q, k, _ = dit_like_qkv(2, 137, 3, 64, seed=1, dtype=torch.float16)
    x = k if smooth else q
    mean = x.float().mean(1) if smooth else None
    chan_mul = torch.rand(2, 3, 64, generator=torch.Generator().manual_seed(2)) + 0.5 if mode == "int4" else None
    got = _qz.quantize_rows(x, mode, group, 192, 0.3, mean=mean, group_mean=group_mean, rows=32, chan_mul=chan_mul)
    want = quantize_rows_reference(x, mode, group, 192, 0.3, mean=mean, group_mean=group_mean, rows=32,
                                   chan_mul=chan_mul)
    if mode == "int4":
        assert torch.equal(got[0], want[0])
    else:
        _assert_same_codes(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=0)
    if group_mean:
        torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown quantization mode"):
        _qz.quantize_rows(x, "int2", group, 192)
    with pytest.raises(ValueError, match="s_pad=100"):
        _qz.quantize_rows(x, mode, 32, 100)


def test_quantize_v_matches_reference():
    v = torch.randn(2, 137, 3, 96, generator=torch.Generator().manual_seed(3)).half() * 4
    _, mx, mn = _qz.channel_stats(v)
    data, scale = _qz.quantize_v(v, torch.maximum(mx.abs(), mn.abs()), 192)
    want, want_scale = quantize_v_reference(v, 192)
    assert data.shape == (2, 3, 96, 192)
    _assert_same_codes(data, want)
    torch.testing.assert_close(scale, want_scale)


def _random_mask(h, s, block, seed):
    g = torch.Generator().manual_seed(seed)
    nb = -(-s // block)
    dense = torch.rand(1, h, nb, nb, generator=g) < 0.5
    dense[:, 0, 0] = False  # an empty query block
    dense[:, 0, -1] = True  # a full one, tail included
    return BlockMask.from_dense(dense, s, block, block)


@pytest.mark.parametrize("mode", ["fp8", "int8", "int4"])
@pytest.mark.parametrize("s,d,sparse", [(137, 64, False), (150, 96, True)])
def test_quantized_kernel_matches_simulation(mode, s, d, sparse):
    """The kernel computes what the recipe says: within rounding of the float64 simulation (the
    quantization error itself is ~1-6e-2 here), empty query blocks give zeros and lse = -inf."""
    q, k, v = dit_like_qkv(2, s, 2, d, seed=s + d, dtype=torch.float16)
    cfg = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    mask = _random_mask(2, s, 64, seed=s) if sparse else None
    kw = {}
    if mask is not None:
        kw = dict(kv_num_blocks=mask.kv_num_blocks, kv_indices=mask.kv_indices, mask_block_m=64, mask_block_n=64)
    out, lse = _fwd.attention_fwd(q, k, v, config=cfg, quant=mode, return_lse=True, **kw)
    sim = reference_quant_attention(q, k, v, mode, mask, block_m=32, block_n=32)
    assert out.dtype == q.dtype and not out.isnan().any()
    assert _rel(out, sim) < 2e-3
    if mask is not None:
        empty = mask.to_dense()[0, 0, 0, :].sum() == 0
        assert empty and (out[:, :64, 0] == 0).all() and torch.isneginf(lse[:, 0, :64]).all()
    # The LSE is the unquantized one (K smoothing's shift added back) up to the scores' quantization.
    from vdit_accel.reference import reference_attention

    _, ref_lse = reference_attention(q.double(), k.double(), v.double(), mask, return_lse=True)
    fin = ~torch.isneginf(ref_lse)
    # (Without the shift added back it is off by ~10 here.)
    assert (lse[fin] - ref_lse[fin]).abs().max() <= {"fp8": 0.3, "int8": 0.15, "int4": 1.0}[mode]


def test_quantized_kernel_writes_into_out_and_refuses_bad_input():
    q, k, v = dit_like_qkv(1, 100, 4, 64, seed=9, dtype=torch.float16)
    cfg = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    out = torch.zeros_like(q)
    res = _fwd.attention_fwd(q[:, :, 1:3], k[:, :, 1:3], v[:, :, 1:3], config=cfg, quant="fp8", out=out[:, :, 1:3])
    assert res.data_ptr() == out[:, :, 1:3].data_ptr()
    assert (out[:, :, 0] == 0).all() and (out[:, :, 3] == 0).all() and out[:, :, 1:3].abs().sum() > 0
    with pytest.raises(ValueError, match="unknown quantization mode"):
        _fwd.attention_fwd(q, k, v, config=cfg, quant="fp4")
    with pytest.raises(ValueError, match="float32"):
        _fwd.attention_fwd(q.float(), k.float(), v.float(), config=cfg, quant="fp8")
    with pytest.raises(ValueError, match="out must be"):
        _fwd.attention_fwd(q, k, v, config=cfg, out=torch.empty(1, 100, 4, 32, dtype=q.dtype))


@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_fused_kv_quantization_matches_reference(mode):
    """fp8 / int8 K and V in two launches: the same codes and scales as the PyTorch twins, K smoothed
    by the mean of every 8th token."""
    _, k, v = dit_like_qkv(2, 301, 3, 96, seed=4, dtype=torch.float16)
    k8, k_scale, k_mean, v8, v_scale = _qz._quantize_kv_fused(k, v, mode, 64, 320)
    mean = k.float()[:, :: _qz.SMOOTH_ROW_STEP].mean(1)
    torch.testing.assert_close(k_mean, mean, rtol=1e-5, atol=1e-5)
    want_k, want_scale, _ = quantize_rows_reference(k, mode, 64, 320, mean=k_mean)
    _assert_same_codes(k8, want_k)
    torch.testing.assert_close(k_scale, want_scale, rtol=1e-6, atol=0)
    want_v, want_v_scale = quantize_v_reference(v, 320)
    _assert_same_codes(v8, want_v)
    torch.testing.assert_close(v_scale, want_v_scale)
