"""The quantization recipes (vdit_accel.quant): packing, per-mode error bounds, smoothing, and the
simulated quantized attention against float64 on video-DiT-like data (the accuracy targets)."""

import pytest
import torch

from vdit_accel import attention
from vdit_accel.attention import head_runs
from vdit_accel.block_mask import BlockMask
from vdit_accel.quant import (
    QuantMode,
    FP8_MAX,
    dequantize_rows,
    dit_like_qkv,
    pack_int4,
    quantize_rows_reference,
    quantize_v_reference,
    reference_quant_attention,
    unpack_int4,
)
from vdit_accel.reference import reference_attention


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _rel(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _cos(out, ref):
    return torch.nn.functional.cosine_similarity(out.double().flatten(), ref.double().flatten(), dim=0).item()


def test_int4_pack_round_trip():
    x = torch.randint(-8, 8, (3, 5, 16), dtype=torch.int8)
    packed = pack_int4(x)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 8)
    assert torch.equal(unpack_int4(packed), x)
    assert packed[0, 0, 0] == ((int(x[0, 0, 0]) & 0xF) | ((int(x[0, 0, 1]) & 0xF) << 4))
    with pytest.raises(ValueError, match="even head_dim"):
        pack_int4(x[..., :3])


@pytest.mark.parametrize("mode,group", [("int8", 32), ("int4", 1), ("fp8", 32), ("fp8", 1)])
def test_quantized_rows_error_bound(mode, group):
    """Every element within half a step (integers) or e4m3's relative rounding of its group's scale."""
    x = _x(2, 77, 3, 16) * torch.linspace(0.1, 10, 16)  # channels of very different size
    data, scale, _ = quantize_rows_reference(x, mode, group, 96, scale_mul=0.5)
    assert scale.shape == (2, 3, 96 // group)
    back = dequantize_rows(data, scale, mode)[:, :, :77] / 0.5  # (B, H, S, D)
    xt = x.transpose(1, 2)
    step = scale.repeat_interleave(group, 2)[:, :, :77, None] / 0.5
    err = (back - xt).abs()
    if mode == "fp8":
        tol = xt.abs() * 2.0**-4 + step * 2.0**-9
    else:
        tol = step * 0.5
    assert (err <= tol + 1e-6).all()
    if mode != "fp8":
        assert unpack_int4(data).abs().max() <= 7 if mode == "int4" else data.abs().max() <= 127
    assert (dequantize_rows(data, scale, mode)[:, :, 77:] == 0).all()  # padding rows are zero


def test_v_transposed_per_channel():
    v = _x(2, 30, 2, 8) * torch.tensor([1, 10, 100, 1000, 1, 1, 1, 1.0])
    data, scale = quantize_v_reference(v, 64)
    assert data.dtype == torch.float8_e4m3fn and data.shape == (2, 2, 8, 64) and scale.shape == (2, 2, 8)
    back = (data.float() * scale[..., None])[..., :30].permute(0, 3, 1, 2)
    assert _rel(back, v) < 0.04 and data.float().abs().max() <= FP8_MAX


def test_k_smoothing_leaves_attention_unchanged():
    q, k, v = _x(1, 50, 2, 8, seed=1), _x(1, 50, 2, 8, seed=2) + 20.0, _x(1, 50, 2, 8, seed=3)
    ks = k - k.mean(1, keepdim=True)
    torch.testing.assert_close(reference_attention(q.double(), ks.double(), v.double()),
                               reference_attention(q.double(), k.double(), v.double()))


@pytest.mark.parametrize("s,d,block_n", [(1000, 64, 64), (777, 128, 128)])
def test_accuracy_targets_on_dit_like_data(s, d, block_n):
    """The quantization issue's targets, at the H100 defaults' tiles: fp8 and int8 rel. L2 <= 2e-2 and
    cosine >= 0.999, int4 <= 5e-2 (measured: fp8 1.6-1.8%, int8 1.2-1.4%, int4 4.0-4.5%)."""
    q, k, v = dit_like_qkv(1, s, 2, d, seed=s, dtype=torch.float16)
    exact = reference_attention(q.double(), k.double(), v.double())
    for mode, bound in (("fp8", 2e-2), ("int8", 2e-2), ("int4", 5e-2)):
        out = reference_quant_attention(q, k, v, mode, block_m=128, block_n=block_n)
        assert _rel(out, exact) <= bound, mode
        assert _cos(out, exact) >= (0.999 if mode != "int4" else 0.998), mode
    with pytest.raises(ValueError, match="unknown quantization mode"):
        reference_quant_attention(q, k, v, "int2")


def test_head_runs():
    assert head_runs(None, 3) == ((0, 3, None),)
    assert head_runs("fp8", 2) == ((0, 2, "fp8"),) and head_runs("fp8", 2)[0].mode is QuantMode.FP8
    assert head_runs(["fp8", "fp8", None, "int8"], 4) == ((0, 2, "fp8"), (2, 3, None), (3, 4, "int8"))
    with pytest.raises(ValueError, match="3 modes for 2 heads"):
        head_runs(["fp8"] * 3, 2)
    with pytest.raises(ValueError, match="unknown quantization mode"):
        head_runs("fp4", 2)


def test_attention_per_head_modes_on_cpu():
    """Per-head modes: each head as if run alone in its mode (CPU: the simulation), sparse mask sliced."""
    q, k, v = dit_like_qkv(1, 300, 3, 64, seed=5)
    dense = torch.rand(1, 3, 3, 3, generator=torch.Generator().manual_seed(0)) < 0.7
    dense[..., 0] = True
    mask = BlockMask.from_dense(dense, 300, 128, 128)
    modes = ["int8", None, "fp8"]
    out = attention(q, k, v, mask, quant=modes)
    for h, mode in enumerate(modes):
        sub = mask.head_slice(h, h + 1)
        alone = attention(q[:, :, h : h + 1], k[:, :, h : h + 1], v[:, :, h : h + 1], sub, quant=mode)
        torch.testing.assert_close(out[:, :, h : h + 1], alone)
    exact = reference_attention(q.double(), k.double(), v.double(), mask)
    assert _rel(out, exact) < 2e-2
    assert _rel(out[:, :, 1], exact[:, :, 1]) < 1e-5  # the unquantized head is exact (fp32 SDPA)


def test_accuracy_families():
    from vdit_accel.quant import ACCURACY_FAMILIES, accuracy_inputs

    base = accuracy_inputs("normal", 1, 40, 2, 16, seed=3, dtype=torch.float32)
    for family in ACCURACY_FAMILIES:
        q, k, v = accuracy_inputs(family, 1, 40, 2, 16, seed=3, dtype=torch.float32)
        assert torch.equal(v, base[2])
        moved = (k - base[1]).abs().amax((0, 1, 2)) > 1  # channels changed
        assert moved.sum() == (4 if family in ("k-bias", "k-outlier") else 0)
        if family == "peaked":
            torch.testing.assert_close(q - 0.5 * k, q - 0.5 * base[1])
            assert not torch.equal(q, base[0])
    with pytest.raises(ValueError, match="accuracy family"):
        accuracy_inputs("uniform", 1, 8, 1, 8)


def test_sage1_simulation_is_int8_attention():
    """SageAttention 1.0.6's recipe simulated: close to exact attention (int8 Q·K, fp16 P·V), not equal to it,
    and blind to a per-channel K offset (its K smoothing)."""
    from vdit_accel.quant import accuracy_inputs, reference_sage1_attention

    q, k, v = accuracy_inputs("normal", 1, 300, 2, 64, seed=1)
    exact = reference_attention(q.double(), k.double(), v.double())
    sage = reference_sage1_attention(q, k, v)
    assert sage.dtype == q.dtype and 2e-3 < _rel(sage, exact) < 3e-2
    qb, kb, vb = accuracy_inputs("k-bias", 1, 300, 2, 64, seed=1)
    assert _rel(reference_sage1_attention(qb, kb, vb), exact) < 3e-2


def test_int8_within_sage1_accuracy_on_the_four_families():
    """The issue-22 target at a small size (S=515, D=128, bf16): int8 (INT8 Q·K per tile, 16-bit P·V)
    within 1.25x SageAttention 1.0.6's relative error on every family; fp8 (e4m3 Q·K and P·V) is not,
    and int8's old recipe (e4m3 P·V) was not either (benchmarks/results/quant-accuracy-cpu-*.json)."""
    from vdit_accel.kernels.attention_configs import gpu_tiles
    from vdit_accel.quant import ACCURACY_FAMILIES, accuracy_inputs, reference_sage1_attention

    bm, bn = gpu_tiles(128, "int8")
    for family in ACCURACY_FAMILIES:
        q, k, v = accuracy_inputs(family, 1, 515, 1, 128, seed=0)
        exact = reference_attention(q.double(), k.double(), v.double())
        sage = _rel(reference_sage1_attention(q, k, v), exact)
        assert _rel(reference_quant_attention(q, k, v, "int8", block_m=bm, block_n=bn), exact) <= 1.25 * sage, family
        old = reference_quant_attention(q, k, v, "int8", block_m=bm, block_n=bn, recipe=dict(pv="fp8"))
        if family != "k-outlier":  # there e4m3's relative precision nearly pays for itself
            assert _rel(old, exact) > 1.25 * sage, family
            assert _rel(reference_quant_attention(q, k, v, "fp8", block_m=bm, block_n=bn), exact) > 1.25 * sage
