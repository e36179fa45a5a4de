#!/bin/bash
# The iterative-pruning evidence of docs/results.md: SmolLM2 to 4/2/768 with the same total token budget
# (B tokens, default 48,000) in 1, 2 and 4 shots, with each recovery method, and with the least-squares refit
# after every shot (the default; the other runs slice only); then transact eval of every result and of the dense model, and one summary table. About
# an hour on a 2-core CPU.
#
#     bash benchmarks/iterative_evidence.sh [OUT_ROOT] [BUDGET]
set -eu
ROOT=${1:-runs/iterative}
B=${2:-48000}
R=docs/recipes/smollm2-half.yaml
T=.venv/bin/transact
run() { name=$1; shift; [ -f "$ROOT/$name/report.json" ] || $T run $R out="$ROOT/$name" "$@" --quiet; }
run 1shot-none shots=1 training.tokens_per_shot=0 reconstruct=false
run 1shot-full shots=1 training.tokens_per_shot=$B reconstruct=false
run 2shot-full shots=2 training.tokens_per_shot=$((B / 2)) reconstruct=false
run 4shot-full shots=4 training.tokens_per_shot=$((B / 4)) reconstruct=false
run 2shot-lora shots=2 training.tokens_per_shot=$((B / 2)) training.method=lora training.lr=1e-3 reconstruct=false
run 2shot-kd shots=2 training.tokens_per_shot=$((B / 2)) training.method=kd reconstruct=false
run 1shot-full-refit shots=1 training.tokens_per_shot=$B reconstruct=true
run 2shot-full-refit shots=2 training.tokens_per_shot=$((B / 2)) reconstruct=true
ev() { [ -f "$2" ] || $T eval "$1" --tasks piqa,lambada --limit 200 --json "$2" --quiet; }
ev builtin:smollm2 "$ROOT/dense-eval.json"
names="1shot-none 1shot-full 2shot-full 4shot-full 2shot-lora 2shot-kd 1shot-full-refit 2shot-full-refit"
for name in $names; do ev "$ROOT/$name" "$ROOT/$name/eval.json"; done
.venv/bin/python benchmarks/iterative_summary.py --runs $(for n in $names; do echo "$ROOT/$n"; done) \
    --dense-eval "$ROOT/dense-eval.json" --out docs/bench/iterative_smollm2
