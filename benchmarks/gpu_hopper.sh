#!/usr/bin/env bash
# Issue 22 on the GPU machine (H100/H200): the Gluon Hopper kernel's GPU tests, then one benchmark run of cuDNN,
# FlexAttention, FlashAttention-4 (dense and block-sparse), SageAttention 1.0.6 and ours (Gluon and Triton back
# ends, fp8 / int8) at the three shapes, and the quantized modes against SageAttention on the four input
# families -- in seven device commands sent back to back (the machine stays warm ~30 s between commands; /tmp
# survives then, so the peers' wheels are staged there one folder a command: benchmarks/gpu_peers.sh).
#
# Here, first:   bash benchmarks/gpu_peers.sh download         (-> .peers1 .. .peers6, git-excluded)
# Then one device command each, in this order, each carrying the one folder named (nothing for step7):
#   SHA=<commit> bash benchmarks/gpu_hopper.sh step1    carry .peers1   stage; GPU tests (~2 min)
#   bash benchmarks/gpu_hopper.sh step2 .. step5         carry .peers2 .. .peers5   stage only (seconds)
#   SHA=<commit> bash benchmarks/gpu_hopper.sh step6    carry .peers6   stage, install peers, bench cogvideox + wan,
#                                                                       quant families (~5 min)
#   SHA=<commit> bash benchmarks/gpu_hopper.sh step7    (no carry)      bench hunyuan (~3 min)
# If a step says a part is missing (the machine went cold), rerun from step1. Results land in $OUT:
# attention-<gpu>-<date>-<shape>.json per bench step, tests.log, bench-*.log.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
REPO=$(pwd)
sha=${SHA:-unknown}
PEERS=/tmp/peers-site
IMPLS="cudnn flex-dense fa4-dense ours-dense ours-triton-dense sage1 ours-fp8 ours-int8 \
flex-sparse fa4-sparse ours-sparse ours-triton-sparse ours-sparse-fp8"

site() {  # this checkout as a package in /tmp/site (from /tmp: the checkout's vdit_accel/ would shadow it)
  [ -f /tmp/site/.sha ] && [ "$(cat /tmp/site/.sha)" = "$sha-$(git rev-parse HEAD 2>/dev/null)" ] && return 0
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . || exit 1
  echo "$sha-$(git rev-parse HEAD 2>/dev/null)" > /tmp/site/.sha
}
# ours-* rows with the launcher's full choice (the default back end stays triton until the Gluon kernel's GPU
# tests pass: kernels/attention_fwd.py DEFAULT_BACKEND).
env_peers() { export PYTHONPATH=/tmp/site:$PEERS:$PEERS/nvidia_cutlass_dsl/dsl_packages PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 \
  VDIT_ATTENTION_BACKEND=${VDIT_ATTENTION_BACKEND:-auto}; }
bench() {  # bench SHAPE...: one benchmarks/attention.py run (result file suffixed by the first shape)
  ( cd /tmp && timeout 560 python3 "$REPO/benchmarks/attention.py" --shapes "$@" --impls $IMPLS --masks local perhead \
      --densities 0.5 0.25 0.1 --no-checks --out-dir "$OUT/$1" --git-sha "$sha" ${EXTRA:-} 2>&1 | tee "$OUT/bench-$1.log" \
      | grep -v "^check " | tail -60 )
}

case "${1:-}" in
step1)
  bash benchmarks/gpu_peers.sh stage .peers1
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  site; env_peers
  # The Gluon kernel against the reference, the twin and the Triton back end (tests/conftest.py would set
  # TRITON_INTERPRET=1 by default: exported 0 above).
  # From /tmp (python -m puts the working directory on sys.path; the checkout's vdit_accel/ would shadow /tmp/site).
  ( cd /tmp && timeout 420 python3 -m pytest -q -p no:cacheprovider -c "$REPO/pyproject.toml" --rootdir "$REPO" \
      "$REPO/tests/kernels/test_attention_hopper.py" -k "gpu or back_ends" 2>&1 | tee "$OUT/tests.log" | tail -30 ) ;;
step2|step3|step4|step5)
  bash benchmarks/gpu_peers.sh stage ".peers${1#step}" ;;
step6)
  bash benchmarks/gpu_peers.sh stage .peers6 && bash benchmarks/gpu_peers.sh install "$PEERS" || exit 3
  site; env_peers
  EXTRA=--quant-families bench cogvideox5b-49f-480p
  bench wan1.3b-81f-480p ;;
step7)
  site; env_peers
  [ -d "$PEERS/flash_attn" ] || echo "FA4 is not installed (the machine went cold): its rows will say skipped"
  bench hunyuan-129f-720p ;;
ncu)  # optional: tensor-pipe use of one Gluon and one Triton launch at the wan shape (needs ~1 min)
  site; env_peers
  cd /tmp && for be in gluon triton; do
    VDIT_ATTENTION_BACKEND=$be timeout 250 ncu --metrics sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__throughput.avg.pct_of_peak_sustained_elapsed,gpu__time_duration.sum \
      -k regex:_attn_fwd --launch-skip 2 --launch-count 1 python3 -c "
import torch
from vdit_accel.kernels import attention_fwd
q, k, v = (torch.randn(1, 32760, 12, 128, device='cuda', dtype=torch.bfloat16) for _ in range(3))
for _ in range(4): attention_fwd(q, k, v)
torch.cuda.synchronize()" 2>&1 | tail -8 | tee -a "$OUT/ncu.log"
  done ;;
*) sed -n 2,17p "$0"; exit 2 ;;
esac
