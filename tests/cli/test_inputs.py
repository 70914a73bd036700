"""Every checkable input of `generate` is checked before any work: one line, exit 2, no traceback,
nothing written."""

import json
import os
import pickle
import re
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from vdit_accel.cli.app import app

runner = CliRunner()


def _one_line_error(res, match):
    assert res.exit_code == 2, res.output
    lines = [l for l in res.output.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and match in lines[0], res.output
    assert "Traceback" not in res.output, res.output
    assert not any(l.startswith("dense ") for l in res.stderr.splitlines()), res.output  # stopped before the dense run


@pytest.mark.parametrize(
    "args,match",
    [
        (["--frames", "0"], "--frames must be >= 1, got 0"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--height", "0"], "--height must be >= 1, got 0"),
        (["--width=-16"], "--width must be >= 1"),
        (["--dense-warmup-steps", "-1"], "--dense-warmup-steps must be >= 0"),
        (["--block-size", "100"], "--block-size must be a power of two"),
        (["--frames", "abc"], "Invalid value for '--frames'"),
        (["--bogus"], "No such option: --bogus"),
        (["--quant", "fp4"], "--quant must be one of"),
        (["--frames", "4"], "--frames must be 4k+1"),
        (["--height", "100"], "multiples of 8 pixels"),
        (["--steps", "3", "--dense-warmup-steps", "3", "--strategy", "window3d:t=0,h=1,w=1"], "nothing would be accelerated"),
        (["--strategy", "window9d"], "neither a .json strategy file nor a pattern"),
        (["--strategy", "missing.json"], "does not exist"),
        (["--out", "x.avi"], "must end in .mp4"),
        (["--dtype", "int8"], "--dtype"),
        (["--device", "tpu"], "--device must be cuda"),
        (["--order", "spiral"], "unknown order kind"),
        (["--order", "semantic", "--strategy", "window3d:t=1,h=1,w=1"], "must be 'dense'"),
        (["--large", "--model", "wan"], "--large is a size of the built-in trained models"),
        (["--model", "/nonexistent"], "--model '/nonexistent': no such folder"),
        (["--model", "not a/model/id"], "no such folder, and not a built-in model"),
    ],
)
def test_generate_bad_input_is_one_line(args, match, tmp_path):
    res = runner.invoke(app, ["generate", *args, "--out", str(tmp_path / "o" / "v.mp4")] if "--out" not in args
                        else ["generate", *args])
    _one_line_error(res, match)
    assert not (tmp_path / "o").exists()


def test_output_under_a_file_is_refused_before_work(tmp_path):
    """The issue's `--out /etc/passwd/x.mp4`, with a file of our own."""
    f = tmp_path / "afile"
    f.write_text("x")
    t0 = time.perf_counter()
    res = runner.invoke(app, ["generate", "--out", str(f / "x.mp4")])
    _one_line_error(res, f"{str(f)!r} is a file, not a folder")
    assert time.perf_counter() - t0 < 30 and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_output_folder_that_is_a_file_name_and_a_folder(tmp_path):
    (tmp_path / "v-dense.mp4").mkdir()  # one of the outputs beside --out is a folder
    res = runner.invoke(app, ["generate", "--out", str(tmp_path / "v.mp4")])
    _one_line_error(res, "v-dense.mp4' is a folder")


def test_read_only_output_folder_is_refused_before_work(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.geteuid() == 0:  # root writes anywhere: the check asks os.access, made to answer as for a user
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(ro) else real(p, mode))
        res = runner.invoke(app, ["generate", "--out", str(ro / "sub" / "v.mp4")])
    finally:
        ro.chmod(0o755)
    _one_line_error(res, f"the folder {str(ro)!r} is not writable")
    assert list(ro.iterdir()) == []


def test_model_folder_without_model_index(tmp_path):
    res = runner.invoke(app, ["generate", "--model", str(tmp_path), "--out", str(tmp_path / "v.mp4")])
    _one_line_error(res, "has no model_index.json: not a diffusers pipeline folder")


def test_pickle_named_json_is_refused(tmp_path):
    bad = tmp_path / "strategy.json"
    bad.write_bytes(pickle.dumps({"format": "vdit-accel-strategy"}))
    res = runner.invoke(app, ["generate", "--strategy", str(bad), "--out", str(tmp_path / "o" / "v.mp4")])
    _one_line_error(res, "is not a JSON strategy file (binary data; pickles are never loaded)")


def test_strategy_for_another_model_is_refused_before_the_dense_run(tmp_path):
    """A strategy of 30 layers on the 6-layer wan-trained fails on loading the model, not after a run."""
    from vdit_accel import Strategy

    path = tmp_path / "wan1.3b.json"
    Strategy(layers=[[{"kind": "dense"}] * 12] * 30).save(path)
    t0 = time.perf_counter()
    res = runner.invoke(app, ["generate", "--strategy", str(path), "--out", str(tmp_path / "o" / "v.mp4")])
    _one_line_error(res, "strategy was made for num_layers=30 but the model has num_layers=6")
    assert time.perf_counter() - t0 < 60 and not (tmp_path / "o").exists()


def test_usage_line_and_help_are_conventional():
    for cmd in (["generate"], ["inspect"], ["search"], ["models"], ["version"], ["bench", "pipeline"]):
        res = runner.invoke(app, [*cmd, "--help"])
        assert res.exit_code == 0, res.output
        assert not re.search(r"<(bool|int|str|float|path|text|int range|float range)>", res.output, re.I), res.output
        assert "{" not in res.output.split("\n")[0], res.output
    gen = " ".join(runner.invoke(app, ["generate", "--help"]).output.split())  # unwrapped
    assert "--large The built-in" in gen and "--compare / --no-compare" in gen  # flags: no value label
    assert "--frames N" in gen and "[default: out/video.mp4]" in gen and "[default: (wan-trained)]" in gen
    assert "inspect [OPTIONS] STRATEGY\n" in runner.invoke(app, ["inspect", "--help"]).output
    search = runner.invoke(app, ["search", "--help"]).output
    assert "--profile-steps" in search and "\n  --steps" not in search  # the old spelling: hidden, still accepted


def test_help_and_version_start_fast():
    """No torch at start-up: `--help` and `version` answer in well under a second on a quiet machine
    (bounded at 3 s here for loaded CI machines); the import itself must not pull torch."""
    code = "import sys, vdit_accel.cli.app; sys.exit('torch' in sys.modules or 'diffusers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    for args in (["--help"], ["generate", "--help"], ["version"]):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "vdit_accel.cli.app", *args], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert time.perf_counter() - t0 < 3.0, args


def test_lazy_package_keeps_attention_the_function():
    code = ("import vdit_accel, vdit_accel.pipelines.op, vdit_accel.attention as m; import types; "
            "assert callable(vdit_accel.attention) and not isinstance(vdit_accel.attention, types.ModuleType); "
            "assert vdit_accel.Strategy.__name__ == 'Strategy'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_gpu_figure_is_the_committed_one():
    """The console's GPU figure is read off a committed result file, row for row."""
    from pathlib import Path

    from vdit_accel.cli.generate import GPU_COMMAND, GPU_RESULT, gpu_figure

    doc = json.loads((Path(__file__).resolve().parents[2] / GPU_RESULT["file"]).read_text())
    assert doc["gpu"] == GPU_RESULT["gpu"]
    rows = {r["impl"]: r for r in doc["rows"] if r["shape"] == GPU_RESULT["shape"]}
    assert rows[GPU_RESULT["impl"]]["ms"] == GPU_RESULT["ms"]
    assert rows[GPU_RESULT["dense_impl"]]["ms"] == GPU_RESULT["dense_ms"]
    assert rows[GPU_RESULT["impl"]]["density"] == GPU_RESULT["density"]
    assert GPU_RESULT["shape"] in GPU_COMMAND and "2.22x" in gpu_figure()
