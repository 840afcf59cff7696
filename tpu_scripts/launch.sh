#!/usr/bin/env bash
# Start `python -m htpo_jax.train` on every host of the slice, detached, logging to a file.
#
# Usage: [TPU_NAME=htpo] [ZONE=us-east5-a] [PROJECT=...] [RUN_NAME=<config name>] [FOLLOW=1] \
#        tpu_scripts/launch.sh CONFIG [--set key=value ...]
#
#   tpu_scripts/launch.sh configs/qwen3_8b_dapo_math17k.yaml --set trainer.total_steps=200
#
# CONFIG is a path inside the installed repo (~/htpo_jax on each host; re-run install.sh after
# editing it locally). Extra arguments go to the trainer unchanged. Every host runs the same
# command: JAX makes one program of them. HTPO_DISTRIBUTED=1 tells the trainer to call
# jax.distributed.initialize() first (needed on a slice with more than one host).
# Each host writes ~/htpo_logs/<RUN_NAME>.log and its process id to ~/htpo_logs/<RUN_NAME>.pid;
# a host where that process still runs refuses to start a second one (stop it first:
# tpu_scripts/stop.sh). Otherwise every host first kills leftover trainer processes (a crashed
# or killed run can leave one holding the TPU) and removes the libtpu lockfile.
# FOLLOW=1 then tails host 0's log. Stop a run (it saves a checkpoint first): tpu_scripts/stop.sh.
# Relaunching the same config resumes from the latest checkpoint in checkpoint.dir.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
  sed -n '4,6p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
CONFIG=$1
shift
TPU_NAME=${TPU_NAME:-htpo}
ZONE=${ZONE:-us-east5-a}
RUN_NAME=${RUN_NAME:-$(basename "$CONFIG" .yaml)}
FOLLOW=${FOLLOW:-0}

gflags=(--zone="$ZONE")
if [[ -n "${PROJECT:-}" ]]; then gflags+=(--project="$PROJECT"); fi

log="htpo_logs/$RUN_NAME.log"
pid="htpo_logs/$RUN_NAME.pid"
train=$(printf '%q ' python -m htpo_jax.train --config "$CONFIG" "$@")
# Runs in the remote login shell (bash) of every host, from $HOME.
remote="mkdir -p htpo_logs
if [[ -f $pid ]] && kill -0 \$(cat $pid) 2>/dev/null; then
  echo \"host \$(hostname): $RUN_NAME is already running (pid \$(cat $pid))\" >&2; exit 1
fi
# anchored: this shell's own command line contains the trainer command too
stale=\$(pgrep -f '^[^ ]*python[0-9.]* -m htpo_jax[.]train' || true)
if [[ -n \"\$stale\" ]]; then
  echo \"host \$(hostname): killing leftover trainer processes \$stale\" >&2
  kill -9 \$stale 2>/dev/null || true
  sleep 2
fi
sudo rm -f /tmp/libtpu_lockfile 2>/dev/null || rm -f /tmp/libtpu_lockfile
cd htpo_jax && source ~/htpo_venv/bin/activate
HTPO_DISTRIBUTED=1 setsid nohup $train > ~/$log 2>&1 < /dev/null &
echo \$! > ~/$pid
echo \"host \$(hostname): started pid \$!, log ~/$log\""

set -x
gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gflags[@]}" --worker=all --command="$remote"
if [[ "$FOLLOW" == 1 ]]; then
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gflags[@]}" --worker=0 \
    --command="tail -n +1 -F ~/$log"
fi
