"""Triton kernels and their thin launchers: tensors and constexprs in, tensors out (imports torch and
triton only)."""

import os

import torch

from .attention_fwd import attention_fwd


def use_triton(x: torch.Tensor) -> bool:
    """Whether the kernels run on ``x``'s device: CUDA, or the CPU under Triton's interpreter when asked
    for (``TRITON_INTERPRET=1`` and ``VDIT_CPU_TRITON=1``: the tests); elsewhere callers take their
    PyTorch paths."""
    if x.device.type == "cuda":
        return True
    return x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("VDIT_CPU_TRITON") == "1"


__all__ = ["attention_fwd", "use_triton"]
