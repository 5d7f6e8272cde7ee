#!/usr/bin/env bash
# One-hot vs soft-target drafters for `spec` at equal tokens (#22): self-distilled chat data, the
# two drafter recipes (identical but objective.distill), then accepted drafts per position.
#   N=600 STEPS=60 bash benchmarks/drafter.sh      # ~45 min on the 2-core CPU
set -euo pipefail
PY=${PY:-.venv/bin/python}
BD=${BD:-.venv/bin/blockdiff}
N=${N:-600}; STEPS=${STEPS:-60}; OUT=${OUT:-runs}
DATA=runs/distill/smollm2-chat.jsonl
[ -f "$DATA" ] || $BD data distill --out "$DATA" --n "$N" --max-new-tokens 192 --seq-len 288
sets=(--set "train.steps=$STEPS" --set "train.warmup=$((STEPS / 10))" --set "train.eval_every=$((STEPS / 2))")
for kind in "" "-soft"; do
  [ -f "$OUT/spec-drafter$kind/latest" ] ||
    $BD train "recipes/spec-drafter$kind-smollm2.yaml" --out "$OUT/spec-drafter$kind" "${sets[@]}"
done
$PY benchmarks/spec_acceptance.py --models smollm2-nbdiff "$OUT/spec-drafter" "$OUT/spec-drafter-soft" \
  --prompts 16 --max-new-tokens 64
