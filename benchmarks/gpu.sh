#!/usr/bin/env bash
# The CUDA half of benchmarks/RESULTS.md, in three parts that each fit a 10-minute slot:
#   bash benchmarks/gpu.sh OUT_DIR blip-base-float32   # the float32 reference captions
#   bash benchmarks/gpu.sh OUT_DIR blip-base-bfloat16  # captionkit's default dtype on a GPU
#   bash benchmarks/gpu.sh OUT_DIR blip2               # BLIP-2 OPT-2.7b (3.7B) in bfloat16
# Each writes OUT_DIR/PART.json and OUT_DIR/PART.log. PYTHON picks the interpreter (python3).
set -euo pipefail
usage="usage: gpu.sh OUT_DIR blip-base-float32|blip-base-bfloat16|blip2"
out=${1:?$usage}
part=${2:?$usage}
python=${PYTHON:-python3}
throughput="$(dirname "$0")/throughput.py"
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
  *) echo "unknown part $part; $usage" >&2; exit 2 ;;
esac
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$python" "$throughput" --device cuda "${args[@]}" --out "$out/$part.json" 2>&1 | tee "$out/$part.log"
