"""The offline search sharded over P processes against one process, on the same prompts (issue 24, point 4).

    python benchmarks/sharded_search.py --nproc 2 --out-dir OUT                 # GPUs: wan-rich at its native size
    python benchmarks/sharded_search.py --nproc 2 --smoke --out-dir /tmp/s      # the tiny random Wan on the CPU (gloo)

Runs ``vdit-accel search`` twice with the same arguments and ``--nproc * --prompts-per-rank`` prompts:
in one process, then under ``torchrun --nproc-per-node P`` (each rank profiles ``prompts[rank::P]``, the
statistics are all-reduced, every rank solves the same problem). The one-process run goes first, so that
on a GPU both read the same measured cost model (cached on disk per GPU and shape). Writes
``search-<gpu>-<yyyymmdd>-sharded-p<P>.json``: per run the search's own seconds (profiling and solve; the
strategy file's ``search.seconds``, rank 0's), the seconds per prompt, the process's wall time (model
load included), and for the sharded run its speed-up, efficiency and whether its strategy is the
one-process one (every head's pattern, order and quantization, the warm-ups and step ranges; the
search metadata aside).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from result_files import run_header, write_result  # noqa: E402

# The GPU default: wan-rich (the quality testbed) at its native 65x256x448 (30,464 tokens), 10 steps.
GPU_ARGS = ["--model", "wan-rich", "--num-inference-steps", "10"]
SMOKE_ARGS = ["--model", "wan", "--frames", "9", "--height", "128", "--width", "128", "--num-inference-steps", "2",
              "--block-size", "32", "--sample-blocks", "2", "--device", "cpu"]


def prompts(n: int) -> list[str]:
    """``n`` distinct captions of the rich toy scenes (what wan-rich was trained on)."""
    from vdit_accel.pipelines import toy

    seen, out, seed = set(), [], 0
    while len(out) < n:
        for scene in toy.sample_rich_scenes(n, seed=100 + seed):
            if scene.caption not in seen and len(out) < n:
                seen.add(scene.caption)
                out.append(scene.caption)
        seed += 1
    return out


def _search(nproc: int, args: list[str], out: Path, log: Path) -> float:
    """Run the search (under torchrun when ``nproc`` > 1); its wall seconds. Its stderr goes to ``log``."""
    cli = ["-m", "vdit_accel.cli.app", "search", *args, "--no-png", "--out", str(out)]
    cmd = [sys.executable, *cli] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *cli]
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=os.environ)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); its log: {log}")
    return wall


def _heads(path: Path) -> dict:
    """What a strategy does (its document without the search's metadata)."""
    doc = json.loads(path.read_text())
    doc.pop("search", None)
    return doc


def _differing(a: dict, b: dict) -> int:
    """Heads whose spec differs between two strategy documents (every head if their shapes differ)."""
    la, lb = a.get("layers") or [], b.get("layers") or []
    if len(la) != len(lb) or any(len(x) != len(y) for x, y in zip(la, lb)):
        return max(sum(map(len, la)), sum(map(len, lb)), 1)
    return sum(x != y for ra, rb in zip(la, lb) for x, y in zip(ra, rb))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, required=True, help="processes of the sharded run (GPUs)")
    ap.add_argument("--prompts-per-rank", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="the tiny random Wan on the CPU (2 steps)")
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--work-dir", type=Path, default=None, help="where the prompts, strategies and logs go "
                    "(default: a temporary folder)")
    ap.add_argument("--git-sha", default=None)
    ap.add_argument("search_args", nargs="*", help="more arguments of `vdit-accel search` (after --)")
    args = ap.parse_args(argv)
    if args.nproc < 2 or args.prompts_per_rank < 1:
        raise SystemExit("--nproc must be >= 2 and --prompts-per-rank >= 1")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="sharded-search-"))
    work.mkdir(parents=True, exist_ok=True)
    texts = prompts(args.nproc * args.prompts_per_rank)
    (work / "prompts.txt").write_text("\n".join(texts) + "\n")
    search_args = (SMOKE_ARGS if args.smoke else GPU_ARGS) + ["--prompts", str(work / "prompts.txt"), *args.search_args]
    device = "cpu" if args.smoke else "cuda"
    rows, strategies = [], {}
    for nproc in (1, args.nproc):
        out = work / f"strategy-p{nproc}.json"
        wall = _search(nproc, search_args, out, work / f"search-p{nproc}.log")
        meta = json.loads(out.read_text())["search"]
        assert meta["world_size"] == nproc, meta["world_size"]
        strategies[nproc] = _heads(out)
        rows.append({"impl": f"search-{nproc}proc", "processes": nproc, "prompts": len(texts),
                     "seconds": meta["seconds"], "seconds_per_prompt": round(meta["seconds"] / len(texts), 3),
                     "wall_s": round(wall, 1), "grid": meta["grid"], "profiled_steps": len(meta["profiled_steps"]),
                     "cost_model": meta["cost_model"]["source"], "strategy": meta["summary"]})
        print(json.dumps(rows[-1]), flush=True)
    one, many = rows
    differing = _differing(strategies[1], strategies[args.nproc])
    many.update(speedup=round(one["seconds"] / many["seconds"], 3),
                efficiency=round(one["seconds"] / many["seconds"] / args.nproc, 3),
                same_strategy=strategies[1] == strategies[args.nproc], heads_differing=differing)
    tag, today, doc = run_header("sharded_search.py", argv, device, args.git_sha)
    doc.update(protocol=("`vdit-accel search` on the same prompts in 1 and P processes (torchrun: prompts split, "
                         "statistics all-reduced); seconds: the search's own (strategy file search.seconds, rank 0), "
                         "wall_s: the process's, model load included"),
               search_args=search_args, prompts=texts, rows=rows)
    write_result(args.out_dir, "search", tag, today, doc, suffix=f"-sharded-p{args.nproc}")
    print(json.dumps(many))


if __name__ == "__main__":
    main()
