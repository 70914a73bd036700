"""vdit-accel: faster video diffusion transformers.

Public surface: :func:`attention`, :func:`patch`, :func:`unpatch`, :class:`Strategy`,
:class:`VideoGrid`, :class:`BlockMask`.
"""

from .attention import attention
from .block_mask import BlockMask
from .grid import VideoGrid
from .strategy import Strategy

__version__ = "0.1.0"


def patch(pipe_or_transformer, strategy="dense", **kwargs):
    """Route a diffusers video pipeline's self-attention through vdit-accel. See
    :func:`vdit_accel.pipelines.patch`."""
    from .pipelines import patch as _patch

    return _patch(pipe_or_transformer, strategy, **kwargs)


def unpatch(pipe_or_transformer):
    """Undo :func:`patch`, restoring the original processors exactly."""
    from .pipelines import unpatch as _unpatch

    return _unpatch(pipe_or_transformer)


__all__ = ["attention", "patch", "unpatch", "Strategy", "VideoGrid", "BlockMask", "__version__"]
