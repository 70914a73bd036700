"""Launch configurations of the attention kernel: per-architecture defaults, the opt-in autotune sweep
and its on-disk cache, and the checks a configuration must pass."""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch
import triton
import triton.language as tl

from .measurements import cache_dir
from .quantize import QuantMode

# Default configurations, keyed by (arch, head_dim bucket); the bucket is the smallest key >= D. The
# sm90 entries are the fastest of the Hopper sweeps (benchmarks/results/attention-sweep-*.json and
# quant-sweep-*.json; summarised in benchmarks/RESULTS.md). Where the input or the installed triton
# cannot do TMA / warp specialization, the default drops them (:func:`_launch_config`).
# - bf16 / fp16: TMA loads help at head_dim 64 and, with warp specialization, at 128; prefetch_idx
#   (sparse only: the next key block's index loaded one block ahead) takes away the sparse loop's
#   overhead over dense, with bit-equal outputs.
# - "-q" (fp8 / int8 Q·K, fp8 P·V): half the tensor work per tile, so more CTAs per SM beat bigger
#   tiles; fp8 adds prefetch_idx, int8 Q·K^T one block ahead (pipeline_qk: faster for int8, slower
#   for fp8).
# "ampere" also serves Ada and anything unknown; its stages keep shared memory under ~100 KB.
# "gpu-fp32" serves float32 inputs on any GPU (exact "ieee" dots, twice the bytes: tests, not speed).
# "interpret" is for TRITON_INTERPRET=1 on a CPU, where small tiles keep tests quick.
DEFAULT_CONFIGS: dict[tuple[str, int], dict[str, int]] = {
    ("sm90", 64): dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4, tma=True),
    ("sm90", 128): dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, tma=True, warp_specialize=True,
                        prefetch_idx=True),
    ("sm90", 256): dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    ("sm90-q", 64): dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3, tma=True),
    ("sm90-q", 128): dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3, tma=True),
    ("sm90-fp8", 128): dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3, tma=True, prefetch_idx=True),
    ("sm90-int8", 128): dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3, tma=True, pipeline_qk=True),
    ("ampere", 64): dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    ("ampere", 128): dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=2),
    ("ampere", 256): dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
    ("gpu-fp32", 64): dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
    ("gpu-fp32", 128): dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
    ("gpu-fp32", 256): dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2),
    ("interpret", 64): dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1),
    ("interpret", 128): dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1),
    ("interpret", 256): dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1),
}
_HEAD_DIM_BUCKETS = (64, 128, 256)
_CONFIG_KEYS = frozenset(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"))
_OPTIONAL_CONFIG_KEYS = {"warp_specialize": False, "tma": False, "pipeline_qk": False,
                         "prefetch_idx": False}
_MIN_HEAD_DIM, _MAX_HEAD_DIM = 16, 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _arch(device: torch.device, dtype: torch.dtype) -> str:
    if _interpreting() or device.type != "cuda":
        return "interpret"
    if dtype == torch.float32:
        return "gpu-fp32"
    major, _ = torch.cuda.get_device_capability(device)
    return "sm90" if major == 9 else "ampere"


def default_config(head_dim: int, device: torch.device, dtype: torch.dtype = torch.bfloat16,
                   quant: str | None = None) -> dict[str, int]:
    """The launch configuration used when ``config`` is None (before fitting it to the mask blocks).
    Quantized modes use the ``<arch>-<mode>`` entry, else the ``<arch>-q`` one, where there is one."""
    bucket = next(b for b in _HEAD_DIM_BUCKETS if head_dim <= b)
    arch = _arch(device, dtype)
    for key in ((arch + "-" + quant, bucket), (arch + "-q", bucket)) if quant is not None else ():
        if key in DEFAULT_CONFIGS:
            return dict(DEFAULT_CONFIGS[key])
    return dict(DEFAULT_CONFIGS[(arch, bucket)])


def gpu_tiles(head_dim: int, quant: str | None = None) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the Hopper default for this head_dim and mode (what the CPU simulation of
    the quantized kernel mimics: the tiles set the quantization grain)."""
    bucket = next(b for b in _HEAD_DIM_BUCKETS if head_dim <= b)
    cfg = DEFAULT_CONFIGS.get(("sm90-q", bucket), DEFAULT_CONFIGS[("sm90", bucket)]) if quant else DEFAULT_CONFIGS[("sm90", bucket)]
    return cfg["BLOCK_M"], cfg["BLOCK_N"]


# The opt-in sweep (config="autotune"): per head_dim bucket, the candidates tried on the real
# inputs, once per (GPU, dtype, shape, mask blocks), best kept in memory and in a JSON file.
AUTOTUNE_CANDIDATES: dict[int, list[dict]] = {
    64: [dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4, tma=True),
         dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4),
         dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4, tma=True, warp_specialize=True),
         dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, tma=True),
         dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, tma=True),
         dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)],
    128: [dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, tma=True, warp_specialize=True, prefetch_idx=True),
          dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, tma=True, prefetch_idx=True),
          dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3, tma=True, prefetch_idx=True),
          dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, tma=True, warp_specialize=True),
          dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3, tma=True),
          dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2, tma=True),
          dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=4, tma=True),
          dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4, tma=True),
          dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, tma=True),
          dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
          dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4, tma=True, warp_specialize=True),
          dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=2),
          dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
          # Q·K^T one block ahead (the int8 default).
          dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3, tma=True, pipeline_qk=True)],
    256: [dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
          dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
          dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2)],
}
_autotuned: dict[str, dict] = {}
try:
    from triton.errors import TritonError as _TritonError
except ImportError:  # older triton: compile errors derive from Exception directly
    _TritonError = Exception
_COMPILE_ERRORS = (RuntimeError, _TritonError)


def _can_time(q: torch.Tensor) -> bool:
    return q.device.type == "cuda" and not _interpreting()


def _autotune_file() -> str:
    return os.path.join(cache_dir(), f"autotune-triton{triton.__version__}.json")


def _autotune(q, k, v, sparse_args, mask_block_m, mask_block_n, run, quant=None) -> dict:
    """The fastest candidate config for these inputs (timed once, then cached)."""
    import json

    bsz, s, h, d = q.shape
    name = torch.cuda.get_device_name(q.device) if q.device.type == "cuda" else "cpu"
    key = f"{name}|{q.dtype}|{bsz}x{s}x{h}x{d}|{'sparse' if sparse_args else 'dense'}|{mask_block_m}x{mask_block_n}"
    if quant is not None:
        key += f"|{quant}"
    if not _autotuned:
        with contextlib.suppress(OSError, ValueError):
            with open(_autotune_file()) as f:
                _autotuned.update(json.load(f))
    if key in _autotuned:
        return dict(_autotuned[key])
    if not _can_time(q):
        return default_config(d, q.device, q.dtype, quant)
    from triton.testing import do_bench

    bucket = next(b for b in _HEAD_DIM_BUCKETS if d <= b)
    best, best_ms = None, float("inf")
    for cand in AUTOTUNE_CANDIDATES[bucket]:
        if sparse_args and (mask_block_m % cand["BLOCK_M"] or mask_block_n % cand["BLOCK_N"]):
            continue
        if cand.get("tma") and not (_tma_ok(k) and _tma_ok(v)):
            continue
        if cand.get("warp_specialize") and not _supports_warp_specialize():
            continue
        try:
            ms = do_bench(lambda: run(cand), warmup=5, rep=25, return_mode="median")
        except _COMPILE_ERRORS:  # a candidate the compiler rejects here (shared memory, a pass failure)
            continue
        if ms < best_ms:
            best, best_ms = dict(cand), ms
    if best is None:
        return default_config(d, q.device, q.dtype, quant)
    _autotuned[key] = best
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(_autotune_file()), exist_ok=True)
        with open(_autotune_file(), "w") as f:
            json.dump(_autotuned, f, indent=1)
    return dict(best)


@functools.cache
def _supports_warp_specialize() -> bool:
    import inspect

    return "warp_specialize" in inspect.signature(tl.range.__init__).parameters


@functools.cache
def _ws_prefetch_ok() -> bool:
    """Warp specialization of the prefetching sparse loop compiles (and was measured) with triton 3.4-3.6;
    triton 3.9's pass pipeline fails on it (sm_90 compile, 2026-11-22). Elsewhere the default drops
    warp specialization there (the prefetch is the larger of the two gains)."""
    try:
        major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    except ValueError:
        return False
    return (3, 4) <= (major, minor) <= (3, 6)


@functools.cache
def _has_tensor_descriptors() -> bool:
    try:
        import triton.tools.tensor_descriptor  # noqa: F401
    except ImportError:
        return False
    return True


def _tma_ok(x: torch.Tensor) -> bool:
    """Whether ``x`` can be read through a TMA descriptor (16-byte aligned base and strides)."""
    if not _has_tensor_descriptors():
        return False
    elem = x.element_size()
    return x.data_ptr() % 16 == 0 and all((st * elem) % 16 == 0 for st in x.stride()[:-1])


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def _check_config(config: dict, mask_block_m: int, mask_block_n: int, sparse: bool) -> dict[str, int]:
    unknown = set(config) - _CONFIG_KEYS - set(_OPTIONAL_CONFIG_KEYS)
    missing = _CONFIG_KEYS - set(config)
    if unknown or missing:
        raise ValueError(
            f"config must have exactly the keys {sorted(_CONFIG_KEYS)}; "
            f"unknown: {sorted(unknown)}, missing: {sorted(missing)}"
        )
    cfg = {key: int(config[key]) for key in _CONFIG_KEYS}
    cfg.update({key: config.get(key, default) for key, default in _OPTIONAL_CONFIG_KEYS.items()})
    for key in ("BLOCK_M", "BLOCK_N"):
        if not _is_pow2(cfg[key]) or cfg[key] < 16:
            raise ValueError(f"config[{key!r}] must be a power of two >= 16, got {cfg[key]}")
    if cfg["pipeline_qk"] and cfg["warp_specialize"]:
        raise ValueError("config pipeline_qk=True orders the loop by hand; it does not combine with "
                         "warp_specialize=True: set one of them to False")
    if sparse:
        if mask_block_m % cfg["BLOCK_M"]:
            raise ValueError(
                f"BLOCK_M={cfg['BLOCK_M']} must divide mask_block_m={mask_block_m}: a query tile may not "
                "straddle two mask query blocks; use a smaller BLOCK_M"
            )
        if mask_block_n % cfg["BLOCK_N"]:
            raise ValueError(
                f"BLOCK_N={cfg['BLOCK_N']} must divide mask_block_n={mask_block_n}; use a smaller BLOCK_N"
            )
    return cfg


def _fit_default_to_mask(cfg: dict[str, int], mask_block_m: int, mask_block_n: int) -> dict[str, int]:
    """Shrink the default tiles so they divide the mask blocks (only for config=None)."""
    cfg = dict(cfg)
    cfg["BLOCK_M"] = math.gcd(cfg["BLOCK_M"], mask_block_m)
    cfg["BLOCK_N"] = math.gcd(cfg["BLOCK_N"], mask_block_n)
    if cfg["BLOCK_M"] < 16 or cfg["BLOCK_N"] < 16:
        raise ValueError(
            f"mask blocks ({mask_block_m}, {mask_block_n}) admit no kernel tile: use mask block sizes that "
            "are multiples of 16 (powers of two, ideally 64 or 128)"
        )
    return cfg


@functools.lru_cache(maxsize=None)
def _launch_config(head_dim: int, device: torch.device, dtype: torch.dtype, quant, mask_block_m: int,
                   mask_block_n: int, sparse: bool, tma_ok: bool) -> dict:
    """The default configuration of one launch shape, fitted to the mask blocks and to what this input
    (``tma_ok``: K and V are TMA-aligned) and the installed triton can do; computed once per shape."""
    cfg = default_config(head_dim, device, dtype, quant)
    if sparse:
        cfg = _fit_default_to_mask(cfg, mask_block_m, mask_block_n)
    cfg = {**_OPTIONAL_CONFIG_KEYS, **cfg}
    if cfg["tma"] and not tma_ok:
        cfg["tma"] = False
    if cfg["warp_specialize"] and not (cfg["tma"] and _supports_warp_specialize()):
        cfg["warp_specialize"] = False
    if sparse and cfg["warp_specialize"] and cfg["prefetch_idx"] and not _ws_prefetch_ok():
        cfg["warp_specialize"] = False
    return _int4_config(cfg, quant)


def _int4_config(cfg: dict, quant) -> dict:
    if quant is QuantMode.INT4:  # packed int4 rows are not TMA-loaded; int4's per-key bias is not pipelined
        cfg = {**cfg, "tma": False, "warp_specialize": False, "pipeline_qk": False}
    return cfg
