"""Token orders at run time (pipelines/permute.py): the tiled frame permuted once per Wan / CogVideoX forward, per-call
plans for per-head orders, and exactness against the unpermuted model."""

import pytest
import torch

import vdit_accel
from vdit_accel import Strategy
from vdit_accel.pipelines import build_tiny_pipeline, patch_state, tiny_defaults
from vdit_accel.pipelines import permute as permute_mod
from vdit_accel.permutation import parse_order, tiled_order

# A (3, 8, 8) token grid (192 tokens); no classifier-free guidance: one transformer call per step.
CALL = dict(prompt="a red circle moving left", height=128, width=128, num_frames=9, num_inference_steps=2,
            max_sequence_length=16, output_type="latent", guidance_scale=1.0)


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline("wan", seed=0)


@pytest.fixture(scope="module")
def base(pipe):
    return _run(pipe)


def _run(pipe, strategy=None, block_size=32, call=CALL, **kw):
    if strategy is not None:
        vdit_accel.patch(pipe, strategy, block_size=block_size)
    try:
        return pipe(**{**call, **kw}, generator=torch.Generator().manual_seed(0)).frames
    finally:
        if strategy is not None:
            vdit_accel.unpatch(pipe)


def _no_per_call_plans(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("a per-call plan ran where the frame should have served")

    monkeypatch.setattr(permute_mod, "plan_call", fail)


def test_tiled_frame_dense_equals_unpatched_and_permutes_once(pipe, base, monkeypatch):
    seen = []
    tr = pipe.transformer
    probe = tr.blocks[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    _no_per_call_plans(monkeypatch)
    try:
        out = _run(pipe, Strategy.uniform("dense", order="tiled"))
    finally:
        probe.remove()
    assert (out - base).abs().max().item() <= 1e-5
    # Inside the blocks the hidden states are in the tiled order: block 1 saw them permuted.
    raw = []
    probe = tr.blocks[1].register_forward_pre_hook(lambda m, args: raw.append(args[0].clone()))
    try:
        _run(pipe, num_inference_steps=1)
    finally:
        probe.remove()
    perm = tiled_order(vdit_accel.VideoGrid(3, 8, 8), 32)
    assert not torch.equal(perm, torch.arange(192))
    torch.testing.assert_close(seen[0], raw[0][:, perm], rtol=1e-5, atol=1e-5)
    # unpatch took every hook away: bit for bit the unpatched model again.
    assert not tr.rope._forward_hooks and not tr.blocks[0]._forward_pre_hooks and not tr.blocks[-1]._forward_hooks
    assert torch.equal(_run(pipe), base)


def test_tiled_sparse_frame_equals_per_call_gathers(pipe, base, monkeypatch):
    """The same tiled strategy through the once-per-forward frame and through per-call gathers."""
    strat = Strategy.uniform("window3d:t=0,h=1,w=1", order="tiled")
    framed = _run(pipe, strat)
    monkeypatch.setattr(permute_mod, "FRAME_FAMILIES", ())
    per_call = _run(pipe, strat)
    assert (framed - per_call).abs().max().item() <= 1e-5
    assert (framed - base).abs().max().item() > 1e-2  # sparse: it changed something


def test_per_token_timesteps_wan22_ti2v(pipe):
    """Wan 2.2 TI2V passes a timestep per video token: its modulation is permuted with the frame."""
    tr = pipe.transformer
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, 16, 3, 16, 16, generator=g)
    timestep = torch.rand(1, 3 * 8 * 8, generator=g) * 1000
    text = torch.randn(1, 16, 32, generator=g)
    base = tr(hidden, timestep, text, return_dict=False)[0]
    vdit_accel.patch(tr, Strategy.uniform("dense", order="tiled"), block_size=32)
    try:
        out = tr(hidden, timestep, text, return_dict=False)[0]
        assert patch_state(tr).orders.frame is not None
        with pytest.raises(NotImplementedError, match="per-token timestep embedding has 100 tokens"):
            tr(hidden, timestep[:, :100], text)
    finally:
        vdit_accel.unpatch(tr)
    assert (out - base).abs().max().item() <= 1e-5


def test_dynamic_and_mixed_orders_dense_equal_unpatched(pipe, base):
    """Per-head orders (raster, tiled, semantic, segment in one layer) in a tiled frame: with top_p = 1
    every block is kept, so the output is the unpatched one. (With text: the CogVideoX test below.)"""
    heads = ["raster", "tiled", "semantic:top_p=1,q_clusters=4,k_clusters=6", "segment:top_p=1,size=64"]
    strat = Strategy(layers=[[{"kind": "dense"}] * 4] * 4, order="tiled", orders=[[parse_order(h) for h in heads]] * 4)
    out = _run(pipe, strat, num_inference_steps=1)
    assert (out - _run(pipe, num_inference_steps=1)).abs().max().item() <= 1e-5


def test_semantic_heads_run_sparse_and_warm_start(pipe, base):
    strat = Strategy.uniform("dense", order="semantic:top_p=0.5,q_clusters=6,k_clusters=8")
    vdit_accel.patch(pipe, strat, block_size=16)
    state = patch_state(pipe.transformer)
    calls = []
    orig = permute_mod.plan_call

    def spy(q, k, grid, orders, frame, block, static, memory, scale=None):
        calls.append(sum(key[0] == "semantic" for key in memory))  # centroids kept from the layer's last call
        return orig(q, k, grid, orders, frame, block, static, memory, scale)

    permute_mod.plan_call = spy
    try:
        out = pipe(**CALL, generator=torch.Generator().manual_seed(0)).frames
        assert state.orders.frame is None  # no frame: the default order is not tiled
    finally:
        permute_mod.plan_call = orig
        vdit_accel.unpatch(pipe)
    assert calls == [0] * 4 + [1] * 4  # layers x steps: cold once per layer, then warm
    assert torch.isfinite(out).all() and (out - base).abs().max().item() > 1e-3


def test_tiled_frame_with_first_block_cache(pipe):
    """diffusers' FirstBlockCache keeps block outputs across steps: the frame is the same at every step,
    so caching composes (same result as the raster dense run with the same cache)."""
    from diffusers.hooks import FirstBlockCacheConfig

    results = []
    for order in (None, "tiled"):
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=1e9))
        try:
            results.append(_run(pipe, Strategy.uniform("dense", order=order)))
        finally:
            pipe.transformer.disable_cache()
    assert (results[0] - results[1]).abs().max().item() <= 1e-5


def _cog_call(family: str) -> dict:
    d = tiny_defaults(family)  # a (3, 4, 4) token grid after 16 text tokens (CogVideoX 1.5: temporal patches of 2)
    return dict(prompt="a red circle", height=d.height, width=d.width, num_frames=d.frames, num_inference_steps=2,
                max_sequence_length=16, output_type="latent")


@pytest.fixture(scope="module")
def cog():
    return build_tiny_pipeline("cogvideox", seed=0)


@pytest.mark.parametrize("family", ["cogvideox", "cogvideox_1_5"])
def test_tiled_frame_cogvideox_dense_equals_unpatched_and_permutes_once(family, monkeypatch):
    """CogVideoX's video hidden states (apart from its text) and its ``image_rotary_emb`` argument are
    permuted once per forward: no per-call plan, the same output as the unpatched model."""
    pipe = build_tiny_pipeline(family, seed=0)
    call, tr = _cog_call(family), pipe.transformer
    base = _run(pipe, call=call)

    def probe(into):
        def hook(m, args, kwargs):
            into.append((kwargs["hidden_states"].clone(), kwargs["encoder_hidden_states"].clone(),
                         kwargs["image_rotary_emb"]))

        return tr.transformer_blocks[1].register_forward_pre_hook(hook, with_kwargs=True)

    seen, raw = [], []
    handle = probe(seen)
    _no_per_call_plans(monkeypatch)
    try:
        out = _run(pipe, Strategy.uniform("dense", order="tiled"), block_size=16, call=call)
    finally:
        handle.remove()
    torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-5)
    handle = probe(raw)
    try:
        _run(pipe, call=call)
    finally:
        handle.remove()
    perm = tiled_order(vdit_accel.VideoGrid(3, 4, 4), 16)  # the video part (text keeps its place)
    assert not torch.equal(perm, torch.arange(48))
    hidden, text, rope = seen[0]
    torch.testing.assert_close(hidden, raw[0][0][:, perm], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text, raw[0][1], rtol=1e-5, atol=1e-5)
    for t, r in zip(rope, raw[0][2]):
        assert torch.equal(t, r[perm])
    assert not tr._forward_pre_hooks and not tr.transformer_blocks[0]._forward_pre_hooks
    assert not tr.transformer_blocks[-1]._forward_hooks
    assert torch.equal(_run(pipe, call=call), base)


def test_tiled_sparse_frame_equals_per_call_gathers_cogvideox(cog, monkeypatch):
    """With text first: the frame's attention sequence is the one the per-call plans and masks assume."""
    call = _cog_call("cogvideox")
    strat = Strategy.uniform("window3d:t=0,h=1,w=1", order="tiled")
    framed = _run(cog, strat, block_size=16, call=call)
    monkeypatch.setattr(permute_mod, "FRAME_FAMILIES", ())
    per_call = _run(cog, strat, block_size=16, call=call)
    torch.testing.assert_close(framed, per_call, rtol=1e-5, atol=1e-5)
    assert (framed - _run(cog, call=call)).abs().max().item() > 1e-2  # sparse: it changed something


def test_text_families_per_call_orders(cog, monkeypatch):
    """CogVideoX (text first, batched CFG): semantic heads gather per call in the tiled frame, and without
    a frame tiled heads gather per call too, text in place."""
    call = _cog_call("cogvideox")
    base = _run(cog, call=call)
    strat = Strategy(layers=[[{"kind": "dense"}] * 2] * 2, order="tiled",
                     orders=[[parse_order("tiled"), parse_order("semantic:top_p=1,q_clusters=3,k_clusters=5")]] * 2)
    for framed in (True, False):
        if not framed:
            monkeypatch.setattr(permute_mod, "FRAME_FAMILIES", ())
        vdit_accel.patch(cog, strat, block_size=16)
        try:
            out = cog(**call, generator=torch.Generator().manual_seed(0)).frames
            assert (patch_state(cog.transformer).orders.frame_order is not None) == framed
        finally:
            vdit_accel.unpatch(cog)
        torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-5)


def test_order_errors(pipe):
    vdit_accel.patch(pipe, Strategy.uniform("dense", order="tiled"), block_size=32)
    state = patch_state(pipe.transformer)
    try:
        state.observers.append(lambda *a: None)
        with pytest.raises(NotImplementedError, match="observers"):
            _run(pipe)
        state.observers.clear()
        pipe.transformer._parallel_config = object()
        with pytest.raises(NotImplementedError, match="context parallelism"):
            _run(pipe)
    finally:
        pipe.transformer._parallel_config = None
        vdit_accel.unpatch(pipe)


def test_patch_order_shortcut(pipe, base):
    """``patch(pipe, strategy, order=...)`` sets every head's order, as Strategy.uniform(..., order=...) does."""
    vdit_accel.patch(pipe, "dense", block_size=32, order="tiled")
    try:
        assert patch_state(pipe.transformer).strategy.order == parse_order("tiled")
        out = pipe(**CALL, generator=torch.Generator().manual_seed(0)).frames
    finally:
        vdit_accel.unpatch(pipe)
    assert (out - base).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="must be 'dense'"):
        vdit_accel.patch(pipe, "window3d:t=0,h=1,w=1", order="semantic")
    assert patch_state(pipe.transformer) is None  # refused before anything was patched
