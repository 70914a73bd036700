import os

import pytest
import torch

import vdit_accel
from vdit_accel import Strategy
from vdit_accel.pipelines import build_tiny_pipeline, patch_state

CALL = dict(prompt="a red circle moving left", height=128, width=128, num_frames=9, num_inference_steps=3,
            max_sequence_length=16, output_type="pt")


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline("wan", seed=0)


def _run(pipe, seed=0, **kw):
    return pipe(**{**CALL, **kw}, generator=torch.Generator().manual_seed(seed)).frames[0]


def test_tiny_pipeline_is_deterministic_and_offline(pipe):
    other = build_tiny_pipeline("wan", seed=0)
    a = next(pipe.transformer.parameters())
    b = next(other.transformer.parameters())
    assert torch.equal(a, b)
    assert not torch.equal(a, next(build_tiny_pipeline("wan", seed=1).transformer.parameters()))
    with pytest.raises(ValueError, match="available: wan"):
        build_tiny_pipeline("nonesuch")


def test_dense_reproduces_unpatched_and_unpatch_restores(pipe):
    base = _run(pipe)
    originals = {n: p for n, p in pipe.transformer.attn_processors.items()}
    vdit_accel.patch(pipe, "dense")
    try:
        procs = pipe.transformer.attn_processors
        assert all(type(procs[n]) is not type(p) for n, p in originals.items() if ".attn1." in n)
        assert all(procs[n] is p for n, p in originals.items() if ".attn2." in n)  # cross-attention untouched
        dense = _run(pipe)
    finally:
        vdit_accel.unpatch(pipe)
    assert (dense - base).abs().max().item() <= 1e-4
    assert all(pipe.transformer.attn_processors[n] is p for n, p in originals.items())
    assert torch.equal(_run(pipe), base)  # bit for bit after unpatch


def test_sparse_runs_changes_output_and_tracks_steps(pipe):
    base = _run(pipe)
    calls = []
    strat = Strategy.uniform("window3d:t=0,h=1,w=1", dense_warmup_steps=1)
    vdit_accel.patch(pipe, strat, block_size=32)
    state = patch_state(pipe.transformer)
    state.observers.append(lambda layer, step, q, k, v: calls.append((step, layer)))
    try:
        out = _run(pipe)
        assert state.grid == vdit_accel.VideoGrid(3, 8, 8)
        density = state.mean_density(state.grid)
    finally:
        vdit_accel.unpatch(pipe)
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-3
    assert 0 < density < 0.7
    # 3 steps x (cond + uncond) x 4 layers; the first step dense by warm-up.
    assert sorted({s for s, _ in calls}) == [0, 1, 2] and len(calls) == 3 * 2 * 4
    plans = [state.plan(0, torch.empty(1, 192, 4, 64)) for state.step in (0, 1)]
    assert plans[0].block_mask() is None and plans[1].block_mask() is not None
    assert state.plan(0, torch.empty(1, 192, 4, 64)) is plans[1]  # compiled once, then cached


def test_patch_errors(pipe):
    vdit_accel.patch(pipe, "dense")
    try:
        with pytest.raises(RuntimeError, match="already patched"):
            vdit_accel.patch(pipe, "dense")
    finally:
        vdit_accel.unpatch(pipe)
    with pytest.raises(RuntimeError, match="not patched"):
        vdit_accel.unpatch(pipe)
    with pytest.raises(ValueError, match="num_layers=30"):
        vdit_accel.patch(pipe, Strategy.dense(num_layers=30))
    assert patch_state(pipe.transformer) is None  # a failed patch changes nothing
    with pytest.raises(ValueError, match="power of two"):
        vdit_accel.patch(pipe, "dense", block_size=100)
    with pytest.raises(NotImplementedError, match="supported transformers: WanTransformer3DModel"):
        vdit_accel.patch(torch.nn.Linear(2, 2), "dense")


def test_strategy_file_with_per_head_patterns(pipe, tmp_path):
    layers = [[{"kind": "window3d", "t": 0, "h": 1, "w": 1}, {"kind": "dense"}, {"kind": "skip"},
               {"kind": "stripes", "frames": [0]}] for _ in range(4)]
    path = tmp_path / "s.json"
    Strategy(layers=layers, model={"class": "WanTransformer3DModel", "head_dim": 64}).save(path)
    vdit_accel.patch(pipe.transformer, str(path), block_size=32)
    try:
        out = _run(pipe, num_inference_steps=2)
        mask = patch_state(pipe.transformer).plan(0, torch.empty(1, 192, 4, 64)).block_mask()
    finally:
        vdit_accel.unpatch(pipe.transformer)
    d = mask.density_per_head()
    assert torch.isfinite(out).all() and d[1] == 1.0 and d[2] == 0.0 and 0 < d[0] < 1


@pytest.mark.skipif(os.environ.get("VDIT_SKIP_TRITON_PIPELINE") == "1", reason="opted out")
def test_pipeline_through_triton_interpreter(pipe, monkeypatch):
    """The patched pipeline through our Triton kernel (interpreted on the CPU) equals the reference path."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 from the start of the session (tests/conftest.py sets it)")
    strat = Strategy.uniform("window3d:t=0,h=1,w=1+stripes:frames=0")
    small = dict(num_inference_steps=1, guidance_scale=1.0)
    vdit_accel.patch(pipe, strat, block_size=32)
    try:
        ref = _run(pipe, **small)
        monkeypatch.setenv("VDIT_CPU_TRITON", "1")
        tri = _run(pipe, **small)
    finally:
        vdit_accel.unpatch(pipe)
    assert (tri - ref).abs().max().item() <= 1e-3


def test_quantized_strategy_and_its_bf16_steps():
    """patch(quant=...) runs the quantized kernels (CPU: their simulation): the output moves a little;
    quant_bf16_steps keeps the first and last steps unquantized, using the pipeline's step count."""
    import vdit_accel
    from vdit_accel import Strategy
    from vdit_accel.pipelines import build_tiny_pipeline, patch_state

    pipe = build_tiny_pipeline("wan")
    tr = pipe.transformer
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 3, 8, 8, generator=g)
    t = torch.tensor([500])
    enc = torch.randn(1, 8, tr.config.text_dim, generator=g)
    with torch.no_grad():
        ref = tr(x, t, enc, return_dict=False)[0]
        vdit_accel.patch(pipe, Strategy.uniform("dense", quant="fp8", quant_bf16_steps=(1, 1)))
        state = patch_state(tr)
        out0 = tr(x, t, enc, return_dict=False)[0]
        q = torch.empty(1, 48, 4, 64)
        assert state.plan(0, q).quant_modes == (None,) * 4  # step 0: in the first unquantized steps
        torch.testing.assert_close(out0, ref, atol=1e-4, rtol=1e-4)
        pipe.scheduler.set_timesteps(4)
        out1 = tr(x, torch.tensor([400]), enc, return_dict=False)[0]  # step 1 of 4: quantized
        assert state.step == 1 and state.plan(0, q).quant_modes == ("fp8",) * 4
        state.step = 3  # the last step: unquantized again
        assert state.plan(0, q).quant_modes == (None,) * 4
        vdit_accel.unpatch(pipe)
        ref1 = tr(x, torch.tensor([400]), enc, return_dict=False)[0]
    err = ((out1 - ref1).norm() / ref1.norm()).item()
    assert 1e-5 < err < 5e-2, err


@pytest.mark.parametrize("order,quant", [("tiled", "fp8"), ("semantic:top_p=1.0", "int8"), ("segment", "int4")])
def test_quantized_modes_under_token_orders(order, quant, monkeypatch):
    """Each quantized mode runs under each kind of token order (tiled once per forward; semantic and
    segment per call, through their gathers): close to the same strategy unquantized, not equal to it."""
    import vdit_accel
    from vdit_accel import Strategy
    from vdit_accel.pipelines import build_tiny_pipeline, patch_state
    from vdit_accel.pipelines import permute

    plans = []
    plan_call = permute.plan_call
    monkeypatch.setattr(permute, "plan_call", lambda *a, **k: plans.append(1) or plan_call(*a, **k))

    pipe = build_tiny_pipeline("wan")
    tr = pipe.transformer
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 3, 8, 14, generator=g)  # a 3x4x7 token grid: edge tiles, odd length 84
    t = torch.tensor([500])
    enc = torch.randn(1, 8, tr.config.text_dim, generator=g)
    pattern = "dense" if order != "tiled" else "window3d:t=1,h=1,w=2"
    outs = {}
    with torch.no_grad():
        for q in (None, quant):
            vdit_accel.patch(pipe, Strategy.uniform(pattern, order=order), block_size=16, quant=q)
            outs[q] = tr(x, t, enc, return_dict=False)[0]
            frame = patch_state(tr).orders.frame
            vdit_accel.unpatch(pipe)
    # tiled: one permutation per forward, no per-call plan; semantic / segment: a plan every call
    assert (frame is not None and not plans) if order == "tiled" else (frame is None and len(plans) >= 2)
    err = ((outs[quant] - outs[None]).norm() / outs[None].norm()).item()
    assert torch.isfinite(outs[quant]).all() and 1e-5 < err < 5e-2, err
