"""The token grid of one video in a DiT's attention sequence."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

TextAt = Literal["none", "prefix", "suffix"]


@dataclass(frozen=True)
class VideoGrid:
    """The patched latent grid of one video, as the attention sequence lays it out.

    diffusers orders video tokens T-major, then H, then W. Joint-attention models add text tokens
    to the same sequence: before the video (``text_at="prefix"``, CogVideoX) or after it
    (``"suffix"``, HunyuanVideo, Mochi). Wan and LTX self-attention has no text (``text_len=0``).

    Args:
        t, h, w: latent frames, rows and columns after patchification.
        text_len: text tokens in the same sequence (0 for none).
        text_at: ``"prefix"``, ``"suffix"`` or ``"none"`` (must be ``"none"`` iff ``text_len == 0``).
    """

    t: int
    h: int
    w: int
    text_len: int = 0
    text_at: TextAt = "none"

    def __post_init__(self):
        for name in ("t", "h", "w"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"VideoGrid.{name} must be a positive int, got {v!r}")
        if self.text_len < 0:
            raise ValueError(f"VideoGrid.text_len must be >= 0, got {self.text_len}")
        if self.text_at not in ("none", "prefix", "suffix"):
            raise ValueError(f"VideoGrid.text_at must be 'none', 'prefix' or 'suffix', got {self.text_at!r}")
        if (self.text_len == 0) != (self.text_at == "none"):
            raise ValueError(
                f"VideoGrid: text_len={self.text_len} with text_at={self.text_at!r}; "
                "use text_at='none' exactly when there is no text"
            )

    @property
    def video_len(self) -> int:
        return self.t * self.h * self.w

    @property
    def seq_len(self) -> int:
        return self.video_len + self.text_len

    @property
    def video_start(self) -> int:
        """Index of the first video token in the sequence."""
        return self.text_len if self.text_at == "prefix" else 0

    @property
    def text_start(self) -> int:
        """Index of the first text token in the sequence (== seq_len when there is none)."""
        if self.text_at == "prefix":
            return 0
        return self.video_len if self.text_at == "suffix" else self.seq_len

    def text_token_mask(self, device=None) -> torch.Tensor:
        """Bool [seq_len]: True at text tokens."""
        m = torch.zeros(self.seq_len, dtype=torch.bool, device=device)
        m[self.text_start : self.text_start + self.text_len] = True
        return m
