#!/usr/bin/env bash
# Stitching diffusion reasoning end to end (the BENCHMARKS.md table), for TASK=mini_sudoku_digits
# (default) or TASK=countdown_chain:
#   1. PRM data: the diffusion model's own cheap rollouts on training questions, each step
#      labelled by K Monte-Carlo completions checked by the task's checker;
#   2. the PRM: the task's AR model fine-tuned to answer +/- (recipes/stitch-prm.yaml);
#   3. solver data: stitched contexts of other training questions -> reference answers;
#   4. the solver: the AR model fine-tuned to read them (recipes/stitch-solver.yaml);
#   5. every method on the same held-out rollouts, with costs.
# Needs the task's table models (DIFF, AR), e.g.
#   blockdiff eval table recipes/reasoning-mini_sudoku-digits.yaml --out runs/table-ms-digits
# Each finished step is skipped on a rerun.
#   bash benchmarks/stitch.sh   (env: TASK, DIFF, AR, OUT, QUESTIONS, SOLVER_QUESTIONS, N, TEMP)
set -euo pipefail
BIN=${BIN:-.venv/bin}
TASK=${TASK:-mini_sudoku_digits}
QUESTIONS=${QUESTIONS:-400}
SOLVER_QUESTIONS=${SOLVER_QUESTIONS:-3000}
N=${N:-200}
TEMP=${TEMP:-1.0}
case "$TASK" in
  mini_sudoku_digits)  # 4 rollouts x 2 steps = 8 NFEs against one rollout of 8 steps
    TABLE=${TABLE:-runs/table-ms-digits}; OUT=${OUT:-runs/stitch-ms}
    ROLL=(--sampler llada --block-size 17 --steps 2 --sep chunks:4)
    PRM_LEN=40; SOLVER_LEN=192; ANSWER=17; LONG=8 ;;
  countdown_chain)  # 4 rollouts x 10 steps = 40 NFEs against one rollout of 40 steps
    TABLE=${TABLE:-runs/table-cd4}; OUT=${OUT:-runs/stitch-cd4}
    ROLL=(--sampler llada --block-size 64 --steps 10 --sep ,)
    PRM_LEN=64; SOLVER_LEN=224; ANSWER=36; LONG=40 ;;
  *) echo "TASK must be mini_sudoku_digits or countdown_chain" >&2; exit 2 ;;
esac
DIFF=${DIFF:-$TABLE/mdlm-mgdm}
AR=${AR:-$TABLE/ar}
ROLL=(--task "$TASK" --model "$DIFF" "${ROLL[@]}" --temperature "$TEMP")
mkdir -p "$OUT"
[ -f "$OUT/prm.jsonl" ] || "$BIN/blockdiff" reason prm-data "${ROLL[@]}" --questions "$QUESTIONS" --k 4 \
    --out "$OUT/prm.jsonl"
[ -f "$OUT/prm/latest" ] || "$BIN/blockdiff" train recipes/stitch-prm.yaml --out "$OUT/prm" \
    --set model.base="$AR" --set data.corpus="$OUT/prm.jsonl" --set model.max_position_embeddings=$PRM_LEN \
    --set data.seq_len=$PRM_LEN
[ -f "$OUT/solver.jsonl" ] || "$BIN/blockdiff" reason solver-data "${ROLL[@]}" --scorer "prm:$OUT/prm" --cap 8 \
    --max-prompt-tokens $((SOLVER_LEN - ANSWER)) --questions "$SOLVER_QUESTIONS" --question-seed 3000000 \
    --out "$OUT/solver.jsonl"
[ -f "$OUT/solver/latest" ] || "$BIN/blockdiff" train recipes/stitch-solver.yaml --out "$OUT/solver" \
    --set model.base="$AR" --set data.corpus="$OUT/solver.jsonl" \
    --set model.max_position_embeddings=$SOLVER_LEN --set data.seq_len=$SOLVER_LEN
"$BIN/blockdiff" reason stitch "${ROLL[@]}" --n "$N" --scorer "prm:$OUT/prm" --scorer "logprob:$AR" \
    --scorer oracle --solver "$OUT/solver" --ar-model "$AR" --solver-tokens $ANSWER --long-steps $LONG --cap 8 \
    --out "$OUT/results.json"
