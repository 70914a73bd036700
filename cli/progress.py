"""Progress bars of the commands: rich, on stderr, one bar per denoising run (step i/n, it/s, ETA).

A diffusers pipeline reports its steps through ``callback_on_step_end``; :func:`step_callback` turns
that into a bar's advance. Pipelines whose ``__call__`` has no such parameter get a bar without a
total (elapsed time only).
"""

from __future__ import annotations

import inspect
from typing import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, \
    TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text


class _Rate(ProgressColumn):
    """Steps per second of a task so far: done / elapsed (``-- it/s`` before the first step)."""

    def render(self, task) -> Text:
        elapsed = task.finished_time if task.finished else task.elapsed
        if not task.completed or not elapsed:
            return Text("-- it/s")
        return Text(f"{task.completed / elapsed:.2f} it/s")


def bars(unit: str = "steps", console: Console | None = None) -> Progress:
    """A rich :class:`Progress` on stderr: description, bar, ``i/n <unit>``, it/s, elapsed, ETA."""
    return Progress(TextColumn("{task.description:<12}"), BarColumn(bar_width=30), MofNCompleteColumn(),
                    TextColumn(unit), _Rate(), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=console or Console(stderr=True))


def takes_step_callback(pipe) -> bool:
    """Whether ``pipe(...)`` accepts diffusers' ``callback_on_step_end``."""
    try:
        return "callback_on_step_end" in inspect.signature(pipe.__call__).parameters
    except (TypeError, ValueError):
        return False


def step_callback(progress: Progress, task) -> Callable:
    """A ``callback_on_step_end`` that sets ``task`` to the number of steps done."""

    def on_step_end(pipe, step_index, timestep, callback_kwargs):
        progress.update(task, completed=step_index + 1)
        return callback_kwargs

    return on_step_end
