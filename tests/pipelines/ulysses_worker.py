"""One rank of the Ulysses check: ``torchrun --standalone --nproc-per-node 2 tests/pipelines/ulysses_worker.py OUT``.

Runs the tiny Wan transformer (4 heads, grid 3 x 8 x 8 = 192 tokens) without parallelism and under
diffusers' Ulysses context parallelism (``enable_parallelism(ContextParallelConfig(ulysses_degree=P))``,
P = the world size), patched with vdit-accel, and rank 0 saves every output to ``OUT`` (a torch file)
for ``test_ulysses.py`` to compare. gloo on the CPU (its all_to_all_single carries Ulysses' exchange),
NCCL with one GPU per rank where CUDA is available (the same check on GPUs).
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist

# Per-head patterns (global head index -> pattern) of every layer: heads 2 and 3, which rank 1 of
# P = 2 attends, differ from heads 0 and 1, so indexing local heads as global ones changes the output.
PER_HEAD = ["dense", "window3d:t=0,h=1,w=1", "window3d:t=0,h=8,w=8", "window3d:t=1,h=1,w=1"]


def main(out_path: str) -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
        # diffusers' enable_parallelism places rank r on device `r % torch.accelerator.device_count()`,
        # a division by zero on a machine without an accelerator; the CPU is one device.
        torch.accelerator.device_count = lambda: 1

    from diffusers import ContextParallelConfig

    import vdit_accel
    from vdit_accel import Strategy
    from vdit_accel.pipelines import build_tiny_pipeline

    def per_head(heads):
        return Strategy(layers=[list(heads)] * 4)

    n = len(PER_HEAD) // world
    # What a backend that took rank r's local head h for global head h would apply: heads [0, n) again.
    local_indexed = [PER_HEAD[h % n] for h in range(len(PER_HEAD))]
    strategies = {"dense": "dense", "per_head": per_head(PER_HEAD), "local_indexed": per_head(local_indexed)}

    tr = build_tiny_pipeline("wan", seed=0).transformer.to(device)
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 3, 16, 16, generator=g).to(device),
        timestep=torch.tensor([500.0], device=device),
        encoder_hidden_states=torch.randn(1, 16, 32, generator=g).to(device),
        return_dict=False,
    )

    def run(model):
        with torch.no_grad():
            return model(**inputs)[0].float().cpu()

    def patched(model, strategy):
        vdit_accel.patch(model, strategy, block_size=32)
        try:
            return run(model)
        finally:
            vdit_accel.unpatch(model)

    res = {"world": world, "device": str(device), "base": run(tr)}
    for name, strategy in strategies.items():
        res[name] = patched(tr, strategy)

    cp = lambda: ContextParallelConfig(ulysses_degree=world)  # noqa: E731
    # Patched first: enable_parallelism must accept the "vdit" backend of the patched processors.
    par = copy.deepcopy(tr)
    vdit_accel.patch(par, "dense", block_size=32)
    par.enable_parallelism(config=cp())
    res["cp_dense"] = run(par)
    vdit_accel.unpatch(par)
    res["cp_unpatched"] = run(par)  # the restored processors keep the parallel config
    res["cp_per_head"] = patched(par, strategies["per_head"])
    # Parallel first, patched after (the patched processors inherit the parallel config).
    par2 = copy.deepcopy(tr)
    par2.enable_parallelism(config=cp())
    res["cp_per_head_patched_after"] = patched(par2, strategies["per_head"])
    # The backend set directly, no patch: dense through our attention.
    par3 = copy.deepcopy(tr)
    par3.set_attention_backend("vdit")
    par3.enable_parallelism(config=cp())
    res["cp_backend_only"] = run(par3)

    if rank == 0:
        torch.save(res, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
