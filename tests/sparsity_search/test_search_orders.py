"""Token orders as a per-head choice of the search: (pattern, order) columns, measured densities, the
strategy it writes."""

import pytest
import torch

import vdit_accel
from vdit_accel import Strategy, VideoGrid
from vdit_accel.orders import Tiled, format_order
from vdit_accel.patterns import DENSE
from vdit_accel.sparsity_search import HeadProfiler, SearchConfig, candidate_patterns, search
from vdit_accel.sparsity_search.solver import solve_per_head
from vdit_accel.sparsity_search.synthetic import clustered_head, planted_head


def test_clustered_heads_get_the_semantic_order_local_heads_do_not():
    grid, block = VideoGrid(4, 8, 16), 16
    g = torch.Generator().manual_seed(0)
    heads = []
    for n in (8, 16):  # scattered semantic groups: no pattern catches them
        q, k = clustered_head(grid, n, "scattered", 12.0, 32, g)
        heads.append((q, k, torch.randn(q.shape, generator=g)))
    for r in (dict(t=0, h=1, w=2), dict(t=1, h=1, w=1), dict(t=1, h=2, w=4)):
        heads.append(planted_head("window3d", grid, 32, g, **r))
    q, k, v = (torch.stack([hd[i] for hd in heads], 1)[None] for i in range(3))
    prof = HeadProfiler(candidate_patterns(grid), block_size=block, sample_blocks=8, mass_stride=2,
                        orders=["raster", "tiled", "semantic:top_p=0.95"])
    prof.observe(0, 0, grid, q, k, v)
    cols = prof.columns()
    assert len(cols) == 2 * len(prof.candidates) + 1 and cols[-1][0] == DENSE
    rep, static_density = prof.column_info(grid)
    st = prof.merged()[0]
    measured = st.mean_density()
    # Static columns: the mask's density, the same for every head; the semantic column: per head.
    assert torch.allclose(measured[:, :-1], static_density[:-1].double().expand(5, -1))
    assert static_density[-1].isnan() and (measured[:, -1] < 0.5).all()
    err = st.error([i for i, (p, _) in enumerate(cols) if p.kind == "skip"])
    density = torch.where(static_density.isnan(), measured, static_density.double())
    chosen = [cols[rep[c]] for c in solve_per_head(err, density, 0.1).tolist()]
    kinds = [(p.kind, format_order(o).split(":")[0]) for p, o in chosen]
    assert kinds[:2] == [("dense", "semantic")] * 2, kinds
    assert all(o != "semantic" and p == "window3d" for p, o in kinds[2:]), kinds


def test_search_writes_orders_that_patch_applies(tmp_path):
    from vdit_accel.pipelines import build_tiny_pipeline

    pipe = build_tiny_pipeline("wan", seed=0)
    call = dict(height=128, width=128, num_frames=9, num_inference_steps=2, max_sequence_length=16, output_type="latent",
                guidance_scale=1.0)
    cfg = SearchConfig(block_size=32, steps=[1], budget=0.2, sample_blocks=2, mode="per_head",
                       orders=("raster", "tiled", "semantic:top_p=0.9"))
    found = search(pipe, ["a red circle moving left"], cfg, call_kwargs=call, progress=lambda m: None)
    assert found.search["orders"] == ["raster", "tiled", "semantic:top_p=0.9"]
    path = tmp_path / "s.json"
    found.save(path)
    loaded = Strategy.load(path)
    assert loaded.layers == found.layers and loaded.default == found.default
    for layer in range(4):
        for h in loaded.layer_heads(layer, 4):
            assert h.order is None or h.order == Tiled() or h.pattern == DENSE
    vdit_accel.patch(pipe, loaded, block_size=32)
    try:
        out = pipe(prompt="a blue square", **call, generator=torch.Generator().manual_seed(0)).frames
    finally:
        vdit_accel.unpatch(pipe)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="need a static order"):
        SearchConfig(orders=("semantic",))


def test_order_overhead_is_charged_in_density_units():
    """Dynamic orders pay their plan and moves: more at refresh 1 than at 8, less at longer sequences
    (O(S) against attention's O(S^2)), nothing for static orders."""
    from vdit_accel.orders import order_overhead

    assert order_overhead(None, 32760) == order_overhead("tiled", 32760) == 0.0
    one, eight = order_overhead("semantic", 32760), order_overhead("semantic:refresh=8", 32760)
    assert 0.015 < one < 0.04 and 0.005 < eight < 0.015 and eight < one
    assert order_overhead("semantic", 75600) == pytest.approx(one * 32760 / 75600)
    assert order_overhead("segment", 32760) > one


def test_order_overhead_measured_per_gpu_and_cached(tmp_path, monkeypatch):
    """On a CUDA device the ratios are that GPU's own (measured once, then read from the cache file);
    elsewhere the documented reference ratios."""
    from vdit_accel.kernels import measurements
    from vdit_accel.orders import overhead

    monkeypatch.setenv("VDIT_AUTOTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(overhead, "_MEASURED", {})
    monkeypatch.setattr(measurements, "device_name", lambda device: "Test GPU 9000")
    calls = []
    fake = {"tokens": 1000, "semantic": (0.01, 0.02), "segment": (0.01, 0.5), "source": "measured on Test GPU 9000"}
    monkeypatch.setattr(overhead, "measure_order_overhead", lambda device: calls.append(device) or dict(fake))
    assert overhead.order_overhead("semantic:refresh=2", 2000, "cuda") == pytest.approx((0.01 + 0.02 / 2) / 2)
    assert (tmp_path / "order-overhead-test-gpu-9000.json").is_file() and len(calls) == 1
    monkeypatch.setattr(overhead, "_MEASURED", {})  # a new process: read back, not measured again
    assert overhead.order_overhead("segment", 1000, "cuda") == pytest.approx(0.51) and len(calls) == 1
    assert overhead.overhead_table("cpu") is overhead.REFERENCE and overhead.overhead_table(None) is overhead.REFERENCE


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_order_overhead_measurement_on_the_gpu():
    from vdit_accel.orders.overhead import measure_order_overhead

    doc = measure_order_overhead("cuda", reps=5)
    assert doc["tokens"] == 32760 and all(0 < x < 1 for kind in ("semantic", "segment") for x in doc[kind])
