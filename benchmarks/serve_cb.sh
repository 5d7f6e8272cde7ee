#!/bin/bash
# Continuous batching before/after: each load test against an older server (a worktree of the
# commit before it, on PYTHONPATH) and this one, back to back on the same machine.
#   git worktree add /tmp/before 76ec7d8 && bash benchmarks/serve_cb.sh /tmp/before
set -e
before=${1:?usage: serve_cb.sh WORKTREE_OF_THE_COMMIT_BEFORE}
cd "$(dirname "$0")/.."
run() {  # before|after, then serve_load arguments
  if [ "$1" = before ]; then export PYTHONPATH="$before/src"; else unset PYTHONPATH; fi
  shift
  python benchmarks/serve_load.py "$@" 2>&1 | grep -v "^$"
}
for w in before after; do echo "== $w"; run $w --model shakespeare-5m --sampler bd3 --n 96 --concurrency 16 --hostile; done
for w in before after; do echo "== $w"; run $w --model shakespeare-5m --sampler bd3 --n 96 --concurrency 32; done
for w in before after; do echo "== $w"; run $w --model smollm2-nbdiff --sampler bd3 --n 32 --concurrency 16 --lengths 16,32; done
for w in before after; do echo "== $w"; run $w --model smollm2-nbdiff --sampler ar --n 64 --concurrency 32 --lengths 32; done
