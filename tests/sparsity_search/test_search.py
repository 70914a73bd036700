import json
import os
import subprocess
import sys

import pytest
import torch

import vdit_accel
from vdit_accel import BlockMask, Strategy, VideoGrid
from vdit_accel.patterns import build_block_mask_for_pattern, parse_pattern
from vdit_accel.reference import reference_attention
from vdit_accel.sparsity_search import HeadProfiler, SearchConfig, candidate_patterns, search
from vdit_accel.sparsity_search.candidates import radius_ladder
from vdit_accel.sparsity_search.solver import solve_lagrangian, solve_per_head
from vdit_accel.sparsity_search.synthetic import planted_head


def test_planted_pattern_recovery():
    """Heads whose attention truly is a known pattern: the search names the family, and every
    parameter within one rung of the radius ladder, for >= 95% of heads."""
    grid, block = VideoGrid(4, 8, 64), 8  # blocks of 8 tokens: 8 per row, so t, h and w all resolve
    g = torch.Generator().manual_seed(0)
    plan = [("window3d", dict(t=t, h=h, w=w)) for t, h, w in
            [(0, 1, 8), (1, 1, 8), (1, 2, 16), (0, 2, 8), (2, 4, 16), (1, 4, 32), (0, 4, 16), (2, 2, 8),
             (1, 1, 16), (0, 1, 32), (2, 1, 8), (1, 2, 32)]]
    plan += [("frame_periodic", dict(h=1, w=8)), ("frame_periodic", dict(h=2, w=16)), ("frame_periodic", dict(h=4, w=8))]
    plan += [("stripes", {}), ("stripes", {}), ("dense", {}), ("dense", {}), ("silent", {})]
    heads = [planted_head(kind, grid, 64, g, **r) for kind, r in plan]
    q, k, v = (torch.stack([hd[i] for hd in heads], 1)[None] for i in range(3))
    cands = candidate_patterns(grid)
    prof = HeadProfiler(cands, block_size=block, sample_blocks=8, mass_stride=8)
    prof.observe(0, 0, grid, q, k, v)
    skip = next(i for i, c in enumerate(cands) if c.kind == "skip")
    masks = prof.masks_for(grid, "cpu")
    err = prof.merged()[0].error(skip)
    rung = radius_ladder(1 << 20).index
    for budget in (0.03, 0.1):
        chosen = [cands[masks.representative[i]] for i in solve_per_head(err, masks.density, budget).tolist()]
        good = 0
        for (kind, radii), c in zip(plan, chosen):
            if c.kind == {"silent": "skip"}.get(kind, kind) and all(abs(rung(getattr(c, a)) - rung(r)) <= 1
                                                                    for a, r in radii.items()):
                good += 1
        assert good >= 0.95 * len(plan), (budget, list(zip(plan, chosen)))


def test_profiler_against_reference():
    """Recalled mass and candidate errors equal what the float64 reference gives, at an odd S."""
    grid = VideoGrid(3, 5, 7, text_len=6, text_at="prefix")  # S = 111
    b, s, h, d, block = 2, grid.seq_len, 3, 16, 16
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(b, s, h, d, generator=g) for _ in range(3))
    cands = [parse_pattern(x) for x in ("skip", "window3d:t=0,h=1,w=1", "frame_periodic:h=1,w=2", "dense")]
    prof = HeadProfiler(cands, block_size=block, sample_blocks=100)  # every query block sampled
    prof.observe(0, 0, grid, q, k, v)
    st = prof.merged()[0]
    dense = reference_attention(q.double(), k.double(), v.double())
    probs = torch.softmax(torch.einsum("bihd,bjhd->bhij", q.double(), k.double()) * d**-0.5, -1)
    for c, p in enumerate(cands):
        blocks = build_block_mask_for_pattern(p, grid, block, block)
        mask = BlockMask.from_dense(blocks.expand(1, h, *blocks.shape), s, block, block)
        out = reference_attention(q.double(), k.double(), v.double(), mask)
        err_sq = ((out - dense) ** 2).sum((0, 1, 3))  # per head
        torch.testing.assert_close(st.err_sq[:, c], err_sq, rtol=1e-4, atol=1e-6)
        recall = (probs * mask.token_mask().double()).sum(-1).mean(-1).sum(0)  # per head, summed over batch
        torch.testing.assert_close(st.recall[:, c], recall, rtol=1e-4, atol=1e-6)
    assert torch.allclose(st.mean_recall()[:, 3], torch.ones(h, dtype=torch.float64))
    assert st.error(skip_index=0)[:, 3].abs().max() < 1e-6


def test_solvers():
    err = torch.tensor([[0.5, 0.2, 0.05, 0.0], [0.9, 0.01, 0.0, 0.0]])
    cost = torch.tensor([0.0, 0.1, 0.3, 1.0])
    assert solve_per_head(err, cost, 0.1).tolist() == [2, 1]
    assert solve_per_head(err, cost, 0.001).tolist() == [3, 2]
    assert solve_per_head(err, cost, 1.0).tolist() == [0, 0]
    lag = solve_lagrangian(err, cost, mean_error=0.1)
    assert err.gather(1, lag[:, None]).mean() <= 0.1
    assert cost[lag].mean() <= cost[solve_per_head(err, cost, 0.1)].mean()  # one budget spent globally
    by_cost = solve_lagrangian(err, cost, mean_cost=0.2)
    assert cost[by_cost].mean() <= 0.2 + 1e-9
    with pytest.raises(ValueError, match="exactly one"):
        solve_lagrangian(err, cost)


@pytest.fixture(scope="module")
def pipe():
    from vdit_accel.pipelines import build_tiny_pipeline

    return build_tiny_pipeline("wan", seed=0)


CALL = dict(height=128, width=128, num_frames=9, num_inference_steps=3, max_sequence_length=16, output_type="latent")


def _generate(pipe, strategy, prompt="a green triangle moving up", **kw):
    from vdit_accel.pipelines import patch_state

    density = 1.0
    if strategy is not None:
        vdit_accel.patch(pipe, strategy, block_size=32)
    try:
        out = pipe(prompt=prompt, **{**CALL, "output_type": "np", **kw}, generator=torch.Generator().manual_seed(3)).frames[0]
        if strategy is not None:
            st = patch_state(pipe.transformer)
            density = st.mean_density(st.grid)
    finally:
        if strategy is not None:
            vdit_accel.unpatch(pipe)
    return out, density


def test_search_beats_uniform_at_equal_density(pipe, tmp_path):
    from vdit_accel.video import psnr

    size = dict(num_frames=17)  # a (5, 8, 8) grid: 10 blocks of 32 tokens
    uniform = Strategy.uniform("window3d:t=1,h=1,w=1")
    ref, _ = _generate(pipe, None, **size)
    uni, d_uni = _generate(pipe, uniform, **size)
    cfg = SearchConfig(block_size=32, steps=[0, 1, 2], target_density=d_uni, dense_warmup_steps=0, orders=("raster",))
    found = search(pipe, ["a red circle moving left", "a blue square bouncing"], cfg, call_kwargs={**CALL, **size},
                   progress=lambda m: None)
    path = tmp_path / "searched.json"
    found.save(path)
    loaded = Strategy.load(path)
    assert loaded.search["accounting"]["effective_density"] <= d_uni + 1e-6 and loaded.model["class"] == "WanTransformer3DModel"
    srch, _ = _generate(pipe, loaded, **size)
    # over the whole run (its warm-ups and step ranges included), at most the uniform pattern's density
    from vdit_accel.sparsity_search.accounting import account

    assert account(loaded, VideoGrid(5, 8, 8), 3, block_size=32).effective_density <= d_uni + 1e-6
    assert psnr(srch, ref) > psnr(uni, ref)
    # The strategy is resolution independent: it applies at another size too.
    other, _ = _generate(pipe, loaded, height=160, width=96, num_frames=13)
    assert other.shape == (13, 160, 96, 3)


def test_search_resumes(pipe, tmp_path):
    cfg = SearchConfig(block_size=32, steps=[1], budget=0.2, sample_blocks=2)
    msgs = []
    first = search(pipe, ["prompt one"], cfg, call_kwargs=CALL, state_dir=tmp_path, progress=msgs.append)
    assert (tmp_path / "rank0" / "layer_000.safetensors").exists()
    both = search(pipe, ["prompt one", "prompt two"], cfg, call_kwargs=CALL, state_dir=tmp_path, progress=msgs.append)
    assert any("already profiled (resumed)" in m and "prompt one" in m for m in msgs)
    fresh = search(pipe, ["prompt one", "prompt two"], cfg, call_kwargs=CALL, progress=lambda m: None)
    assert both.layers == fresh.layers and first.search["prompts"] == ["prompt one"]
    with pytest.raises(ValueError, match="belongs to another search"):
        search(pipe, ["prompt one"], SearchConfig(block_size=32, steps=[0], budget=0.2), call_kwargs=CALL,
               state_dir=tmp_path, progress=lambda m: None)


def test_torchrun_two_processes_gloo(tmp_path):
    out = tmp_path / "s.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "vdit_accel.cli.app", "search", "--model", "wan", "--frames", "9", "--height", "128", "--width", "128",
           "--num-inference-steps", "2", "--steps", "0,1", "--block-size", "32", "--budget", "0.2",
           "--sample-blocks", "2", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["search"]["world_size"] == 2 and len(doc["layers"]) == 4
    assert "[rank 1] prompt 1/1 profiled" in proc.stderr
    Strategy.load(out)


def test_search_cli_errors(tmp_path):
    from typer.testing import CliRunner

    from vdit_accel.cli.app import app

    res = CliRunner().invoke(app, ["search", "--prompts", str(tmp_path / "none.txt")])
    assert res.exit_code == 2 and "no such file" in res.output
    res = CliRunner().invoke(app, ["search", "--budget", "0"])
    assert res.exit_code == 2 and "budget must be > 0" in res.output
    res = CliRunner().invoke(app, ["search", "--min-psnr", "30", "--target-density", "0.3"])
    assert res.exit_code == 2 and "leave out target_density" in res.output
    res = CliRunner().invoke(app, ["search", "--attention-speedup", "0.5"])
    assert res.exit_code == 2 and "attention_speedup must be >= 1" in res.output
    res = CliRunner().invoke(app, ["search", "--validation-prompts", str(tmp_path / "none.txt")])
    assert res.exit_code == 2 and "--validation-prompts" in res.output and "no such file" in res.output


def test_same_model_prompts_and_seed_give_the_same_strategy(pipe):
    """Stable: with a fixed cost model, two searches of the same inputs write the same strategy (and the
    error budget bounds the run's mean error, warm-ups charged)."""
    from vdit_accel.sparsity_search.solver import CostModel

    cfg = SearchConfig(block_size=32, budget=0.1, sample_blocks=2)
    cost = CostModel(0.5, 10.0, "fixed for the test")
    runs = [search(pipe, ["a red circle moving left"], cfg, call_kwargs=CALL, progress=lambda m: None, cost_model=cost)
            for _ in range(2)]
    a, b = (dict(r.to_dict(), search={k: v for k, v in r.search.items() if k != "seconds"}) for r in runs)
    assert a == b
    assert runs[0].search["mean_error"] <= 0.1 + 1e-9 and runs[0].search["cost_model"]["source"] == "fixed for the test"
    assert len(runs[0].search["error_per_step"]) == 3 and runs[0].search["profiled_steps"] == [0, 1, 2]
