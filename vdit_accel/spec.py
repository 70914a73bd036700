"""Typed specs and the one engine that reads and writes them.

A *spec* is a small frozen dataclass that says what a head does in resolution-independent terms: a
sparse pattern (:mod:`vdit_accel.patterns`: ``Window3d(t=1, h=2, w=2)``) or a token order
(:mod:`vdit_accel.orders.spec`: ``Semantic(top_p=0.9)``). Its class attribute ``kind`` names it; its
fields are typed (``int``, ``float``, optional ones, tuples of ints, tuples of specs) and checked in
``__post_init__``, so a spec that exists is valid. Specs are hashable: caches key on them directly.

A :class:`SpecRegistry` holds the kinds of one family and converts between a spec and its two outside
forms, with the same rules for every kind:

- the short form (CLI, README, strategy files): ``kind`` or ``kind:name=value,name=value``; tuples of
  ints with ``|`` (``stripes:frames=0|-1``); a family with a ``join`` kind joins specs with ``+``
  (``window3d:t=0,h=1,w=1+stripes:frames=0`` is a union); fields at their default are left out;
- JSON: ``{"kind": ..., name: value, ...}`` (tuples as lists; fields at their default left out).

:meth:`SpecRegistry.parse` accepts a spec, either form (a JSON object also as text), and raises
``ValueError`` naming the kind, the field and what it must be.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, ClassVar


class Spec:
    """Base of the spec dataclasses (subclasses are ``@dataclass(frozen=True)`` with a ``kind``)."""

    kind: ClassVar[str]
    family: ClassVar[str] = "spec"  # "pattern" or "order": the word error messages use
    joins: ClassVar[bool] = False  # a kind whose one field holds specs it joins (short form: a+b)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = _coerce(type(self), f.name, _field_types(type(self))[f.name], getattr(self, f.name))
            object.__setattr__(self, f.name, value)
        self.check()

    def check(self) -> None:
        """Constraints beyond the field types (ranges); raise :func:`invalid` errors."""

    def invalid(self, name: str, must: str, value) -> ValueError:
        return ValueError(f"{self.family} {self.kind!r}: {name!r} must be {must}, got {value!r}")

    def __str__(self) -> str:
        return format_spec(self)


def _field_types(cls) -> dict[str, Any]:
    hints = cls.__dict__.get("_hints")
    if hints is None:
        hints = typing.get_type_hints(cls)
        type.__setattr__(cls, "_hints", hints)
    return hints


def _optional(tp) -> tuple[Any, bool]:
    """``(inner type, optional?)`` of ``X | None``."""
    args = typing.get_args(tp)
    if (typing.get_origin(tp) in (typing.Union, types.UnionType)) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _coerce(cls, name: str, tp, value):
    """``value`` as field ``name`` of type ``tp`` holds it (lists to tuples, ints to floats), or a ValueError."""
    inner, optional = _optional(tp)
    what = f"{cls.family} {cls.kind!r}: {name!r}"
    if value is None:
        if optional:
            return None
        raise ValueError(f"{what} must not be null")
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{what} must be an int, got {value!r}")
        return int(value)
    if inner is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{what} must be a number, got {value!r}")
        return float(value)
    if typing.get_origin(inner) is tuple:
        item = typing.get_args(inner)[0]
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ValueError(f"{what} must be a list, got {value!r}")
        if item is int:
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
                raise ValueError(f"{what} must be a list of ints, got {value!r}")
            return tuple(int(x) for x in value)
        if not all(isinstance(x, item) for x in value):
            raise ValueError(f"{what} must be a list of {cls.family}s, got {value!r}")
        return tuple(value)
    raise AssertionError(f"{cls.__name__}.{name}: unsupported field type {tp!r}")


def _is_default(f: dataclasses.Field, value) -> bool:
    if f.default is not dataclasses.MISSING:
        return value == f.default
    if f.default_factory is not dataclasses.MISSING:
        return value == f.default_factory()
    return False


class SpecRegistry:
    """The kinds of one spec family, and their short forms and JSON (see the module docstring).

    Args:
        family: ``"pattern"`` or ``"order"`` (for messages).
        kinds: the spec classes.
        examples: short forms shown when a field is missing.
        none: a kind name that stands for None (the orders' ``"raster"``), or None.
        join: the kind that ``a+b`` forms, with one field holding the joined specs (the patterns' union).
    """

    def __init__(self, family: str, kinds: list[type[Spec]], examples: dict[str, str] | None = None,
                 none: str | None = None, join: type[Spec] | None = None):
        self.family = family
        self.kinds = {cls.kind: cls for cls in kinds}
        self.examples = examples or {}
        self.none = none
        self.join = join
        self.base = kinds[0].__mro__[1]  # the family's base class (PatternSpec / OrderSpec)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.kinds) + ((self.none,) if self.none else ())

    def parse(self, x) -> Spec | None:
        """A spec of this family from a spec, its short form, its JSON (a dict, or an object as text);
        None (and the ``none`` kind) where the family has one."""
        if isinstance(x, self.base):
            return x
        if x is None and self.none:
            return None
        if isinstance(x, str):
            return self._parse_text(x)
        if isinstance(x, dict):
            return self.from_json(x)
        null = "null, " if self.none else ""
        article = "an" if self.family[0] in "aeiou" else "a"
        raise ValueError(f"{article} {self.family} is {null}a string or a dict with a 'kind' (one of "
                         f"{', '.join(self.names)}), got {x!r}")

    def _parse_text(self, text: str):
        text = text.strip()
        if text.startswith("{"):
            try:
                doc = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.family} {text!r} is not valid JSON: {e}") from None
            return self.from_json(doc)
        if self.join is not None and "+" in text:
            parts = [t for t in text.split("+") if t.strip()]
            if len(parts) > 1:
                field = dataclasses.fields(self.join)[0].name
                return self.join(**{field: tuple(self._parse_text(t) for t in parts)})
            text = parts[0] if parts else ""
        if not text:
            raise ValueError(f"empty {self.family}")
        kind, _, args = text.partition(":")
        cls = self._kind(kind.strip())
        if cls is None:
            return None
        kwargs: dict[str, Any] = {}
        hints = _field_types(cls)
        for item in filter(None, (a.strip() for a in args.split(","))):
            name, eq, val = item.partition("=")
            name = name.strip()
            if not eq:
                raise ValueError(f"{self.family} {text!r}: expected name=value, got {item!r}")
            if name not in hints:
                raise self._unknown(cls, [name])
            inner, _ = _optional(hints[name])
            try:
                if inner is int:
                    kwargs[name] = int(val)
                elif inner is float:
                    kwargs[name] = float(val)
                elif typing.get_origin(inner) is tuple and typing.get_args(inner)[0] is int:
                    kwargs[name] = tuple(int(x) for x in val.split("|") if x.strip())
                else:
                    raise ValueError
            except ValueError:
                raise ValueError(f"{self.family} {text!r}: bad value for {name!r}: {val!r}") from None
        return self._make(cls, kwargs)

    def _kind(self, kind: str) -> type[Spec] | None:
        if self.none and kind == self.none:
            return None
        if kind not in self.kinds:
            raise ValueError(f"unknown {self.family} kind {kind!r}; known kinds: {', '.join(self.names)}")
        return self.kinds[kind]

    def _unknown(self, cls, names) -> ValueError:
        allowed = [f.name for f in dataclasses.fields(cls)]
        return ValueError(f"{self.family} {cls.kind!r} takes {allowed or 'no parameters'}, got unknown {sorted(names)}")

    def _make(self, cls, kwargs: dict):
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            example = self.examples.get(cls.kind, cls.kind)
            raise ValueError(f"{self.family} {cls.kind!r} needs parameter {missing[0]!r} (e.g. {example})")
        return cls(**kwargs)

    def from_json(self, doc: dict):
        """A spec from its JSON object (``{"kind": ..., ...}``; nested specs of a join kind too)."""
        if not isinstance(doc, dict) or "kind" not in doc:
            raise ValueError(f"the JSON of a {self.family} needs a 'kind' (one of {', '.join(self.names)}), got {doc!r}")
        cls = self._kind(doc["kind"])
        args = {k: v for k, v in doc.items() if k != "kind"}
        if cls is None:
            if args:
                raise ValueError(f"{self.family} {self.none!r} takes no parameters, got {sorted(args)}")
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        if set(args) - names:
            raise self._unknown(cls, set(args) - names)
        if cls is self.join:
            field = dataclasses.fields(cls)[0].name
            if isinstance(args.get(field), list):
                args[field] = [self.parse(x) for x in args[field]]
        return self._make(cls, args)

    def to_json(self, spec) -> dict | None:
        """The JSON object of a spec (None for the ``none`` kind)."""
        if spec is None:
            return None
        out: dict[str, Any] = {"kind": spec.kind}
        for f in dataclasses.fields(spec):
            value = getattr(spec, f.name)
            if _is_default(f, value):
                continue
            if isinstance(value, tuple):
                value = [self.to_json(x) if isinstance(x, Spec) else x for x in value]
            out[f.name] = value
        return out

    def format(self, spec) -> str:
        """The short form of a spec (the ``none`` kind's name for None)."""
        if spec is None:
            if not self.none:
                raise ValueError(f"None is not a {self.family}")
            return self.none
        return format_spec(spec)


def format_spec(spec: Spec) -> str:
    """The short form of any spec: ``kind`` or ``kind:name=value,...`` (fields at their default left out;
    a joined spec's parts with ``+``)."""
    fields = dataclasses.fields(spec)
    if spec.joins:
        return "+".join(format_spec(x) for x in getattr(spec, fields[0].name))
    args = []
    for f in fields:
        value = getattr(spec, f.name)
        if _is_default(f, value) or value is None:
            continue
        if isinstance(value, tuple):
            value = "|".join(str(x) for x in value)
        elif isinstance(value, float):
            value = int(value) if value.is_integer() else repr(value)
        args.append(f"{f.name}={value}")
    return spec.kind + (":" + ",".join(args) if args else "")
