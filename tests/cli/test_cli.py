import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from vdit_accel.cli.app import app
from vdit_accel.video import read_mp4

runner = CliRunner()


def test_generate_end_to_end(tmp_path):
    out = tmp_path / "clip.mp4"
    res = runner.invoke(app, ["generate", "--frames", "9", "--height", "64", "--width", "80", "--steps", "2",
                              "--strategy", "window3d:t=0,h=1,w=1", "--block-size", "32", "--out", str(out)])
    assert res.exit_code == 0, res.output
    video = read_mp4(out)
    assert video.shape == (9, 64, 80, 3)
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["model"] == "wan-trained"  # the default: the trained tiny Wan (8x8 pixels a token)
    assert report["grid"] == {"t": 3, "h": 8, "w": 10, "tokens": 240}
    assert 0 < report["density"] < 1
    assert report["psnr_db"] > 0 and report["speedup"] > 0
    assert report["dense"]["transformer_calls"] == report["accelerated"]["transformer_calls"] == 4
    assert report["accelerated"]["transformer_s_per_step"] > 0


def test_generate_reports_each_quantized_mode(tmp_path):
    out = tmp_path / "clip.mp4"
    res = runner.invoke(app, ["generate", "--frames", "5", "--height", "64", "--width", "64", "--steps", "2",
                              "--strategy", "dense", "--quant", "all", "--block-size", "32", "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.with_suffix(".json").read_text())
    assert set(report["quant"]) == {"fp8", "int8", "int4"}
    for mode, entry in report["quant"].items():
        # Quantized attention changes the video a little: finite PSNR, but close to the dense one.
        assert 20 < entry["psnr_db"] < 200 and entry["transformer_calls"] == 4, (mode, entry)
    assert json.loads(res.stdout.strip().splitlines()[-1])["quant_psnr_db"].keys() == {"fp8", "int8", "int4"}


def test_generate_with_a_token_order(tmp_path):
    out = tmp_path / "clip.mp4"
    res = runner.invoke(app, ["generate", "--frames", "5", "--height", "64", "--width", "96", "--steps", "2",
                              "--order", "semantic:top_p=0.9,refresh=2", "--block-size", "16", "--no-compare", "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.with_suffix(".json").read_text())
    assert "order=semantic:top_p=0.9,refresh=2" in report["strategy"] and "dense" in report["strategy"]


@pytest.mark.parametrize(
    "args,match",
    [
        (["--quant", "fp4"], "--quant must be one of"),
        (["--frames", "4"], "--frames must be 4k+1"),
        (["--height", "100"], "multiples of 16"),
        (["--strategy", "window9d"], "neither a .json strategy file nor a pattern"),
        (["--strategy", "missing.json"], "does not exist"),
        (["--out", "x.avi"], "must end in .mp4"),
        (["--dtype", "int8"], "--dtype"),
        (["--order", "spiral"], "unknown order kind"),
        (["--order", "semantic", "--strategy", "window3d:t=1,h=1,w=1"], "must be 'dense'"),
        (["--large", "--model", "wan"], "--large is the size of the built-in 'wan-trained'"),
    ],
)
def test_generate_bad_input_is_one_line(args, match):
    res = runner.invoke(app, ["generate", *args])
    assert res.exit_code == 2
    lines = [l for l in res.output.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and match in lines[0], res.output
    assert "Traceback" not in res.output


def test_inspect_and_console_script():
    res = runner.invoke(app, ["inspect", "window3d:t=1,h=2,w=2", "--frames", "5", "--height", "8", "--width", "8"])
    assert res.exit_code == 0 and "mean density" in res.output
    proc = subprocess.run([sys.executable, "-m", "vdit_accel.cli.app", "version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("vdit-accel ")


def test_generate_large_is_the_trained_models_large_size(tmp_path, monkeypatch):
    """--large takes frames, height and width from trained.LARGE_SIZE (made small here for speed);
    explicit sizes still win."""
    from vdit_accel.pipelines import trained

    monkeypatch.setattr(trained, "LARGE_SIZE", dict(num_frames=5, height=48, width=80))
    out = tmp_path / "clip.mp4"
    res = runner.invoke(app, ["generate", "--large", "--height", "64", "--steps", "1", "--no-compare", "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.with_suffix(".json").read_text())
    assert (report["model"], report["frames"], report["height"], report["width"]) == ("wan-trained", 5, 64, 80)
