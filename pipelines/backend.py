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
processor covers the global heads of its rank (:func:`local_heads`); for HunyuanVideo's joint attention
that templated path runs :class:`.parallel.JointUlysses` (text replicated, not exchanged). Ring attention raises.

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
import functools
import os
import sys
import threading

import torch
import torch.nn.functional as F

from .key_padding import key_padded, sdpa
from .notice import warn_once
from .op import INFERENCE_ONLY, run_dense, run_key_padded, run_plan

BACKEND_NAME = "vdit"
STATE_ATTR = "_vdit_state"  # where a patched transformer holds its PatchState (.patch)


class _Running(threading.local):
    """The patched processor whose call is in flight in this thread (``proc``), or None outside patched
    layers. A patched processor sets it to itself around its call and restores the previous value.

    Set in ``__init__`` (which ``threading.local`` runs in each thread on first use), not as a class
    default: dynamo guards on whether the slot's ``__dict__`` holds ``proc``, and a compiled frame that
    wrote it there for the first time failed its own guard ("Guard failed on the same frame it was
    created", torch 2.13, 2026-12): a fresh process compiling before any eager call died on it."""

    def __init__(self):
        self.proc = None


_running = _Running()


@contextlib.contextmanager
def running(proc):
    """Run the body as if inside ``proc``'s call (what a patched processor does around its own)."""
    prev, _running.proc = _running.proc, proc
    try:
        yield
    finally:
        _running.proc = prev


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
    each sample's valid tokens go through our attention with the layer's mask restricted to them
    (:mod:`.key_padding`), and the padded query rows (whose outputs diffusers discards) through SDPA
    with the original mask rows. Any other mask, causal attention, dropout or GQA falls back to SDPA,
    with a warning. A call that records autograd warns once: a backward through our attention raises.

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
        warn_once(f"vdit-accel: attention call with {why}: falling back to PyTorch SDPA for such calls")
        return sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale)
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        warn_once("vdit-accel: a forward with autograd recording (grad enabled, e.g. in train() mode) runs "
                  f"through vdit-accel's attention; a backward through it will raise. {INFERENCE_ONLY}")
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
    raise RuntimeError(INFERENCE_ONLY)


def _attend_masked(query, key, value, attn_mask, scale, proc, head_start: int = 0) -> torch.Tensor:
    """A call with a key-padding ``attn_mask`` (see :mod:`.key_padding`): the processor's plan for the
    forward's grid, restricted per sample to its valid tokens, through one opaque op under
    torch.compile. Calls the plan cannot serve that way (observers installed, token orders, per-call
    heads, no plan prepared) run per sample through :func:`_attend`, eagerly."""
    state = proc._vdit_state if proc is not None else None
    plan = None
    if state is not None:
        plan = proc._vdit_plan
        heads = (head_start, head_start + query.shape[2])
        if (state.observers or plan is None or not plan.serves(query.shape[1], heads) or plan.dynamic is not None
                or plan.q_index is not None or plan.k_index is not None):
            return _attend_masked_per_call(query, key, value, attn_mask, scale, proc, head_start)
    padding_allowed = state is None or (state.grid is not None and state.grid.text_at == "suffix")
    return run_key_padded(query, key, value, attn_mask, plan, scale, padding_allowed)


@torch.compiler.disable
def _attend_masked_per_call(query, key, value, attn_mask, scale, proc, head_start: int = 0) -> torch.Tensor:
    """Each sample's valid tokens as an attention call of their own (observers see them so, with the
    sample's true text length), planned per call; eager (the lengths are data, read from the mask)."""
    grid = proc._vdit_state.grid
    return key_padded(query, key, value, attn_mask, scale, grid is not None and grid.text_at == "suffix",
                      lambda q, k, v, n: _attend(q, k, v, scale, proc, head_start))


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
    """Add ``"vdit"`` to diffusers' attention registry (idempotent). Returns the enum member.

    Also, once: ``DIFFUSERS_ATTN_BACKEND=vdit`` (:func:`_import_dispatch`) makes ``"vdit"`` diffusers'
    default backend, and ``set_attention_backend("vdit")`` refuses models our backend cannot reach
    (:func:`_refuse_unreachable`)."""
    ad, env_default = _import_dispatch()
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
    if env_default:
        ad._AttentionBackendRegistry.set_active_backend(member)
    _guard_set_attention_backend()
    return member


def _import_dispatch():
    """``(diffusers' attention_dispatch module, whether DIFFUSERS_ATTN_BACKEND names our backend)``.

    diffusers reads ``DIFFUSERS_ATTN_BACKEND`` once, when ``attention_dispatch`` is first imported, as a
    member of its backend enum -- which has no ``"vdit"`` before we add it, so ``DIFFUSERS_ATTN_BACKEND=vdit``
    makes that import raise ``ValueError: 'vdit' is not a valid AttentionBackendName``. If we get there
    first (``import vdit_accel`` before diffusers' models), the module is imported with the default
    ``"native"``, and :func:`register_backend` then makes ours the default. If diffusers got there first,
    its import has already failed: nothing of ours ran."""
    wanted = os.environ.get("DIFFUSERS_ATTN_BACKEND", "").lower() == BACKEND_NAME
    if not wanted or "diffusers.models.attention_dispatch" in sys.modules:
        from diffusers.models import attention_dispatch as ad

        return ad, False
    import diffusers.utils.constants as constants

    saved = os.environ["DIFFUSERS_ATTN_BACKEND"], constants.DIFFUSERS_ATTN_BACKEND
    os.environ["DIFFUSERS_ATTN_BACKEND"] = constants.DIFFUSERS_ATTN_BACKEND = "native"
    try:
        from diffusers.models import attention_dispatch as ad
    finally:
        os.environ["DIFFUSERS_ATTN_BACKEND"], constants.DIFFUSERS_ATTN_BACKEND = saved
    return ad, True


def _guard_set_attention_backend() -> None:
    """Wrap diffusers' ``ModelMixin.set_attention_backend`` once, so that ``"vdit"`` on a model whose
    attention our backend cannot reach raises instead of silently doing nothing."""
    from diffusers.models.modeling_utils import ModelMixin

    original = ModelMixin.set_attention_backend
    if getattr(original, "_vdit_guard", False):
        return

    @functools.wraps(original)
    def set_attention_backend(self, backend: str) -> None:
        if str(getattr(backend, "value", backend)).lower() == BACKEND_NAME:
            _refuse_unreachable(self)
        return original(self, backend)

    set_attention_backend._vdit_guard = True
    ModelMixin.set_attention_backend = set_attention_backend


def _refuse_unreachable(model) -> None:
    """CogVideoX and Mochi processors call ``F.scaled_dot_product_attention`` themselves, not diffusers'
    dispatcher: a backend never sees their calls (``patch`` routes them, see :class:`_SDPAToBackend`)."""
    from .adapters import adapter_for

    try:
        adapter = adapter_for(model)
    except NotImplementedError:
        return
    if adapter.calls_sdpa and not hasattr(model, STATE_ATTR):
        raise NotImplementedError(
            f"vdit-accel: set_attention_backend('vdit') cannot reach {type(model).__name__}'s attention: its "
            "processors call F.scaled_dot_product_attention directly, not diffusers' attention dispatcher. "
            "Use vdit_accel.patch(model) instead (dense by default: the same attention)"
        )
