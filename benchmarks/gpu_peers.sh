#!/usr/bin/env bash
# The benchmark's peers as wheels for the GPU machine: FlashAttention-4 (flash-attn-4 4.0.0b36, CuTe DSL, with
# its CUTLASS DSL libraries) and SageAttention 1.0.6 (pure Python + Triton, one 20 KB wheel).
#
# A command sent to the GPU machine carries the checkout and its carried folders, 64 MiB in all; the tracked
# files take most of it, and FA4's CUDA library wheel alone is 92 MB. So the wheels travel in folders
# .peers1/ .. .peersN/ (git-excluded), each no larger than what the checkout leaves (computed at download:
# 64 MiB - tracked files - 1 MiB), the big wheel cut in parts. /tmp survives between commands while the machine
# is warm (about 30 s after a command), so the parts are staged into /tmp/peers one command each, back to
# back, and the last command installs (benchmarks/gpu_hopper.sh runs the whole chain).
#
# Here, in the repository root:   bash benchmarks/gpu_peers.sh download      (prints the folders and sizes)
# On the GPU machine, carry one folder a command:
#   bash benchmarks/gpu_peers.sh stage .peers1        (... one per folder, any order)
#   bash benchmarks/gpu_peers.sh install               (all parts present: joins, installs into /tmp/peers-site)
#   export PYTHONPATH=/tmp/peers-site:/tmp/peers-site/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH
# A part missing at install (the machine went cold between commands) is named: stage it again.
#
# Facts (from ../shared/tools/fa4-wheels.sh, found the hard way): all wheels in ONE `pip install --target` (a
# second call with --upgrade replaces the first's nvidia_cutlass_dsl folder); --target skips the .pth, so
# nvidia_cutlass_dsl/dsl_packages must be on PYTHONPATH; `cutlass.cute` comes in nvidia-cutlass-dsl-libs-core.
set -euo pipefail
V=4.8.1
STAGE=/tmp/peers
case "${1:-}" in
download)
  d=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$d" \
    flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==$V nvidia-cutlass-dsl-libs-base==$V nvidia-cutlass-dsl-libs-core==$V \
    nvidia-cutlass-dsl-libs-cu13==$V "apache-tvm-ffi<0.2,>=0.1.11" torch-c-dlpack-ext quack-kernels==0.6.5 \
    sageattention==1.0.6
  tracked=$(git ls-files -z | du --files0-from=- -cb 2>/dev/null | tail -1 | cut -f1)
  budget=$(( 64 * 1024 * 1024 - tracked - 1024 * 1024 ))
  [ "$budget" -gt $((4 * 1024 * 1024)) ] || { echo "the checkout leaves only $budget bytes a command: too little"; exit 1; }
  rm -rf .peers*/
  big=$(ls "$d"/nvidia_cutlass_dsl_libs_cu13-*.whl)
  n=1; used=0; mkdir -p .peers1
  for w in "$d"/*.whl; do  # the small wheels first, all in .peers1 (they are about 10 MB)
    [ "$w" = "$big" ] && continue
    mv "$w" .peers1/; used=$((used + $(stat -c %s .peers1/"$(basename "$w")")))
  done
  [ "$used" -lt "$budget" ] || { echo "the small wheels ($used bytes) exceed one command's budget ($budget)"; exit 1; }
  size=$(stat -c %s "$big"); off=0; part=0
  while [ "$off" -lt "$size" ]; do
    room=$((budget - used))
    if [ "$room" -lt $((1024 * 1024)) ]; then n=$((n + 1)); mkdir -p .peers$n; used=0; room=$budget; fi
    take=$(( room < size - off ? room : size - off ))
    printf -v name 'cu13part_%02d' "$part"
    dd if="$big" of=.peers$n/"$name" bs=1M iflag=skip_bytes,count_bytes skip="$off" count="$take" status=none
    off=$((off + take)); used=$((used + take)); part=$((part + 1))
  done
  basename "$big" > .peers1/NAME; echo "$part" > .peers1/PARTS
  ( cd "$d" && sha256sum "$(basename "$big")" | cut -d' ' -f1 ) > .peers1/SHA256
  for f in .peers*/; do grep -qx "/${f%/}/" "$(git rev-parse --git-common-dir)/info/exclude" 2>/dev/null \
    || echo "/${f%/}/" >> "$(git rev-parse --git-common-dir)/info/exclude"; done
  rm -rf "$d"
  echo "per-command budget $budget bytes (tracked files $tracked)"; du -sb .peers*/ ;;
stage)
  mkdir -p "$STAGE" && cp "${2:?folder}"/* "$STAGE"/ && echo "staged $2: $(ls "$STAGE" | tr '\n' ' ')" ;;
install)
  target=${2:-/tmp/peers-site}; cd "$STAGE"
  [ -f PARTS ] || { echo "stage .peers1 first (it holds NAME, PARTS and the small wheels)"; exit 3; }
  n=$(cat PARTS); have=$(ls cu13part_* 2>/dev/null | wc -l)
  [ "$have" -eq "$n" ] || { echo "have $have of $n parts ($(ls cu13part_* 2>/dev/null | tr '\n' ' ')): stage the missing folders again"; exit 3; }
  cat cu13part_* > "$(cat NAME)"
  echo "$(cat SHA256)  $(cat NAME)" | sha256sum -c --quiet || { echo "the joined wheel's checksum differs"; exit 3; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$target" ./*.whl
  PYTHONPATH="$target:$target/nvidia_cutlass_dsl/dsl_packages:${PYTHONPATH:-}" python3 -c \
    "import flash_attn.cute.interface, sageattention; print('flash-attn-4 and sageattention ready')" ;;
*) sed -n 2,22p "$0"; exit 2 ;;
esac
