"""Triton kernels of the token orders (:mod:`vdit_accel.permutation`): the k-means step of the semantic
order and the row gathers that move tokens into an order and back.

Notation: ``G`` independent problems (one per batch x head), ``N`` rows each, ``D`` features,
``K`` centroids; ``K_PAD`` / ``D_PAD`` the powers of two (>= 16) the tiles use, ``BLOCK_N`` rows per
step of a program, ``ROWS`` rows per program. This module imports only torch and triton.

- :func:`kmeans_assign`: one launch per k-means step and tensor — nearest centroid of every row
  (``argmax_c x . c - |c|^2 / 2``, scores in float32 from the rows' own dtype), the size of every
  cluster, and (``with_sums``) the sum of every cluster's rows: what one Lloyd update needs. It replaces
  the scores matmul, argmax, ``index_add_`` and ``bincount`` (a host sync on CUDA) of the PyTorch path,
  and never writes the ``[G, N, K]`` scores.
- :func:`gather_rows`: ``out[b, i, h] = x[b, idx[b, h, i], h]`` for up to three tensors sharing one index
  (k and v) in one launch, from any strides into any strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _pow2(x: int, low: int = 16) -> int:
    return max(low, triton.next_power_of_2(x))


@triton.jit
def _kmeans_assign_kernel(X, C, LABELS, SUMS, COUNTS, N, K, ROWS, H,
                          sx_b, sx_h, sx_n, sx_d, sc_g, sc_k,
                          D: tl.constexpr, K_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                          STORE_LABELS: tl.constexpr, WITH_SUMS: tl.constexpr):
    """Program (row chunk, problem g = b * H + h): labels of rows [chunk * ROWS, ...), and its clusters' counts
    (and row sums) added atomically into COUNTS [G, K] (SUMS [G, K, D]) float32."""
    pid, g = tl.program_id(0), tl.program_id(1)
    xg = (g // H).to(tl.int64) * sx_b + (g % H).to(tl.int64) * sx_h
    offs_k = tl.arange(0, K_PAD)
    offs_d = tl.arange(0, D_PAD)
    kmask = offs_k < K
    dmask = offs_d < D
    c = tl.load(C + g * sc_g + offs_k[:, None] * sc_k + offs_d[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
    c = c.to(tl.float32)
    bias = tl.where(kmask, -0.5 * tl.sum(c * c, 1), float("-inf"))  # -|c|^2 / 2; padded centroids never win
    c_lp = c.to(X.dtype.element_ty)
    cnt = tl.zeros([K_PAD], dtype=tl.float32)
    acc = tl.zeros([K_PAD, D_PAD], dtype=tl.float32)
    row0 = pid * ROWS
    row1 = tl.minimum(row0 + ROWS, N)
    for start in range(row0, row1, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        rmask = rows < row1
        x = tl.load(X + xg + rows[:, None].to(tl.int64) * sx_n + offs_d[None, :] * sx_d,
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        scores = tl.dot(x, tl.trans(c_lp)) + bias[None, :]  # [BLOCK_N, K_PAD] float32
        lab = tl.argmax(scores, 1)
        if STORE_LABELS:
            tl.store(LABELS + g * N + rows, lab.to(tl.int32), mask=rmask)
        onehot = (lab[:, None] == offs_k[None, :]) & rmask[:, None]
        cnt += tl.sum(onehot.to(tl.float32), 0)
        if WITH_SUMS:
            acc += tl.dot(tl.trans(onehot.to(x.dtype)), x)
    tl.atomic_add(COUNTS + g * K + offs_k, cnt, mask=kmask)
    if WITH_SUMS:
        tl.atomic_add(SUMS + g * K * D + offs_k[:, None] * D + offs_d[None, :], acc, mask=kmask[:, None] & dmask[None, :])


def kmeans_assign(x: torch.Tensor, c: torch.Tensor, with_sums: bool = False, store_labels: bool = True,
                  rows_per_program: int = 1024, block_n: int = 64, num_warps: int = 8):
    """Nearest centroids of the rows of ``x`` ``[B, H, N, D]`` (any strides; fp16/bf16/fp32) among ``c``
    ``[B * H, K, D]`` (float32; K <= 256), ``G = B * H`` problems.

    Returns ``(labels int32 [G, N] or None, counts float32 [G, K], sums float32 [G, K, D] or None)``.
    Scores are ``x . c`` with c rounded to x's dtype, accumulated in float32, minus ``|c|^2 / 2``
    (c in float32); ties go to the lower index."""
    bx, hx, n, d = x.shape
    g, k = bx * hx, c.shape[1]
    if c.shape != (g, k, d):
        raise ValueError(f"kmeans_assign: centroids {tuple(c.shape)} do not match rows {tuple(x.shape)}")
    if k > 256:
        raise ValueError(f"kmeans_assign handles up to 256 centroids, got {k}")
    c = c.float().contiguous()
    counts = torch.zeros(g, k, device=x.device, dtype=torch.float32)
    sums = torch.zeros(g, k, d, device=x.device, dtype=torch.float32) if with_sums else counts
    labels = torch.empty(g, n, device=x.device, dtype=torch.int32) if store_labels else counts
    rows_per_program = max(block_n, rows_per_program // block_n * block_n)
    grid = (triton.cdiv(n, rows_per_program), g)
    _kmeans_assign_kernel[grid](x, c, labels, sums, counts, n, k, rows_per_program, hx,
                                x.stride(0), x.stride(1), x.stride(2), x.stride(3), c.stride(0), c.stride(1),
                                D=d, K_PAD=_pow2(k), D_PAD=_pow2(d), BLOCK_N=block_n,
                                STORE_LABELS=store_labels, WITH_SUMS=with_sums, num_warps=num_warps)
    return (labels if store_labels else None), counts, (sums if with_sums else None)


@triton.jit
def _gather_rows_kernel(IDX, X0, Y0, X1, Y1, X2, Y2, S, H, si_b, si_h,
                        sx_b, sx_s, sx_h, sy_b, sy_s, sy_h,
                        D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_S: tl.constexpr, N_TENSORS: tl.constexpr):
    """Program (row block, b * H + h): Y[b, i, h, :] = X[b, IDX[b, h, i], h, :] for i in the block, for
    the N_TENSORS (X, Y) pairs (the same strides for all Xs, and for all Ys)."""
    pid, bh = tl.program_id(0), tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D_PAD)
    rmask = rows < S
    m = rmask[:, None] & (offs_d < D)[None, :]
    src = tl.load(IDX + b * si_b + h * si_h + rows, mask=rmask, other=0).to(tl.int64)
    xo = b.to(tl.int64) * sx_b + h * sx_h + src[:, None] * sx_s + offs_d[None, :]
    yo = b.to(tl.int64) * sy_b + h * sy_h + rows[:, None].to(tl.int64) * sy_s + offs_d[None, :]
    tl.store(Y0 + yo, tl.load(X0 + xo, mask=m), mask=m)
    if N_TENSORS > 1:
        tl.store(Y1 + yo, tl.load(X1 + xo, mask=m), mask=m)
    if N_TENSORS > 2:
        tl.store(Y2 + yo, tl.load(X2 + xo, mask=m), mask=m)


def gather_rows(xs: list[torch.Tensor], idx: torch.Tensor, block_s: int = 64, num_warps: int = 4) -> list[torch.Tensor]:
    """``out[b, i, h] = x[b, idx[b, h, i], h]`` for each ``x`` of ``xs`` (1 to 3 tensors of one shape
    ``(B, S, H, D)`` and one stride layout, last dim contiguous), ``idx`` int ``[B or 1, H, S]``. One
    launch; contiguous ``(B, S, H, D)`` outputs."""
    if not 1 <= len(xs) <= 3:
        raise ValueError(f"gather_rows moves 1 to 3 tensors at once, got {len(xs)}")
    x0 = xs[0]
    b, s, h, d = x0.shape
    if any(x.shape != x0.shape or x.stride() != x0.stride() for x in xs) or x0.stride(3) != 1:
        raise ValueError("gather_rows: the tensors need one shape and one stride layout, with a contiguous last dim")
    if idx.dim() != 3 or idx.shape[1:] != (h, s) or idx.shape[0] not in (1, b):
        raise ValueError(f"gather_rows: index {tuple(idx.shape)} is not [B or 1, {h}, {s}]")
    idx = idx if idx.stride(2) == 1 else idx.contiguous()
    ys = [torch.empty(b, s, h, d, dtype=x0.dtype, device=x0.device) for _ in xs]
    pad = xs + [x0] * (3 - len(xs))
    ypad = ys + [ys[0]] * (3 - len(ys))
    y0 = ys[0]
    si_b = idx.stride(0) if idx.shape[0] == b else 0
    grid = (triton.cdiv(s, block_s), b * h)
    _gather_rows_kernel[grid](idx, pad[0], ypad[0], pad[1], ypad[1], pad[2], ypad[2], s, h, si_b, idx.stride(1),
                              x0.stride(0), x0.stride(1), x0.stride(2), y0.stride(0), y0.stride(1), y0.stride(2),
                              D=d, D_PAD=_pow2(d, 1), BLOCK_S=block_s, N_TENSORS=len(xs), num_warps=num_warps)
    return ys
