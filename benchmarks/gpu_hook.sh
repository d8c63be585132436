#!/usr/bin/env bash
# One pass of the GPU checks for the SAeUron hook and SAE training, from the repository root:
# the fast path's exactness tests on CUDA, then the two benchmarks (AuxK on and off), then the
# fast path through torch.compile (counting and top-k decisions) with a kernel profile. Each step has its own time limit and the later ones run even
# if an earlier one fails.
#
#     bash benchmarks/gpu_hook.sh 2>&1 | tee log
set -o pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
status=0

step() {  # step SECONDS COMMAND...
    local limit=$1
    shift
    echo "=== $* (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1
    local rc=$?
    echo "=== rc=$rc after $((SECONDS - start))s"
    [ "$rc" -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1
step 70 "$PY" -m pytest -q tests/test_saeuron_fast.py
step 50 "$PY" benchmarks/saeuron_hook.py --device cuda
step 30 "$PY" benchmarks/sae_train.py --device cuda
step 30 "$PY" benchmarks/sae_train.py --device cuda --dead 0
step 90 "$PY" benchmarks/saeuron_hook.py --device cuda --no-unet --compile --profile --repeats 30
exit $status
