"""A plain-PyTorch twin of the Gluon Hopper kernel (:mod:`.attention_hopper`): the same partitions, the
same mbarrier protocol, the same tiles and the same arithmetic, run on the CPU.

Gluon's Hopper operations (TMA, mbarriers, wgmma, warp specialization) do not run under Triton's
interpreter, so the kernel's logic is checked here instead: the producer and the two consumer
warpgroups of each CTA are Python generators that yield at every ``mbarrier.wait``; a scheduler runs
one runnable partition at a time, chosen at random (a seed), and completes TMA copies at random later
steps. mbarriers keep their hardware meaning (arrival count, pending transaction bytes, phase
parity: a fresh barrier counts its phase "-1" as complete; ``expect`` is an arrival with bytes).
An asynchronous wgmma is computed when issued and checked at its wait: the shared-memory stage it
read must not have been refilled in between (a released-too-early stage raises). A partition left
waiting with nothing runnable is a deadlock and raises. So the twin tests the ring's stage and phase
arithmetic, the two-arrival release, the ping-pong turns, the visit lists, the tail mask, the online
softmax with P rounded to the input dtype before P V, empty lists, ``q_index`` and the LSE -- on
fresh random interleavings.

Arithmetic as the kernel: scores and P V accumulate in float32 from the input dtype's values, P is
rounded to the input dtype for P V, exp2 with the scale folded in. Slow (Python loops over tiles):
for tests at small sizes; tile sizes are parameters so small inputs visit many blocks.
"""

from __future__ import annotations

import math
import random

import torch


class _Barrier:
    """An mbarrier: ``count`` arrivals and zero pending bytes complete the current phase."""

    def __init__(self, count: int):
        self.count, self.arrived, self.tx, self.phase = count, 0, 0, 0

    def done(self, parity: int) -> bool:
        """try_wait.parity: the phase of this parity has completed (the current one has the other parity)."""
        return (self.phase & 1) != parity

    def arrive(self):
        self.arrived += 1
        if self.arrived > self.count:
            raise AssertionError("more arrivals than the barrier's count in one phase")
        self._maybe_complete()

    def expect(self, nbytes: int):  # mbarrier.arrive.expect_tx
        self.tx += nbytes
        self.arrive()

    def complete_tx(self, nbytes: int):
        self.tx -= nbytes
        self._maybe_complete()

    def _maybe_complete(self):
        if self.arrived == self.count and self.tx == 0:
            self.phase += 1
            self.arrived = 0


class _Buffer:
    """A shared-memory stage: its tile and a version counter bumped by every fill."""

    def __init__(self):
        self.tile, self.version = None, 0


def _box(x: torch.Tensor, b: int, start: int, h: int, rows: int) -> torch.Tensor:
    """A TMA box (1, rows, 1, D) of a (B, S, H, D) tensor: rows past S read as zeros."""
    s = x.shape[1]
    tile = torch.zeros(rows, x.shape[3], dtype=x.dtype)
    n = max(0, min(rows, s - start))
    if n:
        tile[:n] = x[b, start : start + n, h]
    return tile


def _visit_list(kv_num, kv_idx, b, h, pid_m, s, cta_m, block_n, mask_m, mask_n, sparse):
    """(start positions of the kernel key blocks visited, first key of the last one)."""
    if not sparse:
        n_total = -(-s // block_n)
        return [t * block_n for t in range(n_total)]
    sub = mask_n // block_n
    row = (pid_m * cta_m) // mask_m
    bm = 0 if kv_num.shape[0] == 1 else b
    num = int(kv_num[bm, h, row])
    starts = []
    for j in range(num):
        blk = int(kv_idx[bm, h, row, j])
        for u in range(sub):
            st = blk * mask_n + u * block_n
            if st < s:
                starts.append(st)
    return starts


def hopper_twin(q, k, v, kv_num_blocks=None, kv_indices=None, mask_block_m=128, mask_block_n=128, scale=None,
                return_lse=False, q_index=None, block_m=64, block_n=128, num_stages=2, seed=0):
    """What :func:`.attention_hopper._attn_fwd_hopper` computes, by the twin described above.

    Args as :func:`.attention_fwd.attention_fwd` (q, k, v (B, S, H, D) on the CPU), plus the kernel's
    tiles: ``block_m`` rows per consumer warpgroup (a CTA has two), ``block_n`` keys per stage,
    ``num_stages`` the K / V ring depth; ``seed`` picks the interleaving. Returns out (and lse).
    """
    bsz, s, h, d = q.shape
    cta_m = 2 * block_m
    sparse = kv_num_blocks is not None
    if sparse and (mask_block_m % cta_m or mask_block_n % block_n):
        raise ValueError("the kernel needs 2 * block_m | mask_block_m and block_n | mask_block_n")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qk_scale = scale * 1.4426950408889634
    rng = random.Random(seed)
    out = torch.zeros(bsz, s, h, d, dtype=q.dtype)
    lse = torch.full((bsz, h, s), float("-inf"), dtype=torch.float32)
    qi = None if q_index is None else q_index.long().expand(bsz, h, s)
    for bh in range(bsz * h):
        b, hh = divmod(bh, h)
        for pid_m in range(-(-s // cta_m)):
            starts = _visit_list(kv_num_blocks, kv_indices, b, hh, pid_m, s, cta_m, block_n, mask_block_m,
                                 mask_block_n, sparse)
            _run_cta(q, k, v, out, lse, qi, b, hh, pid_m, s, starts, block_m, block_n, num_stages, qk_scale, rng)
    return (out, lse) if return_lse else out


def _run_cta(q, k, v, out, lse, qi, b, h, pid_m, s, starts, block_m, block_n, num_stages, qk_scale, rng):
    d = q.shape[3]
    nbytes = lambda rows: rows * d * q.element_size()  # noqa: E731
    q_ready = [_Barrier(1) for _ in range(2)]
    turn = [_Barrier(1) for _ in range(2)]
    k_ready, v_ready = [_Barrier(1) for _ in range(num_stages)], [_Barrier(1) for _ in range(num_stages)]
    k_empty, v_empty = [_Barrier(2) for _ in range(num_stages)], [_Barrier(2) for _ in range(num_stages)]
    q_smem = [_Buffer() for _ in range(2)]
    k_bufs, v_bufs = [_Buffer() for _ in range(num_stages)], [_Buffer() for _ in range(num_stages)]
    pending = []  # TMA copies in flight: (buffer, tile, barrier, bytes)

    def tma(buf, tile, bar, n):  # the stage is being overwritten from the issue on
        buf.tile, buf.version = None, buf.version + 1
        pending.append((buf, tile, bar, n))

    def producer():
        if qi is None:
            for c in range(2):
                q_ready[c].expect(nbytes(block_m))
                tma(q_smem[c], _box(q, b, (pid_m * 2 + c) * block_m, h, block_m), q_ready[c], nbytes(block_m))
        for t, start in enumerate(starts):
            stage, phase = t % num_stages, (t // num_stages) & 1
            yield k_empty[stage], phase ^ 1
            k_ready[stage].expect(nbytes(block_n))
            tma(k_bufs[stage], _box(k, b, start, h, block_n), k_ready[stage], nbytes(block_n))
            yield v_empty[stage], phase ^ 1
            v_ready[stage].expect(nbytes(block_n))
            tma(v_bufs[stage], _box(v, b, start, h, block_n), v_ready[stage], nbytes(block_n))

    def consumer(c):
        start_m = (pid_m * 2 + c) * block_m
        rows = torch.arange(start_m, start_m + block_m)
        ok = rows < s
        if qi is not None:  # gathered by pointer loads: rows past S are zeros
            q_tile = torch.zeros(block_m, d, dtype=q.dtype)
            q_tile[ok] = q[b, qi[b, h, rows[ok]], h]
        else:
            yield q_ready[c], 0
            q_tile = q_smem[c].tile
        qf = q_tile.float()
        n_total = len(starts)
        limit = s - starts[-1] if n_total else 0
        m_i = torch.full((block_m,), float("-inf"))
        l_i = torch.zeros(block_m)
        acc = torch.zeros(block_m, d)

        def scores(stage):
            buf = k_bufs[stage]
            return qf @ buf.tile.float().T, (buf, buf.version)

        def check(read):
            buf, version = read
            if buf.version != version:
                raise AssertionError("a stage was refilled while a wgmma still read it")

        def softmax(qk, masked):
            nonlocal m_i, l_i
            if masked:
                qk = torch.where(torch.arange(block_n)[None, :] < limit, qk, float("-inf"))
            m_new = torch.maximum(m_i, qk.amax(1) * qk_scale)
            p = torch.exp2(qk * qk_scale - m_new[:, None])
            alpha = torch.exp2(m_i - m_new)
            l_i = l_i * alpha + p.sum(1)
            m_i = m_new
            return p.to(q.dtype).float(), alpha

        if n_total > 0:
            yield k_ready[0], 0
            yield turn[c], (1 - c) & 1
            qk, read_k = scores(0)
            turn[1 - c].arrive()
            check(read_k)
            k_empty[0].arrive()
            p, _ = softmax(qk, n_total == 1)
            for t in range(1, n_total):
                stage, prev = t % num_stages, (t - 1) % num_stages
                yield k_ready[stage], (t // num_stages) & 1
                yield turn[c], (t + 1 - c) & 1
                qk, read_k = scores(stage)
                yield v_ready[prev], ((t - 1) // num_stages) & 1
                pv, read_v = p @ v_bufs[prev].tile.float(), (v_bufs[prev], v_bufs[prev].version)
                turn[1 - c].arrive()
                check(read_k)
                k_empty[stage].arrive()
                p_next, alpha = softmax(qk, t == n_total - 1)
                check(read_v)
                acc = acc + pv
                v_empty[prev].arrive()
                acc = acc * alpha[:, None]
                p = p_next
            last = (n_total - 1) % num_stages
            yield v_ready[last], ((n_total - 1) // num_stages) & 1
            acc = acc + p @ v_bufs[last].tile.float()
            v_empty[last].arrive()
        empty = l_i == 0
        o = acc / torch.where(empty, 1.0, l_i)[:, None]
        ls = torch.where(empty, float("-inf"), (m_i + torch.log2(torch.where(empty, 1.0, l_i))) * math.log(2.0))
        tok = rows[ok] if qi is None else qi[b, h, rows[ok]]
        out[b, tok, h] = o[ok].to(q.dtype)
        lse[b, h, tok] = ls[ok]

    parts = [producer(), consumer(0), consumer(1)]
    waiting = [None] * 3  # the (barrier, parity) each partition waits on
    alive = [True] * 3

    def step(i):
        try:
            waiting[i] = next(parts[i])
        except StopIteration:
            alive[i] = False

    while any(alive) or pending:
        runnable = [i for i in range(3) if alive[i] and (waiting[i] is None or waiting[i][0].done(waiting[i][1]))]
        choices = runnable + (["tma"] if pending else [])
        if not choices:
            raise AssertionError(f"deadlock: partitions {[i for i in range(3) if alive[i]]} wait with nothing in flight")
        pick = rng.choice(choices)
        if pick == "tma":
            buf, tile, bar, n = pending.pop(rng.randrange(len(pending)))
            buf.tile = tile
            bar.complete_tx(n)
        else:
            waiting[pick] = None
            step(pick)
