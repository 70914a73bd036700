"""The trained tiny Wan ("wan-trained"): the toy-video data and its checker, the training script end to end
at toy size on the CPU (train -> save -> load through build_tiny_pipeline -> WanPipeline -> check), resume,
the caption path against WanPipeline's, and the architecture's size contracts."""

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import vdit_accel
from vdit_accel.pipelines import toy
from vdit_accel.pipelines import build_tiny_pipeline, tiny_defaults
from vdit_accel.pipelines.toy import train as train_tiny
from vdit_accel.pipelines.toy import trained

REPO = Path(__file__).resolve().parents[3]


def _load(name):
    if name not in sys.modules:  # registered first: its dataclasses look their module up
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


# --- data and checker --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(17, 96, 96), (9, 64, 112), (25, 80, 64)])
def test_checker_agrees_with_ground_truth(size):
    """Rendered clips of every kind read back as their captions, at square, wide and tall sizes; so do
    the check scenes at the square one."""
    singles, twos = toy.check_scenes()
    scenes = toy.sample_scenes(16, seed=size[1]) + (singles + twos if size[1] == size[2] else [])
    bad = [s.caption for s in scenes if not toy.check_video(toy.render_frames(s, *size), s.caption)["ok"]]
    assert not bad, bad


def test_checker_rejects_wrong_captions():
    """The checker can fail: wrong colour, wrong or opposite direction, a missing second object, an
    object that does not move, an empty video."""
    scene = toy.ToyScene((toy.ToyObject("red", "circle", "left", "quickly", x0=0.8, y0=0.5),))
    clip = toy.render_frames(scene, 17, 96, 96)
    assert toy.check_video(clip, "a red circle moving left")["ok"]
    assert toy.check_video(clip, "a red square moving left on a blue background")["ok"]  # shape is not read
    for wrong in ("a blue circle moving left", "a red circle moving right", "a red circle moving up-left",
                  "a red circle moving left and a green square moving up"):
        assert not toy.check_video(clip, wrong)["ok"], wrong
    res = toy.check_video(clip, "a blue circle moving left")["objects"][0]
    assert res["found_colour"] == "red" and res["found_direction"] == "left"
    still = np.repeat(clip[:1], 17, axis=0)
    assert toy.check_video(still, "a red circle moving left")["objects"][0]["found_direction"] is None
    assert not toy.check_video(np.zeros_like(clip), "a red circle moving left")["ok"]
    # Fading out half-way: not there at the end, so no direction.
    fading = clip.copy()
    fading[9:] = clip[0, 0, 0]
    assert not toy.check_video(fading, "a red circle moving left")["ok"]
    with pytest.raises(ValueError, match="not a toy-video caption"):
        toy.check_video(clip, "a red car driving left")


def test_scenes_split_deterministic_and_captioned():
    """Training scenes never show a held-out combination, held-out ones only those; same seed, same
    scenes and pixels; captions parse back and fit the text length."""
    assert len(toy.held_out_combinations()) == 24
    assert {c for c, _, _ in toy.held_out_combinations()} == set(toy.COLOURS)
    assert {d for _, _, d in toy.held_out_combinations()} == set(toy.DIRECTIONS)
    train = toy.sample_scenes(600, seed=3)
    for split, scenes in (("train", train), ("held_out", toy.sample_scenes(100, seed=4, split="held_out"))):
        for s in scenes:
            assert all(toy.is_held_out(o.colour, o.shape, o.direction) == (split == "held_out") for o in s.objects)
            parsed = toy.parse_caption(s.caption)
            assert parsed == [(o.colour, o.shape, o.direction) for o in s.objects]
            assert len(s.caption.encode()) <= toy.MAX_CAPTION_BYTES < trained.MAX_SEQUENCE_LENGTH
    kinds = {("two" if len(s.objects) == 2 else "bouncing" if s.objects[0].bouncing else "single") for s in train}
    assert kinds == set(toy.KINDS) and {s.background for s in train} == set(toy.BACKGROUNDS)
    assert toy.sample_scenes(5, seed=3) == train[:5]
    assert toy.sample_scenes(5, seed=5) != train[:5]
    a = toy.render(train[:3], 9, 40, 56)
    assert torch.equal(a, toy.render(train[:3], 9, 40, 56)) and a.shape == (3, 3, 9, 40, 56)
    assert a.min() >= -1 and a.max() <= 1
    busy = toy.sample_busy_scenes(300, seed=6)  # the VAE's data: every path fits the frame
    assert busy[:4] == toy.sample_busy_scenes(4, seed=6) and max(len(s.objects) for s in busy) == 5
    singles, twos = toy.check_scenes()
    caps = [s.caption for s in singles + twos]
    assert len(singles) == 20 and len(twos) == 4 and len(set(caps)) == 24
    assert all(toy.is_held_out(o.colour, o.shape, o.direction) for s in singles + twos for o in s.objects)
    assert {s.objects[0].colour for s in singles} == set(toy.COLOURS)


def test_validation_scenes_disjoint_from_the_check():
    """The validation set (sampling settings are tuned on it) shares no (colour, shape, direction) with the
    check's single-object scenes, uses only held-out combinations (all 4 left over), is deterministic, has
    distinct captions, and its ground-truth clips read back as their captions."""
    singles, _ = toy.check_scenes()
    val = toy.validation_scenes()
    combos = lambda scenes: {(o.colour, o.shape, o.direction) for s in scenes for o in s.objects}
    assert len(val) == 20 and all(len(s.objects) == 1 for s in val)
    assert not combos(val) & combos(singles)
    assert combos(val) | combos(singles) == set(toy.held_out_combinations()) and len(combos(val)) == 4
    assert val == toy.validation_scenes() and toy.validation_scenes(7) == val[:7]
    assert toy.validation_scenes(seed=10) != val
    assert len({s.caption for s in val}) == 20
    assert {s.background for s in val} >= {"dark", "drifting"} and any(s.objects[0].bouncing for s in val)
    assert len({s.objects[0].speed for s in val}) == 3
    bad = [s.caption for s in val if not toy.check_video(toy.render_frames(s, 17, 128, 128), s.caption)["ok"]]
    assert not bad, bad
    with pytest.raises(ValueError, match="n must be"):
        toy.validation_scenes(0)


# --- captions, architecture --------------------------------------------------------------------------


def test_caption_path_matches_wan_pipeline():
    """The training's tokenizer and embeddings equal what WanPipeline.encode_prompt computes, at both
    paddings the training uses."""
    from transformers import ByT5Tokenizer

    caps = [s.caption for s in toy.sample_scenes(6, seed=1)] + ["", "x" * 300]
    tok = ByT5Tokenizer()
    for length in (trained.MAX_SEQUENCE_LENGTH, 512):
        ids, mask = trained.tokenize_captions(caps, length)
        ref = tok(caps, padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
                  return_attention_mask=True, return_tensors="pt")
        assert torch.equal(ids, ref.input_ids) and torch.equal(mask, ref.attention_mask)
    pipe = trained.make_pipeline(*trained.build_components(seed=1))
    with torch.no_grad():
        want, _ = pipe.encode_prompt(caps[:6] + [""], do_classifier_free_guidance=False, max_sequence_length=128,
                                     device=torch.device("cpu"))
        got = trained.caption_embeddings(pipe.text_encoder, *trained.tokenize_captions(caps[:6] + [""], 128))
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


def test_architecture_contract():
    """head_dim 64; >= 4,096 video tokens at the large size; fp16 weights <= 20 MB; the CPU default size."""
    cfg = trained.TRANSFORMER_CONFIG
    assert cfg["attention_head_dim"] == 64
    f, h, w = trained.LARGE_SIZE["num_frames"], trained.LARGE_SIZE["height"], trained.LARGE_SIZE["width"]
    px = trained.VAE_CONFIG["scale_factor_spatial"] * cfg["patch_size"][1]
    grid = ((f - 1) // 4 + 1, h // px, w // px)
    assert grid == (5, 32, 32) and np.prod(grid) >= 4096
    modules = trained.build_components(seed=0)
    assert 2 * sum(p.numel() for m in modules for p in m.state_dict().values()) <= 20e6
    d = tiny_defaults("wan-trained")
    assert (d.frames, d.height, d.width, d.max_sequence_length) == (17, 128, 128, trained.MAX_SEQUENCE_LENGTH)


def test_training_decode_is_the_pipeline_decode_before_its_clamp():
    """The VAE stage's loss reads the decoder's output before diffusers clamps it (no dead gradients at
    -1); clamped, it is exactly what WanPipeline decodes."""
    vae = trained.build_components(seed=2)[1].eval()
    z = torch.randn(1, 16, 3, 4, 6) * 3
    with torch.no_grad():
        raw = train_tiny._decode_unclamped(vae, z)
        ref = vae.decode(z).sample
    assert raw.shape == ref.shape == (1, 3, 9, 16, 24)
    assert raw.abs().max() > 1 and torch.equal(raw.clamp(-1, 1), ref)


@pytest.mark.skipif(not trained.weights_available(), reason="no trained weights shipped yet (pipelines/toy/train.py)")
def test_shipped_weights_load_and_generate():
    """The weights in the package load through build_tiny_pipeline("wan-trained") (fp16 files, statistics in
    the VAE's header) and generate a finite video through WanPipeline."""
    pipe = build_tiny_pipeline("wan-trained")
    assert len(pipe.vae.config.latents_std) == 16 and min(pipe.vae.config.latents_std) > 0
    video = pipe(prompt="a red circle moving left", num_frames=5, height=64, width=64, num_inference_steps=2,
                 max_sequence_length=trained.MAX_SEQUENCE_LENGTH, output_type="np",
                 generator=torch.Generator().manual_seed(0)).frames[0]
    assert video.shape == (5, 64, 64, 3) and np.isfinite(video).all()


def test_per_frame_init_makes_the_vae_an_image_autoencoder_per_frame():
    """After init_vae_per_frame a static video encodes to the image's latent at every latent frame and
    decodes to the image's reconstruction at every frame (the causal convolutions see the current frame
    only; time downsampling keeps a frame, upsampling repeats it); without it, it does not."""
    tt = train_tiny
    img = torch.rand(1, 3, 1, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    vid = img.expand(-1, -1, 9, -1, -1).contiguous()
    for init in (True, False):
        vae = trained.build_components(seed=3)[1].eval()
        if init:
            tt.init_vae_per_frame(vae)
        with torch.no_grad():
            zi, zv = vae.encode(img).latent_dist.mode(), vae.encode(vid).latent_dist.mode()
            yi, yv = tt._decode_unclamped(vae, zi), tt._decode_unclamped(vae, zv)
        same = (zv - zi).abs().max() < 1e-5 and (yv - yi).abs().max() < 1e-5
        assert same == init and zv.shape == (1, 16, 3, 8, 12)


def test_missing_weights_say_how_to_train(tmp_path):
    with pytest.raises(FileNotFoundError, match="vdit_accel.pipelines.toy.train"):
        trained.build_trained_pipeline(tmp_path)


# --- the training script, end to end at toy size ------------------------------------------------------


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("wan-trained")
    state = train_tiny.main(["--smoke", "--out", str(out)])
    return out, state


def test_smoke_training_writes_a_loadable_pipeline(smoke, monkeypatch):
    """--smoke: both stages ran, every file is under the device tool's 16 MiB, the loss log and PNG exist,
    and the result loads through build_tiny_pipeline("wan-trained") into a WanPipeline that patches like
    every Wan: dense through our backend == unpatched."""
    out, state = smoke
    assert state["vae"]["done"] and state["vae"]["steps"] == 2 and state["dit"]["steps"] == 3
    assert state["dit"]["log"] and state["vae"]["log"] and state["smoke_check"]["objects"]
    assert state["vae"]["check"]["single"] == 2
    for f in ("transformer", "vae", "text_encoder", "resume"):
        assert (out / f"{f}.safetensors").stat().st_size < 16 * 2**20
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(state["latents_mean"]) == 16 and min(state["latents_std"]) > 0
    monkeypatch.setitem(trained.MODELS, "wan-trained", dataclasses.replace(trained.WAN_TRAINED, weights=out))
    pipe = build_tiny_pipeline("wan-trained")
    assert list(pipe.vae.config.latents_mean) == state["latents_mean"]
    call = dict(prompt="a red circle moving left", num_frames=5, height=32, width=32, num_inference_steps=2,
                max_sequence_length=128, output_type="np")
    base = pipe(**call, generator=torch.Generator().manual_seed(0)).frames[0]
    vdit_accel.patch(pipe, "dense")
    try:
        dense = pipe(**call, generator=torch.Generator().manual_seed(0)).frames[0]
    finally:
        vdit_accel.unpatch(pipe)
    assert np.abs(dense - base).max() <= 1e-4


def test_smoke_resume_continues(smoke, tmp_path):
    """A second command resumes from the checkpoint: the VAE is not retrained, the transformer goes on
    from the saved raw weights, and the log and runs accumulate."""
    out, first = smoke
    state = train_tiny.main(["--smoke", "--resume", str(out), "--out", str(tmp_path), "--dit-steps", "5"])
    assert state["vae"]["steps"] == 2 and state["dit"]["steps"] == 5 and len(state["runs"]) == 2
    assert state["latents_mean"] == first["latents_mean"]
    a = trained.load_trained_components(out)[1].state_dict()
    b = trained.load_trained_components(tmp_path)[1].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the VAE is the same
    assert json.loads((tmp_path / "state.json").read_text())["dit"]["steps"] == 5


def test_check_script_runs(smoke, tmp_path):
    """benchmarks/check_trained.py on the smoke weights at toy size: it writes its JSON and contact sheet,
    scores the ground truth 100%, and --require fails an untrained model."""
    out, _ = smoke
    mod = _load("check_trained")
    argv = ["--weights", str(out), "--frames", "5", "--height", "32", "--width", "32", "--steps", "1", "--limit", "3",
            "--out-dir", str(tmp_path), "--device", "cpu"]
    doc = mod.main(argv)
    res = doc["results"]["default"]
    assert len(res["rows"]) == 3 and doc["captions"] == 3 and res["ground_truth_agreement"] == 1.0
    assert len(list(tmp_path.glob("check-trained-cpu-*.png"))) == 1
    parts = res["parts"]
    assert parts["objects"] == sum(len(r["objects"]) for r in res["rows"]) and parts["cameras"] == 0
    assert parts["object"] <= min(parts["colour"], parts["direction"]) and parts["camera"] is None
    with pytest.raises(SystemExit):
        mod.main(argv + ["--require", "1.01"])
    doc = mod.main(argv + ["--scenes", "validation", "--shift", "5", "--guidance", "6"])
    assert (doc["scenes"], doc["shift"], doc["guidance_scale"], doc["steps"]) == ("validation", 5.0, 6.0, 1)
    assert [r["caption"] for r in doc["results"]["default"]["rows"]] == \
        [s.caption for s in toy.validation_scenes(3)]
    assert len(list(tmp_path.glob("check-trained-cpu-*-validation.json"))) == 1
    doc = mod.main(argv + ["--scenes", "seen", "--git-sha", "0123abcd"])
    assert doc["versions"]["vdit_accel"] == "0123abcd"
    assert [r["caption"] for r in doc["results"]["default"]["rows"]] == [s.caption for s in mod.seen_scenes("basic")[:3]]
    assert len(list(tmp_path.glob("check-trained-cpu-*-seen.json"))) == 1
    with pytest.raises(SystemExit):
        mod.main(argv + ["--shift", "3", "5"])  # several values need --sweep


def test_part_agreement_counts_each_part_of_the_captions():
    """check_trained.part_agreement: colour, direction and both over all objects of all rows, the camera pan
    over the rows that have one."""
    mod = _load("check_trained")

    def obj(colour, found_colour, direction, found_direction):
        return {"colour": colour, "found_colour": found_colour, "direction": direction, "found_direction": found_direction}

    rows = [{"objects": [obj("red", "red", "left", "left"), obj("blue", "cyan", "up", "up")],
             "camera": {"camera": "left", "found_camera": None}},
            {"objects": [obj("green", "green", "down", None)]},
            {"objects": [obj("cyan", "blue", "up", "down")], "camera": {"camera": "up", "found_camera": "up"}}]
    assert mod.part_agreement(rows) == {"colour": 0.5, "direction": 0.5, "object": 0.25, "objects": 4,
                                        "camera": 0.5, "cameras": 2}
    assert mod.part_agreement([])["colour"] is None


def test_check_script_sweep(smoke, tmp_path):
    """--sweep: one JSON (no PNG) with a row per (guidance, steps, shift) setting, the agreement per seed
    base and their mean, on the validation captions by default; the shift reaches the scheduler (two
    shifts, different videos; the same shift twice, the same videos)."""
    out, _ = smoke
    mod = _load("check_trained")
    doc = mod.main(["--weights", str(out), "--frames", "5", "--height", "32", "--width", "32", "--limit", "2",
                    "--sweep", "--steps", "3", "--guidance", "8", "--shift", "3", "7", "3", "--seed-bases", "5000", "6000",
                    "--out-dir", str(tmp_path), "--device", "cpu"])
    assert [p.name for p in tmp_path.iterdir()] == [f"sweep-trained-validation-cpu-{doc['date'].replace('-', '')}.json"]
    assert json.loads(next(tmp_path.iterdir()).read_text()) == doc
    assert doc["scenes"] == "validation" and doc["captions"] == [s.caption for s in toy.validation_scenes(2)]
    assert doc["ground_truth_agreement"] == 1.0 and doc["seed_bases"] == [5000, 6000]
    rows = doc["rows"]
    assert [(r["guidance_scale"], r["steps"], r["shift"]) for r in rows] == [(8.0, 3, 3.0), (8.0, 3, 7.0), (8.0, 3, 3.0)]
    for r in rows:
        assert set(r["agreement"]) == {"5000", "6000"} and r["mean"] == pytest.approx(np.mean(list(r["agreement"].values())), abs=1e-3)
        assert r["seconds"] > 0 and len(r["failures"]) == round(4 * (1 - r["mean"]))
    assert rows[0]["digest"] != rows[1]["digest"] and rows[0]["digest"] == rows[2]["digest"]


def test_window_near_counts_blocks_in_the_order():
    """The quality table's windows: the ladder's window nearest a density, its blocks counted in raster or
    in the tiled order (where the same window covers fewer blocks)."""
    from vdit_accel.cli.bench import window_near
    from vdit_accel.orders.static import block_mask_for_order, tiled_order
    from vdit_accel.patterns import build_block_mask_for_pattern, parse_pattern

    g = vdit_accel.VideoGrid(4, 16, 32)
    for target in (0.5, 0.25):
        raster, tiled = window_near(g, target), window_near(g, target, order="tiled")
        d_raster = build_block_mask_for_pattern(parse_pattern(raster), g, 128, 128).float().mean().item()
        d_tiled = block_mask_for_order(parse_pattern(tiled), g, tiled_order(g, 128)).float().mean().item()
        assert abs(d_raster - target) < 0.1 and abs(d_tiled - target) < 0.1, (raster, d_raster, tiled, d_tiled)


def test_quality_script_runs(smoke, tmp_path, monkeypatch):
    """benchmarks/quality.py on the smoke weights at a toy size of four 128-token blocks: the oracle with
    the dense warm-up, a window and a strategy file, each with PSNR / SSIM
    against dense, the check's agreement, the densities and the time ratios; written as JSON after
    every row. (Every row kind is planned: see the row list of the --only error.)"""
    out, _ = smoke
    small = dataclasses.replace(trained.WAN_TRAINED, defaults=trained.TinyDefaults(
        height=128, width=128, frames=5, steps=2, max_sequence_length=128, call_kwargs={"guidance_scale": 5.0}))
    monkeypatch.setitem(trained.MODELS, "wan-trained", small)
    strategy = tmp_path / "mine.json"
    vdit_accel.Strategy.uniform("window3d:t=0,h=1,w=1", dense_warmup_steps=1).save(strategy)
    only = "oracle-0.25+warmup,window3d-0.25,searched-mine"
    doc = _load("quality").main(["--weights", str(out), "--size", "default", "--prompts", "1", "--device", "cpu",
                                 "--warmup", "0.5", "--strategy", str(strategy), "--only", only, "--out-dir", str(tmp_path)])
    rows = {r["impl"]: r for r in doc["rows"]}
    assert list(rows) == ["dense", *only.split(",")], [r.get("error") for r in doc["rows"]]
    assert doc["tokens"] == 2 * 16 * 16 and doc["steps"] == 2 and doc["warmup_steps"] == 1
    assert rows["dense"]["attn_calls"] > 0 and "psnr_db" not in rows["dense"]
    for name, r in rows.items():
        if name != "dense":
            assert 0 < r["ssim"] <= 1 and r["psnr_db_min"] <= r["psnr_db"] and 0 <= r["agreement"] <= 1, r
        if name != "dense":  # sparse: some blocks skipped on the sparse steps
            assert 0 < r["density"] < 1 and r["effective_density"] == pytest.approx(
                (r["warmup_steps"] + (2 - r["warmup_steps"]) * r["density"]) / 2, abs=1e-3), r
        if not name.startswith("oracle"):  # every other row is timed against dense
            assert r["attn_calls"] == rows["dense"]["attn_calls"] and r.get("attn_speedup", 1) > 0, r
    assert rows["oracle-0.25+warmup"]["density"] == pytest.approx(0.25)
    assert rows["window3d-0.25"]["order"] is None and rows["window3d-0.25"]["warmup_steps"] == 0
    assert rows["searched-mine"]["warmup_steps"] == 1
    assert json.loads((tmp_path / "quality-cpu-" f"{doc['date'].replace('-', '')}.json").read_text()) == doc
    with pytest.raises(SystemExit, match="no row named nope.*dense-other-seed.*window3d-0.50-tiled.*oracle-0.10"
                                         ".*semantic[+]warmup.*fp8.*int8"):
        _load("quality").main(["--weights", str(out), "--device", "cpu", "--size", "default", "--only", "semantic,nope"])
