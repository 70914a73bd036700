"""Host time of a patched self-attention call, and a patched transformer in a CUDA graph.

    python benchmarks/overhead.py --out-dir benchmarks/results     # GPU -> overhead-<gpu>-<date>.json
    python benchmarks/overhead.py --cpu                            # CPU: Triton interpreter, launches stubbed

The model: the tiny Wan transformer (``build_tiny_pipeline("wan")``: 4 layers, 4 heads x 64, random
weights; the head shape of ``wan-trained``) on a 5 x 32 x 32 token grid (5,120 tokens: what ``vdit-accel
generate --large`` runs), bf16 on the GPU, patched with each strategy of ``--strategies``. Per strategy,
one row:

- ``host_us``: CPU time of one patched self-attention call from diffusers' ``dispatch_attention_fn``
  (inside the layer's processor, as in a forward) to its return: the plan lookup, our checks, the
  launches. Median over ``--reps`` rounds of ``--calls`` back-to-back calls, timed before the
  synchronize that ends each round (fewer launches than CUDA's queue holds, so the enqueue never waits
  for the GPU); ``host_us_min`` the least round (what a busy host's noise leaves).
- ``launch_us``: the same, of the attention kernel's own launch alone (``_attn_fwd[grid](...)`` with the
  arguments one call recorded). ``overhead_us = host_us - launch_us``: what our runtime adds. Issue 19's
  bound: at most 100 us for static patterns.
- ``launches``: Triton launches per call (quantized modes add their K/V quantizers; their time is in
  ``overhead_us``).
- ``gpu_us``: the call on the GPU (CUDA events; the attention at this size takes microseconds).
- ``processor_us`` / ``unpatched_processor_us``: host time of the whole self-attention module call
  (projections, prologue, attention, output) patched and with diffusers' own processor.
- ``profile``: the call's top functions by cumulative time (cProfile; the profiler's own cost inflates
  them, compare within the list only).

``cuda_graph``: the patched transformer (``--graph-strategy``, a static pattern) captured with
``torch.cuda.graph`` after two warm-up forwards and replayed; ``equal`` says whether the replay's output
has the eager forward's bits (``max_abs_diff`` otherwise). ``reduce_overhead``: the same model under
``torch.compile(mode="reduce-overhead")`` (CUDA graphs through cudagraph trees), three calls against
eager. ``step_ms``: one transformer forward, dense (diffusers' attention) and patched per strategy.

On the CPU (``--cpu``; what the tests run) the attention kernel's launch is replaced by a no-op, so
``host_us`` is our Python alone and ``launch_us`` ~0 (quantizers still run, interpreted); no processor,
step or graph timings.
"""

from __future__ import annotations

import argparse
import cProfile
import copy
import importlib
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

STRATEGIES = ["dense", "window3d:t=1,h=2,w=2", "window3d:t=1,h=2,w=2@tiled", "window3d:t=1,h=2,w=2#fp8"]
GRID = (5, 32, 32)  # latent frames, rows, columns after patchification: 5,120 tokens


def parse_strategy(spec: str):
    """``pattern[@order][#quant]`` -> a uniform Strategy."""
    from vdit_accel import Strategy

    spec, _, quant = spec.partition("#")
    pattern, _, order = spec.partition("@")
    return Strategy.uniform(pattern, order=order or None, quant=quant or None)


class LaunchRecorder:
    """Stands in for a Triton kernel: records each launch's grid and arguments, then launches the real
    kernel (or nothing, with ``stub``)."""

    def __init__(self, kernel, stub: bool):
        self.kernel, self.stub, self.launches, self.recording = kernel, stub, [], True

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self.recording:  # (the arguments hold the call's tensors: recorded for one call only)
                self.launches.append((grid, args, kwargs))
            if not self.stub:
                return self.kernel[grid](*args, **kwargs)

        return launch


def _inputs(device, dtype, grid=GRID, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    t, h, w = grid
    x = torch.randn(1, 16, t, 2 * h, 2 * w, generator=g).to(device, dtype)
    enc = torch.randn(1, 16, 32, generator=g).to(device, dtype)
    return x, torch.tensor([900.0], device=device), enc


def _forward(model, inputs):
    import torch

    with torch.no_grad():
        return model(*inputs, return_dict=False)[0]


def _rounds(fn, calls: int, reps: int, sync, best: bool = False) -> float:
    """Median (``best``: least) per-call microseconds of ``reps`` rounds of ``calls`` calls (timed before
    each round's sync)."""
    per_call = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - t0) / calls * 1e6)
        sync()
    return min(per_call) if best else statistics.median(per_call)


def _profile(fn, calls: int, top: int = 12) -> list:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    stats = pstats.Stats(prof)
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][3])[:top]
    return [[f"{Path(f).name}:{line}({name})", nc, round(tt / calls * 1e6, 1), round(ct / calls * 1e6, 1)]
            for (f, line, name), (cc, nc, tt, ct, _) in rows]


def host_overhead(transformer, strategy, device: str, dtype, calls: int = 100, reps: int = 11,
                  stub: bool = False, profile: bool = True) -> dict:
    """One row (see the module docstring) for a copy of ``transformer`` patched with ``strategy``."""
    import torch
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    import vdit_accel
    from vdit_accel.pipelines import patch_state
    from vdit_accel.pipelines.backend import running

    fwd = importlib.import_module("vdit_accel.kernels.attention")  # the launcher calls its _attn_fwd
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = copy.deepcopy(transformer)
    inputs = _inputs(device, dtype)
    dense_ms = None if stub else _step_ms(model, inputs, sync)
    attn = model.blocks[0].attn1
    captured = {}
    hook = attn.register_forward_pre_hook(lambda m, a, kw: captured.update(args=a, kwargs=kw), with_kwargs=True)
    _forward(model, inputs)
    hook.remove()
    a_args, a_kwargs = captured["args"], captured["kwargs"]
    hidden = a_args[0]
    with torch.no_grad():
        unpatched_us = None if stub else _rounds(lambda: attn(*a_args, **a_kwargs), calls, reps, sync)
    # Stubbed (CPU): only the attention call is timed; the interpreted prologue kernel would be most of a
    # forward, so the processor's own prologue runs.
    vdit_accel.patch(model, strategy, fused_prologue=not stub)
    real = fwd._attn_fwd
    recorder = fwd._attn_fwd = LaunchRecorder(real, stub)
    recorder.recording = False
    try:
        if stub:
            _forward(model, inputs)  # compiles the plans
            patched_ms = None
        else:
            patched_ms = _step_ms(model, inputs, sync)  # compiles the plans, warms the kernels
        proc = patch_state(model).processors[0]
        b, s = hidden.shape[:2]
        h = attn.heads
        q, k, v = (torch.randn(b, s, h, hidden.shape[2] // h, device=device, dtype=dtype) for _ in range(3))
        with torch.no_grad(), running(proc):
            call = lambda: dispatch_attention_fn(q, k, v, backend=proc._attention_backend)  # noqa: E731
            for _ in range(3):
                call()
            recorder.recording = True
            call()
            launches, recorder.recording = list(recorder.launches), False
            host_us = _rounds(call, calls, reps, sync)
            host_us_min = _rounds(call, calls, reps, sync, best=True)
            prof = _profile(call, calls) if profile else None
            processor_us = None if stub else _rounds(lambda: attn(*a_args, **a_kwargs), calls, reps, sync)
            gpu_us = _gpu_us(call) if cuda else None
        grid, args, kwargs = launches[-1]
        bare = (lambda: None) if stub else (lambda: real[grid](*args, **kwargs))
        launch_us = _rounds(bare, calls, reps, sync)
    finally:
        fwd._attn_fwd = real
        vdit_accel.unpatch(model)
    return {"strategy": strategy.describe(), "tokens": s, "heads": h, "host_us": round(host_us, 1),
            "host_us_min": round(host_us_min, 1),
            "launch_us": round(launch_us, 1), "overhead_us": round(host_us - launch_us, 1),
            "launches": len(launches), "gpu_us": gpu_us, "processor_us": _round(processor_us),
            "unpatched_processor_us": _round(unpatched_us), "step_ms": {"dense": dense_ms, "patched": patched_ms},
            "profile": prof}


def _round(x):
    return None if x is None else round(x, 1)


def _step_ms(model, inputs, sync, reps: int = 5) -> float:
    _forward(model, inputs)
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        _forward(model, inputs)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(times), 3)


def _gpu_us(call, reps: int = 50) -> float:
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    call()
    start.record()
    for _ in range(reps):
        call()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / reps * 1e3, 1)


def cuda_graph_check(transformer, strategy, device: str, dtype) -> dict:
    """Capture the patched transformer's forward in a CUDA graph; replay against eager."""
    import torch

    import vdit_accel

    model = copy.deepcopy(transformer)
    vdit_accel.patch(model, strategy)
    inputs = _inputs(device, dtype)
    out = {"strategy": strategy.describe()}
    try:
        eager = _forward(model, inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                _forward(model, inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            static = model(*inputs, return_dict=False)[0]
        graph.replay()
        torch.cuda.synchronize()
        out.update(captured=True, equal=bool(torch.equal(static, eager)),
                   max_abs_diff=float((static.float() - eager.float()).abs().max()))
        sync = torch.cuda.synchronize
        out["replay_ms"] = round(_rounds(graph.replay, 1, 11, sync) / 1e3, 3)
        out["eager_ms"] = _step_ms(model, inputs, sync)
    except Exception as e:  # a failed capture is the result: record what the driver or torch said
        out.update(captured=False, error=f"{type(e).__name__}: {e}"[:2000])
    try:
        compiled = torch.compile(model, mode="reduce-overhead")
        diffs = [float((_forward(compiled, inputs).float() - eager.float()).abs().max()) for _ in range(3)]
        out["reduce_overhead"] = {"ok": True, "max_abs_diff": max(diffs)}
    except Exception as e:
        out["reduce_overhead"] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
    finally:
        vdit_accel.unpatch(model)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="CPU: Triton interpreter, every launch stubbed")
    p.add_argument("--strategies", nargs="+", default=STRATEGIES, help="pattern[@order][#quant], uniform")
    p.add_argument("--graph-strategy", default="window3d:t=1,h=2,w=2")
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--reps", type=int, default=11)
    p.add_argument("--out-dir", type=Path, default=None, help="write overhead-<device>-<date>.json here")
    p.add_argument("--git-sha", default=None, help="recorded as versions.vdit_accel (default: git rev-parse)")
    args = p.parse_args(argv)
    if args.cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ["VDIT_CPU_TRITON"] = "1"
    import torch

    from result_files import run_header, write_result
    from vdit_accel.pipelines import build_tiny_pipeline

    device = "cpu" if args.cpu else "cuda"
    dtype = torch.float16 if args.cpu else torch.bfloat16
    transformer = build_tiny_pipeline("wan", seed=0).transformer.to(device, dtype)
    tag, date, doc = run_header("overhead.py", argv, device, args.git_sha)
    doc.update({"model": "tiny wan (4 layers, 4 heads x 64, random weights)", "grid": list(GRID), "dtype": str(dtype),
                "calls": args.calls, "reps": args.reps, "launches_stubbed": args.cpu, "rows": []})
    for spec in args.strategies:
        row = host_overhead(transformer, parse_strategy(spec), device, dtype, args.calls, args.reps, stub=args.cpu)
        doc["rows"].append({"spec": spec, **row})
        print({k: row[k] for k in ("strategy", "host_us", "launch_us", "overhead_us", "launches")}, flush=True)
    if not args.cpu:
        doc["cuda_graph"] = cuda_graph_check(transformer, parse_strategy(args.graph_strategy), device, dtype)
        print(doc["cuda_graph"], flush=True)
    if args.out_dir is not None:
        write_result(args.out_dir, "overhead", tag, date, doc, "-cpu" if args.cpu and tag != "cpu" else "")
    return doc


if __name__ == "__main__":
    main()
