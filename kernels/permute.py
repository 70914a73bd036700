"""Triton kernels of the token orders (:mod:`vdit_accel.orders`): the k-means step of the semantic
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
- :func:`kmeans_cluster_order`: the warm semantic order of every problem — optional Lloyd updates on a
  sample of rows, the assignment of every row (which also sums each cluster's rows: the next call's
  centroids), and a stable counting sort of the rows by cluster — in ``4 + 2 iters`` launches (before
  each pass one small launch prepares its centroids — the Lloyd update from the previous pass's sums,
  rounded to the rows' dtype, and their norms — and zeroes the pass's statistics; one takes the prefix
  sums of the chunks' counts), one more for the sums when the assignment does not make them.
- :func:`semantic_block_mask`: the semantic plan's block mask in two launches — centroid scores, softmax
  and top-p of the key clusters of every query cluster (once per query cluster), then the clusters'
  overlap with the blocks and (``csr``) the attention kernel's block lists (the ~40 small ops of the
  PyTorch path, :func:`vdit_accel.orders.semantic.semantic_block_mask`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


MAX_CLUSTERS = 256  # centroids a problem may have in these kernels (the [K, K] / [N, K] tiles stay in registers)


def _pow2(x: int, low: int = 16) -> int:
    return max(low, triton.next_power_of_2(x))


@triton.jit
def _centroid_prep_kernel(C, PSUMS, PCOUNTS, COUT, CB, BIAS, ZSUMS, ZCOUNTS, K, D: tl.constexpr, K_PAD: tl.constexpr,
                          D_PAD: tl.constexpr, BLOCK_K: tl.constexpr, FROM_SUMS: tl.constexpr,
                          ZERO_SUMS: tl.constexpr = False, ZERO_COUNTS: tl.constexpr = False):
    """Program (block of BLOCK_K centroids, problem g): what the assignment reads of the centroids C
    [G, K, D] (float32, contiguous): CB [G, K_PAD, D_PAD] in the rows' dtype (zero padded) and BIAS [G,
    K_PAD] float32 = -|c|^2 / 2 (-inf past K: padded centroids never win). FROM_SUMS: c is first one Lloyd
    update of C from PSUMS [G, K, D] / PCOUNTS [G, K] (``sums / counts``; empty clusters keep C's),
    written to COUT [G, K, D]. ZERO_SUMS / ZERO_COUNTS: the assignment's statistics buffers ZSUMS [G, K,
    D] / ZCOUNTS [G, K] are zeroed here (no launch of their own)."""
    kb, g = tl.program_id(0), tl.program_id(1)
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, D_PAD)
    kmask = offs_k < K
    kd_mask = kmask[:, None] & (offs_d < D)[None, :]
    at = (g * K + offs_k[:, None]) * D + offs_d[None, :]
    c = tl.load(C + at, mask=kd_mask, other=0.0)
    if FROM_SUMS:
        ps = tl.load(PSUMS + at, mask=kd_mask, other=0.0)
        pc = tl.load(PCOUNTS + g * K + offs_k, mask=kmask, other=0.0)
        c = tl.where(pc[:, None] > 0, tl.math.div_rn(ps, tl.maximum(pc, 1.0)[:, None]), c)
        tl.store(COUT + at, c, mask=kd_mask)
    tl.store(CB + (g * K_PAD + offs_k[:, None]) * D_PAD + offs_d[None, :], c.to(CB.dtype.element_ty))
    tl.store(BIAS + g * K_PAD + offs_k, tl.where(kmask, -0.5 * tl.sum(c * c, 1), float("-inf")))
    if ZERO_SUMS:
        tl.store(ZSUMS + at, tl.zeros([BLOCK_K, D_PAD], dtype=tl.float32), mask=kd_mask)
    if ZERO_COUNTS:
        tl.store(ZCOUNTS + g * K + offs_k, tl.zeros([BLOCK_K], dtype=tl.float32), mask=kmask)


@triton.jit
def _kmeans_assign_kernel(X, CB, BIAS, LABELS, SUMS, COUNTS, TBEFORE, CSIZES, N, K, ROWS, H,
                          sx_b, sx_h, sx_n, sx_d,
                          D: tl.constexpr, K_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                          STORE_LABELS: tl.constexpr, WITH_SUMS: tl.constexpr, TILE_COUNTS: tl.constexpr = False):
    """Program (row chunk, problem g = b * H + h): labels of rows [chunk * ROWS, ...), and its clusters' counts
    (and row sums) added atomically into COUNTS [G, K] (SUMS [G, K, D]) float32. The centroids come
    prepared by :func:`_centroid_prep_kernel` (CB, BIAS).

    TILE_COUNTS (what the placement reads, one program per tile; int32, no atomics): TBEFORE [G, tiles, K]
    gets, for each tile of BLOCK_N rows, each cluster's rows in the chunk's earlier tiles, and CSIZES
    [G, K, chunks] each chunk's cluster sizes (a prefix over the chunks then places the chunks); COUNTS
    (and SUMS) then only with WITH_SUMS."""
    pid, g = tl.program_id(0), tl.program_id(1)
    xg = (g // H).to(tl.int64) * sx_b + (g % H).to(tl.int64) * sx_h
    offs_k = tl.arange(0, K_PAD)
    offs_d = tl.arange(0, D_PAD)
    kmask = offs_k < K
    dmask = offs_d < D
    bias = tl.load(BIAS + g * K_PAD + offs_k)
    c_lp = tl.load(CB + (g * K_PAD + offs_k[:, None]) * D_PAD + offs_d[None, :])
    icnt = tl.zeros([K_PAD], dtype=tl.int32)  # this chunk's rows per cluster so far
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
        if TILE_COUNTS:
            tl.store(TBEFORE + (g.to(tl.int64) * tl.cdiv(N, BLOCK_N) + start // BLOCK_N) * K + offs_k, icnt,
                     mask=kmask)
        icnt += tl.histogram(lab, K_PAD, mask=rmask)  # measured cheaper than summing the one-hot rows
        if WITH_SUMS:
            onehot = (lab[:, None] == offs_k[None, :]) & rmask[:, None]
            acc += tl.dot(tl.trans(onehot.to(x.dtype)), x)
    if TILE_COUNTS:
        tl.store(CSIZES + (g * K + offs_k).to(tl.int64) * tl.num_programs(0) + pid, icnt, mask=kmask)
    if WITH_SUMS or not TILE_COUNTS:
        tl.atomic_add(COUNTS + g * K + offs_k, icnt.to(tl.float32), mask=kmask)
    if WITH_SUMS:
        tl.atomic_add(SUMS + g * K * D + offs_k[:, None] * D + offs_d[None, :], acc, mask=kmask[:, None] & dmask[None, :])


def _prepared(x: torch.Tensor, c: torch.Tensor, prev: tuple | None, zero: tuple = (None, None)):
    """One launch of :func:`_centroid_prep_kernel` for rows ``x`` ``[B, H, N, D]`` and centroids ``c``
    ``[G, K, D]`` (checked float32), updated from ``prev`` = ``(sums, counts)`` when given; ``zero`` =
    ``(sums or None, counts or None)``: the assignment's statistics buffers, zeroed by the same launch.
    Returns the centroids the assignment uses (float32 ``[G, K, D]``) and its centroid arguments ``(CB, BIAS)``."""
    g, k, d = c.shape
    kp, dp = _pow2(k), _pow2(d)
    cout = c if prev is None else torch.empty_like(c)
    cb = torch.empty(g, kp, dp, device=c.device, dtype=x.dtype)
    bias = torch.empty(g, kp, device=c.device, dtype=torch.float32)
    zs, zc = zero
    _centroid_prep_kernel[(kp // 16, g)](c, *(prev or (c, c)), cout, cb, bias, c if zs is None else zs,
                                         c if zc is None else zc, k, D=d, K_PAD=kp, D_PAD=dp, BLOCK_K=16,
                                         FROM_SUMS=prev is not None, ZERO_SUMS=zs is not None,
                                         ZERO_COUNTS=zc is not None, num_warps=4)
    return cout, (cb, bias)


def _checked_centroids(x: torch.Tensor, c: torch.Tensor, name: str) -> torch.Tensor:
    """``c`` as float32 contiguous, after checking it is ``[B * H, K <= MAX_CLUSTERS, D]`` for rows ``x`` ``[B, H, N, D]``."""
    bx, hx, _, d = x.shape
    k = c.shape[1]
    if c.shape != (bx * hx, k, d):
        raise ValueError(f"{name}: centroids {tuple(c.shape)} do not match rows {tuple(x.shape)}")
    if k > MAX_CLUSTERS:
        raise ValueError(f"{name} handles up to {MAX_CLUSTERS} centroids, got {k}")
    return c.float().contiguous()


def kmeans_assign(x: torch.Tensor, c: torch.Tensor, with_sums: bool = False, store_labels: bool = True,
                  rows_per_program: int = 1024, block_n: int = 64, num_warps: int = 8):
    """Nearest centroids of the rows of ``x`` ``[B, H, N, D]`` (any strides; fp16/bf16/fp32) among ``c``
    ``[B * H, K, D]`` (float32; K <= 256), ``G = B * H`` problems.

    Returns ``(labels int32 [G, N] or None, counts float32 [G, K], sums float32 [G, K, D] or None)``.
    Scores are ``x . c`` with c rounded to x's dtype, accumulated in float32, minus ``|c|^2 / 2``
    (c in float32); ties go to the lower index."""
    bx, hx, n, d = x.shape
    g, k = bx * hx, c.shape[1]
    c = _checked_centroids(x, c, "kmeans_assign")
    counts = torch.empty(g, k, device=x.device, dtype=torch.float32)
    sums = torch.empty(g, k, d, device=x.device, dtype=torch.float32) if with_sums else counts
    labels = torch.empty(g, n, device=x.device, dtype=torch.int32) if store_labels else counts
    rows_per_program = max(block_n, rows_per_program // block_n * block_n)
    grid = (triton.cdiv(n, rows_per_program), g)
    _, cargs = _prepared(x, c, None, (sums if with_sums else None, counts))
    _kmeans_assign_kernel[grid](x, *cargs, labels, sums, counts, counts, counts, n, k, rows_per_program, hx,
                                x.stride(0), x.stride(1), x.stride(2), x.stride(3),
                                D=d, K_PAD=_pow2(k), D_PAD=_pow2(d), BLOCK_N=block_n,
                                STORE_LABELS=store_labels, WITH_SUMS=with_sums, num_warps=num_warps)
    return (labels if store_labels else None), counts, (sums if with_sums else None)


@triton.jit
def _chunk_prefix_kernel(CSIZES, CBEFORE, START, K, CHUNKS, K_PAD: tl.constexpr, CHUNK_BLOCK: tl.constexpr):
    """Program (problem g): CBEFORE [G, K, CHUNKS] = each cluster's rows in the chunks before each chunk
    (an exclusive prefix of CSIZES [G, K, CHUNKS] along the chunks), START [G, K] = where each cluster
    starts (an exclusive prefix of the sizes); int32."""
    g = tl.program_id(0)
    offs_k = tl.arange(0, K_PAD)
    kmask = offs_k < K
    carry = tl.zeros([K_PAD], dtype=tl.int32)
    for c0 in range(0, CHUNKS, CHUNK_BLOCK):
        offs_c = c0 + tl.arange(0, CHUNK_BLOCK)
        m = kmask[:, None] & (offs_c < CHUNKS)[None, :]
        at = (g * K + offs_k[:, None]).to(tl.int64) * CHUNKS + offs_c[None, :]
        cs = tl.load(CSIZES + at, mask=m, other=0)
        tl.store(CBEFORE + at, carry[:, None] + tl.cumsum(cs, 1) - cs, mask=m)
        carry += tl.sum(cs, 1)
    tl.store(START + g * K + offs_k, tl.cumsum(carry, 0) - carry, mask=kmask)


@triton.jit
def _cluster_place_kernel(LABELS, TBEFORE, CBEFORE, START, PERM, BOUNDS, N, K, VS, S, TILES, CHUNKS, TILES_PER_CHUNK,
                          K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, TEXT_BLOCK: tl.constexpr):
    """Program (tile of BLOCK_N rows, problem g): the positions of the tile's rows when the N video rows
    are sorted by label, stably (a counting sort): a row goes after the clusters before its own
    (START [G, K] int32, exclusive prefix of the cluster sizes), after its cluster's rows in earlier
    chunks (CBEFORE [G, K, CHUNKS]) and in its chunk's earlier tiles (TBEFORE [G, TILES, K], from the
    assignment), and after its cluster's earlier rows in the tile (counted by comparing the tile's labels
    pairwise: no scan). PERM [G, S] int64 gets ``VS + row`` at
    ``VS + position``; text positions [0, VS) and [VS + N, S) keep their token. Tile 0 writes BOUNDS
    [G, K + 1] (``VS +`` each cluster's start, then ``VS + N``)."""
    pid, g = tl.program_id(0), tl.program_id(1)
    perm_g = PERM + g.to(tl.int64) * S
    if pid == 0:
        offs_k = tl.arange(0, K_PAD)
        kmask = offs_k < K
        start = tl.load(START + g * K + offs_k, mask=kmask, other=0)
        tl.store(BOUNDS + g * (K + 1) + offs_k, (VS + start).to(tl.int64), mask=kmask)
        tl.store(BOUNDS + g * (K + 1) + K, (VS + N).to(tl.int64))
        for t0 in range(0, VS, TEXT_BLOCK):
            t = t0 + tl.arange(0, TEXT_BLOCK)
            tl.store(perm_g + t, t.to(tl.int64), mask=t < VS)
        for t0 in range(VS + N, S, TEXT_BLOCK):
            t = t0 + tl.arange(0, TEXT_BLOCK)
            tl.store(perm_g + t, t.to(tl.int64), mask=t < S)
    offs = tl.arange(0, BLOCK_N)
    rows = pid * BLOCK_N + offs
    rmask = rows < N
    lab = tl.load(LABELS + g * N + rows, mask=rmask, other=0)
    same_before = (lab[:, None] == lab[None, :]) & (offs[None, :] < offs[:, None]) & rmask[None, :]
    rank = tl.sum(same_before.to(tl.int32), 1)
    gk = (g * K + lab).to(tl.int64)
    base = (tl.load(START + g * K + lab, mask=rmask, other=0)
            + tl.load(CBEFORE + gk * CHUNKS + pid // TILES_PER_CHUNK, mask=rmask, other=0)
            + tl.load(TBEFORE + (g.to(tl.int64) * TILES + pid) * K + lab, mask=rmask, other=0))
    tl.store(perm_g + VS + base + rank, (rows + VS).to(tl.int64), mask=rmask)


def kmeans_cluster_order(x: torch.Tensor, c: torch.Tensor, iters: int, sample_step: int, video_start: int,
                         seq_len: int, stats: tuple[torch.Tensor, torch.Tensor] | None = None,
                         rows_per_program: int | None = None, block_n: int | None = None, num_warps: int = 4,
                         update_rows: int = 1024, place_warps: int = 1, num_stages: int | None = None,
                         sums_in_assign: bool | None = None, sum_rows: int = 128, sum_block: int = 128,
                         sum_warps: int = 4, on_order=None):
    """The semantic order of every problem in ``4 + 2 * iters`` launches (one more for the sums with
    ``sums_in_assign`` False, unless ``on_order`` takes them):
    the centroids ``c`` ``[G, K, D]`` (float32) updated once from ``stats`` (the previous call's, see
    below) when given, then ``iters`` Lloyd updates on every ``sample_step``-th row of ``x`` ``[B, H, N,
    D]`` (the video rows, any strides), then every row assigned to the updated centroids, then the rows
    placed in cluster order (stable), and each cluster's row sum and size.

    Returns ``(perm int64 [G, seq_len], bounds int64 [G, K + 1], centroids float32 [G, K, D], stats)``:
    position ``i`` holds token ``perm[g, i]`` (video tokens are ``video_start + row``; the other positions
    hold their own token), cluster ``c`` spans ``[bounds[c], bounds[c + 1])``; ``centroids`` are the ones
    every row was assigned to; ``stats`` = ``(sums [G, K, D], counts [G, K])`` float32 of that assignment:
    passed to the next call, they give its centroids one Lloyd update on this call's rows for free (an
    online k-means across calls). The same as the PyTorch path (:func:`vdit_accel.orders.semantic.semantic_orders`)
    up to the float32 summation order of the sums.

    Launch settings: ``rows_per_program`` / ``update_rows``: rows per program of the assignment / of the
    update passes; ``block_n``: rows per step of the assignment, and per program of the placement (the
    assignment counts each such tile's clusters, by ``tl.histogram``). ``sums_in_assign``: the sums
    accumulated by the assignment (a one-hot dot per step; None: when K <= 64), else read afterwards
    along the cluster order (``_cluster_sums_kernel``: a step of ``sum_block`` sorted rows meets one or
    two clusters), ``sum_rows`` rows per program. ``on_order(perm, pending)``: called once the launches
    that place ``perm`` are queued, before the sums' (a caller on a second stream records an event there,
    so its other stream waits for the order only); ``pending``: None, or the ``cluster_sums`` argument of
    :func:`gather_rows` still to compute — a hook that moves x's full tensor into the order with it
    returns True, and no sums pass runs. Defaults: the fastest of a Hopper sweep at the wan 480p shape
    (block_n, warps, stages, rows per program; ``benchmarks/RESULTS.md``): rows per program for one wave
    of two programs per SM (the assignment's registers allow two). The centroids are prepared by a launch
    of their own so that no assignment program holds the Lloyd update in registers (it spilled, ptxas
    sm_90a, 2026-11-22). Rows and centroids by TMA measured the same: not kept."""
    if block_n is None:
        block_n = 64
    if rows_per_program is None:  # one wave: the assignment holds 2 programs per SM (its registers)
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 64
        rows_per_program = triton.cdiv(triton.cdiv(x.shape[2] * x.shape[0] * x.shape[1], 2 * sms), block_n) * block_n
    if sums_in_assign is None:
        sums_in_assign = c.shape[1] <= 64
    bx, hx, n, d = x.shape
    g, k = bx * hx, c.shape[1]
    c = _checked_centroids(x, c, "kmeans_cluster_order")
    dev = x.device
    kw = dict(D=d, K_PAD=_pow2(k), D_PAD=_pow2(d), BLOCK_N=block_n, num_warps=num_warps)
    if num_stages is not None:
        kw["num_stages"] = num_stages
    rows_per_program = max(block_n, rows_per_program // block_n * block_n)
    xs = x[:, :, ::sample_step] if sample_step > 1 else x
    prev = None  # (sums, counts) of the last pass: the next pass's centroids are their update of c
    if stats is not None:
        sums, counts = stats
        if tuple(sums.shape) != (g, k, d) or tuple(counts.shape) != (g, k):
            raise ValueError(f"kmeans_cluster_order: stats {tuple(sums.shape)}, {tuple(counts.shape)} do not match "
                             f"centroids {tuple(c.shape)}")
        prev = (sums.float().contiguous(), counts.float().contiguous())

    def stat_buffers():  # zeroed by the pass's centroid launch
        buf = torch.empty(g * k * (d + 1), device=dev, dtype=torch.float32)
        return buf[: g * k * d].view(g, k, d), buf[g * k * d:].view(g, k)

    for _ in range(iters):
        sums, counts = stat_buffers()
        cout, cargs = _prepared(xs, c, prev, (sums, counts))
        ns = xs.shape[2]
        urows = max(block_n, update_rows // block_n * block_n)
        _kmeans_assign_kernel[(triton.cdiv(ns, urows), g)](
            xs, *cargs, counts, sums, counts, counts, counts, ns, k, urows, hx,
            xs.stride(0), xs.stride(1), xs.stride(2), xs.stride(3),
            STORE_LABELS=False, WITH_SUMS=True, **kw)
        c, prev = cout, (sums, counts)
    tiles, chunks = triton.cdiv(n, block_n), triton.cdiv(n, rows_per_program)
    labels = torch.empty(g, n, device=dev, dtype=torch.int32)
    tbefore = torch.empty(g, tiles, k, device=dev, dtype=torch.int32)  # per tile: the chunk's earlier rows
    csizes = torch.empty(g, k, chunks, device=dev, dtype=torch.int32)
    sums, counts = stat_buffers()
    cout, cargs = _prepared(x, c, prev, (sums, counts))
    _kmeans_assign_kernel[(chunks, g)](
        x, *cargs, labels, sums, counts, tbefore, csizes, n, k, rows_per_program, hx,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        STORE_LABELS=True, WITH_SUMS=sums_in_assign, TILE_COUNTS=True, **kw)
    perm = torch.empty(g, seq_len, device=dev, dtype=torch.int64)
    bounds = torch.empty(g, k + 1, device=dev, dtype=torch.int64)
    cbefore = torch.empty_like(csizes)
    start = torch.empty(g, k, device=dev, dtype=torch.int32)
    _chunk_prefix_kernel[(g,)](csizes, cbefore, start, k, chunks, K_PAD=_pow2(k), CHUNK_BLOCK=32, num_warps=4)
    _cluster_place_kernel[(tiles, g)](labels, tbefore, cbefore, start, perm, bounds, n, k, video_start,
                                      seq_len, tiles, chunks, rows_per_program // block_n, K_PAD=_pow2(k),
                                      BLOCK_N=block_n, TEXT_BLOCK=256, num_warps=place_warps)
    pending = None if sums_in_assign else (labels, bounds, sums, counts, video_start)
    if on_order is not None and on_order(perm, pending):
        pending = None  # the hook summed the rows as it moved them (gather_rows(cluster_sums=pending))
    if pending is not None:  # the statistics from the rows in cluster order
        _cluster_sums_kernel[(triton.cdiv(n, sum_rows), g)](
            x, perm, labels, bounds, sums, counts, n, k, video_start, seq_len, hx, sum_rows,
            x.stride(0), x.stride(1), x.stride(2), x.stride(3),
            D=d, D_PAD=_pow2(d), K_PAD=_pow2(k), BLOCK_N=sum_block, num_warps=sum_warps)
    return perm, bounds, cout, (sums, counts)


@triton.jit
def _cluster_sums_kernel(X, PERM, LABELS, BOUNDS, SUMS, COUNTS, N, K, VS, S, H, ROWS,
                         sx_b, sx_h, sx_n, sx_d,
                         D: tl.constexpr, D_PAD: tl.constexpr, K_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (ROWS positions of the cluster order from pid * ROWS, problem g): each cluster's row sum,
    added atomically into SUMS [G, K, D] (zeroed) float32, read along the order PERM [G, S] (the video
    rows sorted by LABELS [G, N], so a step of BLOCK_N positions meets one or two clusters: one masked
    row sum each); chunk 0 writes COUNTS [G, K] float32, the sizes in BOUNDS [G, K + 1]."""
    pid, g = tl.program_id(0), tl.program_id(1)
    xg = (g // H).to(tl.int64) * sx_b + (g % H).to(tl.int64) * sx_h
    offs_d = tl.arange(0, D_PAD)
    dmask = offs_d < D
    p0 = pid * ROWS
    p1 = tl.minimum(p0 + ROWS, N)
    for start in range(p0, p1, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        pm = pos < p1
        rows = tl.load(PERM + g.to(tl.int64) * S + VS + pos, mask=pm, other=VS) - VS
        lab = tl.load(LABELS + g * N + rows, mask=pm, other=0)
        x = tl.load(X + xg + rows[:, None] * sx_n + offs_d[None, :] * sx_d, mask=pm[:, None] & dmask[None, :],
                    other=0.0)
        _add_cluster_sums(x, lab, pm, start == 0, SUMS, COUNTS, BOUNDS, g, K, offs_d, D, K_PAD)


@triton.jit
def _add_cluster_sums(x, lab, valid, first, SUMS, COUNTS, BOUNDS, g, K, offs_d, D: tl.constexpr,
                      K_PAD: tl.constexpr):
    """Rows ``x`` [R, D_PAD] of problem g with their clusters ``lab`` [R] (where ``valid``; consecutive
    rows of the cluster order, so one or two clusters): each cluster's row sum (float32) added atomically
    into SUMS [G, K, D]; ``first`` (the problem's first block) also writes COUNTS [G, K] float32, the
    sizes in BOUNDS [G, K + 1]."""
    if first:
        offs_k = tl.arange(0, K_PAD)
        kmask = offs_k < K
        lo = tl.load(BOUNDS + g * (K + 1) + offs_k, mask=kmask, other=0)
        hi = tl.load(BOUNDS + g * (K + 1) + offs_k + 1, mask=kmask, other=0)
        tl.store(COUNTS + g * K + offs_k, (hi - lo).to(tl.float32), mask=kmask)
    xf = x.to(tl.float32)
    c_lo = tl.min(tl.where(valid, lab, K), 0)
    c_hi = tl.max(tl.where(valid, lab, -1), 0)
    for c in range(c_lo, c_hi + 1):  # sorted: the block's clusters are [c_lo, c_hi], some maybe empty
        sel = (lab == c) & valid
        if tl.max(sel.to(tl.int32), 0) > 0:
            tl.atomic_add(SUMS + (g * K + c).to(tl.int64) * D + offs_d, tl.sum(tl.where(sel[:, None], xf, 0.0), 0),
                          mask=offs_d < D)


@triton.jit
def _gather_rows_kernel(IDX, X0, Y0, X1, Y1, X2, Y2, S, H, si_b, si_h,
                        sx_b, sx_s, sx_h, sy_b, sy_s, sy_h,
                        LABELS, BOUNDS, SUMS, COUNTS, VS, N, K,
                        D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_S: tl.constexpr, N_TENSORS: tl.constexpr,
                        CLUSTER_SUMS: tl.constexpr = False, K_PAD: tl.constexpr = 16):
    """Program (row block, b * H + h): Y[b, i, h, :] = X[b, IDX[b, h, i], h, :] for i in the block, for
    the N_TENSORS (X, Y) pairs (the same strides for all Xs, and for all Ys).

    CLUSTER_SUMS (IDX a semantic order: positions [VS, VS + N) hold the video rows sorted by LABELS [B * H,
    N]; BOUNDS [B * H, K + 1] the clusters' extents): also each cluster's sum of X0's rows, added
    atomically into SUMS [B * H, K, D] float32 (zeroed; a block meets one or two clusters), and block 0
    writes COUNTS [B * H, K] float32, the sizes."""
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
    x0 = tl.load(X0 + xo, mask=m)
    tl.store(Y0 + yo, x0, mask=m)
    if CLUSTER_SUMS:
        vm = rmask & (rows >= VS) & (rows < VS + N)
        lab = tl.load(LABELS + bh.to(tl.int64) * N + (src - VS), mask=vm, other=0)
        _add_cluster_sums(x0, lab, vm, pid == 0, SUMS, COUNTS, BOUNDS, bh, K, offs_d, D, K_PAD)
    if N_TENSORS > 1:
        tl.store(Y1 + yo, tl.load(X1 + xo, mask=m), mask=m)
    if N_TENSORS > 2:
        tl.store(Y2 + yo, tl.load(X2 + xo, mask=m), mask=m)


def gather_rows(xs: list[torch.Tensor], idx: torch.Tensor, block_s: int = 64, num_warps: int = 4,
                cluster_sums: tuple | None = None) -> list[torch.Tensor]:
    """``out[b, i, h] = x[b, idx[b, h, i], h]`` for each ``x`` of ``xs`` (1 to 3 tensors of one shape
    ``(B, S, H, D)`` and one stride layout, last dim contiguous), ``idx`` int ``[B or 1, H, S]``. One
    launch; contiguous ``(B, S, H, D)`` outputs. ``cluster_sums`` = ``(labels, bounds, sums, counts,
    video_start)`` with ``idx`` ``[B, H, S]`` a semantic order (:func:`kmeans_cluster_order`'s ``perm``,
    ``labels`` int32 ``[B * H, N]``, ``bounds`` ``[B * H, K + 1]``): the same launch also fills ``sums``
    (zeroed float32 ``[B * H, K, D]``) with each cluster's sum of ``xs[0]``'s rows and ``counts``
    (float32 ``[B * H, K]``) with the sizes: what reading the rows in that order gives for free."""
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
    extra, kw = (ys[0], ys[0], ys[0], ys[0], 0, 0, 1), {}
    if cluster_sums is not None:
        labels, bounds, sums, counts, vs = cluster_sums
        if idx.shape[0] != b or labels.shape[0] != b * h or sums.shape[:1] != (b * h,) or sums.shape[2] != d:
            raise ValueError("gather_rows: cluster_sums need a per-sample index and [B * H, ...] labels and sums")
        extra = (labels, bounds, sums, counts, vs, labels.shape[1], sums.shape[1])
        kw = dict(CLUSTER_SUMS=True, K_PAD=_pow2(sums.shape[1]))
    _gather_rows_kernel[grid](idx, pad[0], ypad[0], pad[1], ypad[1], pad[2], ypad[2], s, h, si_b, idx.stride(1),
                              x0.stride(0), x0.stride(1), x0.stride(2), y0.stride(0), y0.stride(1), y0.stride(2),
                              *extra, D=d, D_PAD=_pow2(d, 1), BLOCK_S=block_s, N_TENSORS=len(xs), num_warps=num_warps,
                              **kw)
    return ys


@triton.jit
def _semantic_keep_kernel(QC, KC, QB, KB, KEEP, KQ, KK, NB, qk_scale, top_p,
                          D: tl.constexpr, KK_PAD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                          NB_PAD: tl.constexpr):
    """Program (query cluster cq, problem g): KEEP[g, cq, :] (uint8 [G, KQ, NB]) = the key blocks met by
    the key clusters kept for it: by decreasing share of ``softmax(qk_scale * q_c . k_c + log |k_c|)`` up
    to ``top_p`` of it (ties: lower index first, as a stable sort); nothing for an empty query cluster."""
    cq, g = tl.program_id(0), tl.program_id(1).to(tl.int64)
    offs_k = tl.arange(0, KK_PAD)
    kmask = offs_k < KK
    klo = tl.load(KB + g * (KK + 1) + offs_k, mask=kmask, other=0)
    khi = tl.load(KB + g * (KK + 1) + offs_k + 1, mask=kmask, other=0)
    log_size = tl.where(kmask & (khi > klo), tl.log(tl.maximum(khi - klo, 1).to(tl.float32)), float("-inf"))
    lo = tl.load(QB + g * (KQ + 1) + cq)
    hi = tl.load(QB + g * (KQ + 1) + cq + 1)
    offs_d = tl.arange(0, BLOCK_D)
    dots = tl.zeros([KK_PAD], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dm = d0 + offs_d < D
        qc = tl.load(QC + (g * KQ + cq) * D + d0 + offs_d, mask=dm, other=0.0)
        kc = tl.load(KC + (g * KK + offs_k[:, None]) * D + d0 + offs_d[None, :], mask=kmask[:, None] & dm[None, :],
                     other=0.0)
        dots += tl.sum(kc * (qk_scale * qc)[None, :], 1)
    logits = dots + log_size
    e = tl.exp(logits - tl.max(logits, 0))
    share = e / tl.sum(e, 0)  # 0 for empty and padded key clusters
    # Mass before each entry in decreasing order (ties: the lower index first).
    first = (share[:, None] > share[None, :]) | ((share[:, None] == share[None, :]) & (offs_k[:, None] < offs_k[None, :]))
    before = tl.sum(tl.where(first, share[:, None], 0.0), 0)
    keep = (before < top_p * tl.sum(share, 0)) & (share > 0) & (hi > lo)  # kept clusters are not empty
    # The blocks a kept cluster meets are [klo // BLOCK_N, (khi - 1) // BLOCK_N]: +1 where such a range
    # starts, -1 after it ends, and a running sum (no [blocks x clusters] comparison).
    first_b = tl.where(keep, klo // BLOCK_N, -1).to(tl.int32)  # -1: not kept
    end_b = tl.where(keep, (khi - 1) // BLOCK_N + 1, -1).to(tl.int32)
    d = tl.histogram(first_b, NB_PAD, mask=first_b >= 0) - tl.histogram(end_b, NB_PAD, mask=(end_b >= 0) & (end_b < NB))
    offs_n = tl.arange(0, NB_PAD)
    tl.store(KEEP + (g * KQ + cq) * NB + offs_n, (tl.cumsum(d, 0) > 0).to(tl.uint8), mask=offs_n < NB)


@triton.jit
def _semantic_mask_kernel(KEEP, QB, MASK, NUM, IDX, KQ, MB, NB, TM0, TM1, TN0, TN1,
                          BLOCK_M: tl.constexpr, KQ_PAD: tl.constexpr, BLOCK_NB: tl.constexpr,
                          WRITE_CSR: tl.constexpr = False):
    """Program (query block m, problem g): row m of the block mask of problem g. The query clusters that
    meet block m are the index range [c0, c1) (bounds are sorted); key block n is set iff it is set for one
    of them in KEEP (:func:`_semantic_keep_kernel`). Rows [TM0, TM1) and columns [TN0, TN1) (text) are set
    whole. WRITE_CSR: also the kernel's block lists, NUM [G, MB] int32 (blocks set) and IDX [G, MB, NB]
    int32 (the set blocks ascending, then the others ascending: ``BlockMask.from_dense``'s layout)."""
    m, g = tl.program_id(0), tl.program_id(1).to(tl.int64)
    start = m * BLOCK_M
    offs_q = tl.arange(0, KQ_PAD)
    qlo = tl.load(QB + g * (KQ + 1) + offs_q, mask=offs_q < KQ, other=0)
    qhi = tl.load(QB + g * (KQ + 1) + offs_q + 1, mask=offs_q < KQ, other=0)
    c0 = tl.sum(((qhi <= start) & (offs_q < KQ)).to(tl.int32), 0)
    c1 = tl.sum(((qlo < start + BLOCK_M) & (offs_q < KQ)).to(tl.int32), 0)
    row_all = (m >= TM0) & (m < TM1)
    n_hit = tl.full([], 0, tl.int32)
    for n0 in range(0, NB, BLOCK_NB):
        offs_n = n0 + tl.arange(0, BLOCK_NB)
        hit = _semantic_hits(KEEP + g * KQ * NB, offs_n, c0, c1, NB, TN0, TN1, row_all)
        tl.store(MASK + (g * MB + m) * NB + offs_n, hit.to(tl.uint8), mask=offs_n < NB)
        n_hit += tl.sum(hit.to(tl.int32), 0)
    if WRITE_CSR:
        tl.store(NUM + g * MB + m, n_hit)
        hits_before = tl.full([], 0, tl.int32)
        for n0 in range(0, NB, BLOCK_NB):
            offs_n = n0 + tl.arange(0, BLOCK_NB)
            inside = offs_n < NB
            hit = _semantic_hits(KEEP + g * KQ * NB, offs_n, c0, c1, NB, TN0, TN1, row_all).to(tl.int32)
            first = hits_before + tl.cumsum(hit, 0) - hit  # among the set blocks
            rest = n_hit + (n0 - hits_before) + tl.cumsum(1 - hit, 0) - (1 - hit)  # after them
            tl.store(IDX + (g * MB + m) * NB + tl.where(hit > 0, first, rest), offs_n, mask=inside)
            hits_before += tl.sum(hit, 0)


@triton.jit
def _semantic_hits(keep_g, offs_n, c0, c1, NB, TN0, TN1, row_all):
    """Key blocks ``offs_n`` (< NB) set for some query cluster in [c0, c1), text columns, or all (a text row)."""
    inside = offs_n < NB
    hit = ((offs_n >= TN0) & (offs_n < TN1)) | row_all
    for cq in range(c0, c1):
        hit = hit | (tl.load(keep_g + cq * NB + offs_n, mask=inside, other=0) > 0)
    return hit & inside


def semantic_block_mask(q_centroids: torch.Tensor, k_centroids: torch.Tensor, q_bounds: torch.Tensor,
                        k_bounds: torch.Tensor, seq_len: int, top_p: float, scale: float, block_m: int = 128,
                        block_n: int = 128, text_rows: tuple[int, int] = (0, 0), text_cols: tuple[int, int] = (0, 0),
                        num_warps: int = 1, csr: bool = False, block_d: int = 32, mask_warps: int = 2):
    """Bool ``[..., Mb, Nb]`` block mask of a semantic plan: centroids ``[..., K, D]`` float32, cluster
    bounds ``[..., K + 1]`` (sorted positions; cluster c spans ``[bounds[c], bounds[c + 1])``), at most
    ``MAX_CLUSTERS`` a side. ``text_rows`` / ``text_cols``: block ranges set whole. Two launches: the key
    blocks of the key clusters kept per query cluster (once each), then the rows of the mask (an OR of
    the rows of the query clusters that meet the block).
    ``csr``: return ``(mask, kv_num_blocks int32 [..., Mb], kv_indices int32 [..., Mb, Nb])``, the
    attention kernel's block lists written by the same launch (``BlockMask.from_dense``'s layout).
    Launch settings (``num_warps`` of the first kernel, ``block_d``, ``mask_warps`` of the second): the
    fastest of a 36-setting Hopper sweep at the wan 480p shape (64 x 128 clusters, 12 heads)."""
    lead, (kq, d), kk = q_centroids.shape[:-2], q_centroids.shape[-2:], k_centroids.shape[-2]
    if max(kq, kk) > MAX_CLUSTERS:
        raise ValueError(f"semantic_block_mask handles up to {MAX_CLUSTERS} clusters a side, got {kq} and {kk}")
    g = q_centroids[..., 0, 0].numel()
    mb, nb = triton.cdiv(seq_len, block_m), triton.cdiv(seq_len, block_n)
    dev = q_centroids.device
    qb, kb = q_bounds.contiguous(), k_bounds.contiguous()
    keep = torch.empty(g, kq, nb, dtype=torch.uint8, device=dev)
    _semantic_keep_kernel[(kq, g)](q_centroids.float().contiguous(), k_centroids.float().contiguous(), qb, kb, keep,
                                   kq, kk, nb, scale, top_p, D=d, KK_PAD=_pow2(kk), BLOCK_D=min(block_d, _pow2(d)),
                                   BLOCK_N=block_n, NB_PAD=_pow2(nb), num_warps=num_warps)
    out = torch.empty(*lead, mb, nb, dtype=torch.uint8, device=dev)
    num = torch.empty(*lead, mb, dtype=torch.int32, device=dev) if csr else out
    idx = torch.empty(*lead, mb, nb, dtype=torch.int32, device=dev) if csr else out
    _semantic_mask_kernel[(mb, g)](keep, qb, out, num, idx, kq, mb, nb, *text_rows, *text_cols,
                                   BLOCK_M=block_m, KQ_PAD=_pow2(kq), BLOCK_NB=min(256, _pow2(nb)), WRITE_CSR=csr,
                                   num_warps=mask_warps)
    return (out.view(torch.bool), num, idx) if csr else out.view(torch.bool)
