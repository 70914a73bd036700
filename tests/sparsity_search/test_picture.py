"""Strategy pictures and `inspect`: layers x heads per step range, kinds as colours, the run's accounting."""

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from vdit_accel import Strategy, VideoGrid
from vdit_accel.sparsity_search.picture import KIND_COLOURS, _shade, strategy_picture

_spec = importlib.util.spec_from_file_location(
    "test_strategy_schedule", Path(__file__).resolve().parents[1] / "core" / "test_strategy_schedule.py")
_schedule = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_schedule)


def _has(img: np.ndarray, rgb) -> bool:
    return bool((img.reshape(-1, 3) == np.array(rgb, np.uint8)).all(1).any())


def test_picture_shows_kinds_density_and_ranges():
    st = dataclasses.replace(_schedule._scheduled(), search={"error_per_step": [0.0, 0.1, 0.05, 0.04, 0.03, 0.02]})
    grid = VideoGrid(5, 8, 8)
    img = strategy_picture(st, grid, 6, block_size=32)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.shape[1] >= 720
    assert _has(img, KIND_COLOURS["skip"]) and _has(img, KIND_COLOURS["dense"])  # skip and dense cells, full colour
    from vdit_accel.sparsity_search.accounting import HeadDensity
    from vdit_accel.strategy import HeadSpec

    w = HeadDensity(grid, 32)(HeadSpec("window1d:frames=0.5"))
    assert _has(img, _shade(KIND_COLOURS["window1d"], w))  # the late range's window1d heads, shaded by density
    dense_only = strategy_picture(Strategy.dense(), grid, 6)
    assert not _has(dense_only, KIND_COLOURS["window3d"])


def test_inspect_prints_the_ranges_and_the_accounting_and_draws(tmp_path):
    from vdit_accel.cli.app import app

    path = tmp_path / "s.json"
    _schedule._scheduled().save(path)
    png = tmp_path / "s.png"
    res = CliRunner().invoke(app, ["inspect", str(path), "--latent-frames", "5", "--latent-height", "8", "--latent-width",
                                   "8", "--num-steps", "10", "--block-size", "32", "--png", str(png)])
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "from step 2:" in out and "(dense for its first 3 steps)" in out and "effective density" in out
    assert "expected attention speed-up" in out and png.is_file() and png.stat().st_size > 1000
    dense = tmp_path / "d.json"
    Strategy.uniform("window3d:t=1,h=1,w=1", dense_warmup_steps=50).save(dense)
    res = CliRunner().invoke(app, ["inspect", str(dense), "--num-steps", "50"])
    assert res.exit_code == 0 and res.stdout.splitlines()[0].startswith("runs dense throughout a 50-step run")
    assert "layer" not in res.stdout  # no list of patterns that never run
    bad = CliRunner().invoke(app, ["inspect", str(path), "--png", str(tmp_path / "x.jpg")])
    assert bad.exit_code == 2 and "--png must end in .png" in bad.output
