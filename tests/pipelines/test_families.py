"""Every supported family, on its tiny offline pipeline: dense == unpatched, sparse changes the output,
unpatch restores it bit for bit, batched CFG == separate calls, text padding handled exactly."""

import logging

import pytest
import torch
import torch.nn.functional as F

import vdit_accel
from vdit_accel import Strategy, VideoGrid
from vdit_accel.pipelines import ADAPTERS, TINY_FAMILIES, adapter_for, build_tiny_pipeline, patch_state, tiny_defaults
from vdit_accel.pipelines.backend import _vdit_backend, running

# Sizes with a (3, 4, 4) video token grid where the family allows it (LTX needs multiples of 32: 3x8x8).
SIZES = {"wan": (64, 64, 9), "wan2.2": (64, 64, 9), "skyreels_v2": (64, 64, 9)}
SPARSE = "window3d:t=0,h=0,w=0"  # one frame per 16-token block: each video block sees its own frame


def _call(family: str, **kw) -> dict:
    d = tiny_defaults(family)
    h, w, f = SIZES.get(family, (d.height, d.width, d.frames))
    call = dict(prompt="a red circle moving left", height=h, width=w, num_frames=f, num_inference_steps=2,
                output_type="pt", **d.call_kwargs)
    if d.max_sequence_length:
        call["max_sequence_length"] = d.max_sequence_length
    return {**call, **kw}


_PIPES: dict = {}


def _pipe(family):
    if family not in _PIPES:
        _PIPES[family] = build_tiny_pipeline(family, seed=0)
    return _PIPES[family]


def _run(pipe, family, **kw):
    return pipe(**_call(family, **kw), generator=torch.Generator().manual_seed(0)).frames[0]


@pytest.fixture(scope="module", autouse=True)
def _free_pipes():
    yield
    _PIPES.clear()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_dense_sparse_unpatch(family):
    pipe = _pipe(family)
    base = _run(pipe, family)
    vdit_accel.patch(pipe, "dense")
    try:
        dense = _run(pipe, family)
        grid = patch_state(pipe.transformer).grid
    finally:
        vdit_accel.unpatch(pipe)
    assert (grid.t, grid.h, grid.w) >= (3, 4, 4) and grid.h >= 4 and grid.w >= 4
    assert (dense - base).abs().max().item() <= 1e-4
    assert torch.equal(_run(pipe, family), base)

    vdit_accel.patch(pipe, SPARSE, block_size=16)
    try:
        state = patch_state(pipe.transformer)
        masks = []
        state.observers.append(lambda layer, step, q, k, v: masks.append(state.plan(layer, q).block_mask()))
        sparse = _run(pipe, family)
    finally:
        vdit_accel.unpatch(pipe)
    assert masks and all(m is not None and m.density() < 1.0 for m in masks)
    assert torch.isfinite(sparse).all() and (sparse - base).abs().max().item() > 1e-4
    assert torch.equal(_run(pipe, family), base)


def _split(value, b):
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == 2:
        return value[b : b + 1]
    return value


def _cat(a, b):
    if isinstance(a, torch.Tensor) and a.dim() >= 1 and a.shape[0] == 1:
        return torch.cat([a, b])
    return a


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_cfg_batched_equals_separate(family):
    """The transformer's inputs of one denoising step, as the pipeline made them (batched or separate
    cond/uncond), run patched and sparse both as one batch of 2 and as two batches of 1."""
    pipe = _pipe(family)
    tr = pipe.transformer
    calls = []
    hook = tr.register_forward_pre_hook(lambda m, a, k: calls.append((a, dict(k))), with_kwargs=True)
    # HunyuanVideo is guidance-distilled: one call per step unless true CFG is asked for.
    extra = {"true_cfg_scale": 2.0, "negative_prompt": "blurry"} if family == "hunyuan_video" else {}
    try:
        _run(pipe, family, num_inference_steps=2, **extra)
    finally:
        hook.remove()
    (args, kwargs) = calls[0]
    batch_of = (args[0] if args else kwargs["hidden_states"]).shape[0]
    if batch_of == 2:
        batched = calls[0]
        single = [(tuple(_split(a, b) for a in args), {k: _split(v, b) for k, v in kwargs.items()}) for b in (0, 1)]
    else:
        single = calls[:2]
        (a0, k0), (a1, k1) = single
        batched = (tuple(_cat(x, y) for x, y in zip(a0, a1)), {k: _cat(v, k1[k]) for k, v in k0.items()})
    kwargs_out = {"return_dict": False}
    vdit_accel.patch(tr, SPARSE, block_size=16)
    try:
        out2 = tr(*batched[0], **{**batched[1], **kwargs_out})[0]
        out1 = torch.cat([tr(*a, **{**k, **kwargs_out})[0] for a, k in single])
    finally:
        vdit_accel.unpatch(tr)
    assert (out2 - out1).abs().max().item() <= 1e-5


def test_every_transformer_patched_and_steps_shared():
    """Wan 2.2: both transformers patched, one step count across the boundary; Mochi's rising timesteps."""
    pipe = _pipe("wan2.2")
    seen = []
    vdit_accel.patch(pipe, Strategy.uniform(SPARSE, dense_warmup_steps=1), block_size=16)
    try:
        for name in ("transformer", "transformer_2"):
            st = patch_state(getattr(pipe, name))
            st.observers.append(lambda layer, step, q, k, v, name=name: seen.append((name, step)))
        _run(pipe, "wan2.2", num_inference_steps=4)
    finally:
        vdit_accel.unpatch(pipe)
    high = sorted({s for n, s in seen if n == "transformer"})
    low = sorted({s for n, s in seen if n == "transformer_2"})
    assert high and low and high + low == [0, 1, 2, 3]  # transformer_2 continues the count

    pipe = _pipe("mochi")
    steps = []
    vdit_accel.patch(pipe, "dense")
    try:
        patch_state(pipe.transformer).observers.append(lambda layer, step, q, k, v: steps.append(step))
        _run(pipe, "mochi", num_inference_steps=3)
    finally:
        vdit_accel.unpatch(pipe)
    assert sorted(set(steps)) == [0, 1, 2]


def test_adapters_and_errors():
    names = {a.family for a in ADAPTERS}
    assert names == {"wan", "skyreels_v2", "hunyuan_video", "hunyuan_video_1_5", "cogvideox", "ltx", "mochi"}
    hv = _pipe("hunyuan_video").transformer
    layers = adapter_for(hv).layers(hv)
    assert [n for n, _ in layers] == ["transformer_blocks.0.attn", "transformer_blocks.1.attn",
                                      "single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]
    vdit_accel.patch(hv, "dense")
    try:  # exactly the listed layers: the token refiner's attention is left alone
        patched = {n for n, m in hv.named_modules() if type(getattr(m, "processor", None)).__name__.startswith("Vdit")}
        assert patched == {n for n, _ in layers}
        assert any("refiner" in n for n, m in hv.named_modules() if hasattr(m, "processor"))
    finally:
        vdit_accel.unpatch(hv)
    with pytest.raises(NotImplementedError, match="MochiTransformer3DModel"):
        vdit_accel.patch(torch.nn.Linear(2, 2))


def _layer_ctx(grid: VideoGrid, strategy: str = SPARSE):
    """A patched-layer context for calling the backend directly, as the processors do."""
    tr = _pipe("hunyuan_video").transformer
    vdit_accel.patch(tr, strategy, block_size=16)
    state = patch_state(tr)
    state.grid, state._forward_seen = grid, True
    return tr, state


@pytest.mark.parametrize("prepared", [True, False])
def test_key_padding_mask_is_exact(prepared):
    """Padded text keys are excluded exactly; each sample gets its true text length; padded query
    rows get what SDPA gives them. Checked against the block-masked reference of each valid prefix,
    with the forward's plan prepared (restricted per sample, one op under compile) and without (each
    sample planned per call)."""
    torch.manual_seed(0)
    grid = VideoGrid(3, 4, 4, text_len=16, text_at="suffix")
    s, h, d = grid.seq_len, 2, 16
    q, k, v = (torch.randn(2, s, h, d) for _ in range(3))
    lengths = [48 + 5, 48 + 16]
    valid = torch.arange(s)[None] < torch.tensor(lengths)[:, None]
    tr, state = _layer_ctx(grid)
    if prepared:
        state._prepare(torch.device("cpu"))
        assert state.processors[0]._vdit_plan.serves(s, (0, h))
    try:
        for mask in (valid[:, None, None, :], (valid[:, :, None] & valid[:, None, :])[:, None]):
            with running(state.processors[0]):  # as the patched processor of layer 0 does around its call
                out = _vdit_backend(q, k, v, attn_mask=mask)
            for b, n in enumerate(lengths):
                bm = state.plan(0, q[:, :n]).block_mask()
                assert bm is not None and bm.seq_len == n and bm.density() < 1
                ref = vdit_accel.attention(q[b : b + 1, :n], k[b : b + 1, :n], v[b : b + 1, :n], bm)
                assert (out[b, :n] - ref[0]).abs().max().item() <= 1e-5
                rows = mask[b : b + 1, :, n:] if mask.shape[2] == s else mask[b : b + 1]
                sd = F.scaled_dot_product_attention(q[b : b + 1, n:].transpose(1, 2), k[b : b + 1].transpose(1, 2),
                                                    v[b : b + 1].transpose(1, 2), attn_mask=rows).transpose(1, 2)
                assert torch.equal(out[b : b + 1, n:], sd)
    finally:
        vdit_accel.unpatch(tr)


def test_other_masks_fall_back_to_sdpa(caplog, monkeypatch):
    from vdit_accel.pipelines import notice

    monkeypatch.setattr(notice, "_warned", set())
    torch.manual_seed(1)
    grid = VideoGrid(3, 4, 4, text_len=16, text_at="suffix")
    q, k, v = (torch.randn(1, grid.seq_len, 2, 16) for _ in range(3))
    holes = torch.ones(1, 1, 1, grid.seq_len, dtype=torch.bool)
    holes[..., 10] = False  # a masked video key: not a trailing text pad
    additive = torch.zeros(1, 1, grid.seq_len, grid.seq_len)
    tr, state = _layer_ctx(grid)
    try:
        with caplog.at_level(logging.WARNING, logger="vdit_accel"), running(state.processors[0]):
            for mask in (holes, additive):
                want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                      attn_mask=mask).transpose(1, 2)
                assert torch.equal(_vdit_backend(q, k, v, attn_mask=mask), want)
    finally:
        vdit_accel.unpatch(tr)
    assert "not a key-padding mask of trailing text tokens: falling back to PyTorch SDPA" in caplog.text


def test_models_command_lists_every_family():
    from typer.testing import CliRunner

    from vdit_accel.cli.app import app

    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0
    lines = [line.split() for line in result.output.strip().splitlines()]
    from vdit_accel.pipelines.tiny import TRAINED_FAMILIES

    assert [l[0] for l in lines] == list(TINY_FAMILIES + TRAINED_FAMILIES)
    assert ["hunyuan_video_1_5", "HunyuanVideo15Transformer3DModel"] in lines


def test_set_attention_backend_vdit_runs_dense():
    """Without patch(): diffusers' own switch selects our backend on a dispatching model."""
    tr = _pipe("ltx").transformer
    calls = []
    hook = tr.register_forward_pre_hook(lambda m, a, k: calls.append((a, dict(k))), with_kwargs=True)
    try:
        _run(_pipe("ltx"), "ltx")
    finally:
        hook.remove()
    args, kwargs = calls[0]
    kwargs = {**kwargs, "return_dict": False}
    base = tr(*args, **kwargs)[0]
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    # diffusers' set_attention_backend also makes the backend the process-wide default, and
    # reset_attention_backend does not undo that: restore it, or later tests (training included) run on it.
    prev = _AttentionBackendRegistry._active_backend
    tr.set_attention_backend("vdit")
    try:
        assert all(p._attention_backend.value == "vdit" for p in tr.attn_processors.values())
        ours = tr(*args, **kwargs)[0]
    finally:
        tr.reset_attention_backend()
        _AttentionBackendRegistry._active_backend = prev
    assert (ours - base).abs().max().item() <= 1e-5
    assert torch.equal(tr(*args, **kwargs)[0], base)
