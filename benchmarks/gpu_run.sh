#!/usr/bin/env bash
# One device-machine run: install the carried wheels and this checkout, check and time the kernels
# (benchmarks/attention.py), sweep dense configs, and generate on the GPU through the patched pipeline.
# Usage (device tool, carry .whl): SHA=<commit> bash benchmarks/gpu_run.sh [what ...]
#   what: bench sweep generate e2e overhead large tests
# (e2e: one denoising step of every real shape and row, benchmarks/e2e.py; about 6 min on an H100; overhead: the
# host time of a patched call and a CUDA-graph capture, benchmarks/overhead.py; large: generate --large, dense
# against accelerated; tests: the tests that need CUDA, skipped on the CPU; none of these four in the default set)
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
sha=${SHA:-unknown}  # pass SHA=<commit>: the device copy's own git HEAD can be stale
whats=("$@"); [ ${#whats[@]} -eq 0 ] && whats=(bench sweep generate)
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv,noheader
for what in "${whats[@]}"; do
  case $what in
    bench) python3 benchmarks/attention.py --out-dir "$OUT" --git-sha "$sha" 2>&1 | tee "$OUT/bench.log" | grep -v "^check " ;;
    sweep) python3 benchmarks/attention.py --sweep --out-dir "$OUT" --git-sha "$sha" 2>&1 | tee "$OUT/sweep.log" | tail -30 ;;
    e2e)  # from /tmp: the checkout's vdit_accel/ would shadow the installed package
      ( out=$(realpath "$OUT"); repo=$(pwd); cd /tmp && python3 "$repo/benchmarks/e2e.py" --out-dir "$out" --git-sha "$sha" 2>&1 | tee "$out/e2e.log" | grep -v '^  {' ) ;;
    overhead)
      ( out=$(realpath "$OUT"); repo=$(pwd); cd /tmp && python3 "$repo/benchmarks/overhead.py" --out-dir "$out" --git-sha "$sha" 2>&1 | tee "$out/overhead.log" ) ;;
    tests)  # real Triton (tests/conftest.py sets TRITON_INTERPRET=1 unless it is set); from /tmp with importlib
      # imports, so that neither the checkout's vdit_accel/ nor its kernels/ shadows the installed package
      ( out=$(realpath "$OUT"); repo=$(pwd); cd /tmp && TRITON_INTERPRET=0 timeout 300 python3 -m pytest -q -rs \
          -p no:cacheprovider --import-mode=importlib "$repo/tests/pipelines/test_plans.py::test_cuda_graph_capture_replays_eager" \
          "$repo/tests/sparsity_search/test_search_orders.py::test_order_overhead_measurement_on_the_gpu" 2>&1 \
          | grep -v -i "warn" | tee "$out/tests.log" | tail -15 ) ;;
    large)
      ( out=$(realpath "$OUT"); cd /tmp && python3 -m vdit_accel.cli.app generate --large --out "$out/gen/video-large.mp4" 2>&1 | tail -3 ) ;;
    generate)
      OUT=$(realpath "$OUT"); cd /tmp  # not the checkout: its vdit_accel/ would shadow the installed package
      python3 -m vdit_accel.cli.app generate --out "$OUT/gen/video.mp4" 2>&1 | tail -3
      python3 -m vdit_accel.cli.app generate --frames 33 --height 256 --width 256 --strategy "window3d:t=1,h=2,w=2+stripes:frames=0" \
        --out "$OUT/gen/video-2304tok.mp4" 2>&1 | tail -3 ;;
  esac
done
