"""Attention forward on the GPU: our kernels (dense, block-sparse) against cuDNN, SDPA flash, FlexAttention,
FlashAttention-4 and SageAttention 1.0.6, on the shapes of shared/BENCHMARKS.md, with errors against a reference.

    python benchmarks/attention.py                       # all shapes, densities 0.5 0.25 0.1
    python benchmarks/attention.py --quick               # one shape, short timing: a smoke run
    python benchmarks/attention.py --shapes wan1.3b-81f-480p --densities 0.1 --impls cudnn ours-dense ours-sparse

Protocol (BENCHMARKS.md): random normal bf16 inputs in (B, S, H, D), do_bench(warmup=25, rep=200,
median), dense-equivalent TFLOP/s = 4*B*H*S^2*D / time. Sparse rows use one local (banded) mask of
128x128 blocks per density, the same for flex-sparse and ours-sparse. rel_err = ||out - ref|| / ||ref||
on ~256 sampled query rows (all batches and heads, the last row always included) against a float64
reference over all keys with the block mask applied.

``ours-*`` rows run what the launcher picks (``VDIT_ATTENTION_BACKEND``: with ``auto``, as
benchmarks/gpu_hopper.sh sets it, the Gluon Hopper kernel on sm_90, else Triton; the row's ``backend`` says
which); ``ours-triton-dense`` / ``ours-triton-sparse`` force the Triton kernel in the same
run. ``fa4-dense`` / ``fa4-sparse``: flash-attn-4 (CuTe DSL), sparse with our block lists as its full blocks
(``BlockSparseTensorsTorch``); ``sage1``: SageAttention 1.0.6 (INT8 Q·K, fp16 P·V), on its own copy of K (it
smooths K in place). A peer that is not installed gives a row with ``skipped`` and the reason
(benchmarks/gpu_peers.sh brings both to the GPU machine).

Needs only torch and triton (no diffusers). Runs from a plain checkout: if vdit_accel is not
installed, the repository's folders are mapped to their package names here.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib.util
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from result_files import git_sha, result_path, slug  # noqa: E402

SHAPES = {  # name: (B, H, S, D)
    "cogvideox5b-49f-480p": (1, 48, 17776, 64),
    "wan1.3b-81f-480p": (1, 12, 32760, 128),
    "hunyuan-129f-720p": (1, 24, 119040, 128),
}
DENSE_IMPLS = ("cudnn", "sdpa-flash", "flex-dense", "fa4-dense", "ours-dense", "ours-triton-dense")
SPARSE_IMPLS = ("flex-sparse", "fa4-sparse", "ours-sparse", "ours-triton-sparse")
QUANT_MODES = ("fp8", "int8", "int4")
# Quantized: ours-<mode> (dense), ours-sparse-<mode>, quantize-<mode> (the quantizers alone: part of
# ours-<mode>'s time), sage1 (SageAttention 1.0.6, Triton, INT8 Q·K + fp16 P·V; pip sageattention==1.0.6).
QUANT_DENSE_IMPLS = tuple(f"ours-{m}" for m in QUANT_MODES) + tuple(f"quantize-{m}" for m in QUANT_MODES) + ("sage1",)
QUANT_SPARSE_IMPLS = tuple(f"ours-sparse-{m}" for m in QUANT_MODES)
DENSE_IMPLS += QUANT_DENSE_IMPLS
SPARSE_IMPLS += QUANT_SPARSE_IMPLS
MASK_BLOCK = 128


def _import_vdit_accel():
    """Import the three modules this script needs, from an install or from the checkout."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    try:
        import vdit_accel.kernels  # noqa: F401
    except ImportError:
        # Not installed: kernels/ installs as vdit_accel.kernels (pyproject package-dir); map it by hand.
        spec = importlib.util.spec_from_file_location(
            "vdit_accel.kernels", REPO / "kernels" / "__init__.py", submodule_search_locations=[str(REPO / "kernels")]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["vdit_accel.kernels"] = module
        spec.loader.exec_module(module)
    from vdit_accel.block_mask import BlockMask
    from vdit_accel.grid import VideoGrid
    from vdit_accel.kernels import attention_fwd
    from vdit_accel.patterns import build_block_mask, clear_mask_caches
    from vdit_accel.reference import reference_attention

    return BlockMask, VideoGrid, attention_fwd, build_block_mask, clear_mask_caches, reference_attention


BlockMask, VideoGrid, attention_fwd, build_block_mask, clear_mask_caches, reference_attention = _import_vdit_accel()

# The token grids behind the shapes (DESIGN.md, "Real shapes"): video (t, h, w) plus text.
GRIDS = {
    "cogvideox5b-49f-480p": VideoGrid(13, 30, 45, text_len=226, text_at="prefix"),
    "wan1.3b-81f-480p": VideoGrid(21, 30, 52),
    "hunyuan-129f-720p": VideoGrid(33, 45, 80, text_len=240, text_at="suffix"),
}
MASK_KINDS = ("local", "perhead")
mask_build_ms: dict[int, float] = {}  # id(mask) -> ms of its uncached build


# -- masks ----------------------------------------------------------------------------------------


def local_block_mask(seq_len: int, num_heads: int, density: float, device) -> "BlockMask":
    """Banded block mask (|i - j| <= r in block units) whose density is closest to ``density``."""
    nb = math.ceil(seq_len / MASK_BLOCK)
    i = torch.arange(nb, device=device)
    dist = (i[:, None] - i[None, :]).abs()
    density_at_r = (torch.bincount(dist.flatten(), minlength=nb).cumsum(0).double() / nb**2).tolist()
    best_r = min(range(nb), key=lambda r: abs(density_at_r[r] - density))
    dense = (dist <= best_r).expand(1, num_heads, nb, nb).contiguous()
    return BlockMask.from_dense(dense, seq_len, MASK_BLOCK, MASK_BLOCK)


def perhead_block_mask(grid, num_heads: int, density: float, device) -> "BlockMask":
    """window3d of a different shape per head (four aspect ratios, cycled) plus the always-dense text
    rows and columns; one common scale is bisected so that the mean density is close to ``density``."""
    ratios = [(1.0, 1.0, 1.0), (0.5, 1.5, 1.5), (2.0, 0.6, 0.6), (1.0, 0.5, 2.0)]

    def build(a: float):
        pats = []
        for hi in range(num_heads):
            rt, rh, rw = ratios[hi % len(ratios)]
            pats.append({"kind": "window3d", "t": int(a * rt * grid.t), "h": int(a * rh * grid.h),
                         "w": int(a * rw * grid.w)})
        return build_block_mask(pats, grid, MASK_BLOCK, MASK_BLOCK, device)

    lo, hi = 0.0, 1.0
    for _ in range(14):
        mid = (lo + hi) / 2
        if build(mid).density() < density:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda a: abs(build(a).density() - density))
    # Time one uncached build of the chosen masks: the once-per-(grid, strategy) planning cost.
    clear_mask_caches()
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    mask = build(best)
    torch.cuda.synchronize(device)
    mask_build_ms[id(mask)] = (time.perf_counter() - t0) * 1e3
    return mask


def flex_block_mask(mask: "BlockMask"):
    from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask
    import inspect

    params = inspect.signature(FlexBlockMask.from_kv_blocks).parameters
    kwargs = {}
    if "BLOCK_SIZE" in params:
        kwargs["BLOCK_SIZE"] = (mask.block_m, mask.block_n)
    elif "KV_BLOCK_SIZE" in params:  # older spellings
        kwargs["KV_BLOCK_SIZE"], kwargs["Q_BLOCK_SIZE"] = mask.block_n, mask.block_m
    if "seq_lengths" in params:
        kwargs["seq_lengths"] = (mask.seq_len, mask.seq_len)
    elif mask.seq_len % MASK_BLOCK:
        raise RuntimeError("this torch's BlockMask.from_kv_blocks has no seq_lengths: S must be a multiple of 128")
    return FlexBlockMask.from_kv_blocks(mask.kv_num_blocks, mask.kv_indices, **kwargs)


# -- reference on sampled rows ----------------------------------------------------------------------


def sample_rows(seq_len: int, n: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    rows = torch.randperm(seq_len, generator=g)[: max(n - 1, 1)]
    rows = torch.unique(torch.cat([rows, torch.tensor([seq_len - 1])]))
    return rows.to(device)


@torch.no_grad()
def reference_rows(q, k, v, rows, mask: "BlockMask | None", scale: float) -> torch.Tensor:
    """float64 attention for query rows ``rows`` against all keys: (B, R, H, D)."""
    b, s, h, d = q.shape
    out = torch.empty(b, rows.numel(), h, d, dtype=torch.float64, device=q.device)
    if mask is not None:
        blocks = mask.to_dense()  # [Bm, H, Mb, Nb]
        col_block = torch.arange(s, device=q.device) // mask.block_n
        row_block = rows // mask.block_m
    for hi in range(h):
        qh = q[:, rows, hi].double()
        kh = k[:, :, hi].double()
        scores = torch.einsum("brd,bsd->brs", qh, kh) * scale
        if mask is not None:
            allowed = blocks[:, hi][:, row_block][:, :, col_block]  # [Bm, R, S]
            scores = scores.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        out[:, :, hi] = torch.einsum("brs,bsd->brd", p, v[:, :, hi].double())
        del scores, p
    return out


def rel_err(out_bshd: torch.Tensor, rows: torch.Tensor, ref: torch.Tensor) -> float:
    got = out_bshd[:, rows].double()
    return ((got - ref).norm() / ref.norm()).item()


# -- implementations ----------------------------------------------------------------------------------


def make_impl(name: str, q, k, v, mask, flex_mask, scale: float, ours_config=None):
    """A zero-argument callable returning the output as a (B, S, H, D) tensor (views allowed)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, S, D) views, as diffusers passes them
    if name in ("cudnn", "sdpa-flash"):
        backend = SDPBackend.CUDNN_ATTENTION if name == "cudnn" else SDPBackend.FLASH_ATTENTION

        def fn():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, kt, vt, scale=scale).transpose(1, 2)

        return fn
    if name in ("flex-dense", "flex-sparse"):
        from torch.nn.attention.flex_attention import flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)
        block_mask = flex_mask if name == "flex-sparse" else None
        return lambda: compiled(qt, kt, vt, block_mask=block_mask, scale=scale).transpose(1, 2)
    if name in ("fa4-dense", "fa4-sparse"):
        return _fa4_impl(q, k, v, mask if name == "fa4-sparse" else None, scale)
    if name.startswith("ours-triton-"):  # the portable kernel, forced, in the same run
        inner = make_impl(name.replace("ours-triton-", "ours-"), q, k, v, mask, flex_mask, scale, ours_config)
        return _with_backend(inner, "triton")
    quant = next((m for m in QUANT_MODES if name.endswith("-" + m)), None)
    if name in ("ours-dense", f"ours-{quant}"):
        return lambda: attention_fwd(q, k, v, scale=scale, config=ours_config, quant=quant)
    if name in ("ours-sparse", f"ours-sparse-{quant}"):
        return lambda: attention_fwd(
            q, k, v, mask.kv_num_blocks, mask.kv_indices, mask.block_m, mask.block_n, scale=scale, config=ours_config,
            quant=quant,
        )
    if name == f"quantize-{quant}":
        from vdit_accel.kernels.attention_configs import default_config
        from vdit_accel.kernels.quantize import quantize_qkv

        cfg = ours_config or default_config(q.shape[-1], q.device, q.dtype, quant)
        return lambda: (quantize_qkv(q, k, v, quant, cfg["BLOCK_M"], cfg["BLOCK_N"], scale * 1.4426950408889634), q)[1]
    if name == "sage1":
        try:
            from sageattention import sageattn
        except ImportError as exc:
            raise PeerMissing(f"sageattention 1.0.6 is not installed ({exc}): benchmarks/gpu_peers.sh") from None
        k_own = k.clone()  # sageattn subtracts K's mean from K in place

        return lambda: sageattn(q, k_own, v, tensor_layout="NHD", is_causal=False, sm_scale=scale)
    raise ValueError(f"unknown impl {name!r}")


class PeerMissing(RuntimeError):
    """A peer that cannot run here (not installed, unsupported): its row says why and the run goes on."""


def _with_backend(fn, backend: str):
    """``fn`` with ``VDIT_ATTENTION_BACKEND`` set for the call (the launcher reads it per launch)."""
    import os

    def call():
        old = os.environ.get("VDIT_ATTENTION_BACKEND")
        os.environ["VDIT_ATTENTION_BACKEND"] = backend
        try:
            return fn()
        finally:
            if old is None:
                del os.environ["VDIT_ATTENTION_BACKEND"]
            else:
                os.environ["VDIT_ATTENTION_BACKEND"] = old

    return call


def _fa4_impl(q, k, v, mask, scale):
    """FlashAttention-4 (flash_attn.cute) on (B, S, H, D); with ``mask``: its block lists as FA4's full blocks
    (no partially masked blocks), batch expanded to B, 128 x 128 blocks."""
    try:
        from flash_attn.cute.interface import flash_attn_func
    except ImportError as exc:
        raise PeerMissing(f"flash-attn-4 is not installed ({exc}): benchmarks/gpu_peers.sh") from None
    kwargs = {}
    if mask is not None:
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

        if (mask.block_m, mask.block_n) != (128, 128):
            raise PeerMissing(f"FA4's block sparsity here takes 128 x 128 blocks, the mask has {mask.block_m} x {mask.block_n}")
        b = q.shape[0]
        num = mask.kv_num_blocks.expand(b, -1, -1).contiguous()
        idx = mask.kv_indices.expand(b, -1, -1, -1).contiguous()
        kwargs["block_sparse_tensors"] = BlockSparseTensorsTorch(
            mask_block_cnt=torch.zeros_like(num), mask_block_idx=torch.zeros_like(idx), full_block_cnt=num,
            full_block_idx=idx, block_size=(128, 128))

    def fn():
        res = flash_attn_func(q, k, v, softmax_scale=scale, causal=False, **kwargs)
        return res[0] if isinstance(res, tuple) else res

    return fn


def bench(fn, quick: bool) -> float:
    import triton.testing

    if quick:
        return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def free_memory():
    gc.collect()
    torch.cuda.empty_cache()


# -- runs -----------------------------------------------------------------------------------------


def run_small_checks(reference_attention, device) -> list[dict]:
    """bf16 vs float64 on odd small shapes, all rows: tails, head_dim 96, per-head masks, fused qkv."""
    checks = []
    g = torch.Generator(device=device).manual_seed(0)
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    for b, s, h, d, mask_kind, dtype in [
        (2, 1000, 3, 64, None, bf16), (2, 1000, 3, 96, None, bf16), (2, 1000, 3, 128, None, bf16),
        (2, 1000, 3, 64, "random", bf16), (2, 777, 3, 128, "random", bf16), (2, 1000, 3, 96, "random", bf16),
        (2, 1000, 3, 128, "random", fp16), (2, 333, 3, 64, "random", fp32),
    ]:
        name = f"B{b}-S{s}-H{h}-D{d}-{mask_kind or 'dense'}-{str(dtype).split('.')[-1]}"
        try:
            qkv = torch.randn(b, s, 3, h, d, device=device, dtype=dtype, generator=g)
            q, k, v = qkv.unbind(2)  # non-contiguous views
            mask = None
            if mask_kind == "random":
                nb = math.ceil(s / MASK_BLOCK)
                dense = torch.rand(b, h, nb, nb, device=device, generator=g) < 0.4
                dense[:, 0, 0] = False  # an empty query block
                dense[:, 0, -1] = True  # a full one, tail block included
                dense[:, -1] = False  # an empty head
                mask = BlockMask.from_dense(dense, s, MASK_BLOCK, MASK_BLOCK)
            args = (mask.kv_num_blocks, mask.kv_indices, MASK_BLOCK, MASK_BLOCK) if mask is not None else ()
            out, lse = attention_fwd(q, k, v, *args, return_lse=True)
            ref, ref_lse = reference_attention(q.double(), k.double(), v.double(), mask, return_lse=True)
            err = ((out.double() - ref).norm() / ref.norm()).item()
            # PyTorch's own error at this dtype on the same inputs, for scale (STYLE.md habit 4).
            torch_low = reference_attention(q, k, v, mask, compute_dtype=dtype)
            torch_err = ((torch_low.double() - ref).norm() / ref.norm()).item()
            inf_ok = bool(torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)))
            fin = ~torch.isneginf(ref_lse)
            lse_err = (lse[fin] - ref_lse[fin]).abs().max().item()
            empty_zero = bool((out[torch.isneginf(ref_lse).transpose(1, 2)] == 0).all())
            bound = 1e-4 if dtype == fp32 else max(2 * torch_err, 1e-2)
            ok = err <= bound and inf_ok and lse_err < 1e-2 and empty_zero and not out.isnan().any()
            checks.append(dict(check=name, rel_err=err, torch_same_dtype_rel_err=torch_err, lse_max_abs_err=lse_err,
                               lse_inf_match=inf_ok, empty_rows_zero=empty_zero, ok=bool(ok)))
        except Exception as exc:  # one failing check must not stop the run
            checks.append(dict(check=name, ok=False, error=f"{type(exc).__name__}: {exc}"[:500]))
            traceback.print_exc()
        print(f"check {name}: {checks[-1]}", flush=True)
    free_memory()
    return checks


def run_quant_checks(device) -> list[dict]:
    """Quantized modes on video-DiT-like bf16 data (vdit_accel.quant.dit_like_qkv), all rows: error and
    cosine against float64 (the accuracy targets: fp8/int8 rel_err <= 2e-2 and cos >= 0.999, int4
    rel_err <= 5e-2), and against the simulation of the recipe (the kernel computes what the recipe
    says, with the GPU's own conversions); SageAttention 1.0.6 on the same data for scale."""
    from vdit_accel.quant import dit_like_qkv, reference_quant_attention

    checks = []
    bounds = {"fp8": 2e-2, "int8": 2e-2, "int4": 5e-2}
    for b, s, h, d in [(1, 4096, 2, 128), (1, 4095, 2, 64), (2, 1000, 2, 96)]:
        q, k, v = dit_like_qkv(b, s, h, d, seed=s, dtype=torch.bfloat16, device=device)
        exact = reference_attention(q.double(), k.double(), v.double())
        for mode in QUANT_MODES + ("sage1", None):
            name = f"quant-{mode or 'bf16'}-B{b}-S{s}-H{h}-D{d}"
            try:
                if mode == "sage1":
                    from sageattention import sageattn

                    out = sageattn(q, k.clone(), v, tensor_layout="NHD", is_causal=False)  # it smooths K in place
                else:
                    out = attention_fwd(q, k, v, quant=mode)
                err = ((out.double() - exact).norm() / exact.norm()).item()
                cos = torch.nn.functional.cosine_similarity(out.double().flatten(), exact.flatten(), dim=0).item()
                row = dict(check=name, rel_err=err, cos=cos)
                if mode in QUANT_MODES:
                    from vdit_accel.kernels.attention_configs import default_config

                    cfg = default_config(d, q.device, q.dtype, mode)
                    sim = reference_quant_attention(q, k, v, mode, block_m=cfg["BLOCK_M"], block_n=cfg["BLOCK_N"])
                    row["vs_simulation"] = ((out.double() - sim.double()).norm() / sim.double().norm()).item()
                    row["ok"] = bool(err <= bounds[mode] and (mode == "int4" or cos >= 0.999) and row["vs_simulation"] < 1e-2)
                else:
                    row["ok"] = True
            except Exception as exc:
                row = dict(check=name, ok=mode == "sage1", error=f"{type(exc).__name__}: {exc}"[:500])
                traceback.print_exc()
            checks.append(row)
            print(f"check {name}: {row}", flush=True)
    free_memory()
    return checks


def run_quant_families(device, b=1, s=4099, h=4, d=128) -> list[dict]:
    """The quantized modes against SageAttention 1.0.6 in one run, on the four input families of
    vdit_accel.quant.accuracy_inputs (bf16, all rows, float64 reference): rel_err and its ratio to sage1's
    (the issue-22 target: <= 1.25), and the CPU simulation's error of the same recipe on the same inputs."""
    from vdit_accel.kernels.attention_configs import gpu_tiles
    from vdit_accel.quant import ACCURACY_FAMILIES, accuracy_inputs, reference_quant_attention

    checks = []
    for family in ACCURACY_FAMILIES:
        q, k, v = accuracy_inputs(family, b, s, h, d, seed=0, device=device)
        exact = reference_attention(q.double(), k.double(), v.double())
        errs = {}
        for mode in (None,) + QUANT_MODES + ("sage1",):
            name = mode or "bf16"
            row = dict(check=f"family-{family}-{name}", family=family, impl=name)
            try:
                if mode == "sage1":
                    from sageattention import sageattn

                    out = sageattn(q, k.clone(), v, tensor_layout="NHD", is_causal=False)
                else:
                    out = attention_fwd(q, k, v, quant=mode)
                errs[name] = row["rel_err"] = ((out.double() - exact).norm() / exact.norm()).item()
                if mode in QUANT_MODES:
                    bm, bn = gpu_tiles(d, mode)
                    sim = reference_quant_attention(q.cpu(), k.cpu(), v.cpu(), mode, block_m=bm, block_n=bn)
                    row["sim_rel_err"] = ((sim.double() - exact.cpu()).norm() / exact.cpu().norm()).item()
                row["ok"] = True
            except ImportError as exc:
                row.update(ok=True, skipped=f"{exc}")
            except Exception as exc:
                row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:500])
                traceback.print_exc()
            checks.append(row)
        for row in checks[-len(QUANT_MODES) - 2:]:
            if "rel_err" in row and "sage1" in errs:
                row["vs_sage1"] = row["rel_err"] / errs["sage1"]
            print(f"check {row['check']}: {row}", flush=True)
        del q, k, v, exact
        free_memory()
    return checks


def run_shape(name, shape, densities, impls, quick, sample_n, device, ours_config=None, mask_kinds=("local",)) -> list[dict]:
    b, h, s, d = shape
    scale = 1.0 / math.sqrt(d)
    rows_out = []
    g = torch.Generator(device=device).manual_seed(42)
    q, k, v = (torch.randn(b, s, h, d, device=device, dtype=torch.bfloat16, generator=g) for _ in range(3))
    rows = sample_rows(s, sample_n, device)
    flops = 4.0 * b * h * s * s * d

    torch._dynamo.reset()
    ref_dense = reference_rows(q, k, v, rows, None, scale)
    plans = [(impl, None) for impl in impls if impl in DENSE_IMPLS]
    masks = {}
    for kind in mask_kinds:
        for density in densities:
            if kind == "local":
                masks[(kind, density)] = local_block_mask(s, h, density, device)
            else:
                masks[(kind, density)] = perhead_block_mask(GRIDS[name], h, density, device)
            plans += [(impl, (kind, density)) for impl in impls if impl in SPARSE_IMPLS]

    refs = {None: ref_dense}
    for impl, density in plans:
        row = dict(shape=name, impl=impl, B=b, H=h, S=s, D=d, density=1.0, ms=None, tflops=None, rel_err=None)
        try:
            mask = masks.get(density)
            if mask is not None:
                row["density"] = round(mask.density(), 4)
                row["mask"], row["target_density"] = density
                if id(mask) in mask_build_ms:
                    row["mask_build_ms"] = round(mask_build_ms[id(mask)], 2)
                if density not in refs:
                    refs[density] = reference_rows(q, k, v, rows, mask, scale)
            flex_mask = flex_block_mask(mask) if impl == "flex-sparse" else None
            fn = make_impl(impl, q, k, v, mask, flex_mask, scale, ours_config)
            if ours_config is not None and impl.startswith("ours"):
                row["config"] = ours_config
            if impl.startswith("ours-"):
                row["backend"] = _ours_backend(impl, q, k, v, mask, ours_config)
            t0 = time.perf_counter()
            out = fn()  # compiles
            torch.cuda.synchronize()
            row["first_call_s"] = round(time.perf_counter() - t0, 2)
            if not impl.startswith("quantize-"):  # the quantizers alone give no attention output
                row["rel_err"] = rel_err(out, rows, refs[density])
            del out
            ms = bench(fn, quick)
            row["ms"] = ms
            if not impl.startswith("quantize-"):
                row["tflops"] = flops / (ms * 1e-3) / 1e12
        except PeerMissing as exc:
            row["skipped"] = str(exc)[:500]
        except Exception as exc:  # a failing peer records an error row and the run goes on
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            traceback.print_exc()
        free_memory()
        rows_out.append(row)
        print(_fmt_row(row), flush=True)
    del q, k, v, masks, refs
    torch._dynamo.reset()
    free_memory()
    return rows_out


def _ours_backend(impl, q, k, v, mask, ours_config) -> str:
    """The back end an ``ours-*`` row runs (launcher's choice, or triton where forced / quantized)."""
    from vdit_accel.kernels.attention_fwd import backend_for

    if impl.startswith("ours-triton-"):
        return "triton"
    quant = next((m for m in QUANT_MODES if impl.endswith("-" + m)), None)
    args = (mask.kv_num_blocks, mask.block_m, mask.block_n) if mask is not None and "sparse" in impl else (None,)
    try:
        return backend_for(q, k, v, *args, quant=quant, config=ours_config)
    except ValueError as exc:
        return f"error: {exc}"


def run_sweep(name, shape, quick, device, quant=None) -> list[dict]:
    """ours-dense (or ours-<quant>) over the kernel's AUTOTUNE_CANDIDATES, beside cuDNN, on one shape
    (errors recorded, not raised)."""
    b, h, s, d = shape
    g = torch.Generator(device=device).manual_seed(7)
    q, k, v = (torch.randn(b, s, h, d, device=device, dtype=torch.bfloat16, generator=g) for _ in range(3))
    flops = 4.0 * b * h * s * s * d
    rows_out = []
    ref = make_impl("cudnn", q, k, v, None, None, d**-0.5)()
    from vdit_accel.kernels.attention_configs import AUTOTUNE_CANDIDATES

    impl = f"ours-{quant}" if quant else "ours-dense"
    plans = [("cudnn", None)] + [(impl, c) for c in AUTOTUNE_CANDIDATES[128 if d > 64 else 64]]
    for impl, cfg in plans:
        row = dict(shape=name, impl=impl, B=b, H=h, S=s, D=d, density=1.0, ms=None, tflops=None, rel_err=None)
        if cfg is not None:
            row["config"] = cfg
        try:
            fn = make_impl(impl, q, k, v, None, None, d**-0.5, cfg)
            out = fn()
            row["rel_err"] = ((out.float() - ref.float()).norm() / ref.float().norm()).item()  # vs cuDNN
            row["ms"] = bench(fn, quick)
            row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
        except Exception as exc:
            msg = f"{type(exc).__name__}: {exc}"
            row["error"] = msg[:200] + " ... " + msg[-600:] if len(msg) > 800 else msg
        rows_out.append(row)
        print(_fmt_row(row), json.dumps(cfg) if cfg else "", flush=True)
    del q, k, v, ref
    free_memory()
    return rows_out


def _fmt(x, spec):
    return "—" if x is None else format(x, spec)


def _fmt_row(row) -> str:
    err = f" ERROR {row['error']}" if "error" in row else (f" skipped: {row['skipped']}" if "skipped" in row else "")
    return (f"| {row['shape']} | {row['impl']} | {row.get('mask', '—')} | {row['density']:.3f} | {_fmt(row['ms'], '.2f')} | "
            f"{_fmt(row['tflops'], '.0f')} | {_fmt(row['rel_err'], '.2e')} |{err}")


def markdown_table(rows) -> str:
    lines = ["| shape | impl | mask | density | ms | TFLOP/s (dense-eq.) | rel_err |", "|---|---|---|---|---|---|---|"]
    lines += [_fmt_row(r) for r in rows]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=None,
                   help="shape names to run (default: all; with --quick: cogvideox5b-49f-480p)")
    p.add_argument("--densities", nargs="+", type=float, default=[0.5, 0.25, 0.1],
                   help="target fractions of 128x128 blocks visited by the local sparse mask")
    p.add_argument("--impls", nargs="+", choices=DENSE_IMPLS + SPARSE_IMPLS, default=list(DENSE_IMPLS + SPARSE_IMPLS))
    p.add_argument("--masks", nargs="+", choices=MASK_KINDS, default=list(MASK_KINDS),
                   help="local: one banded mask for all heads; perhead: window3d of a different shape per head + text")
    p.add_argument("--sweep", action="store_true", help="time ours-dense over the kernel's autotune candidates (rel_err vs cuDNN) instead")
    p.add_argument("--sweep-quant", choices=QUANT_MODES, default=None, help="with --sweep: sweep ours-<mode> instead")
    p.add_argument("--quant-checks", action="store_true", help="also run the quantized modes' accuracy checks")
    p.add_argument("--quant-families", action="store_true",
                   help="also the quantized modes vs SageAttention 1.0.6 on the four input families (issue 22)")
    p.add_argument("--quick", action="store_true", help="one shape, short timing (warmup 5 ms, rep 20 ms)")
    p.add_argument("--sample-rows", type=int, default=256, help="query rows checked against the reference")
    p.add_argument("--no-checks", action="store_true", help="skip the small full-reference bf16 checks")
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--ours-config", type=json.loads, default=None,
                   help="launch config for ours-*, as JSON with keys BLOCK_M, BLOCK_N, num_warps, num_stages "
                   "(default: the kernel's per-arch defaults)")
    p.add_argument("--git-sha", default=None, help="recorded as versions.vdit_accel (default: git rev-parse)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/attention.py needs a CUDA GPU")
    import triton

    device = torch.device("cuda")
    shapes = args.shapes or (["cogvideox5b-49f-480p"] if args.quick else list(SHAPES))
    gpu = torch.cuda.get_device_name(device)
    print(f"{gpu}, torch {torch.__version__}, triton {triton.__version__}", flush=True)

    today = _dt.date.today()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    what = "attention-sweep" if args.sweep else "attention"
    if args.sweep and args.sweep_quant:
        what += "-" + args.sweep_quant
    path = result_path(args.out_dir, what, slug(gpu), today, "-quick" if args.quick else "")
    result = {
        "gpu": gpu,
        "date": today.isoformat(),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "versions": {"torch": torch.__version__, "triton": triton.__version__,
                     "vdit_accel": args.git_sha or git_sha()},
        "protocol": "do_bench median, warmup 5/rep 20 ms (quick)" if args.quick
        else "do_bench median, warmup 25/rep 200 ms",
        "rows": [],
        "checks": [],
    }

    def write():  # after every stage, so a run cut short still leaves its results
        path.write_text(json.dumps(result, indent=1) + "\n")

    if args.sweep:
        for name in shapes:
            result["rows"] += run_sweep(name, SHAPES[name], args.quick, device, args.sweep_quant)
            write()
        print(markdown_table(result["rows"]))
        print(f"\nwrote {path}")
        return
    checks = result["checks"]
    if not args.no_checks:
        checks += run_small_checks(reference_attention, device)
        write()
    if args.quant_checks:
        checks += run_quant_checks(device)
        write()
    if args.quant_families:
        checks += run_quant_families(device)
        write()
    rows = result["rows"]
    for name in shapes:
        rows += run_shape(name, SHAPES[name], args.densities, args.impls, args.quick, args.sample_rows, device,
                          args.ours_config, args.masks)
        write()
    write()
    print()
    print(markdown_table(rows))
    if checks:
        bad = [c["check"] for c in checks if not c.get("ok")]
        print(f"\nsmall bf16 checks: {len(checks) - len(bad)}/{len(checks)} ok" + (f"; FAILED: {bad}" if bad else ""))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
