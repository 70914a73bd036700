"""Same output under Ulysses as on one GPU (issue 24, point 3), in bf16 on GPUs.

    python benchmarks/ulysses_check.py --nproc 2 --out-dir OUT                   # P GPUs, bf16
    python benchmarks/ulysses_check.py --nproc 2 --device cpu --out-dir /tmp/c   # the same on the CPU (gloo)

Launches ``torchrun --nproc-per-node P tests/pipelines/ulysses_pipeline_worker.py`` (tiny Wan 2.1 and
HunyuanVideo pipelines, 3 steps: unpatched, patched dense, patched per-head sparse in the tiled order with
a dense warm-up step; batch 1 and 2) and compares each run's latents on P ranks with the same run on one
(rank 0's process before ``enable_ulysses``). The yardstick of "within bf16 rounding" is how far bf16
itself moves that run's latents from float32 on one process: a row holds (``ok``) when the Ulysses
difference is at most that. Writes ``ulysses-<gpu>-<yyyymmdd>-p<P>-check.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from result_files import REPO, run_header, write_result  # noqa: E402

WORKER = REPO / "tests" / "pipelines" / "ulysses_pipeline_worker.py"


def rows_of(res: dict, nproc: int) -> list[dict]:
    """One row per (family, run, batch): the largest difference of P ranks' latents from one process's,
    and bf16's own (bf16 against float32, one process) where the worker ran that too."""
    rows = []
    for family, run, batch, p in sorted(k for k in res if isinstance(k, tuple) and k[3] == 1):
        (one, _), (many, calls) = res[(family, run, batch, 1)], res[(family, run, batch, nproc)]
        diff = (many - one).abs().max().item()
        row = {"family": family, "run": run, "batch": batch, "dtype": res["dtype"], "max_abs_diff": diff,
               "latent_max": one.abs().max().item(), "a2a_calls": calls}
        if (family, run, batch, 0) in res:
            rounding = (one - res[(family, run, batch, 0)][0]).abs().max().item()
            row.update(bf16_rounding=rounding, ok=diff <= rounding)
        rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, required=True)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--git-sha", default=None)
    args = ap.parse_args(argv)
    env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {}))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "latents.pt"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
               str(WORKER), str(out), args.dtype]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        res = torch.load(out)
    assert res["world"] == args.nproc
    rows = rows_of(res, args.nproc)
    for r in rows:
        print(json.dumps(r))
    tag, today, doc = run_header("ulysses_check.py", argv, args.device, args.git_sha)
    doc.update(protocol=("tiny Wan 2.1 and HunyuanVideo pipelines (3 steps, latents), each run on P ranks against "
                         "the same run in one process; bf16_rounding: that run in bf16 against float32, one process"),
               ulysses=args.nproc, worker_device=res["device"], rows=rows,
               holds=all(r.get("ok", True) for r in rows) and all(r["a2a_calls"] > 0 for r in rows))
    write_result(args.out_dir, "ulysses", tag, today, doc, suffix=f"-p{args.nproc}-check")


if __name__ == "__main__":
    main()
