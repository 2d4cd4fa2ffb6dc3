#!/usr/bin/env bash
# Every run behind RESULTS.md, in order (fine-tunes and finished cells are cached: a re-run redoes only what is
# missing). From the repository root, in the project's environment, after fetch_data.sh (benchmarks/README.md).
# A failing step is reported and the next one still runs.
cd "$(dirname "$0")/.."
step() { echo "=== $(date +%T) $*"; "$@" || echo "=== FAILED ($?): $*"; }
step python benchmarks/finetune_all.py
step python benchmarks/tune_supermerge.py --tasks bbc tweets spam wn_noun austen \
  --finetunes "benchmarks/cache/finetunes/{task}" \
  --variants baseline lr=0.01 lr=0.2 "normalized loss" "init from TA" "no hold-out" steps=200 l2=0.01
step python benchmarks/run_text5.py --test-size 500
step python benchmarks/run_text5.py --test-size 500 --seeds 0 --output text5_memory_modes.json \
  --methods supermerge supermerge_hier2 supermerge_hier3 supermerge_streaming individual
step python benchmarks/speed.py
step python benchmarks/memory.py --fresh --rss-limit 21000
step python benchmarks/lora_memory.py --ks 2 4 8
for k in 8 128; do
  step python benchmarks/run_text5.py --test-size 500 --seeds 0 --examples-per-task "$k" \
    --methods ties supermerge individual --output "text5_k$k.json"
done
step python benchmarks/run_text5.py --test-size 500 --lora --methods pretrained task_arithmetic ties supermerge individual
step python benchmarks/make_results.py
echo "=== $(date +%T) done"
