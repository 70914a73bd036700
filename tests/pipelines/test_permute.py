"""Token orders at run time (pipelines/permute.py): the tiled frame permuted once per Wan / CogVideoX / HunyuanVideo /
LTX-Video / Mochi forward, per-call plans for per-head orders, and exactness against the unpermuted model."""

import pytest
import torch

import vdit_accel
from vdit_accel import Strategy
from vdit_accel.pipelines import build_tiny_pipeline, patch_state, tiny_defaults
from vdit_accel.pipelines import permute as permute_mod
from vdit_accel.orders import Tiled, tiled_order
from vdit_accel.strategy import HeadSpec

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


def _fail_plan(*a, **k):
    raise AssertionError("a per-call plan ran where the frame should have served")


def _no_per_call_plans(monkeypatch):
    monkeypatch.setattr(permute_mod, "plan_call", _fail_plan)


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


def test_uniform_tiled_layers_share_one_mask_and_unpatch_frees_it(pipe):
    """A uniform strategy in the tiled order compiles one plan (one block mask) for all layers (per-layer
    copies cost ~12 GB on HunyuanVideo 720p); unpatch drops the plans at once (the runtime and the patch
    state refer to each other, so waiting for the garbage collector kept a previous patch's masks alive)."""
    vdit_accel.patch(pipe, Strategy.uniform("window3d:t=0,h=1,w=1", order="tiled"), block_size=32)
    state = patch_state(pipe.transformer)
    try:
        pipe(**{**CALL, "num_inference_steps": 1}, generator=torch.Generator().manual_seed(0))
        plans = {id(p._vdit_plan) for p in state.processors}
        assert len(plans) == 1 and state.processors[0]._vdit_plan.kv_indices is not None
        assert len(state._plans) == 1
    finally:
        vdit_accel.unpatch(pipe)
    assert not state._plans and not state._forward_plans and not state.orders.memory
    assert all(p._vdit_plan is None for p in state.processors)


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
    strat = Strategy(default=HeadSpec(order="tiled"), layers=[[HeadSpec(order=h) for h in heads]] * 4)
    out = _run(pipe, strat, num_inference_steps=1)
    assert (out - _run(pipe, num_inference_steps=1)).abs().max().item() <= 1e-5


def test_semantic_heads_run_sparse_and_warm_start(pipe, base):
    strat = Strategy.uniform("dense", order="semantic:top_p=0.5,q_clusters=6,k_clusters=8")
    vdit_accel.patch(pipe, strat, block_size=16)
    state = patch_state(pipe.transformer)
    calls = []
    orig = permute_mod.plan_call

    def spy(q, k, grid, orders, frame, block, static, memory, scale=None, step=None, v=None):
        calls.append(sum(key[0] == "semantic" for key in memory))  # centroids kept from the layer's last call
        return orig(q, k, grid, orders, frame, block, static, memory, scale, step, v)

    permute_mod.plan_call = spy
    try:
        out = pipe(**CALL, generator=torch.Generator().manual_seed(0)).frames
        assert state.orders.frame is None  # no frame: the default order is not tiled
    finally:
        permute_mod.plan_call = orig
        vdit_accel.unpatch(pipe)
    assert calls == [0] * 4 + [1] * 4  # layers x steps: cold once per layer, then warm
    assert torch.isfinite(out).all() and (out - base).abs().max().item() > 1e-3


@pytest.mark.parametrize("refresh,plans_per_layer", [(1, 3), (2, 2)])
def test_semantic_plans_once_per_step_under_guidance(pipe, monkeypatch, refresh, plans_per_layer):
    """With classifier-free guidance (two transformer calls per step), the uncond call reuses the step's
    plan: a layer plans once per step at refresh=1 (3 steps: 3 plans, not 6), every 2nd step at 2."""
    from vdit_accel.orders import plan as P

    made = []
    orig = P.semantic_orders
    monkeypatch.setattr(P, "semantic_orders", lambda *a, **k: made.append(1) or orig(*a, **k))
    strat = Strategy.uniform("dense", order=f"semantic:top_p=0.5,q_clusters=6,k_clusters=8,refresh={refresh}")
    vdit_accel.patch(pipe, strat, block_size=16)
    try:
        layers = len(patch_state(pipe.transformer).processors)
        out = pipe(**{**CALL, "guidance_scale": 5.0, "num_inference_steps": 3}, generator=torch.Generator().manual_seed(0))
        assert set(patch_state(pipe.transformer).orders.memory) == {(i, 0) for i in range(layers)}
    finally:
        vdit_accel.unpatch(pipe)
    assert torch.isfinite(out.frames).all() and len(made) == layers * plans_per_layer


@pytest.mark.parametrize("family", ["wan", "hunyuan_video"])
def test_tiled_frame_with_first_block_cache(family, request):
    """diffusers' FirstBlockCache keeps block outputs across steps: the frame is the same at every step,
    so caching composes (same result as the raster dense run with the same cache; HunyuanVideo: the cached
    residual spans its dual- and single-stream blocks)."""
    from diffusers.hooks import FirstBlockCacheConfig

    pipe, call = (request.getfixturevalue("pipe"), CALL) if family == "wan" else (_tiny(family), _tiny_call(family))
    results = []
    for order in (None, "tiled"):
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=1e9))
        try:
            results.append(_run(pipe, Strategy.uniform("dense", order=order), call=call))
        finally:
            pipe.transformer.disable_cache()
    assert (results[0] - results[1]).abs().max().item() <= 1e-5


def _tiny_call(family: str) -> dict:
    """A tiny pipeline's default call: a (3, 4, 4) token grid (LTX: (3, 8, 8)) with 16 text tokens
    (CogVideoX 1.5: temporal patches of 2); no guidance scale given: each family's default CFG."""
    d = tiny_defaults(family)
    return dict(prompt="a red circle", height=d.height, width=d.width, num_frames=d.frames, num_inference_steps=2,
                max_sequence_length=d.max_sequence_length or 16, output_type="latent", **d.call_kwargs)


_PIPES: dict = {}


def _tiny(family: str):
    if family not in _PIPES:
        pipe = _PIPES[family] = build_tiny_pipeline(family, seed=0)
        if family == "mochi":  # its rotary frequencies start at zero (identity rotations): give them values
            pipe.transformer.pos_frequencies.copy_(torch.randn(pipe.transformer.pos_frequencies.shape,
                                                               generator=torch.Generator().manual_seed(0)))
    return _PIPES[family]


@pytest.fixture(scope="module", autouse=True)
def _free_pipes():
    yield
    _PIPES.clear()


@pytest.fixture(scope="module")
def cog():
    return _tiny("cogvideox")


# The token dim of the rotary tables the blocks get (the others: dim 0).
ROPE_DIM = {"ltx": 1}


def _block_inputs(args, kwargs):
    """(video hidden states, text, rotary tables) a block was called with: HunyuanVideo's blocks get them
    positionally, the others by keyword (LTX: its text is the cross-attention's)."""
    def get(index, name):
        return args[index] if len(args) > index else kwargs.get(name)

    return get(0, "hidden_states").clone(), get(1, "encoder_hidden_states").clone(), get(4, "image_rotary_emb")


@pytest.mark.parametrize("family", ["cogvideox", "cogvideox_1_5", "hunyuan_video", "ltx", "mochi"])
def test_tiled_frame_text_families_dense_equals_unpatched_and_permutes_once(family, monkeypatch):
    """The video hidden states (apart from the text) and the rotary tables (CogVideoX: its
    ``image_rotary_emb`` argument; the others: their ``rope`` module's output) are permuted once per
    forward: no per-call plan, the same output as the unpatched model. HunyuanVideo's dual-stream and
    single-stream blocks see the same frame."""
    pipe, call = _tiny(family), _tiny_call(family)
    tr = pipe.transformer
    base = _run(pipe, call=call)
    frame = permute_mod.FRAME_FAMILIES[vdit_accel.pipelines.adapter_for(tr).family]
    blocks = [b for name in frame.blocks for b in getattr(tr, name)]
    probed = blocks[1:3]  # HunyuanVideo: the second dual-stream block and the first single-stream one
    assert len(probed) == (2 if family == "hunyuan_video" else 1)

    def probe(into):
        def hook(m, args, kwargs):
            state = patch_state(tr)
            into.append((_block_inputs(args, kwargs), state.grid if state is not None else None))

        return [b.register_forward_pre_hook(hook, with_kwargs=True) for b in probed]

    seen, raw = [], []
    handles = probe(seen)
    _no_per_call_plans(monkeypatch)
    try:
        out = _run(pipe, Strategy.uniform("dense", order="tiled"), block_size=16, call=call)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-5)
    handles = probe(raw)
    try:
        _run(pipe, call=call)
    finally:
        for h in handles:
            h.remove()
    grid = seen[0][1]
    perm = tiled_order(vdit_accel.VideoGrid(grid.t, grid.h, grid.w), 16)  # the video part (text keeps its place)
    assert not torch.equal(perm, torch.arange(grid.video_len))
    assert len(seen) == len(raw) > 0
    dim = ROPE_DIM.get(family, 0)
    for ((hidden, text, rope), _), ((raw_hidden, raw_text, raw_rope), _) in zip(seen, raw):
        torch.testing.assert_close(hidden, raw_hidden[:, perm], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(text, raw_text, rtol=1e-5, atol=1e-5)
        for t, r in zip(rope, raw_rope):
            assert torch.equal(t, r.index_select(dim, perm))
    assert not tr._forward_pre_hooks and not blocks[0]._forward_pre_hooks and not blocks[-1]._forward_hooks
    assert not getattr(tr, "rope", torch.nn.Module())._forward_hooks
    assert torch.equal(_run(pipe, call=call), base)


@pytest.mark.parametrize("family", ["cogvideox", "hunyuan_video", "ltx", "mochi"])
def test_tiled_sparse_frame_equals_per_call_gathers_text_families(family, monkeypatch):
    """With text first (CogVideoX), last (HunyuanVideo with its padded text masked, Mochi with it dropped
    per sample) or in cross-attention only (LTX): the frame's attention sequence is the one the per-call
    plans and masks assume."""
    pipe, call = _tiny(family), _tiny_call(family)
    strat = Strategy.uniform("window3d:t=0,h=1,w=1", order="tiled")
    framed = _run(pipe, strat, block_size=16, call=call)
    monkeypatch.setattr(permute_mod, "FRAME_FAMILIES", ())
    per_call = _run(pipe, strat, block_size=16, call=call)
    torch.testing.assert_close(framed, per_call, rtol=1e-5, atol=1e-5)
    assert (framed - _run(pipe, call=call)).abs().max().item() > 1e-2  # sparse: it changed something


def _variant(family: str, **config):
    """The tiny pipeline's transformer, or one built from its config with ``config`` changed."""
    tr = _tiny(family).transformer
    if not config:
        return tr
    torch.manual_seed(0)
    new = type(tr).from_config(tr.config, **config).eval().requires_grad_(False)
    assert all(new.config[k] == v for k, v in config.items())
    return new


def _odd_inputs(variant: str, g: torch.Generator) -> tuple:
    """(transformer, args, kwargs) of one forward on a (3, 5, 7) token grid, batch 2, 7 text tokens of
    which the second sample has 4 (HunyuanVideo masks the rest, Mochi drops them)."""
    family = variant.split(":")[0]
    config = {"hunyuan_video:no_guidance": {"guidance_embeds": False},
              "hunyuan_video:token_replace": {"image_condition_type": "token_replace"}}.get(variant, {})
    tr = _variant(family, **config)
    text = torch.randn(2, 7, 32, generator=g)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    timestep = torch.rand(2, generator=g) * 1000
    if family == "hunyuan_video":
        guidance = torch.full((2,), 6000.0) if tr.config.guidance_embeds else None
        return tr, (torch.randn(2, 4, 3, 5, 7, generator=g), timestep, text, mask, torch.randn(2, 16, generator=g),
                    guidance), {}
    if family == "ltx":  # packed hidden states; "ltx:per_token": a timestep per video token (image-to-video)
        if variant == "ltx:per_token":
            timestep = torch.rand(2, 105, generator=g) * 1000
        return tr, (torch.randn(2, 105, 8, generator=g), text, timestep, torch.ones(2, 7)), \
            dict(num_frames=3, height=5, width=7)
    if family == "mochi":
        return tr, (torch.randn(2, 12, 3, 10, 14, generator=g), text, timestep, mask), {}
    # CogVideoX: (B, F, C, H, W), text first; any (cos, sin) tables serve (attention is order-equivariant
    # whatever their values, as long as they move with their tokens).
    rope = tuple(torch.randn(105, 16, generator=g) for _ in range(2))
    return tr, (torch.randn(2, 3, 4, 10, 14, generator=g), text, timestep), dict(image_rotary_emb=rope)


@pytest.mark.parametrize("variant", ["hunyuan_video", "hunyuan_video:no_guidance", "ltx", "ltx:per_token", "mochi",
                                     "cogvideox"])
def test_tiled_frame_odd_grid_edge_tiles(variant, monkeypatch):
    """A (3, 5, 7) grid in tiles of (1, 4, 4) (blocks of 16): edge tiles in rows and columns, text padded
    in one sample of two. Dense through the frame (no per-call plan) equals the unpatched model; sparse
    through the frame (no per-call plan either) equals sparse through per-call gathers."""
    tr, args, kwargs = _odd_inputs(variant, torch.Generator().manual_seed(3))

    def forward(strategy=None, per_call=False):
        with monkeypatch.context() as m:
            # Through the frame every head is in the frame's order: no per-call plan at all.
            m.setattr(permute_mod, *(("FRAME_FAMILIES", ()) if per_call else ("plan_call", _fail_plan)))
            if strategy is None:
                return tr(*args, **kwargs, return_dict=False)[0]
            vdit_accel.patch(tr, strategy, block_size=16)
            try:
                out = tr(*args, **kwargs, return_dict=False)[0]
                assert (patch_state(tr).orders.frame is not None) != per_call
                return out
            finally:
                vdit_accel.unpatch(tr)

    base = forward()
    torch.testing.assert_close(forward(Strategy.uniform("dense", order="tiled")), base, rtol=1e-5, atol=1e-5)
    sparse = Strategy.uniform("window3d:t=0,h=1,w=1", order="tiled")
    framed = forward(sparse)
    torch.testing.assert_close(framed, forward(sparse, per_call=True), rtol=1e-5, atol=1e-5)
    assert (framed - base).abs().max().item() > 1e-3  # sparse: it changed something
    assert torch.equal(forward(), base)


def test_tiled_frame_refused_where_tokens_have_places():
    """HunyuanVideo's token-replace image conditioning modulates the first frame's tokens (the first h * w)
    apart: no frame there, tiled heads gather per call (dense: the unpatched output). LTX's per-token
    timesteps must match the video."""
    tr, args, kwargs = _odd_inputs("hunyuan_video:token_replace", torch.Generator().manual_seed(3))
    base = tr(*args, return_dict=False)[0]
    vdit_accel.patch(tr, Strategy.uniform("dense", order="tiled"), block_size=16)
    try:
        assert patch_state(tr).orders.frame_order is None
        out = tr(*args, return_dict=False)[0]
    finally:
        vdit_accel.unpatch(tr)
    torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-5)

    tr, args, kwargs = _odd_inputs("ltx:per_token", torch.Generator().manual_seed(3))
    args = (*args[:2], args[2][:, :100], *args[3:])
    vdit_accel.patch(tr, Strategy.uniform("dense", order="tiled"), block_size=16)
    try:
        with pytest.raises(NotImplementedError, match="per-token timestep embedding has 100 tokens"):
            tr(*args, **kwargs)
    finally:
        vdit_accel.unpatch(tr)


def test_text_families_per_call_orders(cog, monkeypatch):
    """CogVideoX (text first, batched CFG): semantic heads gather per call in the tiled frame, and without
    a frame tiled heads gather per call too, text in place."""
    call = _tiny_call("cogvideox")
    base = _run(cog, call=call)
    strat = Strategy(default=HeadSpec(order="tiled"),
                     layers=[[HeadSpec(order="tiled"), HeadSpec(order="semantic:top_p=1,q_clusters=3,k_clusters=5")]] * 2)
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
    finally:
        vdit_accel.unpatch(pipe)
    vdit_accel.patch(pipe, Strategy.uniform("dense", order="semantic:top_p=0.9"), block_size=32)
    try:
        pipe.transformer._parallel_config = object()
        with pytest.raises(NotImplementedError, match="semantic and segment token orders are not supported under "
                                                      "context parallelism"):
            _run(pipe)
    finally:
        pipe.transformer._parallel_config = None
        vdit_accel.unpatch(pipe)


def test_tiled_under_context_parallelism_gathers_per_call(pipe):
    """Under context parallelism (the model's ``_parallel_config`` set) the tiled order has no frame: each
    call gathers K and V and reads Q through the order (what a Ulysses rank does: test_ulysses.py), with
    the framed run's output."""
    strategy = Strategy.uniform("window3d:t=0,h=1,w=1", order="tiled")
    framed = _run(pipe, strategy)
    vdit_accel.patch(pipe, strategy, block_size=32)
    state = patch_state(pipe.transformer)
    try:
        pipe.transformer._parallel_config = object()
        out = pipe(**CALL, generator=torch.Generator().manual_seed(0)).frames
        assert state.parallel and state.orders.frame is None
        assert all(p._vdit_plan.k_index is not None for p in state.processors)
    finally:
        pipe.transformer._parallel_config = None
        vdit_accel.unpatch(pipe)
    torch.testing.assert_close(out, framed, rtol=1e-5, atol=1e-5)


def test_patch_order_shortcut(pipe, base):
    """``patch(pipe, strategy, order=...)`` sets every head's order, as Strategy.uniform(..., order=...) does."""
    vdit_accel.patch(pipe, "dense", block_size=32, order="tiled")
    try:
        assert patch_state(pipe.transformer).strategy.default.order == Tiled()
        out = pipe(**CALL, generator=torch.Generator().manual_seed(0)).frames
    finally:
        vdit_accel.unpatch(pipe)
    assert (out - base).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="must be 'dense'"):
        vdit_accel.patch(pipe, "window3d:t=0,h=1,w=1", order="semantic")
    assert patch_state(pipe.transformer) is None  # refused before anything was patched
