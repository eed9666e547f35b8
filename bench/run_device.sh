#!/usr/bin/env bash
# Every benchmark of bench/ in one command, within ~6 minutes on an H100 or H200:
#   bash bench/run_device.sh OUTDIR [--quick] [--no-compile] [--max-autotune] [--budget SECONDS]
# Writes OUTDIR/results.md (printed last), OUTDIR/results.json, OUTDIR/*.png and, on a GPU,
# OUTDIR/saved_bytes.md (what a training forward keeps per iteration, fused vs reference).
# Without CUDA it runs the tiny CPU profile end to end (the dry run: under 2 minutes).
# The package need not be installed: this script puts the checkout on PYTHONPATH and installs it
# in editable mode (no dependencies, no network) so that kernels/ imports as bionet_fast.kernels.
set -u
START=$(date +%s)
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: bash bench/run_device.sh OUTDIR [--quick] [--no-compile] [--max-autotune] [--budget S]" >&2
    exit 2
fi
OUTDIR="$1"; shift
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
PY="${PYTHON:-$(command -v python || command -v python3)}"
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
cd "$REPO_ROOT"

# Installed from this checkout already (editable)? Then nothing to do. BIONET_BENCH_NO_INSTALL=1
# skips the install (e.g. a second checkout on a machine whose editable install must stay put).
if [ "${BIONET_BENCH_NO_INSTALL:-0}" = "1" ]; then
    echo "BIONET_BENCH_NO_INSTALL=1: not installing; bench/harness.py maps kernels/ itself if needed"
elif "$PY" -c "import sys, bionet_fast, bionet_fast.kernels as k; sys.exit(0 if k.__file__.startswith('$REPO_ROOT') else 1)" 2>/dev/null; then
    echo "bionet_fast importable from $REPO_ROOT"
elif "$PY" -m pip install -e . --no-deps --no-build-isolation -q 2>&1 | tail -n 5; [ "${PIPESTATUS[0]}" -eq 0 ]; then
    echo "installed bionet_fast in editable mode ($(( $(date +%s) - START )) s)"
else
    echo "WARNING: pip install -e . failed; bench/harness.py loads kernels/ as bionet_fast.kernels itself"
fi

# Saved activations per iteration, fused vs reference (issue 6), at 512x512 x1.0 on the GPU: pinned
# kernel configs (no autotuning: the bytes do not depend on them). Counted against the budget.
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    BIONET_FAST_AUTOTUNE=0 timeout 90 "$PY" -m bench.saved_bytes --device cuda --size 512 --multiplier 1.0 \
        > "$OUTDIR/saved_bytes.md" 2>&1
    echo "saved_bytes (exit $?, $(( $(date +%s) - START )) s):"; cat "$OUTDIR/saved_bytes.md"
fi

"$PY" -u -m bench.device_bench "$OUTDIR" --started-at "$START" "$@"
rc=$?
echo "run_device.sh: finished in $(( $(date +%s) - START )) s (exit $rc); results in $OUTDIR"
exit $rc
