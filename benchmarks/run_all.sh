#!/usr/bin/env bash
# Every run behind RESULTS.md, in order (fine-tunes and finished cells are cached: a re-run redoes only what is
# missing). From the repository root, in the project's environment, after fetch_data.sh (benchmarks/README.md).
# A failing step is reported and the next one still runs.
cd "$(dirname "$0")/.."
step() { echo "=== $(date +%T) $*"; "$@" || echo "=== FAILED ($?): $*"; }
step python benchmarks/run_text5.py --test-size 500
step python benchmarks/run_text5.py --test-size 500 --seeds 0 --output text5_memory_modes.json \
  --methods supermerge supermerge_hier2 supermerge_hier3 supermerge_streaming individual
step python benchmarks/speed.py
step python benchmarks/memory.py --fresh --rss-limit 21000
for k in 8 128; do
  step python benchmarks/run_text5.py --test-size 500 --seeds 0 --examples-per-task "$k" \
    --methods ties supermerge individual --output "text5_k$k.json"
done
step python benchmarks/run_text5.py --test-size 500 --lora --methods pretrained task_arithmetic ties supermerge individual
step python benchmarks/make_results.py
echo "=== $(date +%T) done"
