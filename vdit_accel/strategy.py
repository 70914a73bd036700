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

Version 3 adds the denoising schedule beyond one dense warm-up (heads change over the trajectory)::

      "dense_warmup_steps": 4,
      "layer_warmup_steps": [12, 4, 4, 4, 4, 40],
      "default": {...}, "layers": [...],
      "phases": [{"from_step": 20, "default": {...}, "layers": [{"heads": [...]}, ...]}]

``layer_warmup_steps[i]``: layer ``i`` runs dense for its first that many steps (at least
``dense_warmup_steps``; as many as the run has: dense throughout). ``default`` / ``layers`` say what the
heads do from the warm-up on; each entry of ``phases`` what they do from its ``from_step`` (ascending,
0-based denoising steps) until the next. A phase lists its heads like the top level (``default``, optional
``layers`` with the top level's shape, per-head ``error`` / ``density``).

Version 1 files (a top-level ``default`` pattern, ``quant`` and ``order``; every listed head with its
``pattern``) and version 2 files load as they are; :meth:`Strategy.save` writes the lowest version that
holds the strategy: 2, or 3 when it has phases or per-layer warm-ups.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .orders.spec import OrderSpec, format_order, parse_order
from .patterns import DENSE, PatternSpec, format_pattern, parse_pattern
from .quant import QuantMode

FORMAT = "vdit-accel-strategy"
VERSION = 3
_TOP_KEYS_V2 = {"format", "version", "model", "dense_warmup_steps", "quant_bf16_steps", "default", "layers", "search"}
_TOP_KEYS = {1: _TOP_KEYS_V2 | {"quant", "order"}, 2: _TOP_KEYS_V2, 3: _TOP_KEYS_V2 | {"layer_warmup_steps", "phases"}}
_PHASE_KEYS = {"from_step", "default", "layers"}
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


def _per_head(layers, head_stats, default: HeadSpec, where: str):
    """``(layers, head_stats)`` normalised: tuples of :class:`HeadSpec` (patterns take ``default``'s
    order and quant) and of stat dicts; checked to be one non-empty row per layer, all of one width."""
    if layers is None:
        if head_stats is not None:
            raise ValueError(f"per-head 'head_stats' need per-head 'layers'{where}")
        return None, None
    if not layers or not all(isinstance(l, (list, tuple)) and l for l in layers):
        raise ValueError(f"strategy 'layers'{where} must be a non-empty list of non-empty per-head lists")
    widths = {len(l) for l in layers}
    if len(widths) != 1:
        raise ValueError(f"every layer{where} must list the same number of heads, got {sorted(widths)}")
    out = []
    for li, layer in enumerate(layers):
        row = []
        for hi, head in enumerate(layer):
            try:
                row.append(_head(head, default))
            except ValueError as e:
                raise ValueError(f"strategy{where} layers[{li}].heads[{hi}]: {e}") from None
        out.append(tuple(row))
    if head_stats is not None:
        if [len(s) for s in head_stats] != [len(l) for l in out]:
            raise ValueError(f"'head_stats'{where} must list one entry per head of every layer of 'layers'")
        head_stats = tuple(tuple(dict(s) for s in row) for row in head_stats)
    return tuple(out), head_stats


@dataclass(frozen=True)
class Phase:
    """What the heads do from denoising step ``from_step`` (0-based) on, until the next phase.

    ``default`` / ``layers`` / ``head_stats`` as in :class:`Strategy`. Buys a pattern per part of the
    trajectory (the layout is decided early, details late); costs one more set of plans per grid."""

    from_step: int
    default: HeadSpec = HeadSpec()
    layers: tuple[tuple[HeadSpec, ...], ...] | None = None
    head_stats: tuple[tuple[dict[str, float], ...], ...] | None = None

    def __post_init__(self):
        if isinstance(self.from_step, bool) or not isinstance(self.from_step, int) or self.from_step < 1:
            raise ValueError(f"a phase's from_step must be an int >= 1 (step 0 is the strategy's own), got {self.from_step!r}")
        default = _head(self.default, HeadSpec())
        object.__setattr__(self, "default", default)
        layers, stats = _per_head(self.layers, self.head_stats, default, f" (phase from step {self.from_step})")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "head_stats", stats)

    def layer_heads(self, layer: int, num_heads: int) -> tuple[HeadSpec, ...]:
        return (self.default,) * num_heads if self.layers is None else self.layers[layer]

    def heads(self) -> list[HeadSpec]:
        return [self.default] if self.layers is None else [h for layer in self.layers for h in layer]


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
        layer_warmup_steps: optional, per layer: its first N steps dense (at least ``dense_warmup_steps``);
            the first layers dense for longer buys quality where the video's layout forms, at their
            share of the cost. A layer's N at or beyond the run's steps keeps it dense throughout.
        phases: later step ranges, each a :class:`Phase` (ascending ``from_step``): a pattern per part
            of the denoising trajectory.
    """

    default: HeadSpec = HeadSpec()
    layers: tuple[tuple[HeadSpec, ...], ...] | None = None
    dense_warmup_steps: int = 0
    quant_bf16_steps: tuple[int, int] = (0, 0)
    model: dict[str, Any] = field(default_factory=dict)
    head_stats: tuple[tuple[dict[str, float], ...], ...] | None = None
    search: dict[str, Any] = field(default_factory=dict)
    layer_warmup_steps: tuple[int, ...] | None = None
    phases: tuple[Phase, ...] = ()

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
        layers, stats = _per_head(self.layers, self.head_stats, default, "")
        set_("layers", layers)
        set_("head_stats", stats)
        phases = tuple(self.phases)
        if not all(isinstance(ph, Phase) for ph in phases):
            raise ValueError("strategy 'phases' must be Phase objects (from_step, default, layers)")
        starts = [ph.from_step for ph in phases]
        if starts != sorted(set(starts)):
            raise ValueError(f"strategy phases must start at strictly ascending steps, got {starts}")
        set_("phases", phases)
        for where, rows in [("'layers'", layers)] + [(f"phase from step {ph.from_step}", ph.layers) for ph in phases]:
            if rows is None:
                continue
            for name, val in (("num_layers", len(rows)), ("num_heads", len(rows[0]))):
                if model.get(name, val) != val:
                    raise ValueError(f"strategy model.{name}={model[name]} but {where} has {val}")
                model[name] = val
        if self.layer_warmup_steps is not None:
            warm = self.layer_warmup_steps
            if not isinstance(warm, (list, tuple)) or not all(
                    isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in warm):
                raise ValueError(f"layer_warmup_steps must be a list of ints >= 0 (one per layer), got {warm!r}")
            if model.get("num_layers", len(warm)) != len(warm):
                raise ValueError(f"layer_warmup_steps lists {len(warm)} layers but the strategy has {model['num_layers']}")
            model["num_layers"] = len(warm)
            set_("layer_warmup_steps", tuple(int(n) for n in warm))
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
        """Every head (default and listed, of every phase) with ``changes`` (``order=``, ``quant=``, ``pattern=``)."""

        def apply(x):
            layers = None if x.layers is None else [[dataclasses.replace(h, **changes) for h in l] for l in x.layers]
            return dataclasses.replace(x, default=dataclasses.replace(x.default, **changes), layers=layers)

        return dataclasses.replace(apply(self), phases=tuple(apply(ph) for ph in self.phases))

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
        """Every head spec the strategy uses, in every phase (the default alone for a uniform strategy)."""
        own = [self.default] if self.layers is None else [h for layer in self.layers for h in layer]
        return own + [h for ph in self.phases for h in ph.heads()]

    # -- the schedule --------------------------------------------------------------------------
    @property
    def stage_starts(self) -> tuple[int, ...]:
        """The steps from which what the heads do changes, ascending: the dense warm-up's end, then every
        later per-layer warm-up end and phase start. Stage ``k >= 1`` runs from ``stage_starts[k - 1]``
        to the next; stage 0 is the dense warm-up."""
        w = self.dense_warmup_steps
        later = {n for n in (self.layer_warmup_steps or ()) if n > w} | {ph.from_step for ph in self.phases if ph.from_step > w}
        return (w, *sorted(later))

    def stage_at(self, step: int) -> int:
        """The stage (see :attr:`stage_starts`) denoising ``step`` is in: 0 in the dense warm-up."""
        return 0 if step < self.dense_warmup_steps else bisect.bisect_right(self.stage_starts, step)

    def layer_warmup(self, layer: int) -> int:
        """The steps ``layer`` runs dense before its patterns apply."""
        own = self.layer_warmup_steps[layer] if self.layer_warmup_steps is not None else 0
        return max(self.dense_warmup_steps, own)

    def heads_at(self, layer: int, num_heads: int, step: int) -> tuple[HeadSpec, ...]:
        """What ``layer``'s heads do at denoising ``step``: in the layer's warm-up every head dense (in
        raster order, its quantization mode kept), else the heads of the phase ``step`` is in."""
        if step < self.layer_warmup(layer):
            return tuple(dataclasses.replace(h, pattern=DENSE, order=None) for h in self.layer_heads(layer, num_heads))
        phase = None
        for ph in self.phases:
            if ph.from_step <= step:
                phase = ph
        return self.layer_heads(layer, num_heads) if phase is None else phase.layer_heads(layer, num_heads)

    def stage_heads(self, layer: int, num_heads: int, stage: int) -> tuple[HeadSpec, ...]:
        """What ``layer``'s heads do in ``stage`` (>= 1; see :attr:`stage_starts`)."""
        starts = self.stage_starts
        if not 1 <= stage <= len(starts):
            raise ValueError(f"stage {stage} is not one of this strategy's sparse stages 1..{len(starts)}")
        return self.heads_at(layer, num_heads, starts[stage - 1])

    def dense_throughout(self, num_steps: int, num_layers: int | None = None) -> bool:
        """Whether a run of ``num_steps`` steps attends every key at every step in every layer."""
        if self.dense_warmup_steps >= num_steps:
            return True
        n_layers = num_layers or self.model.get("num_layers") or (len(self.layers) if self.layers else 1)
        heads = self.model.get("num_heads") or 1
        return all(h.pattern == DENSE and not h.dynamic
                   for layer in range(n_layers) for s in self.stage_starts if s < num_steps
                   for h in self.heads_at(layer, heads, s))

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

    def describe(self, num_steps: int | None = None) -> str:
        """One line: the heads' patterns, the schedule; for a run of ``num_steps`` that attends every key
        throughout, only that (the patterns listed would never run)."""
        heads = self.heads()
        if num_steps is not None and self.dense_throughout(num_steps):
            why = (f"its {self.dense_warmup_steps} dense warm-up steps cover all {num_steps}"
                   if self.dense_warmup_steps >= num_steps else "every head of every layer is dense at every step")
            return f"runs dense throughout a {num_steps}-step run ({why}): no attention is skipped"
        extra = ""
        if self.is_quantized():
            modes = sorted({str(h.quant) for h in heads})
            extra = f", quant={'/'.join(modes)} (bf16 steps: first {self.quant_bf16_steps[0]}, last {self.quant_bf16_steps[1]})"
        if self.uses_orders():
            extra += f", order={'/'.join(sorted({format_order(h.order) for h in heads}))}"
        if self.layer_warmup_steps is not None:
            extra += f", layer_warmup_steps={list(self.layer_warmup_steps)}"

        def mix(specs) -> str:
            kinds: dict[str, int] = {}
            for h in specs:
                kinds[h.pattern.kind] = kinds.get(h.pattern.kind, 0) + 1
            return ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]))

        later = "".join(f"; from step {ph.from_step}: " + (f"uniform {format_pattern(ph.default.pattern)}" if ph.layers is None
                                                            else mix(ph.heads())) for ph in self.phases)
        if self.layers is None:
            return f"uniform {format_pattern(self.default.pattern)}, dense_warmup_steps={self.dense_warmup_steps}{extra}{later}"
        own = [h for layer in self.layers for h in layer]
        return (f"{len(self.layers)} layers x {len(self.layers[0])} heads ({mix(own)}), "
                f"dense_warmup_steps={self.dense_warmup_steps}{extra}{later}")

    # -- JSON ----------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        """The lowest file version that holds this strategy (3 for phases or per-layer warm-ups)."""
        return 3 if self.phases or self.layer_warmup_steps is not None else 2

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": FORMAT, "version": self.version}
        if self.model:
            d["model"] = dict(self.model)
        d["dense_warmup_steps"] = self.dense_warmup_steps
        if self.layer_warmup_steps is not None:
            d["layer_warmup_steps"] = list(self.layer_warmup_steps)
        if self.quant_bf16_steps != (0, 0):
            d["quant_bf16_steps"] = list(self.quant_bf16_steps)
        d.update(_heads_to_json(self.default, self.layers, self.head_stats))
        if self.phases:
            d["phases"] = [{"from_step": ph.from_step, **_heads_to_json(ph.default, ph.layers, ph.head_stats)}
                           for ph in self.phases]
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
        if version not in _TOP_KEYS:
            raise ValueError(f"strategy version {version!r} is not supported (this vdit-accel reads versions "
                             f"{', '.join(map(str, sorted(_TOP_KEYS)))}); write it again with a vdit-accel that reads it, "
                             "or search a new one")
        unknown = set(d) - _TOP_KEYS[version]
        if unknown:
            raise ValueError(f"strategy (version {version}) has unknown keys {sorted(unknown)}; allowed: "
                             f"{sorted(_TOP_KEYS[version])}")
        default = _default_v1(d) if version == 1 else _read("default", lambda: HeadSpec.from_json(_object(d, "default")))
        layers, stats = _heads_from_json(d, default, "")
        phases = []
        raw = d.get("phases", [])
        if not isinstance(raw, list):
            raise ValueError("strategy 'phases' must be a list of {'from_step': N, 'default': {...}, 'layers': [...]}")
        for pi, ph in enumerate(raw):
            where = f"phases[{pi}]"
            if not isinstance(ph, dict) or "from_step" not in ph or set(ph) - _PHASE_KEYS:
                raise ValueError(f"strategy {where} must have 'from_step' and optionally 'default', 'layers'")
            ph_default = _read(f"{where}.default", lambda: HeadSpec.from_json(_object(ph, "default")))
            ph_layers, ph_stats = _heads_from_json(ph, ph_default, f"{where}.")
            phases.append(_read(where, lambda: Phase(ph["from_step"], ph_default, ph_layers, ph_stats)))
        qbs = d.get("quant_bf16_steps", [0, 0])
        warm = d.get("layer_warmup_steps")
        return cls(default=default, layers=layers, dense_warmup_steps=d.get("dense_warmup_steps", 0),
                   quant_bf16_steps=tuple(qbs) if isinstance(qbs, list) else qbs, model=dict(d.get("model", {})),
                   head_stats=stats, search=dict(d.get("search", {})),
                   layer_warmup_steps=tuple(warm) if isinstance(warm, list) else warm, phases=tuple(phases))

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


def _heads_to_json(default: HeadSpec, layers, head_stats) -> dict[str, Any]:
    """``{"default": ..., "layers": [{"heads": [...]}, ...]}`` (layers only where listed)."""
    d: dict[str, Any] = {"default": default.to_json()}
    if layers is not None:
        d["layers"] = []
        for li, layer in enumerate(layers):
            heads = []
            for hi, h in enumerate(layer):
                entry = h.to_json(default)
                if head_stats is not None:
                    entry.update(head_stats[li][hi])
                heads.append(entry)
            d["layers"].append({"heads": heads})
    return d


def _heads_from_json(d: dict, default: HeadSpec, where: str):
    """``(layers, head_stats)`` of a document's (or a phase's) ``layers`` (None, None where absent)."""
    if "layers" not in d:
        return None, None
    if not isinstance(d["layers"], list):
        raise ValueError(f"strategy {where}'layers' must be a list of {{'heads': [...]}}")
    layers, stats = [], []
    for li, layer in enumerate(d["layers"]):
        if not isinstance(layer, dict) or set(layer) != {"heads"} or not isinstance(layer["heads"], list):
            raise ValueError(f"strategy {where}layers[{li}] must be {{'heads': [...]}}")
        heads, st = [], []
        for hi, head in enumerate(layer["heads"]):
            at = f"{where}layers[{li}].heads[{hi}]"
            if not isinstance(head, dict) or "pattern" not in head or set(head) - _HEAD_KEYS - _STAT_KEYS:
                raise ValueError(f"strategy {at} must have 'pattern' and optionally 'order', 'quant', 'error', 'density'")
            heads.append(_read(at, lambda: HeadSpec.from_json(head, default)))
            st.append({k: float(v) for k, v in head.items() if k in _STAT_KEYS})
        layers.append(heads)
        stats.append(st)
    return layers, (stats if any(any(s) for s in stats) else None)


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
