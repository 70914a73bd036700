"""The semantic order (Sparse VideoGen2, online): k-means of each head's Q and of its K, clusters made
contiguous, key blocks chosen from the centroids."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..block_mask import BlockMask, cdiv
from ..grid import VideoGrid
from ..kernels import use_triton
from .gather import gather_tokens_many
from .static import _dense_text, _text_blocks, _with_text



def _assign_stats(x: torch.Tensor, c: torch.Tensor, with_sums: bool, store_labels: bool = True):
    """Nearest centroid of each row of ``x`` ``[B, H, N, D]`` among ``c`` ``[B * H, K, D]`` float32
    (``argmax x . c - |c|^2 / 2``, scores in float32 with c rounded to x's dtype), with each cluster's
    size (and row sum). Returns ``(labels [B * H, N] or None, counts float32 [B * H, K], sums or None)``.
    One Triton launch on the GPU (:func:`vdit_accel.kernels.permute.kmeans_assign`); the same in PyTorch
    on the CPU."""
    if use_triton(x):
        from ..kernels.permute import kmeans_assign

        return kmeans_assign(x, c, with_sums=with_sums, store_labels=store_labels)
    b, h, n, d = x.shape
    xg = x.reshape(b * h, n, d)
    scores = torch.bmm(xg.float(), c.to(x.dtype).float().transpose(1, 2)) - 0.5 * (c.float() ** 2).sum(-1)[:, None, :]
    labels = scores.argmax(-1)
    k = c.shape[1]
    counts = torch.zeros(b * h, k, device=x.device).scatter_add_(1, labels, torch.ones_like(labels, dtype=torch.float32))
    sums = None
    if with_sums:
        sums = torch.zeros(b * h, k, d, device=x.device).scatter_add_(1, labels[..., None].expand(-1, -1, d), xg.float())
    return labels.int() if store_labels else None, counts, sums


def _as_4d(x: torch.Tensor) -> torch.Tensor:
    """``[..., N, D]`` -> ``[B, H, N, D]`` (a view where the leading dims allow)."""
    if x.dim() == 4:
        return x
    return x.reshape(1, -1, *x.shape[-2:])


def kmeans(x: torch.Tensor, k: int, iters: int = 10, init: torch.Tensor | None = None, sample: int | None = None,
           seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means of the rows of ``x`` ``[..., N, D]`` (each leading index its own problem).

    Returns ``(labels [..., N], centroids [..., k, D] float32)``. ``init``: centroids to start from
    (the previous call's: warm start), else ``k`` rows drawn at random (seeded). The ``iters`` Lloyd
    updates use every ``ceil(N / sample)``-th row (all when ``sample`` is None); the returned labels
    are the final assignment of every row. Empty clusters keep their centroid. On the GPU each update
    and the final assignment are one kernel launch each, with no host synchronisation."""
    labels, cent, _ = _kmeans(x, k, iters, init, sample, seed)
    return labels.long(), cent


def _lloyd(c: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """One Lloyd update: each centroid the mean of its rows (``sums / counts``); empty clusters keep theirs."""
    return torch.where(counts[..., None] > 0, sums / counts.clamp_min(1.0)[..., None], c)


def _kmeans(x, k, iters, init, sample, seed=0, stats=None):
    """:func:`kmeans` returning ``(labels int32 [..., N], centroids [..., k, D], (sums [..., k, D], counts
    [..., k]))``, the last two float32 of the final assignment; ``stats``: such a pair from the previous
    call, whose update of ``init`` is where this call starts (see :func:`semantic_orders`)."""
    lead, (n, d) = x.shape[:-2], x.shape[-2:]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= rows; got k={k} for {n} rows")
    x4 = _as_4d(x)
    g = x4.shape[0] * x4.shape[1]
    c = _init_centroids(x4, k, seed) if init is None else init.reshape(g, k, d).float()
    if stats is not None:
        c = _lloyd(c, stats[0].reshape(g, k, d).float(), stats[1].reshape(g, k).float())
    xs = x4 if sample is None or sample >= n else x4[:, :, :: cdiv(n, sample)]  # a strided view: no copy
    for _ in range(iters):
        _, counts, sums = _assign_stats(xs, c, with_sums=True, store_labels=False)
        c = _lloyd(c, sums, counts)
    labels, counts, sums = _assign_stats(x4, c, with_sums=True)
    return labels.view(*lead, n), c.view(*lead, k, d), (sums.view(*lead, k, d), counts.view(*lead, k))


def _init_centroids(x4: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Cold start: ``k`` rows of ``x4`` ``[B, H, N, D]`` drawn at random (seeded), float32 ``[B * H, k, D]``."""
    b, h, n, d = x4.shape
    rows = torch.randperm(n, generator=torch.Generator(device="cpu").manual_seed(seed))[:k].to(x4.device)
    return x4.index_select(2, rows).reshape(b * h, k, d).float()


def default_clusters(grid: VideoGrid, block: int) -> tuple[int, int]:
    """Default cluster counts of the semantic order: ~4 blocks per query cluster, ~2 per key cluster
    (wan 480p, blocks of 128: 64 and 128), at least 2, at most one cluster per 4 video tokens."""
    v = grid.video_len
    return (max(2, min(v // 4, cdiv(v, 4 * block))), max(2, min(v // 4, cdiv(v, 2 * block))))


@dataclass
class SemanticPlan:
    """A semantic order of every (batch, head): positions, cluster extents and centroids.

    ``q_perm`` / ``k_perm``: ``[B, H, S]`` permutations of the sequence (text in place);
    ``q_bounds`` / ``k_bounds``: ``[B, H, K + 1]`` where each cluster starts in the reordered sequence
    (cluster ``c`` spans ``[bounds[c], bounds[c + 1])``; empty clusters are empty ranges);
    ``q_centroids`` / ``k_centroids``: ``[B, H, K, D]`` float32, the ones every token was assigned to;
    ``q_stats`` / ``k_stats``: ``(sums [B, H, K, D], counts [B, H, K])`` float32 of that assignment (pass
    :attr:`warm` to the next call: its centroids start as these updated once by them)."""

    q_perm: torch.Tensor
    k_perm: torch.Tensor
    q_bounds: torch.Tensor
    k_bounds: torch.Tensor
    q_centroids: torch.Tensor
    k_centroids: torch.Tensor
    q_stats: tuple[torch.Tensor, torch.Tensor] | None = None
    k_stats: tuple[torch.Tensor, torch.Tensor] | None = None
    moved: tuple | None = None  # (k, v, k moved, v moved, CUDA event after the move): semantic_orders(v=)

    @property
    def warm(self) -> tuple:
        """What the next call of :func:`semantic_orders` takes as ``init``."""
        return (self.q_centroids, self.k_centroids, self.q_stats, self.k_stats)


def _cluster_order(x: torch.Tensor, grid: VideoGrid, k: int, iters: int, init, sample, stats=None, on_order=None):
    """x [B, S, H, D] -> (perm [B, H, S], bounds [B, H, k + 1], centroids [B, H, k, D], (sums [B, H, k, D],
    counts [B, H, k])); ``on_order(perm, pending)`` is called once the order is queued (see
    :func:`vdit_accel.kernels.permute.kmeans_cluster_order`; ``pending`` is None off the GPU path).

    On the GPU: :func:`vdit_accel.kernels.permute.kmeans_cluster_order` (the
    updates, the assignment and a stable counting sort in ``4 + 2 iters`` launches); else this path."""
    vs, vl = grid.video_start, grid.video_len
    xv = x[:, vs : vs + vl].transpose(1, 2)  # [B, H, V, D], a view
    if use_triton(x):
        from ..kernels.permute import MAX_CLUSTERS, kmeans_cluster_order

        if 1 <= k <= min(MAX_CLUSTERS, vl):
            b, h = xv.shape[:2]
            c = _init_centroids(xv, k) if init is None else init.reshape(b * h, k, -1)
            step = cdiv(vl, sample) if sample is not None and sample < vl else 1
            st = None if stats is None else (stats[0].reshape(b * h, k, -1), stats[1].reshape(b * h, k))
            hook = None if on_order is None else (lambda perm, pending: on_order(perm.view(b, h, -1), pending))
            perm, bounds, cent, (sums, counts) = kmeans_cluster_order(xv, c, iters, step, vs, grid.seq_len, st,
                                                                      on_order=hook)
            return (perm.view(b, h, -1), bounds.view(b, h, -1), cent.view(b, h, k, -1),
                    (sums.view(b, h, k, -1), counts.view(b, h, k)))
    labels, cent, (sums, counts) = _kmeans(xv, k, iters, init, sample, stats=stats)
    video = torch.sort(labels, dim=-1, stable=True).indices
    if vs:
        video = video + vs
    bounds = torch.nn.functional.pad(counts.long().cumsum(-1), (1, 0))
    if vs:
        bounds = bounds + vs
    perm = _with_text(video, grid)
    if on_order is not None:
        on_order(perm, None)
    return perm, bounds, cent, (sums, counts)


def semantic_orders(q: torch.Tensor, k: torch.Tensor, grid: VideoGrid, q_clusters: int, k_clusters: int,
                    iters: int = 0, init: tuple | None = None, init_iters: int = 8,
                    sample: int | None = 16384, v: torch.Tensor | None = None) -> SemanticPlan:
    """The semantic orders of every head of one call: k-means of Q and of K (``(B, S, H, D)``) apart.

    Cold (``init`` None): ``init_iters`` Lloyd updates from random rows. Warm (``init`` = the previous
    plan's :attr:`SemanticPlan.warm`, or just its ``(q_centroids, k_centroids)``): its centroids updated
    once by its own assignment of every token (an online k-means across calls: the sums come free with
    that assignment, so no pass of this call's is spent on them), then ``iters`` more updates. Updates
    use ``sample`` video tokens (evenly strided); every token is then assigned. Text tokens keep their place.

    On CUDA the K side runs on a second stream while the Q side runs on the current one: their kernels
    are small, latency-bound grids that leave SMs idle alone. The current stream waits for the key order
    only: the K statistics (the next call's) follow it on the second stream, and with ``v`` given, K and V
    are moved into the key order there first (:attr:`SemanticPlan.moved`), beside the query half and the
    block mask. Nothing syncs with the host."""
    n_iter = init_iters if init is None else iters
    qi, ki, qs, ks = (None,) * 4 if init is None else (tuple(init) + (None, None))[:4]
    if not q.is_cuda:
        qp, qb, qc, qst = _cluster_order(q, grid, q_clusters, n_iter, qi, sample, qs)
        kp, kb, kc, kst = _cluster_order(k, grid, k_clusters, n_iter, ki, sample, ks)
        return SemanticPlan(qp, kp, qb, kb, qc, kc, qst, kst)
    main, side = torch.cuda.current_stream(q.device), _side_stream(q.device)
    side.wait_stream(main)  # q, k, v (and the centroids) are written on the current stream
    ready, moved = torch.cuda.Event(), []

    def on_order(perm, pending):  # on the side stream, the key order queued: K and V follow it there
        ready.record(side)
        fused = False
        if v is not None:
            if pending is not None and k.stride(3) == 1 and v.stride() == k.stride():
                from ..kernels.permute import gather_rows

                # and K's cluster sums on the way (2 warps: measured faster than 4, about the plain
                # move's time)
                k2, v2 = gather_rows([k, v], perm, num_warps=2, cluster_sums=pending)
                fused = True
            else:
                k2, v2 = gather_tokens_many([k, v], perm)
            done = torch.cuda.Event()
            done.record(side)
            for t in (k2, v2):
                t.record_stream(main)
            moved.append((k, v, k2, v2, done))
        return fused

    with torch.cuda.stream(side):
        kp, kb, kc, kst = _cluster_order(k, grid, k_clusters, n_iter, ki, sample, ks, on_order)
    qp, qb, qc, qst = _cluster_order(q, grid, q_clusters, n_iter, qi, sample, qs)
    main.wait_event(ready)
    for t in (kp, kb, kc):  # made on the side stream, used (and freed) on the current one; the statistics
        t.record_stream(main)  # are used by the next plan's K half, on the side stream again
    for t in (k, v, ki, *(ks or ())):  # read on the side stream: not reused before that work is done
        if t is not None:
            t.record_stream(side)
    return SemanticPlan(qp, kp, qb, kb, qc, kc, qst, kst, moved[0] if moved else None)


_SIDE_STREAMS: dict[int, Any] = {}


def _side_stream(device: torch.device):
    """One extra CUDA stream per device for the plans' independent halves."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SIDE_STREAMS:
        _SIDE_STREAMS[idx] = torch.cuda.Stream(device=idx)
    return _SIDE_STREAMS[idx]


def _block_overlap(bounds: torch.Tensor, block: int, n_blocks: int) -> torch.Tensor:
    """Float [..., n_blocks, K]: 1 where block m holds some token of cluster c (ranges from ``bounds``)."""
    lo, hi = bounds[..., :-1], bounds[..., 1:]  # [..., K]
    start = torch.arange(n_blocks, device=bounds.device).view(n_blocks, 1) * block
    return ((lo[..., None, :] < start + block) & (hi[..., None, :] > start) & (hi > lo)[..., None, :]).float()


def top_p_keep(weights: torch.Tensor, top_p: float) -> torch.Tensor:
    """Bool mask of the largest entries of each row of ``weights`` (non-negative, last dim) whose sum
    first reaches ``top_p`` of the row's sum (at least one entry per non-empty row); of equal entries
    the lower index comes first."""
    w, order = weights.sort(dim=-1, descending=True, stable=True)
    total = w.sum(-1, keepdim=True)
    before = w.cumsum(-1) - w  # mass already kept before this entry
    keep_sorted = (before < top_p * total) & (w > 0)
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def semantic_block_mask(plan: SemanticPlan, grid: VideoGrid, top_p: float, block_m: int = 128, block_n: int = 128,
                        scale: float | None = None, lists: bool = False):
    """Bool ``[B, H, Mb, Nb]``: the key blocks of each query block under a semantic plan (see the module
    docstring): key clusters by estimated attention share up to ``top_p``, per query cluster; text rows
    and columns dense. ``scale``: the softmax scale (default ``1 / sqrt(D)``). On the GPU two Triton
    launches (:func:`vdit_accel.kernels.permute.semantic_block_mask`, up to ``MAX_CLUSTERS`` a side); this
    PyTorch path (about 40 small ops) is the reference. ``lists``: return ``(mask, block_mask)``, the
    kernel's :class:`~vdit_accel.block_mask.BlockMask`, written by the same kernels on the GPU (None here)."""
    d = plan.q_centroids.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if use_triton(plan.q_centroids):
        from ..kernels.permute import MAX_CLUSTERS, semantic_block_mask as fused

        if max(plan.q_centroids.shape[-2], plan.k_centroids.shape[-2]) <= MAX_CLUSTERS:
            out = fused(plan.q_centroids, plan.k_centroids, plan.q_bounds, plan.k_bounds, grid.seq_len, top_p, scale,
                        block_m, block_n, _text_blocks(grid, block_m), _text_blocks(grid, block_n), csr=lists)
            if not lists:
                return out
            mask, num, idx = out
            return mask, BlockMask(num, idx, grid.seq_len, block_m, block_n)
    sizes = (plan.k_bounds[..., 1:] - plan.k_bounds[..., :-1]).float()  # [B, H, Kk]
    logits = scale * plan.q_centroids @ plan.k_centroids.transpose(-1, -2) + sizes.log()[..., None, :]
    share = torch.softmax(logits, -1).nan_to_num(0.0)  # [B, H, Kq, Kk]
    keep = top_p_keep(share, top_p).float()
    s = grid.seq_len
    a = _block_overlap(plan.q_bounds, block_m, cdiv(s, block_m))  # [B, H, Mb, Kq]
    b = _block_overlap(plan.k_bounds, block_n, cdiv(s, block_n))  # [B, H, Nb, Kk]
    mask = (a @ keep @ b.transpose(-1, -2)) > 0
    _dense_text(mask, grid, None, block_m, block_n)
    return (mask, None) if lists else mask

