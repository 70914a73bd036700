"""How sparse is a trained tiny Wan's attention, and where? Measured on whole dense generations.

    python benchmarks/attention_structure.py --model wan-rich --out-dir benchmarks/results          # GPU, native size
    python benchmarks/attention_structure.py --model wan-rich --frames 9 --height 64 --width 112 \\
        --prompts 1 --steps 6 --out-dir /tmp/s                                                      # CPU smoke
    python benchmarks/attention_structure.py --model wan-rich --oracle --out-dir benchmarks/results  # + oracle PSNR

Generates ``--prompts`` of the model's validation captions (never the check's) densely with the
standard ``WanPipeline`` call, and at an early, a middle and a late denoising step (``--phases``,
fractions of the steps) reads Q and K of every self-attention call of the conditional forward (after
Wan's norms and rotary embedding, where diffusers hands them to its attention dispatcher). Per (phase,
layer, head), averaged over the prompts, from the exact softmax (float32, one pass over each head's
rows in chunks, never S x S at once):

- ``blocks``: for each order (``raster``, diffusers' own; ``tiled``, 2x8x8 tiles of 128 tokens;
  ``semantic``, the runtime's k-means of Q and K apart, cold, 8 Lloyd updates) and recall (0.90, 0.95,
  0.99): the mean over query blocks of the fraction of the 128-token key blocks that hold that much of
  the query block's attention mass (its fewest, largest blocks);
- ``keys_95``: the fraction of single keys needed for 95% of each query's mass (mean over a sample
  of queries): the order-free sparsity;
- ``frame_mass``: mass on keys within +-0 / 1 / 2 latent frames of the query's;
- ``box_mass``: mass within 3D boxes of +-(frames, rows, columns) around the query
  (``BOXES``);
- ``sink_top1pct``: the share of all mass on the 1% most attended keys; ``sink_keys``: keys that at
  least half of the queries give 10x the uniform weight, with their (frame, row, column);
- ``out_rms`` / ``out_varying_rms``: what the head writes, its attention output through its slice of the
  layer's output projection, as an RMS over queries, and the RMS of its deviation from its mean over the
  queries: a near-uniform head writes about the same vector everywhere (mean of V), a constant the next
  layer could take from a bias; ``out_share``: its ``out_varying_rms``² over the layer's sum, so the
  summary can say how much of what varies comes from the diffuse heads.

``--share``: the dense transformer step time and its self-attention time at the size (CUDA events
around each self-attention call and around the forward, as ``vdit-accel bench pipeline`` times them),
batch 1, median of 5 forwards.

``--oracle``: the best a per-head block mask could do on this model: each prompt generated again with
every self-attention call after the first ``--oracle-warmup`` of the steps computed exactly on the
128x128 blocks (tiled order) that hold ``--oracle-recall`` of each query block's exact mass in that
very call; PSNR / SSIM of the decoded videos against the dense ones, and the oracle's mean density.
(Not a runtime method: it computes the full attention to choose its blocks.)

Writes ``attention-structure-<model>-<device>-<yyyymmdd>.json`` and a ``.png`` beside it: per phase, a
layers x heads map of the tiled order's block fraction at 95% recall, and the distribution over
heads per order.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from result_files import RESULTS, run_header, write_result  # noqa: E402

BLOCK = 128
RECALLS = (0.9, 0.95, 0.99)
ORDERS = ("raster", "tiled", "semantic")
DIFFUSE = 0.85  # a head that needs this much of the blocks for 95% of its mass is near-uniform (uniform: 0.95)
LOCAL = 0.25  # ... this little: local (issue 18's target for the median head)
BOXES = ((0, 2, 2), (1, 2, 2), (1, 4, 4), (2, 8, 8))  # +-frames, +-rows, +-columns
ROWS_PER_CHUNK = 1024


def _coords(grid) -> torch.Tensor:
    """(frame, row, column) ``[S, 3]`` of each token in raster order."""
    t, h, w = torch.meshgrid(torch.arange(grid.t), torch.arange(grid.h), torch.arange(grid.w), indexing="ij")
    return torch.stack([t.flatten(), h.flatten(), w.flatten()], 1)


def _orders(q: torch.Tensor, k: torch.Tensor, grid, device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per order, ``(q_perm, k_perm)`` ``[H, S]``: position -> token."""
    from vdit_accel.orders.semantic import default_clusters, semantic_orders
    from vdit_accel.orders.static import tiled_order

    s, h = q.shape[1], q.shape[2]
    raster = torch.arange(s, device=device).expand(h, s)
    tiled = tiled_order(grid, BLOCK, device=device).expand(h, s)
    plan = semantic_orders(q, k, grid, *default_clusters(grid, BLOCK), init_iters=8)
    return {"raster": (raster, raster), "tiled": (tiled, tiled), "semantic": (plan.q_perm[0], plan.k_perm[0])}


def _blocks_needed(mass: torch.Tensor, recall: float) -> torch.Tensor:
    """Per row of ``mass`` ``[M, N]`` (rows sum to 1), how many of its largest entries first hold ``recall``."""
    srt = mass.sort(-1, descending=True).values
    return ((srt.cumsum(-1) < recall - 1e-6).sum(-1) + 1).clamp(max=mass.shape[-1])


def _key_block_sums(p: torch.Tensor, k_perm: torch.Tensor | None, nb: int) -> torch.Tensor:
    """``[..., S]`` probabilities -> ``[..., nb]``: each 128-key block's sum with keys in ``k_perm`` order."""
    pk = p if k_perm is None else p.index_select(-1, k_perm)
    pad = nb * BLOCK - pk.shape[-1]
    if pad:
        pk = torch.nn.functional.pad(pk, (0, pad))
    return pk.view(*pk.shape[:-1], nb, BLOCK).sum(-1)


@torch.no_grad()
def head_metrics(q: torch.Tensor, k: torch.Tensor, grid, perms: dict, rows_per_chunk: int = ROWS_PER_CHUNK,
                 v: torch.Tensor | None = None, w_out: torch.Tensor | None = None) -> dict:
    """The metrics of the module docstring for one head: ``q``, ``k`` ``[S, D]`` in raster order;
    ``perms``: ``{order: (q_perm [S], k_perm [S])}`` (position -> token); with ``v`` ``[S, D]`` and ``w_out``
    ``[dim, D]`` (the head's columns of the output projection) also ``out_rms`` and ``out_varying_rms``."""
    s, d = q.shape
    dev = q.device
    scale = 1.0 / math.sqrt(d)
    coords = _coords(grid).to(dev, torch.int32)
    nb = -(-s // BLOCK)
    kf = k.float()
    qblock = {}
    for name, (qp, _kp) in perms.items():
        qpos = torch.empty_like(qp)
        qpos[qp] = torch.arange(s, device=dev)
        qblock[name] = qpos // BLOCK
    mass = {name: torch.zeros(nb, nb, device=dev) for name in perms}
    frame_mass = torch.zeros(3, device=dev)
    box_mass = torch.zeros(len(BOXES), device=dev)
    col = torch.zeros(s, device=dev)
    hits = torch.zeros(s, device=dev)
    keys95 = []
    y_sum, y_sq = 0.0, 0.0
    sample_every = max(1, s // 2048)
    hw = grid.h * grid.w
    frames = torch.arange(grid.t, device=dev)
    for a in range(0, s, rows_per_chunk):
        rows = torch.arange(a, min(s, a + rows_per_chunk), device=dev)
        p = torch.softmax((q[rows].float() @ kf.T) * scale, -1)  # [c, S]
        for name, (_qp, kp) in perms.items():
            mass[name].index_add_(0, qblock[name][rows], _key_block_sums(p, None if name == "raster" else kp, nb))
        per_frame = p.view(len(rows), grid.t, hw).sum(-1)  # raster order: frame-major
        dt = (frames[None, :] - coords[rows, 0][:, None]).abs()
        for j in range(3):
            frame_mass[j] += (per_frame * (dt <= j)).sum()
        diff = (coords[rows][:, None, :] - coords[None, :, :]).abs()  # [c, S, 3]
        for j, (bt, bh, bw) in enumerate(BOXES):
            box_mass[j] += (p * ((diff[..., 0] <= bt) & (diff[..., 1] <= bh) & (diff[..., 2] <= bw))).sum()
        del diff
        col += p.sum(0)
        hits += (p > 10.0 / s).float().sum(0)
        keys95.append(_blocks_needed(p[::sample_every], 0.95).float() / s)
        if v is not None:
            y = (p @ v.float()) @ w_out.float().T  # [c, dim]: what the head writes for these queries
            y_sum = y_sum + y.sum(0)
            y_sq += float((y * y).sum())
    out = {"blocks": {}}
    if v is not None:
        mean = y_sum / s
        out["out_rms"] = round(math.sqrt(y_sq / s), 5)
        out["out_varying_rms"] = round(math.sqrt(max(0.0, y_sq / s - float((mean * mean).sum()))), 5)
    for name, m in mass.items():
        m = m / torch.bincount(qblock[name], minlength=nb).float().clamp_min(1)[:, None]
        out["blocks"][name] = {f"{r:.2f}": round(float(_blocks_needed(m, r).float().mean() / nb), 4) for r in RECALLS}
    out["keys_95"] = round(float(torch.cat(keys95).mean()), 4)
    out["frame_mass"] = [round(float(v / s), 4) for v in frame_mass]
    out["box_mass"] = [round(float(v / s), 4) for v in box_mass]
    out["sink_top1pct"] = round(float(col.topk(max(1, s // 100)).values.sum() / col.sum()), 4)
    sinks = torch.nonzero(hits >= 0.5 * s).flatten()
    out["sink_keys"] = int(sinks.numel())
    out["sink_coords"] = coords[sinks[:8]].tolist()
    return out


@torch.no_grad()
def tiled_block_mass(q: torch.Tensor, k: torch.Tensor, perm: torch.Tensor, rows_per_chunk: int = 256) -> torch.Tensor:
    """Every head's exact block mass in the order ``perm``: ``q``, ``k`` ``(B, S, H, D)`` -> ``[B, H, Mb, Nb]``
    (rows sum to 1), float32, a chunk of query rows of all heads at a time."""
    b, s, h, d = q.shape
    nb = -(-s // BLOCK)
    qh = q[:, perm].transpose(1, 2).reshape(b * h, s, d).float()
    kh = k[:, perm].transpose(1, 2).reshape(b * h, s, d).float()
    out = torch.zeros(b * h, nb, nb, device=q.device)
    for a in range(0, s, rows_per_chunk):
        rows = slice(a, min(s, a + rows_per_chunk))
        p = torch.softmax(torch.bmm(qh[:, rows], kh.transpose(1, 2)) / math.sqrt(d), -1)  # [BH, c, S]
        sums = _key_block_sums(p, None, nb)  # [BH, c, nb]
        blk = torch.arange(rows.start, rows.stop, device=q.device) // BLOCK
        out.index_add_(1, blk, sums)
    counts = torch.bincount(torch.arange(s, device=q.device) // BLOCK, minlength=nb).float()
    return (out / counts[None, :, None]).view(b, h, nb, nb)


class _Capture:
    """Counts transformer forwards (a forward pre-hook) and self-attention calls within each, and hands
    the calls of chosen forwards to ``on_call(forward, layer, q, k, v) -> out or None``."""

    def __init__(self, transformer, seq_len: int, on_call):
        self.transformer, self.seq_len, self.on_call = transformer, seq_len, on_call
        self.forward, self.layer = -1, 0

    @contextlib.contextmanager
    def active(self):
        from diffusers.models.transformers import transformer_wan as tw

        original = tw.dispatch_attention_fn

        def dispatch(query, key, value, *args, **kwargs):
            if query.shape[1] == key.shape[1] == self.seq_len:
                layer = self.layer
                self.layer += 1
                out = self.on_call(self.forward, layer, query, key, value)
                if out is not None:
                    return out
            return original(query, key, value, *args, **kwargs)

        def pre_hook(module, args, kwargs):
            self.forward += 1
            self.layer = 0

        handle = self.transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)
        tw.dispatch_attention_fn = dispatch
        try:
            yield self
        finally:
            tw.dispatch_attention_fn = original
            handle.remove()


def _generate(pipe, spec, captions, seed_base, size, steps):
    gens = [torch.Generator("cpu").manual_seed(seed_base + i) for i in range(len(captions))]
    out = pipe(prompt=captions, generator=gens, num_inference_steps=steps, guidance_scale=spec.guidance_scale,
               max_sequence_length=spec.max_sequence_length, output_type="np", **size).frames
    return [(np.clip(np.asarray(v), 0, 1) * 255 + 0.5).astype(np.uint8) for v in out]


def measure_structure(pipe, spec, captions, size, steps, phases, grid, log) -> dict:
    """The per-(phase, layer, head) metrics, averaged over the captions (one batch)."""
    capture_steps = {min(steps - 1, int(round(p * (steps - 1)))): name for name, p in phases.items()}
    per = {}  # (phase, layer, head) -> list of metric dicts (one per caption)
    calls_per_step = 2 if spec.guidance_scale > 1 else 1
    w_out = [blk.attn1.to_out[0].weight.detach() for blk in pipe.transformer.blocks]

    def on_call(forward, layer, q, k, v):
        step, which = divmod(forward, calls_per_step)
        if which != 0 or step not in capture_steps:
            return None
        t0 = time.perf_counter()
        phase = capture_steps[step]
        for b in range(q.shape[0]):
            perms = _orders(q[b:b + 1], k[b:b + 1], grid, q.device)
            for h in range(q.shape[2]):
                w = w_out[layer][:, h * q.shape[3]:(h + 1) * q.shape[3]]
                m = head_metrics(q[b, :, h], k[b, :, h], grid, {n: (qp[h], kp[h]) for n, (qp, kp) in perms.items()},
                                 v=v[b, :, h], w_out=w)
                per.setdefault((phase, layer, h), []).append(m)
        log(f"  step {step} ({phase}) layer {layer}: {time.perf_counter() - t0:.1f} s")
        return None

    cap = _Capture(pipe.transformer, grid.video_len, on_call)
    with cap.active():
        videos = _generate(pipe, spec, captions, 2000, size, steps)
    heads = []
    for (phase, layer, h), ms in sorted(per.items(), key=lambda kv: (list(phases).index(kv[0][0]), kv[0][1], kv[0][2])):
        avg = lambda f: [round(float(np.mean([f(m)[j] for m in ms])), 4) for j in range(len(f(ms[0])))]
        heads.append({
            "phase": phase, "step": next(s for s, n in capture_steps.items() if n == phase), "layer": layer, "head": h,
            "blocks": {o: {r: round(float(np.mean([m["blocks"][o][r] for m in ms])), 4) for r in ms[0]["blocks"][o]}
                       for o in ms[0]["blocks"]},
            "keys_95": round(float(np.mean([m["keys_95"] for m in ms])), 4),
            "frame_mass": avg(lambda m: m["frame_mass"]), "box_mass": avg(lambda m: m["box_mass"]),
            "sink_top1pct": round(float(np.mean([m["sink_top1pct"] for m in ms])), 4),
            "sink_keys": [m["sink_keys"] for m in ms], "sink_coords": ms[0]["sink_coords"],
            "out_rms": round(float(np.mean([m["out_rms"] for m in ms])), 5),
            "out_varying_rms": round(float(np.mean([m["out_varying_rms"] for m in ms])), 5),
        })
    for x in heads:
        layer = [y["out_varying_rms"] ** 2 for y in heads if (y["phase"], y["layer"]) == (x["phase"], x["layer"])]
        x["out_share"] = round(x["out_varying_rms"] ** 2 / max(sum(layer), 1e-30), 4)
    summary = {}
    for phase in phases:
        hs = [x for x in heads if x["phase"] == phase]
        if not hs:
            continue
        diffuse = [x["out_share"] for x in hs if x["blocks"]["tiled"]["0.95"] >= DIFFUSE]
        local = [x["out_share"] for x in hs if x["blocks"]["tiled"]["0.95"] <= LOCAL]
        summary[phase] = {
            "median_blocks": {o: {r: round(float(np.median([x["blocks"][o][r] for x in hs])), 4) for r in hs[0]["blocks"][o]}
                              for o in hs[0]["blocks"]},
            "mean_blocks": {o: {r: round(float(np.mean([x["blocks"][o][r] for x in hs])), 4) for r in hs[0]["blocks"][o]}
                            for o in hs[0]["blocks"]},
            "median_keys_95": round(float(np.median([x["keys_95"] for x in hs])), 4),
            "mean_frame_mass": [round(float(np.mean([x["frame_mass"][j] for x in hs])), 4) for j in range(3)],
            "mean_box_mass": [round(float(np.mean([x["box_mass"][j] for x in hs])), 4) for j in range(len(BOXES))],
            "heads_with_sinks": sum(1 for x in hs if max(x["sink_keys"]) > 0),
            # the diffuse and the local heads (tiled, 95%): how many, and their mean share of what varies
            "diffuse_heads": len(diffuse),
            "diffuse_out_share": round(float(np.mean(diffuse or [0.0])), 4),
            "local_out_share": round(float(np.mean(local or [0.0])), 4),
        }
    return {"heads": heads, "summary": summary, "videos": videos}


def measure_share(pipe, spec, size, grid, device) -> dict:
    """Dense step time and self-attention time of one transformer forward (batch 1) at ``size``."""
    from vdit_accel.cli.bench import _Clock, _SelfAttentionTimer, _time_forward

    t = pipe.transformer
    lat_t, lat_h, lat_w = grid[0], grid[1] * 2, grid[2] * 2
    dt = t.patch_embedding.weight.dtype
    g = torch.Generator("cpu").manual_seed(0)
    inputs = {"hidden_states": torch.randn(1, 16, lat_t, lat_h, lat_w, generator=g).to(device, dt),
              "timestep": torch.tensor([500.0], device=device),
              "encoder_hidden_states": torch.randn(1, spec.max_sequence_length, 64, generator=g).to(device, dt),
              "return_dict": False}
    timer = _SelfAttentionTimer(int(np.prod(grid)), _Clock(device == "cuda"))
    with timer:
        row, _ = _time_forward(t, inputs, 5, timer, cheap_warmup=False)
    row["attention_share"] = round(row["attn_ms"] / row["ms"], 4)
    return row


def measure_oracle(pipe, spec, captions, size, steps, grid, recall, warmup_frac, dense_videos, log) -> dict:
    """Generate ``captions`` with the per-call oracle block mask (see the module docstring)."""
    from vdit_accel import attention
    from vdit_accel.block_mask import BlockMask
    from vdit_accel.orders.static import tiled_order
    from vdit_accel.video import psnr, ssim

    warm = int(round(warmup_frac * steps))
    calls_per_step = 2 if spec.guidance_scale > 1 else 1
    s = grid.video_len
    nb = -(-s // BLOCK)
    densities = []

    def on_call(forward, layer, q, k, v):
        if forward // calls_per_step < warm:
            return None
        perm = tiled_order(grid, BLOCK, device=q.device)
        m = tiled_block_mass(q, k, perm)
        srt, idx = m.sort(-1, descending=True)
        need = (srt.cumsum(-1) < recall - 1e-6).sum(-1, keepdim=True) + 1
        keep = torch.zeros_like(m, dtype=torch.bool).scatter_(-1, idx, torch.arange(nb, device=q.device) < need)
        densities.append(float(keep.float().mean()))
        qt, kt, vt = (x[:, perm] for x in (q, k, v))
        out = attention(qt, kt, vt, BlockMask.from_dense(keep, s))
        res = torch.empty_like(out)
        res[:, perm] = out
        return res

    cap = _Capture(pipe.transformer, s, on_call)
    t0 = time.perf_counter()
    with cap.active():
        videos = _generate(pipe, spec, captions, 2000, size, steps)
    ps = [psnr(a / 255.0, b / 255.0) for a, b in zip(dense_videos, videos)]
    ss = [ssim(a / 255.0, b / 255.0) for a, b in zip(dense_videos, videos)]
    log(f"oracle recall {recall} warm-up {warm}/{steps}: PSNR {np.mean(ps):.1f} dB (min {min(ps):.1f}), "
        f"density {np.mean(densities):.3f} ({time.perf_counter() - t0:.0f} s)")
    return {"recall": recall, "warmup_steps": warm, "steps": steps, "psnr_db": round(float(np.mean(ps)), 2),
            "psnr_min_db": round(float(min(ps)), 2), "ssim": round(float(np.mean(ss)), 4),
            "density_sparse_steps": round(float(np.mean(densities)), 4),
            "effective_density": round(float((warm + (steps - warm) * np.mean(densities)) / steps), 4),
            "videos": videos}


def plot(doc: dict, path: Path) -> None:
    """Per phase: a layers x heads map of the tiled 95% block fraction (darker = sparser), and per order
    the heads' fractions as dots (median as a bar)."""
    from PIL import Image, ImageDraw

    phases = list(doc["summary"])
    heads = doc["heads"]
    layers = 1 + max(x["layer"] for x in heads)
    nh = 1 + max(x["head"] for x in heads)
    cell, pad, panel_w, plot_h = 28, 40, 360, 200
    width = len(phases) * (panel_w + pad) + pad
    height = 70 + layers * cell + 60 + plot_h + 40
    img = Image.new("RGB", (width, height), "white")
    dr = ImageDraw.Draw(img)
    dr.text((pad, 8), f"{doc['model']} {doc['grid']} ({doc['tokens']} tokens): fraction of 128-key blocks for 95% of the "
            "attention mass, per layer (rows) and head (columns), tiled order; darker = sparser", fill="black")
    colours = {"raster": (90, 90, 200), "tiled": (200, 60, 40), "semantic": (40, 150, 60)}
    for pi, phase in enumerate(phases):
        x0 = pad + pi * (panel_w + pad)
        dr.text((x0, 30), f"{phase} (step {next(x['step'] for x in heads if x['phase'] == phase)})", fill="black")
        for x in heads:
            if x["phase"] != phase:
                continue
            v = x["blocks"]["tiled"]["0.95"]
            g = int(255 * min(1.0, v / 0.6))
            cx, cy = x0 + x["head"] * cell, 50 + x["layer"] * cell
            dr.rectangle([cx, cy, cx + cell - 2, cy + cell - 2], fill=(g, g, 255 - g // 3))
            dr.text((cx + 3, cy + 8), f"{v:.2f}"[1:], fill="white" if g < 128 else "black")
        dr.text((x0 + nh * cell + 6, 50), "0.00 ... 0.60+", fill="gray")
        y0 = 70 + layers * cell + 30
        dr.rectangle([x0, y0, x0 + panel_w - 20, y0 + plot_h], outline="black")
        for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
            yy = y0 + plot_h - tick * plot_h
            dr.line([(x0, yy), (x0 + panel_w - 20, yy)], fill=(230, 230, 230))
            dr.text((x0 - 30, yy - 6), f"{tick:.2f}", fill="black")
        for oi, order in enumerate(ORDERS):
            xx = x0 + 40 + oi * 100
            vals = sorted(x["blocks"][order]["0.95"] for x in heads if x["phase"] == phase)
            for j, v in enumerate(vals):
                dr.ellipse([xx + (j % 8) * 5 - 2, y0 + plot_h - v * plot_h - 2, xx + (j % 8) * 5 + 2,
                            y0 + plot_h - v * plot_h + 2], fill=colours[order])
            med = float(np.median(vals))
            dr.line([(xx - 5, y0 + plot_h - med * plot_h), (xx + 45, y0 + plot_h - med * plot_h)], fill="black", width=2)
            dr.text((xx, y0 + plot_h + 5), f"{order} {med:.2f}", fill=colours[order])
    img.save(path)


def main(argv: list[str] | None = None) -> dict:
    from vdit_accel.pipelines import toy
    from vdit_accel.grid import VideoGrid
    from vdit_accel.pipelines.toy import trained

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="wan-rich", choices=sorted(trained.MODELS))
    ap.add_argument("--weights", type=Path, default=None, help="weights directory (default: shipped in the package)")
    ap.add_argument("--frames", type=int, default=None, help="default: the model's native size")
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--prompts", type=int, default=2, help="validation captions generated (one batch)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    ap.add_argument("--phases", default="early=0.1,middle=0.5,late=0.9",
                    help="name=fraction of the steps at which Q and K are read")
    ap.add_argument("--share", action="store_true", help="also time a dense forward and its self-attention")
    ap.add_argument("--oracle", action="store_true", help="also generate with the per-call oracle block mask")
    ap.add_argument("--oracle-recall", type=float, default=0.95)
    ap.add_argument("--oracle-warmup", type=float, default=0.2, help="fraction of the steps run dense first")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--git-sha", default=None, help="the commit for the result header (default: the checkout's; the "
                    "device copy's own git HEAD can be stale)")
    args = ap.parse_args(argv)
    spec = trained.model_spec(args.model)
    phases = {}
    for part in args.phases.split(","):
        name, _, frac = part.partition("=")
        phases[name] = float(frac)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    d = spec.defaults
    size = dict(num_frames=args.frames or d.frames, height=args.height or d.height, width=args.width or d.width)
    steps = args.steps or d.steps
    t, h, w = spec.grid(size["num_frames"], size["height"], size["width"])
    grid = VideoGrid(t, h, w)
    scenes = toy.rich_validation_scenes() if spec.scenes == "rich" else toy.validation_scenes()
    captions = [s.caption for s in scenes[:args.prompts]]
    tag, date, doc = run_header("attention_structure.py", argv, device, sha=args.git_sha)
    doc.update({"model": spec.name, "weights": str(args.weights or spec.weights_dir), "size": size,
                "grid": [t, h, w], "tokens": t * h * w, "steps": steps, "guidance_scale": spec.guidance_scale,
                "captions": captions, "seed_base": 2000, "block": BLOCK, "boxes": BOXES, "phases": phases})
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipe = trained.build_trained_pipeline(args.weights, dtype=dtype, model=spec).to(device)
    log = lambda msg: print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)
    t_start = time.perf_counter()
    if args.share:
        doc["share"] = measure_share(pipe, spec, size, (t, h, w), device)
        log(f"share: {doc['share']}")
    res = measure_structure(pipe, spec, captions, size, steps, phases, grid, log)
    doc.update(summary=res["summary"], heads=res["heads"])
    for phase, s in res["summary"].items():
        log(f"{phase}: median blocks@95 " + ", ".join(f"{o} {v['0.95']:.3f}" for o, v in s["median_blocks"].items())
            + f"; keys@95 {s['median_keys_95']:.3f}; frame mass {s['mean_frame_mass']}; sinks {s['heads_with_sinks']}"
            + f"; {s['diffuse_heads']} diffuse heads, mean out_share {s['diffuse_out_share']:.3f} "
              f"(local heads {s['local_out_share']:.3f})")
    if args.oracle:
        o = measure_oracle(pipe, spec, captions, size, steps, grid, args.oracle_recall, args.oracle_warmup,
                           res["videos"], log)
        o.pop("videos")
        doc["oracle"] = o
    doc["seconds"] = round(time.perf_counter() - t_start, 1)
    path = write_result(args.out_dir, f"attention-structure-{spec.name}", tag, date, doc)
    plot(doc, path.with_suffix(".png"))
    return doc


if __name__ == "__main__":
    main()
