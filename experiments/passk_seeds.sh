#!/usr/bin/env bash
# Item 5 of issue 10 (docs/RESULTS.md, "Test-time scaling"): HTPO and DAPO trained on the embedded
# default task from seeds 1..3 with the default config (only intermediate validation off:
# trainer.val_every=0 validates at the end only, no step-0 validation), each final policy exported
# to HF format and evaluated with n=64 samples per validation problem, pass@k / maj@k for
# k = 1..64. One process at a time (shared 2-core machine); per seed: train both, evaluate both,
# so finished seeds are complete. Re-running skips what is done.
#
#   CODE=<checkout that trains> EVAL_CODE=<checkout with htpo_jax.evaluate> OUT=/work/runs_eval \
#     nohup nice -n 5 experiments/passk_seeds.sh &
#   python experiments/passk_report.py --runs $OUT   # figure + table
set -euo pipefail
CODE=${CODE:-$(cd "$(dirname "$0")/.." && pwd)}
EVAL_CODE=${EVAL_CODE:-$CODE}
OUT=${OUT:-runs_eval}
SEEDS=${SEEDS:-"1 2 3"}
N=${N:-64}
log() { echo "$(date -u +%H:%M:%S) $*"; }
for seed in $SEEDS; do
  for loss in htpo dapo; do
    dir=$OUT/${loss}_seed${seed}
    [ -d "$dir/checkpoints/100" ] && continue
    log "train $loss seed $seed"
    start=$(date +%s)
    (cd "$CODE" && PYTHONPATH=$CODE python -m htpo_jax.train --set algorithm.loss=$loss \
      trainer.seed=$seed trainer.output_dir=$dir trainer.val_every=0 \
      trainer.val_before_train=false trainer.progress_bar=false checkpoint.save_every=0) \
      >"$dir.log" 2>&1
    log "trained $loss seed $seed in $(( $(date +%s) - start )) s"
  done
  for loss in htpo dapo; do
    dir=$OUT/${loss}_seed${seed}
    [ -f "$dir/eval_n$N/summary.json" ] && continue
    [ -f "$dir/hf/config.json" ] || (cd "$CODE" && PYTHONPATH=$CODE python -m htpo_jax.export \
      --run "$dir" --out "$dir/hf") >>"$dir.log" 2>&1
    log "evaluate $loss seed $seed"
    start=$(date +%s)
    (cd "$EVAL_CODE" && PYTHONPATH=$EVAL_CODE python -m htpo_jax.evaluate --model "$dir/hf" \
      --config configs/default.yaml --data assets/arith/val.jsonl --n $N --k 1-$N \
      --seed 1234 --out "$dir/eval_n$N") >"$dir.eval.log" 2>&1
    log "evaluated $loss seed $seed in $(( $(date +%s) - start )) s"
  done
done
log "all done"
