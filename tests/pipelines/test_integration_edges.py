"""Where our backend meets the rest of diffusers (issue 23, found by running diffusers' own tests with it):
a fallback warning inside a compiled region, ``set_attention_backend`` on models a backend cannot reach
and on patched models, training, ``fullgraph=True`` with padded text, ``DIFFUSERS_ATTN_BACKEND=vdit``."""

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import vdit_accel
from vdit_accel import Strategy, VideoGrid
from vdit_accel.plan import compile_layer_plan
from vdit_accel.pipelines import build_tiny_pipeline, notice, patch_state
from vdit_accel.pipelines.key_padding import truncate_block_mask

SPARSE = "window3d:t=0,h=0,w=0"  # on the (3, 4, 4) grid in 16-token blocks: each video block sees its frame


@pytest.fixture
def active_backend():
    """diffusers' process-wide default backend, restored after the test (set_attention_backend sets it)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    prev = _AttentionBackendRegistry._active_backend
    yield _AttentionBackendRegistry
    _AttentionBackendRegistry._active_backend = prev


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(notice, "_warned", set())


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


def _wan_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 16, 3, 8, 8, generator=g), torch.tensor([900.0]), torch.randn(1, 16, 32, generator=g)


def test_fallback_warning_first_hit_under_fullgraph_compile():
    """A fresh process whose first call of the SDPA fallback (Wan's cross-attention, sent to our backend by
    set_attention_backend) is traced by torch.compile(fullgraph=True): the warning is logged, once, and
    the compiled model equals the eager one."""
    res = _python("""
        import copy, logging, torch, vdit_accel
        from vdit_accel.pipelines import build_tiny_pipeline
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        tr = build_tiny_pipeline("wan", seed=0).transformer
        models = [tr, copy.deepcopy(tr)]
        for tr in models:
            vdit_accel.patch(tr, "window3d:t=0,h=0,w=0", block_size=16)
            tr.set_attention_backend("vdit")  # attn2 (cross-attention) too: the backend falls back to SDPA
        g = torch.Generator().manual_seed(0)
        x, t, enc = torch.randn(1, 16, 3, 8, 8, generator=g), torch.tensor([900.0]), torch.randn(1, 16, 32, generator=g)
        models[0].compile_repeated_blocks(backend="aot_eager", fullgraph=True)
        with torch.no_grad():
            out = models[0](x, t, enc, return_dict=False)[0]
            out = models[0](x, t, enc, return_dict=False)[0]
            ref = models[1](x, t, enc, return_dict=False)[0]
        print("MAX_DIFF", (out - ref).abs().max().item())
    """)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("cross-attention shapes: falling back to PyTorch SDPA") == 1, res.stderr[-3000:]
    assert float(res.stdout.split("MAX_DIFF")[1]) <= 1e-5


@pytest.mark.parametrize("family", ["cogvideox", "mochi"])
def test_set_attention_backend_vdit_refuses_models_it_cannot_reach(family, active_backend):
    """CogVideoX and Mochi processors call SDPA themselves: the backend would never be called, so
    set_attention_backend("vdit") raises (changing nothing) and says to patch instead."""
    tr = build_tiny_pipeline(family, seed=0).transformer

    def backends():
        procs = [m.processor for m in tr.modules() if hasattr(m, "processor")]
        return active_backend._active_backend, [getattr(p, "_attention_backend", None) for p in procs]

    before = backends()
    with pytest.raises(NotImplementedError, match=r"vdit_accel\.patch\(model\)"):
        tr.set_attention_backend("vdit")
    assert backends() == before
    vdit_accel.patch(tr, "dense")
    try:
        tr.set_attention_backend("vdit")  # patched: our attention already, nothing to refuse
    finally:
        vdit_accel.unpatch(tr)


def test_backend_changes_after_patch_keep_our_attention(caplog, fresh_warnings, active_backend):
    """set_attention_backend("native") / reset_attention_backend() on a patched model: the patched layers
    stay on our (here sparse) attention, with a warning, and the patch state stays true."""
    tr = build_tiny_pipeline("wan", seed=0).transformer
    x, t, enc = _wan_inputs()
    vdit_accel.patch(tr, SPARSE, block_size=16)
    try:
        state = patch_state(tr)
        layers = []
        state.observers.append(lambda layer, step, q, k, v: layers.append(layer))
        with torch.no_grad():
            ref = tr(x, t, enc, return_dict=False)[0]
            with caplog.at_level(logging.WARNING, logger="vdit_accel"):
                tr.set_attention_backend("native")
                native = tr(x, t, enc, return_dict=False)[0]
                tr.reset_attention_backend()
                reset = tr(x, t, enc, return_dict=False)[0]
        assert torch.equal(native, ref) and torch.equal(reset, ref)
        assert layers == [0, 1, 2, 3] * 3
        assert all(p._attention_backend.value == "vdit" for p in state.processors)
        assert patch_state(tr) is state
        assert "set_attention_backend('native') on a model patched by vdit-accel" in caplog.text
        assert "reset_attention_backend() on a model patched by vdit-accel" in caplog.text
    finally:
        vdit_accel.unpatch(tr)
    with torch.no_grad():
        unpatched = tr(x, t, enc, return_dict=False)[0]
    assert (unpatched - ref).abs().max() > 1e-3  # the sparse pattern did change the output


def test_training_warns_then_refuses_backward(caplog, fresh_warnings):
    """A forward that records autograd warns once; a backward through our attention raises our message."""
    tr = build_tiny_pipeline("wan", seed=0).transformer
    tr.requires_grad_(True).train()
    vdit_accel.patch(tr, "dense")
    try:
        x, t, enc = _wan_inputs()
        with caplog.at_level(logging.WARNING, logger="vdit_accel"):
            out = tr(x, t, enc, return_dict=False)[0]
            tr(x, t, enc, return_dict=False)
        assert caplog.text.count("a forward with autograd recording") == 1
        with pytest.raises(RuntimeError, match=r"inference-only.*vdit_accel\.unpatch\(\)"):
            out.square().mean().backward()
        with torch.no_grad():  # inference in the same process: no autograd, no warning, our path
            assert torch.isfinite(tr(x, t, enc, return_dict=False)[0]).all()
    finally:
        vdit_accel.unpatch(tr)
    tr(x, t, enc, return_dict=False)[0].square().mean().backward()  # unpatched: diffusers' attention trains


def _hunyuan_inputs():
    g = torch.Generator().manual_seed(0)
    valid = torch.arange(16)[None] < torch.tensor([5, 16])[:, None]  # sample 0: 11 padded text tokens
    return dict(hidden_states=torch.randn(2, 4, 3, 4, 4, generator=g), timestep=torch.tensor([900.0, 900.0]),
                encoder_hidden_states=torch.randn(2, 16, 32, generator=g), encoder_attention_mask=valid.long(),
                pooled_projections=torch.randn(2, 16, generator=g), guidance=torch.tensor([3500.0, 3500.0]))


def _hunyuan15_inputs():
    g = torch.Generator().manual_seed(0)
    valid = torch.arange(12)[None] < torch.tensor([4, 12])[:, None]
    valid_2 = torch.arange(8)[None] < torch.tensor([8, 3])[:, None]
    return dict(hidden_states=torch.randn(2, 9, 3, 4, 4, generator=g), timestep=torch.tensor([900.0, 900.0]),
                encoder_hidden_states=torch.randn(2, 12, 16, generator=g), encoder_attention_mask=valid.long(),
                encoder_hidden_states_2=torch.randn(2, 8, 32, generator=g), encoder_attention_mask_2=valid_2.long(),
                image_embeds=torch.zeros(2, 5, 12))


@pytest.mark.parametrize("family, inputs", [("hunyuan_video", _hunyuan_inputs),
                                            ("hunyuan_video_1_5", _hunyuan15_inputs)])
def test_hunyuan_padded_text_compiles_fullgraph(family, inputs):
    """Padded text (a key-padding mask) under compile_repeated_blocks(fullgraph=True): no graph break,
    equal to eager; and eager equals the per-sample calls planned for each sample's true text length."""
    torch._dynamo.reset()
    tr = build_tiny_pipeline(family, seed=0).transformer
    vdit_accel.patch(tr, SPARSE, block_size=16)
    try:
        state = patch_state(tr)
        with torch.no_grad():
            eager = tr(**inputs(), return_dict=False)[0]
            assert all(p._vdit_plan.density() < 1 for p in state.processors)
            lengths = []
            state.observers.append(lambda layer, step, q, k, v: lengths.append(q.shape[1]))
            per_call = tr(**inputs(), return_dict=False)[0]  # observers: each sample planned on its own
            state.observers.clear()
            assert len(set(lengths)) == 2  # the two samples' valid lengths differ
            torch.testing.assert_close(per_call, eager, rtol=0, atol=1e-6)
            counter = CompileCounterWithBackend("aot_eager")
            tr.compile_repeated_blocks(backend=counter, fullgraph=True)
            compiled = tr(**inputs(), return_dict=False)[0]
        assert counter.frame_count >= 1
        masked = [n for g in counter.graphs for n in g.graph.nodes
                  if n.target is torch.ops.vdit.attention.default and n.kwargs.get("key_padding_mask") is not None]
        assert masked
        torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
    finally:
        vdit_accel.unpatch(tr)
        torch._dynamo.reset()


@pytest.mark.parametrize("video", [(3, 4, 4), (3, 3, 3)])  # the video ending on a block boundary and inside one
def test_truncated_block_mask_is_the_mask_of_the_shorter_text(video):
    """The forward grid's mask restricted to n tokens equals the mask compiled for text of n - video_len
    tokens, for every n with at least one text token."""
    strategy = Strategy.uniform("window3d:t=0,h=1,w=0")
    full = VideoGrid(*video, text_len=21, text_at="suffix")
    plan = compile_layer_plan(strategy, 0, 3, full, (0, 3), 16, "cpu")
    for n in range(full.video_len + 1, full.seq_len + 1):
        grid = VideoGrid(*video, text_len=n - full.video_len, text_at="suffix")
        want = compile_layer_plan(strategy, 0, 3, grid, (0, 3), 16, "cpu").block_mask()
        num, idx = truncate_block_mask(plan.kv_num_blocks, plan.kv_indices, n, 16, 16)
        from vdit_accel.block_mask import BlockMask

        got = BlockMask(num, idx, n, 16, 16)
        assert torch.equal(got.to_dense(), want.to_dense()), n


@pytest.mark.parametrize("first", ["vdit_accel", "diffusers"])
def test_diffusers_attn_backend_env_selects_vdit(first):
    """DIFFUSERS_ATTN_BACKEND=vdit: with vdit_accel imported before diffusers' models, diffusers imports and
    its default backend is ours (a dispatch without a backend reaches us)."""
    res = _python(f"""
        import {first}
        import vdit_accel
        import torch
        from diffusers.models import attention_dispatch as ad
        from vdit_accel.pipelines import backend
        calls = []
        run_dense = backend.run_dense
        backend.run_dense = lambda *a, **k: calls.append(1) or run_dense(*a, **k)
        q, k, v = (torch.randn(1, 20, 2, 16) for _ in range(3))
        out = ad.dispatch_attention_fn(q, k, v)
        ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        print("ACTIVE", ad._AttentionBackendRegistry._active_backend.value, len(calls),
              (out - ref.transpose(1, 2)).abs().max().item())
    """, DIFFUSERS_ATTN_BACKEND="vdit")
    assert res.returncode == 0, res.stderr[-3000:]
    _, name, calls, diff = res.stdout.split()[-4:]
    assert (name, calls) == ("vdit", "1") and float(diff) < 1e-5


def test_attention_op_with_key_padding_mask_checks():
    """The op given a key-padding mask: PyTorch's custom-op checks, and each sample's valid rows equal our
    attention over its valid prefix with the block mask restricted to it."""
    from vdit_accel.block_mask import BlockMask
    from vdit_accel.pipelines.op import vdit_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 37, 2, 16) for _ in range(3))
    bm = BlockMask.from_dense(torch.rand(1, 2, 3, 3) < 0.6, 37, 16, 16)
    mask = (torch.arange(37)[None] < torch.tensor([29, 37])[:, None])[:, None, None, :]
    args = (q, k, v, bm.kv_num_blocks, bm.kv_indices, 16, 16)
    torch.library.opcheck(vdit_attention, args, {"scale": 0.3, "key_padding_mask": mask})
    out = vdit_attention(*args, scale=0.3, key_padding_mask=mask)
    num, idx = truncate_block_mask(bm.kv_num_blocks, bm.kv_indices, 29, 16, 16)
    want = vdit_accel.attention(q[:1, :29], k[:1, :29], v[:1, :29], BlockMask(num, idx, 29, 16, 16), scale=0.3)
    assert torch.equal(out[:1, :29], want)
    assert torch.equal(out[1:], vdit_accel.attention(q[1:], k[1:], v[1:], bm, scale=0.3))
    with pytest.raises(ValueError, match="without token orders"):
        vdit_attention(*args, q_index=torch.zeros(1, 2, 37, dtype=torch.int32), key_padding_mask=mask)
