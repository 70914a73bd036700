import json
import subprocess
import sys

import cv2
from typer.testing import CliRunner

from vdit_accel.cli.app import app
from vdit_accel.video import read_mp4

runner = CliRunner()
SMALL = ["--frames", "9", "--height", "64", "--width", "80", "--steps", "2", "--block-size", "32"]


def test_generate_end_to_end(tmp_path):
    out = tmp_path / "clip.mp4"
    res = runner.invoke(app, ["generate", *SMALL, "--strategy", "window3d:t=0,h=1,w=1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    video = read_mp4(out)
    assert video.shape == (9, 64, 80, 3)
    assert read_mp4(tmp_path / "clip-dense.mp4").shape == (9, 64, 80, 3)
    compare = read_mp4(tmp_path / "clip-compare.mp4")  # three labelled panels, each enlarged to >= 256 px
    assert compare.shape[0] == 9 and compare.shape[2] == 3 * 320 + 2 * 4 and compare.shape[1] == 256 + 28
    strip = cv2.imread(str(tmp_path / "clip-frames.png"))
    assert strip is not None and strip.shape[1] > strip.shape[0]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["model"] == "wan-trained"  # the default: the trained tiny Wan (8x8 pixels a token)
    assert report["grid"] == {"t": 3, "h": 8, "w": 10, "tokens": 240}
    assert 0 < report["density"] < 1
    assert report["psnr_db"] > 0 and 0 < report["ssim"] <= 1 and report["speedup"] > 0
    assert report["dense"]["transformer_calls"] == report["accelerated"]["transformer_calls"] == 4
    assert report["accelerated"]["transformer_s_per_step"] > 0
    assert set(report["outputs"]) == {"accelerated", "dense", "compare", "frames", "report"}
    assert set(report["caption_check"]) == {"dense", "accelerated"}  # the default prompt is a toy caption
    # On a CPU the report and the console say what the speed-up is not, and where the GPU figure is.
    assert any("PyTorch's reference path" in n and "vdit-accel bench pipeline" in n for n in report["notes"])
    assert "PyTorch's reference path" in res.stderr and "e2e-nvidia-h100" in res.stderr
    # One progress bar per run: step i/n.
    assert "dense" in res.stderr and "accelerated" in res.stderr and "2/2" in res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["video"] == str(out)


def test_generate_without_compare_writes_the_accelerated_video_only(tmp_path):
    out = tmp_path / "clip.mp4"
    res = runner.invoke(app, ["generate", *SMALL, "--strategy", "dense", "--no-compare", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip-frames.png", "clip.json", "clip.mp4"]
    report = json.loads(out.with_suffix(".json").read_text())
    assert "psnr_db" not in report and any("dense everywhere" in n for n in report["notes"])


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


def test_generate_large_is_the_trained_models_large_size(tmp_path, monkeypatch):
    """--large takes frames, height and width from the trained model's ``large`` size (made small here for
    speed); explicit sizes still win."""
    import dataclasses

    from vdit_accel.pipelines.toy import trained

    small = dataclasses.replace(trained.WAN_TRAINED, large=dict(num_frames=5, height=48, width=80))
    monkeypatch.setitem(trained.MODELS, "wan-trained", small)
    out = tmp_path / "clip.mp4"
    res = runner.invoke(app, ["generate", "--large", "--height", "64", "--steps", "1", "--strategy", "window3d:t=1,h=1,w=1",
                              "--no-compare", "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.with_suffix(".json").read_text())
    assert (report["model"], report["frames"], report["height"], report["width"]) == ("wan-trained", 5, 64, 80)


def test_inspect_and_console_script():
    res = runner.invoke(app, ["inspect", "window3d:t=1,h=2,w=2", "--latent-frames", "5", "--latent-height", "8",
                              "--latent-width", "8"])
    assert res.exit_code == 0 and "effective density" in res.output and "warning" not in res.output
    proc = subprocess.run([sys.executable, "-m", "vdit_accel.cli.app", "version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("vdit-accel ") and "torch " in proc.stdout


def test_inspect_old_option_names_still_work_and_warn():
    new = runner.invoke(app, ["inspect", "window3d:t=1,h=2,w=2", "--latent-frames", "5", "--latent-height", "8",
                              "--latent-width", "8"])
    old = runner.invoke(app, ["inspect", "window3d:t=1,h=2,w=2", "--frames", "5", "--height", "8", "--width", "8"])
    assert old.exit_code == 0 and old.stdout == new.stdout
    assert "warning: inspect --frames is deprecated, use --latent-frames" in old.stderr


def test_search_with_progress_bars(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left\na blue square moving up\n")
    out = tmp_path / "s.json"
    res = runner.invoke(app, ["search", "--model", "wan", "--prompts", str(prompts), "--frames", "5", "--height", "64",
                              "--width", "64", "--num-inference-steps", "2", "--profile-steps", "1", "--block-size", "32",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["format"] == "vdit-accel-strategy"
    assert "prompts" in res.stderr and "2/2" in res.stderr and "prompt 2/2 profiled" in res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["picture"] == str(out.with_suffix(".png")) and out.with_suffix(".png").is_file()
    assert 0 < summary["effective_density"] <= 1 and "effective density" in summary["summary"]


def test_search_old_steps_option_warns(tmp_path):
    res = runner.invoke(app, ["search", "--steps", "0,1", "--prompts", str(tmp_path / "missing.txt")])
    assert res.exit_code == 2
    assert "warning: search --steps is deprecated, use --profile-steps" in res.stderr
    assert "error: --prompts" in res.stderr and "no such file" in res.stderr
