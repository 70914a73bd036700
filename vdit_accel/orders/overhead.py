"""What a dynamic order costs per attention call beyond the attention itself (the search charges it)."""

from __future__ import annotations

from .spec import OrderSpec, parse_order

# In units of the dense attention of the same heads, measured at the wan 480p shape (32760 tokens, 12
# heads of 128; H100, benchmarks/results/permutation-overhead-nvidia-h100-80gb-hbm3-20261122.json):
# (a call on a kept plan -- moving K and V, reading Q through the order --, the plan). Both grow with S
# where the attention grows with S^2: order_overhead scales them by 32760 / S.
_OVERHEAD_REF_TOKENS = 32760
_ORDER_OVERHEAD = {"semantic": (0.10 / 11.3, 0.17 / 11.3), "segment": (0.10 / 11.3, 2.77 / 11.3)}


def order_overhead(o: OrderSpec | None, seq_len: int) -> float:
    """The per-call cost of order ``o`` beyond its attention, as a fraction of dense attention (the unit
    of block density): 0 for static orders, the moves plus the plan over its ``refresh`` for dynamic ones."""
    o = parse_order(o)
    if o is None or not o.dynamic:
        return 0.0
    moves, plan = _ORDER_OVERHEAD[o.kind]
    return (moves + plan / o.refresh) * _OVERHEAD_REF_TOKENS / max(seq_len, 1)
