#!/usr/bin/env bash
# Issue 24 on P H200s in one device-machine command (carry .whl: diffusers 0.42.1 and its needs):
#   bench   one denoising step of Wan2.1-14B 720p and HunyuanVideo 720p (random weights, real configs, bf16) on P
#           GPUs by Ulysses: dense cuDNN (diffusers' attention, parallelised), ours dense, ours window3d ~0.15 in the
#           tiled order, the same with fp8; step and all-to-all times per row, and with the P = 1 file (in $OUT or
#           benchmarks/results/: run P = 1 first and put its file there) the speed-up over one GPU and the efficiency.
#           -> ulysses-<gpu>-<date>-p<P>.json
#   check   the same output on P GPUs as on one, in bf16 (tiny pipelines; within bf16's own rounding; P >= 2)
#           -> ulysses-<gpu>-<date>-p<P>-check.json
#   search  the offline search on P GPUs against one, the same prompts (wan-rich, native size; P >= 2)
#           -> search-<gpu>-<date>-sharded-p<P>.json (its prompts, strategies and logs in search-p<P>/)
# Usage:  SHA=<commit> bash benchmarks/gpu_ulysses.sh P [bench|check|search ...]   (default: bench, and check if P >= 2)
#         SMOKE=1 OUT=/tmp/u bash benchmarks/gpu_ulysses.sh P ...   the same commands at CPU size (gloo), no GPU
# Each part fits one command of 10 minutes on an H200 node (estimates from the H100 step times in BENCHMARKS.md:
# bench at P = 1 about 5 to 6 min, kernel compilation included; check about 2 min; search: see its log).
set -uo pipefail
P=${1:?usage: bash benchmarks/gpu_ulysses.sh P [bench|check|search ...]}
shift
OUT=${OUT:-out}
mkdir -p "$OUT"
sha=${SHA:-unknown}
repo=$(pwd)
out=$(realpath "$OUT")
whats=("$@")
if [ ${#whats[@]} -eq 0 ]; then whats=(bench); [ "$P" -ge 2 ] && whats+=(check); fi
if [ -n "${SMOKE:-}" ]; then
  gpu=cpu; size=(--shape tiny-wan --shape tiny-hunyuan --device cpu --block-size 16); check=(--device cpu); search=(--smoke)
  export CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=1
else
  gpu=nvidia-h200; size=(--shape wan2.1-14b-720p --shape hunyuan-720p); check=(); search=()
  # NVLink multicast stays off (KINDS.md): a program using it can take the host's GPUs out of service.
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . || exit 1
  export PYTHONPATH=/tmp/site
  nvidia-smi --query-gpu=index,name,clocks.sm,temperature.gpu,power.draw --format=csv,noheader
  python3 -c "import torch; n = torch.cuda.device_count(); print(n, 'GPUs'); exit(0 if n >= $P else 3)" \
    || { echo "P=$P needs $P GPUs"; exit 3; }
  cd /tmp  # not the checkout: its vdit_accel/ would shadow the installed package
fi
export PYTHONUNBUFFERED=1
for what in "${whats[@]}"; do
  case $what in
    bench)
      args=(bench pipeline "${size[@]}" --variants dense-cudnn,ours-dense,ours-window3d-0.15-tiled,ours-window3d-0.15-tiled-fp8
            --ulysses "$P" --git-sha "$sha" --out-dir "$out")
      base=$(ls "$out"/ulysses-$gpu-*-p1.json "$repo"/benchmarks/results/ulysses-$gpu-*-p1.json 2>/dev/null | head -1)
      if [ "$P" -ge 2 ]; then
        if [ -n "$base" ]; then args+=(--baseline "$base"); else echo "no ulysses-$gpu-*-p1.json: no efficiency column"; fi
        run=(python3 -m torch.distributed.run --standalone --nproc-per-node "$P" -m vdit_accel.cli.app)
      else
        run=(python3 -m vdit_accel.cli.app)
      fi
      "${run[@]}" "${args[@]}" 2>&1 | grep -v "Warning\|warn(" | tee "$out/bench-p$P.log" | grep -v '^  {' ;;
    check)
      python3 "$repo/benchmarks/ulysses_check.py" --nproc "$P" "${check[@]}" --out-dir "$out" --git-sha "$sha" 2>&1 \
        | tail -14 ;;
    search)
      python3 "$repo/benchmarks/sharded_search.py" --nproc "$P" "${search[@]}" --out-dir "$out" --work-dir "$out/search-p$P" \
        --git-sha "$sha" 2>&1 | tail -4 ;;
    *) echo "unknown part $what (bench, check, search)"; exit 2 ;;
  esac
done
ls -la "$out"
