"""The fused Q/K norm + RoPE prologue (kernels/rope.py, pipelines/prologue.py) against diffusers' eager one."""

import os

import pytest
import torch

import vdit_accel
from vdit_accel.kernels.rope import qk_norm_rope
from vdit_accel.pipelines import build_tiny_pipeline

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs TRITON_INTERPRET=1 from the start (tests/conftest.py sets it)")


def _eager(x, norm, heads, cos, sin):
    """diffusers 0.42 WanAttnProcessor's prologue for one of q / k."""
    if norm is not None:
        x = norm(x)
    x = x.unflatten(2, (heads, -1))
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out.type_as(x)


def _norm(c, dtype, eps, g):
    n = torch.nn.RMSNorm(c, eps=eps).to(dtype)
    with torch.no_grad():
        n.weight.copy_(torch.rand(c, generator=g) + 0.5)
    return n


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("table_dtype", [torch.float64, torch.float32])
def test_equals_eager_at_odd_sizes(dtype, table_dtype):
    g = torch.Generator().manual_seed(1)
    B, S, H, D = 2, 37, 3, 24  # D not a power of two: masked channels
    qkv = (torch.randn(B, S, 3 * H * D, generator=g) * 2).to(dtype)
    q, k, _ = qkv.chunk(3, dim=-1)  # fused-projection strides, read in place
    nq, nk = _norm(H * D, dtype, 1e-6, g), _norm(H * D, dtype, 1e-5, g)
    cos = torch.randn(B, S, 1, D, generator=g).to(table_dtype)  # per-sample tables
    sin = torch.randn(B, S, 1, D, generator=g).to(table_dtype)
    with torch.no_grad():
        ref_q, ref_k = _eager(q, nq, H, cos, sin), _eager(k, nk, H, cos, sin)
    out_q, out_k = qk_norm_rope(q, k, H, cos, sin, nq.weight, nk.weight, 1e-6, 1e-5)
    assert out_q.shape == (B, S, H, D) and out_q.is_contiguous() and out_q.dtype == dtype
    for out, ref in ((out_q, ref_q), (out_k, ref_k)):
        if dtype == torch.float16:  # same roundings; the sum of squares may differ in its last bit
            assert (out != ref).float().mean().item() < 0.01
            assert (out.float() - ref.float()).abs().max().item() <= 2 ** -6 * ref.float().abs().max().item()
        else:
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_rope_only_and_shared_2d_tables():
    g = torch.Generator().manual_seed(2)
    B, S, H, D = 1, 19, 2, 16
    q, k = torch.randn(B, S, H * D, generator=g), torch.randn(B, S, H * D, generator=g)
    cos, sin = torch.randn(S, D, generator=g), torch.randn(S, D, generator=g)
    out_q, out_k = qk_norm_rope(q, k, H, cos, sin)
    c4, s4 = cos[None, :, None], sin[None, :, None]
    torch.testing.assert_close(out_q, _eager(q, None, H, c4, s4), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_k, _eager(k, None, H, c4, s4), rtol=1e-6, atol=1e-6)


def test_errors():
    q = torch.randn(1, 8, 32)
    cos = torch.randn(1, 8, 1, 16)
    with pytest.raises(ValueError, match="heads"):
        qk_norm_rope(q, q, 3, cos, cos)
    with pytest.raises(ValueError, match="odd"):
        qk_norm_rope(torch.randn(1, 8, 30), torch.randn(1, 8, 30), 2, torch.randn(8, 15), torch.randn(8, 15))
    with pytest.raises(ValueError, match="does not fit"):
        qk_norm_rope(q, q, 2, torch.randn(1, 9, 1, 16), torch.randn(1, 9, 1, 16))
    with pytest.raises(ValueError, match="both norm weights"):
        qk_norm_rope(q, q, 2, cos, cos, torch.ones(32), None)
    with pytest.raises(ValueError, match="float32 or float64"):
        qk_norm_rope(q, q, 2, cos.half(), cos.half())


def test_patched_wan_uses_it_and_matches_the_eager_prologue(monkeypatch):
    """A patched tiny Wan transformer (attention through the interpreted kernel) gives the same output
    with the fused prologue as with the processor's own; every self-attention call took the fused path,
    cross-attention never did; fused_prologue=False and the CPU without VDIT_CPU_TRITON keep the eager one."""
    import vdit_accel.kernels.rope as rope

    tr = build_tiny_pipeline("wan").transformer
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 3, 6, 10, generator=g)
    t = torch.tensor([500])
    enc = torch.randn(1, 8, tr.config.text_dim, generator=g)
    calls = []
    real = rope.qk_norm_rope
    monkeypatch.setattr(rope, "qk_norm_rope", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))

    def run(**kw):
        vdit_accel.patch(tr, "dense", **kw)
        try:
            with torch.no_grad():
                return tr(x, t, enc, return_dict=False)[0]
        finally:
            vdit_accel.unpatch(tr)

    cpu = run()  # CPU, no VDIT_CPU_TRITON: eager prologue, reference attention
    assert calls == []
    monkeypatch.setenv("VDIT_CPU_TRITON", "1")
    eager = run(fused_prologue=False)
    assert calls == []
    fused = run()
    assert len(calls) == len(tr.blocks) and all(s == (1, 45, tr.config.num_attention_heads * 64) for s in calls)
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused, cpu, rtol=1e-3, atol=1e-3)


def test_half_precision_pipelines_keep_fp32_tables_and_take_it(monkeypatch):
    """build_tiny_pipeline(dtype=) leaves the models as from_pretrained(torch_dtype=) would (each model's
    _keep_in_fp32_modules in float32: Wan's rotary tables among them), so a half-precision Wan takes the
    fused prologue (a plain pipe.to(dtype) rounded the tables, and every call fell back)."""
    import vdit_accel.kernels.rope as rope

    pipe = build_tiny_pipeline("wan", dtype=torch.float16)
    tr = pipe.transformer
    assert tr.rope.freqs_cos.dtype == tr.rope.freqs_sin.dtype == torch.float32
    assert tr.scale_shift_table.dtype == torch.float32 and tr.blocks[0].attn1.to_q.weight.dtype == torch.float16
    assert pipe.text_encoder.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32  # UMT5's "wo"
    assert pipe.vae.dtype == torch.float16
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 3, 6, 10, generator=g).half()
    enc = torch.randn(1, 8, tr.config.text_dim, generator=g).half()
    calls = []
    real = rope.qk_norm_rope
    monkeypatch.setattr(rope, "qk_norm_rope", lambda *a, **kw: calls.append(a[0].dtype) or real(*a, **kw))
    monkeypatch.setenv("VDIT_CPU_TRITON", "1")
    vdit_accel.patch(tr, "dense")
    try:
        with torch.no_grad():
            out = tr(x, torch.tensor([500]), enc, return_dict=False)[0]
    finally:
        vdit_accel.unpatch(tr)
    assert calls == [torch.float16] * len(tr.blocks) and torch.isfinite(out).all()


def test_skyreels_v2_pipeline_uses_it(monkeypatch):
    """SkyReels-V2's processor has the same prologue: its tiny pipeline (one step, attention through the
    interpreted kernel) gives the same video with the fused prologue as with its own."""
    import vdit_accel.kernels.rope as rope
    from vdit_accel.pipelines import tiny_defaults

    pipe = build_tiny_pipeline("skyreels_v2")
    d = tiny_defaults("skyreels_v2")
    call = dict(prompt="a red circle moving left", height=64, width=64, num_frames=9, num_inference_steps=1,
                output_type="pt", **d.call_kwargs)
    if d.max_sequence_length:
        call["max_sequence_length"] = d.max_sequence_length
    calls = []
    real = rope.qk_norm_rope
    monkeypatch.setattr(rope, "qk_norm_rope", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setenv("VDIT_CPU_TRITON", "1")
    videos = []
    for fused in (False, True):
        vdit_accel.patch(pipe, "dense", fused_prologue=fused)
        try:
            videos.append(pipe(**call, generator=torch.Generator().manual_seed(0)).frames[0])
        finally:
            vdit_accel.unpatch(pipe)
        assert bool(calls) == fused
    torch.testing.assert_close(videos[1], videos[0], rtol=1e-4, atol=1e-4)


def test_tables_it_does_not_take_fall_back_to_the_processor(monkeypatch, caplog):
    """Rotary tables of another dtype (here float16) are not the kernel's: the processor's own prologue
    runs, with one warning, and the output is the eager one."""
    import vdit_accel.kernels.rope as rope

    tr = build_tiny_pipeline("wan").transformer
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 16, 3, 6, 10, generator=g), torch.tensor([500])
    enc = torch.randn(1, 8, tr.config.text_dim, generator=g)
    hook = tr.rope.register_forward_hook(lambda m, a, out: tuple(o.half() for o in out))
    calls = []
    real = rope.qk_norm_rope
    monkeypatch.setattr(rope, "qk_norm_rope", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setenv("VDIT_CPU_TRITON", "1")
    outs = []
    try:
        for fused in (False, True):
            vdit_accel.patch(tr, "dense", fused_prologue=fused)
            try:
                with torch.no_grad(), caplog.at_level("WARNING", logger="vdit_accel"):
                    outs.append(tr(x, t, enc, return_dict=False)[0])
            finally:
                vdit_accel.unpatch(tr)
    finally:
        hook.remove()
    assert calls == [] and torch.equal(outs[0], outs[1])
    assert "rotary tables" in caplog.text
