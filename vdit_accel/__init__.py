"""vdit-accel: faster video diffusion transformers.

Public surface: :func:`attention`, :func:`patch`, :func:`unpatch`, :class:`Strategy`, :func:`search`,
:class:`VideoGrid`, :class:`BlockMask`. Nothing inside the package imports this module (it re-exports,
and imports the integration layers lazily): the layers import each other's modules directly.
"""

from ._version import __version__
from .attention import attention
from .block_mask import BlockMask
from .grid import VideoGrid
from .strategy import Strategy


def patch(pipe_or_transformer, strategy="dense", **kwargs):
    """Route a diffusers video pipeline's self-attention through vdit-accel. See
    :func:`vdit_accel.pipelines.patch`."""
    from .pipelines import patch as _patch

    return _patch(pipe_or_transformer, strategy, **kwargs)


def unpatch(pipe_or_transformer):
    """Undo :func:`patch`, restoring the original processors exactly."""
    from .pipelines import unpatch as _unpatch

    return _unpatch(pipe_or_transformer)


def search(pipe, prompts, config=None, **kwargs):
    """Search a per-layer, per-head strategy for a diffusers pipeline on calibration prompts. See
    :func:`vdit_accel.sparsity_search.search`."""
    from .sparsity_search import search as _search

    return _search(pipe, prompts, config, **kwargs)


__all__ = ["attention", "patch", "unpatch", "Strategy", "search", "VideoGrid", "BlockMask", "__version__"]
