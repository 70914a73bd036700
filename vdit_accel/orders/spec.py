"""The typed order specs and their registry (short forms, JSON): see :mod:`vdit_accel.spec`.

``None`` is the raster order (diffusers' own; short form ``raster``). Fields that are None are chosen
from the grid and block size when the order is applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..spec import Spec, SpecRegistry


class OrderSpec(Spec):
    """A token order other than raster (base class of the kinds below)."""

    family = "order"
    dynamic: ClassVar[bool] = False  # chosen from each call's data (its block mask too)

    def _positive(self, *names):
        for name in names:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise self.invalid(name, "an int >= 1 (or null: automatic)", value)

    def _share(self, name):
        value = getattr(self, name)
        if not 0 < value <= 1:
            raise self.invalid(name, "a number in (0, 1]", value)


@dataclass(frozen=True)
class Tiled(OrderSpec):
    """Static, one for all heads: compact 3D tiles of ``t`` frames x ``h`` rows (default: by block size,
    :func:`vdit_accel.orders.static.tile_shape`)."""

    kind = "tiled"
    t: int | None = None
    h: int | None = None

    def check(self):
        self._positive("t", "h")


@dataclass(frozen=True)
class Semantic(OrderSpec):
    """Per head and call: k-means of Q and of K apart (``q_clusters`` / ``k_clusters``, default by grid);
    key blocks kept up to ``top_p`` of the estimated attention; ``iters`` Lloyd updates per plan on a sample
    beyond the free online one; a new plan every ``refresh`` denoising steps."""

    kind = "semantic"
    dynamic = True
    q_clusters: int | None = None
    k_clusters: int | None = None
    top_p: float = 0.95
    iters: int = 0
    refresh: int = 1

    def check(self):
        self._positive("q_clusters", "k_clusters", "refresh")
        self._share("top_p")
        if self.iters < 0:
            raise self.invalid("iters", "an int >= 0", self.iters)


@dataclass(frozen=True)
class Segment(OrderSpec):
    """Per head and call, keys only: heavy keys first inside segments of ``size`` video keys (default 8
    blocks); key blocks kept up to ``top_p`` of the estimated mass; a new plan every ``refresh`` steps."""

    kind = "segment"
    dynamic = True
    size: int | None = None
    top_p: float = 0.95
    refresh: int = 1

    def check(self):
        self._positive("size", "refresh")
        self._share("top_p")


ORDERS = SpecRegistry("order", [Tiled, Semantic, Segment], none="raster")
ORDER_KINDS = ORDERS.names


def parse_order(x) -> OrderSpec | None:
    """An order from its short form (``raster``, ``tiled:t=2,h=8``, ``semantic:top_p=0.9``), its JSON
    object (a dict or its text), None (raster), or an order (returned as it is)."""
    return ORDERS.parse(x)


def format_order(o: OrderSpec | None) -> str:
    """The short form of ``o`` (``raster`` for None); inverse of :func:`parse_order`."""
    return ORDERS.format(o)


def is_dynamic(o: OrderSpec | None) -> bool:
    """Whether ``o`` chooses its order (and block mask) from each call's data."""
    return o is not None and o.dynamic
