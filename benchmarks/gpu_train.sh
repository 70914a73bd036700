#!/usr/bin/env bash
# One training command on the device machine (python -m vdit_accel.pipelines.toy.train), resumable across commands and sessions.
# Usage (device tool, carry .whl and, to resume from a checkpoint brought back earlier, .ckpt):
#   bash benchmarks/gpu_train.sh MODEL [vdit_accel.pipelines.toy.train args ...]
# Resumes from /tmp/ckpt-MODEL (left by the previous command on a still-warm machine) if it is there, else
# from .ckpt/MODEL (carried), else from pipelines/toy/weights/MODEL when it holds a state.json (the committed
# checkpoint between sessions: the shippable EMA weights; training goes on from them), else starts
# (pass --init-from etc. then). The checkpoint is written to
# /tmp/ckpt-MODEL and packed into $OUT as ckpt.tar.part-* (15 MB each: the device returns files of at most
# 16 MiB); unpack here with: cat DIR/ckpt.tar.part-* | tar x -C .ckpt/MODEL
set -uo pipefail
model=$1; shift
OUT=${OUT:-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
repo=$(pwd)
ck=/tmp/ckpt-$model
resume=()
if [ -f "$ck/state.json" ]; then resume=(--resume "$ck"); echo "resuming from $ck (warm machine)";
elif [ -f ".ckpt/$model/state.json" ]; then resume=(--resume "$repo/.ckpt/$model"); echo "resuming from .ckpt/$model";
elif [ -f "pipelines/toy/weights/$model/state.json" ]; then resume=(--resume "$repo/pipelines/toy/weights/$model");
  echo "resuming from pipelines/toy/weights/$model";
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv,noheader
# From /tmp: the checkout's vdit_accel/ would shadow the installed package.
( cd /tmp && python3 -m vdit_accel.pipelines.toy.train --model "$model" "${resume[@]}" --out "$ck.new" "$@" ) 2>&1 | tee "$OUT/train.log"
rc=${PIPESTATUS[0]}
if [ -f "$ck.new/state.json" ]; then rm -rf "$ck" && mv "$ck.new" "$ck"; fi
tar cf - -C "$ck" . | split -b 15M - "$OUT/ckpt.tar.part-"
ls -la "$OUT"
exit "$rc"
