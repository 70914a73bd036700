"""The rich toy scenes and the testbed model "wan-rich": ground truth reads back as its caption, the checker
can fail on each new part (camera, looping), the splits, the architecture contract, the deeper model's
start from wan-trained, and the attention-structure measurements against brute force."""

import dataclasses
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vdit_accel.pipelines import toy
from vdit_accel.grid import VideoGrid
from vdit_accel.pipelines.toy import train as train_tiny
from vdit_accel.pipelines.toy import trained

REPO = Path(__file__).resolve().parents[3]


def _load(name):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def test_rich_ground_truth_reads_back():
    """Every rich check, validation and sampled training scene reads back as its caption (objects,
    looping ones across their wrap-around, the camera's pan) at the 4:7 aspect, small."""
    singles, twos = toy.rich_check_scenes()
    scenes = singles + twos + toy.rich_validation_scenes() + toy.sample_rich_scenes(12, seed=1)
    bad = [s.caption for s in scenes if not toy.check_video(toy.render_frames(s, 17, 64, 112), s.caption)["ok"]]
    assert not bad, bad


def test_rich_checker_rejects_wrong_captions():
    """A pan the other way, a pan where the background stands still, a looping object's direction reversed;
    and a looping object read without its wrap-around cut would go the wrong way."""
    tex = toy.scenes._rich_background(np.random.default_rng(0), "textured", set())
    obj = toy.ToyObject("red", "circle", "right", "quickly", x0=0.5, y0=0.5, size=0.1, looping=True)
    panned = toy.ToyScene((obj,), **toy.scenes._with_camera(tex, np.random.default_rng(1), "left"))
    clip = toy.render_frames(panned, 17, 64, 112)
    res = toy.check_video(clip, panned.caption)
    assert res["ok"] and res["camera"]["found_camera"] == "left", res
    wrong_pan = panned.caption.replace("panning left", "panning right")
    assert not toy.check_video(clip, wrong_pan)["ok"]
    assert not toy.check_video(clip, panned.caption.replace("looping right", "looping left"))["ok"]
    still = toy.render_frames(toy.ToyScene((obj,), **tex), 17, 64, 112)
    assert toy.check_video(still, "a red circle looping right quickly on a textured background")["ok"]
    res = toy.check_video(still, "a red circle looping right quickly on a textured background, camera panning up")
    assert not res["ok"] and res["camera"]["found_camera"] is None
    # Without the run cut, the jump back across the frame (about one frame width) outweighs the motion.
    plain = toy.check_video(still, "a red circle moving right quickly on a textured background")
    assert not plain["ok"]
    with pytest.raises(ValueError, match="camera pans"):
        toy.check_video(clip, "a red circle moving right, camera panning sideways")


def test_rich_scenes_split_deterministic_and_captioned():
    """Training scenes avoid the held-out combinations; every part occurs; captions parse back and fit
    wan-rich's text length; same seed, same scenes; the check and validation sets share no combination."""
    train = toy.sample_rich_scenes(400, seed=3)
    for s in train:
        assert not any(toy.is_held_out(o.colour, o.shape, o.direction) for o in s.objects)
        assert toy.parse_caption(s.caption) == [(o.colour, o.shape, o.direction) for o in s.objects]
        assert toy.parse_camera(s.caption) == (s.camera or None)
        assert len(s.caption.encode()) <= toy.MAX_RICH_CAPTION_BYTES < trained.WAN_RICH.max_sequence_length
        assert len({o.colour for o in s.objects}) == len(s.objects)
    assert {len(s.objects) for s in train} == {1, 2, 3}
    assert {s.background for s in train} >= {"textured", "dark", "drifting"} and any(s.background in toy.COLOURS
                                                                                      for s in train)
    assert {s.camera for s in train} == {"", *toy.PAN_DIRECTIONS}
    assert {len(s.pillars) for s in train} == {0, 1, 2}
    assert {o.verb for s in train for o in s.objects} == {"moving", "bouncing", "looping"}
    assert toy.sample_rich_scenes(4, seed=3) == train[:4] and toy.sample_rich_scenes(4, seed=4) != train[:4]
    singles, twos = toy.rich_check_scenes()
    val = toy.rich_validation_scenes()
    combos = lambda scenes: {(o.colour, o.shape, o.direction) for s in scenes for o in s.objects}
    assert len(singles) == 20 and len(twos) == 4 and len(val) == 20
    assert combos(singles) | combos(val) == set(toy.held_out_combinations()) and not combos(singles) & combos(val)
    assert sum(bool(s.camera) for s in singles) == 8 and sum(bool(s.pillars) for s in singles) == 8
    assert len({s.caption for s in singles + twos + val}) == 44
    with pytest.raises(ValueError, match="textured"):
        toy.ToyScene((singles[0].objects[0],), background="textured")
    with pytest.raises(ValueError, match="bouncing or looping"):
        toy.ToyObject("red", "circle", "left", bouncing=True, looping=True)


def test_rich_render_keeps_textures_muted_and_pillars_in_front():
    """Textures never count as object pixels (value <= 0.45 or saturation <= 0.45), and a pillar hides
    the object behind it: its coverage mask is zero there."""
    scene = toy.rich_check_scenes()[0][3]  # a tint and two pillars
    video, cover = toy.render([scene], 9, 64, 112, return_mask=True)
    rgb = (video[0].permute(1, 2, 3, 0).numpy() + 1) / 2
    hue, sat, val = toy.check._hsv(rgb)
    vivid = (sat >= 0.6) & (val >= 0.5)
    assert (cover[0, 0].numpy()[vivid] > 0).all()  # every vivid pixel is an object's
    x, half, _ = scene.pillars[0]
    col = int(x * 112)
    assert float(cover[0, 0, :, :, col].max()) == 0.0
    tex = toy.sample_rich_scenes(40, seed=7)
    tex = [s for s in tex if s.background == "textured"][:3]
    for s in tex:
        bare = dataclasses.replace(s, objects=())
        rgb = (toy.render([bare], 5, 64, 112)[0].permute(1, 2, 3, 0).numpy() + 1) / 2
        _, sat, val = toy.check._hsv(rgb)
        assert not ((sat >= 0.6) & (val >= 0.5)).any()


def test_wan_rich_architecture_contract():
    """At least 8 layers and 32 heads of head_dim 64; the native size gives >= 30,000 video tokens; fp16
    weights <= 24 MB (counted from the architecture, and the shipped files where they are)."""
    spec = trained.WAN_RICH
    cfg = spec.transformer
    assert cfg["num_layers"] >= 8 and cfg["num_layers"] * cfg["num_attention_heads"] >= 32
    assert cfg["attention_head_dim"] == 64
    grid = spec.grid(spec.large["num_frames"], spec.large["height"], spec.large["width"])
    assert grid == (17, 32, 56) and math.prod(grid) >= 30000
    assert spec.defaults.frames == spec.large["num_frames"]
    modules = trained.build_components(seed=0, model="wan-rich")
    assert 2 * sum(p.numel() for m in modules for p in m.state_dict().values()) <= 24e6
    if trained.weights_available(model="wan-rich"):
        assert sum((spec.weights_dir / f"{n}.safetensors").stat().st_size for n in trained.COMPONENTS) <= 24e6


def test_init_from_wan_trained_computes_the_same_function():
    """The 8-layer model started from wan-trained's 6 (init_from) computes wan-trained's output exactly."""
    tt = train_tiny
    t, vae, te = trained.build_components(0, model="wan-rich")
    tt.init_from(t, vae, te, "wan-trained")
    src = trained.load_trained_components(model="wan-trained")[0]
    x, ts, e = torch.randn(1, 16, 2, 8, 14), torch.tensor([700.0]), torch.randn(1, 12, 64)
    with torch.no_grad():
        a = t(hidden_states=x, timestep=ts, encoder_hidden_states=e, return_dict=False)[0]
        b = src(hidden_states=x, timestep=ts, encoder_hidden_states=e, return_dict=False)[0]
    assert torch.equal(a, b)
    assert not torch.equal(t.blocks[1].attn1.to_q.weight, torch.zeros_like(t.blocks[1].attn1.to_q.weight))
    assert t.blocks[1].ffn.net[2].weight.abs().max() == 0  # the copy adds nothing yet


def _brute(q, k, grid, q_perm, k_perm, recall):
    """Blocks needed, by the definition, from the full probability matrix."""
    s = q.shape[0]
    p = torch.softmax(q.double() @ k.double().T / math.sqrt(q.shape[1]), -1)[q_perm][:, k_perm]
    nb = -(-s // 128)
    m = torch.zeros(nb, nb, dtype=torch.float64)
    for i in range(nb):
        for j in range(nb):
            m[i, j] = p[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].sum() / min(128, s - i * 128)
    need = [int((torch.cumsum(row.sort(descending=True).values, 0) < recall - 1e-6).sum()) + 1 for row in m]
    return float(np.mean(need)) / nb, p


def test_head_metrics_match_brute_force():
    """Block fractions in two orders, frame and box masses, against the full probability matrix, at an odd size."""
    st = _load("attention_structure")
    grid = VideoGrid(3, 7, 9)  # 189 tokens: two blocks, the last short
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(grid.video_len, 16, generator=g) * 2, torch.randn(grid.video_len, 16, generator=g) * 2
    ident = torch.arange(grid.video_len)
    shuf = torch.randperm(grid.video_len, generator=g)
    got = st.head_metrics(q, k, grid, {"raster": (ident, ident), "shuffled": (shuf, shuf)}, rows_per_chunk=50)
    for name, perm in (("raster", ident), ("shuffled", shuf)):
        for r in st.RECALLS:
            want, p = _brute(q, k, grid, perm, perm, r)
            assert got["blocks"][name][f"{r:.2f}"] == pytest.approx(want, abs=1e-4)
    p = torch.softmax(q.double() @ k.double().T / 4.0, -1)
    c = st._coords(grid)
    d = (c[:, None, :] - c[None, :, :]).abs()
    for j in range(3):
        assert got["frame_mass"][j] == pytest.approx(float((p * (d[..., 0] <= j)).sum() / len(p)), abs=1e-4)
    for j, (bt, bh, bw) in enumerate(st.BOXES):
        inside = (d[..., 0] <= bt) & (d[..., 1] <= bh) & (d[..., 2] <= bw)
        assert got["box_mass"][j] == pytest.approx(float((p * inside).sum() / len(p)), abs=1e-4)
    # what the head writes: o = P V through its output columns; RMS and RMS about the mean over queries
    v, w = torch.randn(grid.video_len, 16, generator=g), torch.randn(24, 16, generator=g)
    got = st.head_metrics(q, k, grid, {"raster": (ident, ident)}, rows_per_chunk=50, v=v, w_out=w)
    y = (p @ v.double()) @ w.double().T
    assert got["out_rms"] == pytest.approx(float(y.pow(2).sum(1).mean().sqrt()), rel=1e-4)
    assert got["out_varying_rms"] == pytest.approx(float((y - y.mean(0)).pow(2).sum(1).mean().sqrt()), rel=1e-3)
    uniform = st.head_metrics(torch.zeros_like(q), k, grid, {"raster": (ident, ident)}, v=v, w_out=w)
    assert uniform["out_varying_rms"] < 1e-3 * uniform["out_rms"]  # uniform attention writes one vector
    # the oracle's batched block mass equals the per-head one
    qb = torch.stack([q, k], 1)[None]  # (1, S, 2 heads, D)
    m = st.tiled_block_mass(qb, torch.stack([k, q], 1)[None], shuf, rows_per_chunk=64)
    _, p0 = _brute(q, k, grid, shuf, shuf, 0.9)
    assert m[0, 0, 0, 0] == pytest.approx(float(p0[:128, :128].sum() / 128), abs=1e-5)
    assert torch.allclose(m.sum(-1), torch.ones(1, 2, 2), atol=1e-5)


@pytest.mark.skipif(not trained.weights_available(model="wan-rich"), reason="no wan-rich weights shipped")
def test_structure_and_check_scripts_run_on_wan_rich(tmp_path):
    """benchmarks/attention_structure.py (with the oracle) and check_trained.py --model wan-rich end to end,
    tiny and quick on the CPU, through the shipped weights."""
    st = _load("attention_structure")
    doc = st.main(["--model", "wan-rich", "--frames", "5", "--height", "64", "--width", "112", "--prompts", "1",
                   "--steps", "2", "--phases", "middle=0.5", "--oracle", "--oracle-warmup", "0.5",
                   "--device", "cpu", "--out-dir", str(tmp_path)])
    assert len(doc["heads"]) == 32 and set(doc["summary"]) == {"middle"}
    assert doc["oracle"]["warmup_steps"] == 1 and doc["oracle"]["psnr_db"] > 10
    assert (tmp_path / "attention-structure-wan-rich-cpu-{}.png".format(doc["date"].replace("-", ""))).is_file()
    ct = _load("check_trained")
    out = ct.main(["--model", "wan-rich", "--frames", "5", "--height", "64", "--width", "112", "--limit", "1",
                   "--steps", "1", "--seed-base", "1000", "1001", "--device", "cpu", "--out-dir", str(tmp_path)])
    assert out["model"] == "wan-rich" and set(out["results"]) == {"default-seeds1000", "default-seeds1001"}
    assert out["results"]["default-seeds1000"]["ground_truth_agreement"] == 1.0


def test_rich_smoke_training_resumes_with_more_vae(tmp_path):
    """vdit_accel.pipelines.toy.train --model wan-rich --init-from wan-trained --smoke trains, saves and loads through the
    package's loader; a resume with --vae-more-minutes trains the VAE on and re-measures its latent
    statistics before the transformer goes on."""
    tt = train_tiny
    first = tt.main(["--model", "wan-rich", "--init-from", "wan-trained", "--smoke", "--out", str(tmp_path / "a")])
    assert first["model"] == "wan-rich" and first["init_from"] == "wan-trained" and first["vae"]["done"]
    assert first["smoke_check"]["objects"]
    second = tt.main(["--model", "wan-rich", "--smoke", "--resume", str(tmp_path / "a"), "--out", str(tmp_path / "b"),
                      "--vae-more-minutes", "1", "--vae-steps", "4", "--dit-steps", "5", "--shift-tokens", "40",
                      "--dit-buckets", "5x32x64:1", "--object-weight", "8"])
    assert [r["shift_tokens"] for r in second["runs"]] == [None, 40]
    assert [r["object_weight"] for r in second["runs"]] == [0.0, 8.0]
    assert second["runs"][0]["dit_buckets"] == [list(b) for b in tt.SMOKE_RICH.dit_buckets]
    assert second["runs"][1]["dit_buckets"] == [[5, 32, 64, 1.0]]
    assert second["vae"]["steps"] == 4 and second["vae"]["done"] and second["dit"]["steps"] == 5
    assert second["latents_mean"] != first["latents_mean"]
    with pytest.raises(SystemExit):
        tt.main(["--smoke", "--resume", str(tmp_path / "b"), "--out", str(tmp_path / "c")])  # not a wan-trained one


@pytest.mark.parametrize("frames", [1, 5, 13])
def test_latent_object_mask_marks_what_each_latent_position_encodes(frames):
    """latent_object_mask against a brute-force loop over the causal VAE's windows (latent frame 0 = pixel
    frame 0, frame j > 0 = pixel frames 4j-3..4j; 4x4 pixels a position), on a sparse random cover and on a
    rendered rich clip's cover."""
    gen = torch.Generator().manual_seed(frames)
    sparse = (torch.rand(2, 1, frames, 24, 40, generator=gen) > 0.995).float() * torch.rand(2, 1, frames, 24, 40, generator=gen)
    _, rendered = toy.render(toy.sample_rich_scenes(2, 3), frames, 24, 40, return_mask=True)
    for cover in (sparse, rendered):
        got = train_tiny.latent_object_mask(cover, 4, 4)
        t = (frames - 1) // 4 + 1
        assert got.shape == (2, 1, t, 6, 10) and got.dtype == torch.bool
        want = torch.zeros_like(got)
        for j in range(t):
            lo, hi = (0, 1) if j == 0 else (4 * j - 3, 4 * j + 1)
            for y in range(6):
                for x in range(10):
                    want[:, 0, j, y, x] = (cover[:, 0, lo:hi, 4 * y:4 * y + 4, 4 * x:4 * x + 4] > 0).flatten(1).any(1)
        assert torch.equal(got, want)
    assert 0 < train_tiny.latent_object_mask(rendered, 4, 4).float().mean() < 0.5


def test_training_shift_scales_with_the_token_count():
    """--shift-tokens N: a clip of n tokens trains with training_shift * sqrt(n / N); composing the two shifts
    is SD3's resolution-dependent shift applied to the base-shifted sigmas (their eq. 23), and a larger clip
    trains at higher noise. Without it every size has the model's one shift."""
    base = trained.WAN_RICH.training_shift
    cfg = dataclasses.replace(train_tiny.RICH, shift_tokens=2240)
    # latents (T, h, w) of a 17x128x224 clip: 5x32x56, 5x16x28 = 2,240 tokens after the 1x2x2 patch;
    # of the native 65x256x448: 17x64x112, 30,464 tokens
    assert train_tiny.training_shift(train_tiny.RICH, (17, 64, 112)) == base
    assert train_tiny.training_shift(cfg, (5, 32, 56)) == pytest.approx(base)
    native = train_tiny.training_shift(cfg, (17, 64, 112))
    assert native == pytest.approx(base * math.sqrt(30464 / 2240))
    u = torch.rand(10000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shifted = lambda s, t: s * t / (1 + (s - 1) * t)
    alpha = native / base
    assert torch.allclose(shifted(native, u), shifted(alpha, shifted(base, u)))
    assert shifted(native, u).median() > shifted(base, u).median()


def test_dit_buckets_parse_and_refuse_sizes_the_model_cannot_take():
    assert train_tiny.parse_buckets(["17x128x224:0.5", "65x256x448:2"]) == [(17, 128, 224, 0.5), (65, 256, 448, 2.0)]
    for bad in ("17x128:0.5", "16x128x224:1", "17x100x224:1", "17x128x224:0", "17x128x224"):
        with pytest.raises(ValueError, match="17x|16x"):
            train_tiny.parse_buckets([bad])
    with pytest.raises(SystemExit):
        train_tiny.main(["--model", "wan-rich", "--smoke", "--out", "/nonexistent", "--dit-buckets", "17x128x224:x"])
