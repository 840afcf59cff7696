#!/usr/bin/env bash
# Delete the TPU VM / pod slice (and its queued resource when it was created with QUEUED=1).
# Checkpoints on a bucket survive; everything on the VMs' disks (metrics.jsonl, logs) is lost:
# copy what you want first (docs/TPU.md, "Monitor").
#
# Usage: [TPU_NAME=htpo] [ZONE=us-east5-a] [PROJECT=...] [QUEUED=1] [YES=1] tpu_scripts/teardown.sh
#
# gcloud asks for confirmation unless YES=1.
set -euo pipefail

TPU_NAME=${TPU_NAME:-htpo}
ZONE=${ZONE:-us-east5-a}
QUEUED=${QUEUED:-0}
YES=${YES:-0}

flags=(--zone="$ZONE")
if [[ -n "${PROJECT:-}" ]]; then flags+=(--project="$PROJECT"); fi
if [[ "$YES" == 1 ]]; then flags+=(--quiet); fi

set -x
if [[ "$QUEUED" == 1 ]]; then
  # --force deletes the node that the queued resource created along with it.
  gcloud compute tpus queued-resources delete "$TPU_NAME" --force "${flags[@]}"
else
  gcloud compute tpus tpu-vm delete "$TPU_NAME" "${flags[@]}"
fi
