"""Reading a generated toy video back against its caption: the automatic check of the toy testbed.

:func:`check_video` scores a video: the colour of an object is the dominant hue among saturated, bright
pixels (backgrounds are dark or muted by construction, :mod:`.scenes`), its direction the motion of that
colour's centroid from the first to the last frames, in frame fractions; for rich scenes also the camera's
pan, read from the background's optical flow. On ground-truth clips it agrees with the caption for every
scene (tested). :func:`caption_check` is what the CLI and the search's verification call: the check of
each video, or None for a prompt outside the captions' grammar.
"""

from __future__ import annotations

import math
import re

import numpy as np

from .scenes import (_HUE_TOLERANCE, _MIN_DISPLACEMENT, _OBJ_MIN_SATURATION, _OBJ_MIN_VALUE, COLOURS, DIRECTIONS,
                     PAN_DIRECTIONS, SHAPES)


_PHRASE = re.compile(r"a (\w+) (\w+) (moving|bouncing|looping) ([\w-]+)(?: (slowly|quickly))?")
_CAPTION = re.compile(r"(?P<body>.+?)(?: on a (?P<bg>\w+) background)?(?:, camera panning (?P<camera>\w+))?"
                      r"(?:, behind (?P<pillars>a grey pillar|two grey pillars))?")


def _split_caption(caption: str) -> tuple[list[tuple[str, str, str, str]], str | None]:
    """``([(colour, shape, verb, direction), ...], camera)`` of a caption, or ValueError."""
    m = _CAPTION.fullmatch(caption.strip())
    out = []
    for part in (m["body"].split(" and ") if m else []):
        pm = _PHRASE.fullmatch(part)
        if not pm or pm[1] not in COLOURS or pm[2] not in SHAPES or pm[4] not in DIRECTIONS:
            out = []
            break
        out.append((pm[1], pm[2], pm[3], pm[4]))
    if not out or (m["camera"] is not None and m["camera"] not in PAN_DIRECTIONS):
        raise ValueError(f"not a toy-video caption: {caption!r} (expected e.g. 'a red circle moving left'; "
                         f"colours {list(COLOURS)}, shapes {list(SHAPES)}, directions {list(DIRECTIONS)}, "
                         f"camera pans {list(PAN_DIRECTIONS)})")
    return out, m["camera"]


def parse_caption(caption: str) -> list[tuple[str, str, str]]:
    """(colour, shape, direction) of each object a caption names, e.g.
    ``"a red circle moving left quickly on a drifting background"`` -> ``[("red", "circle", "left")]``."""
    return [(c, s, d) for c, s, _v, d in _split_caption(caption)[0]]


def parse_camera(caption: str) -> str | None:
    """The camera pan a caption names (``", camera panning left"`` -> ``"left"``), or None."""
    return _split_caption(caption)[1]


def _hsv(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue (degrees), saturation, value of RGB ``[..., 3]`` in [0, 1]."""
    r, g, b = frames[..., 0], frames[..., 1], frames[..., 2]
    v = frames.max(-1)
    c = v - frames.min(-1)
    s = np.where(v > 0, c / np.maximum(v, 1e-8), 0.0)
    cc = np.maximum(c, 1e-8)
    h = np.where(v == r, ((g - b) / cc) % 6, np.where(v == g, (b - r) / cc + 2, (r - g) / cc + 4)) * 60.0
    return h, s, v


def _hue_distance(h: np.ndarray, target: float) -> np.ndarray:
    d = np.abs(h - target) % 360.0
    return np.minimum(d, 360.0 - d)


def _nearest_direction(dx: float, dy: float) -> str:
    angle = math.degrees(math.atan2(-dy, dx)) % 360.0
    return list(DIRECTIONS)[int(round(angle / 45.0)) % 8]


def _track(on: np.ndarray, looping: bool = False) -> dict:
    """Centroid motion of a per-frame pixel mask ``[F, H, W]``, in frame fractions: the mean centroid
    over the last eighth of the frames in which the mask has pixels (at least one frame) minus that
    over the first eighth; no motion unless the mask is there in the first and the last quarter.

    ``looping`` (an object that leaves at one edge and re-enters at the other): the present frames
    are cut into runs wherever the frame's centroid jumps by more than a quarter of the frame from one present
    frame to the next, the motion is the sum of the runs' motions (each as above, over its own
    eighths), and the mask must be there in at least half of the frames instead."""
    f, h, w = on.shape
    counts = on.sum((1, 2))
    min_pixels = max(4, int(2e-4 * h * w))
    present = [i for i in range(f) if counts[i] >= min_pixels]
    result = {"present_frames": len(present), "displacement": None, "direction": None}
    if not present:
        return result
    if not looping and (present[0] >= f // 4 + 1 or present[-1] < f - 1 - f // 4):
        return result  # the object is not there at the start or at the end
    if looping and len(present) < f / 2:
        return result
    ys, xs = np.mgrid[0:h, 0:w]

    def centroid(ids):  # of the pixels of those frames together
        m = on[ids].astype(np.float64)
        n = m.sum()
        return (m * xs).sum() / n / w, (m * ys).sum() / n / h

    cuts = [0, len(present)]
    if looping:
        per_frame = np.array([centroid([i]) for i in present])
        jumps = np.flatnonzero(np.hypot(*np.diff(per_frame, axis=0).T) > 0.25) + 1
        cuts = [0, *jumps.tolist(), len(present)]
    k = max(1, f // 8)
    dx = dy = 0.0
    for a, b in zip(cuts[:-1], cuts[1:]):
        kk = min(k, b - a)
        (x0, y0), (x1, y1) = centroid(present[a:a + kk]), centroid(present[b - kk:b])
        dx, dy = dx + x1 - x0, dy + y1 - y0
    result["displacement"] = (round(float(dx), 4), round(float(dy), 4))
    if math.hypot(dx, dy) >= _MIN_DISPLACEMENT:
        result["direction"] = _nearest_direction(dx, dy)
    return result


def _camera_motion(x: np.ndarray, vivid: np.ndarray) -> dict:
    """The background's motion over the clip: dense optical flow (Farneback) of each frame's luminance to
    the next, its median over the pixels away from objects (object pixels dilated by 1/16 of the
    shorter side), summed, in fractions of width and height; the camera pans the other way. A pan is
    read when it moves the background by at least :data:`_MIN_DISPLACEMENT` along one axis and more
    along it than along the other."""
    import cv2

    f, h, w = x.shape[:3]
    lum = x.mean(-1)
    # Contrast stretched to 8 bits (the flow's input): muted textures span only ~10% of the range, on
    # which Farneback's flow comes out several times too small (seen: 0.6 instead of 2.5 pixels).
    lum = ((lum - lum.mean()) / (lum.std() + 1e-6) * 50.0 + 128.0).clip(0, 255).astype(np.uint8)
    r = max(1, min(h, w) // 16)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    sx = sy = 0.0
    for i in range(f - 1):
        flow = cv2.calcOpticalFlowFarneback(lum[i], lum[i + 1], None, 0.5, 3, 15, 3, 5, 1.2, 0)
        away = cv2.dilate((vivid[i] | vivid[i + 1]).astype(np.uint8), kernel) == 0
        if away.sum() < 0.1 * h * w:
            continue  # hardly any background to see
        sx += float(np.median(flow[..., 0][away])) / w
        sy += float(np.median(flow[..., 1][away])) / h
    camera = None
    if max(abs(sx), abs(sy)) >= _MIN_DISPLACEMENT:
        camera = ("left" if sx > 0 else "right") if abs(sx) > abs(sy) else ("up" if sy > 0 else "down")
    return {"background_motion": (round(sx, 4), round(sy, 4)), "camera": camera}


def check_video(frames: np.ndarray, caption: str) -> dict:
    """Does a video show what its caption says? ``frames``: RGB ``[F, H, W, 3]``, uint8 or float in [0, 1].

    Object pixels are the saturated, bright ones (saturation >= 0.6, value >= 0.5); backgrounds,
    textures and pillars are muted, dark or grey, so they never count. One object: its colour is the
    most common of the six :data:`COLOURS` among object pixels (nearest hue), its direction the nearest
    of the eight :data:`DIRECTIONS` to the centroid motion of the pixels of that colour (within 30
    degrees of hue), first frames to last frames, in fractions of the frame (:func:`_track`; a looping
    object's runs between wrap-arounds summed); less than 0.08 of motion is no direction. Several
    objects: each caption colour is tracked on its own hue; it must be present at the start and end
    (looping ones: in half of the frames). A caption's camera pan is read from the background's motion
    (:func:`_camera_motion`).

    Returns ``{"ok": bool, "objects": [{"colour", "found_colour", "direction", "found_direction",
    "displacement", "present_frames"}, ...]}`` (and ``"camera": {"camera", "found_camera",
    "background_motion"}`` when the caption pans); ``ok`` when every object's colour and direction and
    the camera's pan match.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected RGB frames [F, H, W, 3], got shape {frames.shape}")
    x = frames.astype(np.float32) / 255.0 if frames.dtype == np.uint8 else frames.astype(np.float32)
    hue, sat, val = _hsv(x)
    vivid = (sat >= _OBJ_MIN_SATURATION) & (val >= _OBJ_MIN_VALUE)
    names = list(COLOURS)
    hues = np.array([COLOURS[c] for c in names])
    expected, camera = _split_caption(caption)
    objects = []
    for colour, _shape, verb, direction in expected:
        if len(expected) == 1:
            h = hue[vivid]
            if h.size == 0:
                found = None
            else:
                nearest = np.argmin(np.stack([_hue_distance(h, c) for c in hues]), axis=0)
                found = names[int(np.bincount(nearest, minlength=len(names)).argmax())]
        else:
            found = colour
        track = _track(vivid & (_hue_distance(hue, COLOURS[found]) <= _HUE_TOLERANCE), verb == "looping") if found \
            else {"present_frames": 0, "displacement": None, "direction": None}
        if len(expected) > 1 and track["displacement"] is None:
            found = None  # the colour is not there at the start and end
        objects.append({"colour": colour, "found_colour": found, "direction": direction,
                        "found_direction": track["direction"], "displacement": track["displacement"],
                        "present_frames": track["present_frames"]})
    ok = all(o["found_colour"] == o["colour"] and o["found_direction"] == o["direction"] for o in objects)
    result = {"ok": ok, "objects": objects}
    if camera is not None:
        motion = _camera_motion(x, vivid)
        result["camera"] = {"camera": camera, "found_camera": motion["camera"],
                            "background_motion": motion["background_motion"]}
        result["ok"] = ok and motion["camera"] == camera
    return result


def caption_check(video: np.ndarray, prompt: str) -> dict | None:
    """:func:`check_video` of ``video`` against ``prompt``, or None where the prompt is not a toy caption
    (outside the captions' grammar: nothing to check it against)."""
    try:
        _split_caption(prompt)
    except ValueError:
        return None
    return check_video(video, prompt)
