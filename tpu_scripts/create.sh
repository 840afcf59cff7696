#!/usr/bin/env bash
# Create a Cloud TPU VM or pod slice for htpo_jax.
#
# Usage: [TPU_NAME=htpo] [ZONE=us-east5-a] [ACCELERATOR_TYPE=v5p-64] \
#        [RUNTIME_VERSION=v2-alpha-tpuv5] [PROJECT=...] [SPOT=1] [QUEUED=1] \
#        tpu_scripts/create.sh [extra gcloud flags...]
#
# ACCELERATOR_TYPE counts TensorCores: v5p-8 = 4 chips on 1 host, v5p-64 = 32 chips on 8 hosts
# (the paper run, configs/qwen3_8b_dapo_math17k.yaml). RUNTIME_VERSION must match the TPU
# generation (v5p: v2-alpha-tpuv5; v5e: v2-alpha-tpuv5-lite; v6e: v2-alpha-tpuv6e).
# SPOT=1 asks for preemptible capacity (the trainer resumes from its last checkpoint).
# QUEUED=1 goes through a queued resource (large slices are often only granted that way);
# the slice then appears when capacity is granted: watch it with
#   gcloud compute tpus queued-resources describe "$TPU_NAME" --zone "$ZONE"
# Next: tpu_scripts/install.sh. See docs/TPU.md.
set -euo pipefail

TPU_NAME=${TPU_NAME:-htpo}
ZONE=${ZONE:-us-east5-a}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5p-64}
RUNTIME_VERSION=${RUNTIME_VERSION:-v2-alpha-tpuv5}
SPOT=${SPOT:-0}
QUEUED=${QUEUED:-0}

flags=(--zone="$ZONE" --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION")
if [[ -n "${PROJECT:-}" ]]; then flags+=(--project="$PROJECT"); fi
if [[ "$SPOT" == 1 ]]; then flags+=(--spot); fi

set -x
if [[ "$QUEUED" == 1 ]]; then
  gcloud compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" "${flags[@]}" "$@"
else
  gcloud compute tpus tpu-vm create "$TPU_NAME" "${flags[@]}" "$@"
fi
