#!/bin/bash
# Recovery at lower memory on SmolLM2-135M (docs/results.md, "Recovery in bf16 with 8-bit AdamW" and
# "Offline teacher"), on the recipe and 48,000-token budget of the iterative-pruning table:
#   1. 2 shots of full fine-tuning with the refit, with bf16 weights (stochastic rounding) and 8-bit AdamW,
#      each alone and together, next to the same run in fp32 with seeds 0 (the table's) and 1 (run-to-run
#      noise);
#   2. 2 shots of distillation from stored top-64 teacher log-probabilities (transact teach), next to the
#      same distillation with the teacher in memory; peak RSS of each (/usr/bin/time);
#   3. transact eval of every result; the top-k truncation on held-out text.
# About 75 minutes on a 2-core CPU.
#
#     bash benchmarks/recovery_scale.sh [OUT_ROOT]
set -eu
ROOT=${1:-runs/recovery_scale}
R=docs/recipes/smollm2-half.yaml
T=.venv/bin/transact
mkdir -p "$ROOT"
timed() { name=$1; shift; /usr/bin/time -v -o "$ROOT/$name.time" "$@"; }
run() { name=$1; shift; [ -f "$ROOT/$name/report.json" ] || timed "$name" $T run $R out="$ROOT/$name" "$@" --quiet; }
FULL="shots=2 training.tokens_per_shot=24000 reconstruct=true"
KD="shots=2 training.tokens_per_shot=24000 training.method=kd reconstruct=false"
run full-fp32 $FULL
run full-fp32-seed1 $FULL training.seed=1
run full-bf16-8bit $FULL training.weights=bf16 training.optimizer=adamw_8bit
run full-fp32-8bit $FULL training.optimizer=adamw_8bit
run full-bf16-adamw $FULL training.weights=bf16 training.optimizer=adamw
[ -f "$ROOT/teacher-k64/teacher.json" ] || timed teach $T teach $R out="$ROOT/unused" $KD \
    training.kd.teacher_logits="$ROOT/teacher-k64" --k 64 --quiet | tee "$ROOT/teach.txt"
run kd-offline-k64 $KD training.kd.teacher_logits="$ROOT/teacher-k64"
run kd-online $KD
ev() { [ -f "$2" ] || $T eval "$1" --tasks piqa,lambada --limit 200 --json "$2" --quiet; }
names="full-fp32 full-fp32-seed1 full-bf16-8bit full-fp32-8bit full-bf16-adamw kd-online kd-offline-k64"
for name in $names; do ev "$ROOT/$name" "$ROOT/$name/eval.json"; done
.venv/bin/python benchmarks/iterative_summary.py --runs $(for n in $names; do echo "$ROOT/$n"; done) \
    --out docs/bench/recovery_scale
for name in $names teach; do
    echo "$name: peak RSS $(awk '/Maximum resident/ {printf "%.2f GiB", $6 / 1048576}' "$ROOT/$name.time")"
done | tee docs/bench/recovery_scale_rss.txt
.venv/bin/python benchmarks/topk_truncation.py --students "$ROOT/kd-online" "$ROOT/kd-offline-k64" \
    --k 8 64 256 --out docs/bench/topk_truncation
