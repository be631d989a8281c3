#!/usr/bin/env bash
# The GPU machine's half of benchmarks/RESULTS.md, in parts that each fit a 10-minute slot:
#   bash benchmarks/gpu.sh OUT_DIR blip-base-float32   # the float32 reference captions
#   bash benchmarks/gpu.sh OUT_DIR blip-base-bfloat16  # captionkit's default dtype on a GPU
#   bash benchmarks/gpu.sh OUT_DIR blip2               # BLIP-2 OPT-2.7b (3.7B) in bfloat16
#   bash benchmarks/gpu.sh OUT_DIR breakdown           # bf16 batch stage by stage, GPU busy share
#   bash benchmarks/gpu.sh OUT_DIR cpu-2core           # issue 3's CPU targets on the host's CPU
#   bash benchmarks/gpu.sh OUT_DIR cpu-2core-levers    # its dtypes, and torch.compile in bf16
#   bash benchmarks/gpu.sh OUT_DIR feed                # issue 23, every contender, < 8 minutes
#   bash benchmarks/gpu.sh OUT_DIR feed-families       # ViT-GPT2 and GIT-base fed the same way, < 6 min
# The cpu-2core parts hide the GPU and pin to two cores (taskset), like the machine issue 3's CPU
# targets were set on; they need no GPU. Where the CPU has AMX, `--dtype auto` picks bf16 and
# cpu-2core measures it against a float32 naive loop (what a plain script runs).
# Each writes OUT_DIR/PART.json (cpu-2core-levers: PART-GROUP.json) and OUT_DIR/PART.log; PYTHON
# picks the interpreter (python3).
set -euo pipefail
usage="usage: gpu.sh OUT_DIR blip-base-float32|blip-base-bfloat16|blip2|breakdown|cpu-2core|cpu-2core-levers|feed|feed-families"
out=${1:?$usage}
part=${2:?$usage}
python=${PYTHON:-python3}
here=$(dirname "$0")
mkdir -p "$out"
export PYTHONUNBUFFERED=1

# Issue 23 in one go, each step under its own time limit so a slow one cannot take the others' time
# (about 6.5 minutes expected on an H100 host, the model builds and image files included;
# the limits add up to 580 s, under the 10-minute slot):
#   feed-files.json            files to model inputs per core: today / threads / nvJPEG, two image sets
#   blip-base-float32.json     float32 captions of the naive loop, captionkit (inputs made in the
#                              decoding threads) and --full-decode: identity with the naive loop
#   feed-blip-base-bf16.json   BLIP-base bf16 end to end: today / threads / graphs / nvjpeg /
#                              nvjpeg+graphs, GPU busy share,
#                              agreement with the float32 naive captions
#   feed-blip2-bf16.json       BLIP-2 OPT-2.7b bf16: today / threads / graphs / nvjpeg+graphs
# Wheels in .whl/ (say transformers==5.25.0, the release these were developed on: see
# /work/.library/device/README.md for `pip download`) are installed first, to /tmp/site.
carried_wheels() {
  local root
  root=$(cd "$here/.." && pwd)
  if compgen -G "$root/.whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$root"/.whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  export PYTHONPATH=$root/src${PYTHONPATH:+:$PYTHONPATH}
}
feed() {
  local images=128
  carried_wheels
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$python" -c "import torch, torchvision, transformers; print(torch.__version__, torchvision.__version__, transformers.__version__)"
    timeout 80 "$python" "$here/feed.py" files --device cuda --images 16 --runs 2 \
      --out "$out/feed-files.json" || echo "feed.py files: exit $?"
    timeout 130 "$python" "$here/throughput.py" --device cuda --dtype float32 --model blip-base \
      --images 64 --runs 1 --warmup 2 --pipeline-batch-sizes 32 --variants full-decode --no-memory \
      --out "$out/blip-base-float32.json" || echo "throughput.py float32: exit $?"
    timeout 170 "$python" "$here/feed.py" pipeline --device cuda --dtype bfloat16 --model blip-base \
      --images "$images" --runs 3 --warmup 64 --contenders today,threads,graphs,nvjpeg,nvjpeg+graphs \
      --compare-to "$out/blip-base-float32.json" --out "$out/feed-blip-base-bf16.json" \
      || echo "feed.py blip-base: exit $?"
    timeout 200 "$python" "$here/feed.py" pipeline --device cuda --dtype bfloat16 --model blip2-opt-2.7b \
      --images "$images" --runs 2 --warmup "$images" --contenders today,threads,graphs,nvjpeg+graphs \
      --out "$out/feed-blip2-bf16.json" || echo "feed.py blip2: exit $?"
  } 2>&1 | tee "$out/feed.log"
}
# The other families whose inputs the decoding threads make, in bf16 (limits 150 + 150 s; the
# images and models are made first when the feed part has not run on this machine):
#   feed-vit-gpt2-bf16.json, feed-git-base-bf16.json   today / threads / nvjpeg, GPU busy share
feed_families() {
  carried_wheels
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    for model in vit-gpt2 git-base; do
      timeout 150 "$python" "$here/feed.py" pipeline --device cuda --dtype bfloat16 --model "$model" \
        --images 128 --runs 2 --warmup 64 --contenders today,threads,nvjpeg \
        --out "$out/feed-$model-bf16.json" || echo "feed.py $model: exit $?"
    done
  } 2>&1 | tee "$out/feed-families.log"
}
case $part in
  blip-base-float32)
    args=(--model blip-base --dtype float32 --images 96 --pipeline-batch-sizes 8,32) ;;
  blip-base-bfloat16)
    args=(--model blip-base --dtype bfloat16 --images 96 --pipeline-batch-sizes 8,32
          --variants batch-32,workers-16 --compare-to "$out/blip-base-float32.json") ;;
  blip2)
    args=(--model blip2-opt-2.7b --dtype bfloat16 --images 64 --pipeline-batch-sizes 8,32) ;;
  breakdown|cpu-2core|cpu-2core-levers|feed|feed-families) ;;
  *) echo "unknown part $part; $usage" >&2; exit 2 ;;
esac
if [ "$part" = feed ]; then
  feed
  exit
fi
if [ "$part" = feed-families ]; then
  feed_families
  exit
fi
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
