"""Targets: solve, verify end to end, adjust -- the loop on a model of measured quality, then for real on
the trained tiny Wan."""

import json

import pytest
import torch

from vdit_accel import Strategy
from vdit_accel.sparsity_search.schedule import ScheduleProblem, solve
from vdit_accel.sparsity_search.targets import Targets, tune
from vdit_accel.sparsity_search.verify import Measurement

N = 16


def _problem():
    """Columns: skip, a narrow window (bad early), a wide one, dense; 3 layers x 2 heads."""
    err = torch.zeros(N, 3, 2, 4, dtype=torch.float64)
    err[..., 0] = 1.0
    err[..., 1] = torch.where(torch.arange(N)[:, None, None] < 6, 0.4, 0.03).double()
    err[..., 2] = 0.02
    density = torch.tensor([0.0, 0.1, 0.3, 1.0], dtype=torch.float64).expand(3, 2, 4).clone()
    return ScheduleProblem(err, density, density, 1.0)


def _fake_measure(offset_validation=0.0, calls=None, short_warmup_penalty=0.0):
    """PSNR as a function of the schedule's proxy error and warm-up (early errors hurt more): a stand-in
    for generating videos, with the validation prompts ``offset_validation`` dB harder."""
    def measure(sched, split):
        calls is not None and calls.append(split)
        early = sum(sched.per_step_error[:6])
        psnr = 50.0 - 60.0 * sched.error - 8.0 * early
        rows = []
        for s in (["calibration", "validation"] if split == "all" else [split]):
            p = psnr - (offset_validation + (short_warmup_penalty if min(sched.warmup) < 4 else 0.0)
                        if s == "validation" else 0.0)
            rows += [{"prompt": f"{s} {i}", "seed": i, "split": s, "psnr_db": p - i * 0.1, "ssim": 0.99} for i in range(2)]
        return Measurement(rows, 1.0, sched.cost, 2.0, 1.0 + sched.cost, "cpu")
    return measure


def _tune(targets, measure, max_probes=12):
    p = _problem()
    return tune(lambda c, w, dense: solve(p, mean_cost=c, min_warmup=w, dense_layers=dense), measure, targets, N,
                info=lambda s: (1.0 / s.cost, s.density), on_gpu=False, max_probes=max_probes, progress=lambda m: None)


def test_min_psnr_finds_a_cheap_schedule_that_holds_and_records_every_probe():
    calls = []
    out = _tune(Targets(min_psnr=46.0), _fake_measure(calls=calls))
    assert out.holds and out.final.meets(46.0, "validation") and out.final.meets(46.0, "calibration")
    assert out.candidate.cost < 0.7  # cheaper than dense by a margin
    probes = [p.to_json() for p in out.probes]
    assert len(probes) == len(calls) <= 12 and all("psnr_db_min" in p and "effective_density" in p for p in probes)
    # No cheaper probe held on the calibration prompts at the chosen warm-up's ladder rung below it.
    held = [p for p in out.probes if p.holds and p.split == "calibration"]
    assert min(p.candidate.cost for p in held) == pytest.approx(out.candidate.cost, rel=0.3)


def test_validation_harder_than_calibration_climbs_the_ladder():
    easy = _tune(Targets(min_psnr=46.0), _fake_measure())
    margin = easy.final.summary("validation")["psnr_db_min"] - 46.0  # what the easy choice has to spare
    hard = _tune(Targets(min_psnr=46.0), _fake_measure(offset_validation=margin + 0.3))
    assert hard.holds and hard.candidate.cost > easy.candidate.cost
    assert any(p.split == "validation" and not p.holds for p in hard.probes)


def test_validation_that_needs_a_longer_warmup_gets_one():
    """Held-out prompts that only hold with a longer dense warm-up than the calibration prompts needed: the
    climb tries longer warm-ups and finds one (cheaper than going dense)."""
    out = _tune(Targets(min_psnr=46.0), _fake_measure(short_warmup_penalty=20.0), max_probes=16)
    assert out.holds and min(out.candidate.warmup) >= 4 and out.candidate.cost < 1.0


def test_cannot_is_said_and_speed_targets_use_the_cost_model_on_a_cpu():
    out = _tune(Targets(min_psnr=49.9, attention_speedup=4.0), _fake_measure())
    assert not out.holds and out.verdict.startswith("cannot") and out.candidate is not None
    fast = _tune(Targets(attention_speedup=2.0), _fake_measure())
    assert fast.holds and 1.0 / fast.candidate.cost >= 2.0 - 1e-9 and len(fast.probes) == 1
    with pytest.raises(ValueError, match="give a target"):
        Targets()


@pytest.fixture(scope="module")
def trained():
    from vdit_accel.pipelines import build_tiny_pipeline

    pipe = build_tiny_pipeline("wan-trained")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_min_psnr_end_to_end_on_wan_trained(trained, tmp_path):
    """The real loop at a small size: profiled, solved, generated dense and accelerated on a calibration
    and a held-out prompt, tuned; every figure and prompt in the file; the file's figures are what a fresh
    verification of it measures."""
    from vdit_accel.pipelines import toy
    from vdit_accel.sparsity_search import SearchConfig, search
    from vdit_accel.sparsity_search.verify import Verifier, caption_check_for, jobs_for

    # (a 2 x 8 x 8 grid, 3 steps, no guidance: the whole loop in under a minute on 2 cores)
    call = dict(height=64, width=64, num_frames=5, num_inference_steps=3, guidance_scale=1.0, max_sequence_length=128)
    held_out = [toy.validation_scenes(1)[0].caption]
    cfg = SearchConfig(block_size=16, orders=("raster",), min_psnr=30.0, max_probes=5, sample_blocks=4)
    check = caption_check_for("wan-trained")
    st = search(trained, ["a red circle moving left on a blue background"], cfg, call_kwargs=call,
                validation_prompts=held_out, check=check, progress=lambda m: None)
    v = st.search["verification"]
    assert v["targets"] == {"min_psnr": 30.0, "attention_speedup": None}
    assert [p["prompt"] for p in v["validation_prompts"]] == held_out and v["validation_prompts"][0]["seed"] == 1000
    assert v["probes"] and all(p["split"] in ("calibration", "validation", "all") for p in v["probes"])
    assert v["holds"] == (v["validation"]["psnr_db_min"] >= 30.0 and not v["validation"].get("caption_regressions"))
    assert v["holds"], v["verdict"]
    assert "speed_note" in v and v["timed_on"] == "cpu" and v["attention_speedup_measured"] > 0
    path = tmp_path / "s.json"
    st.save(path)
    loaded = Strategy.load(path)
    again = Verifier(trained, call, 16, check).measure(loaded, jobs_for(["a red circle moving left on a blue background"],
                                                                        held_out, 0))
    assert again.summary("validation")["psnr_db_min"] == pytest.approx(v["validation"]["psnr_db_min"], abs=1e-3)
    assert json.loads(path.read_text())["search"]["accounting"]["effective_density"] == st.search["accounting"]["effective_density"]
