#!/usr/bin/env bash
# Stitching diffusion reasoning on countdown_chain, end to end (the BENCHMARKS.md table):
#   1. PRM data: the diffusion model's own rollouts on training questions, each step labelled by
#      K Monte-Carlo completions checked by the task's checker;
#   2. the PRM: the table's AR model fine-tuned to answer +/- (recipes/stitch-prm-countdown.yaml);
#   3. solver data: stitched contexts of other training questions -> reference answers;
#   4. the solver: the AR model fine-tuned to read them (recipes/stitch-solver-countdown.yaml);
#   5. every method on the same held-out rollouts, with costs.
# Needs the countdown table's models: blockdiff eval table recipes/reasoning-countdown-chain.yaml --out runs/table-cd4
# Each finished step is skipped on a rerun.
#   bash benchmarks/stitch.sh   (env overrides: TABLE, DIFF, AR, OUT, QUESTIONS, SOLVER_QUESTIONS, N, TEMP, STEPS)
set -euo pipefail
BIN=${BIN:-.venv/bin}
TABLE=${TABLE:-runs/table-cd4}
DIFF=${DIFF:-$TABLE/mdlm-mgdm}
AR=${AR:-$TABLE/ar}
OUT=${OUT:-runs/stitch}
QUESTIONS=${QUESTIONS:-400}
SOLVER_QUESTIONS=${SOLVER_QUESTIONS:-3000}
N=${N:-200}
TEMP=${TEMP:-1.0}
STEPS=${STEPS:-10}
ROLL=(--task countdown_chain --model "$DIFF" --sampler llada --block-size 64 --steps "$STEPS"
      --temperature "$TEMP" --sep ,)
mkdir -p "$OUT"
[ -f "$OUT/prm.jsonl" ] || "$BIN/blockdiff" reason prm-data "${ROLL[@]}" --questions "$QUESTIONS" --k 4 \
    --out "$OUT/prm.jsonl"
[ -f "$OUT/prm/latest" ] || "$BIN/blockdiff" train recipes/stitch-prm-countdown.yaml --out "$OUT/prm" \
    --set model.base="$AR" --set data.corpus="$OUT/prm.jsonl"
[ -f "$OUT/solver.jsonl" ] || "$BIN/blockdiff" reason solver-data "${ROLL[@]}" --scorer "prm:$OUT/prm" --cap 8 \
    --max-prompt-tokens 188 --questions "$SOLVER_QUESTIONS" --question-seed 3000000 --out "$OUT/solver.jsonl"
[ -f "$OUT/solver/latest" ] || "$BIN/blockdiff" train recipes/stitch-solver-countdown.yaml --out "$OUT/solver" \
    --set model.base="$AR" --set data.corpus="$OUT/solver.jsonl"
"$BIN/blockdiff" reason stitch "${ROLL[@]}" --n "$N" --scorer "prm:$OUT/prm" --scorer "logprob:$AR" \
    --scorer oracle --solver "$OUT/solver" --ar-model "$AR" --solver-tokens 36 --long-steps 40 --cap 8 \
    --out "$OUT/results.json"
