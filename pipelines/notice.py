"""One-time warnings that may be issued from code ``torch.compile`` traces.

A fallback or a misuse is logged once per process (``logger "vdit_accel"``). Dynamo cannot trace a
``logging.Logger`` call ("logging.Logger method not supported", torch 2.13), and a
``torch.compiler.disable``-d one is a graph break, an error under ``fullgraph=True``. So while tracing,
the warning goes through a ``torch._dynamo.nonstrict_trace`` function: dynamo does not trace its body
but runs it as Python while it builds the graph, so the warning is logged once, when the graph is
compiled, and the graph itself holds nothing of it (the decision to warn depends only on what the
compiled graph is specialised on: shapes, flags, grad mode).
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("vdit_accel")

_warned: set[str] = set()


def _log_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        logger.warning(msg)


def _log_once_while_tracing(msg: str) -> torch.Tensor:
    _log_once(msg)
    return torch.zeros(())  # a nonstrict_trace function must return tensors; this one is unused


# nonstrict_trace: torch >= 2.7 (2025-06). Older torch: the warning is skipped while tracing.
_nonstrict_trace = getattr(torch._dynamo, "nonstrict_trace", None)
_traced_log_once = _nonstrict_trace(_log_once_while_tracing) if _nonstrict_trace is not None else None


def warn_once(msg: str) -> None:
    """Log ``msg`` as a warning the first time it is seen in this process, eager or while compiling."""
    if not torch.compiler.is_compiling():
        _log_once(msg)
    elif _traced_log_once is not None:
        _traced_log_once(msg)
