#!/usr/bin/env bash
# One device-machine command that measures the wan-rich testbed (carry .whl): the caption check at its native
# size with three seed sets and at half the tokens (benchmarks/check_trained.py), then the attention structure,
# the self-attention share of a dense step and the per-call oracle (benchmarks/attention_structure.py).
# Usage: [SHA=<commit>] [PARTS="check structure quality"] bash benchmarks/gpu_measure_rich.sh [WEIGHTS_DIR]
# (SHA: the commit for the result headers; the device copy's own git HEAD can be stale)
# (default weights: /tmp/ckpt-wan-rich when a training command just left it on this warm machine, else the
# committed pipelines/toy/weights/wan-rich; default PARTS: check structure). Results land in $OUT: check-rich-*.json/.png,
# attention-structure-wan-rich-*.json/.png, and with quality the quality table (benchmarks/quality.py at the
# native size, quality-*.json; QUALITY_ARGS passes more arguments, e.g. "--only oracle-0.25,oracle-0.25+warmup
# --name quality-oracle" to split the table over commands of at most 10 minutes); with sweep the sampler's shift
# on the validation captions at the native size (sweep-rich-validation-*.json; SWEEP_SHIFTS, default 5 8 12 16),
# for choosing wan-rich's scheduler_shift; with check-small the check at the smallest training size, 17x128x224
# (into $OUT/small: its file name is the native check's). The check alone takes most of a 10-minute command (its
# result file's "seconds"): run it apart from structure with the oracle.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
repo=$(pwd)
weights=${1:-}
if [ -z "$weights" ]; then
  if [ -f /tmp/ckpt-wan-rich/state.json ]; then weights=/tmp/ckpt-wan-rich; else weights=$repo/pipelines/toy/weights/wan-rich; fi
fi
echo "weights: $weights"
out=$(realpath "$OUT")
parts=${PARTS:-check structure}
sha=(${SHA:+--git-sha "$SHA"})
cd /tmp  # not the checkout: its vdit_accel/ would shadow the installed package
case " $parts " in *" check "*)
python3 "$repo/benchmarks/check_trained.py" "${sha[@]}" --model wan-rich --weights "$weights" --size default half \
  --seed-base 1000 2000 3000 --out-dir "$out" 2>&1 | grep -v "^  \(ok \|BAD\)\|Warning\|rms_norm";; esac
case " $parts " in *" check-small "*)  # the smallest training size (17x128x224, 2,240 tokens): learned at all?
python3 "$repo/benchmarks/check_trained.py" "${sha[@]}" --model wan-rich --weights "$weights" --frames 17 --height 128 --width 224 \
  --seed-base 1000 --out-dir "$out/small" 2>&1 | grep -v "^  \(ok \|BAD\)\|Warning\|rms_norm";; esac
case " $parts " in *" structure "*)
python3 "$repo/benchmarks/attention_structure.py" "${sha[@]}" --model wan-rich --weights "$weights" --share --oracle \
  --out-dir "$out" 2>&1 | grep -v " layer [0-9]: \|Warning\|rms_norm";; esac
case " $parts " in *" sweep "*)
python3 "$repo/benchmarks/check_trained.py" "${sha[@]}" --model wan-rich --weights "$weights" --sweep --size default --guidance 5 \
  --steps 40 --shift ${SWEEP_SHIFTS:-5 8 12 16} --seed-bases 5000 --out-dir "$out" 2>&1 | grep -v "Warning\|rms_norm" | tail -12;; esac
case " $parts " in *" quality "*)
python3 "$repo/benchmarks/quality.py" "${sha[@]}" --model wan-rich --weights "$weights" --out-dir "$out" ${QUALITY_ARGS:-} 2>&1 \
  | grep -v "Warning\|rms_norm";; esac
ls -la "$out"
