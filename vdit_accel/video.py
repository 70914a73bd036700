"""Video files, comparison pictures and frame metrics (OpenCV; no imageio/ffmpeg dependency)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """RGB frames ``[T, H, W, 3]`` (float in [0, 1] or uint8) as uint8."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames [T, H, W, 3], got {frames.shape}")
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return frames


def write_mp4(path: str | Path, frames: np.ndarray, fps: int = 8) -> None:
    """Write RGB frames ``[T, H, W, 3]`` (float in [0, 1] or uint8) as an mp4 (codec mp4v)."""
    import cv2

    frames = to_uint8(frames)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t, h, w, _ = frames.shape
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not writer.isOpened():
        raise OSError(f"OpenCV could not open {str(path)!r} for writing")
    try:
        for f in frames:
            writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()


def read_mp4(path: str | Path) -> np.ndarray:
    """Read an mp4 back as uint8 RGB frames ``[T, H, W, 3]``."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    frames = []
    try:
        while True:
            ok, f = cap.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(f, cv2.COLOR_BGR2RGB))
    finally:
        cap.release()
    if not frames:
        raise OSError(f"could not read any frame from {str(path)!r}")
    return np.stack(frames)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two videos with values in [0, 1] (inf if identical)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean structural similarity (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03)
    of two videos ``[F, H, W, 3]`` with values in [0, 1], on their luma (BT.601), averaged over frames."""
    import cv2

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"ssim needs two videos [F, H, W, 3] of one shape, got {a.shape} and {b.shape}")
    luma = np.array([0.299, 0.587, 0.114])
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    scores = []
    for x, y in zip(a @ luma, b @ luma):
        blur = lambda z: cv2.GaussianBlur(z, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT)  # noqa: E731
        mx, my = blur(x), blur(y)
        vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        scores.append(s.mean())
    return float(np.mean(scores))


# -- comparison pictures -------------------------------------------------------------------------

_LABEL_BAND = 14  # pixels of the caption band above each panel, before scaling
_GAP = 4  # pixels between panels


def _zoom(frames: np.ndarray, min_width: int) -> np.ndarray:
    """Frames ``[T, H, W, 3]`` enlarged by the integer factor (nearest neighbour: no invented detail)
    that makes them at least ``min_width`` wide (labels stay legible on 128-pixel videos)."""
    k = max(1, -(-min_width // frames.shape[2]))
    return frames.repeat(k, axis=1).repeat(k, axis=2) if k > 1 else frames


def _label(panel: np.ndarray, text: str) -> np.ndarray:
    """``panel`` (uint8 ``[H, W, 3]``) under a dark band with ``text`` in it, shrunk to fit the width."""
    import cv2

    band = np.full((_LABEL_BAND * max(1, panel.shape[1] // 128), panel.shape[1], 3), 32, np.uint8)
    scale, thickness = band.shape[0] / 30.0, 1
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    if tw > panel.shape[1] - 4:
        scale *= (panel.shape[1] - 4) / tw
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    cv2.putText(band, text, (2, (band.shape[0] + th) // 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness,
                cv2.LINE_AA)
    return np.concatenate([band, panel], axis=0)


def _row(panels: list[np.ndarray]) -> np.ndarray:
    gap = np.full((panels[0].shape[0], _GAP, 3), 255, np.uint8)
    return np.concatenate([x for p in panels for x in (p, gap)][:-1], axis=1)


def difference(a: np.ndarray, b: np.ndarray, gain: float = 8.0) -> np.ndarray:
    """``|a - b| * gain`` of two videos (uint8 or float in [0, 1]), as uint8 frames: black where they agree."""
    a, b = to_uint8(a).astype(np.float32), to_uint8(b).astype(np.float32)
    if a.shape != b.shape:
        raise ValueError(f"difference needs two videos of one shape, got {a.shape} and {b.shape}")
    return np.clip(np.abs(a - b) * gain + 0.5, 0, 255).astype(np.uint8)


def comparison_frames(dense: np.ndarray, accelerated: np.ndarray, gain: float = 8.0, min_width: int = 256) -> np.ndarray:
    """Side-by-side frames ``dense | accelerated | |difference| x gain``, each panel labelled (the
    difference with that frame's PSNR), enlarged to at least ``min_width`` pixels a panel. uint8
    ``[T, H', W', 3]``."""
    dense, accelerated = to_uint8(dense), to_uint8(accelerated)
    diff = difference(dense, accelerated, gain)
    d, a, x = (_zoom(v, min_width) for v in (dense, accelerated, diff))
    g = f"{gain:g}"
    out = []
    for t in range(len(d)):
        p = psnr(dense[t] / 255.0, accelerated[t] / 255.0)
        out.append(_row([_label(d[t], "dense"), _label(a[t], "accelerated"),
                         _label(x[t], f"|diff| x{g}, {p:.1f} dB" if np.isfinite(p) else f"|diff| x{g}: identical")]))
    return np.stack(out)


def frame_strip(rows: dict[str, np.ndarray], count: int = 6, min_width: int = 128) -> np.ndarray:
    """One picture of ``count`` frames (evenly spaced, first and last included) of each video in
    ``rows`` (name -> ``[T, H, W, 3]``, one length), one labelled row per video. uint8 ``[H', W', 3]``."""
    videos = {name: _zoom(to_uint8(v), min_width) for name, v in rows.items()}
    lengths = {len(v) for v in videos.values()}
    if len(lengths) != 1:
        raise ValueError(f"frame_strip needs videos of one length, got {sorted(lengths)}")
    n = lengths.pop()
    picks = sorted({round(i * (n - 1) / max(1, count - 1)) for i in range(min(count, n))})
    lines = [_row([_label(v[t], f"{name}, frame {t}") for t in picks]) for name, v in videos.items()]
    gap = np.full((_GAP, lines[0].shape[1], 3), 255, np.uint8)
    return np.concatenate([x for line in lines for x in (line, gap)][:-1], axis=0)


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Write an RGB uint8 image ``[H, W, 3]`` as a PNG."""
    import cv2

    if not cv2.imwrite(str(path), cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR)):
        raise OSError(f"OpenCV could not write {str(path)!r}")
