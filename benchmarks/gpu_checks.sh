#!/usr/bin/env bash
# Every GPU check of the pack in one pass, from the repository root of a CUDA machine with a ComfyUI checkout at
# $COMFYUI_PATH (and $PYTHON, default python3, an environment that imports ComfyUI, torch and the pack's deps):
#
#   1. the GPU (nvidia-smi) and the python / torch / CUDA versions
#   2. tests/comfy with ComfyUI on the GPU (COMFYUI_DEVICE=gpu, not --cpu)
#   3. benchmarks/gpu_hook.sh: the SAeUron fast path's exactness tests on CUDA, saeuron_hook.py (both decisions,
#      --compile --profile), sae_train.py with AuxK on and off
#   4. benchmarks/saeuron_hook_sdxl.py: the SAeUron hook against one forward of SDXL base's UNet
#   5. benchmarks/rece_edit.py --model sdxl: UCE and 1 / 3 RECE epochs on SDXL's 140 cross-attention projections
#   6. benchmarks/amnesia_step_sdxl.py: Selective Amnesia's training step and peak memory at SDXL base's shapes
#   7. benchmarks/itd_text_sae.py --full: ItD's text-SAE collection and training at 524288 latents
#
# Steps run in that order (most valuable first), each command under its own time limit (SIGINT, so pytest and
# python print where they were; SIGKILL 10 s later), and a step runs even if an earlier one failed. The limits add
# up to about 9 minutes. Every step prints "=== step N: ..." and "=== step N rc=... after ...s"; a table of the
# rcs ends the run, and everything also goes to ${OUT:-/tmp}/gpu_checks.log.
#
#     COMFYUI_PATH=/path/to/ComfyUI PYTHON=/path/to/python bash benchmarks/gpu_checks.sh
#
# GPU_CHECKS_STEPS="4 6" runs only those steps (a second try in the device time left).
# GPU_CHECKS_DRY=1 checks the wiring without a GPU: each step's command lines run with python replaced by a shim
# that parses each benchmark's arguments with the benchmark's own parser and stops, and collects pytest's tests
# instead of running them; nvidia-smi is only looked up.
set -o pipefail
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1  # a step killed at its limit keeps the lines it printed
PY="${PYTHON:-python3}"
STEPS="${GPU_CHECKS_STEPS:-1 2 3 4 5 6 7}"
DRY="${GPU_CHECKS_DRY:-0}"
[ "$DRY" = 0 ] && DRY=""
LOG="${OUT:-/tmp}/gpu_checks.log"
mkdir -p "$(dirname "$LOG")" && : >"$LOG" && exec > >(tee -a "$LOG") 2>&1

if [ -n "$DRY" ]; then
    # the shim: python with the arguments checked instead of the benchmark run
    SHIM_DIR="$(mktemp -d)"
    trap 'rm -rf "$SHIM_DIR"' EXIT
    cat >"$SHIM_DIR/argcheck.py" <<'EOF'
import argparse, os, runpy, sys

args = sys.argv[1:]
if args[:1] == ["-c"]:
    os.execv(sys.executable, [sys.executable, *args])
if args[:2] == ["-m", "pytest"]:
    os.execv(sys.executable, [sys.executable, "-m", "pytest", "--collect-only", "-q", *args[2:]])  # -qq: counts per file
script = args[0]
parse = argparse.ArgumentParser.parse_args


def checked(self, argv=None, namespace=None):
    ns = parse(self, argv, namespace)
    print(f"dry run: {script} accepts {' '.join(args[1:]) or 'no arguments'}: {vars(ns)}")
    raise SystemExit(0)


argparse.ArgumentParser.parse_args = checked
sys.argv = args
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
runpy.run_path(script, run_name="__main__")
raise SystemExit(f"dry run: {script} ended without parsing its arguments")
EOF
    printf '#!/usr/bin/env bash\nexec %q %q "$@"\n' "$(command -v "$PY")" "$SHIM_DIR/argcheck.py" >"$SHIM_DIR/python"
    chmod +x "$SHIM_DIR/python"
    PY="$SHIM_DIR/python"
    export PYTHON="$PY"  # gpu_hook.sh (step 3) runs its python as $PYTHON
    echo "DRY RUN: python is a shim that checks each command's arguments (and collects tests) without running them"
fi

declare -a SUMMARY=()
T0=$SECONDS
step_rc=0

begin() {  # begin N TITLE
    step_n=$1
    step_title=$2
    step_rc=0
    step_start=$SECONDS
    echo
    echo "=== step $step_n: $step_title"
}

run() {  # run LIMIT COMMAND...: one command of the current step under its own time limit
    local limit=$1
    shift
    echo "--- $* (limit ${limit}s)"
    local start=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1
    local rc=$?
    [ "$rc" -eq 124 ] && echo "--- TIMED OUT after ${limit}s"
    echo "--- rc=$rc after $((SECONDS - start))s"
    [ "$rc" -eq 0 ] || step_rc=$rc
}

end() {
    echo "=== step $step_n rc=$step_rc after $((SECONDS - step_start))s"
    SUMMARY+=("step $step_n  rc=$step_rc  $((SECONDS - step_start))s  $step_title")
}

want() { [[ " $STEPS " == *" $1 "* ]]; }

echo "gpu_checks: $(date -u +%FT%TZ), repository $(git rev-parse --short HEAD 2>/dev/null || echo '?'), python $PY," \
     "COMFYUI_PATH=${COMFYUI_PATH:-<unset>}, steps: $STEPS, log $LOG"
if [ -z "${COMFYUI_PATH:-}" ] || [ ! -f "${COMFYUI_PATH}/nodes.py" ]; then
    echo "WARNING: COMFYUI_PATH is not a ComfyUI checkout: steps 2, 4 and 6 need one"
fi

if want 1; then
    begin 1 "GPU and versions"
    if [ -n "$DRY" ]; then
        command -v nvidia-smi >/dev/null && echo "nvidia-smi: $(command -v nvidia-smi)" || echo "nvidia-smi: not found here"
    else
        run 10 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
    fi
    run 15 "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', \
torch.version.cuda, '| cudnn', torch.backends.cudnn.version(), '| device', \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"
    end
fi

if want 2; then
    begin 2 "tests/comfy with ComfyUI on the GPU"
    # one test file per worker with pytest-xdist when it is there (266 tests: 6 min on one core, 3 on two)
    default_args="-x --durations=15"
    if "$PY" -c "import xdist" 2>/dev/null; then
        default_args="-n ${GPU_CHECKS_WORKERS:-8} --dist loadfile --durations=15"
    fi
    # shellcheck disable=SC2086  # the extra pytest arguments are words
    run 170 env COMFYUI_DEVICE=gpu "$PY" -m pytest -q ${GPU_CHECKS_PYTEST_ARGS:-$default_args} tests/comfy
    end
fi

if want 3; then
    begin 3 "benchmarks/gpu_hook.sh (SAeUron fast path and SAE training)"
    run 110 bash benchmarks/gpu_hook.sh
    end
fi

if want 4; then
    begin 4 "SAeUron hook at SDXL base's shapes"
    run 55 "$PY" benchmarks/saeuron_hook_sdxl.py --device cuda --repeats 10
    end
fi

if want 5; then
    begin 5 "RECE edit at SDXL's shapes on the GPU"
    run 35 "$PY" benchmarks/rece_edit.py --model sdxl --device cuda --epochs 0 1 3 --repeats 3
    end
fi

if want 6; then
    begin 6 "Selective Amnesia training step at SDXL base's shapes"
    run 95 "$PY" benchmarks/amnesia_step_sdxl.py --device cuda --repeats 3
    end
fi

if want 7; then
    begin 7 "ItD text SAE at full size"
    run 45 "$PY" benchmarks/itd_text_sae.py --device cuda --full --steps 10 --warmup 2
    end
fi

echo
echo "=== summary ($((SECONDS - T0))s in all${DRY:+, DRY RUN: nothing was measured})"
status=0
for line in "${SUMMARY[@]}"; do
    echo "$line"
    [[ "$line" == *" rc=0 "* ]] || status=1
done
exit $status
