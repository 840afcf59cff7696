#!/usr/bin/env bash
# Stop a run on every host: the trainer saves a checkpoint at the end of the current step, then
# exits 0 ("stopped after step N ..." in the log). Relaunching the same config resumes from it.
#
# Usage: [TPU_NAME=htpo] [ZONE=us-east5-a] [PROJECT=...] [WAIT_S=1800] [FORCE=1] \
#        tpu_scripts/stop.sh RUN_NAME
#
# RUN_NAME is the config's file name without .yaml (what launch.sh used). Every host's trainer
# gets SIGTERM, which is also what a preempted Spot TPU VM gets: JAX's preemption notice picks
# one step boundary for all hosts. The script waits up to WAIT_S seconds for the processes to
# end (a step can take many minutes) and prints each host's last log line. FORCE=1 kills
# (SIGKILL) instead: no checkpoint, the next launch resumes from the last periodic one.
set -euo pipefail

if [[ $# -ne 1 || "$1" == -h || "$1" == --help ]]; then
  sed -n '5,6p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
RUN_NAME=$1
TPU_NAME=${TPU_NAME:-htpo}
ZONE=${ZONE:-us-east5-a}
WAIT_S=${WAIT_S:-1800}
FORCE=${FORCE:-0}

gflags=(--zone="$ZONE" --worker=all)
if [[ -n "${PROJECT:-}" ]]; then gflags+=(--project="$PROJECT"); fi

sig=TERM
if [[ "$FORCE" == 1 ]]; then sig=KILL; fi
pid="htpo_logs/$RUN_NAME.pid"
log="htpo_logs/$RUN_NAME.log"
# Runs in the remote login shell (bash) of every host, from $HOME.
remote="if [[ ! -f $pid ]] || ! kill -0 \$(cat $pid) 2>/dev/null; then
  echo \"host \$(hostname): $RUN_NAME is not running\"; exit 0
fi
p=\$(cat $pid)
kill -$sig \$p
for ((i = 0; i < $WAIT_S; i += 5)); do
  kill -0 \$p 2>/dev/null || break
  sleep 5
done
if kill -0 \$p 2>/dev/null; then
  echo \"host \$(hostname): pid \$p still running after ${WAIT_S}s\" >&2; exit 1
fi
echo \"host \$(hostname): stopped; \$(grep -a 'stopped after step' $log | tail -n 1)\""

set -x
gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gflags[@]}" --command="$remote"
