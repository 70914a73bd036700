"""Strategy: what every head of every layer does -- sparse pattern, token order, quantization mode.

In memory a strategy is what its file is: a default :class:`HeadSpec` and, where heads differ (the
offline search's output), a :class:`HeadSpec` for every head of every layer, plus the schedule (dense
warm-up steps, unquantized first and last steps) and metadata.

File format, version 2 (``format`` and ``version`` are checked on load; unknown keys are refused;
never pickled)::

    {
      "format": "vdit-accel-strategy", "version": 2,
      "model": {"class": "WanTransformer3DModel", "num_layers": 30, "num_heads": 12, "head_dim": 128},
      "dense_warmup_steps": 2, "quant_bf16_steps": [2, 1],
      "default": {"pattern": "window3d:t=1,h=2,w=2", "order": "tiled", "quant": "fp8"},
      "layers": [{"heads": [{"pattern": "dense", "order": "semantic:top_p=0.9", "error": 0.012,
                             "density": 0.21}, ...]}, ...],
      "search": {...}
    }

A head spec's ``pattern`` (:mod:`vdit_accel.patterns`) and ``order`` (:mod:`vdit_accel.orders`; null or
``"raster"``: diffusers' own order) are written in short form and read in short form or as JSON objects;
``quant`` is null (fp16/bf16) or a :class:`~vdit_accel.quant.QuantMode` name. In ``default`` a missing
field means ``dense`` / raster / null; in a head, the default's. ``layers`` is omitted for a uniform
strategy; ``model`` fields may be omitted (then any model of matching structure accepts it); per-head
``error`` and ``density`` are the search's measurements, kept for inspection. ``quant_bf16_steps``
``[first, last]`` runs the first and last denoising steps unquantized (the last needs the pipeline's
step count: patch the pipeline, not only its transformer). A ``semantic`` or ``segment`` head chooses
its key blocks from each call's data, so its pattern must be ``dense``.

Version 1 files (a top-level ``default`` pattern, ``quant`` and ``order``; every listed head with its
``pattern``) load as they are; :meth:`Strategy.save` writes version 2.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .orders.spec import OrderSpec, format_order, parse_order
from .patterns import DENSE, PatternSpec, format_pattern, parse_pattern
from .quant import QuantMode

FORMAT = "vdit-accel-strategy"
VERSION = 2
_TOP_KEYS = {"format", "version", "model", "dense_warmup_steps", "quant_bf16_steps", "default", "layers", "search"}
_TOP_KEYS_V1 = _TOP_KEYS | {"quant", "order"}
_MODEL_KEYS = {"class", "num_layers", "num_heads", "head_dim"}
_HEAD_KEYS = {"pattern", "order", "quant"}
_STAT_KEYS = {"error", "density"}


@dataclass(frozen=True)
class HeadSpec:
    """What one head does.

    Args:
        pattern: the key blocks it visits (resolution-independent, :mod:`vdit_accel.patterns`); costs
            the blocks it keeps, buys their share of the attention.
        order: the token order it attends in (None: raster; :mod:`vdit_accel.orders`); a static order
            buys fewer blocks for the same neighbourhood, a dynamic one chooses blocks per call (its
            plan and moves cost per call; its pattern must be ``dense``).
        quant: its quantized mode (None: fp16/bf16; :class:`~vdit_accel.quant.QuantMode`); buys speed
            for error.
    Each field also takes its short form or JSON (``HeadSpec("window3d:t=1,h=2,w=2", "tiled", "fp8")``).
    """

    pattern: PatternSpec = DENSE
    order: OrderSpec | None = None
    quant: QuantMode | None = None

    def __post_init__(self):
        object.__setattr__(self, "pattern", parse_pattern(self.pattern))
        object.__setattr__(self, "order", parse_order(self.order))
        object.__setattr__(self, "quant", QuantMode.parse(self.quant))
        if self.order is not None and self.order.dynamic and self.pattern != DENSE:
            raise ValueError(
                f"order {self.order} chooses its key blocks from each call's data, so its pattern must be 'dense' "
                f"(got {self.pattern.kind!r}); use order 'tiled' or null to keep the pattern")

    @property
    def dynamic(self) -> bool:
        """Whether the head's key blocks are chosen per call (a semantic or segment order)."""
        return self.order is not None and self.order.dynamic

    def to_json(self, base: "HeadSpec | None" = None) -> dict[str, Any]:
        """Its pattern, and its order and quant where they differ from ``base``'s (default: raster, null)."""
        ref = base or HeadSpec()
        out: dict[str, Any] = {"pattern": format_pattern(self.pattern)}
        if self.order != ref.order:
            out["order"] = format_order(self.order) if self.order is not None else None
        if self.quant != ref.quant:
            out["quant"] = None if self.quant is None else str(self.quant)
        return out

    @classmethod
    def from_json(cls, doc: dict, base: "HeadSpec | None" = None) -> "HeadSpec":
        """A head spec from its JSON object; missing fields are ``base``'s (default: dense, raster, null)."""
        base = base or HeadSpec()
        return cls(doc.get("pattern", base.pattern), doc["order"] if "order" in doc else base.order,
                   doc["quant"] if "quant" in doc else base.quant)

    def describe(self) -> str:
        parts = [format_pattern(self.pattern)]
        if self.order is not None:
            parts.append(f"order {format_order(self.order)}")
        if self.quant is not None:
            parts.append(str(self.quant))
        return ", ".join(parts)


def _head(x, base: HeadSpec) -> HeadSpec:
    """A head spec from a HeadSpec or a pattern (which keeps ``base``'s order and quant)."""
    if isinstance(x, HeadSpec):
        return x
    return dataclasses.replace(base, pattern=parse_pattern(x))


@dataclass(frozen=True)
class Strategy:
    """A default head spec plus, optionally, every head's own; the denoising schedule; metadata.

    Args:
        default: what every head does that ``layers`` does not list (all heads, for a uniform strategy);
            a :class:`HeadSpec` or a pattern (short form, JSON, or spec).
        layers: optional ``layers[layer][head]`` head specs (or patterns, with ``default``'s order and quant).
        dense_warmup_steps: the first N denoising steps run dense (sparsity hurts most early, when the
            layout of the video is decided). Costs N steps' worth of the speed-up.
        quant_bf16_steps: ``(first, last)``: that many first and last denoising steps run unquantized.
        model: optional identity of the model it was made for (``class``, ``num_layers``,
            ``num_heads``, ``head_dim``), checked by :meth:`validate_for`.
        head_stats: optional ``[layer][head]`` dicts of measured ``error`` / ``density``.
        search: the search's metadata (prompts, steps, budget, GPU, versions, time), free-form.
    """

    default: HeadSpec = HeadSpec()
    layers: tuple[tuple[HeadSpec, ...], ...] | None = None
    dense_warmup_steps: int = 0
    quant_bf16_steps: tuple[int, int] = (0, 0)
    model: dict[str, Any] = field(default_factory=dict)
    head_stats: tuple[tuple[dict[str, float], ...], ...] | None = None
    search: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        default = _head(self.default, HeadSpec())
        set_("default", default)
        steps = self.quant_bf16_steps
        if (not isinstance(steps, (tuple, list)) or len(steps) != 2
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in steps)):
            raise ValueError(f"quant_bf16_steps must be two ints >= 0 (first, last), got {steps!r}")
        set_("quant_bf16_steps", (int(steps[0]), int(steps[1])))
        if isinstance(self.dense_warmup_steps, bool) or not isinstance(self.dense_warmup_steps, int) or self.dense_warmup_steps < 0:
            raise ValueError(f"dense_warmup_steps must be an int >= 0, got {self.dense_warmup_steps!r}")
        model = dict(self.model)
        unknown = set(model) - _MODEL_KEYS
        if unknown:
            raise ValueError(f"strategy 'model' has unknown keys {sorted(unknown)}; allowed: {sorted(_MODEL_KEYS)}")
        if self.layers is not None:
            if not self.layers or not all(isinstance(l, (list, tuple)) and l for l in self.layers):
                raise ValueError("strategy 'layers' must be a non-empty list of non-empty per-head lists")
            widths = {len(l) for l in self.layers}
            if len(widths) != 1:
                raise ValueError(f"every layer must list the same number of heads, got {sorted(widths)}")
            layers = []
            for li, layer in enumerate(self.layers):
                row = []
                for hi, head in enumerate(layer):
                    try:
                        row.append(_head(head, default))
                    except ValueError as e:
                        raise ValueError(f"strategy layers[{li}].heads[{hi}]: {e}") from None
                layers.append(tuple(row))
            set_("layers", tuple(layers))
            for name, val in (("num_layers", len(layers)), ("num_heads", widths.pop())):
                if model.get(name, val) != val:
                    raise ValueError(f"strategy model.{name}={model[name]} but 'layers' has {val}")
                model[name] = val
            if self.head_stats is not None:
                if [len(s) for s in self.head_stats] != [len(l) for l in layers]:
                    raise ValueError("'head_stats' must list one entry per head of every layer of 'layers'")
                set_("head_stats", tuple(tuple(dict(s) for s in row) for row in self.head_stats))
        elif self.head_stats is not None:
            raise ValueError("per-head 'head_stats' need per-head 'layers'")
        set_("model", model)
        set_("search", dict(self.search))

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def dense(cls, num_layers: int | None = None, num_heads: int | None = None, dense_warmup_steps: int = 0) -> "Strategy":
        """Every head dense (our kernel, no sparsity). Sizes, if given, are checked against the model."""
        return cls.uniform(DENSE, num_layers, num_heads, dense_warmup_steps)

    @classmethod
    def uniform(
        cls, pattern: PatternSpec | str, num_layers: int | None = None, num_heads: int | None = None,
        dense_warmup_steps: int = 0, quant=None, quant_bf16_steps: tuple[int, int] = (0, 0), order=None,
    ) -> "Strategy":
        """The same pattern (quantization mode, token order) for every head of every layer (e.g. ``"window3d:t=1,h=2,w=2"``)."""
        model = {k: v for k, v in (("num_layers", num_layers), ("num_heads", num_heads)) if v is not None}
        return cls(default=HeadSpec(pattern, order, quant), dense_warmup_steps=dense_warmup_steps, model=model,
                   quant_bf16_steps=quant_bf16_steps)

    @classmethod
    def from_spec(cls, spec: "Strategy | str | Path", dense_warmup_steps: int | None = None, quant=None,
                  order=None) -> "Strategy":
        """A Strategy, a path to a strategy file, ``"dense"``, or a pattern in short form.

        ``dense_warmup_steps`` / ``quant`` / ``order`` (given) override the strategy's; ``quant`` and
        ``order`` then apply to every head. ``order``: an order spec or short form (``"raster"`` forces
        diffusers' own order)."""
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
        changes: dict[str, Any] = {}
        if quant is not None:
            changes["quant"] = QuantMode.parse(quant)
        if order is not None:
            changes["order"] = parse_order(order)
        if changes:
            st = st.with_heads(**changes)
        if dense_warmup_steps is not None:
            st = dataclasses.replace(st, dense_warmup_steps=dense_warmup_steps)
        return st

    def with_heads(self, **changes) -> "Strategy":
        """Every head (default and listed) with ``changes`` (``order=``, ``quant=``, ``pattern=``)."""
        layers = None if self.layers is None else [[dataclasses.replace(h, **changes) for h in l] for l in self.layers]
        return dataclasses.replace(self, default=dataclasses.replace(self.default, **changes), layers=layers)

    # -- queries -------------------------------------------------------------------------------
    @property
    def is_uniform(self) -> bool:
        return self.layers is None

    def layer_heads(self, layer: int, num_heads: int) -> tuple[HeadSpec, ...]:
        """The head specs of ``layer`` (a model of ``num_heads`` heads)."""
        if self.layers is None:
            return (self.default,) * num_heads
        return self.layers[layer]

    def heads(self) -> list[HeadSpec]:
        """Every head spec the strategy uses (the default alone for a uniform strategy)."""
        return [self.default] if self.layers is None else [h for layer in self.layers for h in layer]

    def uses_orders(self) -> bool:
        """Whether any head is attended in another order than raster."""
        return any(h.order is not None for h in self.heads())

    def is_quantized(self) -> bool:
        return any(h.quant is not None for h in self.heads())

    def is_dense(self) -> bool:
        """Every head attends every key (dense patterns, no data-chosen blocks)."""
        return all(h.pattern == DENSE and not h.dynamic for h in self.heads())

    def quantized_at(self, step: int, num_steps: int | None) -> bool:
        """Whether quantized modes apply at denoising ``step`` of ``num_steps`` (None: unknown, then
        only the first steps of ``quant_bf16_steps`` can be honoured)."""
        first, last = self.quant_bf16_steps
        if step < first:
            return False
        return not (num_steps is not None and last and step >= num_steps - last)

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
        heads = self.heads()
        extra = ""
        if self.is_quantized():
            modes = sorted({str(h.quant) for h in heads})
            extra = f", quant={'/'.join(modes)} (bf16 steps: first {self.quant_bf16_steps[0]}, last {self.quant_bf16_steps[1]})"
        if self.uses_orders():
            extra += f", order={'/'.join(sorted({format_order(h.order) for h in heads}))}"
        if self.layers is None:
            return f"uniform {format_pattern(self.default.pattern)}, dense_warmup_steps={self.dense_warmup_steps}{extra}"
        kinds: dict[str, int] = {}
        for h in heads:
            kinds[h.pattern.kind] = kinds.get(h.pattern.kind, 0) + 1
        mix = ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
        return (f"{len(self.layers)} layers x {len(self.layers[0])} heads ({mix}), "
                f"dense_warmup_steps={self.dense_warmup_steps}{extra}")

    # -- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": FORMAT, "version": VERSION}
        if self.model:
            d["model"] = dict(self.model)
        d["dense_warmup_steps"] = self.dense_warmup_steps
        if self.quant_bf16_steps != (0, 0):
            d["quant_bf16_steps"] = list(self.quant_bf16_steps)
        d["default"] = self.default.to_json()
        if self.layers is not None:
            d["layers"] = []
            for li, layer in enumerate(self.layers):
                heads = []
                for hi, h in enumerate(layer):
                    entry = h.to_json(self.default)
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
        version = d.get("version")
        if version not in (1, VERSION):
            raise ValueError(f"strategy version {version!r} is not supported (this vdit-accel reads versions 1 and "
                             f"{VERSION}); write it again with a vdit-accel that reads it, or search a new one")
        unknown = set(d) - (_TOP_KEYS if version == VERSION else _TOP_KEYS_V1)
        if unknown:
            raise ValueError(f"strategy (version {version}) has unknown keys {sorted(unknown)}; allowed: "
                             f"{sorted(_TOP_KEYS if version == VERSION else _TOP_KEYS_V1)}")
        default = _default_v1(d) if version == 1 else _read("default", lambda: HeadSpec.from_json(_object(d, "default")))
        layers = stats = None
        if "layers" in d:
            if not isinstance(d["layers"], list):
                raise ValueError("strategy 'layers' must be a list of {'heads': [...]}")
            layers, stats = [], []
            for li, layer in enumerate(d["layers"]):
                if not isinstance(layer, dict) or set(layer) != {"heads"} or not isinstance(layer["heads"], list):
                    raise ValueError(f"strategy layers[{li}] must be {{'heads': [...]}}")
                heads, st = [], []
                for hi, head in enumerate(layer["heads"]):
                    where = f"layers[{li}].heads[{hi}]"
                    if not isinstance(head, dict) or "pattern" not in head or set(head) - _HEAD_KEYS - _STAT_KEYS:
                        raise ValueError(f"strategy {where} must have 'pattern' and optionally 'order', 'quant', "
                                         "'error', 'density'")
                    heads.append(_read(where, lambda: HeadSpec.from_json(head, default)))
                    st.append({k: float(v) for k, v in head.items() if k in _STAT_KEYS})
                layers.append(heads)
                stats.append(st)
            if not any(any(s) for s in stats):
                stats = None
        qbs = d.get("quant_bf16_steps", [0, 0])
        return cls(default=default, layers=layers, dense_warmup_steps=d.get("dense_warmup_steps", 0),
                   quant_bf16_steps=tuple(qbs) if isinstance(qbs, list) else qbs, model=dict(d.get("model", {})),
                   head_stats=stats, search=dict(d.get("search", {})))

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


def _read(where: str, make):
    """``make()``, its ValueError prefixed with where in the document it arose."""
    try:
        return make()
    except ValueError as e:
        raise ValueError(f"strategy {where}: {e}") from None


def _object(d: dict, key: str) -> dict:
    value = d.get(key, {})
    if not isinstance(value, dict):
        raise ValueError(f"strategy {key!r} must be a JSON object (a head spec: pattern, order, quant), got {value!r}")
    return value


def _default_v1(d: dict) -> HeadSpec:
    """Version 1's default head: the top-level ``default`` pattern, ``quant`` and ``order``."""
    pattern = _read("'default'", lambda: parse_pattern(d.get("default", {"kind": "dense"})))
    quant = _read("'quant'", lambda: QuantMode.parse(d.get("quant")))
    order = _read("'order'", lambda: parse_order(d.get("order")))
    return _read("'default'", lambda: HeadSpec(pattern, order, quant))
