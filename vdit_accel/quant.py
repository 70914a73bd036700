"""Quantized attention: the recipes and their PyTorch reference (what the quantized kernels compute).

Modes (``QUANT_MODES``), SageAttention-style:

- ``fp8``: Q and (smoothed) K in e4m3 with one scale per (batch, head, block of rows); P in e4m3 (P <= 1,
  scaled by 448); V in e4m3 with one scale per (batch, head, channel); fp32 accumulation.
- ``int8``: Q and K in int8 per block, K smoothed first (its mean over the sequence subtracted per
  channel: softmax ignores a per-row constant, and the outlier channels that real DiTs have in K go
  away); P·V as in ``fp8``.
- ``int4``: Q and K in int4 (-7..7) per block, two to a byte along head_dim, with K smoothed as
  above and Q smoothed per block (its block mean subtracted; the product of that mean with K is added
  back to the scores exactly, as a per-key bias); P·V as in ``fp8``. On GPUs without INT4 tensor
  cores (Hopper) the int4 values are multiplied on the INT8 tensor cores.

The softmax scale (and log2 e for an exp2 softmax) can be folded into Q's scale: dequantised scores
are ``(q_int . k_int) * q_scale * k_scale``.

Status (2026-11-22): the reference only; the quantized kernels are not written yet. Measured with
this reference on diffuse Gaussian Q/K/V (S=777, D=64, blocks of 128): P in e4m3 alone costs 2.4%
relative L2, V in e4m3 alone 2.5%, Q·K in e4m3 3.9%, in int8 1.3%, in int4 24% (per-block scales):
the accuracy targets of the quantization issue need finer int4 groups and peaked (real) attention.
"""

from __future__ import annotations

import math

import torch

QUANT_MODES = ("fp8", "int8", "int4")
FP8_MAX = 448.0  # largest finite e4m3 value
INT_MAX = {"int8": 127.0, "int4": 7.0}


def smooth_k(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K minus its mean over the sequence, per (batch, head, channel). ``k``: (B, S, H, D).

    Returns ``(k - mean, mean)``; scores change by a per-query constant, which softmax ignores."""
    mean = k.float().mean(1, keepdim=True)
    return (k.float() - mean), mean


def quantize_per_block(x: torch.Tensor, block: int, mode: str, scale_mul: float = 1.0):
    """Quantize (B, S, H, D) with one scale per (batch, head, block of ``block`` rows).

    Returns ``(data, scale)``: ``data`` (B, S, H, D) in float8_e4m3fn (fp8) or int8 (int8 and int4,
    int4 values in -7..7, unpacked), ``scale`` float32 (B, H, ceil(S / block)) such that
    ``x ≈ data * scale * scale_mul⁻¹`` — ``scale_mul`` (e.g. the softmax scale) is folded into it.
    """
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; use one of {QUANT_MODES}")
    b, s, h, d = x.shape
    nblk = -(-s // block)
    xf = x.float()
    pad = nblk * block - s
    if pad:
        xf = torch.cat([xf, xf.new_zeros(b, pad, h, d)], 1)
    xb = xf.view(b, nblk, block, h, d)
    amax = xb.abs().amax(dim=(2, 4)).clamp_min(1e-12)  # (B, nblk, H)
    qmax = FP8_MAX if mode == "fp8" else INT_MAX[mode]
    scale = amax / qmax
    scaled = xb / scale[:, :, None, :, None]
    if mode == "fp8":
        data = scaled.to(torch.float8_e4m3fn)
    else:
        data = scaled.round().clamp(-qmax, qmax).to(torch.int8)
    data = data.view(b, nblk * block, h, d)[:, :s]
    return data, (scale * scale_mul).permute(0, 2, 1).contiguous()  # (B, H, nblk)


def dequantize_per_block(data: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """Inverse of :func:`quantize_per_block` (float32)."""
    s = data.shape[1]
    rows = torch.arange(s, device=data.device) // block
    return data.float() * scale[:, :, rows].permute(0, 2, 1)[..., None]


def pack_int4(data: torch.Tensor) -> torch.Tensor:
    """int8 values in -8..7, (..., D) with D even → uint8 (..., D/2): element 2i in the low nibble."""
    if data.shape[-1] % 2:
        raise ValueError("int4 packing needs an even head_dim")
    u = (data.to(torch.int16) & 0xF).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 (..., D/2) → int8 (..., D), sign-extended."""
    lo = (packed & 0xF).to(torch.int16)
    hi = (packed >> 4).to(torch.int16)
    out = torch.stack([lo, hi], -1).flatten(-2)
    return torch.where(out > 7, out - 16, out).to(torch.int8)


def quantize_v_per_channel(v: torch.Tensor):
    """V (B, S, H, D) → (e4m3 data, float32 scale (B, H, D)) with one scale per channel."""
    amax = v.float().abs().amax(1).clamp_min(1e-12)  # (B, H, D)
    scale = amax / FP8_MAX
    return (v.float() / scale[:, None]).to(torch.float8_e4m3fn), scale


def reference_quant_attention(q, k, v, mode: str, block_mask=None, block_m: int = 128, block_n: int = 128,
                              scale: float | None = None) -> torch.Tensor:
    """What the quantized kernels compute, simulated in float64 from the quantized operands.

    (B, S, H, D) in and out (q's dtype). P is quantized to e4m3 after the (exact) online softmax's
    exponentials, i.e. as ``exp(s - rowmax) * 448`` rounded to e4m3; the row sum uses unquantized P
    (as the kernels do). ``block_mask`` as in :func:`vdit_accel.reference.reference_attention`.
    """
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; use one of {QUANT_MODES}")
    b, s, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    ks, _ = smooth_k(k)
    bias = None
    qs = q.float()
    if mode == "int4":
        nblk = -(-s // block_m)
        rows = torch.arange(s, device=q.device) // block_m
        counts = torch.bincount(rows, minlength=nblk).clamp_min(1).to(qs.dtype)
        qmean = torch.zeros(b, nblk, h, d, device=q.device).index_add_(1, rows, qs) / counts[None, :, None, None]
        qs = qs - qmean[:, rows]
        # The smoothed-away part, q_mean . k_j, added back exactly per (query block, key).
        bias = torch.einsum("bmhd,bjhd->bhmj", qmean.double(), ks.double())[:, :, rows] * scale  # (B,H,S,S)
    qd, qsc = quantize_per_block(qs, block_m, mode)
    kd, ksc = quantize_per_block(ks, block_n, mode)
    qf = dequantize_per_block(qd, qsc, block_m).double()
    kf = dequantize_per_block(kd, ksc, block_n).double()
    vd, vsc = quantize_v_per_channel(v)
    scores = torch.einsum("bihd,bjhd->bhij", qf, kf) * scale
    if bias is not None:
        scores = scores + bias
    if block_mask is not None:
        scores = scores.masked_fill(~block_mask.token_mask().to(q.device), float("-inf"))
    m = scores.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).min)
    p = torch.exp(scores - m)
    l = p.sum(-1, keepdim=True)
    p8 = (p * FP8_MAX).to(torch.float8_e4m3fn).double() / FP8_MAX
    out = torch.einsum("bhij,bjhd->bihd", p8, vd.double()) * vsc.double()[:, None]
    out = out / l.permute(0, 2, 1, 3).clamp_min(1e-300)
    return torch.nan_to_num(out, nan=0.0).to(q.dtype)
