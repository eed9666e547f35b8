#!/usr/bin/env bash
# Everything a session with a lent GPU should run, in ONE device call of under 8 minutes:
#   bash bench/gpu_session.sh OUTDIR [run_device.sh options, e.g. --no-compile]
# 1. the environment (card, driver, torch, triton) -> OUTDIR/env.txt
# 2. the GPU twins of the kernel and model tests (pinned kernel configs, no autotuning; split-K
#    forced where a test asks) -> OUTDIR/gpu_tests.txt, within GPU_TESTS_S seconds (default 130)
# 3. bench/conv_layers.py --no-model: per-layer forward (and deep-layer dgrad) table, autotuned
#    fused kernel with its split-K pick, forced split2/split4 and cuDNN side by side
#    -> OUTDIR/conv_layers.txt, new layers started for CONV_LAYERS_S seconds (default 70, killed at +40)
# 4. bench/graph_step.py: the train step replayed from a CUDA graph (--cuda-graph) beside eager, both
#    backends, t = 1, 3, 8 at batch 2 and 8 -> OUTDIR/graph_step.txt, new cases started for
#    GRAPH_STEP_S seconds (default 50, killed at +30); its CUDA twin test runs with the GPU tests
# 5. bench/reflect_step.py: the default recipe's train step (reflect padding, t=5, checkpoint_iters),
#    fused vs reference, reflect beside zeros, fp32 and bf16 -> OUTDIR/reflect_step.txt, new rows
#    started for REFLECT_STEP_S seconds (default 30, killed at +30)
# 6. bench/run_device.sh OUTDIR --budget BUDGET_S (default 130): latency, memory, the 8 GiB search,
#    saved bytes; its Markdown table is printed last.
# Worst case 130 + 110 + 80 + 60 + 130 s + installs and start-up: under 8 minutes.
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

TRITON_INTERPRET=0 BIONET_FAST_AUTOTUNE=0 timeout "${GPU_TESTS_S:-130}" "$PY" -m pytest -q -p no:cacheprovider \
    -k "gpu or cuda" tests/test_kernels_fwd.py tests/test_kernels_bwd.py tests/test_kernels_splitk.py \
    tests/test_fused_blocks.py tests/test_fused_model.py tests/test_compose.py tests/test_checkpointing.py \
    tests/test_planner.py tests/test_backend_choice.py tests/test_fused_reflect.py \
    tests/test_cuda_graph.py::test_cuda_graphed_steps_equal_eager_steps_gpu > "$OUTDIR/gpu_tests.txt" 2>&1
echo "GPU tests: exit $? after $(( $(date +%s) - START )) s (OUTDIR/gpu_tests.txt):"
tail -n 25 "$OUTDIR/gpu_tests.txt"

if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    CL="${CONV_LAYERS_S:-70}"
    PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" timeout $(( CL + 40 )) "$PY" bench/conv_layers.py \
        --budget "$CL" --no-model > "$OUTDIR/conv_layers.txt" 2>&1
    echo "conv_layers.py (split-K beside cuDNN): exit $? after $(( $(date +%s) - START )) s:"
    cat "$OUTDIR/conv_layers.txt"
    GS="${GRAPH_STEP_S:-50}"
    BIONET_FAST_AUTOTUNE=0 PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" timeout $(( GS + 30 )) "$PY" \
        bench/graph_step.py --budget "$GS" > "$OUTDIR/graph_step.txt" 2>&1
    echo "graph_step.py (CUDA-graph train step beside eager): exit $? after $(( $(date +%s) - START )) s:"
    cat "$OUTDIR/graph_step.txt"
    RS="${REFLECT_STEP_S:-30}"
    PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" timeout $(( RS + 30 )) "$PY" \
        bench/reflect_step.py --budget "$RS" > "$OUTDIR/reflect_step.txt" 2>&1
    echo "reflect_step.py (default recipe train step, fused vs reference): exit $? after $(( $(date +%s) - START )) s:"
    cat "$OUTDIR/reflect_step.txt"
fi

bash bench/run_device.sh "$OUTDIR" --budget "${BUDGET_S:-130}" "$@"
rc=$?
echo "gpu_session.sh: $(( $(date +%s) - START )) s in all (run_device.sh exit $rc)"
exit $rc
