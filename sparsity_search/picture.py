"""A strategy as a picture: what every head of every layer does over the schedule, and the per-step curve.

One panel per step range (the strategy's own heads, then each phase): a row per layer, a cell per head,
coloured by pattern kind and shaded by the head's block density on the grid (pale: few blocks, full:
dense); a letter in the cell's corner names its quantization mode (``8`` fp8, ``i`` int8, ``4`` int4) and
its token order (``T`` tiled, ``S`` semantic, ``G`` segment); a layer's dense warm-up is written at its
row's start (``w12``: its first 12 steps dense; ``dense``: throughout). A legend names the colours. Below,
the per-step curve: the effective density of each step (dense warm-ups at 1) and, where the search
recorded it, the mean proxy error of each step. Drawn with OpenCV (no plotting dependency).
"""

from __future__ import annotations

import textwrap

import numpy as np

from vdit_accel.grid import VideoGrid
from vdit_accel.strategy import Strategy

from .accounting import HeadDensity, account

KIND_COLOURS = {  # RGB
    "dense": (110, 110, 110), "skip": (20, 20, 20), "window3d": (40, 100, 220), "window1d": (0, 170, 200),
    "frame_periodic": (40, 160, 60), "stripes": (220, 180, 0), "union": (140, 60, 190), "radial": (240, 120, 20),
    "sta": (210, 40, 50), "dynamic": (230, 80, 170),
}
_SCALE = (70, 70, 160)  # the shade legend's colour (no kind's)
ORDER_MARK = {"tiled": "T", "semantic": "S", "segment": "G"}
QUANT_MARK = {"fp8": "8", "int8": "i", "int4": "4"}
_FONT = 0  # cv2.FONT_HERSHEY_SIMPLEX
_CELL = 26


def _text(img, text: str, x: int, y: int, scale: float = 0.4, colour=(0, 0, 0), thickness: int = 1) -> None:
    import cv2

    cv2.putText(img, text, (int(x), int(y)), _FONT, scale, colour, thickness, cv2.LINE_AA)


def _kind(head) -> str:
    return "dynamic" if head.dynamic else head.pattern.kind


def _shade(colour, density: float) -> tuple[int, int, int]:
    a = 0.2 + 0.8 * max(0.0, min(1.0, density))
    return tuple(int(round(255 * (1 - a) + c * a)) for c in colour)


def strategy_picture(strategy: Strategy, grid: VideoGrid, num_steps: int, *, num_layers: int | None = None,
                     num_heads: int | None = None, block_size: int = 128, title: str | None = None) -> np.ndarray:
    """The picture (module docstring) as RGB uint8 ``[H, W, 3]``."""
    import cv2

    n_layers = num_layers or strategy.model.get("num_layers") or 1
    n_heads = num_heads or strategy.model.get("num_heads") or 1
    density = HeadDensity(grid, block_size)
    acc = account(strategy, grid, num_steps, num_layers=n_layers, num_heads=n_heads, block_size=block_size,
                  density=density)
    starts = [strategy.dense_warmup_steps] + [ph.from_step for ph in strategy.phases]
    ends = [ph.from_step for ph in strategy.phases] + [num_steps]
    spans = [(max(a, strategy.dense_warmup_steps), b) for a, b in zip(starts, ends)]
    label_w, gap = 64, 24
    panel_w = label_w + n_heads * _CELL
    width = max(720, len(spans) * (panel_w + gap) + gap)
    grid_h = 40 + n_layers * _CELL
    legend_h, curve_h = 84, 190
    per_line = int(width / 6.6)
    lines = [part for text in (title or strategy.describe(num_steps), acc.line())
             for part in textwrap.wrap(text, per_line)]
    head_h = 18 * len(lines) + 16
    img = np.full((head_h + grid_h + legend_h + curve_h + 20, width, 3), 255, np.uint8)
    for i, line in enumerate(lines):
        _text(img, line, 10, 18 + 18 * i, 0.42)
    used = set()
    y0 = head_h
    for p, (a, b) in enumerate(spans):
        x0 = gap + p * (panel_w + gap)
        _text(img, f"steps {a}-{b - 1}" if b > a else f"(from step {starts[p]}: not reached)", x0, y0 + 14, 0.45)
        for h in range(n_heads):
            _text(img, str(h), x0 + label_w + h * _CELL + 8, y0 + 32, 0.35, (90, 90, 90))
        for l in range(n_layers):
            y = y0 + 38 + l * _CELL
            warm = strategy.layer_warmup(l)
            mark = "dense" if warm >= num_steps else (f"w{warm}" if warm > strategy.dense_warmup_steps else "")
            _text(img, f"L{l} {mark}", x0 + 2, y + 17, 0.36)
            own = strategy if p == 0 else strategy.phases[p - 1]  # the range's own heads (warm-ups marked apart)
            heads = own.layer_heads(l, n_heads) if b > a else ()
            stats = _stats(strategy, p, l)
            for h, head in enumerate(heads):
                kind = _kind(head)
                used.add(kind)
                d = density(head, stats[h].get("density") if stats else None)
                x = x0 + label_w + h * _CELL
                shade = 1.0 if kind == "skip" else min(d, 1.0)  # (skip visits no block: drawn as it is)
                cv2.rectangle(img, (x, y), (x + _CELL - 2, y + _CELL - 2), _shade(KIND_COLOURS[kind], shade), -1)
                if warm >= b:  # this range never runs sparse for the layer: hatched
                    for k in range(0, 2 * _CELL, 6):
                        cv2.line(img, (x + k, y), (x + k - _CELL, y + _CELL - 2), (255, 255, 255), 1)
                ink = (255, 255, 255) if kind in ("skip", "dense") else (0, 0, 0)  # readable on dark and pale cells
                if head.quant is not None:
                    _text(img, QUANT_MARK.get(str(head.quant), "q"), x + _CELL - 10, y + 10, 0.33, ink)
                if head.order is not None:
                    _text(img, ORDER_MARK.get(head.order.kind, "o"), x + 2, y + _CELL - 5, 0.33, ink)
    _legend(img, sorted(used), head_h + grid_h + 6, width)
    _curve(img, acc.per_step_density, strategy.search.get("error_per_step"), strategy.layer_warmup, n_layers,
           head_h + grid_h + legend_h, curve_h, width)
    return img


def _stats(strategy: Strategy, phase: int, layer: int):
    stats = strategy.head_stats if phase == 0 else strategy.phases[phase - 1].head_stats
    return None if stats is None else stats[layer]


def _legend(img, kinds: list[str], y: int, width: int) -> None:
    import cv2

    x = 10
    for kind in kinds:
        cv2.rectangle(img, (x, y), (x + 14, y + 14), KIND_COLOURS[kind], -1)
        _text(img, "semantic/segment order" if kind == "dynamic" else kind, x + 18, y + 12, 0.38)
        x += 30 + 8 * (len(kind) + (14 if kind == "dynamic" else 0))
    y += 24
    for i, d in enumerate((0.1, 0.5, 1.0)):
        cv2.rectangle(img, (10 + i * 22, y), (10 + i * 22 + 18, y + 14), _shade(_SCALE, d), -1)
    _text(img, "shade: block density 0.1 / 0.5 / 1.   Letters: 8 fp8, i int8, 4 int4 (top right); T tiled, "
               "S semantic, G segment order (bottom left).", 82, y + 12, 0.34)
    _text(img, "w12: the layer runs dense for its first 12 steps; dense: throughout; hatched: its warm-up covers "
               "the whole range.", 82, y + 28, 0.34)


def _curve(img, density, error, layer_warmup, n_layers: int, y0: int, height: int, width: int) -> None:
    import cv2

    n = len(density)
    left, right, top, bottom = 50, width - 60, y0 + 24, y0 + height - 28
    _text(img, "per step: effective density (blue, 0-1)" + (", mean proxy error (red, 0-max)" if error else ""), left,
          y0 + 14, 0.4)
    cv2.rectangle(img, (left, top), (right, bottom), (0, 0, 0), 1)

    def px(i):
        return int(left + (right - left) * (i + 0.5) / max(n, 1))

    warm = min(layer_warmup(l) for l in range(n_layers))
    if warm:
        cv2.rectangle(img, (left + 1, top + 1), (min(px(warm - 1) + 2, right - 1), bottom - 1), (225, 225, 225), -1)
        _text(img, "dense warm-up", left + 4, bottom - 6, 0.35, (80, 80, 80))
    for frac in (0.0, 0.5, 1.0):
        y = int(bottom - frac * (bottom - top))
        _text(img, f"{frac:.1f}", 8, y + 4, 0.35, (40, 40, 200))
    pts = np.array([[px(i), int(bottom - min(d, 1.0) * (bottom - top))] for i, d in enumerate(density)], np.int32)
    cv2.polylines(img, [pts], False, (40, 40, 200), 2)
    if error:
        top_err = max(max(error), 1e-12)
        pts = np.array([[px(i), int(bottom - e / top_err * (bottom - top))] for i, e in enumerate(error[:n])], np.int32)
        cv2.polylines(img, [pts], False, (200, 40, 40), 2)
        _text(img, f"{top_err:.3g}", right + 4, top + 8, 0.35, (200, 40, 40))
    for i in sorted({0, n // 2, n - 1}):
        _text(img, str(i), px(i) - 4, bottom + 14, 0.35)
    _text(img, "step", right - 30, bottom + 24, 0.35)


def write_strategy_picture(path, strategy: Strategy, grid: VideoGrid, num_steps: int, **kw) -> None:
    from vdit_accel.video import write_png

    write_png(path, strategy_picture(strategy, grid, num_steps, **kw))
