"""``vdit-accel bench pipeline``: one denoising step of a real video DiT, dense against accelerated.

A transformer is built from its real config with random weights (the speed is the same as with
trained ones), directly on the device in the benchmark dtype, and called once per step with batch 1
(one transformer forward, as a guidance-distilled or per-branch CFG pipeline calls it). Each row of a
shape is one way of running that forward (``impl``):

- ``noop-attention``: patched, with self-attention replaced by a copy of V: the floor that
  attention-only acceleration cannot beat;
- ``dense-cudnn``: unpatched, diffusers' own attention path. Wan: PyTorch SDPA held to its cuDNN
  backend. HunyuanVideo: SDPA's default choice, which its text key-padding mask keeps off cuDNN and
  flash (diffusers' default path);
- ``ours-dense``: patched with the dense strategy (our Triton kernel; HunyuanVideo's padded text is
  excluded exactly, per sample);
- ``ours-window3d-0.15``: a uniform ``window3d`` whose block density is nearest 0.15 on that grid;
- ``flex-window3d-0.15``: the same patch and block masks, attention by FlexAttention (compiled on
  CUDA), every visited block passed as a full block; its first call is checked against ours (an
  error row if they differ by more than bf16 rounding);
- ``ours-window3d-0.15-fp8``: the same window with ``quant="fp8"``; skipped, with the reason, while
  :meth:`Strategy.uniform` does not accept ``quant`` or while the patched step does not apply it
  (its output equals the unquantized ``ours-window3d-0.15`` step's);
- ``ours-window3d-0.15-tiled`` / ``-tiled-fp8``: the same window with the tokens in the ``tiled`` order
  (permuted once per forward where the model allows, else per call): the same attended neighbourhood
  in fewer blocks (``density`` counts them in that order); ``flex-window3d-0.15-tiled``: FlexAttention
  on those masks (the tiled rows' flex ratio);
- ``ours-searched``: a strategy file from the offline search (``searched_strategy``), if it validates
  against the model; skipped otherwise. With random weights this row measures speed only.

Per row: ``ms`` the step time (median over the timed forwards), ``attn_ms`` the step's video
self-attention time, timed with CUDA events around every self-attention call (the attention backend
call that diffusers' processors make: mask lookup, per-sample text split and kernel included; Wan's
cross-attention and HunyuanVideo's text refiner excluded), ``attn_calls`` how many calls that was,
``peak_mem_gb`` the peak of ``torch.cuda.max_memory_allocated`` over the timed forwards (GB = 1e9
bytes; ``None`` on the CPU). The warm-up forward runs only the first block of each block list when
every layer is alike (uniform strategies: it compiles the kernels and builds all layers' masks), a
full forward otherwise. On the CPU (tiny shapes only) times come from ``time.perf_counter``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import gc
import json
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

VARIANTS = (
    "noop-attention",
    "dense-cudnn",
    "ours-dense",
    "ours-window3d-0.15",
    "flex-window3d-0.15",
    "ours-window3d-0.15-fp8",
    "ours-window3d-0.15-tiled",
    "flex-window3d-0.15-tiled",
    "ours-window3d-0.15-tiled-fp8",
    "ours-searched",
)
TARGET_DENSITY = 0.15

# Real configs (diffusers' transformer config.json of each checkpoint): Wan2.1-T2V-1.3B / 14B
# (dim 1536 / 5120 = heads x 128), HunyuanVideo (t2v 720p: the class defaults, which diffusers'
# conversion script instantiates). The tiny ones are CPU test sizes of the same classes.
_WAN_COMMON = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
                   cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "wan2.1-1.3b": ("WanTransformer3DModel", dict(
        _WAN_COMMON, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30)),
    "wan2.1-14b": ("WanTransformer3DModel", dict(
        _WAN_COMMON, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40)),
    "hunyuan-video": ("HunyuanVideoTransformer3DModel", dict(
        in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
        num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
        guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
        rope_axes_dim=(16, 56, 56))),
    "tiny-wan": ("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), in_channels=4, out_channels=4, text_dim=32, freq_dim=32, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=256, num_attention_heads=2,
        attention_head_dim=32, ffn_dim=64, num_layers=2)),
    "tiny-hunyuan": ("HunyuanVideoTransformer3DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
        guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=16, rope_theta=256.0,
        rope_axes_dim=(4, 6, 6))),
}


@dataclass(frozen=True)
class BenchShape:
    """One benchmarked (model, resolution).

    Args:
        model: a key of :data:`CONFIGS`.
        latent: the VAE latent's (frames, height, width) (Wan and HunyuanVideo: 4x temporal, 8x
            spatial compression; 81 frames -> 21, 129 -> 33).
        text_max: text tokens the pipeline passes (padded: Wan 512, HunyuanVideo 256).
        text_valid: of which real (HunyuanVideo masks the rest; Wan attends all 512).
        reps: timed forwards by default.
        what: the setting, in words.
    """

    model: str
    latent: tuple[int, int, int]
    text_max: int
    text_valid: int
    reps: int
    what: str

    @property
    def real(self) -> bool:
        return not self.model.startswith("tiny-")


SHAPES: dict[str, BenchShape] = {
    "wan2.1-1.3b-480p": BenchShape("wan2.1-1.3b", (21, 60, 104), 512, 512, 3, "Wan2.1-T2V-1.3B, 480x832, 81 frames"),
    "wan2.1-1.3b-720p": BenchShape("wan2.1-1.3b", (21, 90, 160), 512, 512, 3, "Wan2.1-T2V-1.3B, 720x1280, 81 frames"),
    "wan2.1-14b-720p": BenchShape("wan2.1-14b", (21, 90, 160), 512, 512, 2, "Wan2.1-T2V-14B, 720x1280, 81 frames"),
    # 64 valid text tokens: a prompt of about 50 words after HunyuanVideo's template is cropped.
    "hunyuan-720p": BenchShape("hunyuan-video", (33, 90, 160), 256, 64, 1,
                               "HunyuanVideo (13B), 720x1280, 129 frames, 64 of 256 text tokens valid"),
    "tiny-wan": BenchShape("tiny-wan", (5, 16, 20), 8, 8, 1, "tiny Wan (CPU test size)"),
    "tiny-hunyuan": BenchShape("tiny-hunyuan", (5, 16, 20), 16, 5, 1, "tiny HunyuanVideo (CPU test size), 5 of 16 text tokens valid"),
}
REAL_SHAPES = tuple(n for n, s in SHAPES.items() if s.real)

# window3d radii (t, h, w) tried for the ~0.15 row, from a single cell up to most of a 720p frame.
_WINDOW_T = (0, 1, 2, 3, 4)
_WINDOW_HW = ((1, 1), (2, 2), (2, 3), (3, 4), (4, 6), (6, 10), (8, 12), (10, 16), (12, 20), (14, 24))


# -- building ----------------------------------------------------------------------------------


def build_transformer(shape: str, device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """The transformer of ``shape`` with random weights, and the keyword inputs of one forward.

    Parameters are created on ``device`` in ``dtype`` directly (no float32 copy on the host), with the
    class's default initialisation; modules the class keeps in float32 when loaded in a lower
    precision (Wan's norms, time embedder and modulation table) are kept in float32, as
    ``from_pretrained(..., torch_dtype=dtype)`` does. ``device="meta"`` builds without memory (inputs
    then on meta too). Returns ``(model, inputs)``; ``inputs`` as the diffusers pipeline passes them.
    """
    import diffusers

    spec = SHAPES[shape]
    cls_name, config = CONFIGS[spec.model]
    cls = getattr(diffusers, cls_name)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(seed)
        with torch.device(device):
            model = cls(**config)
    finally:
        torch.set_default_dtype(prev)
    keep = type(model)._keep_in_fp32_modules or []
    if dtype != torch.float32 and keep:
        for name, p in model.named_parameters():
            if any(m in name.split(".") for m in keep):
                p.data = p.data.float()
    model.eval().requires_grad_(False)

    g = torch.Generator(device).manual_seed(seed) if torch.device(device).type != "meta" else None
    f, h, w = spec.latent

    def randn(*size, dt=dtype):
        return torch.randn(*size, device=device, dtype=dt, generator=g)

    hidden = randn(1, config["in_channels"], f, h, w)
    timestep = torch.tensor([500.0], device=device)  # float32, as the pipelines pass it
    if cls_name == "WanTransformer3DModel":
        inputs = dict(hidden_states=hidden, timestep=timestep,
                      encoder_hidden_states=randn(1, spec.text_max, config["text_dim"]), return_dict=False)
    else:
        mask = (torch.arange(spec.text_max, device=device) < spec.text_valid).long().unsqueeze(0)  # the tokenizer's int64
        inputs = dict(hidden_states=hidden, timestep=timestep,
                      encoder_hidden_states=randn(1, spec.text_max, config["text_embed_dim"]),
                      encoder_attention_mask=mask, pooled_projections=randn(1, config["pooled_projection_dim"]),
                      guidance=torch.tensor([6000.0], device=device, dtype=dtype),  # guidance_scale 6.0 x 1000
                      return_dict=False)
    return model, inputs


def call_grid(model, inputs, shape: str):
    """The :class:`VideoGrid` of the self-attention calls of one forward: the video grid plus the
    valid text tokens where the model attends text jointly (HunyuanVideo: suffix)."""
    from vdit_accel.grid import VideoGrid
    from vdit_accel.pipelines import adapter_for

    grid = adapter_for(model).grid(model, (), inputs)
    valid = SHAPES[shape].text_valid if grid.text_len else 0
    return VideoGrid(grid.t, grid.h, grid.w, valid, grid.text_at if valid else "none")


_LADDER_DENSITY: dict = {}  # (grid, block_size, order) -> [((t, h, w), density)]: one build per ladder


def window_near(grid, target: float = TARGET_DENSITY, block_size: int = 128, device=None, order: str | None = None) -> str:
    """The uniform ``window3d`` (short form) whose block density on ``grid`` is nearest ``target``, its
    blocks counted in ``order`` (``None``: raster; ``"tiled"``: the tiled order's blocks)."""
    from vdit_accel.orders.spec import parse_order
    from vdit_accel.orders.static import block_mask_for_order, static_order
    from vdit_accel.patterns import Window3d, build_block_mask_for_pattern

    key = (grid, block_size, order)
    if key not in _LADDER_DENSITY:
        perm = None if order is None else static_order(parse_order(order), grid, block_size, device)
        ladder = []
        for t in _WINDOW_T:
            for h, w in _WINDOW_HW:
                p = Window3d(t=t, h=h, w=w)
                mask = (build_block_mask_for_pattern(p, grid, block_size, block_size, device) if perm is None
                        else block_mask_for_order(p, grid, perm, block_size, block_size))
                ladder.append(((t, h, w), mask.float().mean().item()))
        _LADDER_DENSITY[key] = ladder
    best = min(_LADDER_DENSITY[key], key=lambda e: abs(e[1] - target))[0]
    return f"window3d:t={best[0]},h={best[1]},w={best[2]}"


# -- attention swaps -----------------------------------------------------------------------------


def _noop_attention(q, k, v, *plan_args, **plan_kwargs):
    return v.clone()  # a copy: a custom op's output may not alias its input


class _FlexAttention:
    """Our backend's attention computed by FlexAttention on the same block mask (compiled on CUDA).

    Every visited block goes in as a *full* block (no mask_mod inside it, FlexAttention's fastest
    path); the mask_mod, a lookup of the block mask, is what FlexAttention's eager path (CPU) applies.
    The first call is also run through our attention and ``rel_err`` keeps ‖flex − ours‖ / ‖ours‖: a
    check that both ran the same mask.
    """

    def __init__(self, compiled: bool):
        from torch.nn.attention.flex_attention import flex_attention

        self._fn = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
        self._masks: dict[tuple, tuple] = {}
        self.rel_err: float | None = None

    def _flex_mask(self, bm):
        from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

        # The kv tensors live in the patch's mask cache for the whole row: their addresses identify them.
        key = (bm.kv_indices.data_ptr(), bm.kv_num_blocks.data_ptr(), tuple(bm.kv_indices.shape), bm.seq_len)
        if key not in self._masks:
            dense = bm.to_dense()[0]  # [H, Mb, Nb]
            bm_, bn_ = bm.block_m, bm.block_n

            def mask_mod(b, h, q_idx, kv_idx):
                return dense[h, q_idx // bm_, kv_idx // bn_]

            flex = FlexBlockMask.from_kv_blocks(
                torch.zeros_like(bm.kv_num_blocks), bm.kv_indices, bm.kv_num_blocks, bm.kv_indices,
                BLOCK_SIZE=(bm_, bn_), mask_mod=mask_mod, seq_lengths=(bm.seq_len, bm.seq_len))
            self._masks[key] = (bm.kv_indices, bm.kv_num_blocks, flex)  # keep the tensors alive with it
        return self._masks[key][2]

    def __call__(self, q, k, v, kv_num_blocks, kv_indices, block_m, block_n, runs, q_index=None, k_index=None,
                 scale=None):
        from vdit_accel.attention import attention
        from vdit_accel.block_mask import BlockMask

        if kv_num_blocks is None or len(runs) > 1 or runs[0].mode is not None or q_index is not None or k_index is not None:
            raise RuntimeError("the flex rows take unquantized block-sparse calls without token orders only")
        block_mask = BlockMask(kv_num_blocks, kv_indices, q.shape[1], block_m, block_n)
        out = self._fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=self._flex_mask(block_mask),
                       scale=scale).transpose(1, 2)
        if self.rel_err is None:
            ref = attention(q, k, v, block_mask, scale=scale).float()
            self.rel_err = float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))
        return out


# -- timing --------------------------------------------------------------------------------------


class _Clock:
    """Elapsed milliseconds between start() and stop(): CUDA events on CUDA, perf_counter on the CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def start(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def stop(self, start) -> Callable[[], float]:
        """A thunk that gives the milliseconds (after a synchronize, on CUDA)."""
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            return lambda: start.elapsed_time(end)
        ms = (time.perf_counter() - start) * 1e3
        return lambda: ms


class _Tally:
    """Milliseconds of the calls timed through :meth:`timed` since the last :meth:`reset`."""

    def __init__(self, clock: _Clock):
        self.clock = clock
        self._pending: list[Callable[[], float]] = []

    def timed(self, fn, *args, **kwargs):
        start = self.clock.start()
        out = fn(*args, **kwargs)
        self._pending.append(self.clock.stop(start))
        return out

    def reset(self) -> None:
        self._pending = []

    def total(self) -> tuple[float, int]:
        """(milliseconds, calls) since the last reset (synchronize first on CUDA)."""
        return sum(t() for t in self._pending), len(self._pending)


class _SelfAttentionTimer(_Tally):
    """Times every video self-attention call while active.

    Wraps each backend of diffusers' attention registry (the patched processors' ``"vdit"`` backend
    and the native SDPA one alike; both are looked up there per call). A call counts when its query
    and key lengths are equal and at least ``min_len`` (the video's tokens, or a Ulysses rank's share of
    them): Wan's cross-attention (text keys) and HunyuanVideo's token refiner (text only) pass through
    untimed. Under Ulysses a call includes its all-to-all exchanges.
    """

    def __init__(self, min_len: int, clock: _Clock):
        super().__init__(clock)
        self.min_len = min_len
        self._saved: dict | None = None

    def __enter__(self):
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry as registry

        self._saved = dict(registry._backends)
        for name, fn in self._saved.items():
            registry._backends[name] = self._wrap(fn)
        return self

    def __exit__(self, *exc):
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry as registry

        registry._backends.update(self._saved)

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            q, k = kwargs.get("query"), kwargs.get("key")
            if q is None or k is None or q.shape[1] != k.shape[1] or q.shape[1] < self.min_len:
                return fn(*args, **kwargs)
            return self.timed(fn, *args, **kwargs)

        return timed


class _ExchangeTimer(_Tally):
    """Times the collectives of Ulysses attention while active: diffusers' all-to-all
    (``attention_dispatch._all_to_all_single``, which HunyuanVideo's joint exchange calls too) and that
    exchange's all-gather of the text heads (:func:`vdit_accel.pipelines.parallel.all_gather_heads`).
    CUDA events on the compute stream around each: the collective's time plus any wait for the other
    ranks to reach it."""

    _TARGETS = (("diffusers.models.attention_dispatch", "_all_to_all_single"),
                ("vdit_accel.pipelines.parallel", "all_gather_heads"))

    def __enter__(self):
        import importlib

        self._saved = [(importlib.import_module(m), n) for m, n in self._TARGETS]
        self._saved = [(mod, name, getattr(mod, name)) for mod, name in self._saved]
        for mod, name, fn in self._saved:
            setattr(mod, name, functools.partial(self.timed, fn))
        return self

    def __exit__(self, *exc):
        for mod, name, fn in self._saved:
            setattr(mod, name, fn)


@contextlib.contextmanager
def _first_blocks_only(model):
    """Temporarily keep only the first block of each of the model's block lists (a cheap warm-up)."""
    saved = {n: m for n, m in model.named_children() if isinstance(m, torch.nn.ModuleList) and len(m) > 1}
    try:
        for n, m in saved.items():
            setattr(model, n, torch.nn.ModuleList([m[0]]))
        yield
    finally:
        for n, m in saved.items():
            setattr(model, n, m)


def _time_forward(model, inputs, reps: int, timer: _SelfAttentionTimer, cheap_warmup: bool,
                  exchange: _ExchangeTimer | None = None) -> tuple[dict, torch.Tensor]:
    """Step and self-attention times (and, given ``exchange``, Ulysses' all-to-all times) of ``reps``
    forwards after a warm-up; also the last forward's output."""
    cuda = timer.clock.cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with torch.no_grad():
        with _first_blocks_only(model) if cheap_warmup else contextlib.nullcontext():
            model(**inputs)  # warm-up: kernel compilation, block masks, cuDNN plans, allocator
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        steps, attns, calls, a2a, a2a_calls = [], [], set(), [], set()
        for _ in range(reps):
            for t in (timer, exchange):
                if t is not None:
                    t.reset()
            start = timer.clock.start()
            out = model(**inputs)[0]
            elapsed = timer.clock.stop(start)
            sync()
            steps.append(elapsed())
            ms, n = timer.total()
            attns.append(ms)
            calls.add(n)
            if exchange is not None:
                ms, n = exchange.total()
                a2a.append(ms)
                a2a_calls.add(n)
    if len(calls) != 1 or len(a2a_calls) > 1:
        raise RuntimeError(f"self-attention calls ({sorted(calls)}) or all-to-all calls ({sorted(a2a_calls)}) per "
                           "forward changed between repetitions")
    stats = {"ms": round(statistics.median(steps), 2), "attn_ms": round(statistics.median(attns), 2),
             "attn_calls": calls.pop()}
    if exchange is not None:
        stats.update(a2a_ms=round(statistics.median(a2a), 2), a2a_calls=a2a_calls.pop())
    stats["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None
    return stats, out


# -- one shape -----------------------------------------------------------------------------------


def _fp8_strategy(window: str):
    """``Strategy.uniform(window, quant="fp8")``, or the reason it cannot be made yet."""
    from vdit_accel import Strategy
    from vdit_accel.patterns import parse_pattern

    try:
        return Strategy.uniform(parse_pattern(window), quant="fp8"), None
    except (TypeError, ValueError) as e:
        return None, f"Strategy.uniform(..., quant='fp8') is not accepted yet ({type(e).__name__}: {e})"


def _searched_strategy(path: Path | None, model):
    """The strategy file at ``path`` if it validates against ``model`` (dense warm-up set to 0: one
    step is timed), or the reason to skip."""
    from vdit_accel import Strategy
    from vdit_accel.pipelines import adapter_for

    if path is None:
        return None, "no searched strategy file given (--searched-strategy)"
    try:
        st = Strategy.load(path)
        a = adapter_for(model)
        st.validate_for(type(model).__name__, len(a.layers(model)), a.num_heads(model), a.head_dim(model))
    except ValueError as e:
        return None, f"{Path(path).name}: {e}"
    return dataclasses.replace(st, dense_warmup_steps=0, layer_warmup_steps=None), None  # its first sparse range


def _density(strategy, num_layers: int, num_heads: int, grid, block_size: int, device) -> float:
    """Mean block density over layers; heads in a static order (tiled) count their blocks in that order."""
    from vdit_accel.plan import compile_layer_plan

    plans = {}
    for layer in range(num_layers):
        key = strategy.layer_heads(layer, num_heads)
        if key not in plans:
            plans[key] = compile_layer_plan(strategy, layer, num_heads, grid, (0, num_heads), block_size, device,
                                            quantized=False).density()
    return sum(plans[strategy.layer_heads(layer, num_heads)] for layer in range(num_layers)) / num_layers


def _run_variant(model, inputs, strategy, attention_fn, reps, grid, block_size, on_cudnn, ulysses: int | None = None):
    """Patch with ``strategy`` (None: leave diffusers' path), swap the attention behind the
    ``vdit::attention`` op for ``attention_fn`` (None: ours), time, and restore everything. ``ulysses``:
    the model's Ulysses degree, if run so (its all-to-all timed apart; self-attention calls over a rank's
    share of the video)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import vdit_accel
    from vdit_accel.pipelines import op as vdit_op
    from vdit_accel.pipelines import patch_state

    cuda = inputs["hidden_states"].device.type == "cuda"
    if isinstance(attention_fn, _FlexAttention) and cuda:
        import torch._dynamo

        torch._dynamo.reset()  # a fresh compile per shape: never near the recompile limit
    timer = _SelfAttentionTimer(grid.video_len // (ulysses or 1), _Clock(cuda))
    exchange = _ExchangeTimer(timer.clock) if ulysses is not None else None
    original = vdit_op.planned_attention  # what the vdit::attention op calls, key-padded or not
    try:
        if strategy is not None:
            vdit_accel.patch(model, strategy, block_size=block_size)
        if attention_fn is not None:
            vdit_op.planned_attention = attention_fn
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION) if on_cudnn else contextlib.nullcontext(), timer, \
                exchange or contextlib.nullcontext():
            return _time_forward(model, inputs, reps, timer, strategy is None or strategy.is_uniform, exchange)
    finally:
        vdit_op.planned_attention = original
        if patch_state(model) is not None:
            vdit_accel.unpatch(model)


def _quant_check(row: dict, out: torch.Tensor, unquantized: torch.Tensor | None) -> str | None:
    """Record how far the quantized step's output is from the same step unquantized; a skip reason if
    it is the same (the strategy's ``quant`` was accepted but not applied: no fp8 number to report)."""
    if unquantized is None:
        row["rel_diff_vs_bf16"] = None  # ours-window3d-0.15 not run: not checked
        return None
    a, b = out.float().nan_to_num(), unquantized.float().nan_to_num()
    diff = float((a - b).norm() / b.norm().clamp_min(1e-30))
    if diff < 1e-5:  # fp8 attention errs by ~1e-2 per call; a deterministic unquantized step by 0
        return f"quant='fp8' was accepted but the step's output equals the unquantized one (rel. diff {diff:.1e}): not applied yet"
    row["rel_diff_vs_bf16"] = diff
    return None


def run_shape(shape: str, variants=VARIANTS, reps: int | None = None, device: str = "cuda", block_size: int = 128,
              searched_strategy: Path | None = None, log: Callable[[str], None] = print,
              ulysses: int | None = None) -> tuple[list[dict], dict]:
    """Time one forward of ``shape`` for each of ``variants`` (rows in :data:`VARIANTS` order); with
    ``ulysses`` P (``torch.distributed`` set up with P processes, one device each) the transformer runs
    parallelised over them (:func:`~vdit_accel.pipelines.parallel.enable_ulysses`; P = 1: not), every row
    with its all-to-all time.

    Returns ``(rows, info)``: one row per variant (``skipped`` with the reason where a variant cannot
    run, ``error`` where it failed), and what was run (grid, window, SDPA backend, repetitions).
    """
    from vdit_accel import Strategy
    from vdit_accel.pipelines import adapter_for

    spec = SHAPES[shape]
    cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    model, inputs = build_transformer(shape, device, dtype)
    try:
        grid = call_grid(model, inputs, shape)
        adapter = adapter_for(model)
        num_layers, num_heads = len(adapter.layers(model)), adapter.num_heads(model)
        if ulysses is not None:
            from vdit_accel.pipelines.parallel import check_ulysses, enable_ulysses

            check_ulysses(model, ulysses, grid.video_len)
            enable_ulysses(model, ulysses)
        window = window_near(grid, TARGET_DENSITY, block_size, device)
        reps = reps or spec.reps
        # Wan: every row under cuDNN (the cross-attention too, alike in every row). HunyuanVideo: SDPA's
        # default choice (its key-padding mask rules out cuDNN and flash), in every row.
        on_cudnn = cuda and spec.text_valid == spec.text_max
        info = {"what": spec.what, "model": spec.model, "latent": list(spec.latent),
                "grid": [grid.t, grid.h, grid.w], "text_tokens": spec.text_valid, "text_max": spec.text_max,
                "window": window, "sdpa": "cudnn" if on_cudnn else "default", "reps": reps, "block_size": block_size,
                "ulysses": ulysses}
        log(f"{shape}: {spec.what}; grid {grid.t}x{grid.h}x{grid.w} + {grid.text_len} text = {grid.seq_len} tokens; "
            f"{window}; {reps} rep(s)")
        rows, outputs = [], {}
        for name in [v for v in VARIANTS if v in variants]:
            row: dict[str, Any] = {"shape": shape, "impl": name, "tokens": grid.seq_len}
            strategy, label, attention_fn, skip = None, None, None, None
            if name in ("noop-attention", "ours-dense"):
                strategy, label = Strategy.dense(), "dense"
                attention_fn = _noop_attention if name == "noop-attention" else None
            elif name in ("ours-window3d-0.15", "flex-window3d-0.15"):
                strategy, label = Strategy.from_spec(window), window
                attention_fn = _FlexAttention(compiled=cuda) if name.startswith("flex") else None
            elif name == "ours-window3d-0.15-fp8":
                (strategy, skip), label = _fp8_strategy(window), f"{window} quant=fp8"
            elif "-window3d-0.15-tiled" in name:  # the same window, tokens in the tiled order
                quant = "fp8" if name.endswith("-fp8") else None
                strategy = Strategy.from_spec(window, quant=quant, order="tiled")
                label = f"{window} order=tiled" + (" quant=fp8" if quant else "")
                attention_fn = _FlexAttention(compiled=cuda) if name.startswith("flex") else None
            elif name == "ours-searched":
                strategy, skip = _searched_strategy(searched_strategy, model)
                label = f"{Path(searched_strategy).name}: {strategy.describe()}" if strategy is not None else None
            if skip is None:
                if label is not None:
                    row["strategy"] = label
                try:
                    stats, out = _run_variant(model, inputs, strategy, attention_fn, reps, grid, block_size, on_cudnn,
                                              ulysses)
                    row.update(stats)
                    if strategy is not None:
                        row["density"] = round(_density(strategy, num_layers, num_heads, grid, block_size,
                                                        inputs["hidden_states"].device), 4)
                    if isinstance(attention_fn, _FlexAttention):
                        row["rel_err_vs_ours"] = attention_fn.rel_err
                        if attention_fn.rel_err > 2e-2:  # bf16 rounding gives ~3e-3; more means another mask
                            raise RuntimeError(f"FlexAttention's output differs from ours by {attention_fn.rel_err:.1e}: "
                                               "not the same block mask")
                    if name == "ours-window3d-0.15":
                        outputs[name] = out
                    elif name == "ours-window3d-0.15-fp8":
                        skip = _quant_check(row, out, outputs.get("ours-window3d-0.15"))
                except Exception as exc:  # one failing variant records its error (and no time); the run goes on
                    row = {"shape": shape, "impl": name, "tokens": grid.seq_len, "strategy": label,
                           "error": f"{type(exc).__name__}: {exc}"[:400]}
            if skip is not None:  # nothing measured (or measured but not what the row's name says) is kept
                row = {"shape": shape, "impl": name, "tokens": grid.seq_len, "skipped": skip}
            rows.append(row)
            log("  " + json.dumps(row))
        return rows, info
    finally:
        del model, inputs
        gc.collect()
        if cuda:
            from vdit_accel.patterns import clear_mask_caches

            clear_mask_caches()
            torch.cuda.empty_cache()


# -- a whole run ---------------------------------------------------------------------------------


def _check_args(shapes, variants, reps, device) -> None:
    bad = [s for s in shapes if s not in SHAPES]
    if not shapes or bad:
        raise ValueError(f"unknown shape(s) {bad or '(none given)'}; choose from {', '.join(SHAPES)}")
    bad = [v for v in variants if v not in VARIANTS]
    if not variants or bad:
        raise ValueError(f"unknown variant(s) {bad or '(none given)'}; choose from {', '.join(VARIANTS)}")
    if reps is not None and reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    if torch.device(device).type not in ("cuda", "cpu"):
        raise ValueError(f"device must be cuda or cpu, got {device!r}")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda asked for but no CUDA GPU is available; use --device cpu with a tiny shape")
    real = [s for s in shapes if SHAPES[s].real]
    if torch.device(device).type == "cpu" and real:
        raise ValueError(f"real-size shapes {real} need a CUDA GPU; on the CPU use tiny-wan or tiny-hunyuan")


def run_pipeline_bench(shapes, variants=VARIANTS, reps: int | None = None, out_dir: Path = Path("."),
                       device: str | None = None, block_size: int = 128, searched_strategy: Path | None = None,
                       command: str = "", git_sha: str | None = None,
                       log: Callable[[str], None] = print, ulysses: int | None = None,
                       baseline: Path | None = None) -> tuple[dict, Path]:
    """Run :func:`run_shape` for each shape and write ``out_dir/e2e-<gpu>-<yyyymmdd>.json`` (after
    every shape, so a cut-off run keeps what it measured). Returns the document and its path.

    ``ulysses`` P: each shape parallelised over the P processes of ``torch.distributed`` (P = 1: one, for
    the baseline), every row with ``a2a_ms`` / ``a2a_calls``, the file ``ulysses-<gpu>-<yyyymmdd>-p<P>.json``,
    written by rank 0 alone. ``baseline``: such a file of P = 1 (the same GPU): each row then has
    ``ms_1gpu``, ``speedup_vs_1gpu`` and ``efficiency`` (speed-up / P) against the row of its shape and
    impl there."""
    import diffusers

    import vdit_accel

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    variants = list(variants)
    _check_args(list(shapes), variants, reps, device)
    if searched_strategy is not None and not Path(searched_strategy).is_file():
        raise ValueError(f"searched strategy file {str(searched_strategy)!r} does not exist")
    if baseline is not None and ulysses is None:
        raise ValueError("--baseline is the one-GPU result of a --ulysses run: give --ulysses P too")
    one_gpu = _baseline_rows(baseline) if baseline is not None else None
    rank = torch.distributed.get_rank() if ulysses is not None and torch.distributed.is_initialized() else 0
    if rank:
        log = lambda msg: None  # noqa: E731  (rank 0 speaks)
    cuda = torch.device(device).type == "cuda"
    gpu = torch.cuda.get_device_name(torch.device(device)) if cuda else "cpu"
    if one_gpu is not None and one_gpu[0] != gpu:
        raise ValueError(f"--baseline {str(baseline)!r} was measured on {one_gpu[0]}, this run is on {gpu}")
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    today = dt.date.today()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    doc = {"gpu": gpu, "date": today.isoformat(), "command": command,
           "versions": {"torch": torch.__version__, "triton": triton_version, "diffusers": diffusers.__version__,
                        "vdit_accel": git_sha or vdit_accel.__version__},
           "protocol": (f"one transformer forward (batch 1, {'bf16' if cuda else 'float32'}, random weights, real config), "
                        "median of each shape's reps after one warm-up forward (only the first block of each block "
                        "list for uniform strategies); peak_mem_gb: torch.cuda.max_memory_allocated over the timed "
                        "forwards, 1e9 bytes"),
           "attn_timing": ("CUDA events" if cuda else "perf_counter") + " around every video self-attention call "
                          "(diffusers' attention-backend call), summed per forward",
           "shapes": {}, "rows": []}
    what, suffix = "e2e", ""
    if ulysses is not None:
        what, suffix = "ulysses", f"-p{ulysses}"
        doc.update(ulysses=ulysses, baseline=Path(baseline).name if baseline is not None else None,
                   a2a_timing=("CUDA events" if cuda else "perf_counter") + " around every collective of Ulysses "
                   "attention (diffusers' all-to-all; HunyuanVideo's joint exchange: its all-to-all and the text heads' "
                   "all-gather), summed per forward; every time is rank 0's")
    out_dir = Path(out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{what}-{slug}-{today:%Y%m%d}{suffix}.json"
    t0 = time.perf_counter()
    for shape in shapes:
        rows, info = run_shape(shape, variants, reps, device, block_size, searched_strategy, log, ulysses)
        if one_gpu is not None:
            _scaling(rows, one_gpu[1], ulysses)
        doc["shapes"][shape] = info
        doc["rows"] += rows
        if rank == 0:
            path.write_text(json.dumps(doc, indent=1) + "\n")
    log(f"{len(doc['rows'])} rows in {time.perf_counter() - t0:.0f} s -> {path}")
    return doc, path


def _baseline_rows(path: Path) -> tuple[str, dict]:
    """``(gpu, {(shape, impl): ms})`` of a one-GPU result file (``--ulysses 1``, or any of this bench)."""
    try:
        doc = json.loads(Path(path).read_text())
        if doc.get("ulysses", 1) != 1:
            raise ValueError(f"it is a --ulysses {doc['ulysses']} run, not a one-GPU one")
        return doc["gpu"], {(r["shape"], r["impl"]): r["ms"] for r in doc["rows"] if r.get("ms") is not None}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--baseline {str(path)!r}: not a result file of `bench pipeline` on one GPU ({e})") from None


def _scaling(rows: list[dict], one_gpu: dict, degree: int) -> None:
    """Each measured row's speed-up over its one-GPU time, and that over ``degree`` (the efficiency)."""
    for r in rows:
        base = one_gpu.get((r["shape"], r["impl"]))
        if r.get("ms") and base:
            r.update(ms_1gpu=base, speedup_vs_1gpu=round(base / r["ms"], 3), efficiency=round(base / r["ms"] / degree, 3))


# -- the table -----------------------------------------------------------------------------------


# The flex row on the same block masks as each of our sparse rows (their "vs flex" ratio).
_FLEX_ROW = {"ours-window3d-0.15": "flex-window3d-0.15", "ours-window3d-0.15-fp8": "flex-window3d-0.15",
             "ours-window3d-0.15-tiled": "flex-window3d-0.15-tiled",
             "ours-window3d-0.15-tiled-fp8": "flex-window3d-0.15-tiled"}


def speedups(rows: list[dict]) -> list[tuple[float | None, float | None]]:
    """Per row: (dense-cudnn ms / ms, flex ms / ms) of its shape, the flex row being the one on the same
    block masks: ``flex-window3d-0.15`` for ``ours-window3d-0.15`` and its ``-fp8``,
    ``flex-window3d-0.15-tiled`` for the tiled rows; None where a time is missing."""
    by = {(r["shape"], r["impl"]): r.get("ms") for r in rows}
    out = []
    for r in rows:
        ms, dense = r.get("ms"), by.get((r["shape"], "dense-cudnn"))
        flex = by.get((r["shape"], _FLEX_ROW.get(r["impl"])))
        out.append((dense / ms if ms and dense else None, flex / ms if ms and flex else None))
    return out


def _peak_gb(r: dict) -> float | None:
    if r.get("peak_mem_gb") is not None:
        return r["peak_mem_gb"]
    return r["peak_gib"] * 2**30 / 1e9 if r.get("peak_gib") is not None else None  # files before 2026-11-23


def markdown_table(doc: dict) -> str:
    """The rows of one result document as a markdown table (speed-ups against dense cuDNN and flex)."""
    lines = ["| shape | impl | block density | step ms | self-attention ms (share) | vs dense cuDNN | vs flex | peak GB |",
             "|---|---|---|---|---|---|---|---|"]

    def x(v):
        return f"{v:.2f}×" if v is not None else "—"

    for r, (vs_dense, vs_flex) in zip(doc["rows"], speedups(doc["rows"])):
        if r.get("ms") is None:
            why = r.get("skipped") or r.get("error") or "not run"
            lines.append(f"| {r['shape']} | {r['impl']} | — | — | — | — | — | — |  ({'skipped: ' if 'skipped' in r else ''}{why})")
            continue
        attn = r.get("attn_ms")
        share = f"{attn:.0f} ({100 * attn / r['ms']:.0f}%)" if attn is not None else "—"
        peak = _peak_gb(r)
        lines.append(f"| {r['shape']} | {r['impl']} | {r.get('density', 1.0):.3f} | {r['ms']:.0f} | {share} | "
                     f"{x(vs_dense)} | {x(vs_flex)} | {f'{peak:.1f}' if peak is not None else '—'} |")
    return "\n".join(lines)


def scaling_table(doc: dict) -> str:
    """The rows of a ``--ulysses`` result document: step and all-to-all times, and with a baseline the
    speed-up over one GPU and the scaling efficiency."""
    p = doc["ulysses"]
    lines = [f"| shape | impl | block density | step ms on {p} GPU(s) | all-to-all ms (share) | 1 GPU ms | speed-up | "
             "efficiency |", "|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        if r.get("ms") is None:
            why = r.get("skipped") or r.get("error") or "not run"
            lines.append(f"| {r['shape']} | {r['impl']} | — | — | — | — | — | — |  ({why})")
            continue
        a2a = f"{r['a2a_ms']:.0f} ({100 * r['a2a_ms'] / r['ms']:.0f}%)" if r.get("a2a_ms") is not None else "—"
        one = r.get("ms_1gpu")
        lines.append(f"| {r['shape']} | {r['impl']} | {r.get('density', 1.0):.3f} | {r['ms']:.0f} | {a2a} | "
                     + (f"{one:.0f} | {r['speedup_vs_1gpu']:.2f}× | {r['efficiency']:.2f} |" if one else "— | — | — |"))
    return "\n".join(lines)
