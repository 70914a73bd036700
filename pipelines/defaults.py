"""What every built-in pipeline shares, apart from how it is built: its default generation size
(:class:`TinyDefaults`) and the half-precision cast that ``from_pretrained(torch_dtype=)`` would leave
(:func:`cast_pipeline`). Its own module so that the random-weight pipelines (:mod:`.tiny`) and the
trained ones (:mod:`.trained`) both use it without importing each other in a cycle."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class TinyDefaults:
    """The default generation size of a tiny pipeline (its token grid is printed in the report).

    ``call_kwargs``: extra pipeline-call arguments a tiny pipeline needs (e.g. HunyuanVideo's prompt
    template, sized for its byte-level tokenizer).
    """

    height: int
    width: int
    frames: int
    steps: int
    max_sequence_length: int
    call_kwargs: dict = field(default_factory=dict)


def cast_pipeline(pipe, dtype: torch.dtype):
    """``pipe`` in ``dtype`` the way ``from_pretrained(torch_dtype=dtype)`` leaves a diffusers model: the
    parameters and buffers under each model's ``_keep_in_fp32_modules`` stay float32 (Wan: the rotary
    tables, the time embedder, the norms and scale-shift tables). A plain ``pipe.to(dtype)`` rounds the
    rotary tables too, and our fused Q/K prologue then leaves them to the processor's own (slower) path."""
    if dtype == torch.float32:
        return pipe
    for m in pipe.components.values():
        if not isinstance(m, torch.nn.Module):
            continue
        torch.nn.Module.to(m, dtype=dtype)  # not diffusers' override: it warns of what is undone below
        keep = getattr(m, "_keep_in_fp32_modules", None) or ()
        for name, t in [*m.named_parameters(), *m.named_buffers()]:
            if t.is_floating_point() and any(k in name.split(".") for k in keep):
                t.data = t.data.float()
    return pipe
