"""What a dynamic order costs per attention call beyond the attention itself (the search charges it).

The unit is the dense attention of the same heads (the unit of block density), so the cost adds to a
candidate's density. Per kind, two parts: ``moves`` (every call: K and V gathered into the key order)
and ``plan`` (every ``refresh``-th step: the k-means or segment plan and its block mask). Both are
O(S) passes where the attention is O(S^2), so they scale as ``1 / S`` from the shape they were timed at.

Where they come from:

- on a CUDA device, :func:`measure_order_overhead` times them on that GPU at a reference shape (the
  wan 480p self-attention: 21 x 30 x 52 tokens, 12 heads of 128, bf16) the first time they are asked
  for, and caches the result per GPU (:mod:`vdit_accel.kernels.measurements`; a few seconds, once);
- elsewhere (a CPU search, whose kernel costs are FLOP-proportional estimates as well) the
  :data:`REFERENCE` ratios: a Hopper measurement at that shape (``benchmarks/results/permutation-overhead-*``,
  ``benchmarks/RESULTS.md``), the same numbers a measurement on such a GPU gives.
"""

from __future__ import annotations

import torch

from ..grid import VideoGrid
from ..kernels import measurements
from .spec import OrderSpec, Segment, Semantic, parse_order

REFERENCE_GRID = VideoGrid(21, 30, 52)
REFERENCE = {"tokens": REFERENCE_GRID.seq_len, "semantic": (0.10 / 11.3, 0.17 / 11.3),
             "segment": (0.10 / 11.3, 2.77 / 11.3), "source": "reference (Hopper, wan 480p)"}
_MEASURED: dict[str, dict] = {}


def order_overhead(o: OrderSpec | None, seq_len: int, device=None) -> float:
    """The per-call cost of order ``o`` beyond its attention, as a fraction of dense attention: 0 for
    static orders, ``(moves + plan / refresh) * tokens / seq_len`` for dynamic ones, from ``device``'s
    measurement (CUDA) or the reference (otherwise; see the module docstring)."""
    o = parse_order(o)
    if o is None or not o.dynamic:
        return 0.0
    table = overhead_table(device)
    moves, plan = table[o.kind]
    return (moves + plan / o.refresh) * table["tokens"] / max(seq_len, 1)


def overhead_table(device=None) -> dict:
    """The ``(moves, plan)`` ratios per dynamic kind and the token count they were timed at: measured on
    a CUDA ``device`` (cached per GPU), else :data:`REFERENCE`."""
    if device is None or torch.device(device).type != "cuda":
        return REFERENCE
    name = measurements.device_name(device)
    if name not in _MEASURED:
        path = measurements.cache_path("order-overhead", name)
        doc = measurements.load(path)
        if doc is None or not all(k in doc for k in ("tokens", "semantic", "segment")):
            doc = measure_order_overhead(device)
            measurements.store(path, doc)
        _MEASURED[name] = doc
    return _MEASURED[name]


def measure_order_overhead(device, heads: int = 12, head_dim: int = 128, reps: int = 20) -> dict:
    """Time, on ``device``, the dense attention, the K/V move and each dynamic order's plan at the
    reference shape; return them as ratios to the dense attention (the :data:`REFERENCE` layout)."""
    from triton.testing import do_bench

    from ..attention import attention
    from .gather import gather_tokens_many
    from .plan import plan_call

    grid, block = REFERENCE_GRID, 128
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, grid.seq_len, heads, head_dim, device=device, dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    dense = do_bench(lambda: attention(q, k, v), warmup=5, rep=reps, return_mode="median")
    out = {"tokens": grid.seq_len, "dense_ms": dense, "source": f"measured on {measurements.device_name(device)}"}
    for order in (Semantic(), Segment()):
        memory: dict = {}
        plan = lambda: plan_call(q, k, grid, [order] * heads, None, block, None, memory)  # noqa: E731 (refresh 1: a new plan per call)
        plan_ms = do_bench(plan, warmup=3, rep=reps, return_mode="median")
        index = plan().k_index
        moves_ms = do_bench(lambda: gather_tokens_many([k, v], index), warmup=3, rep=reps, return_mode="median")
        out[order.kind] = (moves_ms / dense, plan_ms / dense)
    return out
