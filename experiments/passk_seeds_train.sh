#!/usr/bin/env bash
# Item 5 of issue 10: train HTPO and DAPO on the embedded default task from seeds 1..3, one run
# after the other (2 shared cores), with the default config; only intermediate validation is
# turned off (trainer.val_every=0 validates at the end only; no step-0 validation). Then
# experiments/passk_seeds_eval.sh evaluates each final policy with n=64.
#
#   CODE=<checkout> OUT=/work/runs_eval nohup nice -n 5 experiments/passk_seeds_train.sh &
set -euo pipefail
CODE=${CODE:-$(cd "$(dirname "$0")/.." && pwd)}
OUT=${OUT:-runs_eval}
SEEDS=${SEEDS:-"1 2 3"}
cd "$CODE"
export PYTHONPATH=$CODE
for seed in $SEEDS; do
  for loss in htpo dapo; do
    dir=$OUT/${loss}_seed${seed}
    if [ -f "$dir/done" ]; then continue; fi
    start=$(date +%s)
    python -m htpo_jax.train --set algorithm.loss=$loss trainer.seed=$seed \
      trainer.output_dir=$dir trainer.val_every=0 trainer.val_before_train=false \
      trainer.progress_bar=false checkpoint.save_every=0 >"$dir.log" 2>&1
    echo "$(( $(date +%s) - start ))" >"$dir/done"
    echo "$(date -u +%H:%M:%S) $loss seed $seed done in $(cat "$dir/done") s"
  done
done
