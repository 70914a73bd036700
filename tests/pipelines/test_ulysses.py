"""diffusers' Ulysses context parallelism with the "vdit" backend: per-head strategies index global heads."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

import vdit_accel
from vdit_accel import Strategy, VideoGrid
from vdit_accel.patterns import build_block_mask
from vdit_accel.pipelines import build_tiny_pipeline, patch_state
from vdit_accel.pipelines.backend import _ulysses_forward_op, _vdit_backend, local_heads, running
from vdit_accel.pipelines.op import vdit_attention

WORKER = Path(__file__).with_name("ulysses_worker.py")
PER_HEAD = ["dense", "window3d:t=0,h=1,w=1", "window3d:t=0,h=8,w=8", "window3d:t=1,h=1,w=1"]


def _ulysses(degree: int, rank: int):
    cp = SimpleNamespace(ulysses_degree=degree, ring_degree=1, ulysses_anything=False, _ulysses_local_rank=rank)
    return SimpleNamespace(context_parallel_config=cp)


def _two_ranks(worker: Path, out: Path):
    """``worker``'s outputs from 2 CPU processes (gloo), or a skip where gloo is missing."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(worker), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _two_ranks(WORKER, tmp_path_factory.mktemp("ulysses") / "out.pt")


def _diff(res, a, b):
    return (res[a] - res[b]).abs().max().item()


def test_ulysses_p2_dense_matches_single_process(two_ranks):
    assert two_ranks["world"] == 2 and two_ranks["device"] == "cpu"
    assert _diff(two_ranks, "dense", "base") <= 1e-4
    assert _diff(two_ranks, "cp_dense", "base") <= 1e-4  # patched, then enable_parallelism accepted "vdit"
    assert _diff(two_ranks, "cp_unpatched", "base") <= 1e-4  # unpatch keeps the parallel config
    assert _diff(two_ranks, "cp_backend_only", "base") <= 1e-4  # set_attention_backend("vdit"), no patch


def test_ulysses_p2_per_head_strategy_indexes_global_heads(two_ranks):
    assert _diff(two_ranks, "per_head", "dense") > 1e-3  # the strategy is sparse enough to matter
    # Local-head indexing (rank 1 applying heads 0-1's patterns to heads 2-3) would give this instead:
    assert _diff(two_ranks, "per_head", "local_indexed") > 1e-3
    assert _diff(two_ranks, "cp_per_head", "per_head") <= 1e-4
    assert _diff(two_ranks, "cp_per_head_patched_after", "per_head") <= 1e-4


def test_local_heads():
    assert local_heads(None, 4) is None
    assert local_heads(_ulysses(2, 0), 4) == (0, 2)
    assert local_heads(_ulysses(2, 1), 4) == (2, 4)
    assert local_heads(_ulysses(4, 3), 8) == (6, 8)
    with pytest.raises(ValueError, match="does not divide"):
        local_heads(_ulysses(3, 0), 4)


def test_head_slice_with_mocked_parallel_config():
    """No processes: a processor given a Ulysses config (rank 1 of 2) gets the plan of global heads 2-3,
    and the templated forward op (what runs after the all-to-all) attends them with it."""
    tr = build_tiny_pipeline("wan", seed=0).transformer
    vdit_accel.patch(tr, Strategy(layers=[PER_HEAD] * 4), block_size=32)
    try:
        state = patch_state(tr)
        grid = VideoGrid(3, 8, 8)
        state.grid, state._forward_seen = grid, True
        proc = state.processors[1]
        proc._parallel_config = _ulysses(2, 1)
        state._prepare(torch.device("cpu"))
        assert proc._vdit_plan.heads == (2, 4) and state.processors[0]._vdit_plan.heads == (0, 4)
        full = build_block_mask([state.strategy.layers[1][h].pattern for h in range(4)], grid, 32, 32)
        local = full.head_slice(2, 4)
        assert torch.equal(proc._vdit_plan.kv_num_blocks, local.kv_num_blocks)
        assert torch.equal(proc._vdit_plan.kv_indices, local.kv_indices)

        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, grid.seq_len, 4, 64, generator=g) for _ in range(3))
        want = vdit_attention(q, k, v, full.kv_num_blocks, full.kv_indices, 32, 32)[:, :, 2:]
        with running(proc):
            got = _ulysses_forward_op(None, q[:, :, 2:], k[:, :, 2:], v[:, :, 2:], _parallel_config=proc._parallel_config)
            # A call the pre-hook did not prepare (no plan) looks the global heads' plan up itself.
            proc._vdit_plan = None
            looked_up = _ulysses_forward_op(None, q[:, :, 2:], k[:, :, 2:], v[:, :, 2:],
                                            _parallel_config=proc._parallel_config)
        assert torch.allclose(got, want, atol=1e-5)
        assert torch.allclose(looked_up, want, atol=1e-5)
        wrong = vdit_attention(q, k, v, full.kv_num_blocks, full.kv_indices, 32, 32)[:, :, :2]
        assert not torch.allclose(got, wrong, atol=1e-3)
    finally:
        vdit_accel.unpatch(tr)


def test_ring_and_ulysses_anything_are_refused():
    from diffusers import ContextParallelConfig
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    assert _AttentionBackendRegistry._is_context_parallel_available(AttentionBackendName("vdit"))
    q = torch.randn(1, 8, 2, 16)
    ring = SimpleNamespace(context_parallel_config=ContextParallelConfig(ring_degree=2))
    with pytest.raises(NotImplementedError, match="ring attention"):
        _vdit_backend(q, q, q, _parallel_config=ring)
    anything = SimpleNamespace(context_parallel_config=ContextParallelConfig(ulysses_degree=2, ulysses_anything=True))
    with pytest.raises(NotImplementedError, match="ulysses_anything"):
        _vdit_backend(q, q, q, _parallel_config=anything)


# -- whole pipelines under enable_ulysses -----------------------------------------------------------

PIPELINE_WORKER = Path(__file__).with_name("ulysses_pipeline_worker.py")


@pytest.fixture(scope="module")
def pipelines_two_ranks(tmp_path_factory):
    return _two_ranks(PIPELINE_WORKER, tmp_path_factory.mktemp("ulysses-pipelines") / "out.pt")


@pytest.mark.parametrize("family", ["wan", "hunyuan_video"])
@pytest.mark.parametrize("batch", [1, 2])
def test_pipeline_under_ulysses_matches_one_process(pipelines_two_ranks, family, batch):
    """Point 3 of issue 24 on the CPU (float32): 2 ranks give one process's latents, unpatched (diffusers'
    attention; HunyuanVideo through our plan), dense and per-head sparse in the tiled order with a dense
    warm-up step; with padded text (HunyuanVideo; batch 2 of two prompt lengths)."""
    res = pipelines_two_ranks
    assert res["world"] == 2 and res["device"] == "cpu"
    for name in ("unpatched", "dense", "per_head_tiled_warmup"):
        (one, one_calls), (two, two_calls) = res[(family, name, batch, 1)], res[(family, name, batch, 2)]
        assert one.shape[0] == batch and one_calls == 0 and two_calls > 0, (name, one.shape, one_calls, two_calls)
        assert (one - two).abs().max().item() <= 1e-4 * one.abs().max().item(), name
    dense, sparse = res[(family, "dense", batch, 1)][0], res[(family, "per_head_tiled_warmup", batch, 1)][0]
    assert (dense - sparse).abs().max().item() > 1e-3  # the strategy changes the output: it was applied


def test_check_ulysses_refuses_before_work():
    from vdit_accel.pipelines.parallel import check_ulysses, enable_ulysses, ulysses_classes

    assert ulysses_classes() == ("WanTransformer3DModel", "HunyuanVideoTransformer3DModel")
    for family in ("cogvideox", "mochi", "skyreels_v2", "hunyuan_video_1_5", "ltx"):
        tr = build_tiny_pipeline(family).transformer
        with pytest.raises(NotImplementedError, match=f"not supported for {type(tr).__name__}.*run it on one GPU"):
            enable_ulysses(tr, 2)  # refused before torch.distributed is even asked for
    wan = build_tiny_pipeline("wan").transformer  # 4 heads
    check_ulysses(wan, 4, video_tokens=720)
    with pytest.raises(ValueError, match="does not divide WanTransformer3DModel's 4 attention heads.*2, 4"):
        check_ulysses(wan, 3)
    with pytest.raises(ValueError, match="does not divide the 718 video tokens"):
        check_ulysses(wan, 4, video_tokens=718)
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        enable_ulysses(wan, 2)
    hunyuan = build_tiny_pipeline("hunyuan_video").transformer
    hunyuan.register_to_config(image_condition_type="token_replace")
    with pytest.raises(NotImplementedError, match="token_replace"):
        check_ulysses(hunyuan, 2)
