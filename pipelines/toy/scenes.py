"""Procedural toy videos with captions: the data of the toy testbed.

The data of the trained tiny Wan models (:mod:`.trained`, trained by :mod:`.train`): one or
two flat-coloured objects (:data:`SHAPES` in :data:`COLOURS`) moving in one of eight
:data:`DIRECTIONS` across a dark, a tinted or a drifting striped background, captioned from a small
vocabulary::

    a red circle moving left
    a cyan diamond moving up-right quickly on a drifting background
    a yellow square bouncing right slowly on a blue background
    a green triangle moving down and a magenta circle moving left

A scene (:class:`ToyScene`) is resolution-free: positions and motion are fractions of the frame's
width and height over the whole clip (first frame t=0, last frame t=1), object sizes are fractions of
the shorter side. :func:`render` draws any number of frames at any size, batched, on any torch device
(the training renders on the GPU). Same seed, same scenes (:func:`sample_scenes`).

Backgrounds stay dark or muted and objects fully saturated and bright, so that :func:`.check.check_video`
can read a generated video back against its caption.

Rich scenes (:func:`sample_rich_scenes`, the data of the testbed ``"wan-rich"``): up to three objects that
cross and hide each other, loop out of the frame and back in (``"looping"``) and pass behind grey
pillars, over textured backgrounds (value noise: no two places alike) under a panning camera, so that
attention has reasons to be local (where a texture patch was a frame ago) and long-range (an object
that left and comes back); captioned in the same grammar plus ``", camera panning left"`` and
``", behind two grey pillars"``, and checked the same way plus the camera's pan. :func:`rich_check_scenes` / :func:`rich_validation_scenes` are their check
and validation sets (the same held-out combinations).

Held out from training (:func:`is_held_out`): 24 of the 192 (colour, shape, direction) combinations,
at least one per colour and per direction; :func:`check_scenes` builds the check captions from 20 of
them, :func:`validation_scenes` (for choosing sampling settings) from the other 4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

# Hue in degrees of each object colour; objects are drawn fully saturated and bright.
COLOURS: dict[str, float] = {"red": 0.0, "yellow": 60.0, "green": 120.0, "cyan": 180.0, "blue": 240.0,
                             "magenta": 300.0}
SHAPES = ("circle", "square", "triangle", "diamond")
# Unit direction in image coordinates (x to the right, y down), counter-clockwise from "right".
DIRECTIONS: dict[str, tuple[float, float]] = {
    name: (round(math.cos(math.radians(a)), 6), round(-math.sin(math.radians(a)), 6))
    for name, a in (("right", 0), ("up-right", 45), ("up", 90), ("up-left", 135), ("left", 180),
                    ("down-left", 225), ("down", 270), ("down-right", 315))
}
# Distance travelled from the first to the last frame, as a fraction of the frame, per speed word.
SPEEDS: dict[str, float] = {"slowly": 0.25, "": 0.4, "quickly": 0.55}
# "dark" has no caption phrase; a colour name is a muted tint of that hue; "drifting" is grey stripes
# that translate over the clip.
BACKGROUNDS = ("dark", "drifting", *COLOURS)
RICH_BACKGROUNDS = ("textured", *BACKGROUNDS)
KINDS = ("single", "bouncing", "two")
# Captions are at most this many bytes (the longest is 104); the byte-level tokenizer adds one end token.
MAX_CAPTION_BYTES = 127
# ... and rich scenes' (up to three objects, a camera and pillars) at most this many.
MAX_RICH_CAPTION_BYTES = 255

# Saturation and value of a muted background tint (objects: 1 and 1). The checker's pixel thresholds
# sit between the two.
_BG_SATURATION, _BG_VALUE = 0.4, 0.3
_OBJ_MIN_SATURATION, _OBJ_MIN_VALUE = 0.6, 0.5
_HUE_TOLERANCE = 30.0  # degrees: half the distance between neighbouring colours
_MIN_DISPLACEMENT = 0.08  # fraction of the frame: below this a video has no direction
_BOUNCE_HOPS = 2
_LOOP_EXTRA = 0.45  # a looping object travels this much more than its speed word says (fraction of the frame)
# Rich scenes: camera pans along one axis; the background texture and the pillars are fixed in the world.
PAN_DIRECTIONS = ("left", "right", "up", "down")
# Texture and blob values stay at or under this (objects' value is 1, the checker's floor 0.5).
_TEX_MAX_VALUE = 0.45
_TEX_MAX_SATURATION = 0.45
_PILLAR_WORDS = {1: "a grey pillar", 2: "two grey pillars"}
# The world box (shorter-side units, (u0, v0, u1, v1)) a texture's value noise is defined on: a 16:9 frame
# and a pan of half the frame fit; beyond it the noise repeats its border.
_NOISE_BOX = (-0.5, -0.5, 3.0, 2.0)


@dataclass(frozen=True)
class ToyObject:
    """One moving object. ``x0, y0``: centre in the first frame (fractions of width and height);
    ``size``: half-extent as a fraction of the shorter side; ``hop``: bounce height (fraction of the
    height) when ``bouncing``, the object then hops :data:`_BOUNCE_HOPS` times along its way.
    ``looping``: the object travels :data:`_LOOP_EXTRA` more and wraps around the frame: it leaves at
    one edge and comes back in at the opposite one (positions are then taken modulo the frame plus
    the object's size)."""

    colour: str
    shape: str
    direction: str
    speed: str = ""
    bouncing: bool = False
    x0: float = 0.5
    y0: float = 0.5
    size: float = 0.11
    hop: float = 0.0
    looping: bool = False

    def __post_init__(self):
        if self.bouncing and self.looping:
            raise ValueError("an object is bouncing or looping, not both")

    @property
    def verb(self) -> str:
        return "bouncing" if self.bouncing else "looping" if self.looping else "moving"

    def phrase(self) -> str:
        return f"a {self.colour} {self.shape} {self.verb} {self.direction}" + (f" {self.speed}" if self.speed else "")

    def displacement(self) -> tuple[float, float]:
        """(dx, dy) from the first to the last frame, in fractions of width and height (before a
        looping object's wrap-around)."""
        ux, uy = DIRECTIONS[self.direction]
        travel = SPEEDS[self.speed] + (_LOOP_EXTRA if self.looping else 0.0)
        return travel * ux, travel * uy


@dataclass(frozen=True)
class ToyScene:
    """Objects over a background. ``bg_level``: grey level of a dark background (0-1);
    ``bg_angle``, ``bg_period``, ``bg_drift``: stripe normal (radians), period and travel over the clip
    (fractions of the shorter side) of a drifting one.

    Rich scenes (:func:`sample_rich_scene`) add, all fixed in the world and so moving with the camera:
    ``texture``, a ``"textured"`` background's waves ``(fx, fy, phase, amplitude)`` (cycles per shorter
    side) and ``noise``, octaves of value noise ``(seed, spacing, amplitude)`` (random values on a lattice
    of that spacing, in shorter-side units, over the world box :data:`_NOISE_BOX`, interpolated
    bicubically), around ``tex_level``, tinted ``tex_hue`` / ``tex_sat``; ``blobs``, soft discs
    ``(u, v, radius, value, hue, saturation)`` on it (shorter-side units); ``pillars``, grey vertical
    bars ``(x, half_width, grey)`` (fractions of the width) drawn in front of the objects, which pass
    behind them. ``camera`` (one of :data:`PAN_DIRECTIONS` or "") pans ``pan`` of the frame over the
    clip: the world slides the other way on screen. Objects' positions and directions are on screen
    (what the caption says and the checker reads). Textures and blobs stay muted and dark enough
    never to count as object pixels."""

    objects: tuple[ToyObject, ...]
    background: str = "dark"
    bg_level: float = 0.1
    bg_angle: float = 0.0
    bg_period: float = 0.25
    bg_drift: float = 0.2
    texture: tuple[tuple[float, float, float, float], ...] = ()
    noise: tuple[tuple[int, float, float], ...] = ()
    tex_level: float = 0.22
    tex_hue: float = 0.0
    tex_sat: float = 0.0
    blobs: tuple[tuple[float, float, float, float, float, float], ...] = ()
    pillars: tuple[tuple[float, float, float], ...] = ()
    camera: str = ""
    pan: float = 0.0

    def __post_init__(self):
        if (self.background == "textured") != bool(self.texture or self.noise):
            raise ValueError("a 'textured' background needs texture waves or noise, and only it has them")
        if self.camera not in ("", *PAN_DIRECTIONS) or (self.camera == "") != (self.pan == 0.0):
            raise ValueError(f"camera must be one of {PAN_DIRECTIONS} with pan > 0, or '' with pan 0; "
                             f"got {self.camera!r}, {self.pan}")
        if len(self.pillars) not in (0, *_PILLAR_WORDS):
            raise ValueError(f"at most {max(_PILLAR_WORDS)} pillars, got {len(self.pillars)}")

    @property
    def caption(self) -> str:
        text = " and ".join(o.phrase() for o in self.objects)
        if self.background != "dark":
            text += f" on a {self.background} background"
        if self.camera:
            text += f", camera panning {self.camera}"
        if self.pillars:
            text += f", behind {_PILLAR_WORDS[len(self.pillars)]}"
        return text

    def camera_offset(self) -> tuple[float, float]:
        """(dx, dy) the camera moves from the first to the last frame, fractions of width and height."""
        if not self.camera:
            return 0.0, 0.0
        ux, uy = DIRECTIONS[self.camera]
        return self.pan * ux, self.pan * uy


def is_held_out(colour: str, shape: str, direction: str) -> bool:
    """Whether (colour, shape, direction) is one of the 24 combinations never shown in training: for
    each (colour, shape) exactly one direction, chosen so that every colour and every direction occurs."""
    c, s, d = list(COLOURS).index(colour), SHAPES.index(shape), list(DIRECTIONS).index(direction)
    return (c + 2 * s + 3 * d) % 8 == 0


def held_out_combinations() -> list[tuple[str, str, str]]:
    return [(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS if is_held_out(c, s, d)]


def _place(rng: np.random.Generator, size: float, dx: float, dy: float, hop: float) -> tuple[float, float]:
    """A start point from which the whole path (and its hops) stays inside the frame."""
    m = size + 0.03
    (x0, x1), (y0, y1) = (m - min(0.0, dx), 1.0 - m - max(0.0, dx)), (m + hop - min(0.0, dy), 1.0 - m - max(0.0, dy))
    assert x0 <= x1 and y0 <= y1, "the object's path does not fit the frame"
    return float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1))


def _sample_object(rng, colour, shape, direction, speed, bouncing, size) -> ToyObject:
    hop = float(rng.uniform(0.15, 0.25)) if bouncing else 0.0
    dx, dy = ToyObject(colour, shape, direction, speed).displacement()
    x0, y0 = _place(rng, size, dx, dy, hop)
    return ToyObject(colour, shape, direction, speed, bouncing, x0, y0, size, hop)


def _background(rng: np.random.Generator, name: str) -> dict:
    return dict(background=name, bg_level=float(rng.uniform(0.05, 0.18)), bg_angle=float(rng.uniform(0, 2 * math.pi)),
                bg_period=float(rng.uniform(0.18, 0.35)), bg_drift=float(rng.uniform(0.15, 0.3) * rng.choice([-1, 1])))


def sample_scene(rng: np.random.Generator, split: str = "train", kind: str | None = None) -> ToyScene:
    """One random scene. ``split``: ``"train"`` never uses a held-out (colour, shape, direction)
    combination (:func:`is_held_out`), ``"held_out"`` uses only those, ``"any"`` either. ``kind``:
    ``"single"``, ``"bouncing"`` (left or right, hopping), ``"two"`` (two objects of different colours),
    or None for a mix (60/15/25%)."""
    if split not in ("train", "held_out", "any"):
        raise ValueError(f"split must be 'train', 'held_out' or 'any', got {split!r}")
    if kind is None:
        kind = KINDS[int(rng.choice(3, p=[0.6, 0.15, 0.25]))]
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")
    directions = ("left", "right") if kind == "bouncing" else tuple(DIRECTIONS)
    combos = [(c, s, d) for c in COLOURS for s in SHAPES for d in directions
              if split == "any" or is_held_out(c, s, d) == (split == "held_out")]
    speeds = tuple(SPEEDS)
    if kind == "two":
        first = combos[int(rng.integers(len(combos)))]
        second = [t for t in combos if t[0] != first[0]]
        second = second[int(rng.integers(len(second)))]
        objects = tuple(_sample_object(rng, *t, "", False, float(rng.uniform(0.07, 0.1))) for t in (first, second))
        return ToyScene(objects, **_background(rng, "dark" if rng.random() < 0.6 else "drifting"))
    colour, shape, direction = combos[int(rng.integers(len(combos)))]
    obj = _sample_object(rng, colour, shape, direction, speeds[int(rng.integers(3))], kind == "bouncing",
                         float(rng.uniform(0.09, 0.13)))
    bgs = [b for b in BACKGROUNDS if b != colour]
    bg = bgs[int(rng.integers(len(bgs)))] if rng.random() < 0.6 else "dark"
    return ToyScene((obj,), **_background(rng, bg))


def sample_scenes(n: int, seed: int, split: str = "train", kind: str | None = None) -> list[ToyScene]:
    """``n`` scenes, deterministic in ``seed`` (NumPy's PCG64)."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, split, kind) for _ in range(n)]


def sample_busy_scenes(n: int, seed: int, max_objects: int = 5) -> list[ToyScene]:
    """``n`` scenes of 1 to ``max_objects`` objects of any colour, shape, direction and speed, sizes 0.05
    to 0.2: the VAE's training data. Not captioned data (held-out combinations occur), but far more
    object pixels per clip than :func:`sample_scene`'s, which is what an autoencoder learns slowly."""
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(n):
        objects = []
        for _ in range(int(rng.integers(1, max_objects + 1))):
            bouncing = rng.random() < 0.2
            direction = str(rng.choice(["left", "right"] if bouncing else list(DIRECTIONS)))
            speed = str(rng.choice(list(SPEEDS)))
            travel = max(abs(v) for v in ToyObject("red", "circle", direction, speed).displacement()) + 0.25 * bouncing
            size = min(float(rng.uniform(0.05, 0.2)), (1.0 - travel) / 2 - 0.04)  # the path must fit the frame
            objects.append(_sample_object(rng, str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)), direction,
                                          speed, bouncing, size))
        scenes.append(ToyScene(tuple(objects), **_background(rng, str(rng.choice(BACKGROUNDS)))))
    return scenes


def check_scenes(seed: int = 8) -> tuple[list[ToyScene], list[ToyScene]]:
    """The check set: 20 single-object scenes, one per held-out combination (the first 20 of 24 in
    shape-major order, so every colour is there), with
    speeds, backgrounds and bouncing (for left/right) varied; and 4 two-object scenes, each pairing two
    held-out combinations of different colours. Their captions are what ``check_trained.py`` prompts."""
    rng = np.random.default_rng(seed)
    combos = _held_out_in_check_order()
    singles = []
    for i, (c, s, d) in enumerate(combos[:20]):
        bouncing = d in ("left", "right") and i % 2 == 0
        speed = ("", "slowly", "quickly")[i % 3]
        obj = _sample_object(rng, c, s, d, speed, bouncing, 0.11)
        bg = ("dark", "drifting", ("blue" if c != "blue" else "red"))[i % 3]
        singles.append(ToyScene((obj,), **_background(rng, bg)))
    twos = []
    for i in range(4):
        a = combos[20 + i]
        b = next(t for t in combos[i * 5:] if t[0] != a[0])
        objs = tuple(_sample_object(rng, *t, "", False, 0.085) for t in (a, b))
        twos.append(ToyScene(objs, **_background(rng, "dark")))
    return singles, twos


def _held_out_in_check_order() -> list[tuple[str, str, str]]:
    """The 24 held-out combinations, shape-major then colour: :func:`check_scenes` takes the first 20."""
    return sorted(held_out_combinations(), key=lambda t: (SHAPES.index(t[1]), list(COLOURS).index(t[0])))


def validation_scenes(n: int = 20, seed: int = 9) -> list[ToyScene]:
    """The validation set: ``n`` single-object scenes from the 4 held-out combinations that
    :func:`check_scenes`' 20 single-object scenes leave out (green, cyan, blue and magenta diamonds,
    moving right, down-left, up and down-right), so they share no (colour, shape, direction) with them.

    Sampling settings (guidance scale, steps, scheduler shift) are chosen on this set, never on the
    check's captions, so the check's agreement stays an unbiased held-out number. Like the check, these
    combinations never occurred in training. (The check's four two-object scenes, which are reported
    apart and are not the criterion, do use these combinations.) Scene ``i`` is combination ``i % 4``;
    over the repeats the speed, the background (dark, drifting, a random tint) and, for "right",
    bouncing vary, so 20 scenes have 20 different captions. Deterministic in ``seed`` (object
    placement, tint, background parameters)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    combos = _held_out_in_check_order()[20:]
    scenes = []
    for i in range(n):
        (c, s, d), k = combos[i % len(combos)], i // len(combos)
        speed = ("", "slowly", "quickly")[(i + k) % 3]
        bouncing = d in ("left", "right") and k % 2 == 0
        obj = _sample_object(rng, c, s, d, speed, bouncing, 0.11)
        tints = [b for b in COLOURS if b != c]
        bg = ("dark", "drifting", tints[int(rng.integers(len(tints)))])[(k + k // 3) % 3]
        scenes.append(ToyScene((obj,), **_background(rng, bg)))
    return scenes


# ---------------------------------------------------------------------------------------------------
# Rich scenes: the data of the testbed model "wan-rich"


def _rich_background(rng: np.random.Generator, name: str, taken_hues: set[str]) -> dict:
    """A background's parameters. ``"textured"``: two octaves of value noise (lattice spacings 0.05-0.07
    and 0.025-0.035 of the shorter side: features of 1-2 tokens at 8 pixels a token at 256 pixels, and no
    two places alike, so a denoiser learns what is at a place only by looking there, in this frame or
    where the camera's pan moved it from), 2-3 broad waves of 1-3 cycles per shorter side, and 3-7 soft
    blobs; muted, in a random tint."""
    out = _background(rng, name)
    if name != "textured":
        return out
    waves = []
    for _ in range(int(rng.integers(2, 4))):
        f, a = float(rng.uniform(1.0, 3.0)), float(rng.uniform(0, 2 * math.pi))
        waves.append((round(f * math.cos(a), 4), round(f * math.sin(a), 4), round(float(rng.uniform(0, 2 * math.pi)), 4),
                      round(float(rng.uniform(0.02, 0.04)), 4)))
    noise = ((int(rng.integers(2**31)), round(float(rng.uniform(0.05, 0.07)), 4), round(float(rng.uniform(0.07, 0.1)), 4)),
             (int(rng.integers(2**31)), round(float(rng.uniform(0.025, 0.035)), 4), round(float(rng.uniform(0.04, 0.07)), 4)))
    blobs = []
    for _ in range(int(rng.integers(3, 8))):
        blobs.append(tuple(round(float(v), 4) for v in (
            rng.uniform(-0.1, 1.1), rng.uniform(-0.1, 1.1), rng.uniform(0.04, 0.12), rng.uniform(0.05, _TEX_MAX_VALUE),
            rng.uniform(0, 360), rng.uniform(0, _TEX_MAX_SATURATION))))
    return dict(out, texture=tuple(waves), noise=noise, tex_level=round(float(rng.uniform(0.16, 0.26)), 4),
                tex_hue=round(float(rng.uniform(0, 360)), 2), tex_sat=round(float(rng.uniform(0.1, 0.4)), 4),
                blobs=tuple(blobs))


def _with_camera(bg: dict, rng: np.random.Generator, camera: str) -> dict:
    """Blobs placed over the whole stretch of world the camera's pan shows."""
    if not camera:
        return bg
    pan = round(float(rng.uniform(0.15, 0.4)), 4)
    ux, uy = DIRECTIONS[camera]
    blobs = tuple((round(bx + pan * ux * float(rng.random()), 4), round(by + pan * uy * float(rng.random()), 4), *rest)
                  for bx, by, *rest in bg.get("blobs", ()))
    return dict(bg, camera=camera, pan=pan, blobs=blobs)


def _pillars(rng: np.random.Generator, n: int, camera_dx: float) -> tuple:
    """``n`` grey vertical bars, fixed in the world, on screen at mid-clip."""
    xs = sorted(float(rng.uniform(0.12, 0.88)) for _ in range(n))
    if n == 2 and xs[1] - xs[0] < 0.25:  # two distinct bars
        xs = [max(0.12, xs[0] - 0.13), min(0.88, xs[1] + 0.13)]
    return tuple((round(x + 0.5 * camera_dx, 4), round(float(rng.uniform(0.03, 0.06)), 4),
                  round(float(rng.uniform(0.3, 0.5)), 3)) for x in xs)


def _rich_object(rng, colour: str, shape: str, direction: str, size: float, verb: str | None = None,
                 speed: str | None = None) -> ToyObject:
    if verb is None:
        p = [0.6, 0.15, 0.25] if direction in ("left", "right") else [0.72, 0.0, 0.28]
        verb = ("moving", "bouncing", "looping")[int(rng.choice(3, p=p))]
    if speed is None:
        speed = tuple(SPEEDS)[int(rng.integers(3))]
    if verb == "looping":  # anywhere: it wraps around
        return ToyObject(colour, shape, direction, speed, x0=round(float(rng.uniform(0.05, 0.95)), 4),
                         y0=round(float(rng.uniform(0.1, 0.9)), 4), size=size, looping=True)
    return _sample_object(rng, colour, shape, direction, speed, verb == "bouncing", size)


def sample_rich_scene(rng: np.random.Generator, split: str = "train") -> ToyScene:
    """One random rich scene: 1-3 objects of different colours (40/35/25%), each moving, bouncing (left or
    right) or looping (wrapping around the frame), over a textured background (55%; a pan of the camera
    in 55% of those), a dark, tinted or drifting one; grey pillars in front in 30% of the scenes (not on
    drifting ones). Objects cross and hide each other (drawn in order) and pass behind pillars.
    ``split`` as in :func:`sample_scene` (every object's combination)."""
    if split not in ("train", "held_out", "any"):
        raise ValueError(f"split must be 'train', 'held_out' or 'any', got {split!r}")
    combos = [(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS
              if split == "any" or is_held_out(c, s, d) == (split == "held_out")]
    n = int(rng.choice(3, p=[0.4, 0.35, 0.25])) + 1
    picked: list[tuple[str, str, str]] = []
    while len(picked) < n:
        c = combos[int(rng.integers(len(combos)))]
        if all(c[0] != p[0] for p in picked):
            picked.append(c)
    lo, hi = (0.08, 0.13) if n == 1 else (0.06, 0.1)
    objects = tuple(_rich_object(rng, *c, round(float(rng.uniform(lo, hi)), 4)) for c in picked)
    colours = {o.colour for o in objects}
    tints = [b for b in COLOURS if b not in colours]
    kind = int(rng.choice(4, p=[0.55, 0.12, 0.11, 0.22]))
    name = ("textured", "dark", "drifting", tints[int(rng.integers(len(tints)))])[kind]
    bg = _rich_background(rng, name, colours)
    if name == "textured" and rng.random() < 0.55:
        bg = _with_camera(bg, rng, PAN_DIRECTIONS[int(rng.integers(4))])
    if name != "drifting" and rng.random() < 0.3:
        bg["pillars"] = _pillars(rng, int(rng.integers(1, 3)), DIRECTIONS[bg["camera"]][0] * bg["pan"] if bg.get("camera") else 0.0)
    return ToyScene(objects, **bg)


def sample_rich_scenes(n: int, seed: int, split: str = "train") -> list[ToyScene]:
    """``n`` rich scenes, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    return [sample_rich_scene(rng, split) for _ in range(n)]


def _rich_context(rng: np.random.Generator, i: int, colour: str, direction: str) -> tuple[str, str, dict]:
    """(verb, speed, background) of the ``i``-th single-object scene of the rich check or validation set:
    five contexts in turn -- textured; textured with a pan; textured with a pan and a pillar; a tint with
    two pillars; drifting -- bouncing on half the left/right scenes, looping on 40% of the others."""
    context = i % 5
    bounce = direction in ("left", "right") and rng.random() < 0.5
    verb = "bouncing" if bounce else "looping" if rng.random() < 0.4 else "moving"
    speed = ("", "slowly", "quickly")[i % 3]
    tints = [b for b in COLOURS if b != colour]
    name = ("textured", "textured", "textured", tints[int(rng.integers(len(tints)))], "drifting")[context]
    bg = _rich_background(rng, name, {colour})
    if context in (1, 2):
        bg = _with_camera(bg, rng, PAN_DIRECTIONS[(i // 5 + context) % 4])
    if context in (2, 3):
        bg["pillars"] = _pillars(rng, context - 1, DIRECTIONS[bg["camera"]][0] * bg["pan"] if bg.get("camera") else 0.0)
    return verb, speed, bg


def rich_check_scenes(seed: int = 18) -> tuple[list[ToyScene], list[ToyScene]]:
    """The rich check set: 20 single-object scenes, one per held-out combination (those of
    :func:`check_scenes`), in the five contexts of :func:`_rich_context` in turn (8 with a camera pan, 8 with
    pillars); and 4 scenes of two held-out objects on a panned textured background.
    The criterion is on the 20; the pairs are reported apart."""
    rng = np.random.default_rng(seed)
    combos = _held_out_in_check_order()
    singles = []
    for i, (c, s, d) in enumerate(combos[:20]):
        verb, speed, bg = _rich_context(rng, i, c, d)
        singles.append(ToyScene((_rich_object(rng, c, s, d, 0.11, verb, speed),), **bg))
    twos = []
    for i in range(4):
        a = combos[20 + i]
        b = next(t for t in combos[i * 5:] if t[0] != a[0])
        objs = tuple(_rich_object(rng, *t, 0.085, "moving", "") for t in (a, b))
        bg = _with_camera(_rich_background(rng, "textured", {a[0], b[0]}), rng, PAN_DIRECTIONS[i])
        twos.append(ToyScene(objs, **bg))
    return singles, twos


def rich_validation_scenes(n: int = 20, seed: int = 19) -> list[ToyScene]:
    """The rich validation set, for choosing sampling settings: ``n`` single-object scenes from the 4
    held-out combinations the check's 20 leave out (as :func:`validation_scenes`), in the contexts of
    :func:`_rich_context` (5 contexts against 4 combinations: 20 different pairs)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    combos = _held_out_in_check_order()[20:]
    scenes = []
    for i in range(n):
        (c, s, d) = combos[i % len(combos)]
        verb, speed, bg = _rich_context(rng, i, c, d)
        scenes.append(ToyScene((_rich_object(rng, c, s, d, 0.11, verb, speed),), **bg))
    return scenes


# ---------------------------------------------------------------------------------------------------
# Rendering (torch, batched over scenes)


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    k = [(n + h / 60.0) % 6 for n in (5, 3, 1)]
    return tuple(v - v * s * max(0.0, min(kk, 4 - kk, 1.0)) for kk in k)


def _object_sdf(shape: str, px: torch.Tensor, py: torch.Tensor, r: float) -> torch.Tensor:
    """Signed distance (in the units of ``px``, ``py``: offsets from the centre) to a shape of
    half-extent ``r``, negative inside; shapes of about equal area."""
    if shape == "circle":
        return torch.sqrt(px * px + py * py) - r
    if shape == "square":
        return torch.maximum(px.abs(), py.abs()) - 0.886 * r
    if shape == "diamond":
        return (px.abs() + py.abs() - 1.253 * r) * (1 / math.sqrt(2))
    if shape == "triangle":  # equilateral, pointing up, centred on its centroid: max of 3 half-planes
        a = 0.778 * r  # inradius
        n = [(0.0, 1.0), (math.sqrt(3) / 2, -0.5), (-math.sqrt(3) / 2, -0.5)]
        return torch.stack([nx * px + ny * py for nx, ny in n]).amax(0) - a
    raise ValueError(f"unknown shape {shape!r}; one of {SHAPES}")


def _pure_rgb(hue: float) -> tuple[float, float, float]:
    return _hsv_to_rgb(hue % 360.0, 1.0, 1.0)


def _tint(value: torch.Tensor, hue: float, sat: float) -> torch.Tensor:
    """RGB ``[3, ...]`` of the HSV colour (hue, sat, value) for a tensor of values: linear in the value."""
    w = [(1.0 - sat) + sat * c for c in _pure_rgb(hue)]
    return torch.stack([value * c for c in w])


def _textured(scene: ToyScene, t: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, width: int, height: int,
              unit: int) -> torch.Tensor:
    """A textured background ``[3, F, H, W]``: the scene's waves and blobs in world coordinates (screen
    plus the camera's offset at each frame), muted and never brighter than :data:`_TEX_MAX_VALUE`."""
    cdx, cdy = scene.camera_offset()
    wx = (X / width + cdx * t.view(-1, 1, 1))  # world x, fraction of the width   [F, 1, W]
    wy = (Y / height + cdy * t.view(-1, 1, 1))  # world y, fraction of the height  [F, H, 1]
    u, v = wx * (width / unit), wy * (height / unit)  # shorter-side units
    value = torch.full((t.numel(), height, width), scene.tex_level, device=t.device)
    for fx, fy, phase, amp in scene.texture:
        value = value + amp * torch.sin(2 * math.pi * (fx * u + fy * v) + phase)
    if scene.noise:
        u0, v0, u1, v1 = _NOISE_BOX
        grid = torch.stack([(u.expand_as(value) - u0) / (u1 - u0) * 2 - 1, (v.expand_as(value) - v0) / (v1 - v0) * 2 - 1], -1)
        for seed, spacing, amp in scene.noise:
            lattice = np.random.default_rng(seed).uniform(-1.0, 1.0, (int((v1 - v0) / spacing) + 1,
                                                                      int((u1 - u0) / spacing) + 1))
            lat = torch.tensor(lattice, dtype=torch.float32, device=t.device)[None, None]
            sampled = torch.nn.functional.grid_sample(lat.expand(t.numel(), -1, -1, -1), grid, mode="bicubic",
                                                      padding_mode="border", align_corners=True)
            value = value + amp * sampled[:, 0]
    img = _tint(value.clamp(0.02, _TEX_MAX_VALUE), scene.tex_hue, scene.tex_sat)
    for bx, by, radius, bval, bhue, bsat in scene.blobs:
        d = torch.sqrt(((wx - bx) * (width / unit)) ** 2 + ((wy - by) * (height / unit)) ** 2)
        alpha = ((radius - d) * unit * 0.5 + 0.5).clamp(0.0, 1.0)  # a 2-pixel soft edge
        colour = torch.tensor(_hsv_to_rgb(bhue, bsat, bval), device=t.device).view(3, 1, 1, 1)
        img = img * (1 - alpha) + colour * alpha
    return img


def _object_centre(obj: ToyObject, t: torch.Tensor, width: int, height: int, unit: int):
    """Screen centre ``(cx, cy)`` in pixels at each frame time ``t``."""
    dx, dy = obj.displacement()
    fx, fy = obj.x0 + dx * t, obj.y0 + dy * t
    if obj.looping:  # wrap so that the object has fully left before it re-enters at the other edge
        rx, ry = (obj.size * unit + 1) / width, (obj.size * unit + 1) / height
        fx = torch.remainder(fx + rx, 1 + 2 * rx) - rx
        fy = torch.remainder(fy + ry, 1 + 2 * ry) - ry
    cx, cy = fx * width, fy * height
    if obj.bouncing:
        cy = cy - obj.hop * height * torch.sin(math.pi * _BOUNCE_HOPS * t).abs()
    return cx, cy


def render(scenes: Sequence[ToyScene], frames: int, height: int, width: int, device: str | torch.device = "cpu",
           return_mask: bool = False):
    """Draw ``scenes`` as videos ``[B, 3, frames, height, width]`` float32 in [-1, 1] (the VAE's
    range). With ``return_mask`` also the objects' coverage ``[B, 1, frames, height, width]`` in [0, 1]
    (what is visible of them: pillars in front hide it).

    Edges are anti-aliased over one pixel. Deterministic: the scenes carry every random choice.
    """
    if frames < 1 or height < 8 or width < 8:
        raise ValueError(f"need frames >= 1 and height, width >= 8, got {frames}x{height}x{width}")
    unit = min(height, width)
    t = torch.linspace(0.0, 1.0, frames, device=device) if frames > 1 else torch.zeros(1, device=device)
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5)  # pixels
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5)
    Y, X = ys.view(1, height, 1), xs.view(1, 1, width)
    videos, masks = [], []
    for scene in scenes:
        if scene.background == "textured":
            img = _textured(scene, t, X, Y, width, height, unit)
        elif scene.background == "drifting":
            ca, sa = math.cos(scene.bg_angle), math.sin(scene.bg_angle)
            u = (X * ca + Y * sa) / unit - scene.bg_drift * t.view(-1, 1, 1)
            grey = 0.06 + 0.16 * (0.5 + 0.5 * torch.sin(2 * math.pi * u / scene.bg_period))
            img = grey.unsqueeze(0).expand(3, -1, -1, -1).clone()
        else:
            if scene.background == "dark":
                rgb = (scene.bg_level,) * 3
            else:
                rgb = _hsv_to_rgb(COLOURS[scene.background], _BG_SATURATION, _BG_VALUE)
            shade = 1.0 + 0.25 * (Y / height - 0.5)  # a faint vertical gradient
            img = torch.stack([c * shade.expand(frames, height, width) for c in rgb])
        cover = torch.zeros(frames, height, width, device=device)
        for obj in scene.objects:
            cx, cy = _object_centre(obj, t, width, height, unit)
            px = X - cx.view(-1, 1, 1)
            py = Y - cy.view(-1, 1, 1)
            alpha = (0.5 - _object_sdf(obj.shape, px, py, obj.size * unit)).clamp(0.0, 1.0)
            colour = torch.tensor(_hsv_to_rgb(COLOURS[obj.colour], 1.0, 1.0), device=device).view(3, 1, 1, 1)
            img = img * (1 - alpha) + colour * alpha
            cover = torch.maximum(cover, alpha)
        cdx = scene.camera_offset()[0]
        for x, half, grey in scene.pillars:
            centre = (x - cdx * t.view(-1, 1, 1)) * width  # fixed in the world: slides against the pan
            alpha = (0.5 - ((X - centre).abs() - half * unit)).clamp(0.0, 1.0)  # [F, 1, W]
            img = img * (1 - alpha) + grey * alpha
            cover = cover * (1 - alpha)
        videos.append(img)
        masks.append(cover.unsqueeze(0))
    video = torch.stack(videos) * 2.0 - 1.0
    return (video, torch.stack(masks)) if return_mask else video


def render_frames(scene: ToyScene, frames: int, height: int, width: int) -> np.ndarray:
    """One scene as uint8 RGB frames ``[frames, height, width, 3]`` (what a pipeline's ``output_type="np"``
    gives, scaled to 0-255)."""
    v = render([scene], frames, height, width)[0]
    return ((v.permute(1, 2, 3, 0).numpy() + 1.0) * 127.5 + 0.5).clip(0, 255).astype(np.uint8)
