"""Quantized attention: the recipes and their PyTorch reference (what the quantized kernels compute).

Modes (``QUANT_MODES``), SageAttention-style; the kernels are ``kernels/quantize.py`` (quantizers) and
``kernels/attention_fwd.py`` (``quant=``); which tensor gets which grain is ``RECIPES`` there:

- ``fp8``: Q and (smoothed, as for int8) K in e4m3 with one scale per kernel tile of rows (BLOCK_M rows of Q, BLOCK_N of K:
  a scalar per score tile, so the softmax does no extra work); P in e4m3 (P <= 1 after the running
  max, scaled by 448); V in e4m3 with one scale per (batch, head, channel); fp32 accumulation.
- ``int8``: Q and K in int8 per tile, K smoothed first (its mean over the sequence subtracted per
  channel: softmax ignores a per-query constant, and the outlier channels that real DiTs have in K
  go away; any vector would be exact, so the mean is estimated from every 8th token); Q·K on the INT8 tensor cores (int32 accumulation); P·V as in ``fp8``.
- ``int4``: Q and K in int4 (-7..7) with one scale per row (token), two values a byte along head_dim,
  K smoothed as above and Q smoothed per BLOCK_M block (the block mean subtracted; its product with K
  is added back to the scores exactly, as a per-key bias the kernel computes per tile), and the range
  of each channel balanced between Q and K (Q's channel times sqrt(amax K / amax Q), K's divided by
  it: exact for Q·K, SmoothQuant's migration, which lowers int4's error on ``dit_like_qkv``); P·V as in
  ``fp8``. Hopper has no INT4 tensor cores: the kernel unpacks to int8 and multiplies on the INT8
  ones — int4 halves Q/K memory but is not faster than int8 there.

Integers round half up (``floor(x + 0.5)``), clamped to ±qmax; e4m3 rounds to nearest even. The
softmax scale times log2 e is folded into Q's scale: dequantised scores are ``(q . k) * q_scale *
k_scale`` in the log2 domain of the kernel's exp2 softmax.
"""

from __future__ import annotations

import math

import torch

from .kernels.quantize import FP8_MAX, QMAX, RECIPES, SMOOTH_ROW_STEP, QuantMode, balance_factors, padded_len

QUANT_MODES = tuple(QuantMode)  # fp8, int8, int4 (members compare equal to their names)
LOG2E = 1.4426950408889634


def _check_mode(mode) -> QuantMode:
    mode = QuantMode.parse(mode)
    if mode is None:
        raise ValueError(f"a quantization mode is needed here (one of {[m.value for m in QuantMode]}), got None")
    return mode


def quantize_rows_reference(x: torch.Tensor, mode: str, group: int, s_pad: int, scale_mul: float = 1.0,
                            mean: torch.Tensor | None = None, group_mean: bool = False, rows: int = 64,
                            chan_mul: torch.Tensor | None = None):
    """PyTorch twin of :func:`kernels.quantize.quantize_rows` (same arguments, same outputs)."""
    mode = _check_mode(mode)
    b, s, h, d = x.shape
    rows = group if group > 1 else rows
    xf = torch.zeros(b, h, s_pad, d, dtype=torch.float32, device=x.device)
    xf[:, :, :s] = x.float().transpose(1, 2)
    valid = (torch.arange(s_pad, device=x.device) < s)[:, None]
    if mean is not None:
        xf = torch.where(valid, xf - mean[:, :, None, :], 0.0)
    if chan_mul is not None:
        xf = xf * chan_mul[:, :, None, :]
    gmean = None
    if group_mean:
        blocks = xf.view(b, h, s_pad // rows, rows, d)
        n_valid = valid.view(s_pad // rows, rows, 1).float().sum(1).clamp_min(1.0)  # (nblk, 1)
        gm = blocks.sum(3) / n_valid
        xf = torch.where(valid, xf - gm.repeat_interleave(rows, 2), 0.0)
        gmean = gm * scale_mul
    qmax = QMAX[mode]
    if group == 1:
        amax = xf.abs().amax(-1).clamp_min(1e-12)  # (B, H, S_pad)
        y = xf * (qmax / amax)[..., None]
        scale = amax / qmax * scale_mul
    else:
        amax = xf.view(b, h, s_pad // group, group * d).abs().amax(-1).clamp_min(1e-12)
        y = xf * (qmax / amax).repeat_interleave(group, 2)[..., None]
        scale = amax / qmax * scale_mul
    if mode == "fp8":
        data = y.to(torch.float8_e4m3fn)
    else:
        data = torch.floor(y + 0.5).clamp(-qmax, qmax).to(torch.int8)
        if mode == "int4":
            data = pack_int4(data)
    return data, scale, gmean


def dequantize_rows(data: torch.Tensor, scale: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, H, S_pad, D) float32 from :func:`quantize_rows_reference`'s data and scales (scale_mul included)."""
    vals = unpack_int4(data) if mode == "int4" else data
    group = vals.shape[2] // scale.shape[2]
    return vals.float() * scale.repeat_interleave(group, 2)[..., None]


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


def quantize_v_reference(v: torch.Tensor, s_pad: int):
    """PyTorch twin of :func:`kernels.quantize.quantize_v`: e4m3 (B, H, D, S_pad), scale (B, H, D)."""
    b, s, h, d = v.shape
    amax = v.float().abs().amax(1).clamp_min(1e-12)  # (B, H, D)
    vt = torch.zeros(b, h, d, s_pad, dtype=torch.float32, device=v.device)
    vt[..., :s] = v.float().permute(0, 2, 3, 1)
    return (vt * (FP8_MAX / amax)[..., None]).to(torch.float8_e4m3fn), amax / FP8_MAX


def reference_quant_attention(q, k, v, mode: str, block_mask=None, block_m: int = 128, block_n: int = 128,
                              scale: float | None = None, recipe: dict | None = None) -> torch.Tensor:
    """What the quantized kernel computes, simulated (float64 arithmetic on the quantized operands).

    ``block_m`` / ``block_n`` are the KERNEL's tiles (they set the scale grain and the online
    softmax's steps: P is quantized against the running max, block by block, as the kernel does).
    (B, S, H, D) in and out (q's dtype); ``block_mask`` as in :func:`vdit_accel.reference.reference_attention`.
    ``recipe``: entries that override ``RECIPES[mode]`` (accuracy studies of recipes the kernels do
    not have: ``pv="16"`` for P and V in q's 16-bit dtype with fp32 accumulation instead of e4m3).
    """
    mode = _check_mode(mode)
    b, s, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    r = {**RECIPES[mode], **(recipe or {})}
    grain = {"block_m": block_m, "block_n": block_n}
    s_pad = padded_len(s, block_m, block_n)
    step = 1 if r["balance"] else SMOOTH_ROW_STEP  # K smoothing's estimate of the mean (see kernels/quantize.py)
    k_mean = k.float()[:, ::step].mean(1)  # (B, H, D)
    q_mul = k_mul = None
    if r["balance"]:
        q_mul = balance_factors(q.float().amax(1), q.float().amin(1), k.float().amax(1), k.float().amin(1), k_mean)
        k_mul = 1.0 / q_mul
    qd, qsc, qmean = quantize_rows_reference(q, mode, grain.get(r["q_group"], r["q_group"]), s_pad, scale * LOG2E,
                                             group_mean=r["smooth_q"], rows=block_m, chan_mul=q_mul)
    kd, ksc, _ = quantize_rows_reference(k, mode, grain.get(r["k_group"], r["k_group"]), s_pad, 1.0,
                                         mean=k_mean if r["smooth_k"] else None, chan_mul=k_mul)
    qf = dequantize_rows(qd, qsc, mode).double()[:, :, :s]  # (B, H, S, D), log2-domain scale folded in
    kf = dequantize_rows(kd, ksc, mode).double()[:, :, :s]
    scores = qf @ kf.transpose(-1, -2)  # (B, H, S, S), log2 domain
    if qmean is not None:  # the smoothed-away q_mean . k_j, per (query block, key)
        rows = torch.arange(s, device=q.device) // block_m
        scores = scores + (qmean.double() @ kf.transpose(-1, -2))[:, :, rows]
    if block_mask is not None:
        scores = scores.masked_fill(~block_mask.token_mask().to(q.device), float("-inf"))
    pv16 = r.get("pv", "fp8") == "16"
    if pv16:  # V as given, P rounded to q's dtype
        vf, vsc = v.double().transpose(1, 2), torch.ones((b, h, d), dtype=torch.float64, device=q.device)
    else:
        v8, vsc = quantize_v_reference(v, s_pad)
        vf = v8.double()[..., :s].transpose(-1, -2)  # (B, H, S, D), units of vsc
    m = torch.full((b, h, s, 1), float("-inf"), dtype=torch.float64, device=q.device)
    l = torch.zeros_like(m)
    acc = torch.zeros(b, h, s, d, dtype=torch.float64, device=q.device)
    for n0 in range(0, s, block_n):  # the kernel's online softmax, one key tile at a time
        sc = scores[..., n0 : n0 + block_n]
        m_new = torch.maximum(m, sc.amax(-1, keepdim=True))
        m_safe = torch.where(torch.isinf(m_new), 0.0, m_new)
        p = torch.exp2(sc - m_safe)
        alpha = torch.exp2(torch.where(torch.isinf(m), float("-inf"), m - m_safe))
        l = l * alpha + p.sum(-1, keepdim=True)
        if pv16:
            p8 = (p.float() * FP8_MAX).to(q.dtype).double()
        else:
            p8 = (p.float() * FP8_MAX).to(torch.float8_e4m3fn).double()
        acc = acc * alpha + p8 @ vf[:, :, n0 : n0 + block_n]
        m = m_new
    out = acc * vsc.double()[:, :, None, :] / FP8_MAX / torch.where(l > 0, l, 1.0)
    return out.transpose(1, 2).to(q.dtype)


def dit_like_qkv(b: int, s: int, h: int, d: int, *, peak: float = 1.5, seed: int = 0, dtype=torch.float32,
                 device=None):
    """Test data with the structure of a video DiT's attention inputs (for the accuracy checks).

    Q and K are one smooth function of a token's position (a 1D stand-in for the video) plus noise,
    times ``peak``: attention concentrates on nearby tokens, as in real heads (at S=1000, D=64:
    ``peak`` 1.0 → mean max probability 0.04, ~85 effective keys; 1.5 → 0.18, ~15; 2.5 → 0.56, ~3 —
    quantization error grows with peakedness, see the quantization tests). K has 4 outlier channels
    10-20x larger than the rest, mostly a per-channel offset (what SageAttention found in real DiTs;
    K smoothing removes it). V is smooth in position plus noise and a per-channel offset, as
    neighbouring video tokens are alike.
    """
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(s, dtype=torch.float32)[:, None] / max(s, 1)

    def feature():
        return torch.cos(pos * torch.randn(1, d, generator=g) * 40.0 + torch.rand(1, d, generator=g) * 6.283)

    def heads(base, noise):
        return torch.stack([base + noise * torch.randn(s, d, generator=g) for _ in range(b * h)]).view(b, h, s, d)

    f = feature()
    q, k = heads(f, 0.5) * peak, heads(f, 0.5) * peak
    outliers = torch.randperm(d, generator=g)[:4]
    k[..., outliers] = k[..., outliers] * 2.0 + (10.0 + 10.0 * torch.rand(4, generator=g)) * peak
    v = heads(feature(), 0.5) + 0.3 * torch.randn(b, h, 1, d, generator=g)
    return [x.transpose(1, 2).contiguous().to(dtype=dtype, device=device) for x in (q, k, v)]


def reference_sage1_attention(q, k, v, scale: float | None = None) -> torch.Tensor:
    """SageAttention 1.0.6's Triton recipe (``sageattn``, head_dim 64 / 128), simulated in float64 on its
    quantized operands, to compare recipes on the CPU (read from its source, 1.0.6):

    - K smoothed by its exact mean over the sequence, the difference rounded to the input dtype;
    - Q (times scale * log2 e) and K quantized to int8 per block of 128 and 64 tokens, scale = amax / 127,
      rounded half away from zero; scores = int32 dot * q_scale * k_scale, online softmax (exp2) in fp32;
    - V cast to fp16 (bf16 inputs), P to fp16; each 64-key block's P V accumulated in fp16 (simulated:
      rounded to fp16 after every 16 keys, the MMA's k step), blocks summed in fp32.

    (B, S, H, D) in and out (q's dtype).
    """
    b, s, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    blk_q, blk_k = 128, 64

    def int8_blocks(x, blk, mul):  # x (B, H, S, D) float64 -> dequantised values
        n = -(-s // blk) * blk
        xp = torch.zeros(b, h, n, d, dtype=torch.float64)
        xp[:, :, :s] = x * mul
        blocks = xp.view(b, h, n // blk, blk * d)
        sc = (blocks.abs().amax(-1, keepdim=True) / 127.0).clamp_min(1e-30)
        y = blocks / sc
        y = torch.trunc(y + 0.5 * torch.sign(y)).clamp(-127, 127)
        return (y * sc).view(b, h, n, d)[:, :, :s]

    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    ks = (kh - kh.float().mean(2, keepdim=True).to(kh.dtype)).to(kh.dtype)  # smoothing, in the input dtype
    qf = int8_blocks(qh.double(), blk_q, scale * LOG2E)
    kf = int8_blocks(ks.double(), blk_k, 1.0)
    scores = (qf @ kf.transpose(-1, -2)).float().double()  # int32-exact, scales applied in fp32
    v16 = vh.to(torch.float16).double()
    m = torch.full((b, h, s, 1), float("-inf"), dtype=torch.float64)
    l = torch.zeros_like(m)
    acc = torch.zeros(b, h, s, d, dtype=torch.float64)
    for n0 in range(0, s, blk_k):
        sc = scores[..., n0 : n0 + blk_k]
        m_new = torch.maximum(m, sc.amax(-1, keepdim=True))
        p = torch.exp2(sc - m_new).float().to(torch.float16).double()
        alpha = torch.exp2(torch.where(torch.isinf(m), float("-inf"), m - m_new))
        l = l * alpha + torch.exp2(sc - m_new).sum(-1, keepdim=True)
        part = torch.zeros(b, h, s, d, dtype=torch.float64)
        for c0 in range(0, sc.shape[-1], 16):  # fp16 accumulation inside the block's MMA
            part = (part + p[..., c0 : c0 + 16] @ v16[:, :, n0 + c0 : n0 + min(c0 + 16, sc.shape[-1])]).half().double()
        acc = acc * alpha + part
        m = m_new
    return (acc / l).transpose(1, 2).to(q.dtype)


ACCURACY_FAMILIES = ("normal", "k-bias", "k-outlier", "peaked")


def accuracy_inputs(family: str, b: int, s: int, h: int, d: int, *, seed: int = 0, dtype=torch.bfloat16, device=None):
    """The four input families the quantized modes are judged on against SageAttention (issue 22), (B, S, H, D):

    - ``normal``: q, k, v standard normal;
    - ``k-bias``: K + 20 on 4 channels (a per-channel offset: what K smoothing removes);
    - ``k-outlier``: K x 20 on 4 channels (outliers smoothing cannot remove);
    - ``peaked``: q = k / 2 + noise / 2 (each query most similar to its own key: strongly peaked attention).
    """
    if family not in ACCURACY_FAMILIES:
        raise ValueError(f"unknown accuracy family {family!r}; use one of {ACCURACY_FAMILIES}")
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, s, h, d, generator=g) for _ in range(3))
    chans = torch.randperm(d, generator=g)[:4]
    if family == "k-bias":
        k[..., chans] += 20.0
    elif family == "k-outlier":
        k[..., chans] *= 20.0
    elif family == "peaked":
        q = 0.5 * k + 0.5 * torch.randn(b, s, h, d, generator=g)
    return [x.to(dtype=dtype, device=device) for x in (q, k, v)]
