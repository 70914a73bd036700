"""The whole-schedule solve and its accounting: warm-ups chosen inside the solve and paid for, caps on the
effective cost, step ranges, dense layers, stable answers."""

import dataclasses

import pytest
import torch

from vdit_accel import Strategy, VideoGrid
from vdit_accel.sparsity_search.accounting import account
from vdit_accel.sparsity_search.schedule import ScheduleProblem, interpolate_steps, ladder, solve, solve_per_head
from vdit_accel.sparsity_search.solver import CostModel, flops_cost_model
from vdit_accel.strategy import HeadSpec, Phase

DENSITY = torch.tensor([0.0, 0.1, 0.3, 1.0])  # skip, narrow, wide, dense


def _problem(early_bad=True, n=16, layers=3, heads=2, phases=2, seed=0):
    """Columns: skip (bad), narrow (bad early, fine late), wide (fine), dense (exact)."""
    g = torch.Generator().manual_seed(seed)
    err = torch.zeros(n, layers, heads, 4, dtype=torch.float64)
    steps = torch.arange(n, dtype=torch.float64)[:, None, None]
    err[..., 0] = 1.0
    err[..., 1] = torch.where(steps < n // 2, 0.5, 0.01) if early_bad else 0.01
    err[..., 2] = 0.02 + 0.001 * torch.rand(n, layers, heads, generator=g, dtype=torch.float64)
    density = DENSITY.double().expand(layers, heads, 4).clone()
    return ScheduleProblem(err, density * 2.0, density, 2.0, phases=phases)


def test_the_warm_up_is_chosen_inside_the_solve_and_charged():
    p = _problem()
    # A budget the early errors of the narrow column break: warm-ups cost, so the solve weighs them.
    sol = solve(p, mean_error=0.02)
    assert sol.error <= 0.02 + 1e-12
    warm_cost = sum(sol.warmup) * 2 / (16 * 3 * 2)  # dense steps' share of the dense run
    assert sol.density >= warm_cost - 1e-12  # the warm-up is in the effective density
    # A tight cap: a pure warm-up of half the run alone would cost 0.5; the solver must go under it.
    capped = solve(p, mean_density=0.25)
    assert capped.density <= 0.25 + 1e-9 and max(capped.warmup) < 8
    # Early / late ranges: narrow late (cheap, accurate there), wide early.
    assert capped.boundaries and capped.choice[-1].eq(1).all()


def test_caps_constrain_the_effective_cost_and_min_warmup_holds():
    p = _problem()
    for cap in (0.2, 0.4, 0.7):
        sol = solve(p, mean_cost=cap)
        assert sol.cost <= cap + 1e-9
    sol = solve(p, mean_cost=0.7, min_warmup=4)
    assert min(sol.warmup) >= 4 and sol.cost <= 0.7 + 1e-9
    dense = solve(p, mean_cost=0.5, dense_layers=(1,))
    assert dense.warmup[1] == 16 and dense.cost <= 0.5 + 1e-9
    # Unreachable cap: the cheapest schedule, which says what it costs.
    assert solve(p, mean_cost=0.01, min_warmup=8).cost > 0.01


def test_one_range_and_per_head_mode():
    p = _problem(phases=1)
    sol = solve(p, mean_error=0.03)
    assert sol.boundaries == () and sol.choice.shape[0] == 1
    ph = solve_per_head(_problem(), 0.03)
    assert (ph.choice[-1] == 1).all() and (ph.choice[0] == 2).all()  # within budget in each range


def test_same_inputs_same_schedule_and_small_noise_does_not_flip():
    a = solve(_problem(seed=1), mean_density=0.3)
    b = solve(_problem(seed=1), mean_density=0.3)
    assert a == dataclasses.replace(b, choice=a.choice) and torch.equal(a.choice, b.choice)
    # Cost measurements smoothed by the line fit: 3% noise on the timings leaves every choice as it was.
    g = torch.Generator().manual_seed(0)
    base = _problem(seed=1)
    for _ in range(3):
        noisy = dataclasses.replace(base, cost=base.cost * (1 + 0.03 * (torch.rand(base.cost.shape, generator=g) - 0.5)))
        assert torch.equal(solve(noisy, mean_error=0.05).choice, solve(base, mean_error=0.05).choice)


def test_interpolation_and_ladder():
    v = torch.tensor([[0.0], [1.0], [3.0]])
    out = interpolate_steps([1, 3, 7], v, 9)
    assert out[:, 0].tolist() == [0.0, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.0]
    assert ladder(40) == [0, 5, 10, 15, 20, 25, 30, 35, 40] and ladder(3) == [0, 1, 2, 3]


def test_accounting_of_a_schedule():
    """The whole run's attention: dense warm-ups and per-layer warm-ups at full cost, each range at its
    patterns' densities, a measured cost model's fixed part included, a dynamic order's overhead too."""
    grid = VideoGrid(4, 8, 8)
    w = "window3d:t=0,h=1,w=1"
    st = Strategy(layers=[[HeadSpec(w)] * 2] * 2, dense_warmup_steps=2, layer_warmup_steps=(2, 6),
                  phases=(Phase(4, layers=[[HeadSpec("dense"), HeadSpec(w)]] * 2),))
    a = account(st, grid, 8, block_size=32)
    from vdit_accel.patterns import build_block_mask_for_pattern

    d = float(build_block_mask_for_pattern(w, grid, 32, 32).float().mean())
    # steps 0-1 dense; 2-3: layer 0 window, layer 1 dense; 4-5: layer 0 (dense + window), layer 1 dense;
    # 6-7: both layers (dense + window)
    expect = [1, 1, (d + 1) / 2, (d + 1) / 2, ((1 + d) / 2 + 1) / 2, ((1 + d) / 2 + 1) / 2, (1 + d) / 2, (1 + d) / 2]
    assert a.per_step_density == pytest.approx(expect)
    assert a.effective_density == pytest.approx(sum(expect) / 8) and a.dense_steps == 2 and not a.dense_throughout
    assert a.expected_attention_speedup == pytest.approx(8 / sum(expect))
    fixed = account(st, grid, 8, block_size=32, cost_model=CostModel(1.0, 3.0, "test"))
    assert fixed.expected_attention_speedup == pytest.approx(8 * 4 / sum(1 + 3 * x for x in expect))
    assert account(Strategy.uniform(w, dense_warmup_steps=8), grid, 8).dense_throughout
    assert "runs dense throughout" in account(Strategy.dense(), grid, 8).line()
    semantic = Strategy.uniform("dense", order="semantic")
    assert account(semantic, grid, 4, block_size=32).effective_density > 1.0  # no measured density: dense plus its plan
    assert flops_cost_model(1, 100, 2, 64).fixed_ms == 0.0


def test_cost_model_fit_is_smoothed_and_cached(tmp_path, monkeypatch):
    """Noisy timings fit one line (medians, 3 significant digits), stored once per GPU and shape and read
    back by every later search: the same model, so the same choices."""
    from vdit_accel.kernels import measurements
    from vdit_accel.sparsity_search.solver import fit_cost_model, measure_cost_model

    g = torch.Generator().manual_seed(0)
    dens = [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25]
    clean = [0.2 + 10.0 * d for d in dens]
    models = []
    for _ in range(4):
        noisy = [y * (1 + 0.01 * float(torch.randn((), generator=g))) for y in clean]
        noisy[0] *= 1.5  # a burst in one round: the median ignores it
        models.append(fit_cost_model(dens, noisy, "test"))
    assert all(m.per_density_ms == pytest.approx(10.0, rel=0.03) for m in models)
    assert max(m.per_density_ms for m in models) - min(m.per_density_ms for m in models) <= 0.2
    monkeypatch.setenv("VDIT_AUTOTUNE_CACHE", str(tmp_path))
    calls = []
    timer = lambda fn: calls.append(1) or 1.0 + len(calls) * 1e-3  # noqa: E731
    first = measure_cost_model(1, 256, 2, 16, 32, device="cpu", dtype=torch.float32, timer=timer)
    n = len(calls)
    again = measure_cost_model(1, 256, 2, 16, 32, device="cpu", dtype=torch.float32, timer=timer)
    assert again == first and len(calls) == n == 15  # read back, not measured again
    assert list(tmp_path.glob("cost-test-*.json"))
    assert measurements.load(str(next(tmp_path.glob("cost-test-*.json"))))["ms"]
