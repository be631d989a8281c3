#!/usr/bin/env bash
# The GPU machine's half of benchmarks/RESULTS.md, in parts that each fit a 10-minute slot:
#   bash benchmarks/gpu.sh OUT_DIR blip-base-float32   # the float32 reference captions
#   bash benchmarks/gpu.sh OUT_DIR blip-base-bfloat16  # captionkit's default dtype on a GPU
#   bash benchmarks/gpu.sh OUT_DIR blip2               # BLIP-2 OPT-2.7b (3.7B) in bfloat16
#   bash benchmarks/gpu.sh OUT_DIR breakdown           # bf16 batch stage by stage, GPU busy share
#   bash benchmarks/gpu.sh OUT_DIR cpu-2core           # issue 3's CPU targets on the host's CPU
#   bash benchmarks/gpu.sh OUT_DIR cpu-2core-levers    # its dtypes, and torch.compile in bf16
# The cpu-2core parts hide the GPU and pin to two cores (taskset), like the machine issue 3's CPU
# targets were set on; they need no GPU. Where the CPU has AMX, `--dtype auto` picks bf16 and
# cpu-2core measures it against a float32 naive loop (what a plain script runs).
# Each writes OUT_DIR/PART.json (cpu-2core-levers: PART-GROUP.json) and OUT_DIR/PART.log; PYTHON
# picks the interpreter (python3).
set -euo pipefail
usage="usage: gpu.sh OUT_DIR blip-base-float32|blip-base-bfloat16|blip2|breakdown|cpu-2core|cpu-2core-levers"
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
  breakdown|cpu-2core|cpu-2core-levers) ;;
  *) echo "unknown part $part; $usage" >&2; exit 2 ;;
esac
if [[ $part == cpu-2core* ]]; then
  cpu=(env CUDA_VISIBLE_DEVICES= taskset -c 0,1 "$python")
  {
    lscpu | grep -E "^(Model name|Thread|Core)"  # are CPUs 0 and 1 two cores or one core's two threads?
    units=$(grep -ow 'amx_bf16\|avx512_bf16' /proc/cpuinfo | sort -u | xargs || true)
    echo "bf16 units: ${units:-none (--dtype auto stays float32)}"
    if [ "$part" = cpu-2core ]; then
      "${cpu[@]}" "$here/throughput.py" --device cpu --dtype auto --naive-dtype float32 \
        --model blip-base --images 16 --pipeline-batch-sizes 16 --out "$out/$part.json"
    else
      for group in dtype compile; do
        "${cpu[@]}" "$here/levers.py" "$group" --dtype bfloat16 --out "$out/$part-$group.json"
      done
    fi
  } 2>&1 | tee "$out/$part.log"
  exit
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ "$part" = breakdown ]; then
  for model in blip-base blip2-opt-2.7b; do
    "$python" "$here/breakdown.py" --device cuda --dtype bfloat16 --model "$model" \
      --out "$out/breakdown-$model.json"
  done 2>&1 | tee "$out/$part.log"
  exit
fi
"$python" "$here/throughput.py" --device cuda "${args[@]}" --out "$out/$part.json" 2>&1 | tee "$out/$part.log"
