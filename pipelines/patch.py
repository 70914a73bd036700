"""``patch`` / ``unpatch``: route a diffusers pipeline's self-attention through vdit-accel."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from vdit_accel.grid import VideoGrid
from vdit_accel.plan import LayerPlan, compile_layer_plan, layer_signature
from vdit_accel.strategy import Strategy

from .adapters import Adapter, adapter_for
from .backend import BACKEND_NAME, STATE_ATTR, _running, _SDPAToBackend, local_heads, register_backend
from .notice import warn_once
from .permute import OrderRuntime
from .prologue import fused_body

logger = logging.getLogger("vdit_accel")

_processor_classes: dict[type, type] = {}


def _patched_processor_class(base: type, route_sdpa: bool = False) -> type:
    """The model's own processor class, with our backend and the processor published per call (in this
    thread's slot, :data:`.backend._running`).

    Wan-style processors run their self-attention calls with the fused Q/K norm + RoPE prologue
    (:mod:`.prologue`) where the processor's ``_vdit_fused_prologue`` is set.

    ``functools.wraps`` keeps the base ``__call__`` signature visible to ``inspect.signature``:
    diffusers' ``Attention.forward`` drops keyword arguments the processor does not name. With
    ``route_sdpa`` (processors that call ``F.scaled_dot_product_attention`` themselves) the call runs
    under :class:`~.backend._SDPAToBackend`, which sends that one op to our backend.

    ``_attention_backend`` is our backend, whatever diffusers sets it to: ``set_attention_backend(...)`` or
    ``reset_attention_backend()`` on a patched model leave its patched layers on our attention (with a
    warning: :func:`unpatch` first to use another backend) rather than sending them to another backend
    while the patch state still says patched.
    """
    cls = _processor_classes.get((base, route_sdpa))
    if cls is not None:
        return cls
    fused = None if route_sdpa else fused_body(base)
    member = register_backend()

    def get_backend(self):
        return member

    def set_backend(self, value) -> None:
        name = str(getattr(value, "value", value))
        if name.lower() == BACKEND_NAME:
            return
        what = "reset_attention_backend()" if value is None else f"set_attention_backend({name!r})"
        warn_once(f"vdit-accel: {what} on a model patched by vdit-accel: its patched self-attention layers keep "
                  "vdit-accel's attention (the others follow the call); vdit_accel.unpatch() the model first to "
                  "use another backend there")

    @functools.wraps(base.__call__)
    def __call__(self, *args, **kwargs):
        prev, _running.proc = _running.proc, self
        try:
            if fused is not None and self._vdit_fused_prologue:
                out = fused(self, *args, **kwargs)
                if out is not None:
                    return out
            if route_sdpa:
                with _SDPAToBackend():
                    return base.__call__(self, *args, **kwargs)
            return base.__call__(self, *args, **kwargs)
        finally:
            _running.proc = prev

    cls = type(f"Vdit{base.__name__}", (base,), {"__call__": __call__, "__module__": __name__,
                                                  "_attention_backend": property(get_backend, set_backend)})
    _processor_classes[(base, route_sdpa)] = cls
    return cls


class _StepTracker:
    """The denoising step, from the sequence of timesteps the transformer(s) see.

    An equal timestep is the other half of classifier-free guidance; a change in the direction the
    timesteps have been moving starts a new generation. Direction-agnostic because Mochi's timesteps
    rise (0 -> 1000) where everyone else's fall. One tracker is shared by the transformers patched
    together (Wan 2.2's ``transformer`` and ``transformer_2`` split one schedule between them).
    """

    def __init__(self):
        self.step, self.last, self.direction = 0, None, 0

    def observe(self, t: float) -> None:
        if self.last is not None and t != self.last:
            d = 1 if t > self.last else -1
            if self.direction in (0, d):
                self.step, self.direction = self.step + 1, d
            else:
                self.step, self.direction = 0, 0
        self.last = t

    def reset(self) -> None:
        self.step, self.last, self.direction = 0, None, 0


class PatchState:
    """What a patched transformer carries: strategy, grid, step, its layer plans, the originals."""

    def __init__(self, transformer: torch.nn.Module, adapter: Adapter, strategy: Strategy, block_size: int,
                 steps: _StepTracker | None = None):
        self.adapter = adapter
        self.strategy = strategy
        self.block_size = block_size
        self.num_heads = adapter.num_heads(transformer)
        self.layers = adapter.layers(transformer)
        # The grid of the last forward call (text_len as the forward was given it), and of the
        # attention call in flight (text_len as that call's sequence has it; Mochi drops padded text
        # per sample, HunyuanVideo masks it; updated for the observers).
        self.grid: VideoGrid | None = None
        self.call_grid: VideoGrid | None = None
        self._forward_seen = False
        self.parallel = False  # whether the last forward ran under context parallelism (enable_parallelism)
        self._steps = steps or _StepTracker()
        # What each layer's heads do, as a key: layers with equal signatures share their plans.
        self._signatures = [layer_signature(strategy, i, self.num_heads) for i in range(len(self.layers))]
        self._plans: dict[tuple, LayerPlan] = {}  # (signature, grid, device, heads, phase, frame) -> its plan
        self._forward_plans: dict[tuple, tuple[LayerPlan, ...]] = {}  # (grid, device, phase, heads, parallel) -> per layer
        self.scheduler = None  # the patched pipeline's scheduler: its timesteps tell the step count
        self.originals: dict[str, object] = {}
        self.processors: list = []  # the patched processors, in layer order
        self.hook = None
        self.orders = None  # the token orders' runtime (.permute.OrderRuntime) when the strategy has any
        # Called as observer(layer, step, q, k, v) before each patched self-attention call, q/k/v in
        # (B, S, H, D); ``call_grid`` describes their sequence (with a key-padding mask, each
        # sample's valid tokens come as a call of their own, B = 1). Under torch.compile an observer
        # runs eagerly (a graph break per call while any is installed).
        self.observers: list = []

    @property
    def step(self) -> int:
        return self._steps.step

    @step.setter
    def step(self, value: int) -> None:
        self._steps.step = value

    @property
    def known_step(self) -> int | None:
        """The step, or None while no timestep has been seen (a transformer called without one)."""
        return None if self._steps.last is None else self._steps.step

    # Forward pre-hook of the transformer: the grid and the denoising step of this call, and each
    # layer's plan for them. Eager under torch.compile (it reads the timestep's value), so that the
    # compiled blocks see each layer's plan only as tensors on its processor.
    @torch.compiler.disable
    def on_forward(self, module, args, kwargs):
        self._forward_seen = True
        self.parallel = getattr(module, "_parallel_config", None) is not None
        self.grid = self.adapter.grid(module, args, kwargs)
        t = self.adapter.timestep(args, kwargs)
        # Under CUDA-graph capture the timestep's value cannot be read (a host sync): the step stays
        # where it is, and the graph replays the plans of that step.
        if t is not None and not (isinstance(t, torch.Tensor) and t.is_cuda and torch.cuda.is_current_stream_capturing()):
            # max: per-token (Wan 2.2 TI2V) or per-frame (SkyReels diffusion forcing) timesteps.
            self._steps.observe(float(t.max()) if isinstance(t, torch.Tensor) else float(t))
        hidden = args[0] if args else kwargs.get("hidden_states")
        self._prepare(hidden.device if isinstance(hidden, torch.Tensor) else None)

    def _prepare(self, device) -> None:
        """Give each patched processor its layer's plan for attention calls over the forward's whole grid,
        at this step, over the global heads it attends (all of them, or under Ulysses context parallelism
        this rank's slice: the processor's ``_parallel_config``). Plans are compiled on first use and
        cached per (grid, device, phase, heads); a later forward only looks them up."""
        if device is None:
            for proc in self.processors:
                proc._vdit_plan = None
            return
        phase = self.phase()
        heads = tuple(local_heads(getattr(p, "_parallel_config", None), self.num_heads) or (0, self.num_heads)
                      for p in self.processors)
        key = (self.grid, device, phase, heads, self.parallel)
        plans = self._forward_plans.get(key)
        if plans is None:
            plans = tuple(self._plan(i, self.grid, device, h, phase) for i, h in enumerate(heads))
            self._forward_plans[key] = plans
        for proc, plan in zip(self.processors, plans):
            proc._vdit_plan = plan

    def phase(self) -> tuple[int, bool]:
        """``(sparse, quantized)`` at the current step: the strategy's stage (0 in the dense warm-up;
        :meth:`Strategy.stage_at`); outside the strategy's unquantized first and last steps."""
        sparse = self.strategy.stage_at(self.step)  # 0 in the dense warm-up, else the schedule's stage
        if not self.strategy.is_quantized():
            return sparse, False
        num_steps = self.num_steps()
        if num_steps is None and self.strategy.quant_bf16_steps[1]:
            warn_once(
                "vdit-accel: the strategy runs its last denoising steps unquantized, but the step count is unknown "
                "(patch the pipeline, not only its transformer): quantizing them"
            )
        return sparse, self.strategy.quantized_at(self.step, num_steps)

    def num_steps(self) -> int | None:
        """The denoising steps of the generation in flight: the patched pipeline's scheduler's timesteps
        (None when only a transformer was patched, or before the pipeline set them)."""
        timesteps = getattr(self.scheduler, "timesteps", None)
        return len(timesteps) if timesteps is not None else None

    def reset(self) -> None:
        """Forget the step count (the next call counts as step 0)."""
        self._steps.reset()

    def grid_for(self, seq_len: int, layer: int = 0) -> VideoGrid | None:
        """The grid of an attention call over ``seq_len`` tokens: the forward's video grid with the
        call's own text length. None when the forward could not tell the grid (then calls run dense)."""
        grid = self.grid
        if grid is None:
            if not self._forward_seen:
                raise RuntimeError(
                    f"vdit-accel: the self-attention of layer {layer} ran before any forward of the patched "
                    "transformer; call the patched transformer's forward, not its blocks directly"
                )
            return None
        text_len = seq_len - grid.video_len
        if text_len == grid.text_len:
            return grid
        if text_len < 0 or (text_len > 0 and grid.text_at == "none"):
            raise RuntimeError(
                f"vdit-accel: the self-attention of layer {layer} got {seq_len} tokens but the "
                f"transformer's forward announced grid {grid}; call the patched transformer's forward, "
                "not its blocks directly"
            )
        return VideoGrid(grid.t, grid.h, grid.w, text_len, grid.text_at if text_len else "none")

    def plan(self, layer: int, query: torch.Tensor, grid: VideoGrid | None = None,
             heads: tuple[int, int] | None = None) -> LayerPlan:
        """The plan of ``layer`` for ``grid`` (default: the call grid of ``query``'s length) at the current
        step, over global heads ``heads = (start, stop)`` (default: all), on ``query``'s device."""
        grid = grid or self.grid_for(query.shape[1], layer)
        return self._plan(layer, grid, query.device, heads or (0, self.num_heads), self.phase())

    def _plan(self, layer: int, grid: VideoGrid | None, device, heads: tuple[int, int],
              phase: tuple[bool, bool]) -> LayerPlan:
        # The order the tokens arrive in: the frame's, except under context parallelism (no frame there).
        frame = self.orders.frame_order if self.orders is not None and grid is not None and not self.parallel else None
        key = (self._signatures[layer], grid, torch.device(device), heads, phase, frame)
        plan = self._plans.get(key)
        if plan is None:
            if grid is None and phase[0] and not self.strategy.is_dense():
                warn_once(
                    f"vdit-accel: {self.adapter.family}: the transformer's forward "
                    "did not tell the token grid (e.g. LTX given video_coords only); running such calls dense"
                )
            plan = self._plans[key] = compile_layer_plan(
                self.strategy, layer, self.num_heads, grid, heads, self.block_size, device,
                sparse=phase[0], quantized=phase[1], frame=frame)
        return plan

    def mean_density(self, grid: VideoGrid) -> float:
        """Fraction of (query block, key block) pairs visited, over all layers and heads (1.0 = dense;
        semantic / segment heads, whose blocks are chosen per call, count as dense)."""
        heads = (0, self.num_heads)
        plans = [self._plan(i, grid, torch.device("cpu"), heads, (True, False)) for i in range(len(self.layers))]
        return sum(p.density() for p in plans) / len(plans)

    def clear(self) -> None:
        """Drop every plan (their masks: GPU memory) now."""
        self._plans.clear()
        self._forward_plans.clear()
        for proc in self.processors:
            proc._vdit_plan = None


def _transformers_of(obj) -> list[torch.nn.Module]:
    if isinstance(obj, torch.nn.Module):
        return [obj]
    found = [getattr(obj, n, None) for n in ("transformer", "transformer_2")]
    found = [t for t in found if t is not None]
    if not found:
        raise ValueError(f"{type(obj).__name__} has no 'transformer'; pass a diffusers pipeline or its transformer")
    return found


def patch(pipe_or_transformer, strategy: Strategy | str | Path = "dense", *, block_size: int = 128,
          quant: str | None = None, order: str | dict | None = None, fused_prologue: bool = True):
    """Route the self-attention of a diffusers video pipeline (or transformer) through vdit-accel.

    Args:
        pipe_or_transformer: a pipeline (its ``transformer`` and, for Wan 2.2, ``transformer_2`` are
            patched) or a transformer model.
        strategy: a :class:`Strategy`, a path to a strategy file, ``"dense"``, or a uniform pattern
            in short form (``"window3d:t=1,h=2,w=2"``).
        block_size: tokens per query and key block of the sparse masks (128 matches the kernels' tiles
            on Hopper; smaller blocks follow a pattern more closely at more per-block overhead).
        quant: if given (``"fp8"``, ``"int8"``, ``"int4"``), every head runs in that mode, overriding
            the strategy's own ``quant`` (whose ``quant_bf16_steps`` still apply).
        order: if given, every head's token order (``"tiled"``, ``"semantic:top_p=0.9,refresh=4"``,
            ``"segment"``, ``"raster"``; see :mod:`vdit_accel.orders`), overriding the strategy's.
            ``semantic`` and ``segment`` choose their own key blocks and need the ``"dense"`` pattern.
        fused_prologue: Wan 2.1/2.2 and SkyReels-V2 self-attention normalise and rotate Q and K in one
            Triton pass instead of the processor's ~20 eager kernels (:mod:`vdit_accel.pipelines.prologue`;
            on CUDA; equal to the eager result up to the norm's summation order). ``False`` keeps the
            processor's own prologue.

    Only the video self-attention processors the model's adapter lists are replaced (``attn1``, or
    HunyuanVideo's joint ``attn``); cross-attention, text refiners and pools are left alone. The token
    grid is read from each forward call, the denoising step tracked from its timestep, and each layer's
    plan (block mask, head runs, token orders) compiled once per grid (:mod:`vdit_accel.plan`). Text tokens of joint attention are always attended densely. Patching twice raises; :func:`unpatch` restores the originals.
    Returns the object it was given.
    """
    strategy = Strategy.from_spec(strategy, quant=quant, order=order)
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")
    transformers = _transformers_of(pipe_or_transformer)
    for tr in transformers:
        if hasattr(tr, STATE_ATTR):
            raise RuntimeError(f"{type(tr).__name__} is already patched by vdit-accel; call unpatch() first")
    plans = []
    for tr in transformers:  # validate everything before changing anything
        adapter = adapter_for(tr)
        layers = adapter.layers(tr)
        strategy.validate_for(type(tr).__name__, len(layers), adapter.num_heads(tr), adapter.head_dim(tr))
        plans.append((tr, adapter))
    steps = _StepTracker()
    for tr, adapter in plans:
        state = PatchState(tr, adapter, strategy, block_size, steps)
        state.scheduler = getattr(pipe_or_transformer, "scheduler", None)
        for i, (name, attn) in enumerate(state.layers):
            orig = attn.processor
            proc = object.__new__(_patched_processor_class(type(orig), adapter.calls_sdpa))
            proc.__dict__.update(orig.__dict__)
            proc._vdit_state, proc._vdit_layer, proc._vdit_plan = state, i, None
            proc._vdit_fused_prologue = bool(fused_prologue)
            state.originals[name] = orig
            state.processors.append(proc)
            attn.processor = proc
        state.hook = tr.register_forward_pre_hook(state.on_forward, with_kwargs=True)
        if strategy.uses_orders():
            state.orders = OrderRuntime(tr, state)  # its hooks run after state.on_forward
        setattr(tr, STATE_ATTR, state)
    logger.info("vdit-accel: patched %d transformer(s) with %s", len(plans), strategy.describe())
    return pipe_or_transformer


def unpatch(pipe_or_transformer):
    """Restore the original attention processors exactly and remove our hooks."""
    transformers = _transformers_of(pipe_or_transformer)
    if not any(hasattr(tr, STATE_ATTR) for tr in transformers):
        names = " and ".join(type(t).__name__ for t in transformers)
        owner = "" if isinstance(pipe_or_transformer, torch.nn.Module) else f"{type(pipe_or_transformer).__name__}'s "
        raise RuntimeError(f"{owner}{names} is not patched by vdit-accel: nothing to unpatch (patch() it first)")
    for tr in transformers:
        state: PatchState | None = getattr(tr, STATE_ATTR, None)
        if state is None:
            continue
        for name, attn in state.layers:
            orig = state.originals[name]
            # enable_parallelism() after patch() gave the parallel config to our processor only.
            cfg = getattr(attn.processor, "_parallel_config", None)
            if cfg is not None and getattr(orig, "_parallel_config", None) is not cfg:
                orig._parallel_config = cfg
            attn.processor = orig
        state.hook.remove()
        if state.orders is not None:
            state.orders.remove()
        state.clear()  # the plans' masks, freed now rather than at the next garbage collection
        delattr(tr, STATE_ATTR)
    return pipe_or_transformer


def patch_state(transformer) -> PatchState | None:
    """The :class:`PatchState` of a patched transformer (None if not patched)."""
    return getattr(transformer, STATE_ATTR, None)
