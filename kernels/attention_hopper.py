"""The Hopper (sm_90) attention forward in Gluon: FlashAttention-3's schedule, dense and block-sparse.

The same contract as the portable Triton kernel of :mod:`.attention` (the launcher in
:mod:`.attention_fwd` picks one): (B, S, H, D) read through strides, any S, per-head block lists
(``kv_num_blocks`` / ``kv_indices``), ``q_index``, the log-sum-exp, fp16 / bf16. Not here (the launcher
falls back to the Triton kernel, logged once): head_dim other than 64 and 128, quantized modes,
float32, inputs whose strides TMA cannot read.

Why Gluon: Triton's ``tl.dot`` pipeline waits on every wgmma, so the overlap FlashAttention-3 builds
(softmax of one tile while the tensor cores multiply another) cannot be written there. Gluon
(``triton.experimental.gluon``, inside Triton) exposes what it needs: TMA, mbarriers, asynchronous
warpgroup MMA and warp specialization.

Schedule (one CTA = one query tile of 2 * BLOCK_M rows of one (batch, head)):

- producer (1 warp, few registers): TMA loads of the two Q sub-tiles, then of K and V for every key
  block of the visit list into a ring of NUM_STAGES buffers; ``k_ready`` / ``v_ready`` mbarriers carry
  the byte counts, ``k_empty`` / ``v_empty`` (two arrivals: both consumers) give a stage back.
- two consumer warpgroups (4 warps each), one Q sub-tile of BLOCK_M rows each, the same key blocks:
  S = Q K^T and O += P V as asynchronous wgmma (Q and K, V from shared memory, P from registers).
  Within a warpgroup the score tile of block t is issued before the P V of block t - 1, and the
  softmax of block t runs while that P V is in flight (FA3's intra-warpgroup overlap). Between the
  two warpgroups a pair of ``turn`` mbarriers orders the issue of their matmuls (ping-pong): while one
  warpgroup does its softmax, the other one's matmuls occupy the tensor cores.

Kernel notation (as in :mod:`.attention` where the names agree):

  BLOCK_M        query rows per consumer warpgroup (64: wgmma's M per warpgroup); a CTA has 2 * BLOCK_M
  BLOCK_N        key rows per key block (one K / V stage)
  HEAD_DIM       D (64 or 128: a power of two, the wgmma N of P V and the K of Q K^T)
  MASK_BLOCK_M/N the block mask's blocks; 2 * BLOCK_M divides MASK_BLOCK_M, BLOCK_N divides MASK_BLOCK_N
                 (SUB = MASK_BLOCK_N // BLOCK_N kernel key blocks per mask key block)
  SPARSE         visit only the listed key blocks of this (b, h, mask query block); else all
  EVEN_N         S % BLOCK_N == 0: no key block reaches past S, the tail mask is compiled out
  RETURN_LSE     also write the natural-log log-sum-exp (float32, (B, H, S))
  Q_INDEXED      tile row i is token QIdx[b, h, i]: Q rows gathered by pointer loads (TMA cannot gather
                 on Hopper), output and LSE rows written there
  NUM_STAGES     K / V ring depth
  qk_scale       softmax scale * log2(e): exp2 replaces exp
  m_i, l_i, acc  running row max (log2 domain, scaled), running row sum, running P V (fp32)

Tail handling: the visit list is ascending, so only its last key block can reach past S; TMA reads
rows past S as zeros (harmless in P V since their P is 0) and the last block's scores past S are set
to -inf. Q rows past S are zeros too; their outputs are not stored. A query tile whose list is empty
writes zeros and lse = -inf (l_i = 0).

Gluon's API moved between Triton 3.6 and 3.9 (``async_copy_global_to_shared`` became ``async_load``);
the one name this kernel needs is resolved below. Compiled for sm_90 with both in
tests/kernels/test_compile_sm90.py.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.runtime.jit import constexpr_function
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

# triton 3.6: tma.async_copy_global_to_shared; 3.7+: tma.async_load (the old name raises). (2026-12)
_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared

NUM_CONSUMERS = gl.constexpr(2)  # consumer warpgroups per CTA (the ping-pong pair)
PRODUCER_WARPS = gl.constexpr(1)
PRODUCER_REGS = gl.constexpr(24)  # setmaxnreg floor: the producer holds only scalars
CONSUMER_REGS = gl.constexpr(240)  # FA3's consumer budget: 64-row S and O tiles plus the next S in flight
MAX_REGS = 168  # launch maxnreg: 12 warps (3 warpgroups) x 32 x 168 <= 64K registers, one CTA per SM


@constexpr_function
def _mma_layout(block_m, n, num_warps):
    """The wgmma accumulator layout of a [block_m, n] tile owned by one warpgroup."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, n, 16])


@gluon.jit
def _visit_list(KV_num, KV_idx, b, h, pid_m, S, stride_numb, stride_numh, stride_numm,
                stride_idxb, stride_idxh, stride_idxm, stride_idxn,
                CTA_M: gl.constexpr, BLOCK_N: gl.constexpr, MASK_BLOCK_M: gl.constexpr,
                MASK_BLOCK_N: gl.constexpr, SPARSE: gl.constexpr):
    """(n_total, kv_idx_row, last_start): how many kernel key blocks this CTA visits, where their mask
    indices live, and the first key of the last one (the only one that can reach past S)."""
    SUB: gl.constexpr = MASK_BLOCK_N // BLOCK_N
    if SPARSE:
        mask_row = (pid_m * CTA_M) // MASK_BLOCK_M
        kv_num = gl.load(KV_num + b * stride_numb + h * stride_numh + mask_row * stride_numm)
        kv_idx_row = KV_idx + b * stride_idxb + h * stride_idxh + mask_row * stride_idxm
        last_block = gl.load(kv_idx_row + gl.maximum(kv_num - 1, 0) * stride_idxn)
        last_sub = gl.minimum(gl.cdiv(S - last_block * MASK_BLOCK_N, BLOCK_N), SUB)
        n_total = gl.where(kv_num > 0, (kv_num - 1) * SUB + last_sub, 0)
        last_start = last_block * MASK_BLOCK_N + (last_sub - 1) * BLOCK_N
    else:
        kv_idx_row = KV_idx
        n_total = gl.cdiv(S, BLOCK_N)
        last_start = (n_total - 1) * BLOCK_N
    return n_total, kv_idx_row, last_start


@gluon.jit
def _block_start(t, kv_idx_row, stride_idxn, BLOCK_N: gl.constexpr, MASK_BLOCK_N: gl.constexpr,
                 SPARSE: gl.constexpr):
    """First key position of kernel key block t of the visit list."""
    SUB: gl.constexpr = MASK_BLOCK_N // BLOCK_N
    if SPARSE:
        kv_block = gl.load(kv_idx_row + (t // SUB) * stride_idxn)
        start_n = kv_block * MASK_BLOCK_N + (t % SUB) * BLOCK_N
    else:
        start_n = t * BLOCK_N
    return start_n


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, bars, Out, Lse, QIdx, KV_num, KV_idx, Q,
              scalars, strides, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
              MASK_BLOCK_M: gl.constexpr, MASK_BLOCK_N: gl.constexpr, SPARSE: gl.constexpr, EVEN_N: gl.constexpr,
              RETURN_LSE: gl.constexpr, Q_INDEXED: gl.constexpr, NUM_STAGES: gl.constexpr):
    """One warp: TMA loads of the Q sub-tiles, then K and V of every visited key block, NUM_STAGES ahead."""
    S, H, qk_scale, pid_m, b, h = scalars
    q_ready, k_ready, k_empty, v_ready, v_empty, turn = bars
    (stride_qb, stride_qs, stride_qh, stride_qib, stride_qih, stride_ob, stride_os, stride_oh,
     stride_numb, stride_numh, stride_numm, stride_idxb, stride_idxh, stride_idxm, stride_idxn) = strides
    CTA_M: gl.constexpr = NUM_CONSUMERS * BLOCK_M
    n_total, kv_idx_row, last_start = _visit_list(
        KV_num, KV_idx, b, h, pid_m, S, stride_numb, stride_numh, stride_numm, stride_idxb, stride_idxh,
        stride_idxm, stride_idxn, CTA_M, BLOCK_N, MASK_BLOCK_M, MASK_BLOCK_N, SPARSE)
    if not Q_INDEXED:
        for c in gl.static_range(NUM_CONSUMERS):
            mbarrier.expect(q_ready.index(c), q_desc.block_type.nbytes)
            _tma_load(q_desc, [b, (pid_m * NUM_CONSUMERS + c) * BLOCK_M, h, 0], q_ready.index(c), q_smem.index(c))
    for t in range(n_total):
        stage = t % NUM_STAGES
        phase = (t // NUM_STAGES) & 1
        start_n = _block_start(t, kv_idx_row, stride_idxn, BLOCK_N, MASK_BLOCK_N, SPARSE)
        # A fresh mbarrier counts as having completed the phase before phase 0: the first pass
        # through the ring waits for nothing.
        mbarrier.wait(k_empty.index(stage), phase ^ 1)
        mbarrier.expect(k_ready.index(stage), k_desc.block_type.nbytes)
        _tma_load(k_desc, [b, start_n, h, 0], k_ready.index(stage), k_bufs.index(stage))
        mbarrier.wait(v_empty.index(stage), phase ^ 1)
        mbarrier.expect(v_ready.index(stage), v_desc.block_type.nbytes)
        _tma_load(v_desc, [b, start_n, h, 0], v_ready.index(stage), v_bufs.index(stage))


@gluon.jit
def _softmax_tile(qk, m_i, l_i, qk_scale, cols, limit, MASK: gl.constexpr):
    """Online softmax of one score tile (fp32): P (unnormalised), the rescale factor alpha and the
    updated row state; MASK: columns >= limit are -inf (keys past S in the last block)."""
    if MASK:
        qk = gl.where(cols[None, :] < limit, qk, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(qk, 1) * qk_scale)
    p = gl.exp2(qk * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, l_i, m_new


@gluon.jit
def _consumer(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, bars, Out, Lse, QIdx, KV_num, KV_idx, Q,
              scalars, strides, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
              MASK_BLOCK_M: gl.constexpr, MASK_BLOCK_N: gl.constexpr, SPARSE: gl.constexpr, EVEN_N: gl.constexpr,
              RETURN_LSE: gl.constexpr, Q_INDEXED: gl.constexpr, NUM_STAGES: gl.constexpr, C: gl.constexpr):
    """Consumer warpgroup C: its BLOCK_M query rows against every visited key block, then the epilogue."""
    S, H, qk_scale, pid_m, b, h = scalars
    q_ready, k_ready, k_empty, v_ready, v_empty, turn = bars
    (stride_qb, stride_qs, stride_qh, stride_qib, stride_qih, stride_ob, stride_os, stride_oh,
     stride_numb, stride_numh, stride_numm, stride_idxb, stride_idxh, stride_idxm, stride_idxn) = strides
    NW: gl.constexpr = 4
    CTA_M: gl.constexpr = NUM_CONSUMERS * BLOCK_M
    s_layout: gl.constexpr = _mma_layout(BLOCK_M, BLOCK_N, NW)
    o_layout: gl.constexpr = _mma_layout(BLOCK_M, HEAD_DIM, NW)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    n_total, kv_idx_row, last_start = _visit_list(
        KV_num, KV_idx, b, h, pid_m, S, stride_numb, stride_numh, stride_numm, stride_idxb, stride_idxh,
        stride_idxm, stride_idxn, CTA_M, BLOCK_N, MASK_BLOCK_M, MASK_BLOCK_N, SPARSE)
    start_m = (pid_m * NUM_CONSUMERS + C) * BLOCK_M
    q_tile = q_smem.index(C)
    if Q_INDEXED:  # gather the rows through the index into shared memory (generic proxy -> fence)
        ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [NW, 1], [1, 0])
        offs_r = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld))
        offs_c = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld))
        tok = gl.load(QIdx + b * stride_qib + h * stride_qih + offs_r, mask=offs_r < S, other=0).to(gl.int64)
        q_ptrs = Q + b.to(gl.int64) * stride_qb + h.to(gl.int64) * stride_qh + tok[:, None] * stride_qs + offs_c[None, :]
        q_tile.reshape([BLOCK_M, HEAD_DIM]).store(gl.load(q_ptrs, mask=(offs_r < S)[:, None], other=0.0))
        fence_async_shared()
    else:
        mbarrier.wait(q_ready.index(C), 0)
    q = q_tile.reshape([BLOCK_M, HEAD_DIM])
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    limit = S - last_start  # valid columns of the last block

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=row_s)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    if n_total > 0:
        # Block 0: its scores and softmax (no P V in flight yet to overlap with).
        mbarrier.wait(k_ready.index(0), 0)
        mbarrier.wait(turn.index(C), (1 - C) & 1)
        qk = warpgroup_mma(q, k_bufs.index(0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), zero_s,
                           use_acc=False, is_async=True)
        mbarrier.arrive(turn.index(1 - C), count=1)
        qk = warpgroup_mma_wait(0, deps=[qk])
        mbarrier.arrive(k_empty.index(0), count=1)
        if EVEN_N:
            p, alpha, l_i, m_i = _softmax_tile(qk, m_i, l_i, qk_scale, cols, limit, False)
        elif n_total == 1:
            p, alpha, l_i, m_i = _softmax_tile(qk, m_i, l_i, qk_scale, cols, limit, True)
        else:
            p, alpha, l_i, m_i = _softmax_tile(qk, m_i, l_i, qk_scale, cols, limit, False)
        p_op = gl.convert_layout(p.to(Q.dtype.element_ty), p_layout)
        for t in range(1, n_total):
            stage = t % NUM_STAGES
            prev = (t - 1) % NUM_STAGES
            # The matmuls of this step: the scores of block t, then P V of block t - 1, issued in turn.
            mbarrier.wait(k_ready.index(stage), (t // NUM_STAGES) & 1)
            mbarrier.wait(turn.index(C), (t + 1 - C) & 1)
            qk = warpgroup_mma(q, k_bufs.index(stage).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), zero_s,
                               use_acc=False, is_async=True)
            mbarrier.wait(v_ready.index(prev), ((t - 1) // NUM_STAGES) & 1)
            acc = warpgroup_mma(p_op, v_bufs.index(prev).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
            mbarrier.arrive(turn.index(1 - C), count=1)
            # The softmax of block t while P V of block t - 1 runs.
            qk = warpgroup_mma_wait(1, deps=[qk])
            mbarrier.arrive(k_empty.index(stage), count=1)
            if EVEN_N:
                p, alpha, l_i, m_i = _softmax_tile(qk, m_i, l_i, qk_scale, cols, limit, False)
            else:
                if t == n_total - 1:
                    p, alpha, l_i, m_i = _softmax_tile(qk, m_i, l_i, qk_scale, cols, limit, True)
                else:
                    p, alpha, l_i, m_i = _softmax_tile(qk, m_i, l_i, qk_scale, cols, limit, False)
            acc, p_op = warpgroup_mma_wait(0, deps=[acc, p_op])  # P, the A operand, stays live until here
            mbarrier.arrive(v_empty.index(prev), count=1)
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            p_op = gl.convert_layout(p.to(Q.dtype.element_ty), p_layout)
        last = (n_total - 1) % NUM_STAGES
        mbarrier.wait(v_ready.index(last), ((n_total - 1) // NUM_STAGES) & 1)
        acc = warpgroup_mma(p_op, v_bufs.index(last).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
        acc, p_op = warpgroup_mma_wait(0, deps=[acc, p_op])
        mbarrier.arrive(v_empty.index(last), count=1)

    # Epilogue: rows that visited nothing (l_i == 0) write zeros and lse = -inf.
    empty = l_i == 0.0
    l_safe = gl.where(empty, 1.0, l_i)
    out = acc / gl.convert_layout(l_safe, row_o)[:, None]
    offs_m = start_m + gl.arange(0, BLOCK_M, layout=row_o)
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    rows_ok = offs_m < S
    if Q_INDEXED:
        tok_o = gl.load(QIdx + b * stride_qib + h * stride_qih + offs_m, mask=rows_ok, other=0).to(gl.int64)
    else:
        tok_o = offs_m.to(gl.int64)
    o_ptrs = Out + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh + tok_o[:, None] * stride_os + offs_d[None, :]
    gl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=rows_ok[:, None])
    if RETURN_LSE:
        LN2: gl.constexpr = 0.6931471805599453
        lse = gl.where(empty, float("-inf"), (m_i + gl.log2(l_safe)) * LN2)
        offs_ms = start_m + gl.arange(0, BLOCK_M, layout=row_s)
        if Q_INDEXED:
            tok_l = gl.load(QIdx + b * stride_qib + h * stride_qih + offs_ms, mask=offs_ms < S, other=0).to(gl.int64)
        else:
            tok_l = offs_ms.to(gl.int64)
        gl.store(Lse + (b * H + h).to(gl.int64) * S + tok_l, lse, mask=offs_ms < S)


@gluon.jit
def _consumer0(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, bars, Out, Lse, QIdx, KV_num, KV_idx, Q,
               scalars, strides, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
               MASK_BLOCK_M: gl.constexpr, MASK_BLOCK_N: gl.constexpr, SPARSE: gl.constexpr, EVEN_N: gl.constexpr,
               RETURN_LSE: gl.constexpr, Q_INDEXED: gl.constexpr, NUM_STAGES: gl.constexpr):
    _consumer(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, bars, Out, Lse, QIdx, KV_num, KV_idx, Q,
              scalars, strides, BLOCK_M, BLOCK_N, HEAD_DIM,
              MASK_BLOCK_M, MASK_BLOCK_N, SPARSE, EVEN_N, RETURN_LSE, Q_INDEXED, NUM_STAGES, 0)


@gluon.jit
def _consumer1(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, bars, Out, Lse, QIdx, KV_num, KV_idx, Q,
               scalars, strides, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
               MASK_BLOCK_M: gl.constexpr, MASK_BLOCK_N: gl.constexpr, SPARSE: gl.constexpr, EVEN_N: gl.constexpr,
               RETURN_LSE: gl.constexpr, Q_INDEXED: gl.constexpr, NUM_STAGES: gl.constexpr):
    _consumer(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, bars, Out, Lse, QIdx, KV_num, KV_idx, Q,
              scalars, strides, BLOCK_M, BLOCK_N, HEAD_DIM,
              MASK_BLOCK_M, MASK_BLOCK_N, SPARSE, EVEN_N, RETURN_LSE, Q_INDEXED, NUM_STAGES, 1)


@gluon.jit
def _attn_fwd_hopper(
    q_desc, k_desc, v_desc, Q, Out, Lse, KV_num, KV_idx, QIdx,
    stride_qb, stride_qs, stride_qh, stride_qib, stride_qih,
    stride_ob, stride_os, stride_oh,
    stride_numb, stride_numh, stride_numm,
    stride_idxb, stride_idxh, stride_idxm, stride_idxn,
    S, H, qk_scale,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
    MASK_BLOCK_M: gl.constexpr, MASK_BLOCK_N: gl.constexpr,
    SPARSE: gl.constexpr, EVEN_N: gl.constexpr, RETURN_LSE: gl.constexpr, Q_INDEXED: gl.constexpr,
    NUM_STAGES: gl.constexpr,
):
    """Grid (cdiv(S, 2 * BLOCK_M), B * H), num_warps = 4 (the first consumer; the second consumer and
    the producer are worker partitions). Q, K, V descriptors: 4-D (B, S, H, D), box (1, rows, 1, D)."""
    pid_m = gl.program_id(0)
    pid_bh = gl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [NUM_CONSUMERS] + q_desc.block_type.shape, q_desc.layout)
    k_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for c in gl.static_range(NUM_CONSUMERS):
        mbarrier.init(q_ready.index(c), count=1)
        mbarrier.init(turn.index(c), count=1)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=NUM_CONSUMERS)
        mbarrier.init(v_empty.index(i), count=NUM_CONSUMERS)
    bars = (q_ready, k_ready, k_empty, v_ready, v_empty, turn)
    scalars = (S, H, qk_scale, pid_m, b, h)
    strides = (stride_qb, stride_qs, stride_qh, stride_qib, stride_qih, stride_ob, stride_os, stride_oh,
               stride_numb, stride_numh, stride_numm, stride_idxb, stride_idxh, stride_idxm, stride_idxn)
    # The argument tuples are written out in the call: constexprs in a tuple bound to a name first arrive
    # in the partitions as tensors (triton 3.6, 2026-12).
    gl.warp_specialize([
        (_consumer0, (q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, bars, Out, Lse, QIdx, KV_num, KV_idx, Q, scalars,
                      strides, BLOCK_M, BLOCK_N, HEAD_DIM, MASK_BLOCK_M, MASK_BLOCK_N, SPARSE, EVEN_N, RETURN_LSE,
                      Q_INDEXED, NUM_STAGES)),
        (_consumer1, (q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, bars, Out, Lse, QIdx, KV_num, KV_idx, Q, scalars,
                      strides, BLOCK_M, BLOCK_N, HEAD_DIM, MASK_BLOCK_M, MASK_BLOCK_N, SPARSE, EVEN_N, RETURN_LSE,
                      Q_INDEXED, NUM_STAGES)),
        (_producer, (q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, bars, Out, Lse, QIdx, KV_num, KV_idx, Q, scalars,
                     strides, BLOCK_M, BLOCK_N, HEAD_DIM, MASK_BLOCK_M, MASK_BLOCK_N, SPARSE, EVEN_N, RETURN_LSE,
                     Q_INDEXED, NUM_STAGES)),
    ], [4, PRODUCER_WARPS], [CONSUMER_REGS, PRODUCER_REGS])
