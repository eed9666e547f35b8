#!/usr/bin/env bash
# Everything a session with a lent GPU should run, in ONE device call of under 8 minutes:
#   bash bench/gpu_session.sh OUTDIR [run_device.sh options, e.g. --no-compile]
# 1. the environment (card, driver, torch, triton) -> OUTDIR/env.txt
# 2. the GPU twins of the kernel and model tests (pinned kernel configs, no autotuning)
#    -> OUTDIR/gpu_tests.txt, within GPU_TESTS_S seconds (default 150)
# 3. bench/run_device.sh OUTDIR --budget BUDGET_S (default 300): latency, memory, the 8 GiB search,
#    saved bytes; its Markdown table is printed last.
# Without CUDA it is a dry run (tests skip, run_device.sh runs its tiny CPU profile).
set -u
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: bash bench/gpu_session.sh OUTDIR [run_device.sh options]" >&2
    exit 2
fi
OUTDIR="$1"; shift
mkdir -p "$OUTDIR"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
PY="${PYTHON:-$(command -v python || command -v python3)}"
export PYTHONUNBUFFERED=1
START=$(date +%s)

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  date -u; } > "$OUTDIR/env.txt" 2>&1
cat "$OUTDIR/env.txt"
"$PY" -m pip install -e . --no-deps --no-build-isolation -q > "$OUTDIR/install.txt" 2>&1 \
    || echo "pip install -e . failed (see install.txt); run_device.sh maps kernels/ itself"

TRITON_INTERPRET=0 BIONET_FAST_AUTOTUNE=0 timeout "${GPU_TESTS_S:-150}" "$PY" -m pytest -q -p no:cacheprovider \
    -k "gpu or cuda" tests/test_kernels_fwd.py tests/test_kernels_bwd.py tests/test_fused_blocks.py \
    tests/test_fused_model.py tests/test_compose.py tests/test_checkpointing.py > "$OUTDIR/gpu_tests.txt" 2>&1
echo "GPU tests: exit $? after $(( $(date +%s) - START )) s (OUTDIR/gpu_tests.txt):"
tail -n 25 "$OUTDIR/gpu_tests.txt"

bash bench/run_device.sh "$OUTDIR" --budget "${BUDGET_S:-300}" "$@"
rc=$?
echo "gpu_session.sh: $(( $(date +%s) - START )) s in all (run_device.sh exit $rc)"
exit $rc
