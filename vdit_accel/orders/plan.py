"""One attention call under its heads' token orders: where each head's tokens go, and its block mask."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..block_mask import BlockMask, cdiv
from ..grid import VideoGrid
from .gather import gather_tokens, gather_tokens_many, scatter_tokens
from .segment import segment_plan
from .semantic import default_clusters, semantic_block_mask, semantic_orders
from .spec import OrderSpec, Semantic, is_dynamic
from .static import inverse, static_order


_INDEX_CACHE: dict[tuple, torch.Tensor] = {}
_INDEX_CACHE_MAX = 64


def frame_index(o: OrderSpec | None, frame: OrderSpec | None, grid: VideoGrid, block: int,
                device) -> torch.Tensor | None:
    """Positions, in the ``frame`` order the tensors arrive in, of the tokens of static order ``o``
    (``[S]``; None when the two orders are the same). Cached per (orders, grid, block, device)."""
    if o == frame:
        return None
    key = (o, frame, grid, block, str(device))
    hit = _INDEX_CACHE.get(key)
    if hit is None:
        perm = static_order(o, grid, block, device)
        hit = perm if frame is None else inverse(static_order(frame, grid, block, device))[perm]
        if len(_INDEX_CACHE) >= _INDEX_CACHE_MAX:
            _INDEX_CACHE.pop(next(iter(_INDEX_CACHE)))
        _INDEX_CACHE[key] = hit
    return hit


@dataclass
class CallPlan:
    """Where each head's tokens go for one kernel call, and its block mask.

    ``q_index`` / ``k_index``: ``out[b, i, h] = x[b, index[b, h, i], h]`` (``[B or 1, H, S]``), or ``[S]``
    for every head, or None (the tensors stay as they came); K and V share ``k_index``; the output is
    written back through ``q_index`` (by the kernel, :meth:`kernel_q_index`; or :meth:`gather` /
    :meth:`scatter` for callers that move tensors themselves). ``mask``: bool ``[B or 1, H, Mb, Nb]``
    in the heads' own orders (None: dense). A plan reused across calls (``refresh``) keeps its kernel block mask and the inverse
    of ``q_index`` (:meth:`block_mask`, :meth:`q_inverse`), computed on first use."""

    q_index: torch.Tensor | None
    k_index: torch.Tensor | None
    mask: torch.Tensor | None
    _bm: Any = None
    _moved: tuple | None = None  # K and V already moved by the plan (SemanticPlan.moved): the first gather_kv's
    _q_inv: torch.Tensor | None = None
    _q_index32: torch.Tensor | None = None

    def block_mask(self, seq_len: int, block: int):
        """The kernel's :class:`~vdit_accel.block_mask.BlockMask` of ``mask`` (None when dense); cached
        (or given: the semantic plan's kernel writes it with the mask)."""
        if self.mask is None:
            return None
        if self._bm is None or self._bm.seq_len != seq_len or self._bm.block_m != block:
            self._bm = BlockMask.from_dense(self.mask, seq_len, block, block)
        return self._bm

    def kernel_q_index(self, heads: int) -> torch.Tensor | None:
        """``q_index`` as :func:`vdit_accel.attention` takes it (``[B or 1, H, S]``; a shared ``[S]`` order
        as a broadcast view): the kernel reads Q and writes the output through it, so neither moves. On
        CUDA as int32 (cheaper loads for the kernel than an int64 order), cached with the plan. Timed in
        pairs against the kernel on Q gathered first, reading through the order costs nothing
        (``benchmarks/RESULTS.md``)."""
        if self.q_index is None:
            return None
        qi = self.q_index if self.q_index.dim() == 3 else self.q_index.view(1, 1, -1).expand(1, heads, -1)
        if not qi.is_cuda:
            return qi
        if self._q_index32 is None or self._q_index32.shape != qi.shape:
            self._q_index32 = qi.to(torch.int32)
        return self._q_index32

    def gather_kv(self, k: torch.Tensor, v: torch.Tensor):
        """k and v moved into the key order (one launch on the GPU; none when the plan moved these very
        tensors already, beside its query half: it hands them over once)."""
        moved, self._moved = self._moved, None
        if moved is not None and moved[0] is k and moved[1] is v:
            if moved[4] is not None:
                torch.cuda.current_stream(k.device).wait_event(moved[4])
            return moved[2], moved[3]
        if self.k_index is None:
            return k, v
        return tuple(gather_tokens_many([k, v], self.k_index))

    def q_inverse(self) -> torch.Tensor | None:
        """The inverse of a per-head ``q_index`` (the output goes back by a gather with it); cached."""
        if self.q_index is None or self.q_index.dim() == 1:
            return None
        if self._q_inv is None:
            self._q_inv = inverse(self.q_index)
        return self._q_inv

    def gather(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """q, k, v moved into the plan's orders: at most two launches on the GPU (q; k and v together)."""
        if self.q_index is not None:
            q = gather_tokens(q, self.q_index)
        k, v = self.gather_kv(k, v)
        return q, k, v

    def scatter(self, out: torch.Tensor) -> torch.Tensor:
        """The attention output back in the order q arrived in."""
        return out if self.q_index is None else scatter_tokens(out, self.q_index, self.q_inverse())


def plan_call(q: torch.Tensor, k: torch.Tensor, grid: VideoGrid, orders: list[OrderSpec | None],
              frame: OrderSpec | None,
              block: int, static_mask: torch.Tensor | None, memory: dict | None = None,
              scale: float | None = None, step: int | None = None, v: torch.Tensor | None = None) -> CallPlan:
    """Plan one attention call whose heads have ``orders`` (one per head; q, k ``(B, S, H, D)`` arrive in
    the ``frame`` order, e.g. tiled when the transformer permuted its hidden states once per forward).

    ``static_mask``: bool ``[1, H, Mb, Nb]`` with each static head's block mask in its own order (rows of
    dynamic heads are ignored), or None (static heads dense). ``memory``: a dict kept by the caller
    between calls of the same layer; semantic heads keep their centroids there (warm start), dynamic
    orders their last plan. ``step``: the denoising step of this call, if known: a dynamic plan is then
    reused while ``0 <= step - (its step) < refresh`` (so the calls of one step share it), else it is
    reused for ``refresh - 1`` calls after the one that made it. ``v``: the call's values, when the caller
    takes K and V from :meth:`CallPlan.gather_kv` right after (a semantic order covering every head then
    moves them on its second stream as soon as the key order exists)."""
    b, s, h, d = q.shape
    if len(orders) != h:
        raise ValueError(f"plan_call got {len(orders)} orders for {h} heads")
    device = q.device
    ident = torch.arange(s, device=device)
    q_rows: list[torch.Tensor | None] = []
    k_rows: list[torch.Tensor | None] = []
    for o in orders:
        if not is_dynamic(o):
            idx = frame_index(o, frame, grid, block, device)
            q_rows.append(idx)
            k_rows.append(idx)
        else:
            q_rows.append(None)
            k_rows.append(None)
    dyn_rows: dict[int, torch.Tensor] = {}  # head -> bool [B, Mb, Nb]
    q_dyn: dict[int, torch.Tensor] = {}  # head -> [B, S]
    k_dyn: dict[int, torch.Tensor] = {}
    groups: dict[str, list[int]] = {}
    for hi, o in enumerate(orders):
        if is_dynamic(o):
            groups.setdefault(o, []).append(hi)
    memory = {} if memory is None else memory
    replanned = False
    for key, heads in groups.items():
        o = orders[heads[0]]
        plan_key = ("plan", key, tuple(heads), b, grid)
        cached = memory.get(plan_key)
        if cached is not None and (cached[4] < o.refresh - 1 if step is None or cached[5] is None
                                   else 0 <= step - cached[5] < o.refresh):  # reuse the last plan
            cached[4] += 1
            qp, kp, rows, lists = cached[:4]
        else:
            replanned = True
            if len(heads) == h:
                qs, ks = q, k
            else:
                sel_key = ("heads", tuple(heads), str(device))
                if sel_key not in memory:  # a host-to-device copy (a stream sync): once per layer
                    memory[sel_key] = torch.tensor(heads, device=device)
                qs, ks = q.index_select(2, memory[sel_key]), k.index_select(2, memory[sel_key])
            if isinstance(o, Semantic):
                dq, dk = default_clusters(grid, block)
                nq, nk = o.q_clusters or dq, o.k_clusters or dk
                nq, nk = min(nq, grid.video_len), min(nk, grid.video_len)
                mem_key = ("semantic", key, tuple(heads), b, grid)
                plan = semantic_orders(qs, ks, grid, nq, nk, o.iters, memory.get(mem_key),
                                       v=v if len(heads) == h else None)
                memory[mem_key] = plan.warm
                moved = plan.moved
                rows, lists = semantic_block_mask(plan, grid, o.top_p, block, block, scale, lists=True)
                qp, kp = plan.q_perm, plan.k_perm
            else:  # segment
                moved = None
                size = o.size or 8 * block
                kp, rows = segment_plan(qs, ks, grid, size, o.top_p, block, block, scale)
                qp, lists = None, None
            memory[plan_key] = [qp, kp, rows, lists, 0, step]  # calls since, the step it was made at
        if len(heads) == h:  # one dynamic order covers every head: no per-head assembly
            return _cached_call(memory, ("call", frame, b, grid), replanned,
                                lambda: CallPlan(qp, kp, rows, lists, moved if replanned else None))
        for j, hi in enumerate(heads):
            dyn_rows[hi] = rows[:, j]
            k_dyn[hi] = kp[:, j]
            if qp is not None:
                q_dyn[hi] = qp[:, j]

    def index(rows: list, dyn: dict) -> torch.Tensor | None:
        if not dyn and all(r is None for r in rows):
            return None
        if not dyn and all(r is not None and (r is rows[0] or torch.equal(r, rows[0])) for r in rows):
            return rows[0]  # one static order for every head: a plain gather along S
        out = torch.empty(b if dyn else 1, h, s, dtype=torch.long, device=device)
        for hi, r in enumerate(rows):
            out[:, hi] = dyn[hi] if hi in dyn else (ident if r is None else r)
        return out

    def mixed_mask() -> torch.Tensor | None:
        if not dyn_rows and static_mask is None:
            return None
        mb, nb = cdiv(s, block), cdiv(s, block)
        base = static_mask if static_mask is not None else torch.ones(1, h, mb, nb, dtype=torch.bool, device=device)
        if dyn_rows:
            base = base.expand(b, h, mb, nb).clone()
            for hi, r in dyn_rows.items():
                base[:, hi] = r
        return base

    def assemble() -> CallPlan:
        return CallPlan(index(q_rows, q_dyn), index(k_rows, k_dyn), mixed_mask())

    if not groups:
        return assemble()
    return _cached_call(memory, ("call", frame, b, grid), replanned, assemble)


def _cached_call(memory: dict, key: tuple, replanned: bool, build) -> CallPlan:
    """The layer's last :class:`CallPlan` when none of its dynamic plans was recomputed this call (its
    block mask and inverse index are then reused too), else a new one."""
    hit = memory.get(key)
    if replanned or hit is None:
        hit = memory[key] = build()
    return hit


def attend_planned(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: CallPlan, block: int, attend,
                   scale: float | None = None) -> torch.Tensor:
    """Run one call under ``plan``: K, V gathered by ``k_index``, then ``attend(q, k, v, kv_num_blocks,
    kv_indices, block, scale, q_index)`` (None, None = dense), which reads Q and writes the output
    through ``q_index`` (:func:`vdit_accel.attention`'s ``q_index``). The output is in the order q arrived in."""
    k, v = plan.gather_kv(k, v)
    bm = plan.block_mask(q.shape[1], block)
    num, idx = (None, None) if bm is None else (bm.kv_num_blocks, bm.kv_indices)
    return attend(q, k, v, num, idx, block, scale, plan.kernel_q_index(q.shape[2]))

