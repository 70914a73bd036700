"""vdit-accel: faster video diffusion transformers.

Public surface: :func:`attention`, :func:`patch`, :func:`unpatch`, :class:`Strategy`, :func:`search`,
:class:`VideoGrid`, :class:`BlockMask`. Nothing inside the package imports this module (it re-exports,
and imports the integration layers lazily): the layers import each other's modules directly.

The names are imported on first use (PEP 562), so that ``import vdit_accel`` — and the command line's
``--help`` and ``version`` — do not pay for importing torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

from ._version import __version__

_LAZY = {"attention": ".attention", "BlockMask": ".block_mask", "VideoGrid": ".grid", "Strategy": ".strategy"}

if TYPE_CHECKING:
    from .attention import attention
    from .block_mask import BlockMask
    from .grid import VideoGrid
    from .strategy import Strategy


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])


class _Package(types.ModuleType):
    """Importing the submodule ``vdit_accel.attention`` sets the package's ``attention`` to that module
    (the import system does); the public name stays the function, as an eager import left it."""

    def __setattr__(self, name, value):
        if name == "attention" and isinstance(value, types.ModuleType):
            value = value.attention
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


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

if __import__("os").environ.get("DIFFUSERS_ATTN_BACKEND", "").lower() == "vdit":
    # diffusers reads DIFFUSERS_ATTN_BACKEND once, when its attention registry is first imported, and knows
    # "vdit" only after we registered it: register it now, before diffusers' models are imported
    # (vdit_accel.pipelines.backend._import_dispatch).
    importlib.import_module(".pipelines", __name__)
