"""The attention kernels' launcher: checks the inputs, picks the back end and the configuration,
quantizes K and V where a mode asks for it, and launches. Takes and returns raw tensors.

Two back ends, one contract: the Hopper kernel in Gluon (:mod:`.attention_hopper`, FlashAttention-3's
schedule) where it can run, else the portable Triton kernel (:func:`.attention._attn_fwd`). The
choice (:func:`backend_for`): ``VDIT_ATTENTION_BACKEND`` = ``triton`` (default: see
:data:`DEFAULT_BACKEND`), ``auto`` or ``gluon`` (forced: an input it cannot take raises, with the
reason). ``auto`` takes Gluon on an sm_90
GPU with triton >= 3.6 for fp16 / bf16, head_dim 64 or 128, unquantized, TMA-aligned q / k / v, mask
query blocks that are multiples of 128 and no explicit Triton ``config``; otherwise the Triton kernel,
and the reason is logged once per reason (a warning on sm_90, where the fast path was expected).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os

import torch
import triton

from . import attention as _kernels
from .attention_configs import (_DTYPES, _MAX_HEAD_DIM, _MIN_HEAD_DIM, _autotune, _check_config, _fit_default_to_mask,
                                _int4_config, _interpreting, _launch_config, _tma_ok)
from .quantize import QuantMode

logger = logging.getLogger("vdit_accel")
BACKENDS = ("auto", "triton", "gluon")
# The Gluon kernel compiles for sm_90 and its twin matches the reference on the CPU, but it has not yet
# run on a GPU: until its GPU tests pass there (tests/kernels/test_attention_hopper.py), the portable
# kernel is the default and ``auto`` / ``gluon`` are opt-in.
DEFAULT_BACKEND = "triton"
_HOPPER_HEAD_DIMS = (64, 128)
_HOPPER_BLOCK_M = 64  # rows per consumer warpgroup; a CTA has two (128 rows)
_HOPPER_STAGES = {64: 3, 128: 2}  # K / V ring depth by head_dim (shared memory: 112 KB / 160 KB)
_MIN_GLUON_TRITON = (3, 6)  # the warp_specialize signature and Hopper ops this kernel is written against
_logged: set[str] = set()


def _requested_backend() -> str:
    name = os.environ.get("VDIT_ATTENTION_BACKEND", DEFAULT_BACKEND).strip().lower() or DEFAULT_BACKEND
    if name not in BACKENDS:
        raise ValueError(f"VDIT_ATTENTION_BACKEND={name!r}: use one of {BACKENDS}")
    return name


@functools.cache
def _gluon_import_error() -> str | None:
    """Why the Gluon kernel cannot be built with the installed triton (None: it can)."""
    try:
        version = tuple(int(x) for x in triton.__version__.split(".")[:2])
    except ValueError:
        return f"unparsed triton version {triton.__version__}"
    if version < _MIN_GLUON_TRITON:
        return f"triton {triton.__version__} < 3.6 (Gluon's warp_specialize / Hopper API differ)"
    try:
        from . import attention_hopper  # noqa: F401
    except Exception as exc:  # any failure to build the module is a reason to take the portable path
        return f"the Gluon module does not import with triton {triton.__version__}: {type(exc).__name__}: {exc}"
    return None


def _hopper_reason(q, k, v, kv_num_blocks, mask_block_m, mask_block_n, quant, config) -> str | None:
    """Why the Hopper Gluon kernel cannot take this call (None: it can)."""
    if q.device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "not a CUDA device (Gluon's Hopper ops do not run in Triton's interpreter)"
    major, minor = torch.cuda.get_device_capability(q.device)
    if major != 9:
        return f"GPU sm_{major}{minor} is not Hopper (sm_90)"
    err = _gluon_import_error()
    if err:
        return err
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} (the Gluon kernel takes fp16 / bf16)"
    if quant is not None:
        return f"quant={quant} (the quantized modes are Triton kernels)"
    if config is not None:
        return "an explicit Triton config (or autotune) was given"
    if q.shape[-1] not in _HOPPER_HEAD_DIMS:
        return f"head_dim {q.shape[-1]} (the Gluon kernel has 64 and 128)"
    if kv_num_blocks is not None and (mask_block_m % (2 * _HOPPER_BLOCK_M) or mask_block_n % 64):
        return f"mask blocks ({mask_block_m}, {mask_block_n}): it needs multiples of (128, 64)"
    if not all(_tma_ok(x) for x in (q, k, v)):
        return "q, k or v strides / base are not 16-byte aligned (TMA)"
    return None


def backend_for(q, k, v, kv_num_blocks=None, mask_block_m=128, mask_block_n=128, quant=None, config=None) -> str:
    """``"gluon"`` or ``"triton"``: the kernel :func:`launch` runs for this call (see the module docstring)."""
    requested = _requested_backend()
    if requested == "triton":
        return "triton"
    reason = _hopper_reason(q, k, v, kv_num_blocks, mask_block_m, mask_block_n, quant, config)
    if reason is None:
        return "gluon"
    if requested == "gluon":
        raise ValueError(f"VDIT_ATTENTION_BACKEND=gluon, but the Hopper kernel cannot take this call: {reason}")
    if reason not in _logged:
        _logged.add(reason)
        on_hopper = q.device.type == "cuda" and torch.cuda.get_device_capability(q.device)[0] == 9
        (logger.warning if on_hopper else logger.info)(
            "attention: the portable Triton kernel runs (the Hopper Gluon kernel cannot: %s)", reason)
    return "triton"


def _tensor_descriptor(x: torch.Tensor, block_n: int, block_d: int):
    """A host-side TMA descriptor of a (B, S, H, D) tensor, one (1, block_n, 1, block_d) box per load."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if not _tma_ok(x):
        raise ValueError(
            f"config tma=True needs 16-byte aligned strides and base; got strides {tuple(x.stride())} "
            f"({x.element_size()}-byte elements): use tma=False for this input"
        )
    return TensorDescriptor(x, list(x.shape), list(x.stride()), [1, block_n, 1, block_d])


def _check_qkv(q, k, v):
    """What every launch needs of q, k, v (cheap: shapes, dtypes, devices, strides; no device work)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, S, H, D), got shape {tuple(x.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            "q, k and v must have the same shape (B, S, H, D); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} (layout is (B, S, H, D), not (B, H, S, D))"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"dtype {q.dtype} is not supported; use torch.float16 or torch.bfloat16 (float32 for tests)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda" and not (q.device.type == "cpu" and _interpreting()):
        raise ValueError(
            f"attention_fwd runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1); got {q.device}"
        )
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.stride(-1) != 1:
            raise ValueError(
                f"{name}'s last dim (head_dim) must have stride 1, got strides {tuple(x.stride())}; "
                "call .contiguous() on it or pass a view whose head_dim is contiguous"
            )
    d = q.shape[-1]
    if not (_MIN_HEAD_DIM <= d <= _MAX_HEAD_DIM and d % 8 == 0):
        raise ValueError(
            f"head_dim {d} is not supported: use a multiple of 8 between {_MIN_HEAD_DIM} and {_MAX_HEAD_DIM} "
            "(64, 96 and 128 are the tuned ones)"
        )


def _check_mask(q, kv_num_blocks, kv_indices, mask_block_m, mask_block_n):
    if (kv_num_blocks is None) != (kv_indices is None):
        raise ValueError("pass both kv_num_blocks and kv_indices for sparse attention, or neither for dense")
    if kv_num_blocks is None:
        return
    b, s, h, _ = q.shape
    for name, x, ndim in (("kv_num_blocks", kv_num_blocks, 3), ("kv_indices", kv_indices, 4)):
        if not isinstance(x, torch.Tensor) or x.dim() != ndim:
            shape = "[Bm, H, Mb]" if ndim == 3 else "[Bm, H, Mb, Nb]"
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a {ndim}-D tensor {shape}, got {got}")
        if x.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; move the mask with .to(q.device)")
    for name, blk in (("mask_block_m", mask_block_m), ("mask_block_n", mask_block_n)):
        if not isinstance(blk, int) or blk <= 0:
            raise ValueError(f"{name} must be a positive int, got {blk!r}")
    mb, nb = -(-s // mask_block_m), -(-s // mask_block_n)
    bm = kv_num_blocks.shape[0]
    if bm not in (1, b):
        raise ValueError(f"mask batch dim must be 1 (broadcast) or B={b}, got {bm}")
    if tuple(kv_num_blocks.shape) != (bm, h, mb):
        raise ValueError(
            f"kv_num_blocks must have shape [Bm, H, Mb] = [{bm}, {h}, {mb}] for S={s}, mask_block_m={mask_block_m}; "
            f"got {tuple(kv_num_blocks.shape)}"
        )
    if tuple(kv_indices.shape) != (bm, h, mb, nb):
        raise ValueError(
            f"kv_indices must have shape [Bm, H, Mb, Nb] = [{bm}, {h}, {mb}, {nb}] for S={s}, "
            f"blocks ({mask_block_m}, {mask_block_n}); got {tuple(kv_indices.shape)}"
        )


def _check_q_index(q, q_index):
    bsz, s, h, _ = q.shape
    if (not isinstance(q_index, torch.Tensor) or q_index.dim() != 3 or q_index.shape[0] not in (1, bsz)
            or tuple(q_index.shape[1:]) != (h, s) or q_index.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"q_index must be an int32/int64 tensor [1 or {bsz}, {h}, {s}], got "
                         f"{tuple(q_index.shape) if isinstance(q_index, torch.Tensor) else type(q_index).__name__}"
                         f"{' ' + str(q_index.dtype) if isinstance(q_index, torch.Tensor) else ''}")
    if q_index.device != q.device:
        raise ValueError(f"q_index is on {q_index.device} but q is on {q.device}")


def attention_fwd(q, k, v, kv_num_blocks=None, kv_indices=None, mask_block_m=128, mask_block_n=128,
                  scale=None, return_lse=False, config=None, quant=None, out=None, q_index=None):
    """q, k, v: (B, S, H, D) read through strides (no transposed/contiguous copies; last dim must have stride 1).
    Returns out (B, S, H, D) same dtype as q (contiguous), and lse float32 (B, H, S) natural-log log-sum-exp if return_lse.

    Sparse when ``kv_num_blocks`` (int32 [Bm, H, Mb]) and ``kv_indices`` (int32 [Bm, H, Mb, Nb]) are given,
    with Mb = cdiv(S, mask_block_m), Nb = cdiv(S, mask_block_n), Bm in (1, B): query token i attends key
    token j iff ``j // mask_block_n`` is among the first ``kv_num_blocks[b, h, i // mask_block_m]`` entries
    of ``kv_indices[b, h, i // mask_block_m]``. Those entries must be ascending, distinct and < Nb (not
    checked: it would need a device sync); entries past the count are never read. A query block with no
    key block gives zeros and lse = -inf.

    Args:
        scale: softmax scale, default 1 / sqrt(D).
        config: None (``DEFAULT_CONFIGS`` by GPU arch and head_dim, shrunk to divide the mask blocks;
            no tuning cost), ``"autotune"`` (time ``AUTOTUNE_CANDIDATES`` once per GPU, dtype, shape and
            mask blocks, keep the fastest in memory and in ``$VDIT_AUTOTUNE_CACHE`` or
            ``~/.cache/vdit_accel``), or a dict {BLOCK_M, BLOCK_N, num_warps, num_stages, and optionally
            tma, warp_specialize, pipeline_qk (Q·K^T one block ahead of the softmax), prefetch_idx (sparse:
            the next key block's index loaded a block ahead; with warp_specialize it compiles on triton
            3.4-3.6 only)}; BLOCK_M must divide mask_block_m and BLOCK_N mask_block_n.
        quant: None, or ``"fp8"`` / ``"int8"`` / ``"int4"``: quantize q, k, v first
            (``kernels/quantize.py``, recipes in ``vdit_accel/quant.py``) and run the quantized kernel.
        out: optional (B, S, H, D) tensor of q's dtype (any strides, last dim contiguous) to write into,
            e.g. a head slice of a bigger output.
        q_index: optional int ``[Bi, H, S]`` (Bi 1 or B; int32 or int64, last dim contiguous), a
            permutation of ``range(S)`` per (batch, head) (not checked: it would need a device sync):
            query position ``i`` of the kernel is token ``q_index[b, h, i]`` — its Q row is read from
            there and its output (and LSE) row written there. The block mask's query blocks are
            positions in that order, and k, v must already be in the key order; the output stays in
            q's own order. This replaces gathering Q into the order and scattering the output back
            (two passes over (B, S, H, D)). With int4, Q is gathered first (its scales are per tile).
    """
    _check_qkv(q, k, v)
    _check_mask(q, kv_num_blocks, kv_indices, mask_block_m, mask_block_n)
    quant = QuantMode.parse(quant)
    if quant is not None and q.dtype == torch.float32:
        raise ValueError("quantized attention takes fp16/bf16 inputs, got float32")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1):
        raise ValueError(f"out must be a {tuple(q.shape)} {q.dtype} tensor on {q.device} with a contiguous last dim")
    if q_index is not None:
        _check_q_index(q, q_index)
    sparse = kv_num_blocks is not None
    if config == "autotune":
        def run(c):
            return attention_fwd(q, k, v, kv_num_blocks, kv_indices, mask_block_m=mask_block_m,
                                 mask_block_n=mask_block_n, scale=scale, return_lse=return_lse, config=c, quant=quant)

        cfg = _autotune(q, k, v, (kv_num_blocks, kv_indices) if sparse else (), mask_block_m, mask_block_n, run, quant)
        if sparse:
            cfg = _fit_default_to_mask(cfg, mask_block_m, mask_block_n)
        config = _check_config(cfg, mask_block_m, mask_block_n, sparse)
    elif isinstance(config, dict):
        config = _check_config(config, mask_block_m, mask_block_n, sparse)
    elif config is not None:
        raise ValueError(f"config must be None, 'autotune' or a dict, got {config!r}")
    return launch(q, k, v, kv_num_blocks, kv_indices, mask_block_m, mask_block_n, scale, return_lse, config, quant,
                  out, q_index)


def launch(q, k, v, kv_num_blocks, kv_indices, mask_block_m, mask_block_n, scale, return_lse, config, quant, out,
           q_index):
    """:func:`attention_fwd` on inputs already validated: ``config`` None (the cached default for this
    launch shape) or a checked dict; ``quant`` a :class:`QuantMode` or None. The caller vouches for the
    mask (shapes for ``S = q.shape[1]``, int32, on q's device) and for ``q_index``; q, k, v still get the
    cheap checks of :func:`_check_qkv` in :func:`attention_fwd` only -- this is the per-call path of a
    compiled layer plan, whose masks were built for the call's grid."""
    sparse = kv_num_blocks is not None
    bsz, s, h, d = q.shape
    gluon = backend_for(q, k, v, kv_num_blocks, mask_block_m, mask_block_n, quant, config) == "gluon"
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if q_index is not None and q_index.stride(2) != 1:
        q_index = q_index.contiguous()
    if out is None:
        out = torch.empty((bsz, s, h, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((bsz, h, s), dtype=torch.float32, device=q.device) if return_lse else None
    if out.numel() == 0:
        if return_lse:
            lse.fill_(float("-inf"))
        return (out, lse) if return_lse else out
    if gluon:
        _launch_hopper(q, k, v, kv_num_blocks, kv_indices, mask_block_m, mask_block_n, scale, out, lse, q_index)
        return (out, lse) if return_lse else out
    if config is None:
        cfg = _launch_config(d, q.device, q.dtype, quant, mask_block_m, mask_block_n, sparse, True)
        if cfg["tma"] and not (_tma_ok(k) and _tma_ok(v)):
            cfg = _launch_config(d, q.device, q.dtype, quant, mask_block_m, mask_block_n, sparse, False)
    else:
        cfg = _int4_config(config, quant)

    kv_num_blocks, kv_indices, num_strides, idx_strides, mask_m, mask_n = _mask_args(
        kv_num_blocks, kv_indices, mask_block_m, mask_block_n, out, cfg["BLOCK_M"], cfg["BLOCK_N"])

    block_d = max(16, 1 << (d - 1).bit_length())
    qk_scale = float(scale) * 1.4426950408889634
    q_scale = k_scale = v_scale = q_mean = out  # unused pointers unless quant
    s_pad, stride_vd = s, 1
    q_orig = q
    if quant is QuantMode.INT4 and q_index is not None:  # Q's per-tile scales need Q in the kernel's order first
        from .permute import gather_rows

        q = gather_rows([q], q_index)[0]
    if quant is not None:
        from .quantize import quantize_qkv

        qz = quantize_qkv(q, k, v, quant, cfg["BLOCK_M"], cfg["BLOCK_N"], qk_scale)
        s_pad = qz["s_pad"]
        k_scale, v_scale = qz["k_scale"], qz["v_scale"]
        if qz["q"] is not None:  # int4: Q quantized ahead (fp8 / int8 quantize Q's tile in the kernel)
            q, q_scale, qk_scale = qz["q"].permute(0, 2, 1, 3), qz["q_scale"], 1.0
            q_mean = qz["q_mean"]
        # (B, H, S_pad, D') viewed as (B, S_pad, H, D'); V (B, H, D, S_pad) likewise (stride_vd = S_pad);
        # a recipe with 16-bit P V (int8) reads V as given.
        k = qz["k"].permute(0, 2, 1, 3)
        if qz["v"] is not None:
            v, stride_vd = qz["v"].permute(0, 3, 1, 2), s_pad
        else:
            v_scale = out
    k_desc, v_desc = k, v  # unused pointers unless tma
    if cfg["tma"] and quant is not None:
        from triton.tools.tensor_descriptor import TensorDescriptor

        kq, vq = qz["k"], qz["v"]
        k_desc = TensorDescriptor(kq, list(kq.shape), list(kq.stride()), [1, 1, cfg["BLOCK_N"], block_d])
        if vq is not None:
            v_desc = TensorDescriptor(vq, list(vq.shape), list(vq.stride()), [1, 1, block_d, cfg["BLOCK_N"]])
        else:
            v_desc = _tensor_descriptor(v, cfg["BLOCK_N"], block_d)
    elif cfg["tma"]:
        k_desc, v_desc = (_tensor_descriptor(x, cfg["BLOCK_N"], block_d) for x in (k, v))
    grid = (-(-s // cfg["BLOCK_M"]), bsz * h)
    interpreting = _interpreting()
    with torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext():
        _kernels._attn_fwd[grid](
            q, k, v, out, lse if return_lse else out, kv_num_blocks, kv_indices, k_desc, v_desc,
            q_scale, k_scale, v_scale, q_mean, out if q_index is None else q_index,
            q.stride(0), q.stride(1), q.stride(2),
            *((0, 0) if q_index is None else (0 if q_index.shape[0] == 1 else q_index.stride(0), q_index.stride(1))),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), stride_vd,
            out.stride(0), out.stride(1), out.stride(2),
            *num_strides, *idx_strides,
            s, h, qk_scale, s_pad,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d,
            HEAD_DIM=d, MASK_BLOCK_M=mask_m, MASK_BLOCK_N=mask_n,
            SPARSE=sparse, EVEN_N=(s % cfg["BLOCK_N"] == 0), RETURN_LSE=bool(return_lse),
            INPUT_PRECISION="ieee" if q.dtype == torch.float32 else None,
            WARP_SPECIALIZE=bool(cfg["warp_specialize"]) and not interpreting,
            USE_TMA=bool(cfg["tma"]), QUANT=0 if quant is None else quant.kernel_id, EMULATE_FP8=interpreting,
            PIPELINE_QK=bool(cfg["pipeline_qk"]),
            Q_INDEXED=q_index is not None, PREFETCH_IDX=bool(cfg["prefetch_idx"]),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    if return_lse and quant is not None and qz["k_mean"] is not None:
        # K smoothing shifted every score of a row by -q . mean(K): the outputs ignore it, the LSE not.
        lse += float(scale) * torch.einsum("bshd,bhd->bhs", q_orig.float(), qz["k_mean"])
    return (out, lse) if return_lse else out


def _mask_args(kv_num_blocks, kv_indices, mask_block_m, mask_block_n, dummy, tile_m, tile_n):
    """The block mask as the kernels take it: (num, idx, num strides, idx strides, mask_m, mask_n), a batch-1
    mask broadcast by stride 0. Dense: dummies never read, and mask blocks = kernel tiles (one compiled
    variant)."""
    if kv_num_blocks is None:
        return dummy, dummy, (0, 0, 0), (0, 0, 0, 0), tile_m, tile_n
    bm = kv_num_blocks.shape[0]
    num_strides = (0 if bm == 1 else kv_num_blocks.stride(0),) + tuple(kv_num_blocks.stride()[1:])
    idx_strides = (0 if bm == 1 else kv_indices.stride(0),) + tuple(kv_indices.stride()[1:])
    return kv_num_blocks, kv_indices, num_strides, idx_strides, mask_block_m, mask_block_n


def _launch_hopper(q, k, v, kv_num_blocks, kv_indices, mask_block_m, mask_block_n, scale: float, out, lse, q_index):
    """:func:`launch` through the Gluon Hopper kernel (inputs already accepted by :func:`_hopper_reason`):
    writes ``out`` and, when not None, ``lse`` (both allocated, non-empty, by :func:`launch`)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from . import attention_hopper as _hopper

    bsz, s, h, d = q.shape
    sparse = kv_num_blocks is not None
    block_n = math.gcd(128, mask_block_n) if sparse else 128
    gdtype = gl.float16 if q.dtype == torch.float16 else gl.bfloat16

    def desc(x, rows):  # the whole (B, S, H, D) tensor, one (1, rows, 1, D) box a load; rows past S read as 0
        layout = gl.NVMMASharedLayout.get_default_for([1, rows, 1, d], gdtype)
        return TensorDescriptor(x, list(x.shape), list(x.stride()), [1, rows, 1, d], layout)

    kv_num_blocks, kv_indices, num_strides, idx_strides, mask_m, mask_n = _mask_args(
        kv_num_blocks, kv_indices, mask_block_m, mask_block_n, out, 2 * _HOPPER_BLOCK_M, block_n)
    qi_strides = (0, 0) if q_index is None else (0 if q_index.shape[0] == 1 else q_index.stride(0), q_index.stride(1))
    grid = (triton.cdiv(s, 2 * _HOPPER_BLOCK_M), bsz * h)
    with torch.cuda.device(q.device):
        _hopper._attn_fwd_hopper[grid](
            desc(q, _HOPPER_BLOCK_M), desc(k, block_n), desc(v, block_n), q, out, out if lse is None else lse,
            kv_num_blocks, kv_indices, out if q_index is None else q_index,
            q.stride(0), q.stride(1), q.stride(2), *qi_strides,
            out.stride(0), out.stride(1), out.stride(2),
            *num_strides, *idx_strides,
            s, h, float(scale) * 1.4426950408889634,
            BLOCK_M=_HOPPER_BLOCK_M, BLOCK_N=block_n, HEAD_DIM=d, MASK_BLOCK_M=mask_m, MASK_BLOCK_N=mask_n,
            SPARSE=sparse, EVEN_N=(s % block_n == 0), RETURN_LSE=lse is not None, Q_INDEXED=q_index is not None,
            NUM_STAGES=_HOPPER_STAGES[d], num_warps=4, maxnreg=_hopper.MAX_REGS,
        )
