"""Strategy files, version 3: a pattern per step range (phases) and per-layer dense warm-ups; what the
runtime does at each step."""

import json

import pytest
import torch

import vdit_accel
from vdit_accel import Strategy
from vdit_accel.patterns import DENSE, parse_pattern
from vdit_accel.strategy import HeadSpec, Phase

W3 = "window3d:t=0,h=1,w=1"
W1 = "window1d:frames=0.5"


def _scheduled(num_layers=4, num_heads=4):
    early = [[HeadSpec(W3)] * num_heads for _ in range(num_layers)]
    late = [[HeadSpec(W1), HeadSpec("skip"), HeadSpec(W3, order="tiled"), HeadSpec(DENSE)]] * num_layers
    stats = [[{"error": 0.01, "density": 0.3}] * num_heads] * num_layers
    return Strategy(layers=early, head_stats=stats, dense_warmup_steps=1, layer_warmup_steps=(3, 1, 1, 9),
                    phases=(Phase(2, layers=late, head_stats=stats),), model={"class": "WanTransformer3DModel"})


def test_schedule_semantics():
    st = _scheduled()
    assert st.stage_starts == (1, 2, 3, 9)
    assert [st.stage_at(s) for s in range(10)] == [0, 1, 2, 3, 3, 3, 3, 3, 3, 4]
    dense = tuple(HeadSpec(DENSE) for _ in range(4))
    assert st.heads_at(1, 4, 0) == dense  # the global warm-up
    assert st.heads_at(1, 4, 1) == st.layers[1]  # first range
    assert st.heads_at(1, 4, 2) == st.phases[0].layers[1]  # second range
    assert st.heads_at(0, 4, 2) == dense and st.heads_at(0, 4, 3) == st.phases[0].layers[0]  # layer 0's own warm-up
    assert st.heads_at(3, 4, 8) == dense and st.heads_at(3, 4, 9) == st.phases[0].layers[3]
    assert st.stage_heads(1, 4, 2) == st.phases[0].layers[1]
    assert st.dense_throughout(1) and not st.dense_throughout(2)
    assert "runs dense throughout" in st.describe(num_steps=1)
    assert "from step 2" in st.describe() and "layer_warmup_steps=[3, 1, 1, 9]" in st.describe()
    # Warm-up heads keep their quantization mode (only the pattern and order become dense).
    q = Strategy.uniform(W3, quant="fp8", dense_warmup_steps=2)
    assert q.heads_at(0, 2, 0) == (HeadSpec(DENSE, quant="fp8"),) * 2


def test_version_3_round_trip_and_lower_versions(tmp_path):
    st = _scheduled()
    path = tmp_path / "s.json"
    st.save(path)
    doc = json.loads(path.read_text())
    assert doc["version"] == 3 and doc["layer_warmup_steps"] == [3, 1, 1, 9] and doc["phases"][0]["from_step"] == 2
    assert doc["phases"][0]["layers"][0]["heads"][2] == {"pattern": W3, "order": "tiled", "error": 0.01, "density": 0.3}
    back = Strategy.load(path)
    assert back == st and back.phases[0].head_stats == st.phases[0].head_stats
    plain = Strategy.uniform(W3, dense_warmup_steps=2)
    plain.save(path)
    assert json.loads(path.read_text())["version"] == 2  # what version-2 readers can still read
    uniform_phase = Strategy(default=HeadSpec(W3), phases=(Phase(5, W1),))
    uniform_phase.save(path)
    assert Strategy.load(path).phases[0].default == HeadSpec(W1)


@pytest.mark.parametrize("doc,match", [
    ({"version": 2, "phases": []}, r"version 2\) has unknown keys \['phases'\]"),
    ({"version": 3, "phases": [{"from_step": 0}]}, "from_step must be an int >= 1"),
    ({"version": 3, "phases": [{"from_step": 4}, {"from_step": 2}]}, "strictly ascending"),
    ({"version": 3, "phases": [{"from_step": 2, "step": 1}]}, "must have 'from_step'"),
    ({"version": 3, "layer_warmup_steps": [1, -1]}, "ints >= 0"),
    ({"version": 3, "layer_warmup_steps": [1, 2], "layers": [{"heads": [{"pattern": "dense"}]}] * 3}, "lists 2 layers"),
    ({"version": 3, "layers": [{"heads": [{"pattern": "dense"}]}] * 3,
      "phases": [{"from_step": 2, "layers": [{"heads": [{"pattern": "dense"}]}] * 2}]}, "num_layers=3 but phase"),
    ({"version": 3, "phases": [{"from_step": 2, "default": {"pattern": "window3d:t=1"}}]}, r"phases\[0\].default"),
])
def test_version_3_validation(doc, match):
    with pytest.raises(ValueError, match=match):
        Strategy.from_dict({"format": "vdit-accel-strategy", **doc})


def test_runtime_follows_the_schedule():
    """Patched, every layer's plan at every step is the strategy's heads at that step (per-layer warm-ups,
    the late range's patterns, a layer dense throughout)."""
    from vdit_accel.patterns import build_block_mask_for_pattern
    from vdit_accel.pipelines import build_tiny_pipeline, patch_state

    pipe = build_tiny_pipeline("wan", seed=0)
    st = _scheduled()
    seen: dict[tuple[int, int], float] = {}
    vdit_accel.patch(pipe, st, block_size=32)
    state = patch_state(pipe.transformer)
    def record(mod, args, layer):
        seen.setdefault((state.step, layer), mod.processor._vdit_plan.density())

    hooks = [attn.register_forward_pre_hook(lambda mod, args, layer=i: record(mod, args, layer))
             for i, (_, attn) in enumerate(state.layers)]
    try:
        pipe(prompt="a red circle", height=128, width=128, num_frames=9, num_inference_steps=5, max_sequence_length=16,
             output_type="latent", guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
        grid = state.grid
    finally:
        for h in hooks:
            h.remove()
        vdit_accel.unpatch(pipe)

    def density(specs):
        masks = [build_block_mask_for_pattern(h.pattern, grid, 32, 32).float().mean() if h.order is None
                 else _tiled_density(h.pattern, grid) for h in specs]
        return float(sum(masks) / len(masks))

    for (step, layer), d in sorted(seen.items()):
        assert d == pytest.approx(density(st.heads_at(layer, 4, step)), abs=1e-6), (step, layer)
    assert seen[(0, 1)] == 1.0 and seen[(1, 1)] < 1.0 and seen[(1, 0)] == 1.0 and seen[(4, 3)] == 1.0
    assert seen[(1, 1)] != seen[(2, 1)]  # the late range's patterns differ from the early ones


def _tiled_density(p, grid):
    from vdit_accel.orders.spec import Tiled
    from vdit_accel.orders.static import block_mask_for_order, static_order

    return block_mask_for_order(parse_pattern(p), grid, static_order(Tiled(), grid, 32), 32, 32).float().mean()
