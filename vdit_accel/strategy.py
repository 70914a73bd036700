"""Strategy: which sparse pattern each layer and head of a model uses, as a versioned JSON file.

A strategy is either *explicit* (a pattern for every layer and head, as the offline search writes
it) or *uniform* (one pattern for every head, resolved against the model when it is applied).

File format (``format`` and ``version`` are checked on load; unknown keys are refused)::

    {
      "format": "vdit-accel-strategy", "version": 1,
      "model": {"class": "WanTransformer3DModel", "num_layers": 30, "num_heads": 12, "head_dim": 128},
      "dense_warmup_steps": 2,
      "default": {"kind": "dense"},
      "quant": "fp8", "quant_bf16_steps": [2, 1], "order": {"kind": "tiled"},
      "layers": [{"heads": [{"pattern": {"kind": "window3d", "t": 1, "h": 2, "w": 2}, "quant": "int8",
                             "order": {"kind": "semantic", "top_p": 0.9}, "error": 0.012, "density": 0.21},
                            ...]}, ...],
      "search": {...}
    }

``quant`` (top level: every head's default; per head: that head's) is ``null`` (bf16/fp16, the
default), ``"fp8"``, ``"int8"`` or ``"int4"`` (see :mod:`vdit_accel.quant`); ``quant_bf16_steps``
``[first, last]`` runs the first and last denoising steps unquantized (the last needs the pipeline's
step count: patch the pipeline, not only its transformer).
``order`` (top level: every head's default; per head: that head's) is the token order the head is
attended in: ``null`` (raster, diffusers' own), ``{"kind": "tiled"}``, ``{"kind": "semantic", ...}`` or
``{"kind": "segment", ...}`` (see :mod:`vdit_accel.permutation`; short forms such as ``"tiled"`` or
``"semantic:top_p=0.9"`` are accepted on input). A ``semantic`` or ``segment`` head chooses its key
blocks from the data of each call, so its pattern must be ``dense``.
``layers`` is omitted for a uniform strategy (``default`` applies to every head); ``model`` fields
may be omitted (then any model with matching structure accepts it); per-head ``error`` and
``density`` are optional measurements kept for inspection. Never pickled.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .patterns import Pattern, format_pattern, parse_pattern, validate_pattern
from .permutation import DYNAMIC_KINDS, Order, format_order, validate_order
from .quant import QUANT_MODES

FORMAT = "vdit-accel-strategy"
VERSION = 1
_TOP_KEYS = {"format", "version", "model", "dense_warmup_steps", "default", "quant", "quant_bf16_steps", "order",
             "layers", "search"}
_MODEL_KEYS = {"class", "num_layers", "num_heads", "head_dim"}
_HEAD_KEYS = {"pattern", "quant", "order", "error", "density"}


def validate_quant(mode) -> str | None:
    """``None`` (no quantization) or one of ``QUANT_MODES``; anything else raises ``ValueError``."""
    if mode is None or mode in QUANT_MODES:
        return mode
    raise ValueError(f"unknown quantization mode {mode!r}; use one of {list(QUANT_MODES)} or null (bf16)")


@dataclass
class Strategy:
    """Per-layer, per-head sparse patterns plus the dense-warmup schedule.

    Args:
        default: the pattern of every head not listed in ``layers`` (all heads, for a uniform strategy).
        layers: optional explicit ``layers[layer][head]`` patterns.
        dense_warmup_steps: the first N denoising steps run dense (sparsity hurts most early, when the
            layout of the video is decided). Costs N steps' worth of the speed-up.
        model: optional identity of the model it was made for (``class``, ``num_layers``,
            ``num_heads``, ``head_dim``), checked by :meth:`validate_for`.
        head_stats: optional ``[layer][head]`` dicts of measured ``error`` / ``density``.
        search: the search's metadata (prompts, steps, budget, GPU, versions, time), free-form.
        quant: the quantization mode of every head not given one in ``quants`` (None: unquantized).
        quants: optional ``quants[layer][head]`` modes (None entries: unquantized), next to ``layers``.
        quant_bf16_steps: ``(first, last)``: that many first and last denoising steps run unquantized.
        order: the token order of every head not given one in ``orders`` (None: raster). A ``tiled``
            default is applied once per transformer forward where the model allows it (Wan); heads of
            another order are then gathered per call. Costs the reordering; buys fewer blocks for the
            same attention (see :mod:`vdit_accel.permutation`).
        orders: optional ``orders[layer][head]`` (None entries: raster), next to ``layers``.
    """

    default: Pattern = field(default_factory=lambda: {"kind": "dense"})
    layers: list[list[Pattern]] | None = None
    dense_warmup_steps: int = 0
    model: dict[str, Any] = field(default_factory=dict)
    head_stats: list[list[dict[str, float]]] | None = None
    search: dict[str, Any] = field(default_factory=dict)
    quant: str | None = None
    quants: list[list[str | None]] | None = None
    quant_bf16_steps: tuple[int, int] = (0, 0)
    order: Order | None = None
    orders: list[list[Order | None]] | None = None

    def __post_init__(self):
        self.default = validate_pattern(self.default)
        self.quant = validate_quant(self.quant)
        steps = self.quant_bf16_steps
        if (not isinstance(steps, (tuple, list)) or len(steps) != 2
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in steps)):
            raise ValueError(f"quant_bf16_steps must be two ints >= 0 (first, last), got {steps!r}")
        self.quant_bf16_steps = (int(steps[0]), int(steps[1]))
        if self.quants is not None:
            if self.layers is None:
                raise ValueError("per-head 'quants' need per-head 'layers' (use 'quant' for a uniform strategy)")
            if [len(q) for q in self.quants] != [len(l) for l in self.layers]:
                raise ValueError("'quants' must list one mode per head of every layer of 'layers'")
            self.quants = [[validate_quant(m) for m in q] for q in self.quants]
        self.order = validate_order(self.order)
        if self.orders is not None:
            if self.layers is None:
                raise ValueError("per-head 'orders' need per-head 'layers' (use 'order' for a uniform strategy)")
            if [len(o) for o in self.orders] != [len(l) for l in self.layers]:
                raise ValueError("'orders' must list one order per head of every layer of 'layers'")
            self.orders = [[validate_order(o) for o in row] for row in self.orders]
        if isinstance(self.dense_warmup_steps, bool) or not isinstance(self.dense_warmup_steps, int) or self.dense_warmup_steps < 0:
            raise ValueError(f"dense_warmup_steps must be an int >= 0, got {self.dense_warmup_steps!r}")
        unknown = set(self.model) - _MODEL_KEYS
        if unknown:
            raise ValueError(f"strategy 'model' has unknown keys {sorted(unknown)}; allowed: {sorted(_MODEL_KEYS)}")
        if self.layers is not None:
            if not self.layers or not all(isinstance(l, list) and l for l in self.layers):
                raise ValueError("strategy 'layers' must be a non-empty list of non-empty per-head lists")
            widths = {len(l) for l in self.layers}
            if len(widths) != 1:
                raise ValueError(f"every layer must list the same number of heads, got {sorted(widths)}")
            self.layers = [[validate_pattern(p) for p in layer] for layer in self.layers]
            for name, val in (("num_layers", len(self.layers)), ("num_heads", widths.pop())):
                if self.model.get(name, val) != val:
                    raise ValueError(f"strategy model.{name}={self.model[name]} but 'layers' has {val}")
                self.model[name] = val
        self._check_dynamic_orders()

    def _check_dynamic_orders(self) -> None:
        """A semantic or segment head picks its blocks from the data: its pattern must be dense."""
        if self.layers is None:
            cases = [("default", self.default, self.order)]
        else:
            cases = [(f"layers[{li}].heads[{hi}]", p, self.layer_orders(li, len(layer))[hi])
                     for li, layer in enumerate(self.layers) for hi, p in enumerate(layer)]
        for where, p, o in cases:
            if o is not None and o["kind"] in DYNAMIC_KINDS and p["kind"] != "dense":
                raise ValueError(
                    f"strategy {where}: order {format_order(o)!r} chooses its key blocks from each call's data, so "
                    f"its pattern must be 'dense' (got {p['kind']!r}); use order 'tiled' or null to keep the pattern"
                )

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def dense(cls, num_layers: int | None = None, num_heads: int | None = None, dense_warmup_steps: int = 0) -> "Strategy":
        """Every head dense (our kernel, no sparsity). Sizes, if given, are checked against the model."""
        return cls.uniform({"kind": "dense"}, num_layers, num_heads, dense_warmup_steps)

    @classmethod
    def uniform(
        cls, pattern: Pattern | str, num_layers: int | None = None, num_heads: int | None = None, dense_warmup_steps: int = 0,
        quant: str | None = None, quant_bf16_steps: tuple[int, int] = (0, 0), order: Order | str | None = None,
    ) -> "Strategy":
        """The same pattern (quantization mode, token order) for every head of every layer (e.g. ``"window3d:t=1,h=2,w=2"``)."""
        model = {k: v for k, v in (("num_layers", num_layers), ("num_heads", num_heads)) if v is not None}
        return cls(default=validate_pattern(pattern), dense_warmup_steps=dense_warmup_steps, model=model,
                   quant=quant, quant_bf16_steps=quant_bf16_steps, order=order)

    @classmethod
    def from_spec(cls, spec: "Strategy | str | Path", dense_warmup_steps: int | None = None,
                  quant: str | None = None, order: Order | str | None = None) -> "Strategy":
        """A Strategy, a path to a strategy file, ``"dense"``, or a pattern in short form.

        ``dense_warmup_steps`` / ``quant`` / ``order`` (given) override the strategy's; ``quant`` and
        ``order`` then apply to every head (per-head modes and orders are dropped). ``order``: a spec of
        :func:`vdit_accel.permutation.validate_order` (``"raster"`` forces diffusers' own order)."""
        if isinstance(spec, Strategy):
            st = spec
        elif isinstance(spec, Path) or (isinstance(spec, str) and spec.endswith(".json")):
            st = cls.load(spec)
        elif isinstance(spec, str):
            try:
                st = cls.uniform(parse_pattern(spec))
            except ValueError as e:
                raise ValueError(
                    f"strategy {spec!r} is neither a .json strategy file nor a pattern ({e}). "
                    "Examples: 'dense', 'window3d:t=1,h=2,w=2', path/to/strategy.json"
                ) from None
        else:
            raise TypeError(f"strategy must be a Strategy, a path or a string, got {type(spec).__name__}")
        if dense_warmup_steps is not None or quant is not None:
            st = dataclasses.replace(
                st, model=dict(st.model),
                dense_warmup_steps=st.dense_warmup_steps if dense_warmup_steps is None else dense_warmup_steps,
                quant=st.quant if quant is None else quant, quants=st.quants if quant is None else None)
        if order is not None:
            st = dataclasses.replace(st, model=dict(st.model), order=validate_order(order), orders=None)
        return st

    # -- queries -------------------------------------------------------------------------------
    @property
    def is_uniform(self) -> bool:
        return self.layers is None

    def layer_patterns(self, layer: int, num_heads: int) -> list[Pattern]:
        if self.layers is None:
            return [self.default] * num_heads
        return self.layers[layer]

    def layer_quants(self, layer: int, num_heads: int) -> list[str | None]:
        """The quantization mode of each head of ``layer`` (None: unquantized)."""
        if self.quants is None:
            return [self.quant] * num_heads
        return self.quants[layer]

    def layer_orders(self, layer: int, num_heads: int) -> list[Order | None]:
        """The token order of each head of ``layer`` (None: raster)."""
        if self.orders is None:
            return [self.order] * num_heads
        return self.orders[layer]

    def uses_orders(self) -> bool:
        """Whether any head is attended in another order than raster."""
        orders = [self.order] if self.orders is None else [o for row in self.orders for o in row]
        return any(o is not None for o in orders)

    def quantized_at(self, step: int, num_steps: int | None) -> bool:
        """Whether quantized modes apply at denoising ``step`` of ``num_steps`` (None: unknown, then
        only the first steps of ``quant_bf16_steps`` can be honoured)."""
        first, last = self.quant_bf16_steps
        if step < first:
            return False
        return not (num_steps is not None and last and step >= num_steps - last)

    def is_quantized(self) -> bool:
        modes = [self.quant] if self.quants is None else [m for q in self.quants for m in q]
        return any(m is not None for m in modes)

    def is_dense(self) -> bool:
        """Every head attends every key (dense patterns, no data-chosen blocks)."""
        pats = [self.default] if self.layers is None else [p for l in self.layers for p in l]
        orders = [self.order] if self.orders is None else [o for row in self.orders for o in row]
        return all(p["kind"] == "dense" for p in pats) and not any(o is not None and o["kind"] in DYNAMIC_KINDS for o in orders)

    def validate_for(self, model_class: str, num_layers: int, num_heads: int, head_dim: int | None = None) -> None:
        """Raise ``ValueError`` if this strategy was made for a model of another structure."""
        want = {"class": model_class, "num_layers": num_layers, "num_heads": num_heads, "head_dim": head_dim}
        for key, actual in want.items():
            if actual is None or key not in self.model:
                continue
            if self.model[key] != actual:
                raise ValueError(
                    f"strategy was made for {key}={self.model[key]!r} but the model has {key}={actual!r} "
                    f"({model_class}: {num_layers} layers x {num_heads} heads). Search a strategy for this model "
                    "(`vdit-accel search`) or use a uniform one (e.g. --strategy window3d:t=1,h=2,w=2)."
                )

    def describe(self) -> str:
        quant = ""
        if self.is_quantized():
            modes = sorted({str(m) for m in ([self.quant] if self.quants is None else [m for q in self.quants for m in q])})
            quant = f", quant={'/'.join(modes)} (bf16 steps: first {self.quant_bf16_steps[0]}, last {self.quant_bf16_steps[1]})"
        if self.uses_orders():
            names = [self.order] if self.orders is None else [o for row in self.orders for o in row]
            quant += f", order={'/'.join(sorted({format_order(o) for o in names}))}"
        if self.layers is None:
            return f"uniform {format_pattern(self.default)}, dense_warmup_steps={self.dense_warmup_steps}{quant}"
        kinds: dict[str, int] = {}
        for layer in self.layers:
            for p in layer:
                kinds[p["kind"]] = kinds.get(p["kind"], 0) + 1
        mix = ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
        return f"{len(self.layers)} layers x {len(self.layers[0])} heads ({mix}), dense_warmup_steps={self.dense_warmup_steps}{quant}"

    # -- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": FORMAT, "version": VERSION}
        if self.model:
            d["model"] = dict(self.model)
        d["dense_warmup_steps"] = self.dense_warmup_steps
        d["default"] = self.default
        if self.quant is not None:
            d["quant"] = self.quant
        if self.quant_bf16_steps != (0, 0):
            d["quant_bf16_steps"] = list(self.quant_bf16_steps)
        if self.order is not None:
            d["order"] = _order_json(self.order)
        if self.layers is not None:
            d["layers"] = []
            for li, layer in enumerate(self.layers):
                heads = []
                for hi, p in enumerate(layer):
                    entry: dict[str, Any] = {"pattern": p}
                    if self.quants is not None and self.quants[li][hi] != self.quant:
                        entry["quant"] = self.quants[li][hi]
                    if self.orders is not None and self.orders[li][hi] != self.order:
                        entry["order"] = _order_json(self.orders[li][hi])
                    if self.head_stats is not None:
                        entry.update(self.head_stats[li][hi])
                    heads.append(entry)
                d["layers"].append({"heads": heads})
        if self.search:
            d["search"] = self.search
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Strategy":
        if not isinstance(d, dict):
            raise ValueError("a strategy document is a JSON object")
        if d.get("format") != FORMAT:
            raise ValueError(f"not a vdit-accel strategy (format={d.get('format')!r}, expected {FORMAT!r})")
        if d.get("version") != VERSION:
            raise ValueError(f"strategy version {d.get('version')!r} is not supported (this vdit-accel reads {VERSION})")
        unknown = set(d) - _TOP_KEYS
        if unknown:
            raise ValueError(f"strategy has unknown keys {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
        layers = stats = quants = orders = None
        qbs = d.get("quant_bf16_steps", [0, 0])
        try:
            quant = validate_quant(d.get("quant"))
        except ValueError as e:
            raise ValueError(f"strategy 'quant': {e}") from None
        try:
            order = validate_order(d.get("order"))
        except ValueError as e:
            raise ValueError(f"strategy 'order': {e}") from None
        if "layers" in d:
            layers, stats, quants, orders = [], [], [], []
            for li, layer in enumerate(d["layers"]):
                if not isinstance(layer, dict) or set(layer) != {"heads"} or not isinstance(layer["heads"], list):
                    raise ValueError(f"strategy layers[{li}] must be {{'heads': [...]}}")
                pats, st, qs, os_ = [], [], [], []
                for hi, head in enumerate(layer["heads"]):
                    if not isinstance(head, dict) or "pattern" not in head or set(head) - _HEAD_KEYS:
                        raise ValueError(
                            f"strategy layers[{li}].heads[{hi}] must have 'pattern' and optionally 'quant', 'order', 'error', "
                            "'density'"
                        )
                    try:
                        pats.append(validate_pattern(head["pattern"]))
                        qs.append(validate_quant(head.get("quant", quant)))
                        os_.append(validate_order(head["order"]) if "order" in head else order)
                    except ValueError as e:
                        raise ValueError(f"strategy layers[{li}].heads[{hi}]: {e}") from None
                    st.append({k: float(v) for k, v in head.items() if k not in ("pattern", "quant", "order")})
                layers.append(pats)
                stats.append(st)
                quants.append(qs)
                orders.append(os_)
            if not any(any(s) for s in stats):
                stats = None
            if all(m == quant for q in quants for m in q):
                quants = None
            if all(o == order for row in orders for o in row):
                orders = None
        return cls(
            default=d.get("default", {"kind": "dense"}),
            layers=layers,
            dense_warmup_steps=d.get("dense_warmup_steps", 0),
            model=dict(d.get("model", {})),
            head_stats=stats,
            search=dict(d.get("search", {})),
            quant=quant,
            quants=quants,
            quant_bf16_steps=tuple(qbs) if isinstance(qbs, list) else qbs,
            order=order,
            orders=orders,
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Strategy":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"strategy file {str(path)!r} does not exist")
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is None or "\x00" in text:
            raise ValueError(f"strategy file {str(path)!r} is not a JSON strategy file (binary data; pickles are never loaded)")
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"strategy file {str(path)!r} is not valid JSON: {e}") from None
        return cls.from_dict(d)


def _order_json(o: Order | None) -> dict | None:
    """An order as stored in a strategy file: its automatic (None) parameters left out."""
    return None if o is None else {k: v for k, v in o.items() if v is not None}
