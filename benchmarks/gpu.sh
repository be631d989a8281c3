#!/usr/bin/env bash
# The CUDA half of benchmarks/RESULTS.md, in four parts that each fit a 10-minute slot:
#   bash benchmarks/gpu.sh OUT_DIR blip-base-float32   # the float32 reference captions
#   bash benchmarks/gpu.sh OUT_DIR blip-base-bfloat16  # captionkit's default dtype on a GPU
#   bash benchmarks/gpu.sh OUT_DIR blip2               # BLIP-2 OPT-2.7b (3.7B) in bfloat16
#   bash benchmarks/gpu.sh OUT_DIR breakdown           # bf16 batch stage by stage, GPU busy share
# Each writes OUT_DIR/PART.json and OUT_DIR/PART.log. PYTHON picks the interpreter (python3).
set -euo pipefail
usage="usage: gpu.sh OUT_DIR blip-base-float32|blip-base-bfloat16|blip2|breakdown"
out=${1:?$usage}
part=${2:?$usage}
python=${PYTHON:-python3}
here=$(dirname "$0")
mkdir -p "$out"
export PYTHONUNBUFFERED=1
case $part in
  blip-base-float32)
    args=(--model blip-base --dtype float32 --images 96 --pipeline-batch-sizes 8,32) ;;
  blip-base-bfloat16)
    args=(--model blip-base --dtype bfloat16 --images 96 --pipeline-batch-sizes 8,32
          --variants batch-32,workers-16 --compare-to "$out/blip-base-float32.json") ;;
  blip2)
    args=(--model blip2-opt-2.7b --dtype bfloat16 --images 64 --pipeline-batch-sizes 8,32) ;;
  breakdown) ;;
  *) echo "unknown part $part; $usage" >&2; exit 2 ;;
esac
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ "$part" = breakdown ]; then
  for model in blip-base blip2-opt-2.7b; do
    "$python" "$here/breakdown.py" --device cuda --dtype bfloat16 --model "$model" \
      --out "$out/breakdown-$model.json"
  done 2>&1 | tee "$out/$part.log"
  exit
fi
"$python" "$here/throughput.py" --device cuda "${args[@]}" --out "$out/$part.json" 2>&1 | tee "$out/$part.log"
