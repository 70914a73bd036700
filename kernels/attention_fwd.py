"""Forward attention in Triton: dense and block-sparse, one kernel family.

Inference only, non-causal, (B, S, H, D) layout read through strides. Sparsity is data: the
CSR-like block lists ``kv_num_blocks [Bm, H, Mb]`` / ``kv_indices [Bm, H, Mb, Nb]`` (FlexAttention's
``BlockMask`` tensors; ``Bm`` is 1 or B). Dense and sparse are one kernel under ``SPARSE: tl.constexpr``.

This module imports only torch and triton: it is the bottom layer and takes raw tensors.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch
import triton
import triton.language as tl

from .quantize import QuantMode, _quantize_tile, _to_e4m3

LOG2_FP8_MAX: tl.constexpr = tl.constexpr(8.807354922057604)  # log2(448): e4m3's largest value

# ------------------------------------------------------------------------------------------------
# Kernel notation
#
#   B, S, H, D      batch, tokens (queries = keys), heads, head_dim
#   BLOCK_M         query rows per program (one query tile)
#   BLOCK_N         key rows per inner-loop step (one key block of the kernel)
#   BLOCK_D         D rounded up to a power of two; columns d >= HEAD_DIM are masked (D = 96 -> 128)
#   HEAD_DIM        D itself
#   MASK_BLOCK_M/N  block sizes of the block mask (mask query block / mask key block). BLOCK_M divides
#                   MASK_BLOCK_M and BLOCK_N divides MASK_BLOCK_N; a mask key block is visited as
#                   SUB = MASK_BLOCK_N // BLOCK_N consecutive kernel key blocks.
#   SPARSE          visit only the key blocks listed for this (b, h, mask query block); else all
#   EVEN_N          S % BLOCK_N == 0: no key block is partial, the masked tail step is compiled out
#   RETURN_LSE      also write the natural-log log-sum-exp, float32 (B, H, S)
#   WARP_SPECIALIZE let Triton split the main loop into producer/consumer warps (Hopper+, triton >= 3.4)
#   USE_TMA         load K and V through host-side tensor descriptors (Hopper's copy engine)
#   INPUT_PRECISION tl.dot precision: "ieee" for fp32 inputs (exact, for tests), else None (the
#                   default; fp16/bf16 dots are exact products with fp32 accumulation anyway)
#   qk_scale        softmax scale * log2(e): scores live in the log2 domain so exp2 replaces exp
#   QUANT           0: q/k/v as given (fp16/bf16/fp32). 1 fp8, 2 int8, 3 int4: q/k/v are the buffers of
#                   kernels/quantize.py (Q, K (B, H, S_pad, D) viewed as (B, S_pad, H, D); V e4m3
#                   (B, H, D, S_pad) viewed the same way, so stride_vd = S_pad and its rows are
#                   contiguous), zero past S; Q/K scales per tile (per row for int4) carry qk_scale,
#                   P is quantized to e4m3 (times 448) for P @ V, V's per-channel scale is applied at
#                   the end. See vdit_accel/quant.py for the recipes and their reference.
#   PIPELINE_QK     software-pipelined Q·K^T (FlashAttention-3's intra-warpgroup overlap): the score tile
#                   of block t + 1 is issued before the softmax and P·V of block t, so the tensor cores
#                   work while the softmax runs (one score tile more in registers). Not with int4 or
#                   WARP_SPECIALIZE. (2026-11-22, triton 3.9 compiling for sm_90 on a CPU: the PTX still
#                   has wgmma.wait_group 0 right after the next tile's Q·K^T is issued -- Triton leaves a
#                   dot in flight only when its result feeds a later dot's accumulator -- so within a
#                   warp nothing overlaps; on the H100 with triton 3.6 it is 5% faster for int8, its
#                   default, and 4% slower for fp8: benchmarks/results/quant-sweep-*-20261122.json.)
#   EXP_POLY        quarters of P's columns whose exp2 runs on the FMA pipe as 2**round(x) * poly(frac)
#                   (FlashAttention-4's trick; see _exp2_poly): 0 none (all on MUFU), 1, 2 or 4 (all).
#                   Measured slower on the H100 in every configuration (fp8 wan 480p: 8.24 ms at 0,
#                   8.99 at 1, 9.30 at 2, 10.64 at 4): the FMA/issue pipes, not MUFU, are what it loads.
#   PREFETCH_IDX    sparse: the index of key block t + 1 is loaded while block t is processed (a loop-carried
#                   scalar), so the TMA / pointer loads of the next block wait on no index load. On the
#                   H100 this removes the sparse loop's whole overhead over dense (every block listed:
#                   14.54 -> 11.67 ms, dense 11.65).
#   m_i, l_i, acc   running row max (log2 domain, scaled), running row sum of exp2, running P @ V
#   t               index of a kernel key block in this program's visit list (0 .. n_total-1);
#                   dense: key block t; sparse: sub-block t % SUB of mask key block kv_indices[t // SUB]
#
# The visit list is ordered by key position (kv_indices ascending), so only its LAST kernel key
# block can reach past S. Every block before it is loaded without a key mask (MASK_TAIL=False); the
# last one, when S % BLOCK_N != 0, goes through the same inner loop once more with MASK_TAIL=True.
# Every visited block holds at least one key < S, so the running max is finite after the first step
# and no NaN arises; a query block that visits nothing keeps l_i = 0 and writes zeros, lse = -inf.
# ------------------------------------------------------------------------------------------------


@triton.jit
def _unpack_int4(packed, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """uint8 [ROWS, BLOCK_D // 2], two int4 a byte (element 2i low) -> int8 [ROWS, BLOCK_D]."""
    x = packed.to(tl.int32)
    lo = ((x & 0xF) ^ 8) - 8
    hi = ((x >> 4) ^ 8) - 8
    return tl.reshape(tl.join(lo, hi), [ROWS, BLOCK_D]).to(tl.int8)


# exp2 on the FMA pipe: 2**x = 2**j * 2**f with j = round(x), f = x - j in [-0.5, 0.5]; 2**f by a
# degree-3 polynomial with p(0) = 1 exactly (max relative error 1.0e-4, against e4m3's 6.25% rounding
# of P), 2**j added straight into the exponent bits.
_EXP2_C1: tl.constexpr = tl.constexpr(0.6932829022407532)
_EXP2_C2: tl.constexpr = tl.constexpr(0.2422109842300415)
_EXP2_C3: tl.constexpr = tl.constexpr(0.05500892922282219)


@triton.jit
def _exp2_poly(x):
    """2**x in fp32 without MUFU: FMNMX, 3 FADD, 3 FFMA, SHL, IADD per element. x = -inf (and anything
    below -127) gives exactly 0: x is clamped to -127, where f = 0, p = 1.0 and the exponent bits cancel."""
    MAGIC: tl.constexpr = 12582912.0  # 1.5 * 2**23: x + MAGIC rounds x to an integer in the low mantissa bits
    x = tl.maximum(x, -127.0)
    t = x + MAGIC
    f = x - (t - MAGIC)
    p = 1.0 + f * (_EXP2_C1 + f * (_EXP2_C2 + f * _EXP2_C3))
    # The low bits of t hold j (two's complement): shifted by 23 they are j * 2**23, the rest shifts out.
    return (p.to(tl.int32, bitcast=True) + (t.to(tl.int32, bitcast=True) << 23)).to(tl.float32, bitcast=True)


@triton.jit
def _exp2_mixed(x, EXP_POLY: tl.constexpr):
    """exp2 of a [ROWS, COLS] tile: EXP_POLY quarters of the columns (every other column for 2, every
    fourth for 1) through _exp2_poly, the rest through MUFU's ex2. The column pairs a thread holds in
    the MMA layout split without data movement."""
    if EXP_POLY == 0:
        return tl.math.exp2(x)
    elif EXP_POLY == 4:
        return _exp2_poly(x)
    else:
        ROWS: tl.constexpr = x.shape[0]
        COLS: tl.constexpr = x.shape[1]
        even, odd = tl.split(tl.reshape(x, [ROWS, COLS // 2, 2]))
        even = tl.math.exp2(even)
        if EXP_POLY == 2:
            odd = _exp2_poly(odd)
        else:
            # The odd columns a thread holds are 8 apart in runs of 4 (c = 8a + 4b + lane % 4 in the
            # MMA layout): split on b, so that each half stays in its thread's registers.
            odd = tl.permute(tl.reshape(odd, [ROWS, COLS // 16, 2, 4]), (0, 1, 3, 2))
            odd_a, odd_b = tl.split(odd)
            odd = tl.permute(tl.join(tl.math.exp2(odd_a), _exp2_poly(odd_b)), (0, 1, 3, 2))
            odd = tl.reshape(odd, [ROWS, COLS // 2])
        return tl.reshape(tl.join(even, odd), [ROWS, COLS])


@triton.jit
def _block_start(t, kv_idx_row, stride_idx_n, BLOCK_N: tl.constexpr, MASK_BLOCK_N: tl.constexpr,
                 SPARSE: tl.constexpr):
    """First key position of kernel key block t of the visit list."""
    SUB: tl.constexpr = MASK_BLOCK_N // BLOCK_N
    if SPARSE:
        kv_block = tl.load(kv_idx_row + (t // SUB) * stride_idx_n)
        start_n = kv_block * MASK_BLOCK_N + (t % SUB) * BLOCK_N
    else:
        start_n = t * BLOCK_N
    return start_n


@triton.jit
def _load_rows(ptrs, start_n, offs_n, offs_d, S, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
               MASK_TAIL: tl.constexpr):
    """A [BLOCK_N, BLOCK_D] K or V tile by pointers: keys past S (MASK_TAIL) and channels past HEAD_DIM
    read as zeros, no mask where neither can occur."""
    if MASK_TAIL:
        kv_mask = (start_n + offs_n)[:, None] < S
        if BLOCK_D != HEAD_DIM:
            kv_mask = kv_mask & (offs_d[None, :] < HEAD_DIM)
        return tl.load(ptrs, mask=kv_mask, other=0.0)
    elif BLOCK_D != HEAD_DIM:
        return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _load_k(
    start_n, K_bh, stride_kn, offs_n, offs_d, S,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, MASK_TAIL: tl.constexpr,
    K_desc, b, h, USE_TMA: tl.constexpr, QUANT: tl.constexpr,
):
    """The K tile of the key block at start_n (see _load_kv)."""
    if USE_TMA and QUANT > 0:
        k = K_desc.load([b, h, start_n.to(tl.int32), 0]).reshape(BLOCK_N, BLOCK_D)
    elif USE_TMA:
        k = K_desc.load([b, start_n.to(tl.int32), h, 0]).reshape(BLOCK_N, BLOCK_D)
    elif QUANT > 0:
        rows = start_n.to(tl.int64) + offs_n
        if QUANT == 3:
            offs_p = tl.arange(0, BLOCK_D // 2)
            kp = tl.load(K_bh + rows[:, None] * stride_kn + offs_p[None, :], mask=offs_p[None, :] < HEAD_DIM // 2, other=0)
            k = _unpack_int4(kp, BLOCK_N, BLOCK_D)
        elif BLOCK_D != HEAD_DIM:
            k = tl.load(K_bh + rows[:, None] * stride_kn + offs_d[None, :], mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            k = tl.load(K_bh + rows[:, None] * stride_kn + offs_d[None, :])
    else:
        k_ptrs = K_bh + start_n.to(tl.int64) * stride_kn + (offs_n[:, None] * stride_kn + offs_d[None, :])
        k = _load_rows(k_ptrs, start_n, offs_n, offs_d, S, BLOCK_D, HEAD_DIM, MASK_TAIL)
    return k


@triton.jit
def _load_v(
    start_n, V_bh, stride_vn, stride_vd, offs_n, offs_d, S,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, MASK_TAIL: tl.constexpr,
    V_desc, b, h, USE_TMA: tl.constexpr, QUANT: tl.constexpr,
):
    """The V tile ([BLOCK_N, BLOCK_D]) of the key block at start_n (see _load_kv)."""
    if USE_TMA and QUANT > 0:
        v = tl.trans(V_desc.load([b, h, 0, start_n.to(tl.int32)]).reshape(BLOCK_D, BLOCK_N))
    elif USE_TMA:
        v = V_desc.load([b, start_n.to(tl.int32), h, 0]).reshape(BLOCK_N, BLOCK_D)
    elif QUANT > 0:
        rows = start_n.to(tl.int64) + offs_n
        if BLOCK_D != HEAD_DIM:
            v = tl.load(V_bh + rows[:, None] + offs_d[None, :] * stride_vd, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            v = tl.load(V_bh + rows[:, None] + offs_d[None, :] * stride_vd)
    else:
        v_ptrs = V_bh + start_n.to(tl.int64) * stride_vn + (offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd)
        v = _load_rows(v_ptrs, start_n, offs_n, offs_d, S, BLOCK_D, HEAD_DIM, MASK_TAIL)
    return v


@triton.jit
def _load_kv(
    start_n, K_bh, V_bh, stride_kn, stride_vn, stride_vd, offs_n, offs_d, S,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, MASK_TAIL: tl.constexpr,
    K_desc, V_desc, b, h, USE_TMA: tl.constexpr, QUANT: tl.constexpr,
):
    """The K and V tiles of the key block starting at start_n.

    USE_TMA: K_desc / V_desc are tensor descriptors of the whole (B, S, H, D) tensors (QUANT: of the
    quantized (B, H, S_pad, D) K and (B, H, D, S_pad) V); the copy engine fills rows past S (and
    columns past D) with zeros, so no load mask is needed. QUANT buffers are zero-padded to whole
    tiles, so their rows need no mask either; int4 K comes packed and is unpacked here."""
    k = _load_k(start_n, K_bh, stride_kn, offs_n, offs_d, S, BLOCK_N, BLOCK_D, HEAD_DIM, MASK_TAIL,
                K_desc, b, h, USE_TMA, QUANT)
    v = _load_v(start_n, V_bh, stride_vn, stride_vd, offs_n, offs_d, S, BLOCK_N, BLOCK_D, HEAD_DIM, MASK_TAIL,
                V_desc, b, h, USE_TMA, QUANT)
    return k, v


@triton.jit
def _softmax_step(qk, start_n, acc, l_i, m_i, offs_n, S, qk_scale, MASK_TAIL: tl.constexpr,
                  P_LOG2_SCALE: tl.constexpr, EXP_POLY: tl.constexpr = 0):
    """Online softmax of one score tile: P (unnormalised, times 2**P_LOG2_SCALE, fp32) and the updated
    running state (l_i in the same units as P)."""
    if MASK_TAIL:
        qk = tl.where((start_n + offs_n)[None, :] < S, qk, float("-inf"))
    m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    if P_LOG2_SCALE != 0.0:
        x = qk * qk_scale - (m_ij - P_LOG2_SCALE)[:, None]
    else:
        x = qk * qk_scale - m_ij[:, None]
    p = _exp2_mixed(x, EXP_POLY)
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    return p, acc, l_i, m_ij


@triton.jit
def _scores(q, k, start_n, qk_scale, offs_n, KScale_bh, q_rows, q_mean,
            BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr, QUANT: tl.constexpr):
    """The score tile Q·K^T of one key block, fp32, and the scale that takes it to the log2 domain."""
    if QUANT == 0:
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
        tile_scale = qk_scale
    elif QUANT == 3:  # per-row scales, and the smoothed-away q_mean . k_j added back per key
        qk = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
        k_rows = tl.load(KScale_bh + start_n + offs_n)
        bias = tl.sum(q_mean[None, :] * k.to(tl.float32), 1) * k_rows
        qk = qk * (q_rows[:, None] * k_rows[None, :]) + bias[None, :]
        tile_scale = 1.0
    else:  # per-tile scales: one scalar for the whole score tile
        if QUANT == 1:
            qk = tl.dot(q, tl.trans(k))
        else:
            qk = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
        tile_scale = qk_scale * tl.load(KScale_bh + start_n // BLOCK_N)
    return qk, tile_scale


@triton.jit
def _softmax_pv(qk, tile_scale, v, start_n, acc, l_i, m_i, offs_n, S, MASK_TAIL: tl.constexpr,
                INPUT_PRECISION: tl.constexpr, QUANT: tl.constexpr, EMULATE_FP8: tl.constexpr,
                EXP_POLY: tl.constexpr):
    """Online softmax of one score tile, then acc += P·V."""
    if QUANT == 0:
        p, acc, l_i, m_i = _softmax_step(qk, start_n, acc, l_i, m_i, offs_n, S, tile_scale, MASK_TAIL, 0.0, EXP_POLY)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
    else:
        # P in units of 1/448 (e4m3's range), straight from the exponent: no multiply.
        p, acc, l_i, m_i = _softmax_step(qk, start_n, acc, l_i, m_i, offs_n, S, tile_scale, MASK_TAIL,
                                         LOG2_FP8_MAX, EXP_POLY)
        acc = tl.dot(_to_e4m3(p, EMULATE_FP8), v, acc)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,
    K_bh, V_bh, stride_kn, stride_vn, stride_vd,
    kv_idx_row, stride_idx_n,
    offs_n, offs_d, S, qk_scale,
    lo, hi,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    MASK_BLOCK_N: tl.constexpr, SPARSE: tl.constexpr, MASK_TAIL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    K_desc, V_desc, b, h, USE_TMA: tl.constexpr,
    QUANT: tl.constexpr, KScale_bh, q_rows, q_mean, EMULATE_FP8: tl.constexpr, EXP_POLY: tl.constexpr,
    PREFETCH_IDX: tl.constexpr = False,
):
    SUB: tl.constexpr = MASK_BLOCK_N // BLOCK_N
    if PREFETCH_IDX:
        nxt = tl.load(kv_idx_row + (lo // SUB) * stride_idx_n, mask=lo < hi, other=0)
    else:
        nxt = 0
    for t in tl.range(lo, hi, warp_specialize=WARP_SPECIALIZE):
        if PREFETCH_IDX:  # the next block's index loads during this block (its latency off the loop's path)
            start_n = nxt * MASK_BLOCK_N + (t % SUB) * BLOCK_N
            nxt = tl.load(kv_idx_row + ((t + 1) // SUB) * stride_idx_n, mask=t + 1 < hi, other=0)
        else:
            start_n = _block_start(t, kv_idx_row, stride_idx_n, BLOCK_N, MASK_BLOCK_N, SPARSE)
        k, v = _load_kv(start_n, K_bh, V_bh, stride_kn, stride_vn, stride_vd, offs_n, offs_d, S, BLOCK_N, BLOCK_D,
                        HEAD_DIM, MASK_TAIL, K_desc, V_desc, b, h, USE_TMA, QUANT)
        qk, tile_scale = _scores(q, k, start_n, qk_scale, offs_n, KScale_bh, q_rows, q_mean, BLOCK_N,
                                 INPUT_PRECISION, QUANT)
        acc, l_i, m_i = _softmax_pv(qk, tile_scale, v, start_n, acc, l_i, m_i, offs_n, S, MASK_TAIL,
                                    INPUT_PRECISION, QUANT, EMULATE_FP8, EXP_POLY)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_pipelined(
    acc, l_i, m_i, q,
    K_bh, V_bh, stride_kn, stride_vn, stride_vd,
    kv_idx_row, stride_idx_n,
    offs_n, offs_d, S, qk_scale, n_total,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    MASK_BLOCK_N: tl.constexpr, SPARSE: tl.constexpr, EVEN_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    K_desc, V_desc, b, h, USE_TMA: tl.constexpr,
    QUANT: tl.constexpr, KScale_bh, q_rows, q_mean, EMULATE_FP8: tl.constexpr, EXP_POLY: tl.constexpr,
):
    """All n_total key blocks with Q·K^T one block ahead: step t issues the scores of block t + 1, then
    the softmax and P·V of block t (whose scores the previous step issued). Only the last block can
    reach past S: it is the one the next-K load may mask (plain loads; TMA and the quantized buffers
    are zero-filled) and the epilogue's softmax masks."""
    TAIL: tl.constexpr = not EVEN_N
    # Prologue: the scores of block 0 (of a valid block even when the visit list is empty: index 0).
    start_n = _block_start(tl.full([], 0, tl.int32), kv_idx_row, stride_idx_n, BLOCK_N, MASK_BLOCK_N, SPARSE)
    if SPARSE:
        start_n = tl.where(n_total > 0, start_n, 0)
    k = _load_k(start_n, K_bh, stride_kn, offs_n, offs_d, S, BLOCK_N, BLOCK_D, HEAD_DIM, TAIL,
                K_desc, b, h, USE_TMA, QUANT)
    qk, tile_scale = _scores(q, k, start_n, qk_scale, offs_n, KScale_bh, q_rows, q_mean, BLOCK_N, INPUT_PRECISION,
                             QUANT)
    for t in range(0, n_total - 1):
        next_n = _block_start(t + 1, kv_idx_row, stride_idx_n, BLOCK_N, MASK_BLOCK_N, SPARSE)
        k = _load_k(next_n, K_bh, stride_kn, offs_n, offs_d, S, BLOCK_N, BLOCK_D, HEAD_DIM, TAIL,
                    K_desc, b, h, USE_TMA, QUANT)
        qk_next, scale_next = _scores(q, k, next_n, qk_scale, offs_n, KScale_bh, q_rows, q_mean, BLOCK_N,
                                      INPUT_PRECISION, QUANT)
        v = _load_v(start_n, V_bh, stride_vn, stride_vd, offs_n, offs_d, S, BLOCK_N, BLOCK_D, HEAD_DIM, False,
                    V_desc, b, h, USE_TMA, QUANT)
        acc, l_i, m_i = _softmax_pv(qk, tile_scale, v, start_n, acc, l_i, m_i, offs_n, S, False,
                                    INPUT_PRECISION, QUANT, EMULATE_FP8, EXP_POLY)
        qk, tile_scale, start_n = qk_next, scale_next, next_n
    # Epilogue: the last block (skipped when the list is empty: those rows keep l_i = 0).
    if n_total > 0:
        v = _load_v(start_n, V_bh, stride_vn, stride_vd, offs_n, offs_d, S, BLOCK_N, BLOCK_D, HEAD_DIM, TAIL,
                    V_desc, b, h, USE_TMA, QUANT)
        acc, l_i, m_i = _softmax_pv(qk, tile_scale, v, start_n, acc, l_i, m_i, offs_n, S, TAIL,
                                    INPUT_PRECISION, QUANT, EMULATE_FP8, EXP_POLY)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q, K, V, Out, Lse, KV_num, KV_idx, K_desc, V_desc, QScale, KScale, VScale, QMean, QIdx,
    stride_qb, stride_qs, stride_qh, stride_qib, stride_qih,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh,
    stride_numb, stride_numh, stride_numm,
    stride_idxb, stride_idxh, stride_idxm, stride_idxn,
    S, H, qk_scale, S_pad,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    MASK_BLOCK_M: tl.constexpr, MASK_BLOCK_N: tl.constexpr,
    SPARSE: tl.constexpr, EVEN_N: tl.constexpr, RETURN_LSE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    USE_TMA: tl.constexpr, QUANT: tl.constexpr, EMULATE_FP8: tl.constexpr,
    PIPELINE_QK: tl.constexpr = False, EXP_POLY: tl.constexpr = 0, Q_INDEXED: tl.constexpr = False,
    PREFETCH_IDX: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    start_m = pid_m.to(tl.int64) * BLOCK_M  # int64: S * stride_s may pass 2**31 (fused qkv, long S)
    offs_mt = tl.arange(0, BLOCK_M)  # row within the tile
    offs_m = pid_m * BLOCK_M + offs_mt
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = offs_m < S
    d_mask = offs_d < HEAD_DIM

    q_base = Q + b * stride_qb + h * stride_qh + start_m * stride_qs
    if Q_INDEXED:  # tile row i is token QIdx[b, h, start_m + i]: its Q row is read and its output row written there
        tok = tl.load(QIdx + b * stride_qib + h * stride_qih + offs_m, mask=row_mask, other=0).to(tl.int64)
        q_rows_off = ((tok - start_m) * stride_qs)[:, None]
    else:
        tok = offs_m.to(tl.int64)
        q_rows_off = offs_mt[:, None] * stride_qs
    bh = b * H + h
    q_rows = qk_scale  # QUANT: the per-row (int4) or per-tile Q scales; else unused
    q_mean = qk_scale
    KScale_bh = KScale
    if QUANT == 3:
        offs_p = tl.arange(0, BLOCK_D // 2)
        qp = tl.load(q_base + offs_mt[:, None] * stride_qs + offs_p[None, :], mask=offs_p[None, :] < HEAD_DIM // 2, other=0)
        q = _unpack_int4(qp, BLOCK_M, BLOCK_D)
        q_rows = tl.load(QScale + bh * S_pad + start_m + offs_mt)
        q_mean = tl.load(QMean + (bh * (S_pad // BLOCK_M) + pid_m) * HEAD_DIM + offs_d, mask=d_mask, other=0.0)
        KScale_bh = KScale + bh * S_pad
    elif QUANT > 0:  # fp8 / int8: Q's tile quantized here, one scale per tile (no pass over Q before)
        q = tl.load(q_base + q_rows_off + offs_d[None, :],
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        q, q_tile_scale = _quantize_tile(q, QUANT, EMULATE_FP8)
        qk_scale = q_tile_scale * qk_scale
        KScale_bh = KScale + bh * (S_pad // BLOCK_N)
    else:
        q_ptrs = q_base + q_rows_off + offs_d[None, :]
        q = tl.load(q_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    K_bh = K + b * stride_kb + h * stride_kh
    V_bh = V + b * stride_vb + h * stride_vh

    # How many kernel key blocks this program visits (n_total), and where their indices live.
    if SPARSE:
        SUB: tl.constexpr = MASK_BLOCK_N // BLOCK_N
        mask_row = (pid_m * BLOCK_M) // MASK_BLOCK_M
        kv_num = tl.load(KV_num + b * stride_numb + h * stride_numh + mask_row * stride_numm)
        kv_idx_row = KV_idx + b * stride_idxb + h * stride_idxh + mask_row * stride_idxm
        last_block = tl.load(kv_idx_row + (kv_num - 1) * stride_idxn, mask=kv_num > 0, other=0)
        last_sub = tl.minimum(tl.cdiv(S - last_block * MASK_BLOCK_N, BLOCK_N), SUB)
        n_total = tl.where(kv_num > 0, (kv_num - 1) * SUB + last_sub, 0)
    else:
        kv_idx_row = KV_idx
        n_total = tl.cdiv(S, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if PIPELINE_QK:
        acc, l_i, m_i = _attn_fwd_pipelined(
            acc, l_i, m_i, q, K_bh, V_bh, stride_ks, stride_vs, stride_vd, kv_idx_row, stride_idxn,
            offs_n, offs_d, S, qk_scale, n_total,
            BLOCK_N, BLOCK_D, HEAD_DIM, MASK_BLOCK_N, SPARSE, EVEN_N, INPUT_PRECISION,
            K_desc, V_desc, b.to(tl.int32), h.to(tl.int32), USE_TMA, QUANT, KScale_bh, q_rows, q_mean, EMULATE_FP8,
            EXP_POLY,
        )
    else:
        # The last visited block always runs in a loop of its own: masked when S % BLOCK_N != 0, and
        # even when it is not, because the main loop then pipelines better under warp specialization
        # (H100, triton 3.6: 512 -> 580 TFLOP/s at S = 119040, head_dim 128; measured 2026-11-22).
        n_full = tl.maximum(n_total - 1, 0)
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, K_bh, V_bh, stride_ks, stride_vs, stride_vd, kv_idx_row, stride_idxn,
            offs_n, offs_d, S, qk_scale, 0, n_full,
            BLOCK_N, BLOCK_D, HEAD_DIM, MASK_BLOCK_N, SPARSE, False, INPUT_PRECISION, WARP_SPECIALIZE,
            K_desc, V_desc, b.to(tl.int32), h.to(tl.int32), USE_TMA, QUANT, KScale_bh, q_rows, q_mean, EMULATE_FP8,
            EXP_POLY, PREFETCH_IDX and SPARSE,
        )
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, K_bh, V_bh, stride_ks, stride_vs, stride_vd, kv_idx_row, stride_idxn,
            offs_n, offs_d, S, qk_scale, n_full, n_total,
            BLOCK_N, BLOCK_D, HEAD_DIM, MASK_BLOCK_N, SPARSE, not EVEN_N, INPUT_PRECISION, False,
            K_desc, V_desc, b.to(tl.int32), h.to(tl.int32), USE_TMA, QUANT, KScale_bh, q_rows, q_mean, EMULATE_FP8,
            EXP_POLY,
        )

    # Rows that visited nothing (l_i == 0) write zeros and lse = -inf.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    if QUANT > 0:  # P and l_i both in units of 1/448; V in units of its channel scale
        v_scale = tl.load(VScale + bh * HEAD_DIM + offs_d, mask=d_mask, other=0.0)
        out = acc * v_scale[None, :] / l_safe[:, None]
    else:
        out = acc / l_safe[:, None]
    if Q_INDEXED:
        # The order read again (an L2 hit) rather than held across the loop: kept live, the int64 rows took
        # 17 registers more (ptxas, sm_90a: 251 vs 234) and the kernel ran 0.095 ms (3%) slower than on Q
        # moved first, with any index (an identity one too); reloaded, 0.03 ms faster (H100, triton 3.6,
        # wan 480p semantic mask, paired timing). The eviction hint keeps the compiler from merging this
        # load with the first one (which a volatile load also does, but cost 0.35 ms).
        tok = tl.load(QIdx + b * stride_qib + h * stride_qih + offs_m, mask=row_mask, other=0,
                      eviction_policy="evict_first").to(tl.int64)
        o_ptrs = Out + b * stride_ob + h * stride_oh + tok[:, None] * stride_os + offs_d[None, :]
    else:
        o_ptrs = Out + b * stride_ob + h * stride_oh + start_m * stride_os
        o_ptrs += offs_mt[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])
    if RETURN_LSE:
        LN2: tl.constexpr = 0.6931471805599453
        if QUANT > 0:
            lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe) - LOG2_FP8_MAX) * LN2)
        else:
            lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
        tl.store(Lse + (b * H + h) * S + tok, lse, mask=row_mask)


# ------------------------------------------------------------------------------------------------
# Launch configurations
# ------------------------------------------------------------------------------------------------

# Default configurations, keyed by (arch, head_dim bucket); the bucket is the smallest key >= D.
# sm90 values are the best found on an H100 (benchmarks/results/attention-sweep-*-20261122.json):
# TMA loads help at head_dim 64 and, with warp specialization, at 128. Where the input or the
# installed triton cannot do TMA / warp specialization, the default quietly drops them.
# "ampere" also serves Ada and anything unknown; its stages keep shared memory under ~100 KB.
# "gpu-fp32" serves float32 inputs on any GPU (exact "ieee" dots, twice the bytes: tests, not speed).
# "interpret" is for TRITON_INTERPRET=1 on a CPU, where small tiles keep tests quick.
DEFAULT_CONFIGS: dict[tuple[str, int], dict[str, int]] = {
    ("sm90", 64): dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4, tma=True),
    # prefetch_idx (sparse only): the next key block's index loads one block ahead. H100, triton 3.6, the
    # e2e's tiled window3d masks: wan 480p 1.516 -> 1.372 ms, 720p 5.686 -> 4.858 ms; every block listed:
    # 14.54 -> 11.67 ms = the dense kernel's 11.65 (bit-equal outputs; benchmarks/results/
    # attention-sweep-prefetch-*-20261122.json).
    ("sm90", 128): dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, tma=True, warp_specialize=True,
                        prefetch_idx=True),
    ("sm90", 256): dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    # Quantized (fp8 / int8 Q·K, fp8 P·V): half the tensor work per tile, so more CTAs per SM beat
    # bigger tiles (H100, wan 480p fp8: 8.50 ms at 64x128/4 warps vs 9.47 at 128x128/8 warps + ws).
    ("sm90-q", 64): dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3, tma=True),
    ("sm90-q", 128): dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3, tma=True),
    # fp8 sparse with the index prefetch: wan 480p 1.279 -> 1.191 ms, 720p 4.445 -> 4.132 ms (same file).
    ("sm90-fp8", 128): dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3, tma=True, prefetch_idx=True),
    # int8 gains from Q·K^T one block ahead (H100, triton 3.6: wan 480p 8.81 -> 8.34 ms, hunyuan 720p
    # 250.7 -> 241.2 ms); fp8 loses (8.24 -> 8.61 ms). benchmarks/results/quant-sweep-*-20261122.json.
    ("sm90-int8", 128): dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3, tma=True, pipeline_qk=True),
    ("ampere", 64): dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    ("ampere", 128): dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=2),
    ("ampere", 256): dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
    ("gpu-fp32", 64): dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
    ("gpu-fp32", 128): dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
    ("gpu-fp32", 256): dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2),
    ("interpret", 64): dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1),
    ("interpret", 128): dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1),
    ("interpret", 256): dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1),
}
_HEAD_DIM_BUCKETS = (64, 128, 256)
_CONFIG_KEYS = frozenset(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"))
_OPTIONAL_CONFIG_KEYS = {"warp_specialize": False, "tma": False, "pipeline_qk": False, "exp_poly": 0,
                         "prefetch_idx": False}
_MIN_HEAD_DIM, _MAX_HEAD_DIM = 16, 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _arch(device: torch.device, dtype: torch.dtype) -> str:
    if _interpreting() or device.type != "cuda":
        return "interpret"
    if dtype == torch.float32:
        return "gpu-fp32"
    major, _ = torch.cuda.get_device_capability(device)
    return "sm90" if major == 9 else "ampere"


def default_config(head_dim: int, device: torch.device, dtype: torch.dtype = torch.bfloat16,
                   quant: str | None = None) -> dict[str, int]:
    """The launch configuration used when ``config`` is None (before fitting it to the mask blocks).
    Quantized modes use the ``<arch>-<mode>`` entry, else the ``<arch>-q`` one, where there is one."""
    bucket = next(b for b in _HEAD_DIM_BUCKETS if head_dim <= b)
    arch = _arch(device, dtype)
    for key in ((arch + "-" + quant, bucket), (arch + "-q", bucket)) if quant is not None else ():
        if key in DEFAULT_CONFIGS:
            return dict(DEFAULT_CONFIGS[key])
    return dict(DEFAULT_CONFIGS[(arch, bucket)])


def gpu_tiles(head_dim: int, quant: str | None = None) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the H100 default for this head_dim and mode (what the CPU simulation of
    the quantized kernel mimics: the tiles set the quantization grain)."""
    bucket = next(b for b in _HEAD_DIM_BUCKETS if head_dim <= b)
    cfg = DEFAULT_CONFIGS.get(("sm90-q", bucket), DEFAULT_CONFIGS[("sm90", bucket)]) if quant else DEFAULT_CONFIGS[("sm90", bucket)]
    return cfg["BLOCK_M"], cfg["BLOCK_N"]


# The opt-in sweep (config="autotune"): per head_dim bucket, the candidates tried on the real
# inputs, once per (GPU, dtype, shape, mask blocks), best kept in memory and in a JSON file.
AUTOTUNE_CANDIDATES: dict[int, list[dict]] = {
    64: [dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4, tma=True),
         dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4),
         dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4, tma=True, warp_specialize=True),
         dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, tma=True),
         dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, tma=True),
         dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)],
    128: [dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, tma=True, warp_specialize=True, prefetch_idx=True),
          dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, tma=True, prefetch_idx=True),
          dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3, tma=True, prefetch_idx=True),
          dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, tma=True, warp_specialize=True),
          dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3, tma=True),
          dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2, tma=True),
          dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=4, tma=True),
          dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4, tma=True),
          dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, tma=True),
          dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
          dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4, tma=True, warp_specialize=True),
          dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=2),
          dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
          # Q·K^T one block ahead (the int8 default). exp_poly is not a candidate: slower in every
          # configuration measured (H100, 2026-11-22, quant-sweep-*.json: fp8 8.24 -> 8.99-10.64 ms).
          dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3, tma=True, pipeline_qk=True)],
    256: [dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
          dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
          dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2)],
}
_autotuned: dict[str, dict] = {}
try:
    from triton.errors import TritonError as _TritonError
except ImportError:  # older triton: compile errors derive from Exception directly
    _TritonError = Exception
_COMPILE_ERRORS = (RuntimeError, _TritonError)


def _can_time(q: torch.Tensor) -> bool:
    return q.device.type == "cuda" and not _interpreting()


def cache_dir() -> str:
    """Where measurements made on this machine are kept ($VDIT_AUTOTUNE_CACHE, else ~/.cache/vdit_accel)."""
    return os.environ.get("VDIT_AUTOTUNE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "vdit_accel"))


def _autotune_file() -> str:
    return os.path.join(cache_dir(), f"autotune-triton{triton.__version__}.json")


def _autotune(q, k, v, sparse_args, mask_block_m, mask_block_n, run, quant=None) -> dict:
    """The fastest candidate config for these inputs (timed once, then cached)."""
    import json

    bsz, s, h, d = q.shape
    name = torch.cuda.get_device_name(q.device) if q.device.type == "cuda" else "cpu"
    key = f"{name}|{q.dtype}|{bsz}x{s}x{h}x{d}|{'sparse' if sparse_args else 'dense'}|{mask_block_m}x{mask_block_n}"
    if quant is not None:
        key += f"|{quant}"
    if not _autotuned:
        with contextlib.suppress(OSError, ValueError):
            with open(_autotune_file()) as f:
                _autotuned.update(json.load(f))
    if key in _autotuned:
        return dict(_autotuned[key])
    if not _can_time(q):
        return default_config(d, q.device, q.dtype, quant)
    from triton.testing import do_bench

    bucket = next(b for b in _HEAD_DIM_BUCKETS if d <= b)
    best, best_ms = None, float("inf")
    for cand in AUTOTUNE_CANDIDATES[bucket]:
        if sparse_args and (mask_block_m % cand["BLOCK_M"] or mask_block_n % cand["BLOCK_N"]):
            continue
        if cand.get("tma") and not (_tma_ok(k) and _tma_ok(v)):
            continue
        if cand.get("warp_specialize") and not _supports_warp_specialize():
            continue
        try:
            ms = do_bench(lambda: run(cand), warmup=5, rep=25, return_mode="median")
        except _COMPILE_ERRORS:  # a candidate the compiler rejects here (shared memory, a pass failure)
            continue
        if ms < best_ms:
            best, best_ms = dict(cand), ms
    if best is None:
        return default_config(d, q.device, q.dtype, quant)
    _autotuned[key] = best
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(_autotune_file()), exist_ok=True)
        with open(_autotune_file(), "w") as f:
            json.dump(_autotuned, f, indent=1)
    return dict(best)


@functools.cache
def _supports_warp_specialize() -> bool:
    import inspect

    return "warp_specialize" in inspect.signature(tl.range.__init__).parameters


@functools.cache
def _ws_prefetch_ok() -> bool:
    """Warp specialization of the prefetching sparse loop compiles (and was measured) with triton 3.4-3.6;
    triton 3.9's pass pipeline fails on it (sm_90 compile, 2026-11-22). Elsewhere the default drops
    warp specialization there (the prefetch is the larger gain: 480p 1.385 vs 1.372 ms with it)."""
    try:
        major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    except ValueError:
        return False
    return (3, 4) <= (major, minor) <= (3, 6)


def _tma_ok(x: torch.Tensor) -> bool:
    try:
        import triton.tools.tensor_descriptor  # noqa: F401
    except ImportError:
        return False
    elem = x.element_size()
    return x.data_ptr() % 16 == 0 and all((st * elem) % 16 == 0 for st in x.stride()[:-1])


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def _check_config(config: dict, mask_block_m: int, mask_block_n: int, sparse: bool) -> dict[str, int]:
    unknown = set(config) - _CONFIG_KEYS - set(_OPTIONAL_CONFIG_KEYS)
    missing = _CONFIG_KEYS - set(config)
    if unknown or missing:
        raise ValueError(
            f"config must have exactly the keys {sorted(_CONFIG_KEYS)}; "
            f"unknown: {sorted(unknown)}, missing: {sorted(missing)}"
        )
    cfg = {key: int(config[key]) for key in _CONFIG_KEYS}
    cfg.update({key: config.get(key, default) for key, default in _OPTIONAL_CONFIG_KEYS.items()})
    for key in ("BLOCK_M", "BLOCK_N"):
        if not _is_pow2(cfg[key]) or cfg[key] < 16:
            raise ValueError(f"config[{key!r}] must be a power of two >= 16, got {cfg[key]}")
    if cfg["exp_poly"] not in (0, 1, 2, 4):
        raise ValueError(f"config['exp_poly'] is the quarters of P's columns whose exp2 is emulated: 0, 1, 2 or 4, "
                         f"got {cfg['exp_poly']!r}")
    if cfg["pipeline_qk"] and cfg["warp_specialize"]:
        raise ValueError("config pipeline_qk=True orders the loop by hand; it does not combine with "
                         "warp_specialize=True: set one of them to False")
    if sparse:
        if mask_block_m % cfg["BLOCK_M"]:
            raise ValueError(
                f"BLOCK_M={cfg['BLOCK_M']} must divide mask_block_m={mask_block_m}: a query tile may not "
                "straddle two mask query blocks; use a smaller BLOCK_M"
            )
        if mask_block_n % cfg["BLOCK_N"]:
            raise ValueError(
                f"BLOCK_N={cfg['BLOCK_N']} must divide mask_block_n={mask_block_n}; use a smaller BLOCK_N"
            )
    return cfg


def _fit_default_to_mask(cfg: dict[str, int], mask_block_m: int, mask_block_n: int) -> dict[str, int]:
    """Shrink the default tiles so they divide the mask blocks (only for config=None)."""
    cfg = dict(cfg)
    cfg["BLOCK_M"] = math.gcd(cfg["BLOCK_M"], mask_block_m)
    cfg["BLOCK_N"] = math.gcd(cfg["BLOCK_N"], mask_block_n)
    if cfg["BLOCK_M"] < 16 or cfg["BLOCK_N"] < 16:
        raise ValueError(
            f"mask blocks ({mask_block_m}, {mask_block_n}) admit no kernel tile: use mask block sizes that "
            "are multiples of 16 (powers of two, ideally 64 or 128)"
        )
    return cfg


# ------------------------------------------------------------------------------------------------
# Launcher
# ------------------------------------------------------------------------------------------------


def _tensor_descriptor(x: torch.Tensor, block_n: int, block_d: int):
    """A host-side TMA descriptor of a (B, S, H, D) tensor, one (1, block_n, 1, block_d) box per load."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if not _tma_ok(x):
        raise ValueError(
            f"config tma=True needs 16-byte aligned strides and base; got strides {tuple(x.stride())} "
            f"({x.element_size()}-byte elements): use tma=False for this input"
        )
    return TensorDescriptor(x, list(x.shape), list(x.stride()), [1, block_n, 1, block_d])


def _check_qkv(q, k, v):
    """What every launch needs of q, k, v (cheap: shapes, dtypes, devices, strides; no device work)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, S, H, D), got shape {tuple(x.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            "q, k and v must have the same shape (B, S, H, D); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} (layout is (B, S, H, D), not (B, H, S, D))"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"dtype {q.dtype} is not supported; use torch.float16 or torch.bfloat16 (float32 for tests)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda" and not (q.device.type == "cpu" and _interpreting()):
        raise ValueError(
            f"attention_fwd runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1); got {q.device}"
        )
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.stride(-1) != 1:
            raise ValueError(
                f"{name}'s last dim (head_dim) must have stride 1, got strides {tuple(x.stride())}; "
                "call .contiguous() on it or pass a view whose head_dim is contiguous"
            )
    d = q.shape[-1]
    if not (_MIN_HEAD_DIM <= d <= _MAX_HEAD_DIM and d % 8 == 0):
        raise ValueError(
            f"head_dim {d} is not supported: use a multiple of 8 between {_MIN_HEAD_DIM} and {_MAX_HEAD_DIM} "
            "(64, 96 and 128 are the tuned ones)"
        )


def _check_mask(q, kv_num_blocks, kv_indices, mask_block_m, mask_block_n):
    if (kv_num_blocks is None) != (kv_indices is None):
        raise ValueError("pass both kv_num_blocks and kv_indices for sparse attention, or neither for dense")
    if kv_num_blocks is None:
        return
    b, s, h, _ = q.shape
    for name, x, ndim in (("kv_num_blocks", kv_num_blocks, 3), ("kv_indices", kv_indices, 4)):
        if not isinstance(x, torch.Tensor) or x.dim() != ndim:
            shape = "[Bm, H, Mb]" if ndim == 3 else "[Bm, H, Mb, Nb]"
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a {ndim}-D tensor {shape}, got {got}")
        if x.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; move the mask with .to(q.device)")
    for name, blk in (("mask_block_m", mask_block_m), ("mask_block_n", mask_block_n)):
        if not isinstance(blk, int) or blk <= 0:
            raise ValueError(f"{name} must be a positive int, got {blk!r}")
    mb, nb = triton.cdiv(s, mask_block_m), triton.cdiv(s, mask_block_n)
    bm = kv_num_blocks.shape[0]
    if bm not in (1, b):
        raise ValueError(f"mask batch dim must be 1 (broadcast) or B={b}, got {bm}")
    if tuple(kv_num_blocks.shape) != (bm, h, mb):
        raise ValueError(
            f"kv_num_blocks must have shape [Bm, H, Mb] = [{bm}, {h}, {mb}] for S={s}, mask_block_m={mask_block_m}; "
            f"got {tuple(kv_num_blocks.shape)}"
        )
    if tuple(kv_indices.shape) != (bm, h, mb, nb):
        raise ValueError(
            f"kv_indices must have shape [Bm, H, Mb, Nb] = [{bm}, {h}, {mb}, {nb}] for S={s}, "
            f"blocks ({mask_block_m}, {mask_block_n}); got {tuple(kv_indices.shape)}"
        )


def _check_q_index(q, q_index):
    bsz, s, h, _ = q.shape
    if (not isinstance(q_index, torch.Tensor) or q_index.dim() != 3 or q_index.shape[0] not in (1, bsz)
            or tuple(q_index.shape[1:]) != (h, s) or q_index.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"q_index must be an int32/int64 tensor [1 or {bsz}, {h}, {s}], got "
                         f"{tuple(q_index.shape) if isinstance(q_index, torch.Tensor) else type(q_index).__name__}"
                         f"{' ' + str(q_index.dtype) if isinstance(q_index, torch.Tensor) else ''}")
    if q_index.device != q.device:
        raise ValueError(f"q_index is on {q_index.device} but q is on {q.device}")


def attention_fwd(q, k, v, kv_num_blocks=None, kv_indices=None, mask_block_m=128, mask_block_n=128,
                  scale=None, return_lse=False, config=None, quant=None, out=None, q_index=None):
    """q, k, v: (B, S, H, D) read through strides (no transposed/contiguous copies; last dim must have stride 1).
    Returns out (B, S, H, D) same dtype as q (contiguous), and lse float32 (B, H, S) natural-log log-sum-exp if return_lse.

    Sparse when ``kv_num_blocks`` (int32 [Bm, H, Mb]) and ``kv_indices`` (int32 [Bm, H, Mb, Nb]) are given,
    with Mb = cdiv(S, mask_block_m), Nb = cdiv(S, mask_block_n), Bm in (1, B): query token i attends key
    token j iff ``j // mask_block_n`` is among the first ``kv_num_blocks[b, h, i // mask_block_m]`` entries
    of ``kv_indices[b, h, i // mask_block_m]``. Those entries must be ascending, distinct and < Nb (not
    checked: it would need a device sync); entries past the count are never read. A query block with no
    key block gives zeros and lse = -inf.

    Args:
        scale: softmax scale, default 1 / sqrt(D).
        config: None (``DEFAULT_CONFIGS`` by GPU arch and head_dim, shrunk to divide the mask blocks;
            no tuning cost), ``"autotune"`` (time ``AUTOTUNE_CANDIDATES`` once per GPU, dtype, shape and
            mask blocks, keep the fastest in memory and in ``$VDIT_AUTOTUNE_CACHE`` or
            ``~/.cache/vdit_accel``), or a dict {BLOCK_M, BLOCK_N, num_warps, num_stages, and optionally
            tma, warp_specialize, pipeline_qk (Q·K^T one block ahead of the softmax), exp_poly (0, 1, 2
            or 4 quarters of P's exp2 on the FMA pipe), prefetch_idx (sparse: the next key block's index
            loaded a block ahead; with warp_specialize it compiles on triton 3.4-3.6 only)}; BLOCK_M must divide mask_block_m and BLOCK_N
            mask_block_n.
        quant: None, or ``"fp8"`` / ``"int8"`` / ``"int4"``: quantize q, k, v first
            (``kernels/quantize.py``, recipes in ``vdit_accel/quant.py``) and run the quantized kernel.
        out: optional (B, S, H, D) tensor of q's dtype (any strides, last dim contiguous) to write into,
            e.g. a head slice of a bigger output.
        q_index: optional int ``[Bi, H, S]`` (Bi 1 or B; int32 or int64, last dim contiguous), a
            permutation of ``range(S)`` per (batch, head) (not checked: it would need a device sync):
            query position ``i`` of the kernel is token ``q_index[b, h, i]`` — its Q row is read from
            there and its output (and LSE) row written there. The block mask's query blocks are
            positions in that order, and k, v must already be in the key order; the output stays in
            q's own order. This replaces gathering Q into the order and scattering the output back
            (two passes over (B, S, H, D)). With int4, Q is gathered first (its scales are per tile).
    """
    _check_qkv(q, k, v)
    _check_mask(q, kv_num_blocks, kv_indices, mask_block_m, mask_block_n)
    quant = QuantMode.parse(quant)
    if quant is not None and q.dtype == torch.float32:
        raise ValueError("quantized attention takes fp16/bf16 inputs, got float32")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1):
        raise ValueError(f"out must be a {tuple(q.shape)} {q.dtype} tensor on {q.device} with a contiguous last dim")
    if q_index is not None:
        _check_q_index(q, q_index)
    sparse = kv_num_blocks is not None
    if config == "autotune":
        def run(c):
            return attention_fwd(q, k, v, kv_num_blocks, kv_indices, mask_block_m=mask_block_m,
                                 mask_block_n=mask_block_n, scale=scale, return_lse=return_lse, config=c, quant=quant)

        cfg = _autotune(q, k, v, (kv_num_blocks, kv_indices) if sparse else (), mask_block_m, mask_block_n, run, quant)
        if sparse:
            cfg = _fit_default_to_mask(cfg, mask_block_m, mask_block_n)
        config = _check_config(cfg, mask_block_m, mask_block_n, sparse)
    elif isinstance(config, dict):
        config = _check_config(config, mask_block_m, mask_block_n, sparse)
    elif config is not None:
        raise ValueError(f"config must be None, 'autotune' or a dict, got {config!r}")
    return launch(q, k, v, kv_num_blocks, kv_indices, mask_block_m, mask_block_n, scale, return_lse, config, quant,
                  out, q_index)


@functools.lru_cache(maxsize=None)
def _launch_config(head_dim: int, device: torch.device, dtype: torch.dtype, quant, mask_block_m: int,
                   mask_block_n: int, sparse: bool, tma_ok: bool) -> dict:
    """The default configuration of one launch shape, fitted to the mask blocks and to what this input
    (``tma_ok``: K and V are TMA-aligned) and the installed triton can do; computed once per shape."""
    cfg = default_config(head_dim, device, dtype, quant)
    if sparse:
        cfg = _fit_default_to_mask(cfg, mask_block_m, mask_block_n)
    cfg = {**_OPTIONAL_CONFIG_KEYS, **cfg}
    if cfg["tma"] and not tma_ok:
        cfg["tma"] = False
    if cfg["warp_specialize"] and not (cfg["tma"] and _supports_warp_specialize()):
        cfg["warp_specialize"] = False
    if sparse and cfg["warp_specialize"] and cfg["prefetch_idx"] and not _ws_prefetch_ok():
        cfg["warp_specialize"] = False
    return _int4_config(cfg, quant)


def _int4_config(cfg: dict, quant) -> dict:
    if quant is QuantMode.INT4:  # packed int4 rows are not TMA-loaded; int4's per-key bias is not pipelined
        cfg = {**cfg, "tma": False, "warp_specialize": False, "pipeline_qk": False}
    return cfg


def launch(q, k, v, kv_num_blocks, kv_indices, mask_block_m, mask_block_n, scale, return_lse, config, quant, out,
           q_index):
    """:func:`attention_fwd` on inputs already validated: ``config`` None (the cached default for this
    launch shape) or a checked dict; ``quant`` a :class:`QuantMode` or None. The caller vouches for the
    mask (shapes for ``S = q.shape[1]``, int32, on q's device) and for ``q_index``; q, k, v still get the
    cheap checks of :func:`_check_qkv` in :func:`attention_fwd` only -- this is the per-call path of a
    compiled layer plan, whose masks were built for the call's grid."""
    sparse = kv_num_blocks is not None
    bsz, s, h, d = q.shape
    if config is None:
        cfg = _launch_config(d, q.device, q.dtype, quant, mask_block_m, mask_block_n, sparse, True)
        if cfg["tma"] and not (_tma_ok(k) and _tma_ok(v)):
            cfg = _launch_config(d, q.device, q.dtype, quant, mask_block_m, mask_block_n, sparse, False)
    else:
        cfg = _int4_config(config, quant)
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if q_index is not None and q_index.stride(2) != 1:
        q_index = q_index.contiguous()
    if out is None:
        out = torch.empty((bsz, s, h, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((bsz, h, s), dtype=torch.float32, device=q.device) if return_lse else None
    if out.numel() == 0:
        if return_lse:
            lse.fill_(float("-inf"))
        return (out, lse) if return_lse else out

    if sparse:
        bm = kv_num_blocks.shape[0]
        num_strides = (0 if bm == 1 else kv_num_blocks.stride(0),) + tuple(kv_num_blocks.stride()[1:])
        idx_strides = (0 if bm == 1 else kv_indices.stride(0),) + tuple(kv_indices.stride()[1:])
        mask_m, mask_n = mask_block_m, mask_block_n
    else:
        # Dummies: never read when SPARSE=False. Mask block = kernel block keeps one compiled variant.
        kv_num_blocks = kv_indices = out
        num_strides, idx_strides = (0, 0, 0), (0, 0, 0, 0)
        mask_m, mask_n = cfg["BLOCK_M"], cfg["BLOCK_N"]

    block_d = max(16, 1 << (d - 1).bit_length())
    qk_scale = float(scale) * 1.4426950408889634
    q_scale = k_scale = v_scale = q_mean = out  # unused pointers unless quant
    s_pad, stride_vd = s, 1
    q_orig = q
    if quant is QuantMode.INT4 and q_index is not None:  # Q's per-tile scales need Q in the kernel's order first
        from .permute import gather_rows

        q = gather_rows([q], q_index)[0]
    if quant is not None:
        from .quantize import quantize_qkv

        qz = quantize_qkv(q, k, v, quant, cfg["BLOCK_M"], cfg["BLOCK_N"], qk_scale)
        s_pad = qz["s_pad"]
        k_scale, v_scale = qz["k_scale"], qz["v_scale"]
        if qz["q"] is not None:  # int4: Q quantized ahead (fp8 / int8 quantize Q's tile in the kernel)
            q, q_scale, qk_scale = qz["q"].permute(0, 2, 1, 3), qz["q_scale"], 1.0
            q_mean = qz["q_mean"]
        # (B, H, S_pad, D') viewed as (B, S_pad, H, D'); V (B, H, D, S_pad) likewise (stride_vd = S_pad).
        k = qz["k"].permute(0, 2, 1, 3)
        v, stride_vd = qz["v"].permute(0, 3, 1, 2), s_pad
    k_desc, v_desc = k, v  # unused pointers unless tma
    if cfg["tma"] and quant is not None:
        from triton.tools.tensor_descriptor import TensorDescriptor

        kq, vq = qz["k"], qz["v"]
        k_desc = TensorDescriptor(kq, list(kq.shape), list(kq.stride()), [1, 1, cfg["BLOCK_N"], block_d])
        v_desc = TensorDescriptor(vq, list(vq.shape), list(vq.stride()), [1, 1, block_d, cfg["BLOCK_N"]])
    elif cfg["tma"]:
        k_desc, v_desc = (_tensor_descriptor(x, cfg["BLOCK_N"], block_d) for x in (k, v))
    grid = (-(-s // cfg["BLOCK_M"]), bsz * h)
    interpreting = _interpreting()
    with torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext():
        _attn_fwd[grid](
            q, k, v, out, lse if return_lse else out, kv_num_blocks, kv_indices, k_desc, v_desc,
            q_scale, k_scale, v_scale, q_mean, out if q_index is None else q_index,
            q.stride(0), q.stride(1), q.stride(2),
            *((0, 0) if q_index is None else (0 if q_index.shape[0] == 1 else q_index.stride(0), q_index.stride(1))),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), stride_vd,
            out.stride(0), out.stride(1), out.stride(2),
            *num_strides, *idx_strides,
            s, h, qk_scale, s_pad,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d,
            HEAD_DIM=d, MASK_BLOCK_M=mask_m, MASK_BLOCK_N=mask_n,
            SPARSE=sparse, EVEN_N=(s % cfg["BLOCK_N"] == 0), RETURN_LSE=bool(return_lse),
            INPUT_PRECISION="ieee" if q.dtype == torch.float32 else None,
            WARP_SPECIALIZE=bool(cfg["warp_specialize"]) and not interpreting,
            USE_TMA=bool(cfg["tma"]), QUANT=0 if quant is None else quant.kernel_id, EMULATE_FP8=interpreting,
            PIPELINE_QK=bool(cfg["pipeline_qk"]), EXP_POLY=int(cfg["exp_poly"]),
            Q_INDEXED=q_index is not None, PREFETCH_IDX=bool(cfg["prefetch_idx"]),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    if return_lse and quant is not None and qz["k_mean"] is not None:
        # K smoothing shifted every score of a row by -q . mean(K): the outputs ignore it, the LSE not.
        lse += float(scale) * torch.einsum("bshd,bhd->bhs", q_orig.float(), qz["k_mean"])
    return (out, lse) if return_lse else out
