"""The forward attention kernel in Triton: dense and block-sparse, unquantized and quantized, one family.

Inference only, non-causal, (B, S, H, D) layout read through strides. Sparsity is data: the CSR-like
block lists ``kv_num_blocks [Bm, H, Mb]`` / ``kv_indices [Bm, H, Mb, Nb]`` (FlexAttention's ``BlockMask``
tensors; ``Bm`` is 1 or B). Variants are constexpr flags of :func:`_attn_fwd` (see the notation below);
its launch configurations are in :mod:`.attention_configs`, its launcher in :mod:`.attention_fwd`.

This module imports only triton: it is the bottom layer and takes raw pointers.
"""

import triton
import triton.language as tl

from .quantize import _quantize_tile, _to_e4m3

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
#                   kernels/quantize.py -- except that int8 (2) keeps V as given and P V in 16 bits (P in
#                   V's dtype, fp32 accumulation; V8 below is False): SageAttention's recipe, whose
#                   accuracy e4m3 P and V cannot reach (benchmarks/results/quant-accuracy-cpu-*.json).
#                   Otherwise
#                   kernels/quantize.py (Q, K (B, H, S_pad, D) viewed as (B, S_pad, H, D); V e4m3
#                   (B, H, D, S_pad) viewed the same way, so stride_vd = S_pad and its rows are
#                   contiguous), zero past S; Q/K scales per tile (per row for int4) carry qk_scale,
#                   P is quantized to e4m3 (times 448) for P @ V, V's per-channel scale is applied at
#                   the end. See vdit_accel/quant.py for the recipes and their reference.
#   PIPELINE_QK     software-pipelined Q·K^T (FlashAttention-3's intra-warpgroup overlap): the score tile
#                   of block t + 1 is issued before the softmax and P·V of block t (one score tile more
#                   in registers): _attn_fwd_pipelined, the same steps as _attn_fwd_inner in that order.
#                   Not with int4 or WARP_SPECIALIZE. The int8 default on Hopper (measured faster there,
#                   slower for fp8: the quant sweep in benchmarks/RESULTS.md). (2026-11-22, triton 3.9
#                   compiling for sm_90: the PTX still has wgmma.wait_group 0 right after the next tile's
#                   Q·K^T is issued -- Triton leaves a dot in flight only when its result feeds a later
#                   dot's accumulator -- so within a warp nothing overlaps; the gain is across warps.)
#   PREFETCH_IDX    sparse: the index of key block t + 1 is loaded while block t is processed (a loop-carried
#                   scalar), so the TMA / pointer loads of the next block wait on no index load (on
#                   Hopper: the sparse loop with every block listed then runs at the dense loop's speed).
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
    V8: tl.constexpr = QUANT == 1 or QUANT == 3  # V in e4m3, transposed (B, H, D, S_pad)
    if USE_TMA and V8:
        v = tl.trans(V_desc.load([b, h, 0, start_n.to(tl.int32)]).reshape(BLOCK_D, BLOCK_N))
    elif USE_TMA:
        v = V_desc.load([b, start_n.to(tl.int32), h, 0]).reshape(BLOCK_N, BLOCK_D)
    elif V8:
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
                  P_LOG2_SCALE: tl.constexpr):
    """Online softmax of one score tile: P (unnormalised, times 2**P_LOG2_SCALE, fp32) and the updated
    running state (l_i in the same units as P)."""
    if MASK_TAIL:
        qk = tl.where((start_n + offs_n)[None, :] < S, qk, float("-inf"))
    m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    if P_LOG2_SCALE != 0.0:
        x = qk * qk_scale - (m_ij - P_LOG2_SCALE)[:, None]
    else:
        x = qk * qk_scale - m_ij[:, None]
    p = tl.math.exp2(x)
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
                INPUT_PRECISION: tl.constexpr, QUANT: tl.constexpr, EMULATE_FP8: tl.constexpr):
    """Online softmax of one score tile, then acc += P·V."""
    if QUANT == 0 or QUANT == 2:  # P V in V's 16-bit dtype
        p, acc, l_i, m_i = _softmax_step(qk, start_n, acc, l_i, m_i, offs_n, S, tile_scale, MASK_TAIL, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
    else:
        # P in units of 1/448 (e4m3's range), straight from the exponent: no multiply.
        p, acc, l_i, m_i = _softmax_step(qk, start_n, acc, l_i, m_i, offs_n, S, tile_scale, MASK_TAIL,
                                         LOG2_FP8_MAX)
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
    QUANT: tl.constexpr, KScale_bh, q_rows, q_mean, EMULATE_FP8: tl.constexpr,
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
                                    INPUT_PRECISION, QUANT, EMULATE_FP8)
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
    QUANT: tl.constexpr, KScale_bh, q_rows, q_mean, EMULATE_FP8: tl.constexpr,
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
                                    INPUT_PRECISION, QUANT, EMULATE_FP8)
        qk, tile_scale, start_n = qk_next, scale_next, next_n
    # Epilogue: the last block (skipped when the list is empty: those rows keep l_i = 0).
    if n_total > 0:
        v = _load_v(start_n, V_bh, stride_vn, stride_vd, offs_n, offs_d, S, BLOCK_N, BLOCK_D, HEAD_DIM, TAIL,
                    V_desc, b, h, USE_TMA, QUANT)
        acc, l_i, m_i = _softmax_pv(qk, tile_scale, v, start_n, acc, l_i, m_i, offs_n, S, TAIL,
                                    INPUT_PRECISION, QUANT, EMULATE_FP8)
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
    PIPELINE_QK: tl.constexpr = False, Q_INDEXED: tl.constexpr = False,
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
        )
    else:
        # The last visited block always runs in a loop of its own: masked when S % BLOCK_N != 0, and
        # even when it is not, because the main loop then pipelines better under warp specialization
        # (triton 3.6 on Hopper, 2026-11-22: measurably faster at long S, head_dim 128).
        n_full = tl.maximum(n_total - 1, 0)
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, K_bh, V_bh, stride_ks, stride_vs, stride_vd, kv_idx_row, stride_idxn,
            offs_n, offs_d, S, qk_scale, 0, n_full,
            BLOCK_N, BLOCK_D, HEAD_DIM, MASK_BLOCK_N, SPARSE, False, INPUT_PRECISION, WARP_SPECIALIZE,
            K_desc, V_desc, b.to(tl.int32), h.to(tl.int32), USE_TMA, QUANT, KScale_bh, q_rows, q_mean, EMULATE_FP8,
            PREFETCH_IDX and SPARSE,
        )
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, K_bh, V_bh, stride_ks, stride_vs, stride_vd, kv_idx_row, stride_idxn,
            offs_n, offs_d, S, qk_scale, n_full, n_total,
            BLOCK_N, BLOCK_D, HEAD_DIM, MASK_BLOCK_N, SPARSE, not EVEN_N, INPUT_PRECISION, False,
            K_desc, V_desc, b.to(tl.int32), h.to(tl.int32), USE_TMA, QUANT, KScale_bh, q_rows, q_mean, EMULATE_FP8,
        )

    # Rows that visited nothing (l_i == 0) write zeros and lse = -inf.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    V8: tl.constexpr = QUANT == 1 or QUANT == 3
    if V8:  # P and l_i both in units of 1/448; V in units of its channel scale
        v_scale = tl.load(VScale + bh * HEAD_DIM + offs_d, mask=d_mask, other=0.0)
        out = acc * v_scale[None, :] / l_safe[:, None]
    else:
        out = acc / l_safe[:, None]
    if Q_INDEXED:
        # The order read again (an L2 hit) rather than held across the loop: kept live, the int64 rows
        # cost 17 registers more (ptxas sm_90a, triton 3.6, 2026-11-22) and made the kernel slower than on
        # Q moved first; reloaded, it is not. The eviction hint keeps the compiler from merging this load
        # with the first one (a volatile load does too, but is much slower).
        tok = tl.load(QIdx + b * stride_qib + h * stride_qih + offs_m, mask=row_mask, other=0,
                      eviction_policy="evict_first").to(tl.int64)
        o_ptrs = Out + b * stride_ob + h * stride_oh + tok[:, None] * stride_os + offs_d[None, :]
    else:
        o_ptrs = Out + b * stride_ob + h * stride_oh + start_m * stride_os
        o_ptrs += offs_mt[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])
    if RETURN_LSE:
        LN2: tl.constexpr = 0.6931471805599453
        if V8:
            lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe) - LOG2_FP8_MAX) * LN2)
        else:
            lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
        tl.store(Lse + (b * H + h) * S + tok, lse, mask=row_mask)
