"""Token orders measured: blocks needed for 95% of the attention mass, and their cost on the GPU.

    python benchmarks/permutation.py                  # GPU: density + timing at the wan shape -> permutation-<gpu>-<date>.json
    python benchmarks/permutation.py --density        # density only, any device (CPU: sampled query blocks)
    python benchmarks/permutation.py --smoke          # tiny grid, CPU is fine: checks the script end to end
    python benchmarks/permutation.py --overhead       # GPU: semantic/segment overhead in parts -> permutation-overhead-<gpu>-<date>.json

Heads: the ``local3d`` and ``clustered`` sets of ``sparsity_search/synthetic.py`` (defined there, fixed
before any order was measured). Orders: ``raster`` (diffusers' own), ``tiled`` (default tile, plus other
tile shapes with ``--density``), ``semantic`` and ``segment`` (the runtime's plans with their default
parameters, computed on tensors in the tiled frame; the semantic k-means cold, 8 Lloyd updates).

``density``: per head, per query block, the fewest key blocks (128 tokens) holding 95% of the block's
exact attention mass in that order (queries and keys each in their order); mean over query blocks,
then over the heads of the set. ``runtime_density`` / ``runtime_recall``: the block mask the runtime
itself chooses for the dynamic orders (centroid / pooled-query top-p, p = 0.95) and the share of the
exact mass it keeps.

Timing (GPU, wan1.3b-81f-480p: B=1, S=32760 video tokens, 12 heads, head_dim 128, bf16; do_bench median,
warmup 25 / rep 200 ms): 12 heads of the set (all 12 clustered heads; 12 of the 27 local3d heads, evenly
spread), each with its own 95% mask in that order. ``attn_ms``: ``vdit_accel.attention`` on the
reordered tensors with those masks. ``overhead_ms``: the reordering alone, per attention call:
``tiled`` permutes the hidden states (B, S, 1536) and the rotary tables once per transformer forward
(Wan: in before block 0, out after the last) — that cost over the 30 layers of Wan2.1-1.3B
(``overhead_call_ms``: the per-call alternative, gathering q, k, v and scattering the output);
``semantic`` / ``segment``: per call (no step: every call re-plans), the plan (warm-started online
k-means: one assignment pass over every token, or the pooled-query pass; the block mask) plus moving k
and v (the kernel reads Q and writes the output through the query order, ``q_index``): whole calls as
the runtime makes them against ``runtime_attn_ms`` (the same attention with the runtime's own masks, on
tensors already moved), timed in pairs as ``--overhead`` does (``overhead_ms_iqr``; ``overhead_ms_refresh4``:
the plan recomputed every 4th call and reused in between, per call). ``ms = attn_ms + overhead_ms``. ``dense_rel_diff``: dense attention computed
through the order (k, v gathered, Q through ``q_index``) against dense attention in raster order,
||a - b|| / ||b|| (rounding only).
``overhead_ms_refresh<n>``: ``n`` consecutive calls timed together (one re-plan, the plan reused
n - 1 times), divided by n: the mean cost per call.

``--overhead`` (the 12 clustered heads in the tiled frame, semantic and segment with their defaults):
``plan_ms`` (warm plan_call alone: k-means step, assignment, sort, block mask), ``plan_gpu_ms`` /
``plan_kernels_ms`` (its CUDA kernels' summed time, and by kernel), ``moves_ms`` (on a kept plan: the
gather of k and v; ``moves_gbps`` the bytes read and written per second), ``plan_launches`` /
``moves_launches`` (CUDA kernels per call, torch.profiler), ``runtime_attn_ms`` (the attention with the
plan's own mask on moved tensors) and ``attn_q_index_ms`` (the same reading Q and writing the output
through the query order); for a plan recomputed every n-th call (n = 1, 2, 4, 8; no step given):
``call_ms_refresh<n>`` (whole calls back to back, mean per call: as in a model, where nothing syncs and
the CPU's launches overlap the GPU's work), ``overhead_ms_refresh<n>`` = that minus the attention alone
and ``overhead_frac_refresh<n>`` its fraction of it (the 10% target is against the sparse attention
time), and ``overhead_alone_ms_refresh<n>`` (plan + moves with no attention: launch-bound, the CPU's
cost). ``*_guided``: the default order in a pipeline with classifier-free guidance (Wan's: two calls per
denoising step, the step passed as a patched pipeline passes it, so the second call reuses the step's
plan), per call. The attention alone and with its plan vary by a tenth of a ms from one timing to the
next (the clocks move: separate medians gave overheads from -0.2 to +0.5 ms for the same calls), so
these are paired: ``PAIRS`` times, the calls then the attention alone, each timed by CUDA events with
nothing synchronising in between; ``overhead_ms_*`` is the median of the pairs' differences per call,
``overhead_ms_*_iqr`` their quartiles, ``call_ms_*`` / ``attn_ms_*`` the medians of each side. The calls
pass ``v`` to the plan, as the runtime does (the semantic plan then moves K and V on its second stream);
``moved_kv_equal``: those tensors equal a gather after the plan.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
try:  # the installed package (pip install -e ., or benchmarks/gpu_run.sh's /tmp/site), not the checkout's folders
    import vdit_accel.kernels  # noqa: F401
    import vdit_accel.sparsity_search.synthetic  # noqa: F401
except ImportError as e:
    sys.exit(f"benchmarks/permutation.py needs vdit-accel installed (pip install -e .): {e}")

from vdit_accel import orders as P  # noqa: E402
from vdit_accel.block_mask import cdiv  # noqa: E402
from vdit_accel.block_mask import BlockMask  # noqa: E402
from vdit_accel.grid import VideoGrid  # noqa: E402
from vdit_accel.sparsity_search.synthetic import HEAD_SETS, head_set  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from result_files import device_name, git_sha, result_path, slug  # noqa: E402

BLOCK = 128
RECALL = 0.95
PAIRS = 60  # whole-call overheads: (calls, attention alone) pairs timed
GRIDS = {"wan-81f-480p": (21, 30, 52), "wan-49f-480p": (13, 30, 52)}
TILES = [(2, 8), (1, 8), (4, 8), (2, 4), (4, 4), (1, 16), (2, 16)]  # (t, h); the first is the default
ORDERS = ("raster", "tiled", "semantic", "segment")
WAN_LAYERS, WAN_DIM = 30, 1536  # Wan2.1-1.3B: layers, hidden size


def perms(order: str, q: torch.Tensor, k: torch.Tensor, grid: VideoGrid, block: int, tile=None):
    """(q_perm, k_perm, runtime mask or None) of one head set, ``[H, S]`` each (q, k: [H, S, D])."""
    h, s, _ = q.shape
    if order == "raster":
        ident = torch.arange(s, device=q.device).expand(h, s)
        return ident, ident, None
    frame = P.tiled_order(grid, block, *(tile or (None, None)), device=q.device)
    if order == "tiled":
        return frame.expand(h, s), frame.expand(h, s), None
    qf, kf = q[:, frame].transpose(0, 1)[None], k[:, frame].transpose(0, 1)[None]  # (1, S, H, D), tiled frame
    if order == "semantic":
        nq, nk = P.default_clusters(grid, block)
        plan = P.semantic_orders(qf, kf, grid, nq, nk)
        mask = P.semantic_block_mask(plan, grid, RECALL, block, block, scale=1.0 / q.shape[-1] ** 0.5)
        return frame[plan.q_perm[0]], frame[plan.k_perm[0]], mask[0]
    kp, mask = P.segment_plan(qf, kf, grid, 8 * block, RECALL, block, block)
    return frame.expand(h, s), frame[kp[0]], mask[0]


def measure_set(q, k, grid, order, block, rows, tile=None) -> dict:
    """Per-head densities (and runtime mask recall) of one order on one head set."""
    qp, kp, mask = perms(order, q, k, grid, block, tile)
    dens, rdens, rrec = [], [], []
    for h in range(q.shape[0]):
        mass = P.block_mass(q[h], k[h], block, qp[h], kp[h], rows)
        dens.append(float(P.blocks_needed(mass, RECALL).float().mean() / mass.shape[-1]))
        if mask is not None:
            m = mask[h] if rows is None else mask[h][rows]
            rdens.append(float(m.float().mean()))
            rrec.append(float((mass * m).sum(-1).mean()))
    out = {"density": sum(dens) / len(dens), "per_head": [round(d, 5) for d in dens]}
    if rdens:
        out.update(runtime_density=sum(rdens) / len(rdens), runtime_recall=sum(rrec) / len(rrec))
    return out


def density_rows(grids: dict, sample_rows: int | None, device, with_tiles: bool, log) -> list[dict]:
    rows_out = []
    for gname, (t, h, w) in grids.items():
        grid = VideoGrid(t, h, w)
        nb = cdiv(grid.seq_len, BLOCK)
        rows = None if sample_rows is None or sample_rows >= nb else \
            torch.linspace(0, nb - 1, sample_rows).round().long().unique().tolist()
        for hs in HEAD_SETS:
            q, k, specs = head_set(hs, grid, 8 if hs == "local3d" else 64)
            q, k = q.to(device), k.to(device)
            cases = [(o, None) for o in ORDERS]
            if with_tiles and hs == "local3d":
                cases = [("raster", None)] + [("tiled", tile) for tile in TILES]
            for order, tile in cases:
                t0 = time.perf_counter()
                r = measure_set(q, k, grid, order, BLOCK, rows, tile)
                shape = P.tile_shape(grid, BLOCK, *(tile or (None, None)))
                row = {"grid": gname, "heads": hs, "order": order, "density": round(r["density"], 5),
                       "per_head": r["per_head"], "query_blocks": len(rows) if rows else nb}
                if order == "tiled":
                    row["tile"] = [shape[0], shape[1], round(shape[2], 3)]
                for key in ("runtime_density", "runtime_recall"):
                    if key in r:
                        row[key] = round(r[key], 5)
                rows_out.append(row)
                log(f"{gname} {hs:9s} {order:8s} {str(row.get('tile', '')):14s} density {row['density']:.4f}"
                    + (f"  runtime {row['runtime_density']:.4f} recall {row['runtime_recall']:.3f}" if "runtime_density" in row else "")
                    + f"  ({time.perf_counter() - t0:.0f} s)")
    return rows_out


def _bench(fn, device) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))
    fn()
    t0 = time.perf_counter()
    for _ in range(2):
        fn()
    return (time.perf_counter() - t0) / 2 * 1e3


def _paired(calls, alone, n: int, device) -> dict:
    """``calls`` (``n`` attention calls with their plan) and ``alone`` (one attention call) timed in turn
    ``PAIRS`` times: the median per-call difference (and quartiles), and each side's median (ms)."""
    if device.type != "cuda":
        a, b = _bench(calls, device) / n, _bench(alone, device)
        return {"call": a, "attn": b, "over": a - b, "iqr": [a - b, a - b]}
    for _ in range(3):
        calls(), alone()
    ev = [[torch.cuda.Event(enable_timing=True) for _ in range(3)] for _ in range(PAIRS)]
    for e0, e1, e2 in ev:
        e0.record()
        calls()
        e1.record()
        alone()
        e2.record()
    torch.cuda.synchronize()
    a = torch.tensor([e0.elapsed_time(e1) / n for e0, e1, _ in ev])
    b = torch.tensor([e1.elapsed_time(e2) for _, e1, e2 in ev])
    d = a - b
    return {"call": a.median().item(), "attn": b.median().item(), "over": d.median().item(),
            "iqr": [d.quantile(0.25).item(), d.quantile(0.75).item()]}


def timing_rows(grid: VideoGrid, heads: int, head_dim: int, device, dtype, log) -> list[dict]:
    """ms / overhead_ms of each order at one shape (see the module docstring)."""
    from vdit_accel.attention import attention

    s = grid.seq_len
    out_rows = []
    for hs in HEAD_SETS:
        qa, ka, specs = head_set(hs, grid, head_dim)
        pick = torch.linspace(0, len(specs) - 1, heads).round().long()
        qh, kh = qa[pick].to(device), ka[pick].to(device)  # [H, S, D] float32, scale folded into q
        g = torch.Generator().manual_seed(0)
        v = torch.randn(1, s, heads, head_dim, generator=g).to(device=device, dtype=dtype)
        q = qh.transpose(0, 1)[None].to(dtype).contiguous()
        k = kh.transpose(0, 1)[None].to(dtype).contiguous()
        for order in ORDERS:
            qp, kp, rmask = perms(order, qh, kh, grid, BLOCK)
            masks = []
            for h in range(heads):  # each head's own 95% mask in this order
                mass = P.block_mass(qh[h], kh[h], BLOCK, qp[h], kp[h])
                masks.append(P.top_p_keep(mass, RECALL))
            bm = BlockMask.from_dense(torch.stack(masks)[None], s, BLOCK, BLOCK)
            qo, ko, vo = (P.gather_tokens(x, idx[None]) for x, idx in ((q, qp), (k, kp), (v, kp)))
            attn_ms = _bench(lambda: attention(qo, ko, vo, bm), device)
            row = {"shape": f"{grid.t}x{grid.h}x{grid.w}", "impl": f"ours-perm-{order}", "heads": hs,
                   "density": round(bm.density(), 5), "attn_ms": round(attn_ms, 4)}
            frame = P.tiled_order(grid, BLOCK, device=device)
            if order == "raster":
                overhead = 0.0
            elif order == "tiled":
                hidden = torch.randn(1, s, WAN_DIM, device=device, dtype=dtype)
                rope = [torch.randn(1, s, 1, head_dim, device=device, dtype=torch.float32) for _ in range(2)]
                inv = P.inverse(frame)

                def per_forward():
                    x = hidden.index_select(1, frame)
                    for r in rope:
                        r.index_select(1, frame)
                    return x.index_select(1, inv)

                overhead = _bench(per_forward, device) / WAN_LAYERS

                def per_call_tiled():
                    qq, kk, vv = (P.gather_tokens(x, frame) for x in (q, k, v))
                    return P.scatter_tokens(qq, frame), kk, vv  # qq stands for the output to scatter back

                row["overhead_call_ms"] = round(_bench(per_call_tiled, device), 4)
            else:
                qf, kf, vf = (P.gather_tokens(x, frame) for x in (q, k, v))

                def per_call(spec, memory, attend=False):  # as the runtime: Q and the output move inside the kernel
                    plan = P.plan_call(qf, kf, grid, [spec] * heads, None, BLOCK, None, memory, v=vf)
                    kk, vv = plan.gather_kv(kf, vf)
                    bm = plan.block_mask(s, BLOCK)
                    if attend:
                        attention(qf, kk, vv, bm, q_index=plan.kernel_q_index(heads))
                    return plan, kk, vv

                spec, memory = P.parse_order(f"{order}:top_p={RECALL}"), {}
                per_call(spec, memory)  # cold start (k-means from random rows), outside the timing
                plan = per_call(spec, memory)[0]
                rbm = BlockMask.from_dense(plan.mask, s, BLOCK, BLOCK)
                qq = qf if plan.q_index is None else P.gather_tokens(qf, plan.q_index)
                kk, vv = P.gather_tokens(kf, plan.k_index), P.gather_tokens(vf, plan.k_index)
                runtime_ms = _bench(lambda: attention(qq, kk, vv, rbm), device)
                row["runtime_attn_ms"] = round(runtime_ms, 4)
                row["runtime_density"] = round(rbm.density(), 5)
                for refresh in (1, 4):  # whole calls against the runtime attention alone, paired (see --overhead)
                    spec, memory = P.parse_order(f"{order}:top_p={RECALL},refresh={refresh}"), {}
                    per_call(spec, memory)
                    m = _paired(lambda: [per_call(spec, memory, True) for _ in range(refresh)],
                                lambda: attention(qq, kk, vv, rbm), refresh, device)
                    if refresh == 1:
                        overhead = m["over"]
                        row["overhead_ms_iqr"] = [round(x, 4) for x in m["iqr"]]
                    else:
                        row[f"overhead_ms_refresh{refresh}"] = round(m["over"], 4)
            if order != "raster":  # dense attention through this order's gathers equals the unpermuted one
                dense = attention(q, k, v)
                back = attention(q, P.gather_tokens(k, kp[None]), P.gather_tokens(v, kp[None]), q_index=qp[None])
                row["dense_rel_diff"] = float((back.float() - dense.float()).norm() / dense.float().norm())
            row["overhead_ms"] = round(overhead, 4)
            row["ms"] = round(attn_ms + overhead, 4)
            row["overhead_frac"] = round(overhead / attn_ms, 4) if attn_ms else None
            out_rows.append(row)
            log(json.dumps(row))
    return out_rows


def _launches(fn, device) -> int | None:
    """CUDA kernels one call of ``fn`` launches (torch.profiler; Triton kernels included), None off CUDA."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def _kernel_ms(fn, device) -> float | None:
    """GPU time of one call of ``fn``: the summed durations of the CUDA kernels it launches (torch.profiler),
    i.e. its cost in a stream the CPU keeps ahead of the GPU; None off CUDA."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    per = {e.key: (e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total) / 5 / 1e3
           for e in prof.key_averages()}
    per = {k: v for k, v in per.items() if v > 0}
    _kernel_ms.last = {k[:60]: round(v, 4) for k, v in sorted(per.items(), key=lambda kv: -kv[1])[:8]}
    return sum(per.values())


def overhead_rows(grid: VideoGrid, heads: int, head_dim: int, device, dtype, log) -> list[dict]:
    """The dynamic orders' cost per attention call at one shape, in parts (see ``--overhead``)."""
    from vdit_accel.attention import attention

    s = grid.seq_len
    qa, ka, specs = head_set("clustered", grid, head_dim)
    pick = torch.linspace(0, len(specs) - 1, heads).round().long()
    frame = P.tiled_order(grid, BLOCK, device=device)
    q = qa[pick].transpose(0, 1)[None].to(device=device, dtype=dtype)[:, frame].contiguous()  # the tiled frame
    k = ka[pick].transpose(0, 1)[None].to(device=device, dtype=dtype)[:, frame].contiguous()
    v = torch.randn(1, s, heads, head_dim, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    rows = []
    for order in ("semantic", "segment"):
        spec = P.parse_order(f"{order}:top_p={RECALL}")
        memory: dict = {}
        plan = P.plan_call(q, k, grid, [spec] * heads, None, BLOCK, None, memory)  # cold start, untimed
        plan = P.plan_call(q, k, grid, [spec] * heads, None, BLOCK, None, memory)

        def plan_only():
            return P.plan_call(q, k, grid, [spec] * heads, None, BLOCK, None, memory)

        def moves():  # on a kept plan: K and V into the key order (Q and the output move inside the kernel)
            return plan.gather_kv(k, v)

        bm = plan.block_mask(s, BLOCK)
        qi = plan.kernel_q_index(heads)
        kk, vv = plan.gather_kv(k, v)
        qq = q if plan.q_index is None else P.gather_tokens(q, plan.q_index)
        base_ms = _bench(lambda: attention(qq, kk, vv, bm), device)  # the sparse attention on moved tensors
        row = {"shape": f"{grid.t}x{grid.h}x{grid.w}", "impl": f"ours-perm-{order}", "heads": "clustered",
               "runtime_density": round(bm.density(), 5), "runtime_attn_ms": round(base_ms, 4),
               "attn_q_index_ms": round(_bench(lambda: attention(q, kk, vv, bm, q_index=qi), device), 4),
               "plan_ms": round(_bench(plan_only, device), 4), "plan_gpu_ms": _kernel_ms(plan_only, device),
               "moves_ms": round(_bench(moves, device), 4),
               "plan_launches": _launches(plan_only, device), "moves_launches": _launches(moves, device)}
        if row["plan_gpu_ms"] is not None:
            row["plan_gpu_ms"] = round(row["plan_gpu_ms"], 4)
            row["plan_kernels_ms"] = _kernel_ms.last  # the plan's GPU time by kernel (the 8 largest)
        if order == "semantic":  # K and V moved by the plan on its second stream == gathered after it
            pm = P.plan_call(q, k, grid, [spec] * heads, None, BLOCK, None, memory, v=v)
            k_ref, v_ref = P.CallPlan(pm.q_index, pm.k_index, None).gather_kv(k, v)
            row["moved_kv_by_plan"] = pm._moved is not None
            k_got, v_got = pm.gather_kv(k, v)
            row["moved_kv_equal"] = bool(torch.equal(k_got, k_ref) and torch.equal(v_got, v_ref))
        moved = 2 * k.numel() * k.element_size() * 2  # k and v, read + write
        row["moves_gbps"] = round(moved / row["moves_ms"] / 1e6, 1)
        attn_alone = lambda: attention(qq, kk, vv, bm)  # noqa: E731
        for refresh in (1, 2, 4, 8, "guided"):
            guided = refresh == "guided"
            n = 2 if guided else refresh  # calls per timed repetition
            spec_r = P.parse_order(f"{order}:top_p={RECALL}" + ("" if guided else f",refresh={refresh}"))
            mem_r, step_no = {}, [0]
            P.plan_call(q, k, grid, [spec_r] * heads, None, BLOCK, None, mem_r)

            def calls(spec_r=spec_r, mem_r=mem_r, n=n, guided=guided, step_no=step_no, attend=True):
                step_no[0] += 1  # guided: the two calls of one denoising step
                for _ in range(n):
                    pl = P.plan_call(q, k, grid, [spec_r] * heads, None, BLOCK, None, mem_r,
                                     step=step_no[0] if guided else None, v=v)  # as the runtime calls it
                    k2, v2 = pl.gather_kv(k, v)
                    b2 = pl.block_mask(s, BLOCK)
                    if attend:
                        attention(q, k2, v2, b2, q_index=pl.kernel_q_index(heads))

            # Whole calls back to back (as in a model: no host syncs, so the plan's launches overlap the GPU's
            # work) against the attention alone, paired; and the plan + moves alone (launch-bound: the CPU's cost).
            tag = "guided" if guided else f"refresh{refresh}"
            m = _paired(calls, attn_alone, n, device)
            row[f"call_ms_{tag}"], row[f"attn_ms_{tag}"] = round(m["call"], 4), round(m["attn"], 4)
            row[f"overhead_ms_{tag}"] = round(m["over"], 4)
            row[f"overhead_frac_{tag}"] = round(m["over"] / m["attn"], 4)
            row[f"overhead_ms_{tag}_iqr"] = [round(x, 4) for x in m["iqr"]]
            row[f"overhead_alone_ms_{tag}"] = round(_bench(lambda: calls(attend=False), device) / n, 4)
        rows.append(row)
        log(json.dumps(row))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--density", action="store_true", help="densities only (any device), with the tile-shape comparison")
    ap.add_argument("--overhead", action="store_true",
                    help="only the semantic/segment overhead at the wan shape, in parts: plan, moves, amortised per refresh")
    ap.add_argument("--smoke", action="store_true", help="tiny grid, few rows: an end-to-end check (CPU is fine)")
    ap.add_argument("--sample-rows", type=int, default=None,
                    help="query blocks per head measured, evenly spread (default: all on a GPU, 64 on a CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--git-sha", default=None, help="recorded as versions.vdit_accel (default: git rev-parse)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    name = device_name(device)
    today = _dt.date.today()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    result = {"gpu": name, "date": today.isoformat(),
              "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + list(sys.argv[1:] if argv is None else argv)),
              "versions": {"torch": torch.__version__, "triton": triton_version, "vdit_accel": args.git_sha or git_sha()},
              "block": BLOCK, "recall": RECALL, "rows": []}
    log = lambda m: print(m, flush=True)  # noqa: E731
    if args.smoke:
        grids = {"smoke": (5, 12, 20)}
        sample = args.sample_rows or 8
    else:
        grids = GRIDS
        sample = args.sample_rows or (None if device.type == "cuda" else 64)
    what = "permutation-density" if args.density else "permutation-overhead" if args.overhead else "permutation"
    path = result_path(args.out_dir, what, slug(name), today, "-smoke" if args.smoke else "")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.density:
        result["rows"] = density_rows(grids, sample, device, with_tiles=True, log=log)
    elif args.overhead:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        result["rows"] = overhead_rows(VideoGrid(*grids["smoke" if args.smoke else "wan-81f-480p"]), 4 if args.smoke else 12,
                                       32 if args.smoke else 128, device, dtype, log)
    else:
        if device.type != "cuda" and not args.smoke:
            sys.exit("timing needs a CUDA GPU (use --density for the CPU measurement, --smoke for a check)")
        wan = VideoGrid(*grids["smoke" if args.smoke else "wan-81f-480p"])
        result["densities"] = density_rows({k: v for k, v in grids.items() if k in ("smoke", "wan-81f-480p")},
                                           sample, device, with_tiles=False, log=log)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        result["rows"] = timing_rows(wan, 4 if args.smoke else 12, 32 if args.smoke else 128, device, dtype, log)
        dens = {(r["heads"], r["order"]): r["density"] for r in result["densities"]}
        for r in result["rows"]:  # the set's mean 95% density (all heads of the set), as the issue defines it
            r["mask_density"] = r.pop("density")
            r["density"] = dens[(r["heads"], r["impl"].removeprefix("ours-perm-"))]
    path.write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
