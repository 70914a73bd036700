"""torch.compile of a patched transformer: one graph for all layers (whole model and
``compile_repeated_blocks``), each layer's own block mask honoured (a layer plan's tensors are graph
inputs through the ``vdit::attention`` custom op), output equal to eager, no recompile across calls or
layers."""

import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import vdit_accel
from vdit_accel import Strategy
from vdit_accel.pipelines import build_tiny_pipeline, patch_state
from vdit_accel.pipelines.op import vdit_attention

# A different sparse pattern in every layer (and per head in the last), one mask shape for all: on the
# (3, 4, 4) grid in blocks of 16 tokens (one frame each) kv_indices is [1, 4, 3, 3] in every layer.
W0 = {"kind": "window3d", "t": 0, "h": 0, "w": 0}
W1 = {"kind": "window3d", "t": 1, "h": 0, "w": 0}
S0 = {"kind": "stripes", "frames": [0]}
FP = {"kind": "frame_periodic", "h": 0, "w": 0, "every": 2}
PER_LAYER = [[W0] * 4, [W1] * 4, [S0] * 4, [W0, S0, {"kind": "skip"}, FP]]
MODEL = {"class": "WanTransformer3DModel", "head_dim": 64}


@pytest.fixture(scope="module")
def wan():
    return build_tiny_pipeline("wan", seed=0).transformer


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(t=900.0):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 16, 3, 8, 8, generator=g), torch.tensor([t]), torch.randn(1, 16, 32, generator=g))


def _fwd(model, x, t, enc):
    return model(x, t, enc, return_dict=False)[0]


def _patched(wan, strategy):
    tr = copy.deepcopy(wan)
    vdit_accel.patch(tr, strategy, block_size=16)
    return tr


def _op_nodes(graphs):
    return sum(n.target is torch.ops.vdit.attention.default for g in graphs for n in g.graph.nodes)


def _check_masks_differ_per_layer(tr):
    masks = [(p._vdit_plan.kv_num_blocks, p._vdit_plan.kv_indices) for p in patch_state(tr).processors]
    assert all(m[0] is not None and m[0].shape == (1, 4, 3) and m[1].shape == (1, 4, 3, 3) for m in masks)
    assert len({(tuple(n.flatten().tolist()), tuple(i.flatten().tolist())) for n, i in masks}) == 4


@pytest.mark.parametrize("where, backend", [("blocks", "inductor"), ("whole", "aot_eager")])
def test_compile_once_for_all_layers(wan, where, backend):
    tr = _patched(wan, Strategy(layers=PER_LAYER, model=MODEL))
    x, t, enc = _inputs()
    eager = _fwd(tr, x, t, enc)
    _check_masks_differ_per_layer(tr)
    with torch.no_grad():
        dense = _fwd(wan, x, t, enc)
    uniform = _fwd(_patched(wan, Strategy(default=W0)), x, t, enc)
    assert (eager - dense).abs().max() > 1e-2 and (eager - uniform).abs().max() > 1e-2

    counter = CompileCounterWithBackend(backend)
    if where == "blocks":
        tr.compile_repeated_blocks(backend=counter, fullgraph=True)
        model = tr
    else:
        model = torch.compile(tr, backend=counter)
    for _ in range(2):
        out = _fwd(model, x, t, enc)
        assert (out - eager).abs().max().item() <= 1e-4 * eager.abs().max().item()
    assert counter.frame_count == 1, f"{counter.frame_count} graphs compiled"
    # The attention is in the graph: once per block graph, once per layer in the whole-model graph.
    assert _op_nodes(counter.graphs) == (1 if where == "blocks" else 4)


def test_compile_dense_warmup_then_sparse(wan):
    """Dense warm-up steps and sparse steps are two variants of the block (masks None vs tensors): two
    graphs, compiled on the first step of each, then reused."""
    tr = _patched(wan, Strategy(layers=PER_LAYER, model=MODEL, dense_warmup_steps=1))
    steps = [_inputs(t) for t in (900.0, 800.0, 700.0)]
    eager = [_fwd(tr, *a) for a in steps]
    patch_state(tr).reset()
    counter = CompileCounterWithBackend("aot_eager")
    tr.compile_repeated_blocks(backend=counter, fullgraph=True)
    counts = []
    for a, want in zip(steps, eager):
        assert torch.allclose(_fwd(tr, *a), want, atol=1e-5, rtol=0)
        counts.append(counter.frame_count)
    assert counts == [1, 2, 2]


def test_compile_with_observers(wan):
    """Observers still see every layer and step under compile (they run eagerly, between graphs)."""
    tr = _patched(wan, Strategy(layers=PER_LAYER, model=MODEL))
    x, t, enc = _inputs()
    eager = _fwd(tr, x, t, enc)
    seen = []
    patch_state(tr).observers.append(lambda layer, step, q, k, v: seen.append((layer, step, tuple(q.shape))))
    tr.compile_repeated_blocks(backend="eager")
    out = _fwd(tr, x, t, enc)
    assert torch.equal(out, eager)
    assert seen == [(layer, 0, (1, 48, 4, 64)) for layer in range(4)]


@pytest.mark.parametrize("sparse", [False, True])
def test_attention_op_checks(sparse):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 37, 2, 16) for _ in range(3))
    mask = None
    if sparse:
        from vdit_accel.block_mask import BlockMask

        mask = BlockMask.from_dense(torch.rand(1, 2, 3, 3) < 0.6, 37, 16, 16)
    args = (q, k, v, *((mask.kv_num_blocks, mask.kv_indices) if sparse else (None, None)), 16, 16)
    torch.library.opcheck(vdit_attention, args, {"scale": 0.3})
    assert torch.equal(vdit_attention(*args, scale=0.3), vdit_accel.attention(q, k, v, mask, scale=0.3))
    with pytest.raises(ValueError, match="together"):
        vdit_attention(q, k, v, None, torch.zeros(1, 2, 3, 3, dtype=torch.int32), 16, 16)


def test_fused_prologue_compiles_into_one_graph(wan, monkeypatch):
    """With the fused Wan prologue (kernels through the interpreter: VDIT_CPU_TRITON=1) the compiled
    model is one graph holding one opaque ``vdit::qk_norm_rope`` per layer, equal to eager."""
    monkeypatch.setenv("VDIT_CPU_TRITON", "1")
    tr = _patched(wan, "dense")
    x, t, enc = _inputs()
    with torch.no_grad():
        ref = _fwd(tr, x, t, enc)
        cnt = CompileCounterWithBackend("aot_eager")
        out = _fwd(torch.compile(tr, backend=cnt), x, t, enc)
    assert cnt.frame_count == 1
    ops = sum(n.target is torch.ops.vdit.qk_norm_rope.default for g in cnt.graphs for n in g.graph.nodes)
    assert ops == len(tr.blocks)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
