"""``--ulysses P``: the torchrun rule, and ``generate --ulysses 2`` (2 gloo processes) against one process."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch.distributed as dist
from typer.testing import CliRunner

from vdit_accel import Strategy
from vdit_accel.cli.app import app
from vdit_accel.strategy import HeadSpec

runner = CliRunner()
# The tiny random Wan (4 layers of 4 heads): 3 x 8 x 8 = 192 video tokens, 2 steps, the first dense.
SIZE = ["--model", "wan", "--frames", "9", "--height", "128", "--width", "128", "--steps", "2",
        "--dense-warmup-steps", "1", "--block-size", "32", "--no-compare", "--device", "cpu"]
PER_HEAD = ["dense", "window3d:t=0,h=1,w=1", "window3d:t=0,h=4,w=4", "window3d:t=1,h=1,w=1"]


def test_ulysses_needs_torchrun_with_as_many_processes(tmp_path, monkeypatch):
    out = str(tmp_path / "v.mp4")
    res = runner.invoke(app, ["generate", "--model", "wan", "--ulysses", "2", "--out", out])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
    assert ("--ulysses 2 runs one process per GPU under torchrun, but one process started; run: torchrun "
            f"--nproc-per-node 2 -m vdit_accel.cli.app generate --model wan --ulysses 2 --out {out}") in res.stderr
    res = runner.invoke(app, ["bench", "pipeline", "--shape", "tiny-wan", "--ulysses", "4"])
    assert res.exit_code == 2 and "torchrun --nproc-per-node 4 -m vdit_accel.cli.app bench pipeline" in res.stderr
    res = runner.invoke(app, ["generate", "--ulysses", "0", "--out", out])
    assert res.exit_code == 2 and "--ulysses must be >= 1" in res.stderr
    monkeypatch.setenv("WORLD_SIZE", "2")
    res = runner.invoke(app, ["generate", "--out", out])
    assert res.exit_code == 2 and "without --ulysses: each would run the whole command; add --ulysses 2" in res.stderr
    res = runner.invoke(app, ["generate", "--order", "semantic", "--ulysses", "2", "--out", out])
    assert res.exit_code == 2 and "semantic and segment token orders do not run under --ulysses" in res.stderr
    assert not list(tmp_path.iterdir())  # all before any work


def test_generate_ulysses_2_gives_one_process_frames(tmp_path):
    """Point 3 of issue 24 through the command itself: a per-head sparse strategy in the tiled order with a
    dense warm-up step, on 2 processes (gloo) and on one, the same frames (float32; the PNG strip is
    lossless: at most 1 of 255 where rounding straddles a level); only rank 0 writes."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    strategy = tmp_path / "per-head.json"
    Strategy(default=HeadSpec("dense", order="tiled"), layers=[PER_HEAD] * 4).save(strategy)
    args = [*SIZE, "--strategy", str(strategy)]
    one = tmp_path / "one" / "v.mp4"
    res = runner.invoke(app, ["generate", *args, "--out", str(one)])
    assert res.exit_code == 0, res.output
    two = tmp_path / "two" / "v.mp4"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "vdit_accel.cli.app", "generate", *args, "--ulysses", "2", "--out", str(two)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"video"') == 1 and proc.stderr.count("wrote ") == 1  # rank 0 speaks, once
    report = json.loads(two.with_suffix(".json").read_text())
    assert report["ulysses"] == 2 and 0 < report["density"] < 1
    assert sorted(p.name for p in two.parent.iterdir()) == ["v-frames.png", "v.json", "v.mp4"]
    a, b = (cv2.imread(str(p.with_name("v-frames.png"))).astype(int) for p in (one, two))
    assert a.shape == b.shape and np.abs(a - b).max() <= 1


def test_bench_pipeline_ulysses_reports_all_to_all_and_scaling(tmp_path):
    """``bench pipeline --ulysses 2`` (2 gloo processes) against a ``--ulysses 1`` baseline: every row has
    its step, all-to-all and scaling figures, measured (rank 0 writes the one file)."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    args = ["bench", "pipeline", "--shape", "tiny-wan", "--variants", "dense-cudnn,ours-window3d-0.15-tiled",
            "--block-size", "16", "--device", "cpu", "--reps", "2", "--out-dir", str(tmp_path)]
    res = runner.invoke(app, [*args, "--ulysses", "1"])
    assert res.exit_code == 0, res.output
    (one_path,) = tmp_path.glob("ulysses-cpu-*-p1.json")
    one = json.loads(one_path.read_text())
    assert one["ulysses"] == 1 and [r["a2a_calls"] for r in one["rows"]] == [0, 0]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "vdit_accel.cli.app", *args, "--ulysses", "2", "--baseline", str(one_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("| tiny-wan | dense-cudnn |") == 1  # rank 0's table only
    (two_path,) = tmp_path.glob("ulysses-cpu-*-p2.json")
    two = json.loads(two_path.read_text())
    assert two["ulysses"] == 2 and two["baseline"] == one_path.name and two["command"].startswith("torchrun")
    for r, base in zip(two["rows"], one["rows"]):
        assert r["impl"] == base["impl"] and "error" not in r, r
        # 2 self-attention layers, q, k, v and out exchanged in each (Wan's cross-attention: none, local)
        assert r["attn_calls"] == 2 and r["a2a_calls"] == 8 and 0 < r["a2a_ms"] < r["ms"]
        assert r["ms_1gpu"] == base["ms"] and r["speedup_vs_1gpu"] == pytest.approx(base["ms"] / r["ms"], rel=1e-2)
        assert r["efficiency"] == pytest.approx(r["speedup_vs_1gpu"] / 2, rel=1e-2)
    res = runner.invoke(app, [*args, "--ulysses", "1", "--baseline", str(two_path)])
    assert res.exit_code == 2 and "not a result file of `bench pipeline` on one GPU" in res.stderr
