"""Profiling heads: block mass and candidate errors from real q, k, v, with no S x S matrix.

For one attention call (q, k, v in (B, S, H, D)) and a list of candidate patterns, the profiler
works one query block at a time (a [H, block, S] score slab, never [S, S]):

1. scores, their row max and log-sum-exp, and P = exp(scores - max) (the second pass over the
   keys that the log-sum-exp normalises);
2. the **block mass**: P summed per key block and normalised per row — the attention probability
   each (query block, key block) pair carries; a candidate's **recalled mass** is the share of it
   inside the candidate's block mask;
3. on a sample of query blocks, the per-key-block partial outputs ``PV[h, r, n, :]``, from which every
   candidate's exact sparse output follows by a masked sum (one matmul for all candidates); its
   L2 error against the dense output is accumulated per head.

Errors are each head's relative L2 error, except for ``skip``, whose error is the head's share of
the layer's output (:meth:`LayerStats.error`), so that near-silent heads can be skipped.

Token orders (:mod:`vdit_accel.orders`) make more candidates: with ``orders``, the profiler scores
every pattern in every static order (``raster``, ``tiled``: the same pass on q, k, v permuted into that
order, with the patterns' block masks in it) and every dynamic order as one candidate of its own
(``semantic``, ``segment``: the call's own per-head plan, with its data-chosen block mask). A column is
then a (pattern, order) pair (:meth:`HeadProfiler.columns`); its block density is recorded per head
(dynamic masks differ per head and call). Each order group's errors are relative to its own sampled
rows (they are other tokens in another order), rescaled to the first group's reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from vdit_accel.block_mask import cdiv
from vdit_accel.grid import VideoGrid
from vdit_accel.orders import (OrderSpec, block_mask_for_order, gather_tokens, is_dynamic, parse_order, plan_call,
                               static_order)
from vdit_accel.patterns import DENSE, PatternSpec, build_block_mask_for_pattern


@dataclass
class LayerStats:
    """What one layer's observations add up to; everything sums over observations (and ranks)."""

    err_sq: torch.Tensor  # [H, C] sum of squared output error on sampled rows
    ref_sq: torch.Tensor  # [H] sum of squared dense output on sampled rows
    recall: torch.Tensor  # [H, C] sum over observations of the recalled mass fraction
    count: torch.Tensor  # [] number of observations
    density: torch.Tensor | None = None  # [H, C] sum over observations of each column's block density

    @classmethod
    def zeros(cls, num_heads: int, num_candidates: int) -> "LayerStats":
        z = torch.zeros
        return cls(z(num_heads, num_candidates, dtype=torch.float64), z(num_heads, dtype=torch.float64),
                   z(num_heads, num_candidates, dtype=torch.float64), z((), dtype=torch.float64),
                   z(num_heads, num_candidates, dtype=torch.float64))

    def add(self, other: "LayerStats") -> None:
        for name in ("err_sq", "ref_sq", "recall", "count"):
            getattr(self, name).add_(getattr(other, name))
        if self.density is not None and other.density is not None:
            self.density.add_(other.density)
        else:
            self.density = None

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"err_sq": self.err_sq, "ref_sq": self.ref_sq, "recall": self.recall, "count": self.count}
        if self.density is not None:
            out["density"] = self.density
        return out

    def mean_density(self) -> torch.Tensor | None:
        """[H, C]: each column's block density per head, averaged over the observations (None if not kept)."""
        return None if self.density is None else self.density / self.count.clamp_min(1)

    def error(self, skip_index: int | list[int] | None = None) -> torch.Tensor:
        """[H, C]: each head's relative L2 output error against dense, on the sampled rows.

        For ``skip`` (column ``skip_index``) the head's own relative error is always 1, so it is
        measured against the layer instead: the head's RMS output over the RMS output of the
        layer's heads. A near-silent head can then be skipped, a loud one cannot."""
        err = (self.err_sq / self.ref_sq.clamp_min(1e-30)[:, None]).sqrt()
        if skip_index is not None:  # (one column per order group scores skip)
            share = (self.ref_sq / self.ref_sq.mean().clamp_min(1e-30)).sqrt()
            for i in [skip_index] if isinstance(skip_index, int) else skip_index:
                err[:, i] = share
        return err

    def mean_recall(self) -> torch.Tensor:
        return self.recall / self.count.clamp_min(1)


def pattern_volume(p: PatternSpec, grid: VideoGrid) -> float:
    """Keys one central query reaches under ``p`` (token level): orders patterns by generosity."""
    kind = p.kind
    clip = lambda r, n: min(2 * r + 1, n)  # noqa: E731
    if kind == "window3d":
        return clip(p.t, grid.t) * clip(p.h, grid.h) * clip(p.w, grid.w)
    if kind == "frame_periodic":
        return -(-grid.t // p.every) * clip(p.h, grid.h) * clip(p.w, grid.w)
    if kind == "window1d":
        return min(2 * p.frames * grid.h * grid.w + 1, grid.video_len)
    if kind == "stripes":
        return len(p.frames) * grid.h * grid.w + len(p.tokens)
    if kind == "radial":
        frame, centre = grid.h * grid.w, grid.t // 2
        bands = p.bands(grid)
        keys = sum(min(2 * bands[abs(t - centre)] + 1, frame) for t in range(grid.t) if bands[abs(t - centre)] >= 0)
        return keys + frame * sum(1 for t in range(min(p.sink, grid.t)) if bands[abs(t - centre)] < 0)
    if kind == "sta":
        return math.prod(min(k * side, n) for k, side, n in zip((p.t, p.h, p.w), p.tile, (grid.t, grid.h, grid.w)))
    if kind == "union":
        return sum(pattern_volume(q, grid) for q in p.of)
    return float(grid.video_len) if kind == "dense" else 0.0


class CandidateMasks:
    """The candidates' block masks on one grid: bool [C, Mb, Nb], densities [C], and for each
    candidate its representative: among candidates of the same kind with the very same block mask
    on this grid, the most generous one (same cost here, a superset of keys, and at other
    resolutions the parameters that match what the heads do)."""

    def __init__(self, candidates: list[PatternSpec], grid: VideoGrid, block: int, device,
                 order: OrderSpec | None = None):
        self.grid, self.block = grid, block
        if order is None:
            self.masks = torch.stack([build_block_mask_for_pattern(p, grid, block, block, device) for p in candidates])
        else:  # the patterns' masks in a static token order (exact, O(Mb * S) per pattern)
            perm = static_order(order, grid, block, device)
            self.masks = torch.stack([block_mask_for_order(p, grid, perm, block, block) for p in candidates])
        self.density = self.masks.flatten(1).float().mean(1)
        groups: dict[tuple, int] = {}
        self.representative = list(range(len(candidates)))
        for i, p in enumerate(candidates):
            key = (p.kind, self.masks[i].cpu().numpy().tobytes())
            j = groups.setdefault(key, i)
            if pattern_volume(p, grid) > pattern_volume(candidates[j], grid):
                groups[key] = i
        for i, p in enumerate(candidates):
            self.representative[i] = groups[(p.kind, self.masks[i].cpu().numpy().tobytes())]


@dataclass
class HeadProfiler:
    """Scores candidate patterns on observed attention calls.

    Args:
        candidates: the patterns to score (``candidates.candidate_patterns``).
        block_size: block size of the masks the strategy will run with.
        sample_blocks: query blocks per call on which output errors are measured (spread evenly).
        mass_stride: measure the block mass on every ``mass_stride``-th query block (1 = all; 0 = on the
            sampled blocks only: the errors, which the solver uses, need no more).
        orders: token orders to score (see the module docstring); default raster only, where the
            columns are exactly ``candidates``.
    """

    candidates: list[PatternSpec]
    block_size: int = 128
    sample_blocks: int = 8
    mass_stride: int = 1
    stats: dict[tuple[int, int], LayerStats] = field(default_factory=dict)  # (layer, step) -> stats
    orders: list = field(default_factory=lambda: [None])
    _masks: dict = field(default_factory=dict)

    def __post_init__(self):
        self.orders = [parse_order(o) for o in self.orders]
        if not self.orders:
            raise ValueError("HeadProfiler needs at least one order (None: raster)")

    @property
    def static_orders(self) -> list[OrderSpec | None]:
        return [o for o in self.orders if not is_dynamic(o)]

    @property
    def dynamic_orders(self) -> list[OrderSpec]:
        return [o for o in self.orders if is_dynamic(o)]

    def columns(self) -> list[tuple[PatternSpec, OrderSpec | None]]:
        """What each column of the stats is: every candidate pattern in each static order (in the order
        of ``orders``), then each dynamic order (its pattern ``dense``)."""
        cols = [(p, o) for o in self.static_orders for p in self.candidates]
        return cols + [(DENSE, o) for o in self.dynamic_orders]

    def masks_for(self, grid: VideoGrid, device, order: OrderSpec | None = None) -> CandidateMasks:
        """The candidates' block masks in a static ``order`` (default raster)."""
        key = (grid, str(device), order)
        if key not in self._masks:
            self._masks[key] = CandidateMasks(self.candidates, grid, self.block_size, device, order)
        return self._masks[key]

    def column_info(self, grid: VideoGrid, device="cpu") -> tuple[list[int], torch.Tensor]:
        """Per column: its representative column (:class:`CandidateMasks`, within its order) and its block
        density on ``grid`` (NaN for dynamic orders: measured per head and call, in the stats)."""
        rep, dens = [], []
        for gi, o in enumerate(self.static_orders):
            cm = self.masks_for(grid, device, o)
            base = gi * len(self.candidates)
            rep += [base + r for r in cm.representative]
            dens.append(cm.density)
        n = len(rep)
        rep += list(range(n, n + len(self.dynamic_orders)))
        dens.append(torch.full((len(self.dynamic_orders),), float("nan")))
        return rep, torch.cat([d.cpu().float() for d in dens])

    @torch.no_grad()
    def observe(self, layer: int, step: int, grid: VideoGrid, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                scale: float | None = None) -> None:
        b, s, h, d = q.shape
        if grid.seq_len != s:
            raise ValueError(f"grid {grid} has {grid.seq_len} tokens but the call has {s}")
        n_cols = len(self.columns())
        stats = self.stats.get((layer, step))
        if stats is None:
            stats = self.stats[(layer, step)] = LayerStats.zeros(h, n_cols)
        scale = 1.0 / math.sqrt(d) if scale is None else scale
        bs = self.block_size
        mb = cdiv(s, bs)
        sampled = set(torch.linspace(0, mb - 1, min(self.sample_blocks, mb)).round().long().tolist())
        mass_rows = [m for m in range(mb) if (self.mass_stride and m % self.mass_stride == 0) or m in sampled]
        rows_measured = sum(min(s, (m + 1) * bs) - m * bs for m in mass_rows)
        nc = len(self.candidates)
        for bi in range(b):
            ref0 = None
            col = 0
            groups = [(o, None) for o in self.static_orders] + [(None, o) for o in self.dynamic_orders]
            for static, dynamic in groups:
                qb, kb, vb = q[bi : bi + 1], k[bi : bi + 1], v[bi : bi + 1]
                if dynamic is None:
                    cm = self.masks_for(grid, q.device, static)
                    masks = cm.masks.float()[None]  # [1, C, Mb, Nb]: the same for every head
                    dens = cm.density.double().cpu()[None].expand(h, -1)
                    perm = static_order(static, grid, bs, q.device) if static is not None else None
                    if perm is not None:
                        qb, kb, vb = (gather_tokens(x, perm) for x in (qb, kb, vb))
                    width = nc
                else:
                    plan = plan_call(qb, kb, grid, [dynamic] * h, None, bs, None, {}, scale)
                    if plan.q_index is not None:
                        qb = gather_tokens(qb, plan.q_index)
                    kb, vb = gather_tokens(kb, plan.k_index), gather_tokens(vb, plan.k_index)
                    masks = plan.mask[0].float()[:, None]  # [H, 1, Mb, Nb]: each head its own
                    dens = masks.flatten(1).mean(1).double().cpu()[:, None]
                    width = 1
                err, ref, rec = self._accumulate(qb[0], kb[0], vb[0], masks, scale, sampled, mass_rows)
                if ref0 is None:
                    ref0 = ref
                # Relative errors of this group on its own sampled rows, on the first group's reference.
                err = err * (ref0 / ref.clamp_min(1e-30))[:, None]
                stats.err_sq[:, col : col + width] += err
                stats.recall[:, col : col + width] += rec / rows_measured
                stats.density[:, col : col + width] += dens
                col += width
            stats.ref_sq += ref0
            stats.count += 1

    def _accumulate(self, q, k, v, masks, scale, sampled, mass_rows):
        """One sample's pass over its query blocks. q, k, v [S, H, D] (one order); masks float
        [1 or H, C, Mb, Nb]. Returns (err_sq [H, C], ref_sq [H], recalled mass summed over rows [H, C])."""
        s, h, d = q.shape
        bs = self.block_size
        nb = cdiv(s, bs)
        c = masks.shape[1]
        masks = masks.expand(h, *masks.shape[1:])
        kb = k.to(torch.float32).transpose(0, 1)  # [H, S, D]
        vb = v.to(torch.float32).transpose(0, 1)
        pad = nb * bs - s
        if pad:
            vb = torch.cat([vb, vb.new_zeros(h, pad, d)], 1)
        err_sq = torch.zeros(h, c, dtype=torch.float64)
        ref_sq = torch.zeros(h, dtype=torch.float64)
        recall_num = torch.zeros(h, c, dtype=torch.float64, device=q.device)
        for m in mass_rows:
            r0, r1 = m * bs, min(s, (m + 1) * bs)
            qb = q[r0:r1].to(torch.float32).transpose(0, 1)  # [H, R, D]
            scores = torch.matmul(qb, kb.transpose(1, 2)) * scale  # [H, R, S]
            p = torch.exp(scores - scores.amax(-1, keepdim=True))
            if pad:
                p = torch.cat([p, p.new_zeros(h, r1 - r0, pad)], -1)
            l = p.sum(-1)  # [H, R]
            pb = p.view(h, r1 - r0, nb, bs).sum(-1)  # [H, R, Nb]
            mass = (pb / l[..., None]).sum(1)  # [H, Nb]
            cmask = masks[:, :, m]  # [H, C, Nb]
            recall_num += torch.einsum("hn,hcn->hc", mass, cmask).double()
            if m in sampled:
                pv = torch.einsum("hrnk,hnkd->hrnd", p.view(h, r1 - r0, nb, bs), vb.view(h, nb, bs, d))
                dense = pv.sum(2) / l[..., None]  # [H, R, D]
                num = torch.einsum("hrnd,hcn->chrd", pv, cmask)
                den = torch.einsum("hrn,hcn->chr", pb, cmask)
                out = torch.where(den[..., None] > 0, num / den.clamp_min(1e-30)[..., None], 0.0)
                err_sq += ((out - dense) ** 2).sum((2, 3)).T.double().cpu()
                ref_sq += (dense**2).sum((1, 2)).double().cpu()
        return err_sq, ref_sq, recall_num.cpu()

    def merged(self) -> dict[int, LayerStats]:
        """Stats per layer, summed over the profiled steps."""
        out: dict[int, LayerStats] = {}
        for (layer, _), st in sorted(self.stats.items()):
            if layer not in out:
                out[layer] = LayerStats.zeros(*st.err_sq.shape)
            out[layer].add(st)
        return out
