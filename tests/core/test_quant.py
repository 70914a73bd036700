import pytest
import torch

from vdit_accel.quant import (
    FP8_MAX,
    dequantize_per_block,
    pack_int4,
    quantize_per_block,
    quantize_v_per_channel,
    reference_quant_attention,
    smooth_k,
    unpack_int4,
)
from vdit_accel.reference import reference_attention


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_int4_pack_round_trip():
    x = torch.randint(-8, 8, (3, 5, 16), dtype=torch.int8)
    packed = pack_int4(x)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 8)
    assert torch.equal(unpack_int4(packed), x)
    assert packed[0, 0, 0] == ((int(x[0, 0, 0]) & 0xF) | ((int(x[0, 0, 1]) & 0xF) << 4))
    with pytest.raises(ValueError, match="even head_dim"):
        pack_int4(x[..., :3])


@pytest.mark.parametrize("mode,bound", [("int8", 0.5 / 127), ("int4", 0.5 / 7), ("fp8", 2.0**-4)])
def test_per_block_quantization_error_bound(mode, bound):
    x = _x(2, 77, 3, 16) * torch.linspace(0.1, 10, 16)  # channels of very different size
    data, scale = quantize_per_block(x, 32, mode)
    assert scale.shape == (2, 3, 3) and data.shape == x.shape
    back = dequantize_per_block(data, scale, 32)
    rows = torch.arange(77) // 32
    amax = x.abs().view(2, 77, 3, 16).amax(-1)  # per row; the block amax bounds every element's error
    block_amax = torch.zeros(2, 3, 3).index_reduce_(2, rows, amax.transpose(1, 2), "amax", include_self=False)
    err = (back - x).abs()
    step = block_amax[:, :, rows].transpose(1, 2)[..., None]  # the block's amax, broadcast per element
    if mode == "fp8":  # e4m3: relative rounding (3 mantissa bits) for normals, 2^-9 steps below them
        tol = x.abs() * bound + step / FP8_MAX * 2.0**-9
    else:  # integers: half a step of amax / qmax
        tol = step * bound
    assert (err <= tol + 1e-6).all()
    if mode != "fp8":
        assert data.abs().max() <= (127 if mode == "int8" else 7)


def test_k_smoothing_leaves_attention_unchanged():
    q, k, v = _x(1, 50, 2, 8, seed=1), _x(1, 50, 2, 8, seed=2) + 20.0, _x(1, 50, 2, 8, seed=3)
    ks, mean = smooth_k(k)
    assert mean.shape == (1, 1, 2, 8) and ks.mean(1).abs().max() < 1e-4
    torch.testing.assert_close(reference_attention(q.double(), ks.double(), v.double()),
                               reference_attention(q.double(), k.double(), v.double()))


def test_v_per_channel_scale():
    v = _x(2, 30, 2, 8) * torch.tensor([1, 10, 100, 1000, 1, 1, 1, 1.0])
    data, scale = quantize_v_per_channel(v)
    assert data.dtype == torch.float8_e4m3fn and scale.shape == (2, 2, 8)
    rel = ((data.float() * scale[:, None] - v).norm() / v.norm()).item()
    assert rel < 0.04


@pytest.mark.parametrize("mode,tol", [("fp8", 0.08), ("int8", 0.06), ("int4", 0.4)])
def test_reference_quant_attention_is_close(mode, tol):
    """The simulated quantized attention stays within the error each format allows on Gaussian data
    (measured: fp8 5.3%, int8 3.8%, int4 24%); the strict targets wait for the kernels' issue."""
    q, k, v = _x(1, 99, 2, 32, seed=4), _x(1, 99, 2, 32, seed=5) + 5.0, _x(1, 99, 2, 32, seed=6)
    ref = reference_attention(q.double(), k.double(), v.double())
    out = reference_quant_attention(q, k, v, mode, block_m=32, block_n=32).double()
    assert ((out - ref).norm() / ref.norm()).item() < tol
    with pytest.raises(ValueError, match="unknown quantization mode"):
        reference_quant_attention(q, k, v, "int2")
