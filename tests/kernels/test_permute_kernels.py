"""The token-order kernels (kernels/permute.py) against PyTorch, on the CPU interpreter at odd sizes,
and the semantic / segment plans through them (VDIT_CPU_TRITON=1) against the PyTorch path."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from vdit_accel.orders import parse_order, plan_call  # noqa: E402
from vdit_accel.orders import semantic as P  # noqa: E402
from vdit_accel.grid import VideoGrid  # noqa: E402
from vdit_accel.block_mask import BlockMask  # noqa: E402
from vdit_accel.kernels.permute import gather_rows, kmeans_assign, kmeans_cluster_order, semantic_block_mask  # noqa: E402


@pytest.mark.parametrize("dtype,d,k", [(torch.float32, 32, 5), (torch.float16, 24, 17), (torch.float32, 64, 40)])
def test_kmeans_assign_matches_torch(dtype, d, k):
    g = torch.Generator().manual_seed(d + k)
    b, h, n = 2, 3, 203
    x = torch.randn(b, n, h, d, generator=g).to(dtype).transpose(1, 2)  # strided, as the plan passes it
    c = torch.randn(b * h, k, d, generator=g)
    labels, counts, sums = kmeans_assign(x, c, with_sums=True, rows_per_program=64, block_n=16)
    xf = x.reshape(b * h, n, d).float()
    scores = xf @ c.to(dtype).float().transpose(1, 2) - 0.5 * (c ** 2).sum(-1)[:, None]
    ref = scores.argmax(-1)
    top2 = scores.topk(2, -1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-3  # rows without a near tie (fp16 rounding order differs)
    assert torch.equal(labels.long()[clear], ref[clear]) and clear.float().mean() > 0.95
    lab = labels.long()
    cnt = torch.zeros(b * h, k).scatter_add_(1, lab, torch.ones(b * h, n))
    sm = torch.zeros(b * h, k, d).scatter_add_(1, lab[..., None].expand(-1, -1, d), xf)
    assert torch.equal(counts, cnt)
    torch.testing.assert_close(sums, sm, rtol=1e-4, atol=1e-3)
    only, counts2, none = kmeans_assign(x, c, store_labels=False)
    assert only is None and none is None and torch.equal(counts2, cnt)


@pytest.mark.parametrize("n_tensors", [1, 2, 3])
def test_gather_rows_matches_index_gather(n_tensors):
    g = torch.Generator().manual_seed(n_tensors)
    b, s, h, d = 2, 77, 3, 24
    xs = [torch.randn(b, s, h, d, generator=g).half() for _ in range(n_tensors)]
    idx = torch.stack([torch.stack([torch.randperm(s, generator=g) for _ in range(h)]) for _ in range(b)])
    for index in (idx, idx[:1]):
        ys = gather_rows(xs, index, block_s=16)
        for x, y in zip(xs, ys):
            ref = torch.stack([torch.stack([x[bi, index[min(bi, index.shape[0] - 1), hi], hi] for hi in range(h)], 1)
                               for bi in range(b)])
            assert y.is_contiguous() and torch.equal(y, ref)
    # from a strided view (q of a fused qkv projection)
    big = torch.randn(b, s, h, 3 * d, generator=g).half()
    view = big[..., d : 2 * d]
    assert torch.equal(gather_rows([view], idx)[0], gather_rows([view.contiguous()], idx)[0])


def _random_bounds(g, lead, k, grid):
    """Sorted cluster bounds ``[*lead, k + 1]`` over the video tokens: random sizes, some clusters empty."""
    w = torch.rand(*lead, k, generator=g) * (torch.rand(*lead, k, generator=g) > 0.2)
    w[..., 0] += 1e-3
    edges = (w.cumsum(-1) / w.sum(-1, keepdim=True) * grid.video_len).round().long()
    edges[..., -1] = grid.video_len
    return torch.nn.functional.pad(edges, (1, 0)) + grid.video_start


@pytest.mark.parametrize("grid,kq,kk,d,bm,bn", [
    (VideoGrid(3, 7, 11, text_len=9, text_at="prefix"), 13, 29, 24, 16, 32),
    (VideoGrid(2, 9, 13, text_len=21, text_at="suffix"), 37, 70, 40, 32, 16),
    (VideoGrid(5, 5, 7), 5, 3, 16, 16, 16),
])
def test_semantic_block_mask_kernel_matches_torch(grid, kq, kk, d, bm, bn):
    """The fused block mask equals the PyTorch path's on fresh random centroids and cluster ranges (odd
    sizes, empty clusters, text as prefix and suffix, several top_p), from both plan entry points."""
    g = torch.Generator().manual_seed(kq * kk + d)
    b, h = 2, 1
    for top_p in (0.5, 0.95, 1.0):
        plan = P.SemanticPlan(None, None, _random_bounds(g, (b, h), kq, grid), _random_bounds(g, (b, h), kk, grid),
                              torch.randn(b, h, kq, d, generator=g) * 2, torch.randn(b, h, kk, d, generator=g) * 2)
        ref = P.semantic_block_mask(plan, grid, top_p, bm, bn)
        scale = d ** -0.5
        got = semantic_block_mask(plan.q_centroids, plan.k_centroids, plan.q_bounds, plan.k_bounds, grid.seq_len,
                                  top_p, scale, bm, bn, P._text_blocks(grid, bm), P._text_blocks(grid, bn))
        assert got.dtype == torch.bool and torch.equal(got, ref), (top_p, (got != ref).sum())
        assert 0 < ref.float().mean() < (1.01 if top_p == 1.0 else 1)
        # the kernel's block lists, written by the same launch, are BlockMask.from_dense's
        got2, num, idx = semantic_block_mask(plan.q_centroids, plan.k_centroids, plan.q_bounds, plan.k_bounds,
                                             grid.seq_len, top_p, scale, bm, bn, P._text_blocks(grid, bm),
                                             P._text_blocks(grid, bn), csr=True)
        want = BlockMask.from_dense(ref, grid.seq_len, bm, bn)
        assert torch.equal(got2, ref) and torch.equal(num, want.kv_num_blocks) and torch.equal(idx, want.kv_indices)


@pytest.mark.parametrize("grid,k,iters,step", [
    (VideoGrid(3, 7, 11, text_len=9, text_at="prefix"), 13, 1, 2),
    (VideoGrid(2, 9, 13, text_len=21, text_at="suffix"), 40, 2, 1),
    (VideoGrid(5, 5, 7), 5, 0, 1),
])
def test_kmeans_cluster_order_matches_torch(grid, k, iters, step):
    """Updates, assignment and the stable counting sort across several row chunks equal the PyTorch
    path (torch.sort by label, stable; bounds from the counts; text in place) on clustered rows."""
    g = torch.Generator().manual_seed(k + iters)
    b, h, d = 2, 2, 32
    s, vs, vl = grid.seq_len, grid.video_start, grid.video_len
    centers = torch.randn(k, d, generator=g) * 4
    x = centers[torch.randint(0, k, (b, s, h), generator=g)] + 0.3 * torch.randn(b, s, h, d, generator=g)
    xv = x[:, vs : vs + vl].transpose(1, 2)
    c0 = x[:, vs : vs + k].transpose(1, 2).reshape(b * h, k, d) + 0.1
    # the previous call's statistics (sums, counts; some clusters empty): this call starts from their update
    prev_counts = torch.randint(0, 5, (b * h, k), generator=g).float()
    prev = (x[:, vs : vs + k].transpose(1, 2).reshape(b * h, k, d) * prev_counts[..., None], prev_counts)
    for stats, in_assign in ((None, True), (prev, True), (prev, False)):  # sums in the assignment, or after it
        perm, bounds, cent, (sums, counts) = kmeans_cluster_order(xv, c0, iters, step, vs, s, stats,
                                                                 rows_per_program=64, block_n=16,
                                                                 sums_in_assign=in_assign, sum_rows=48, sum_block=16)
        labels, ref_c, (ref_sums, ref_counts) = P._kmeans(xv, k, iters, c0.view(b, h, k, d),
                                                          -(-vl // step) if step > 1 else None, stats=stats)
        ref_perm = P._with_text(torch.sort(labels, dim=-1, stable=True).indices.reshape(b * h, vl) + vs, grid)
        ref_bounds = torch.nn.functional.pad(ref_counts.reshape(b * h, k).long().cumsum(-1), (1, 0)) + vs
        torch.testing.assert_close(cent, ref_c.reshape(b * h, k, d), rtol=1e-5, atol=1e-5)
        assert torch.equal(bounds, ref_bounds) and torch.equal(perm, ref_perm)
        assert torch.equal(perm.sort(-1).values, torch.arange(s).expand(b * h, s))  # a permutation
        # the returned statistics are the assignment's: each cluster's size and the sum of its rows
        assert torch.equal(counts, ref_counts.reshape(b * h, k)) and torch.equal(counts.long(), bounds.diff())
        torch.testing.assert_close(sums, ref_sums.reshape(b * h, k, d), rtol=1e-5, atol=1e-4)
    if iters == 0:  # from the statistics alone: the centroids are their Lloyd update of c0
        torch.testing.assert_close(cent, P._lloyd(c0, *prev), rtol=1e-6, atol=1e-6)


def test_buffers_need_no_zeroing(monkeypatch):
    """Every buffer the order's kernels allocate is written before it is read (the centroid launch zeroes
    the statistics): with fresh allocations full of garbage the results are the same."""
    grid = VideoGrid(3, 6, 7, text_len=5, text_at="suffix")
    g = torch.Generator().manual_seed(4)
    b, h, d, k = 1, 2, 16, 6
    x = torch.randn(b, grid.seq_len, h, d, generator=g)
    xv = x[:, : grid.video_len].transpose(1, 2)
    c0 = xv[:, :, :k].reshape(b * h, k, d) + 0.1
    st = (torch.rand(b * h, k, d, generator=g), torch.randint(1, 4, (b * h, k), generator=g).float())
    kw = dict(rows_per_program=32, block_n=16)
    want = kmeans_cluster_order(xv, c0, 1, 1, 0, grid.seq_len, st, **kw)
    want_a = kmeans_assign(xv, c0, with_sums=True, rows_per_program=32, block_n=16)
    empty = torch.empty

    def garbage(*a, **kwa):
        t = empty(*a, **kwa)
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    monkeypatch.setattr(torch, "empty", garbage)
    got = kmeans_cluster_order(xv, c0, 1, 1, 0, grid.seq_len, st, **kw)
    got_a = kmeans_assign(xv, c0, with_sums=True, rows_per_program=32, block_n=16)
    for w, o in zip((*want[:3], *want[3], *want_a), (*got[:3], *got[3], *got_a)):
        assert torch.equal(w, o)


def test_cluster_order_with_many_chunks():
    """More row chunks than one step of the chunk prefix (45 > 32): the order still equals torch's stable sort."""
    grid = VideoGrid(4, 12, 15)
    g = torch.Generator().manual_seed(11)
    b, h, d, k = 1, 2, 16, 7
    centers = torch.randn(k, d, generator=g) * 4
    x = centers[torch.randint(0, k, (b, grid.seq_len, h), generator=g)] + 0.3 * torch.randn(b, grid.seq_len, h, d, generator=g)
    xv = x.transpose(1, 2)
    c0 = xv[:, :, :k].reshape(b * h, k, d) + 0.1
    perm, bounds, _, _ = kmeans_cluster_order(xv, c0, 0, 1, 0, grid.seq_len, rows_per_program=16, block_n=16)
    labels, _, (_, counts) = P._kmeans(xv, k, 0, c0.view(b, h, k, d), None)
    assert torch.equal(perm, torch.sort(labels, dim=-1, stable=True).indices.reshape(b * h, -1))
    assert torch.equal(bounds, torch.nn.functional.pad(counts.reshape(b * h, k).long().cumsum(-1), (1, 0)))


def test_moving_rows_into_the_order_sums_the_clusters():
    """The key order's hook moves K and V with gather_rows(cluster_sums=...): the moved rows are the
    plain gather's and the statistics the sums pass's (odd sizes, text before the video, 2 samples)."""
    grid = VideoGrid(3, 5, 7, text_len=11, text_at="prefix")
    g = torch.Generator().manual_seed(9)
    b, h, d, k = 2, 3, 24, 9
    s, vs, vl = grid.seq_len, grid.video_start, grid.video_len
    centers = torch.randn(k, d, generator=g) * 4
    kk = (centers[torch.randint(0, k, (b, s, h), generator=g)] + 0.3 * torch.randn(b, s, h, d, generator=g)).half()
    vv = torch.randn(b, s, h, d, generator=g).half()
    xv = kk[:, vs : vs + vl].transpose(1, 2)
    c0 = xv[:, :, :k].reshape(b * h, k, d).float() + 0.1
    kw = dict(rows_per_program=32, block_n=16, sums_in_assign=False, sum_rows=24, sum_block=16)
    perm, bounds, cent, (sums, counts) = kmeans_cluster_order(xv, c0, 1, 1, vs, s, **kw)
    moved = []

    def hook(p, pending):
        moved.append(gather_rows([kk, vv], p.view(b, h, s), block_s=16, cluster_sums=pending))
        return True
    perm2, bounds2, _, (sums2, counts2) = kmeans_cluster_order(xv, c0, 1, 1, vs, s, **kw, on_order=hook)
    assert torch.equal(perm2, perm) and torch.equal(bounds2, bounds) and torch.equal(counts2, counts)
    torch.testing.assert_close(sums2, sums, rtol=1e-5, atol=1e-3)
    for got, want in zip(moved[0], gather_rows([kk, vv], perm.view(b, h, s))):
        assert torch.equal(got, want)


def test_plans_through_the_kernels_match_the_torch_path(monkeypatch):
    """Semantic (warm start included) and segment plans: the kernels give the PyTorch path's orders and masks."""
    grid = VideoGrid(3, 6, 10, text_len=5, text_at="suffix")
    g = torch.Generator().manual_seed(0)
    s, h, d = grid.seq_len, 2, 32
    centers = torch.randn(6, d, generator=g) * 4
    pick = torch.randint(0, 6, (1, s, h), generator=g)
    q = (centers[pick] + 0.3 * torch.randn(1, s, h, d, generator=g))
    k = (centers[pick.roll(7, 1)] + 0.3 * torch.randn(1, s, h, d, generator=g))
    v = torch.randn(1, s, h, d, generator=g)
    results = {}
    for fast in ("0", "1"):
        monkeypatch.setenv("VDIT_CPU_TRITON", fast)
        out = []
        for spec in ("semantic:q_clusters=6,k_clusters=8", "segment:size=64"):
            memory = {}
            for _ in range(2):  # cold, then warm
                plan = plan_call(q, k, grid, [parse_order(spec)] * h, None, 16, None, memory)
                out.append((plan.q_index, plan.k_index, plan.mask))
            qq, kk, vv = plan.gather(q, k, v)
            out.append((plan.scatter(qq), kk, vv))
        results[fast] = out
    for a, b in zip(results["0"], results["1"]):
        for x, y in zip(a, b):
            assert (x is None and y is None) or torch.equal(x, y)


def test_kernels_compile_for_sm90():
    """What the GPU runs (bf16, head_dim 128, 64/128 centroids; head_dim 96 padded; the semantic block
    mask up to 256 clusters a side) compiles for Hopper
    (a fresh process: under TRITON_INTERPRET=1 kernels cannot be compiled; see test_compile_sm90.py)."""
    import json
    import subprocess
    import sys

    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_sm90", Path(__file__).with_name("test_compile_sm90.py"))
    sm90 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sm90)
    _COMPILE = sm90._COMPILE

    mod = "vdit_accel.kernels.permute"
    km = {"X": "*bf16", "CB": "*bf16", "BIAS": "*fp32", "LABELS": "*i32", "SUMS": "*fp32", "COUNTS": "*fp32",
          "TBEFORE": "*i32", "CSIZES": "*i32"}
    variants = [[mod, "_kmeans_assign_kernel", km, dict(D=d, K_PAD=kp, D_PAD=dp, BLOCK_N=bn, STORE_LABELS=lab,
                                                        WITH_SUMS=sums, TILE_COUNTS=chunk)]
                for d, kp, dp, bn, lab, sums, chunk in ((128, 64, 128, 64, False, True, False),
                                                        (128, 128, 128, 64, True, False, False),
                                                        (96, 128, 128, 64, True, True, False),
                                                        (128, 64, 128, 64, True, True, True),
                                                        (128, 128, 128, 32, True, True, True),
                                                        (128, 256, 128, 64, True, False, True))]
    variants += [[mod, "_centroid_prep_kernel", {"C": "*fp32", "PSUMS": "*fp32", "PCOUNTS": "*fp32", "COUT": "*fp32",
                                                 "CB": "*bf16", "BIAS": "*fp32", "ZSUMS": "*fp32", "ZCOUNTS": "*fp32"},
                  dict(D=d, K_PAD=kp, D_PAD=dp, BLOCK_K=16, FROM_SUMS=upd, ZERO_SUMS=upd, ZERO_COUNTS=True)]
                 for d, kp, dp, upd in ((128, 128, 128, True), (96, 64, 128, False))]
    variants += [[mod, "_cluster_sums_kernel", {"X": "*bf16", "PERM": "*i64", "LABELS": "*i32", "BOUNDS": "*i64",
                                                "SUMS": "*fp32", "COUNTS": "*fp32"},
                  dict(D=128, D_PAD=128, K_PAD=128, BLOCK_N=128)]]
    variants += [[mod, "_cluster_place_kernel", {"LABELS": "*i32", "TBEFORE": "*i32", "CBEFORE": "*i32", "START": "*i32",
                                                 "PERM": "*i64", "BOUNDS": "*i64"},
                  dict(K_PAD=kp, BLOCK_N=64, TEXT_BLOCK=256)] for kp in (64, 256)]
    variants += [[mod, "_chunk_prefix_kernel", {"CSIZES": "*i32", "CBEFORE": "*i32", "START": "*i32"},
                  dict(K_PAD=kp, CHUNK_BLOCK=32)] for kp in (64, 256)]
    gr = {n: "*bf16" for n in ("X0", "Y0", "X1", "Y1", "X2", "Y2")} | {"IDX": "*i64"}
    gr |= {"LABELS": "*i32", "BOUNDS": "*i64", "SUMS": "*fp32", "COUNTS": "*fp32"}
    variants += [[mod, "_gather_rows_kernel", gr, dict(D=128, D_PAD=128, BLOCK_S=64, N_TENSORS=n, CLUSTER_SUMS=cs,
                                                       K_PAD=128)] for n, cs in ((1, False), (2, False), (2, True))]
    sk = {"QC": "*fp32", "KC": "*fp32", "QB": "*i64", "KB": "*i64", "KEEP": "*u8", "qk_scale": "fp32", "top_p": "fp32"}
    variants += [[mod, "_semantic_keep_kernel", sk, dict(D=128, KK_PAD=kk, BLOCK_D=32, BLOCK_N=128, NB_PAD=256)]
                 for kk in (128, 256)]
    sm = {"KEEP": "*u8", "QB": "*i64", "MASK": "*u8", "NUM": "*i32", "IDX": "*i32"}
    variants += [[mod, "_semantic_mask_kernel", sm, dict(BLOCK_M=128, KQ_PAD=kq, BLOCK_NB=256, WRITE_CSR=csr)]
                 for kq, csr in ((64, True), (256, False))]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(variants)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
