"""Triton quantizers for the quantized attention modes (``fp8``, ``int8``, ``int4``).

The recipes are defined (and simulated in PyTorch) in :mod:`vdit_accel.quant`; these kernels compute
the same tensors on the GPU, in the layouts the attention kernel reads:

- Q, K: ``(B, H, S_pad, D)`` (int4: ``(B, H, S_pad, D // 2)`` uint8, two values a byte, element 2i in
  the low nibble); rows ``S .. S_pad`` are zero. One scale per group of ``group`` rows, float32
  ``(B, H, S_pad // group)`` (``group = 1``: one per row). The scale carries ``scale_mul`` (the softmax
  scale times log2 e for Q), so dequantised scores come out in the kernel's log2 domain.
- V: e4m3, transposed to ``(B, H, D, S_pad)`` (Hopper's FP8 tensor cores want P·V's right operand
  K-major, i.e. contiguous along the sequence), one scale per channel ``(B, H, D)`` -- where the mode's
  recipe has P V in e4m3 (``pv="fp8"``); with ``pv="16"`` (int8) V is not quantized (``v`` is None).

:func:`channel_stats` gives the per-channel mean (K smoothing) and absolute max (V's scale) in one
pass. This module imports only torch and triton.
"""

from __future__ import annotations

import contextlib
import enum
import os

import torch
import triton
import triton.language as tl



class QuantMode(str, enum.Enum):
    """A quantized attention mode; ``None`` wherever a mode is optional means unquantized (fp16/bf16).

    The one form a mode has from a strategy file to the kernel: parsed once (:meth:`parse`), compared
    and hashed as its string (``QuantMode.FP8 == "fp8"``), and given to the attention and quantizer
    kernels as :attr:`kernel_id`, their ``QUANT`` / ``MODE`` constexpr (0 is unquantized).
    """

    FP8 = "fp8"
    INT8 = "int8"
    INT4 = "int4"

    __str__ = str.__str__
    __format__ = str.__format__

    @property
    def kernel_id(self) -> int:
        return _KERNEL_IDS[self]

    @classmethod
    def parse(cls, mode) -> "QuantMode | None":
        """``None`` (unquantized), a mode, or its name (``"fp8"``, ``"int8"``, ``"int4"``)."""
        if mode is None or isinstance(mode, cls):
            return mode
        try:
            return cls(mode)
        except ValueError:
            raise ValueError(f"unknown quantization mode {mode!r}; use None (unquantized) or one of "
                             f"{[m.value for m in cls]}") from None

    @classmethod
    def from_kernel_id(cls, kernel_id: int) -> "QuantMode | None":
        return _BY_KERNEL_ID[kernel_id]


_KERNEL_IDS = {QuantMode.FP8: 1, QuantMode.INT8: 2, QuantMode.INT4: 3}
_BY_KERNEL_ID = (None, QuantMode.FP8, QuantMode.INT8, QuantMode.INT4)

FP8_MAX = 448.0
QMAX = {QuantMode.FP8: FP8_MAX, QuantMode.INT8: 127.0, QuantMode.INT4: 7.0}
_STAT_ROWS = 32  # rows per step of a channel_stats program
_STAT_CHUNK = 512  # rows per channel_stats program
# K smoothing subtracts a per-channel vector from every key: softmax ignores the shift whatever the
# vector, so an estimate of K's mean from every SMOOTH_ROW_STEP-th token does (S / 8 reads, not S).
SMOOTH_ROW_STEP = 8


def interpreting() -> bool:
    """TRITON_INTERPRET=1: kernels run on the CPU interpreter (which rounds fp32 -> e4m3 wrongly: see _to_e4m3)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _device_ctx(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


@triton.jit
def _to_e4m3(x, EMULATE: tl.constexpr):
    """fp32 -> e4m3, round to nearest even. EMULATE (the CPU interpreter, whose own conversion rounds
    ties away and can drop a carry into the exponent) rounds in fp32 arithmetic first, exactly."""
    if EMULATE:
        bits = x.to(tl.int32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
        MAGIC: tl.constexpr = 12582912.0  # 1.5 * 2**23: (y + MAGIC) - MAGIC rounds y to an integer, ties to even
        sub = ((x * 512.0 + MAGIC) - MAGIC) / 512.0  # subnormals: multiples of 2**-9
        x = tl.where(tl.abs(x) < 0.015625, sub, normal)
    return x.to(tl.float8e4nv)


@triton.jit
def _quantize_tile(x, MODE: tl.constexpr, EMULATE_FP8: tl.constexpr):
    """A float32 tile with one scale for the whole tile: (codes, scale), MODE 1 e4m3, 2 int8."""
    if MODE == 1:
        QMAX: tl.constexpr = 448.0
    else:
        QMAX: tl.constexpr = 127.0
    amax = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0), 1e-12)
    y = x * (QMAX / amax)
    if MODE == 1:
        codes = _to_e4m3(y, EMULATE_FP8)
    else:
        codes = tl.minimum(tl.maximum(tl.floor(y + 0.5), -QMAX), QMAX).to(tl.int8)
    return codes, amax / QMAX


@triton.jit
def _stats_chunk(base, row_stride, n_rows, pid_c, CHUNK: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                 HEAD_DIM: tl.constexpr):
    """Per-channel sum, max and min of rows pid_c * CHUNK .. + CHUNK (those < n_rows) at base + i * row_stride,
    accumulated element-wise in registers, reduced once."""
    offs_r = tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    acc_sum = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    acc_max = tl.full([ROWS, BLOCK_D], float("-inf"), dtype=tl.float32)
    acc_min = tl.full([ROWS, BLOCK_D], float("inf"), dtype=tl.float32)
    for r0 in range(0, CHUNK, ROWS):
        i = (pid_c * CHUNK + r0 + offs_r).to(tl.int64)
        m = (i < n_rows)[:, None] & d_mask[None, :]
        x = tl.load(base + i[:, None] * row_stride + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
        acc_sum += x
        acc_max = tl.maximum(acc_max, tl.where(m, x, float("-inf")))
        acc_min = tl.minimum(acc_min, tl.where(m, x, float("inf")))
    return tl.sum(acc_sum, 0), tl.max(acc_max, 0), tl.min(acc_min, 0)


@triton.jit
def _store_v_transposed(Out, pid_bh, x, amax, rows, offs_d, d_mask, S_pad, HEAD_DIM: tl.constexpr,
                        EMULATE_FP8: tl.constexpr):
    """V rows (float32 [ROWS, D]) to e4m3 by the per-channel ``amax``, at Out[b, h, d, row]: stored as a
    [D, ROWS] tile whose rows are contiguous, so the writes coalesce (the transpose goes through
    shared memory)."""
    y = _to_e4m3(x * (448.0 / tl.maximum(amax, 1e-12))[None, :], EMULATE_FP8)
    ptrs = Out + (pid_bh * HEAD_DIM + offs_d[:, None]).to(tl.int64) * S_pad + rows[None, :]
    tl.store(ptrs, tl.trans(y), mask=d_mask[:, None])


@triton.jit
def _channel_stats_kernel(X, Sum, Max, Min, stride_b, stride_s, stride_h, n_rows, H, n_chunks, row_step,
                          CHUNK: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Per-channel partial sum, max and min over rows ``row_step * i`` (i < n_rows) of one chunk."""
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    total, mx, mn = _stats_chunk(X + b * stride_b + h * stride_h, stride_s * row_step, n_rows, pid_c,
                                 CHUNK, ROWS, BLOCK_D, HEAD_DIM)
    offs_d = tl.arange(0, BLOCK_D)
    out = (pid_bh * n_chunks + pid_c) * HEAD_DIM + offs_d
    tl.store(Sum + out, total, mask=offs_d < HEAD_DIM)
    tl.store(Max + out, mx, mask=offs_d < HEAD_DIM)
    tl.store(Min + out, mn, mask=offs_d < HEAD_DIM)


def channel_stats(x: torch.Tensor, row_step: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (batch, head, channel) mean, max and min over the sequence of ``x`` (B, S, H, D), float32
    (B, H, D) each, in one pass; over every ``row_step``-th row only if asked (a cheap estimate)."""
    b, s, h, d = x.shape
    n_rows = triton.cdiv(s, row_step)
    n_chunks = max(1, triton.cdiv(n_rows, _STAT_CHUNK))
    part = torch.empty(3, b * h, n_chunks, d, dtype=torch.float32, device=x.device)
    with _device_ctx(x):
        _channel_stats_kernel[(n_chunks, b * h)](
            x, part[0], part[1], part[2], x.stride(0), x.stride(1), x.stride(2), n_rows, h, n_chunks, row_step,
            CHUNK=_STAT_CHUNK, ROWS=_STAT_ROWS, BLOCK_D=triton.next_power_of_2(d), HEAD_DIM=d,
        )
    mean = (part[0].sum(1) / max(n_rows, 1)).view(b, h, d)
    return mean, part[1].amax(1).view(b, h, d), part[2].amin(1).view(b, h, d)


@triton.jit
def _quantize_rows_kernel(
    X, Mean, ChanMul, Out, Scale, GroupMean,
    stride_xb, stride_xs, stride_xh,
    S, H, S_pad, scale_mul,
    GROUP: tl.constexpr, ROWS: tl.constexpr, MODE: tl.constexpr, SUB_MEAN: tl.constexpr, CHAN_MUL: tl.constexpr,
    SUB_GROUP_MEAN: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, EMULATE_FP8: tl.constexpr,
):
    """One program: ROWS rows of one (batch, head); GROUP rows share a scale (GROUP == 1: per row;
    else GROUP == ROWS)."""
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_r.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    valid = rows < S
    x = tl.load(X + b * stride_xb + h * stride_xh + rows[:, None] * stride_xs + offs_d[None, :],
                mask=valid[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    if SUB_MEAN:
        mean = tl.load(Mean + pid_bh * HEAD_DIM + offs_d, mask=d_mask, other=0.0)
        x = tl.where(valid[:, None], x - mean[None, :], 0.0)
    if CHAN_MUL:
        x = x * tl.load(ChanMul + pid_bh * HEAD_DIM + offs_d, mask=d_mask, other=0.0)[None, :]
    if SUB_GROUP_MEAN:  # int4 Q smoothing: the mean of this block's valid rows, removed and kept
        n_valid = tl.maximum(tl.sum(valid.to(tl.float32), 0), 1.0)
        gmean = tl.sum(x, 0) / n_valid
        x = tl.where(valid[:, None], x - gmean[None, :], 0.0)
        tl.store(GroupMean + (pid_bh * (S_pad // ROWS) + pid_r) * HEAD_DIM + offs_d, gmean * scale_mul, mask=d_mask)
    if MODE == 1:
        QMAX: tl.constexpr = 448.0
    elif MODE == 2:
        QMAX: tl.constexpr = 127.0
    else:
        QMAX: tl.constexpr = 7.0
    if GROUP == 1:
        amax = tl.maximum(tl.max(tl.abs(x), 1), 1e-12)  # [ROWS]
        inv = QMAX / amax
        y = x * inv[:, None]
        tl.store(Scale + pid_bh * S_pad + rows, (amax / QMAX) * scale_mul)
    else:
        amax = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0), 1e-12)
        inv = QMAX / amax
        y = x * inv
        tl.store(Scale + pid_bh * (S_pad // GROUP) + pid_r, (amax / QMAX) * scale_mul)
    out_rows = (pid_bh * S_pad + rows)[:, None]
    if MODE == 1:
        tl.store(Out + out_rows * HEAD_DIM + offs_d[None, :], _to_e4m3(y, EMULATE_FP8), mask=d_mask[None, :])
    else:
        y = tl.minimum(tl.maximum(tl.floor(y + 0.5), -QMAX), QMAX).to(tl.int32)
        if MODE == 2:
            tl.store(Out + out_rows * HEAD_DIM + offs_d[None, :], y.to(tl.int8), mask=d_mask[None, :])
        else:
            lo, hi = tl.split(tl.reshape(y, [ROWS, BLOCK_D // 2, 2]))
            packed = ((lo & 0xF) | ((hi & 0xF) << 4)).to(tl.uint8)
            offs_p = tl.arange(0, BLOCK_D // 2)
            tl.store(Out + out_rows * (HEAD_DIM // 2) + offs_p[None, :], packed, mask=offs_p[None, :] < HEAD_DIM // 2)


def quantize_rows(x: torch.Tensor, mode: str, group: int, s_pad: int, scale_mul: float = 1.0,
                  mean: torch.Tensor | None = None, group_mean: bool = False, rows: int = 64,
                  chan_mul: torch.Tensor | None = None):
    """Quantize (B, S, H, D) to ``mode`` (see the module docstring for layouts).

    Args:
        group: rows per scale (a power of two dividing ``s_pad``), or 1 for one scale per row.
        mean: float32 (B, H, D) subtracted from every row first (K smoothing).
        chan_mul: float32 (B, H, D) multiplying every row next (int4's channel balancing).
        group_mean: int4 Q smoothing: subtract each block of ``rows`` rows' own mean (``rows`` is
            ``group`` when ``group > 1``), returned times ``scale_mul`` as float32 (B, H, S_pad // rows, D).

    Returns ``(data, scale, group_means or None)``.
    """
    b, s, h, d = x.shape
    mode = QuantMode.parse(mode)
    if mode is None:
        raise ValueError("quantize_rows needs a quantization mode, got None")
    rows = group if group > 1 else rows
    if s_pad % rows or s_pad < s:
        raise ValueError(f"s_pad={s_pad} must be >= S={s} and a multiple of {rows}")
    if mode == "int4" and d % 2:
        raise ValueError("int4 needs an even head_dim")
    dtype = torch.float8_e4m3fn if mode == "fp8" else (torch.uint8 if mode == "int4" else torch.int8)
    out = torch.empty(b, h, s_pad, d // 2 if mode == "int4" else d, dtype=dtype, device=x.device)
    scale = torch.empty(b, h, s_pad // group, dtype=torch.float32, device=x.device)
    gmean = torch.empty(b, h, s_pad // rows, d, dtype=torch.float32, device=x.device) if group_mean else scale
    with _device_ctx(x):
        _quantize_rows_kernel[(s_pad // rows, b * h)](
            x, mean if mean is not None else scale, chan_mul if chan_mul is not None else scale, out, scale, gmean,
            x.stride(0), x.stride(1), x.stride(2), s, h, s_pad, float(scale_mul),
            GROUP=group, ROWS=rows, MODE=mode.kernel_id, SUB_MEAN=mean is not None, CHAN_MUL=chan_mul is not None,
            SUB_GROUP_MEAN=group_mean,
            BLOCK_D=triton.next_power_of_2(d), HEAD_DIM=d, EMULATE_FP8=interpreting(), num_warps=4,
        )
    return out, scale, (gmean if group_mean else None)


@triton.jit
def _quantize_v_kernel(V, Scale, Out, stride_vb, stride_vs, stride_vh, S, H, S_pad,
                       ROWS: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, EMULATE_FP8: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_r.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    x = tl.load(V + b * stride_vb + h * stride_vh + rows[:, None] * stride_vs + offs_d[None, :],
                mask=(rows < S)[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    amax = tl.load(Scale + pid_bh * HEAD_DIM + offs_d, mask=d_mask, other=1.0)
    _store_v_transposed(Out, pid_bh, x, amax, rows, offs_d, d_mask, S_pad, HEAD_DIM, EMULATE_FP8)


def quantize_v(v: torch.Tensor, amax: torch.Tensor, s_pad: int):
    """V (B, S, H, D) → e4m3 (B, H, D, S_pad) and the per-channel scale (B, H, D) = amax / 448
    (``amax``: V's per-channel absolute max)."""
    b, s, h, d = v.shape
    rows = 128 if s_pad % 128 == 0 else 64
    if s_pad % rows or s_pad < s:
        raise ValueError(f"s_pad={s_pad} must be >= S={s} and a multiple of {rows}")
    out = torch.empty(b, h, d, s_pad, dtype=torch.float8_e4m3fn, device=v.device)
    amax = amax.float().contiguous()
    with _device_ctx(v):
        _quantize_v_kernel[(s_pad // rows, b * h)](
            v, amax, out, v.stride(0), v.stride(1), v.stride(2), s, h, s_pad,
            ROWS=rows, BLOCK_D=triton.next_power_of_2(d), HEAD_DIM=d, EMULATE_FP8=interpreting(), num_warps=4,
        )
    return out, amax.clamp_min(1e-12) / FP8_MAX


# ------------------------------------------------------------------------------------------------
# fp8 / int8: K and V in two launches (statistics, then quantization), no PyTorch glue between
# ------------------------------------------------------------------------------------------------

_KV_CHUNK = 1024  # rows per statistics program
_KV_PART_STEP = 16  # partial-statistics rows reduced per step by a quantization program


@triton.jit
def _kv_stats_kernel(K, V, Part, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                     S, H, n_chunks, k_step,
                     CHUNK: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Program (chunk, b*h, which): partial per-channel sum / max / min of K's every k_step-th row
    (which = 0) or of all of V's rows (which = 1), into Part[which, stat, b*h, chunk, :]."""
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    which = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    if which == 0:
        total, mx, mn = _stats_chunk(K + b * stride_kb + h * stride_kh, stride_ks * k_step, tl.cdiv(S, k_step),
                                     pid_c, CHUNK, ROWS, BLOCK_D, HEAD_DIM)
    else:
        total, mx, mn = _stats_chunk(V + b * stride_vb + h * stride_vh, stride_vs, S, pid_c, CHUNK, ROWS, BLOCK_D,
                                     HEAD_DIM)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    n_bh = tl.num_programs(1)
    out = ((which * 3 * n_bh + pid_bh) * n_chunks + pid_c) * HEAD_DIM + offs_d
    stat = n_bh * n_chunks * HEAD_DIM
    tl.store(Part + out, total, mask=d_mask)
    tl.store(Part + stat + out, mx, mask=d_mask)
    tl.store(Part + 2 * stat + out, mn, mask=d_mask)


@triton.jit
def _kv_quantize_kernel(K, V, Part, K8, KScale, KMean, V8, VScale,
                        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                        S, H, S_pad, n_chunks, k_rows,
                        ROWS: tl.constexpr, MODE: tl.constexpr, PART_STEP: tl.constexpr,
                        BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, EMULATE_FP8: tl.constexpr):
    """Program (tile, b*h, which): finish the statistics from the partials, then quantize one tile of
    ROWS rows: K (which = 0) smoothed by its mean, one scale per tile, (B, H, S_pad, D); V (which = 1)
    to e4m3 by its per-channel absolute max, transposed (B, H, D, S_pad)."""
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    which = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    n_bh = tl.num_programs(1)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    offs_c = tl.arange(0, PART_STEP)
    rows = pid_r.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    valid = rows < S
    stat = n_bh * n_chunks * HEAD_DIM
    part = Part + ((which * 3 * n_bh + pid_bh) * n_chunks) * HEAD_DIM
    if which == 0:
        k_acc = tl.zeros([PART_STEP, BLOCK_D], dtype=tl.float32)
        for c0 in range(0, n_chunks, PART_STEP):
            k_cm = ((c0 + offs_c) < n_chunks)[:, None] & d_mask[None, :]
            k_acc += tl.load(part + (c0 + offs_c)[:, None] * HEAD_DIM + offs_d[None, :], mask=k_cm, other=0.0)
        k_mean = tl.sum(k_acc, 0) / k_rows
        kx = tl.load(K + b * stride_kb + h * stride_kh + rows[:, None] * stride_ks + offs_d[None, :],
                    mask=valid[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        kx = tl.where(valid[:, None], kx - k_mean[None, :], 0.0)
        k_codes, k_scale = _quantize_tile(kx, MODE, EMULATE_FP8)
        tl.store(K8 + (pid_bh * S_pad + rows)[:, None] * HEAD_DIM + offs_d[None, :], k_codes, mask=d_mask[None, :])
        tl.store(KScale + pid_bh * (S_pad // ROWS) + pid_r, k_scale)
        if pid_r == 0:
            tl.store(KMean + pid_bh * HEAD_DIM + offs_d, k_mean, mask=d_mask)
    else:
        vmax = tl.full([PART_STEP, BLOCK_D], float("-inf"), dtype=tl.float32)
        vmin = tl.full([PART_STEP, BLOCK_D], float("inf"), dtype=tl.float32)
        for c0 in range(0, n_chunks, PART_STEP):
            v_cm = ((c0 + offs_c) < n_chunks)[:, None] & d_mask[None, :]
            v_part_ptrs = part + (c0 + offs_c)[:, None] * HEAD_DIM + offs_d[None, :]
            vmax = tl.maximum(vmax, tl.load(v_part_ptrs + stat, mask=v_cm, other=float("-inf")))
            vmin = tl.minimum(vmin, tl.load(v_part_ptrs + 2 * stat, mask=v_cm, other=float("inf")))
        v_amax = tl.maximum(tl.maximum(tl.max(vmax, 0), -tl.min(vmin, 0)), 1e-12)
        vx = tl.load(V + b * stride_vb + h * stride_vh + rows[:, None] * stride_vs + offs_d[None, :],
                    mask=valid[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        _store_v_transposed(V8, pid_bh, vx, v_amax, rows, offs_d, d_mask, S_pad, HEAD_DIM, EMULATE_FP8)
        if pid_r == 0:
            tl.store(VScale + pid_bh * HEAD_DIM + offs_d, v_amax / 448.0, mask=d_mask)


def _quantize_kv_fused(k, v, mode: str, block_n: int, s_pad: int, with_v: bool = True):
    """fp8 / int8 K (smoothed, per tile of block_n rows) and, ``with_v``, V (e4m3, per channel) in two
    launches (without V: its programs are not launched and V's outputs are None)."""
    mode = QuantMode.parse(mode)
    b, s, h, d = k.shape
    k_rows = triton.cdiv(s, SMOOTH_ROW_STEP)
    n_chunks = max(1, triton.cdiv(s, _KV_CHUNK))  # V's; K (subsampled) uses the first ones
    part = torch.empty(2, 3, b * h, n_chunks, d, dtype=torch.float32, device=k.device)
    k8 = torch.empty(b, h, s_pad, d, dtype=torch.float8_e4m3fn if mode == "fp8" else torch.int8, device=k.device)
    k_scale = torch.empty(b, h, s_pad // block_n, dtype=torch.float32, device=k.device)
    k_mean = torch.empty(b, h, d, dtype=torch.float32, device=k.device)
    v8 = torch.empty(b, h, d, s_pad, dtype=torch.float8_e4m3fn, device=k.device) if with_v else k_scale
    v_scale = torch.empty(b, h, d, dtype=torch.float32, device=k.device) if with_v else k_scale
    which = 2 if with_v else 1  # the programs' third grid dim: 0 = K, 1 = V
    block_d = triton.next_power_of_2(d)
    strides = (k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2))
    with _device_ctx(k):
        _kv_stats_kernel[(n_chunks, b * h, which)](
            k, v, part, *strides, s, h, n_chunks, SMOOTH_ROW_STEP,
            CHUNK=_KV_CHUNK, ROWS=_STAT_ROWS, BLOCK_D=block_d, HEAD_DIM=d,
        )
        _kv_quantize_kernel[(s_pad // block_n, b * h, which)](
            k, v, part, k8, k_scale, k_mean, v8, v_scale, *strides, s, h, s_pad, n_chunks, k_rows,
            ROWS=block_n, MODE=mode.kernel_id, PART_STEP=_KV_PART_STEP, BLOCK_D=block_d, HEAD_DIM=d,
            EMULATE_FP8=interpreting(), num_warps=4,
        )
    return (k8, k_scale, k_mean) + ((v8, v_scale) if with_v else (None, None))


# ------------------------------------------------------------------------------------------------
# The recipes: which tensor is quantized how, per mode (vdit_accel.quant simulates exactly this)
# ------------------------------------------------------------------------------------------------

# q_group / k_group: "block_m" / "block_n" = one scale per kernel tile of rows (a scalar per score
# tile: no extra work in the kernel's softmax); 1 = one scale per row (int4 needs the finer grain).
# smooth_k: subtract K's per-channel mean (estimated from every SMOOTH_ROW_STEP-th token, except for
# int4 whose channel balancing needs K's exact range anyway); smooth_q: subtract each Q tile's mean (added back as a
# per-key bias); balance: multiply Q's channels by sqrt(amax K / amax Q) and divide K's by it
# (SmoothQuant's exact migration of range between the two operands of Q·K). pv: "fp8" = P and V in e4m3
# (V per channel, P times 448), "16" = P in V's 16-bit dtype and V as given, fp32 accumulation (int8:
# SageAttention's P V; e4m3 P and V alone cost ~3-4% relative error on random inputs, three times
# SageAttention's total: benchmarks/results/quant-accuracy-cpu-*.json).
RECIPES = {
    QuantMode.FP8: dict(q_group="block_m", k_group="block_n", smooth_k=True, smooth_q=False, balance=False, pv="fp8"),
    QuantMode.INT8: dict(q_group="block_m", k_group="block_n", smooth_k=True, smooth_q=False, balance=False, pv="16"),
    QuantMode.INT4: dict(q_group=1, k_group=1, smooth_k=True, smooth_q=True, balance=True, pv="fp8"),
}


def balance_factors(q_max, q_min, k_max, k_min, k_mean) -> torch.Tensor:
    """Per-channel multipliers for Q (K gets their inverse): sqrt(amax of smoothed K / amax of Q)."""
    q_amax = torch.maximum(q_max.abs(), q_min.abs())
    k_amax = torch.maximum(k_max - k_mean, k_mean - k_min)
    return (k_amax.clamp_min(1e-6) / q_amax.clamp_min(1e-6)).sqrt().clamp(1e-3, 1e3)


def padded_len(s: int, block_m: int, block_n: int) -> int:
    """The sequence length of the quantized buffers: S rounded up to whole kernel tiles (and 64 rows)."""
    step = max(block_m, block_n, 64)
    return triton.cdiv(s, step) * step


def _group(spec, block_m: int, block_n: int) -> int:
    return {"block_m": block_m, "block_n": block_n}.get(spec, spec)


def quantize_qkv(q, k, v, mode: str, block_m: int, block_n: int, qk_scale: float) -> dict:
    """K, V (B, S, H, D) — and for int4 Q — quantized for the attention kernel in ``mode`` (one read of
    each, plus one of K and V for their channel statistics; fp8 / int8 Q tiles are quantized inside
    the attention kernel, ``q`` is then None). ``qk_scale`` (softmax scale times log2 e) is folded
    into Q's scales (and its int4 block means)."""
    mode = QuantMode.parse(mode)
    if mode is None:
        raise ValueError("quantize_qkv needs a quantization mode, got None")
    r = RECIPES[mode]
    s_pad = padded_len(q.shape[1], block_m, block_n)
    # fp8 / int8: Q's tiles are quantized inside the attention kernel; K and V in two fused launches.
    if r["q_group"] == "block_m" and r["k_group"] == "block_n" and r["smooth_k"] and not r["balance"]:
        k8, k_scale, k_mean, v8, v_scale = _quantize_kv_fused(k, v, mode, block_n, s_pad, r["pv"] == "fp8")
        return dict(q=None, k=k8, v=v8, q_scale=None, k_scale=k_scale, v_scale=v_scale, q_mean=None, s_pad=s_pad,
                    k_mean=k_mean)
    k_mean, k_max, k_min = channel_stats(k, 1 if r["balance"] else SMOOTH_ROW_STEP) if r["smooth_k"] else (None,) * 3
    q_mul = k_mul = None
    if r["balance"]:
        q_mul = balance_factors(*channel_stats(q)[1:], k_max, k_min, k_mean)
        k_mul = 1.0 / q_mul
    q8 = q_scale = q_mean = None
    if r["q_group"] != "block_m":  # per-tile Q scales are the attention kernel's own job
        q8, q_scale, q_mean = quantize_rows(q, mode, _group(r["q_group"], block_m, block_n), s_pad, qk_scale,
                                            group_mean=r["smooth_q"], rows=block_m, chan_mul=q_mul)
    k8, k_scale, _ = quantize_rows(k, mode, _group(r["k_group"], block_m, block_n), s_pad, 1.0,
                                   mean=k_mean if r["smooth_k"] else None, chan_mul=k_mul)
    v8 = v_scale = None  # pv "16": the kernel reads V as given
    if r["pv"] == "fp8":
        _, v_max, v_min = channel_stats(v)
        v8, v_scale = quantize_v(v, torch.maximum(v_max.abs(), v_min.abs()), s_pad)
    return dict(q=q8, k=k8, v=v8, q_scale=q_scale, k_scale=k_scale, v_scale=v_scale, q_mean=q_mean, s_pad=s_pad,
                k_mean=k_mean if r["smooth_k"] else None)
