"""The toy testbed: procedural captioned videos, the tiny Wan pipelines trained on them, and the check
that reads a generated video back against its caption.

- :mod:`.scenes`: the data: scenes (objects, motion, backgrounds, camera, pillars) and their captions,
  rendered at any size on any device; the held-out check and validation sets.
- :mod:`.check`: the caption check of a generated video (colour, direction, camera pan).
- :mod:`.trained`: the trained models (``"wan-trained"``, ``"wan-rich"``): architectures, weight files
  (``weights/<name>/``) and the loader behind ``build_tiny_pipeline(name)``.
- :mod:`.train`: their training (``python -m vdit_accel.pipelines.toy.train``).

The data and the check are re-exported here; :mod:`.trained` and :mod:`.train` import diffusers and
are imported by name.
"""

from .check import caption_check, check_video, parse_camera, parse_caption
from .scenes import (BACKGROUNDS, COLOURS, DIRECTIONS, KINDS, MAX_CAPTION_BYTES, MAX_RICH_CAPTION_BYTES,
                     PAN_DIRECTIONS, RICH_BACKGROUNDS, SHAPES, SPEEDS, ToyObject, ToyScene, check_scenes,
                     held_out_combinations, is_held_out, render, render_frames, rich_check_scenes,
                     rich_validation_scenes, sample_busy_scenes, sample_rich_scene, sample_rich_scenes,
                     sample_scene, sample_scenes, validation_scenes)

__all__ = [
    "BACKGROUNDS", "COLOURS", "DIRECTIONS", "KINDS", "MAX_CAPTION_BYTES", "MAX_RICH_CAPTION_BYTES",
    "PAN_DIRECTIONS", "RICH_BACKGROUNDS", "SHAPES", "SPEEDS", "ToyObject", "ToyScene", "caption_check",
    "check_scenes", "check_video", "held_out_combinations", "is_held_out", "parse_camera", "parse_caption",
    "render", "render_frames", "rich_check_scenes", "rich_validation_scenes", "sample_busy_scenes",
    "sample_rich_scene", "sample_rich_scenes", "sample_scene", "sample_scenes", "validation_scenes",
]
