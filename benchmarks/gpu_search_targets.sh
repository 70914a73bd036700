#!/usr/bin/env bash
# One device-machine command per PSNR target for issue 21's table on the wan-rich testbed (carry .whl): the
# searched strategy against window3d raster/tiled, the semantic order, radial and sta, each tuned to the same
# PSNR on the validation prompts (benchmarks/search_targets.py). Usage:
#   bash benchmarks/gpu_search_targets.sh 30      # then: bash benchmarks/gpu_search_targets.sh 35 --ship
# Results land in $OUT: search-targets-<gpu>-<date>-<T>db.json (rename nothing: readme_tables reads them), and
# with --ship the searched strategy of the target as wan-rich.json (commit it as cli/strategies/wan-rich.json).
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
target=${1:?give the PSNR target in dB}
shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
repo=$(pwd)
out=$(realpath "$OUT")
ship=()
if [ "${1:-}" = "--ship" ]; then ship=(--ship "$out/wan-rich.json"); fi
cd /tmp  # not the checkout: its vdit_accel/ would shadow the installed package
python3 "$repo/benchmarks/search_targets.py" --model wan-rich --targets "$target" --calibration 2 --validation 4 \
  --max-probes 10 --suffix "-${target}db" --out-dir "$out" "${ship[@]}" 2>&1 | grep -v "Warning\|rms_norm"
ls -la "$out"
