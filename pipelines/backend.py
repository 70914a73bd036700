"""Our attention as a backend in diffusers' attention registry.

diffusers routes attention through ``dispatch_attention_fn(q, k, v, ..., backend=...)``, looking the
backend up by an ``AttentionBackendName`` enum member. We add a member ``"vdit"`` to that enum and
register :func:`_vdit_backend` under it. A patched processor is the model's own processor class with
its backend set to ``"vdit"``; around each call it publishes itself in :data:`_running`, and the
backend reads that processor's layer plan and calls the ``vdit::attention`` custom op with its tensors. So the processor's own code (projections,
norms, RoPE, output) runs unchanged, and a diffusers update to a processor body needs no change here --
except that Wan-style self-attention runs its Q/K norm and RoPE fused (:mod:`.prologue`, opt-out
``patch(..., fused_prologue=False)``), through the same ``dispatch_attention_fn`` call.

Context parallelism: the backend is registered with ``supports_context_parallel``; under Ulysses it
runs diffusers' own templated path (all-to-all around :func:`_ulysses_forward_op`), and the mask of each
processor covers the global heads of its rank (:func:`local_heads`). Ring attention raises.

Which layer a call belongs to: the patched processor publishes itself, for the length of its own
call, in a per-thread slot (:data:`_running`), and the backend reads that processor's
:class:`~vdit_accel.plan.LayerPlan`, compiled by the transformer's forward pre-hook for the forward's
grid and step. Per thread, so two patched pipelines run in two threads without sharing anything (a
``contextvars.ContextVar`` would also follow asyncio tasks, but dynamo cannot trace ``ContextVar.set``:
"Dynamo does not know how to trace method `set` of class `ContextVar`", torch 2.13; a
``threading.local`` it traces).

torch.compile: a compiled block traces the processor and this backend. What differs between layers
reaches the traced code only as tensors (the plan's mask and index tensors, graph inputs); the layer
index, the step and the grid are read in eager code (the pre-hook; the observers; calls whose length
differs from the forward's grid), so one graph serves every layer of a block shape.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import torch
import torch.nn.functional as F

from .op import run_dense, run_plan

logger = logging.getLogger("vdit_accel")

BACKEND_NAME = "vdit"



class _Running(threading.local):
    """The patched processor whose call is in flight in this thread (``proc``), or None outside patched
    layers. A patched processor sets it to itself around its call and restores the previous value."""

    proc = None


_running = _Running()


@contextlib.contextmanager
def running(proc):
    """Run the body as if inside ``proc``'s call (what a patched processor does around its own)."""
    prev, _running.proc = _running.proc, proc
    try:
        yield
    finally:
        _running.proc = prev
_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        logger.warning(msg)


def _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale):
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
        attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
    )
    return out.transpose(1, 2)


def _vdit_backend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    _parallel_config=None,
) -> torch.Tensor:
    """diffusers backend: (B, S, H, D) in and out, like diffusers' other backends.

    A boolean key-padding ``attn_mask`` whose valid keys are a prefix of the sequence (HunyuanVideo's
    ``[B, 1, 1, S]``, HunyuanVideo 1.5's ``[B, 1, S, S]`` = valid_i & valid_j) is honoured exactly:
    each sample's valid tokens go through our attention with the grid of its true text length, and
    the padded query rows (whose outputs diffusers discards) through SDPA with the original mask
    rows. Any other mask, causal attention, dropout or GQA falls back to SDPA, with a warning.

    Under diffusers' Ulysses context parallelism (``_parallel_config`` set by ``enable_parallelism``)
    the call is diffusers' templated one: an all-to-all gives this rank the whole sequence for its
    ``H / P`` heads, which go through the same path with the block mask of those global heads (see
    :func:`local_heads`), and a second all-to-all restores the sequence shards. Ring attention is not
    supported (it would hand us rotating key chunks that no block mask describes).
    """
    cp = getattr(_parallel_config, "context_parallel_config", None)
    if cp is not None:
        return _ulysses(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, _parallel_config)
    return _local(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def _local(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, head_start: int = 0):
    """Attention over the whole sequence of the heads in ``query``, global heads from ``head_start`` on."""
    unsupported = [n for n, bad in (("is_causal", is_causal), ("dropout_p", dropout_p > 0),
                                    ("enable_gqa", enable_gqa)) if bad]
    if unsupported or key.shape != query.shape or value.shape != query.shape:
        why = ", ".join(unsupported) or "cross-attention shapes"
        _warn_once(f"vdit-accel: attention call with {why}: falling back to PyTorch SDPA for such calls")
        return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale)
    proc = _running.proc
    if attn_mask is None:
        return _attend(query, key, value, scale, proc, head_start)
    return _attend_masked(query, key, value, attn_mask, scale, proc, head_start)


# -- Ulysses context parallelism ------------------------------------------------------------------


def local_heads(parallel_config, num_heads: int) -> tuple[int, int] | None:
    """The global heads ``[start, stop)`` a rank attends under diffusers' Ulysses context parallelism
    (``parallel_config`` as ``enable_parallelism`` sets it on a processor), or None without it.

    Ulysses' all-to-all splits the heads into ``ulysses_degree`` equal contiguous slices, rank ``r`` of
    the Ulysses mesh getting slice ``r``: heads ``[r * H / P, (r + 1) * H / P)``.
    """
    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is None or cp.ulysses_degree <= 1:
        return None
    if num_heads % cp.ulysses_degree:
        raise ValueError(f"vdit-accel: Ulysses degree {cp.ulysses_degree} does not divide the {num_heads} heads")
    n = num_heads // cp.ulysses_degree
    start = cp._ulysses_local_rank * n
    return start, start + n


def _ulysses(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, parallel_config):
    from diffusers.models.attention_dispatch import _templated_context_parallel_attention

    cp = parallel_config.context_parallel_config
    if cp.ring_degree > 1:
        raise NotImplementedError(
            "vdit-accel supports diffusers' Ulysses context parallelism only, not ring attention "
            f"(ring_degree={cp.ring_degree}); use ContextParallelConfig(ulysses_degree=...) or another backend"
        )
    if cp.ulysses_anything:
        raise NotImplementedError(
            "vdit-accel does not support ContextParallelConfig(ulysses_anything=True) (uneven head slices); "
            "use a head count and sequence length that ulysses_degree divides"
        )
    return _templated_context_parallel_attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, False,
        forward_op=_ulysses_forward_op, backward_op=_ulysses_backward_op, _parallel_config=parallel_config,
    )


def _ulysses_forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                        enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
    """diffusers' templated forward op: the whole sequence of this rank's ``H / P`` heads, after the
    all-to-all. The local heads are global heads ``ulysses_local_rank * H / P`` on."""
    if return_lse:
        raise ValueError("vdit-accel attention does not return the log-sum-exp")
    head_start = _parallel_config.context_parallel_config._ulysses_local_rank * query.shape[2]
    return _local(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, head_start)


def _ulysses_backward_op(ctx, grad_out, *args, **kwargs):
    raise NotImplementedError("vdit-accel attention is inference-only (no backward)")


@torch.compiler.disable
def _attend_masked(query, key, value, attn_mask, scale, proc, head_start: int = 0) -> torch.Tensor:
    """A call with a key-padding ``attn_mask``: per sample over its valid tokens (eager: the lengths are
    data, read from the mask)."""
    state = proc._vdit_state if proc is not None else None
    lengths = _valid_prefix_lengths(attn_mask, query.shape[0], query.shape[1])
    text_at = state.grid.text_at if state is not None and state.grid is not None else None
    if lengths is None or (text_at != "suffix" and state is not None and min(lengths) < query.shape[1]):
        _warn_once(
            f"vdit-accel: attention mask of shape {tuple(attn_mask.shape)} and dtype {attn_mask.dtype} is not a "
            "key-padding mask of trailing text tokens: falling back to PyTorch SDPA for such calls"
        )
        return _sdpa(query, key, value, attn_mask, 0.0, False, scale)
    seq = query.shape[1]
    out = torch.empty_like(query)
    for b, n in enumerate(lengths):
        s = slice(b, b + 1)
        out[s, :n] = _attend(query[s, :n], key[s, :n], value[s, :n], scale, proc, head_start)
        if n < seq:  # padded query rows: exactly what SDPA gives them under the original mask
            mb = attn_mask[b : b + 1] if attn_mask.shape[0] > 1 else attn_mask
            rows = mb[:, :, n:] if mb.shape[2] == seq else mb
            out[s, n:] = _sdpa(query[s, n:], key[s], value[s], rows, 0.0, False, scale)
    return out


def _valid_prefix_lengths(mask: torch.Tensor, batch: int, seq: int) -> list[int] | None:
    """Per sample, the n such that the mask lets queries [0, n) see exactly keys [0, n); else None.

    Accepts bool masks of shape [B or 1, 1, 1 or S, S]; rows from n on may hold anything (they are
    padded queries). Cost: one pass over the mask (which diffusers has already materialised).
    """
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[0] not in (1, batch) or mask.shape[1] != 1:
        return None
    if mask.shape[3] != seq or mask.shape[2] not in (1, seq):
        return None
    first = mask[:, 0, 0]  # [Bm, S]: the first query row (a video token, never padding)
    n = first.sum(-1)
    if not torch.equal(first, torch.arange(seq, device=mask.device) < n.unsqueeze(1)):
        return None
    lengths = [int(x) for x in n.tolist()]
    if mask.shape[2] == seq:
        for m, length in zip(mask[:, 0], lengths):
            if not m[:length, :length].all() or m[:length, length:].any():
                return None
    if min(lengths) < 1:
        return None
    return lengths * batch if len(lengths) == 1 and batch > 1 else lengths


def _attend(query, key, value, scale, proc, head_start: int = 0) -> torch.Tensor:
    """Our attention over one call's tokens; ``proc`` (the patched processor in flight, or None) gives the
    layer plan: the one its forward pre-hook compiled when the call spans the forward's grid and heads
    (its tensors are then graph inputs under torch.compile), else one looked up for the call's own grid.
    The call's heads are global heads ``head_start`` to ``head_start + query.shape[2]``."""
    if proc is None:
        return run_dense(query, key, value, scale)
    state = proc._vdit_state
    heads = (head_start, head_start + query.shape[2])
    if state.observers:
        _observe(proc, query, key, value, heads)
    plan = proc._vdit_plan
    if plan is None or not plan.serves(query.shape[1], heads):
        plan = _call_plan(proc, query, heads)
    if plan.dynamic is not None:  # semantic / segment heads: planned per call (pipelines/permute.py)
        return state.orders.attend(proc, plan, query, key, value, scale)
    return run_plan(query, key, value, plan, scale)


@torch.compiler.disable
def _observe(proc, query, key, value, heads) -> None:
    """Tell the observers of ``proc``'s state about this call (eager: they get the layer and step as ints)."""
    state, layer = proc._vdit_state, proc._vdit_layer
    if heads != (0, state.num_heads):
        raise NotImplementedError(
            "vdit-accel: attention observers (e.g. the sparsity search) see a call over heads "
            f"{heads[0]}..{heads[1] - 1} of {state.num_heads}: they are not supported under context parallelism"
        )
    state.call_grid = state.grid_for(query.shape[1], layer)
    for observe in state.observers:
        observe(layer, state.step, query, key, value)


@torch.compiler.disable
def _call_plan(proc, query, heads):
    """The plan of a call whose length differs from the forward's grid (text dropped or masked per
    sample), or of a forward whose grid or heads were not prepared (cached like the pre-hook's)."""
    return proc._vdit_state.plan(proc._vdit_layer, query, heads=heads)


class _SDPAToBackend(torch.overrides.TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` to our backend while a patched processor runs.

    CogVideoX and Mochi processors call SDPA directly with ``(B, H, S, D)`` instead of diffusers'
    dispatcher. Rather than copy their bodies, the patched processor runs its base ``__call__``
    inside this mode: the SDPA call is redirected, with the layout change made by transposed views
    (no copies), and every other op passes through untouched. The mode is pushed only for the
    processor's call, so nothing outside a patched layer is affected; inside ``__torch_function__``
    the mode is off, so the backend's own SDPA fallback does not recurse.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return _sdpa_through_backend(*args, **kwargs)
        return func(*args, **kwargs)


def _sdpa_through_backend(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                          enable_gqa=False):
    if query.dim() != 4:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    out = _vdit_backend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=attn_mask,
                        dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    return out.transpose(1, 2)


def register_backend():
    """Add ``"vdit"`` to diffusers' attention registry (idempotent). Returns the enum member."""
    from diffusers.models import attention_dispatch as ad

    names = ad.AttentionBackendName
    member = names._value2member_map_.get(BACKEND_NAME)
    if member is None:
        # Enums are closed; extend this one the way enum's own machinery builds members.
        member = str.__new__(names, BACKEND_NAME)
        member._name_ = "VDIT"
        member._value_ = BACKEND_NAME
        member.__objclass__ = names
        type.__setattr__(names, "VDIT", member)
        names._member_map_["VDIT"] = member
        names._value2member_map_[BACKEND_NAME] = member
        names._member_names_.append("VDIT")
    if member not in ad._AttentionBackendRegistry._backends:
        ad._AttentionBackendRegistry.register(member, supports_context_parallel=True)(_vdit_backend)
    # Ulysses context parallelism (enable_parallelism) checks this set; ring raises in the backend.
    ad._AttentionBackendRegistry._supports_context_parallel.add(BACKEND_NAME)
    return member
