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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from vdit_accel.block_mask import cdiv
from vdit_accel.grid import VideoGrid
from vdit_accel.patterns import Pattern, build_block_mask_for_pattern


@dataclass
class LayerStats:
    """What one layer's observations add up to; everything sums over observations (and ranks)."""

    err_sq: torch.Tensor  # [H, C] sum of squared output error on sampled rows
    ref_sq: torch.Tensor  # [H] sum of squared dense output on sampled rows
    recall: torch.Tensor  # [H, C] sum over observations of the recalled mass fraction
    count: torch.Tensor  # [] number of observations

    @classmethod
    def zeros(cls, num_heads: int, num_candidates: int) -> "LayerStats":
        z = torch.zeros
        return cls(z(num_heads, num_candidates, dtype=torch.float64), z(num_heads, dtype=torch.float64),
                   z(num_heads, num_candidates, dtype=torch.float64), z((), dtype=torch.float64))

    def add(self, other: "LayerStats") -> None:
        for name in ("err_sq", "ref_sq", "recall", "count"):
            getattr(self, name).add_(getattr(other, name))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"err_sq": self.err_sq, "ref_sq": self.ref_sq, "recall": self.recall, "count": self.count}

    def error(self, skip_index: int | None = None) -> torch.Tensor:
        """[H, C]: each head's relative L2 output error against dense, on the sampled rows.

        For ``skip`` (column ``skip_index``) the head's own relative error is always 1, so it is
        measured against the layer instead: the head's RMS output over the RMS output of the
        layer's heads. A near-silent head can then be skipped, a loud one cannot."""
        err = (self.err_sq / self.ref_sq.clamp_min(1e-30)[:, None]).sqrt()
        if skip_index is not None:
            err[:, skip_index] = (self.ref_sq / self.ref_sq.mean().clamp_min(1e-30)).sqrt()
        return err

    def mean_recall(self) -> torch.Tensor:
        return self.recall / self.count.clamp_min(1)


def pattern_volume(p: Pattern, grid: VideoGrid) -> float:
    """Keys one central query reaches under ``p`` (token level): orders patterns by generosity."""
    kind = p["kind"]
    clip = lambda r, n: min(2 * r + 1, n)  # noqa: E731
    if kind == "window3d":
        return clip(p["t"], grid.t) * clip(p["h"], grid.h) * clip(p["w"], grid.w)
    if kind == "frame_periodic":
        return -(-grid.t // p["every"]) * clip(p["h"], grid.h) * clip(p["w"], grid.w)
    if kind == "window1d":
        return min(2 * p["frames"] * grid.h * grid.w + 1, grid.video_len)
    if kind == "stripes":
        return len(p["frames"]) * grid.h * grid.w + len(p["tokens"])
    if kind == "union":
        return sum(pattern_volume(q, grid) for q in p["of"])
    return float(grid.video_len) if kind == "dense" else 0.0


class CandidateMasks:
    """The candidates' block masks on one grid: bool [C, Mb, Nb], densities [C], and for each
    candidate its representative: among candidates of the same kind with the very same block mask
    on this grid, the most generous one (same cost here, a superset of keys, and at other
    resolutions the parameters that match what the heads do)."""

    def __init__(self, candidates: list[Pattern], grid: VideoGrid, block: int, device):
        self.grid, self.block = grid, block
        self.masks = torch.stack([build_block_mask_for_pattern(p, grid, block, block, device) for p in candidates])
        self.density = self.masks.flatten(1).float().mean(1)
        groups: dict[tuple, int] = {}
        self.representative = list(range(len(candidates)))
        for i, p in enumerate(candidates):
            key = (p["kind"], self.masks[i].cpu().numpy().tobytes())
            j = groups.setdefault(key, i)
            if pattern_volume(p, grid) > pattern_volume(candidates[j], grid):
                groups[key] = i
        for i, p in enumerate(candidates):
            self.representative[i] = groups[(p["kind"], self.masks[i].cpu().numpy().tobytes())]


@dataclass
class HeadProfiler:
    """Scores candidate patterns on observed attention calls.

    Args:
        candidates: the patterns to score (``candidates.candidate_patterns``).
        block_size: block size of the masks the strategy will run with.
        sample_blocks: query blocks per call on which output errors are measured (spread evenly).
        mass_stride: measure the block mass on every ``mass_stride``-th query block (1 = all).
    """

    candidates: list[Pattern]
    block_size: int = 128
    sample_blocks: int = 8
    mass_stride: int = 1
    stats: dict[tuple[int, int], LayerStats] = field(default_factory=dict)  # (layer, step) -> stats
    _masks: dict = field(default_factory=dict)

    def masks_for(self, grid: VideoGrid, device) -> CandidateMasks:
        key = (grid, str(device))
        if key not in self._masks:
            self._masks[key] = CandidateMasks(self.candidates, grid, self.block_size, device)
        return self._masks[key]

    @torch.no_grad()
    def observe(self, layer: int, step: int, grid: VideoGrid, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                scale: float | None = None) -> None:
        b, s, h, d = q.shape
        if grid.seq_len != s:
            raise ValueError(f"grid {grid} has {grid.seq_len} tokens but the call has {s}")
        cm = self.masks_for(grid, q.device)
        stats = self.stats.get((layer, step))
        if stats is None:
            stats = self.stats[(layer, step)] = LayerStats.zeros(h, len(self.candidates))
        scale = 1.0 / math.sqrt(d) if scale is None else scale
        bs = self.block_size
        mb, nb = cdiv(s, bs), cdiv(s, bs)
        sampled = set(torch.linspace(0, mb - 1, min(self.sample_blocks, mb)).round().long().tolist())
        mass_rows = [m for m in range(mb) if m % self.mass_stride == 0 or m in sampled]
        cmask_f = cm.masks.to(torch.float32)  # [C, Mb, Nb]
        for bi in range(b):
            kb = k[bi].to(torch.float32).transpose(0, 1)  # [H, S, D]
            vb = v[bi].to(torch.float32).transpose(0, 1)
            pad = nb * bs - s
            if pad:
                vb = torch.cat([vb, vb.new_zeros(h, pad, d)], 1)
            mass = torch.zeros(h, len(mass_rows), nb, device=q.device)
            recall_num = torch.zeros(h, len(self.candidates), dtype=torch.float64, device=q.device)
            for j, m in enumerate(mass_rows):
                r0, r1 = m * bs, min(s, (m + 1) * bs)
                qb = q[bi, r0:r1].to(torch.float32).transpose(0, 1)  # [H, R, D]
                scores = torch.matmul(qb, kb.transpose(1, 2)) * scale  # [H, R, S]
                p = torch.exp(scores - scores.amax(-1, keepdim=True))
                if pad:
                    p = torch.cat([p, p.new_zeros(h, r1 - r0, pad)], -1)
                l = p.sum(-1)  # [H, R]
                pb = p.view(h, r1 - r0, nb, bs).sum(-1)  # [H, R, Nb]
                mass[:, j] = (pb / l[..., None]).sum(1)
                recall_num += torch.einsum("hn,cn->hc", mass[:, j], cmask_f[:, m]).double()
                if m in sampled:
                    pv = torch.einsum("hrnk,hnkd->hrnd", p.view(h, r1 - r0, nb, bs), vb.view(h, nb, bs, d))
                    dense = pv.sum(2) / l[..., None]  # [H, R, D]
                    num = torch.einsum("hrnd,cn->chrd", pv, cmask_f[:, m])
                    den = torch.einsum("hrn,cn->chr", pb, cmask_f[:, m])
                    out = torch.where(den[..., None] > 0, num / den.clamp_min(1e-30)[..., None], 0.0)
                    stats.err_sq += ((out - dense) ** 2).sum((2, 3)).T.double().cpu()
                    stats.ref_sq += (dense**2).sum((1, 2)).double().cpu()
            rows_measured = sum(min(s, (m + 1) * bs) - m * bs for m in mass_rows)
            stats.recall += (recall_num / rows_measured).cpu()
            stats.count += 1

    def merged(self) -> dict[int, LayerStats]:
        """Stats per layer, summed over the profiled steps."""
        out: dict[int, LayerStats] = {}
        for (layer, _), st in sorted(self.stats.items()):
            if layer not in out:
                out[layer] = LayerStats.zeros(*st.err_sq.shape)
            out[layer].add(st)
        return out
