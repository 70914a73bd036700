"""Accuracy of the quantized recipes against SageAttention 1.0.6's, on the CPU, on the four input families.

    python benchmarks/quant_accuracy.py                      # B=1, S=4099, H=4, D=128 (BENCHMARKS.md's inputs)
    python benchmarks/quant_accuracy.py --seq 1027 --heads 2  # quicker

Every row is a float64 simulation of exactly what a kernel computes on its quantized operands
(vdit_accel.quant.reference_quant_attention at the Hopper defaults' tiles, and
reference_sage1_attention for SageAttention 1.0.6's Triton recipe), on bf16 inputs from
vdit_accel.quant.accuracy_inputs, against the float64 attention of the same bf16 inputs: relative L2 error
of the output. ``bf16`` is an unquantized 16-bit kernel's arithmetic (fp32 scores from the bf16 inputs, P
rounded to bf16, fp32 accumulation, output rounded to bf16): the floor of every row. The
other rows are recipes studied here (vdit_accel.quant.RECIPES overridden): ``-pv16`` / ``-pvfp8`` P and V in
16 bits (fp32 accumulation) / in e4m3; ``-rows`` one scale per token for Q and K instead of one per tile.
Writes benchmarks/results/quant-accuracy-cpu-<date>.json and prints the table (ratios to sage1).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from result_files import RESULTS, result_path, run_header  # noqa: E402

from vdit_accel.kernels.attention_configs import gpu_tiles  # noqa: E402
from vdit_accel.quant import (ACCURACY_FAMILIES, accuracy_inputs, reference_quant_attention,  # noqa: E402
                              reference_sage1_attention)
from vdit_accel.reference import reference_attention  # noqa: E402

# name: (mode, recipe overrides); None mode: not a quantized kernel
ROWS = {
    "fp8": ("fp8", {}), "int8": ("int8", {}), "int4": ("int4", {}),  # the modes as the kernels run them
    "int8-pvfp8": ("int8", dict(pv="fp8")),  # int8's recipe before issue 22 (e4m3 P and V)
    "int8-rows": ("int8", dict(q_group=1, k_group=1)),  # one scale per token (SageAttention2's finer grain)
    "fp8-rows": ("fp8", dict(q_group=1, k_group=1)), "fp8-pv16": ("fp8", dict(pv="16")),
    "fp8-rows-pv16": ("fp8", dict(q_group=1, k_group=1, pv="16")),
}

def _bf16_kernel(q, k, v):
    """fp32 scores of the bf16 inputs, P rounded to bf16 against the row max, fp32 P V, bf16 out."""
    qh, kh, vh = (x.transpose(1, 2).float() for x in (q, k, v))
    sc = qh @ kh.transpose(-1, -2) / q.shape[-1] ** 0.5
    p = torch.exp(sc - sc.amax(-1, keepdim=True))
    out = (p.to(torch.bfloat16).float() @ vh) / p.sum(-1, keepdim=True)
    return out.transpose(1, 2).to(torch.bfloat16)


def _rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=4099)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tag, date, doc = run_header("quant_accuracy.py", argv, "cpu")
    b, s, h, d = args.batch, args.seq, args.heads, args.head_dim
    doc.update(inputs=dict(B=b, S=s, H=h, D=d, dtype="bfloat16", seed=args.seed), rows=[])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = result_path(args.out_dir, "quant-accuracy", tag, date)
    for family in ACCURACY_FAMILIES:
        q, k, v = accuracy_inputs(family, b, s, h, d, seed=args.seed)
        exact = reference_attention(q.double(), k.double(), v.double())
        errs = {"bf16": _rel(_bf16_kernel(q, k, v), exact)}
        t0 = time.perf_counter()
        errs["sage1"] = _rel(reference_sage1_attention(q, k, v), exact)
        for name, (mode, recipe) in ROWS.items():
            bm, bn = gpu_tiles(d, mode)
            errs[name] = _rel(reference_quant_attention(q, k, v, mode, block_m=bm, block_n=bn, recipe=recipe), exact)
        for name, err in errs.items():
            doc["rows"].append(dict(family=family, recipe=name, rel_err=err, vs_sage1=err / errs["sage1"]))
        print(f"{family}: " + ", ".join(f"{n} {e:.2e} ({e / errs['sage1']:.2f}x)" for n, e in errs.items())
              + f"  [{time.perf_counter() - t0:.0f} s]", flush=True)
        path.write_text(json.dumps(doc, indent=1) + "\n")
    names = ["bf16", "sage1", *ROWS]
    print("\n| inputs | " + " | ".join(names) + " |\n|" + "---|" * (len(names) + 1))
    for family in ACCURACY_FAMILIES:
        got = {r["recipe"]: r for r in doc["rows"] if r["family"] == family}
        cells = [f"{got[n]['rel_err'] * 100:.2f}%" + ("" if n in ("bf16", "sage1") else f" ({got[n]['vs_sage1']:.2f}x)")
                 for n in names]
        print(f"| {family} | " + " | ".join(cells) + " |")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
