#!/usr/bin/env bash
# Install htpo_jax on every host of a TPU VM / pod slice (runs on all workers in parallel).
#
# Usage: [TPU_NAME=htpo] [ZONE=us-east5-a] [PROJECT=...] [REPO_URL=... [REF=main]] \
#        [STAGE_FROM=gs://bucket/htpo_data] [DATA_DIR=/data] \
#        [GCS_BUCKET=my-bucket] [GCS_MOUNT=/mnt/gcs] \
#        [JAX_SPEC='jax[tpu]'] [PYTHON_VERSION=3.11] tpu_scripts/install.sh
#
# On each host:
# 1. the code, into ~/htpo_jax: `git clone REPO_URL` at REF when REPO_URL is set, otherwise a
#    copy of this working tree (tracked files and untracked, non-ignored ones);
# 2. a Python $PYTHON_VERSION venv in ~/htpo_venv (through uv: TPU VM images ship Python 3.10,
#    the package needs >= 3.11) with `pip install -e .[tensorboard,gcs]` and $JAX_SPEC. Pin
#    JAX_SPEC (e.g. 'jax[tpu]==0.10.2') to the version you tested with;
# 3. with STAGE_FROM: `gcloud storage rsync -r STAGE_FROM DATA_DIR` (the model and data files the
#    config names; each host reads its own copy);
# 4. with GCS_BUCKET: gcsfuse, and the bucket mounted at GCS_MOUNT (the shared checkpoint
#    directory; re-run after a VM restart, the mount does not persist).
# Safe to re-run (e.g. after a code change). Next: tpu_scripts/launch.sh. See docs/TPU.md.
set -euo pipefail

TPU_NAME=${TPU_NAME:-htpo}
ZONE=${ZONE:-us-east5-a}
REPO_URL=${REPO_URL:-}
REF=${REF:-main}
STAGE_FROM=${STAGE_FROM:-}
DATA_DIR=${DATA_DIR:-/data}
GCS_BUCKET=${GCS_BUCKET:-}
GCS_MOUNT=${GCS_MOUNT:-/mnt/gcs}
JAX_SPEC=${JAX_SPEC:-jax[tpu]}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
gflags=(--zone="$ZONE" --worker=all)
if [[ -n "${PROJECT:-}" ]]; then gflags+=(--project="$PROJECT"); fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The part that runs on each host. Settings arrive as environment variables.
cat > "$tmp/htpo_install.sh" <<'REMOTE'
set -euo pipefail
cd ~
src=htpo_jax venv=htpo_venv
if [[ -n "$REPO_URL" ]]; then
  [[ -d "$src/.git" ]] || git clone --quiet "$REPO_URL" "$src"
  git -C "$src" fetch --quiet origin "$REF"
  git -C "$src" checkout --quiet --detach FETCH_HEAD
else
  mkdir -p "$src"
  tar -xzf htpo_src.tar.gz -C "$src"
fi
export PATH="$HOME/.local/bin:$PATH"
command -v uv >/dev/null || python3 -m pip install --user --quiet uv
[[ -x "$venv/bin/python" ]] || uv venv --quiet --python "$PYTHON_VERSION" "$venv"
uv pip install --quiet --python "$venv/bin/python" -e "./$src[tensorboard,gcs]" "$JAX_SPEC"
if [[ -n "$STAGE_FROM" ]]; then
  sudo mkdir -p "$DATA_DIR" && sudo chown "$(id -u):$(id -g)" "$DATA_DIR"
  gcloud storage rsync --recursive "$STAGE_FROM" "$DATA_DIR"
fi
if [[ -n "$GCS_BUCKET" ]]; then
  if ! command -v gcsfuse >/dev/null; then
    curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg \
      | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
    echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc]" \
      "https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main" \
      | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
    sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
  fi
  sudo mkdir -p "$GCS_MOUNT" && sudo chown "$(id -u):$(id -g)" "$GCS_MOUNT"
  # Orbax commits a checkpoint by renaming its temporary directory: gcsfuse needs
  # --rename-dir-limit for that on a bucket without hierarchical namespace.
  mountpoint -q "$GCS_MOUNT" \
    || gcsfuse --implicit-dirs --rename-dir-limit=1000000 "${GCS_BUCKET#gs://}" "$GCS_MOUNT"
fi
"$venv/bin/python" -c 'import jax; print(f"host {jax.process_index()}: jax {jax.__version__},",
  jax.local_device_count(), jax.local_devices()[0].device_kind)'
REMOTE

if [[ -z "$REPO_URL" ]]; then
  git -C "$ROOT" ls-files --cached --others --exclude-standard \
    | while IFS= read -r f; do if [[ -e "$ROOT/$f" ]]; then printf '%s\n' "$f"; fi; done \
    | tar -C "$ROOT" -czf "$tmp/htpo_src.tar.gz" -T -
  files=("$tmp/htpo_install.sh" "$tmp/htpo_src.tar.gz")
else
  files=("$tmp/htpo_install.sh")
fi

env_args=$(printf '%q ' REPO_URL="$REPO_URL" REF="$REF" STAGE_FROM="$STAGE_FROM" \
  DATA_DIR="$DATA_DIR" GCS_BUCKET="$GCS_BUCKET" GCS_MOUNT="$GCS_MOUNT" JAX_SPEC="$JAX_SPEC" \
  PYTHON_VERSION="$PYTHON_VERSION")
set -x
gcloud compute tpus tpu-vm scp "${files[@]}" "$TPU_NAME":~/ "${gflags[@]}"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gflags[@]}" \
  --command="env $env_args bash ~/htpo_install.sh"
