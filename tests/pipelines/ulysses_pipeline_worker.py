"""One rank of the whole-pipeline Ulysses check (``test_ulysses.py``; ``benchmarks/ulysses_check.py`` on GPUs):
``torchrun --standalone --nproc-per-node P tests/pipelines/ulysses_pipeline_worker.py OUT [DTYPE]``.

Every rank generates with tiny pipelines (Wan 2.1, HunyuanVideo with padded text; DTYPE, default
float32; 3 denoising steps, latents out) first in one process (no parallelism), then after
:func:`vdit_accel.pipelines.parallel.enable_ulysses` (P = the world size): unpatched (diffusers'
attention), patched dense, and patched with a per-head sparse strategy in the tiled order with a dense
warm-up step, at batch 1 and 2 (two prompts of different lengths). Rank 0 saves every latent and the
all-to-all calls of its run to ``OUT``, keyed ``(family, run, batch, P)``; in another DTYPE than
float32 also each run in float32 in one process (``P = 0``): how far DTYPE's own rounding moves the
latents. gloo on the CPU; NCCL with one GPU per rank where CUDA is available.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

STEPS = 3
PROMPTS = {1: ["a red circle moving left"], 2: ["a red circle moving left", "two squares"]}
# family -> (height, width, frames, block size, per-head patterns of every layer, layers, batches)
CASES = {
    "wan": (128, 128, 9, 32, ["dense", "window3d:t=0,h=1,w=1", "window3d:t=0,h=8,w=8", "window3d:t=1,h=1,w=1"], 4, (1, 2)),
    "hunyuan_video": (128, 128, 9, 32, ["window3d:t=0,h=1,w=1", "window3d:t=1,h=0,w=0"], 4, (1, 2)),
}


def main(out_path: str, dtype_name: str = "float32") -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    from diffusers.models import attention_dispatch

    import vdit_accel
    from vdit_accel import Strategy
    from vdit_accel.pipelines import build_tiny_pipeline, tiny_defaults
    from vdit_accel.pipelines.parallel import enable_ulysses
    from vdit_accel.strategy import HeadSpec

    dtype = getattr(torch, dtype_name)
    res: dict = {"world": world, "device": str(device), "dtype": dtype_name}
    exchanges = [0]  # diffusers' Ulysses all-to-all calls (ours for HunyuanVideo go through it too)
    all_to_all = attention_dispatch._all_to_all_single

    def counted(*args, **kwargs):
        exchanges[0] += 1
        return all_to_all(*args, **kwargs)

    attention_dispatch._all_to_all_single = counted
    for family, (height, width, frames, block, per_head, layers, batches) in CASES.items():
        pipe = build_tiny_pipeline(family, seed=0, dtype=dtype).to(device)
        pipe.set_progress_bar_config(disable=True)
        d = tiny_defaults(family)
        call = dict(height=height, width=width, num_frames=frames, num_inference_steps=STEPS, output_type="latent",
                    max_sequence_length=d.max_sequence_length, **d.call_kwargs)
        strategies = {
            "unpatched": None,
            "dense": Strategy.dense(),
            "per_head_tiled_warmup": Strategy(default=HeadSpec("dense", order="tiled"), layers=[per_head] * layers,
                                              dense_warmup_steps=1),
        }

        def run(strategy, batch):
            if strategy is not None:
                vdit_accel.patch(pipe, strategy, block_size=block)
            exchanges[0] = 0
            try:
                with torch.no_grad():
                    out = pipe(prompt=PROMPTS[batch], generator=torch.Generator("cpu").manual_seed(0), **call).frames
                return torch.as_tensor(out).float().cpu(), exchanges[0]
            finally:
                if strategy is not None:
                    vdit_accel.unpatch(pipe)

        for batch in batches:
            for name, strategy in strategies.items():
                res[(family, name, batch, 1)] = run(strategy, batch)
        if dtype != torch.float32:  # the yardstick: this dtype's own rounding, on one process
            exact, pipe = pipe, build_tiny_pipeline(family, seed=0).to(device)
            pipe.set_progress_bar_config(disable=True)
            for batch in batches:
                for name, strategy in strategies.items():
                    res[(family, name, batch, 0)] = run(strategy, batch)
            pipe = exact
        enable_ulysses(pipe, world)
        for batch in batches:
            for name, strategy in strategies.items():
                res[(family, name, batch, world)] = run(strategy, batch)
        del pipe

    if rank == 0:
        torch.save(res, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
