"""Measuring an order: how many key blocks a head needs, per query block, for a recalled attention mass."""

from __future__ import annotations

import math

import torch

from ..block_mask import cdiv



def block_mass(q: torch.Tensor, k: torch.Tensor, block: int, q_perm: torch.Tensor | None = None,
               k_perm: torch.Tensor | None = None, rows: list[int] | None = None, scale: float | None = None) -> torch.Tensor:
    """Float ``[M, Nb]``: the attention mass of one head's query blocks (``q_perm`` order; ``rows``
    picks M of them, default all) in each key block (``k_perm`` order), normalised per query block.

    ``q``, ``k``: ``[S, D]`` in the original order. Computed a few query blocks at a time from the
    scores (never ``S x S``), in float32; ``scale`` default ``1 / sqrt(D)``."""
    s, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    nb = cdiv(s, block)
    qo = q if q_perm is None else q[q_perm]
    ko = (k if k_perm is None else k[k_perm]).float()
    rows = list(range(nb)) if rows is None else list(rows)
    pad = nb * block - s
    out = torch.empty(len(rows), nb, device=q.device)
    chunk = max(1, (1 << 24) // (block * s))
    for i in range(0, len(rows), chunk):
        sel = rows[i : i + chunk]
        qb = torch.stack([torch.nn.functional.pad(qo[m * block : (m + 1) * block], (0, 0, 0, max(0, (m + 1) * block - s)))
                          for m in sel]).float()  # [c, block, D] (padded rows are dropped below)
        p = torch.softmax(scale * qb @ ko.T, -1)
        valid = torch.tensor([min(block, s - m * block) for m in sel], device=q.device)
        p = p * (torch.arange(block, device=q.device)[None, :] < valid[:, None])[..., None]
        if pad:
            p = torch.nn.functional.pad(p, (0, pad))
        out[i : i + len(sel)] = p.view(len(sel), block, nb, block).sum((1, 3)) / valid[:, None]
    return out


def blocks_needed(mass: torch.Tensor, recall: float = 0.95) -> torch.Tensor:
    """Per row of ``mass`` ``[..., Nb]``: how many of its largest blocks first hold ``recall`` of the row."""
    sorted_mass = mass.sort(-1, descending=True).values
    need = (sorted_mass.cumsum(-1) < recall * mass.sum(-1, keepdim=True)).sum(-1) + 1
    return need.clamp(max=mass.shape[-1])


def block_density(q: torch.Tensor, k: torch.Tensor, block: int, recall: float = 0.95, q_perm: torch.Tensor | None = None,
                  k_perm: torch.Tensor | None = None, rows: list[int] | None = None) -> float:
    """Mean fraction of key blocks one head needs, per query block, to keep ``recall`` of its attention
    mass, with queries in ``q_perm`` order and keys in ``k_perm`` order (:func:`block_mass`)."""
    mass = block_mass(q, k, block, q_perm, k_perm, rows)
    return float(blocks_needed(mass, recall).float().mean() / mass.shape[-1])


def blocks_for_recall(probs: torch.Tensor, perm: torch.Tensor, block: int, recall: float = 0.95,
                      key_perm: torch.Tensor | None = None) -> float:
    """:func:`block_density` from explicit probabilities ``[S, S]`` (rows sum to 1; small S only).

    ``key_perm``: a separate order for the keys (default ``perm``)."""
    s = probs.shape[0]
    nb = cdiv(s, block)
    p = probs[perm][:, perm if key_perm is None else key_perm]
    pad = nb * block - s
    if pad:
        p = torch.nn.functional.pad(p, (0, pad, 0, pad))
    mass = p.view(nb, block, nb, block).sum((1, 3))  # [Mb, Nb]
    return float(blocks_needed(mass, recall).float().mean() / nb)

