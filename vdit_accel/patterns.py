"""The sparse-pattern library: small, resolution-independent descriptions that become block masks.

A pattern is a JSON-able dict with a ``kind`` and parameters in latent units (frames, rows,
columns of the patched grid), so that one strategy applies at any resolution:

=================  ==========================================  ================================================
kind               parameters                                  query token (t, y, x) attends key (t', y', x') iff
=================  ==========================================  ================================================
``dense``          —                                           always
``window1d``       ``frames`` (float > 0)                      ``|i - j| <= frames * h * w`` in raster order
                                                               (a diagonal band measured in frames' worth of tokens)
``window3d``       ``t``, ``h``, ``w`` (ints >= 0)             ``|t-t'| <= t and |y-y'| <= h and |x-x'| <= w``
``frame_periodic`` ``h``, ``w`` (ints >= 0), ``every`` (>= 1)  ``(t - t') % every == 0 and |y-y'| <= h and |x-x'| <= w``
                                                               (the same spatial neighbourhood in other frames)
``stripes``        ``frames`` (list of ints, negative from     ``t'`` is one of ``frames`` (global key columns)
                   the end), ``tokens`` (list of video token
                   indices, negative from the end)
``skip``           —                                           never: the head's video rows output zeros
``union``          ``of`` (list of patterns)                   any of them
=================  ==========================================  ================================================

Text tokens (joint attention) are always attended densely, rows and columns, whatever the pattern —
also under ``skip``, which silences only the video rows.

A block mask visits the (query block, key block) pair iff *some* token pair in it is allowed, so the
block mask is a superset of the token pattern at block granularity; the kernel then attends every
token pair of a visited block. Masks are built by dilating each query block's token set on the
(t, h, w) grid — cost O(Mb · S), once per (grid, pattern), never per call.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from .block_mask import BlockMask, cdiv
from .grid import VideoGrid

Pattern = dict[str, Any]

# kind -> {param: (type, default or REQUIRED)}
_REQUIRED = object()
_SCHEMA: dict[str, dict[str, tuple[type, Any]]] = {
    "dense": {},
    "skip": {},
    "window1d": {"frames": (float, _REQUIRED)},
    "window3d": {"t": (int, _REQUIRED), "h": (int, _REQUIRED), "w": (int, _REQUIRED)},
    "frame_periodic": {"h": (int, _REQUIRED), "w": (int, _REQUIRED), "every": (int, 1)},
    "stripes": {"frames": (list, []), "tokens": (list, [])},
    "union": {"of": (list, _REQUIRED)},
}
PATTERN_KINDS = tuple(_SCHEMA)


def validate_pattern(p: Any) -> Pattern:
    """Check a pattern against the allow-list and return it normalised (defaults filled, types fixed)."""
    if isinstance(p, str):
        return parse_pattern(p)
    if not isinstance(p, dict) or "kind" not in p:
        raise ValueError(f"a pattern is a dict with a 'kind' (one of {', '.join(PATTERN_KINDS)}), got {p!r}")
    kind = p["kind"]
    if kind not in _SCHEMA:
        raise ValueError(f"unknown pattern kind {kind!r}; known kinds: {', '.join(PATTERN_KINDS)}")
    schema = _SCHEMA[kind]
    extra = set(p) - set(schema) - {"kind"}
    if extra:
        raise ValueError(f"pattern {kind!r} takes {sorted(schema) or 'no parameters'}, got unknown {sorted(extra)}")
    out: Pattern = {"kind": kind}
    for name, (typ, default) in schema.items():
        if name not in p:
            if default is _REQUIRED:
                raise ValueError(f"pattern {kind!r} needs parameter {name!r} (e.g. {_example(kind)})")
            out[name] = list(default) if isinstance(default, list) else default
            continue
        val = p[name]
        if typ is int:
            if isinstance(val, bool) or not isinstance(val, int) or val < 0:
                raise ValueError(f"pattern {kind!r}: {name!r} must be an int >= 0, got {val!r}")
        elif typ is float:
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not val > 0:
                raise ValueError(f"pattern {kind!r}: {name!r} must be a number > 0, got {val!r}")
            val = float(val)
        elif typ is list and not isinstance(val, (list, tuple)):
            raise ValueError(f"pattern {kind!r}: {name!r} must be a list, got {val!r}")
        out[name] = val
    if kind == "frame_periodic" and out["every"] < 1:
        raise ValueError("pattern 'frame_periodic': 'every' must be >= 1")
    if kind == "stripes":
        for name in ("frames", "tokens"):
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in out[name]):
                raise ValueError(f"pattern 'stripes': {name!r} must be a list of ints, got {out[name]!r}")
            out[name] = [int(x) for x in out[name]]
    if kind == "union":
        if not out["of"]:
            raise ValueError("pattern 'union' needs a non-empty 'of' list")
        out["of"] = [validate_pattern(q) for q in out["of"]]
    return out


def _example(kind: str) -> str:
    return {
        "window1d": "window1d:frames=1.5",
        "window3d": "window3d:t=1,h=2,w=2",
        "frame_periodic": "frame_periodic:h=1,w=1,every=2",
        "union": "window3d:t=1,h=1,w=1+stripes:frames=0",
    }.get(kind, kind)


def parse_pattern(text: str) -> Pattern:
    """Parse the CLI short form: ``kind`` or ``kind:k=v,k=v``; ``+`` joins a union.

    Lists use ``|``: ``stripes:frames=0|-1``. Also accepts a JSON object.
    Examples: ``dense``, ``window3d:t=1,h=2,w=2``, ``window3d:t=1,h=1,w=1+stripes:frames=0``.
    """
    text = text.strip()
    if text.startswith("{"):
        try:
            return validate_pattern(json.loads(text))
        except json.JSONDecodeError as e:
            raise ValueError(f"pattern {text!r} is not valid JSON: {e}") from None
    parts = [t for t in text.split("+") if t.strip()]
    if not parts:
        raise ValueError("empty pattern")
    if len(parts) > 1:
        return validate_pattern({"kind": "union", "of": [parse_pattern(t) for t in parts]})
    kind, _, args = text.partition(":")
    p: dict[str, Any] = {"kind": kind.strip()}
    if kind.strip() in _SCHEMA:
        schema = _SCHEMA[kind.strip()]
        for item in filter(None, (a.strip() for a in args.split(","))):
            name, eq, val = item.partition("=")
            name = name.strip()
            if not eq:
                raise ValueError(f"pattern {text!r}: expected name=value, got {item!r}")
            typ = schema.get(name, (str, None))[0]
            try:
                if typ is list:
                    p[name] = [int(x) for x in val.split("|") if x.strip()]
                elif typ is int:
                    p[name] = int(val)
                elif typ is float:
                    p[name] = float(val)
                else:
                    p[name] = val
            except ValueError:
                raise ValueError(f"pattern {text!r}: bad value for {name!r}: {val!r}") from None
    return validate_pattern(p)


def format_pattern(p: Pattern) -> str:
    """Inverse of :func:`parse_pattern` (short, human-readable)."""
    if p["kind"] == "union":
        return "+".join(format_pattern(q) for q in p["of"])
    args = []
    for k, v in p.items():
        if k == "kind":
            continue
        if isinstance(v, list):
            if not v:
                continue
            v = "|".join(str(x) for x in v)
        elif isinstance(v, float) and v.is_integer():
            v = int(v)
        args.append(f"{k}={v}")
    return p["kind"] + (":" + ",".join(args) if args else "")


# ---------------------------------------------------------------------------------------------
# Pattern -> block mask
# ---------------------------------------------------------------------------------------------


def _dilate(x: torch.Tensor, dim: int, r: int) -> torch.Tensor:
    """Binary dilation of ``x`` (bool) by ``r`` along ``dim``: O(numel) through a cumulative sum."""
    n = x.shape[dim]
    r = min(r, n - 1)
    if r <= 0:
        return x
    c = torch.cumsum(x.to(torch.int32), dim)
    c = torch.cat([torch.zeros_like(c.narrow(dim, 0, 1)), c], dim)  # c[i] = sum of x[:i]
    hi = torch.arange(n, device=x.device).add(r + 1).clamp_max(n)
    lo = torch.arange(n, device=x.device).sub(r).clamp_min(0)
    return (c.index_select(dim, hi) - c.index_select(dim, lo)) > 0


def _video_reach(p: Pattern, grid: VideoGrid, q_onehot: torch.Tensor) -> torch.Tensor:
    """Which video keys some query of each group reaches.

    ``q_onehot``: float ``[G, T, H, W]`` — 1 where the group (a query block) has a video token.
    Returns bool ``[G, T, H, W]`` over the keys.
    """
    g, t, h, w = q_onehot.shape
    kind = p["kind"]
    if kind == "dense":
        any_q = q_onehot.flatten(1).amax(1) > 0
        return any_q.view(g, 1, 1, 1).expand(g, t, h, w).clone()
    if kind == "skip":
        return torch.zeros(g, t, h, w, dtype=torch.bool, device=q_onehot.device)
    if kind == "union":
        out = torch.zeros(g, t, h, w, dtype=torch.bool, device=q_onehot.device)
        for sub in p["of"]:
            out |= _video_reach(sub, grid, q_onehot)
        return out
    if kind == "window3d":
        x = q_onehot > 0
        for dim, r in ((1, p["t"]), (2, p["h"]), (3, p["w"])):
            x = _dilate(x, dim, r)
        return x
    if kind == "frame_periodic":
        x = _dilate(_dilate(q_onehot > 0, 2, p["h"]), 3, p["w"])
        every = p["every"]
        # Frames grouped by residue mod `every`: key frame t' is reached if any query frame t with
        # t = t' (mod every) reaches (y', x').
        pad = cdiv(t, every) * every - t
        x = torch.cat([x, x.new_zeros(g, pad, h, w)], 1)
        xr = x.view(g, -1, every, h, w).any(1)  # [G, every, H, W]
        return xr.repeat(1, cdiv(t, every), 1, 1)[:, :t]
    if kind == "window1d":
        flat = q_onehot.reshape(g, -1)
        radius = int(round(p["frames"] * h * w))
        pos = torch.arange(flat.shape[1], device=flat.device)
        big = flat.shape[1] + radius + 1
        lo = torch.where(flat > 0, pos, big).amin(1)
        hi = torch.where(flat > 0, pos, -big).amax(1)
        reach = (pos >= (lo - radius).unsqueeze(1)) & (pos <= (hi + radius).unsqueeze(1))
        return reach.view(g, t, h, w)
    if kind == "stripes":
        any_q = (q_onehot.flatten(1).amax(1) > 0).view(g, 1)
        cols = torch.zeros(t * h * w, dtype=torch.bool, device=q_onehot.device)
        for f in p["frames"]:
            if -t <= f < t:
                cols.view(t, h * w)[f] = True
        for i in p["tokens"]:
            if -cols.numel() <= i < cols.numel():
                cols[i] = True
        return (any_q & cols.view(1, -1)).view(g, t, h, w)
    raise AssertionError(f"unvalidated pattern kind {kind!r}")


def build_block_mask_for_pattern(
    p: Pattern, grid: VideoGrid, block_m: int = 128, block_n: int = 128, device=None
) -> torch.Tensor:
    """Bool ``[Mb, Nb]`` block-level mask of one pattern on one grid (raster token order)."""
    p = validate_pattern(p)
    s = grid.seq_len
    mb, nb = cdiv(s, block_m), cdiv(s, block_n)
    vs, vl = grid.video_start, grid.video_len
    t, h, w = grid.t, grid.h, grid.w
    q_block_of_video = torch.arange(vs, vs + vl, device=device) // block_m
    mask = torch.zeros(mb, nb, dtype=torch.bool, device=device)
    # Query blocks in chunks, so that the [chunk, S] one-hots stay small at 100k+ tokens.
    chunk = max(1, (1 << 24) // max(s, 1))
    for m0 in range(0, mb, chunk):
        m1 = min(mb, m0 + chunk)
        idx = torch.nonzero((q_block_of_video >= m0) & (q_block_of_video < m1)).squeeze(1)
        if idx.numel() == 0:
            continue
        q_onehot = torch.zeros(m1 - m0, vl, device=device)
        q_onehot[q_block_of_video[idx] - m0, idx] = 1.0
        reach = _video_reach(p, grid, q_onehot.view(m1 - m0, t, h, w)).reshape(m1 - m0, vl)
        row = torch.zeros(m1 - m0, nb * block_n, dtype=torch.bool, device=device)
        row[:, vs : vs + vl] = reach
        mask[m0:m1] = row.view(m1 - m0, nb, block_n).any(-1)
    if grid.text_len:
        text = torch.arange(grid.text_start, grid.text_start + grid.text_len, device=device)
        mask[text // block_m, :] = True  # text rows attend everything
        mask[:, text // block_n] = True  # every row attends the text columns
    return mask


_CACHE: dict[tuple, BlockMask] = {}
_CACHE_MAX = 64


def build_block_mask(
    patterns: list[Pattern], grid: VideoGrid, block_m: int = 128, block_n: int = 128, device=None
) -> BlockMask:
    """One :class:`BlockMask` for a layer: ``patterns[h]`` is head h's pattern (batch dim 1).

    Cached per (patterns, grid, blocks, device): heads that share a pattern share the work.
    """
    key = (json.dumps(patterns, sort_keys=True), grid, block_m, block_n, str(device))
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    per_pattern: dict[str, torch.Tensor] = {}
    rows = []
    for p in patterns:
        pk = json.dumps(p, sort_keys=True)
        if pk not in per_pattern:
            per_pattern[pk] = build_block_mask_for_pattern(p, grid, block_m, block_n, device)
        rows.append(per_pattern[pk])
    bm = BlockMask.from_dense(torch.stack(rows).unsqueeze(0), grid.seq_len, block_m, block_n)
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = bm
    return bm


def token_pattern_mask(p: Pattern, grid: VideoGrid) -> torch.Tensor:
    """Bool ``[S, S]``: the token-level pattern itself (for tests and small grids only)."""
    p = validate_pattern(p)
    vl = grid.video_len
    eye = torch.eye(vl).view(vl, grid.t, grid.h, grid.w)
    reach = _video_reach(p, grid, eye).reshape(vl, vl)
    s = grid.seq_len
    out = torch.zeros(s, s, dtype=torch.bool)
    vs = grid.video_start
    out[vs : vs + vl, vs : vs + vl] = reach
    if grid.text_len:
        ts = grid.text_start
        out[ts : ts + grid.text_len, :] = True
        out[:, ts : ts + grid.text_len] = True
    return out
