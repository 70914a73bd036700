"""One denoising step of real video DiTs at real size: diffusers' attention against ours and FlexAttention.

    python benchmarks/e2e.py --out-dir OUT --git-sha SHA       # every real shape and row (H100: ~6 min)
    python benchmarks/e2e.py --shapes wan2.1-14b-720p --reps 2
    python benchmarks/e2e.py --smoke --out-dir /tmp/e2e        # tiny shapes on the CPU

A thin wrapper over ``vdit_accel.cli.bench`` (also ``vdit-accel bench pipeline``), which documents the
rows, the timing and the result file. ``ours-searched`` loads the newest committed
``results/search-strategy-wan1.3b-*.json`` by default (it fits Wan2.1-1.3B; other models skip it).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None):
    from vdit_accel.cli.bench import REAL_SHAPES, SHAPES, VARIANTS, markdown_table, run_pipeline_bench

    searched = sorted(RESULTS.glob("search-strategy-wan1.3b-*.json"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(REAL_SHAPES))
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--reps", type=int, default=None, help="timed forwards per row (default: per shape)")
    ap.add_argument("--searched-strategy", type=Path, default=searched[-1] if searched else None)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--smoke", action="store_true", help="the tiny shapes on the CPU (block size 16)")
    ap.add_argument("--out-dir", type=Path, default=None, help="default: results/ (--smoke: a temporary folder)")
    ap.add_argument("--git-sha", default=None)
    args = ap.parse_args(argv)
    device, out_dir = None, args.out_dir or RESULTS
    if args.smoke:
        args.shapes, args.block_size, device = ["tiny-wan", "tiny-hunyuan"], 16, "cpu"
        out_dir = args.out_dir or Path(tempfile.gettempdir()) / "vdit-e2e-smoke"
    command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + (sys.argv[1:] if argv is None else list(argv)))
    doc, _ = run_pipeline_bench(args.shapes, args.variants, args.reps, out_dir, device, args.block_size,
                                args.searched_strategy, command=command, git_sha=args.git_sha)
    print("\n" + markdown_table(doc))


if __name__ == "__main__":
    main()
