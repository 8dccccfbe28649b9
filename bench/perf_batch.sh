#!/usr/bin/env bash
# Every GPU measurement the performance work needs, in one call on one card, back to back, so a lent
# device is started once (docs/LOG.md, 2026-12-08). Results go to bench/results.jsonl and, with the
# logs, to $OUT (default: bench/perf_out). Run from the repository root:
#     PYTHONPATH=. bash bench/perf_batch.sh            # about 6 minutes on one H100/H200
#     PYTHONPATH=. DEVICE=cpu SMALL=1 bash bench/perf_batch.sh   # the same steps at toy sizes, to check the script
set -uo pipefail
OUT=${OUT:-bench/perf_out}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
PY=${PYTHON:-python}
py() { echo "+ python $*" | tee -a "$OUT/perf.log"; timeout 900 "$PY" "$@" 2>&1 | tee -a "$OUT/perf.log"; }
if [ "${SMALL:-0}" = 1 ]; then
  train=(--micro-batch 1 --seq-len 64 --steps 1 --n-layer 1 --n-embd 64 --n-head 2 --vocab-size 512)
  dec=(--preset tiny --prompt-len 16 --new-tokens 8 --repeats 1)
  prof=(--micro-batch 1 --seq-len 64 --new-tokens 8 --calls 1)
  graph=gen+stats  # CUDA graphs need CUDA
else
  train=(--micro-batch 32 --seq-len 1024 --steps 10 --repeats 2)
  dec=(--new-tokens 256 --repeats 3)
  prof=(--micro-batch 32 --new-tokens 256 --calls 3)
  graph=graph+stats
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null | tee -a "$OUT/perf.log"
# Training: eager bf16 and fp16 (the M4's path) and compiled bf16, each beside HF in the same call.
py bench/train_step.py --device "$DEVICE" "${train[@]}" --modes bf16 hf:bf16 fp16 fp16+math
[ "$DEVICE" = cuda ] && py bench/train_step.py --device "$DEVICE" "${train[@]}" --modes bf16+compile hf:bf16+compile  # flex backward: CUDA only
# Decode, batch 1: bf16 and fp16 (the M4's dtype), every generate() path beside HF; the compiled row
# with the per-layer cache (it copied every layer's cache per token before).
for dt in bf16 fp16; do
  py bench/decode.py --device "$DEVICE" --dtype "$dt" "${dec[@]}" --rows bare gen gen+stats graph graph+stats compiled hf hf:static
done
# Where the time goes after the changes.
py bench/profile_step.py --device "$DEVICE" --what train --mode "$([ "$DEVICE" = cuda ] && echo bf16+compile || echo fp32)" "${prof[@]}"
py bench/profile_step.py --device "$DEVICE" --what decode --row "$graph" --dtype bf16 "${prof[@]}"
cp bench/results.jsonl "$OUT/results.jsonl"
