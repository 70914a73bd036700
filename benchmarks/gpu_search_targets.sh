#!/usr/bin/env bash
# Issue 21's table on the wan-rich testbed in one device-machine command (carry .whl): the searched strategy
# against window3d raster/tiled, the semantic order, radial and sta, each tuned to the same PSNR on the
# validation prompts (benchmarks/search_targets.py), and the searched strategy of the highest target that held
# shipped as $OUT/wan-rich.json (commit it as cli/strategies/wan-rich.json: `vdit-accel generate --model wan-rich`
# then runs it). Usage:
#   bash benchmarks/gpu_search_targets.sh            # targets 30 and 35 dB
#   bash benchmarks/gpu_search_targets.sh 30         # one target per command, where one command's time is short
# Results land in $OUT: search-targets-<gpu>-<date>[-<T>db].json, wan-rich.json.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then targets=(30 35); fi
suffix=""
if [ ${#targets[@]} -eq 1 ]; then suffix="-${targets[0]}db"; fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
repo=$(pwd)
out=$(realpath "$OUT")
cd /tmp  # not the checkout: its vdit_accel/ would shadow the installed package
python3 "$repo/benchmarks/search_targets.py" --model wan-rich --targets "${targets[@]}" --calibration 2 --validation 4 \
  --max-probes 10 --suffix "$suffix" --out-dir "$out" --ship "$out/wan-rich.json" 2>&1 | grep -v "Warning\|rms_norm"
ls -la "$out"
