#!/usr/bin/env bash
# The NBDiff ablation: lambda = 0.5 with block growth, lambda = 0, and no growth, at equal steps,
# then all three against the original SmolLM2 in one benchmarks/nbdiff.py run.
#
# On this machine (CPU):
#   STEPS=200 SAMPLES=8 RECIPE=recipes/nbdiff-smollm2.yaml OUT=runs/ablation RUNS=runs/ablation bash benchmarks/nbdiff_ablation.sh adapt
# On a lent GPU machine that cannot reach the network, inputs travel in .dev/ (the GGUF in two
# parts: one transfer holds 64 MiB), the step count is sized by a timing run:
#   bash benchmarks/nbdiff_ablation.sh prepare   # here: .dev/{a,b}/ with the wheel, corpus and GGUF parts
#   bash benchmarks/nbdiff_ablation.sh check     # there, carrying .dev/a: CUDA checks + step time
#   bash benchmarks/nbdiff_ablation.sh adapt     # there, carrying .dev/b: the 3 runs + evaluation
set -uo pipefail
PY=${PY:-python3}
OUT=${OUT:-gpu-out}                 # logs, metrics and the comparison table
RUNS=${RUNS:-runs/nbdiff-ablation}  # checkpoints
mkdir -p "$OUT"
STATE=/tmp/blockdiff-gpu            # outside the checkout: survives between calls on a warm machine
# the lent machine reads the inputs .dev/ brought; elsewhere the usual cache
[ -d .dev ] && DEFAULT_CACHE=$STATE/cache || DEFAULT_CACHE=$HOME/.cache/blockdiff
export BLOCKDIFF_CACHE=${BLOCKDIFF_CACHE:-$DEFAULT_CACHE} PYTHONUNBUFFERED=1
GGUF=$BLOCKDIFF_CACHE/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

RECIPE=${RECIPE:-recipes/nbdiff-smollm2-gpu.yaml}

setup() {
  export PYTHONPATH=$PWD/src:$STATE/site
  ls "$STATE"/gguf-*.whl >/dev/null 2>&1 || return 0   # a machine with the ref extras installed
  mkdir -p "$STATE/cache/smollm2"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$STATE/site" \
    "$STATE"/gguf-*.whl || exit 1
}

case "${1:-}" in
prepare)
  rm -rf .dev && mkdir -p .dev/a .dev/b
  src=${BLOCKDIFF_CACHE_SRC:-$HOME/.cache/blockdiff}
  tar -C "$src" -czf .dev/a/shakespeare.tgz shakespeare
  python3 -m pip download -q --no-deps -d .dev/a gguf==0.19.0
  half=$(( $(stat -c %s "$src/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") / 2 ))
  head -c $half "$src/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" > .dev/a/gguf.part1
  tail -c +$((half + 1)) "$src/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" > .dev/b/gguf.part2
  du -sh .dev/a .dev/b
  ;;
check)
  mkdir -p "$STATE/cache" && cp .dev/a/gguf-*.whl .dev/a/gguf.part1 "$STATE"/
  tar -C "$STATE/cache" -xzf .dev/a/shakespeare.tgz
  setup
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" benchmarks/cuda_check.py --steps-for-seconds "${SECONDS_PER_RUN:-75}" \
    --timing-seq-len 512 --timing-batch 32 --steps-file "$STATE/steps" 2>&1 | tee "$OUT/cuda_check.log"
  ;;
adapt)
  setup
  if [ -f .dev/b/gguf.part2 ]; then
    [ -f "$STATE/gguf.part1" ] || { echo "no $STATE/gguf.part1: run 'check' on this machine first" >&2; exit 1; }
    cat "$STATE/gguf.part1" .dev/b/gguf.part2 > "$GGUF"
  fi
  steps=${STEPS:-$(cat "$STATE/steps" 2>/dev/null || echo 500)}
  steps=$(( steps / 4 * 4 ))
  log=$OUT/adapt.log
  echo "steps per run: $steps" | tee "$log"
  "$PY" -m blockdiff import smollm2-135m-instruct runs/smollm2 2>&1 | tail -2 | tee -a "$log"
  run() {  # name, extra --set arguments
    local name=$1; shift
    local t0=$SECONDS sets=()
    for kv in model.base=runs/smollm2 train.steps="$steps" train.eval_every=$(( steps >= 4 ? steps / 4 : 1 )) ${EXTRA_SETS:-} "$@"; do
      sets+=(--set "$kv")
    done
    "$PY" -m blockdiff train "$RECIPE" --out "$RUNS/$name" "${sets[@]}" 2>&1 | tee -a "$log"
    echo "$name: $((SECONDS - t0)) s wall including start-up" | tee -a "$log"
    cp "$RUNS/$name/metrics.jsonl" "$OUT/$name.metrics.jsonl"
  }
  run lam0.5-growth
  run lam0-growth objective.ar_weight=0.0
  run lam0.5-nogrowth objective.growth=null
  "$PY" benchmarks/nbdiff.py --adapted "$RUNS"/lam0.5-growth "$RUNS"/lam0-growth "$RUNS"/lam0.5-nogrowth \
    --num-samples "${SAMPLES:-16}" --max-new-tokens "${NEW_TOKENS:-64}" 2>&1 | tee "$OUT/nbdiff.md"
  ;;
*)
  echo "usage: $0 prepare|check|adapt" >&2; exit 2
  ;;
esac
