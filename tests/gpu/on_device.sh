#!/usr/bin/env bash
# rayrack on a machine with a real NVIDIA GPU: the checks that the simulated NVML cannot stand in for.
#
#   bash tests/gpu/on_device.sh            # from the repository root; results in $OUT (default ./on-device-out)
#   OUT=/somewhere bash tests/gpu/on_device.sh
#
# Needs: the NVIDIA driver (libnvidia-ml.so.1, nvidia-smi), python3 (3.11+) with nvidia-ml-py, prometheus-client,
# PyYAML and psutil, gcc and make. No network: Python packages the machine lacks (nvitop and nvitop-exporter for
# the benchmark's peer, say) travel as wheels in .whl/ at the repository root and are installed with
# `pip install --no-index --target` a private temporary directory before the first step. Runs as any user; as root it sees every
# process on the GPUs.
#
# Steps, in order, each under `timeout`, logged to $OUT/<step>.log and timed; a failed step does not stop the
# next. The whole run stays under 8 minutes (each step's limit is cut to what is left of TOTAL_SECONDS).
#   1. ray-agent check on the real NVML
#   2. nvidia-smi captures (topo -m, nvlink --status, -q, -q -x, --query-gpu CSV) and `rayrack gpu-check` on them;
#      the check's NVML source against its nvidia-smi parsers on this machine (tests/gpu/nvml_vs_nvidia_smi.py)
#   3. the simulated libnvidia-ml.so.1 against the real one (tests/gpu/nvml_differential.py)
#   4. GPM: support per GPU, and one pair of samples while the GPU computes (PyTorch, when installed)
#   5. make bench-agent BENCH_AGENT_NVML=real: the agent against nvitop-exporter (and Ray, when installed)
# Ends with a table: step, exit status, seconds. Exit status: the number of failed steps (0: all passed).

set -u

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUT=${OUT:-./on-device-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$REPO" || exit 1
PY=${PYTHON:-python3}
TOTAL_SECONDS=${TOTAL_SECONDS:-470}
STARTED=$(date +%s)
CAPTURES=$OUT/captures
WORK=$(mktemp -d /tmp/rayrack-on-device.XXXXXX)
mkdir -p "$CAPTURES"
exec > >(tee "$OUT/on-device.log") 2>&1

STEP_NAMES=()
STEP_RCS=()
STEP_SECONDS=()

log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*"; }

# step NAME LIMIT_SECONDS COMMAND...: runs COMMAND under timeout (cut to the time left), output to $OUT/NAME.log.
step() {
    local name=$1 limit=$2 left rc start end
    shift 2
    left=$((TOTAL_SECONDS - ($(date +%s) - STARTED)))
    if ((left < 5)); then
        log "SKIP $name: the run's ${TOTAL_SECONDS} s are spent"
        STEP_NAMES+=("$name") STEP_RCS+=("skipped") STEP_SECONDS+=("0")
        return 0
    fi
    ((limit > left)) && limit=$left
    log "RUN  $name (limit ${limit} s): $*"
    start=$(date +%s%N)
    # Through bash, so that a step can be one of the functions below (exported).
    timeout --kill-after=5 "$limit" bash -c '"$@"' step "$@" >"$OUT/$name.log" 2>&1 </dev/null
    rc=$?
    end=$(date +%s%N)
    ((rc == 124 || rc == 137)) && echo "(timed out after ${limit} s)" >>"$OUT/$name.log"
    local ms=$(((end - start) / 1000000))
    STEP_NAMES+=("$name") STEP_RCS+=("$rc") STEP_SECONDS+=("$((ms / 1000)).$(((ms % 1000) / 100))")
    log "     $name: exit $rc, ${STEP_SECONDS[-1]} s"
    tail -n 15 "$OUT/$name.log" | sed 's/^/     | /'
    return 0
}

# capture FILE COMMAND...: COMMAND's output into the captures directory (stderr to the step's log).
capture() {
    local file=$1
    shift
    "$@" >"$CAPTURES/$file"
}

# gpu-check's exit status is its verdict (0 fine, 1 problems found, 2 unusable input): kept as the step's.
gpu_check() {
    "$PY" -m rayrack gpu-check --captures "$CAPTURES" --json >"$OUT/gpu-check.json"
    local rc=$?
    cat "$OUT/gpu-check.json"
    return "$rc"
}
export -f capture gpu_check
export OUT PY CAPTURES

cleanup() {
    [[ -n "${LOAD_PID:-}" ]] && kill "$LOAD_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

# --- Python packages that travelled as wheels ------------------------------------------------------------
export PYTHONPATH=$REPO
if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
    step wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" "$REPO"/.whl/*.whl
    export PYTHONPATH=$REPO:$WORK/site
    export PATH=$WORK/site/bin:$PATH
fi
log "python: $("$PY" --version 2>&1), driver: $(timeout 30 nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>&1 | head -1)"

# --- 1. ray-agent check on the real NVML -----------------------------------------------------------------
cat >"$WORK/agent-check.yml" <<'EOF'
gpu: {backend: nvml}
attribution: {enabled: false}
guard: {enabled: false}
EOF
step agent-check 60 "$PY" -m ray_agent.cli check --config.file "$WORK/agent-check.yml"

# --- 2. nvidia-smi captures and rayrack gpu-check ------------------------------------------------------
step capture-topo 30 capture nvidia-smi-topo-m.txt nvidia-smi topo -m
step capture-nvlink 30 capture nvidia-smi-nvlink-status.txt nvidia-smi nvlink --status
step capture-q 60 capture nvidia-smi-q.txt nvidia-smi -q
step capture-q-xml 60 capture nvidia-smi-q.xml nvidia-smi -q -x
# The fields gpu-check asks for itself on a live node.
QUERY_FIELDS=$("$PY" -c 'from rayrack.gpu_check import QUERY_FIELDS; print(",".join(QUERY_FIELDS))')
step capture-query-gpu 30 capture nvidia-smi-query-gpu.csv nvidia-smi --format=csv --query-gpu="$QUERY_FIELDS"
step gpu-check 60 gpu_check
step gpu-check-nvml 90 "$PY" tests/gpu/nvml_vs_nvidia_smi.py

# --- 3. the simulated library against the real one -----------------------------------------------------
step nvml-sim-build 90 make --no-print-directory nvml-sim
step nvml-differential 120 "$PY" tests/gpu/nvml_differential.py --json "$OUT/nvml-differential.json"

# --- 4. GPM ---------------------------------------------------------------------------------------------
# A matrix product loop keeps the SMs busy while the two samples are taken, so SM activity reads non-zero.
if timeout 60 "$PY" -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
    timeout 40 "$PY" - >"$OUT/gpm-load.log" 2>&1 <<'EOF' &
import time
import torch
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
end = time.time() + 20
while time.time() < end:
    for _ in range(20):
        a @ a
    torch.cuda.synchronize()
EOF
    LOAD_PID=$!
    sleep 5
else
    log "no PyTorch with CUDA: GPM samples are taken on an idle GPU"
fi
step gpm 60 "$PY" tests/gpu/nvml_differential.py --gpm --json "$OUT/gpm.json"
if [[ -n "${LOAD_PID:-}" ]]; then
    kill "$LOAD_PID" 2>/dev/null
    wait "$LOAD_PID" 2>/dev/null
    LOAD_PID=
fi

# --- 5. the benchmark with the real NVML ----------------------------------------------------------------
# `make bench-agent` wants its venv: a stand-in whose python is this one (with its own packages, which may be
# a venv's), marked installed, since nothing can be installed without the network.
mkdir -p "$WORK/venv/bin"
printf '#!/bin/sh\nexec %q "$@"\n' "$(command -v "$PY")" >"$WORK/venv/bin/python"
chmod +x "$WORK/venv/bin/python"
touch "$WORK/venv/.installed"
step bench-agent 270 make --no-print-directory bench-agent VENV="$WORK/venv" BENCH_AGENT_NVML=real

# --- Summary ---------------------------------------------------------------------------------------------
failed=0
for rc in "${STEP_RCS[@]}"; do
    [[ "$rc" == 0 ]] || failed=$((failed + 1))
done
{
    printf '%-20s %-8s %8s\n' step exit seconds
    for i in "${!STEP_NAMES[@]}"; do
        printf '%-20s %-8s %8s\n' "${STEP_NAMES[$i]}" "${STEP_RCS[$i]}" "${STEP_SECONDS[$i]}"
    done
    printf 'total %d s; %d of %d steps failed; logs and captures in %s\n' "$(($(date +%s) - STARTED))" \
        "$failed" "${#STEP_NAMES[@]}" "$OUT"
} | tee "$OUT/summary.txt"
exit "$failed"
