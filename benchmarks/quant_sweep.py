"""The quantized kernel's speed variants on the GPU (issue #6): cuDNN bf16 SDPA against ours-fp8 /
ours-int8 dense with each variant config, then block-sparse (~10% local blocks) + fp8 with the fastest
fp8 variant and with the default, on the wan and hunyuan shapes of benchmarks/attention.py.

    python benchmarks/quant_sweep.py --out-dir OUT            # about 6-8 min on an H100
    python benchmarks/quant_sweep.py --quick --shapes wan1.3b-81f-480p

Variants (config keys of kernels/attention_configs.py): ``pipeline_qk`` (Q·K^T one block ahead of the
softmax), BLOCK_N 256, 128-row tiles and 2-stage tiles. (``exp_poly``, part of P's exp2 on the FMA pipe,
was slower in every configuration of the 2026-11-22 sweep and is no longer in the kernel.) rel_err
is against a float64 reference on ~256 sampled query rows (attention.py's reference_rows), mask
applied. The second shape times only cuDNN, the default and the three fastest fp8 variants of the
first shape (and the fastest int8 one), to stay in the time budget. Writes
quant-sweep-<gpu>-<date>.json (rows as in attention.py) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attention as A  # noqa: E402  (benchmarks/attention.py: shapes, reference, impls, timing)
from result_files import git_sha, result_path, slug  # noqa: E402

_BASE = dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3, tma=True)  # DEFAULT_CONFIGS[("sm90-q", 128)]
VARIANTS = {  # name: config; "default" is the current quantized default
    "default": dict(_BASE),
    "pipe": dict(_BASE, pipeline_qk=True),
    "s2": dict(_BASE, num_stages=2),
    "128x128w8": dict(_BASE, BLOCK_M=128, num_warps=8),
    "128x256w8s2": dict(_BASE, BLOCK_M=128, BLOCK_N=256, num_warps=8, num_stages=2),
    "64x256s2": dict(_BASE, BLOCK_N=256, num_stages=2),
}
INT8_VARIANTS = ("default", "pipe", "s2")


def _row(shape_name, shape, impl, variant, cfg, mask=None):
    b, h, s, d = shape
    return dict(shape=shape_name, impl=impl, variant=variant, config=cfg, B=b, H=h, S=s, D=d,
                density=round(mask.density(), 4) if mask is not None else 1.0, ms=None, tflops=None, rel_err=None)


def time_one(row, fn, ref_rows, rows, flops, quick):
    try:
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        row["first_call_s"] = round(time.perf_counter() - t0, 2)
        row["rel_err"] = A.rel_err(out, rows, ref_rows)
        del out
        row["ms"] = A.bench(fn, quick)
        row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
    except Exception as exc:  # a variant the compiler or the GPU refuses: an error row, the run goes on
        msg = f"{type(exc).__name__}: {exc}"
        row["error"] = msg[:300] + " ... " + msg[-500:] if len(msg) > 800 else msg
        traceback.print_exc()
    A.free_memory()
    return row


def run_shape(name, shape, variants, int8_variants, quick, sample_n, device, density) -> list[dict]:
    b, h, s, d = shape
    scale = 1.0 / math.sqrt(d)
    g = torch.Generator(device=device).manual_seed(42)
    q, k, v = (torch.randn(b, s, h, d, device=device, dtype=torch.bfloat16, generator=g) for _ in range(3))
    rows = A.sample_rows(s, sample_n, device)
    flops = 4.0 * b * h * s * s * d
    ref = A.reference_rows(q, k, v, rows, None, scale)
    out_rows = []

    def emit(row):
        out_rows.append(row)
        print(fmt(row), flush=True)

    emit(time_one(_row(name, shape, "cudnn", None, None), A.make_impl("cudnn", q, k, v, None, None, scale),
                  ref, rows, flops, quick))
    for mode, names in (("fp8", variants), ("int8", int8_variants)):
        for vname in names:
            cfg = VARIANTS[vname]
            fn = A.make_impl(f"ours-{mode}", q, k, v, None, None, scale, cfg)
            emit(time_one(_row(name, shape, f"ours-{mode}", vname, cfg), fn, ref, rows, flops, quick))
    # Sparse + fp8: the fastest dense fp8 variant of this shape against the default, on one local mask.
    fp8 = [r for r in out_rows if r["impl"] == "ours-fp8" and r["ms"] is not None]
    best = min(fp8, key=lambda r: r["ms"])["variant"] if fp8 else "default"
    mask = A.local_block_mask(s, h, density, device)
    ref_sparse = A.reference_rows(q, k, v, rows, mask, scale)
    for vname in dict.fromkeys(("default", best)):
        cfg = dict(VARIANTS[vname])
        if mask.block_n % cfg["BLOCK_N"] or mask.block_m % cfg["BLOCK_M"]:
            cfg["BLOCK_N"], cfg["BLOCK_M"] = min(cfg["BLOCK_N"], mask.block_n), min(cfg["BLOCK_M"], mask.block_m)
        fn = A.make_impl("ours-sparse-fp8", q, k, v, mask, None, scale, cfg)
        emit(time_one(_row(name, shape, "ours-sparse-fp8", vname, cfg, mask), fn, ref_sparse, rows, flops, quick))
    del q, k, v, ref, ref_sparse, mask
    A.free_memory()
    return out_rows


def fmt(row) -> str:
    err = f" ERROR {row['error'][:300]}" if "error" in row else ""
    return (f"| {row['shape']} | {row['impl']} | {row['variant'] or '—'} | {row['density']:.3f} | "
            f"{A._fmt(row['ms'], '.2f')} | {A._fmt(row['tflops'], '.0f')} | {A._fmt(row.get('vs_cudnn'), '.3f')} | "
            f"{A._fmt(row['rel_err'], '.2e')} |{err}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", choices=sorted(A.SHAPES), default=["wan1.3b-81f-480p", "hunyuan-129f-720p"])
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS),
                   help="fp8 variants on the first shape")
    p.add_argument("--top", type=int, default=3, help="fastest fp8 variants of the first shape run on the others")
    p.add_argument("--density", type=float, default=0.1, help="target fraction of blocks of the sparse rows")
    p.add_argument("--quick", action="store_true", help="short timing (warmup 5 ms, rep 20 ms)")
    p.add_argument("--sample-rows", type=int, default=256)
    p.add_argument("--out-dir", type=Path, default=A.REPO / "benchmarks" / "results")
    p.add_argument("--git-sha", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/quant_sweep.py needs a CUDA GPU")
    import triton

    device = torch.device("cuda")
    gpu = torch.cuda.get_device_name(device)
    print(f"{gpu}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    today = _dt.date.today()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = result_path(args.out_dir, "quant-sweep", slug(gpu), today, "-quick" if args.quick else "")
    result = {"gpu": gpu, "date": today.isoformat(),
              "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
              "versions": {"torch": torch.__version__, "triton": triton.__version__,
                           "vdit_accel": args.git_sha or git_sha()},
              "protocol": "do_bench median, " + ("warmup 5/rep 20 ms" if args.quick else "warmup 25/rep 200 ms"),
              "variants": VARIANTS, "rows": []}
    variants, int8_variants = list(args.variants), [v for v in INT8_VARIANTS if v in args.variants]
    for i, name in enumerate(args.shapes):
        rows = run_shape(name, A.SHAPES[name], variants, int8_variants, args.quick, args.sample_rows, device,
                         args.density)
        cudnn = next((r["ms"] for r in rows if r["impl"] == "cudnn" and r["ms"]), None)
        for r in rows:
            r["vs_cudnn"] = cudnn / r["ms"] if cudnn and r["ms"] else None
        result["rows"] += rows
        path.write_text(json.dumps(result, indent=1) + "\n")
        if i == 0:  # the next shapes: the default and the fastest few of this one
            ranked = sorted((r for r in rows if r["impl"] == "ours-fp8" and r["ms"]), key=lambda r: r["ms"])
            variants = list(dict.fromkeys(["default"] + [r["variant"] for r in ranked[: args.top]]))
            ranked8 = sorted((r for r in rows if r["impl"] == "ours-int8" and r["ms"]), key=lambda r: r["ms"])
            int8_variants = list(dict.fromkeys(["default"] + [r["variant"] for r in ranked8[:1]]))
    print("\n| shape | impl | variant | density | ms | TFLOP/s (dense-eq.) | x cuDNN | rel_err |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(fmt(r))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
