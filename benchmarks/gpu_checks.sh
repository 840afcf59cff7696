#!/usr/bin/env bash
# Every GPU check of the repo in one run (a lent GPU is short-lived: one call does it all).
#   OUT=/tmp/gpu bash benchmarks/gpu_checks.sh [rollout|tests|update ...]   # default: all three
# rollout: benchmarks/bench_rollout.py --gpu (Qwen3-0.6B shape, skewed + uniform, 2 timed rounds)
# tests:   the rollout tests on the GPU (float32 matmuls at highest precision: the contract tests
#          compare with float32 references)
# update:  benchmarks/gpu_attention_update.py (cuDNN attention parity, trainer update timing)
# Logs and JSON land in $OUT; each part has its own time limit so that one hang costs one part.
set -u
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}  # torch shares it
PY=${PY:-python3}
parts=${*:-rollout tests update}
# The machine's own flax / optax unless they cannot import the package; then wheels carried in
# .whl (the versions the repo is tested with), when there are any.
if ! $PY -c "import htpo_jax.rollout, htpo_jax.rl.train_step" > "$OUT/import.log" 2>&1 && [ -d .whl ]
then
  tail -3 "$OUT/import.log"
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
$PY -c "import sys, jax, flax, optax, transformers, torch; print(sys.version.split()[0], 'jax',
jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'transformers',
transformers.__version__, 'torch', torch.__version__, jax.devices())" 2>&1 | tee "$OUT/versions.txt"
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.mem --format=csv \
  | tee -a "$OUT/versions.txt"
for part in $parts; do
  start=$(date +%s)
  case $part in
    rollout)
      timeout "${ROLLOUT_S:-300}" $PY benchmarks/bench_rollout.py --gpu --iters 2 \
        --out "$OUT/bench_rollout_gpu.json" > "$OUT/rollout.log" 2>&1
      ;;
    tests)
      JAX_DEFAULT_MATMUL_PRECISION=highest timeout "${TESTS_S:-150}" $PY -m pytest -q -x \
        -p no:cacheprovider -m "not slow" tests/test_rollout_engine.py tests/test_rollout.py \
        > "$OUT/tests.log" 2>&1
      ;;
    update)
      timeout "${UPDATE_S:-240}" $PY benchmarks/gpu_attention_update.py \
        --out "$OUT/gpu_attention_update.json" > "$OUT/update.log" 2>&1
      ;;
    *) echo "unknown part $part" && continue ;;
  esac
  echo "== $part: exit $? after $(($(date +%s) - start)) s"
  grep -v "^Loading weights" "$OUT/$part.log" | tail -25
done
