#!/usr/bin/env bash
# One GPU, one call per step of issue 24 (the TP=1 kernel at decode sizes), from the
# repository root:
#     bash scripts/gpu_issue24.sh STEP [OUT_DIR]
# STEP:
#   explore   benchmarks/explore_decode.py: today's op, the plain masked-tile reference, the
#             empty kernel and the candidate kernels at 1-64 tokens (and 1024-8192 tokens,
#             one program per row) -> h200_tp1_decode_explore.json
#   final     the compile caches warmed in parallel (precompile.json); the local kernel's
#             launch-shape sweep (h200_tp1_launch_sweep.json); the launch table derived from it,
#             written into this tree and OUT_DIR (local_launch_table.py); the TP=1 benchmark
#             against Inductor, the plain masked-tile kernel, the empty kernel and the byte
#             floor (h200_tp1.json, .png); then scripts/run_gpu_tests.sh in the time left
#             (its logs: gpu-tests-single.log and the others, concatenated into tests.log)
#   bench     the TP=1 benchmark alone with the launch table in this tree (after re-deriving
#             it from a committed sweep): the compile caches warmed in parallel first, so the
#             benchmark's deadline is spent measuring (h200_tp1.json, .png), then the selftest
#             (selftest/selftest_cuda_tp1.md, .json)
# Needs torch + Triton (no vLLM). Each step has a time limit and its scripts stop starting
# new points at their deadlines, keeping what they measured. Everything goes to OUT_DIR
# (default: $OUT if set, else ./gpu-issue24-out): run.log, clocks.csv and the step's files.
# Exit status: non-zero if a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
STEP=${1:?usage: gpu_issue24.sh explore|final|bench [OUT_DIR]}
OUT_DIR=${2:-${OUT:-./gpu-issue24-out}}
mkdir -p "$OUT_DIR"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=".:tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-${HOME:-/tmp}/.triton/cache}
PY=${PYTHON:-python3}
status=0
START=$(date +%s)
exec > >(tee -a "$OUT_DIR/run.log") 2>&1

step() {  # step NAME LIMIT_S CMD...
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s, at $(( $(date +%s) - START ))s)"
    timeout --kill-after=5 "$limit" "$@"
    local rc=$?
    echo "=== $name: exit $rc at $(( $(date +%s) - START ))s"
    [ "$rc" -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.max.sm --format=csv
# The GPU's clocks over the run (read only; nothing here sets them).
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -lms 500 \
    > "$OUT_DIR/clocks.csv" 2>&1 &
CLOCKS_PID=$!
$PY -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, torch.cuda.get_device_name(0))'

case "$STEP" in
explore)
    T_EXPLORE=${T_EXPLORE:-480}
    step explore "$T_EXPLORE" $PY benchmarks/explore_decode.py --out "$OUT_DIR/h200_tp1_decode_explore.json" \
        --deadline-s $((T_EXPLORE - 60))
    ;;
final)
    # limits (s): T_PRE + T_SWEEP + T_BENCH + the tests' share stay within ~540 s
    T_PRE=${T_PRE:-110} T_SWEEP=${T_SWEEP:-150} T_BENCH=${T_BENCH:-170} T_ALL=${T_ALL:-535}
    step precompile "$T_PRE" $PY benchmarks/precompile.py --sweep --inductor --references \
        --timeout-s $((T_PRE - 10)) --out "$OUT_DIR/precompile.json"
    step sweep "$T_SWEEP" $PY benchmarks/sweep_local_launch.py --out "$OUT_DIR/h200_tp1_launch_sweep.json" \
        --precompile-workers 0 --warmup-s 0.02 --deadline-s $((T_SWEEP - 20))
    if [ -s "$OUT_DIR/h200_tp1_launch_sweep.json" ]; then
        step derive 30 $PY benchmarks/derive_launch_table.py "$OUT_DIR/h200_tp1_launch_sweep.json" \
            --write vllm_rocm_fused/kernels/local_launch_table.py \
            --source benchmarks/results/h200_tp1_launch_sweep.json
        cp vllm_rocm_fused/kernels/local_launch_table.py "$OUT_DIR/local_launch_table.py"
    fi
    step bench-tp1 "$T_BENCH" $PY benchmarks/bench_fused_ar_rms_quant.py --world-size 1 --replays 100 \
        --out-dir "$OUT_DIR" --name h200_tp1 --deadline-s $((T_BENCH - 30))
    LEFT=$(( T_ALL - ($(date +%s) - START) ))
    if [ "$LEFT" -gt 60 ]; then
        mkdir -p /tmp/gpu-tests
        GPU_TESTS_TIMEOUT=$((LEFT - 20)) step gpu-tests "$LEFT" bash scripts/run_gpu_tests.sh /tmp/gpu-tests
        cat /tmp/gpu-tests/*.log > "$OUT_DIR/tests.log"
    else
        echo "=== gpu-tests: skipped, ${LEFT}s left"; status=1
    fi
    ;;
bench)
    T_PRE=${T_PRE:-110} T_BENCH=${T_BENCH:-200}
    step precompile "$T_PRE" $PY benchmarks/precompile.py --sweep --inductor --references \
        --timeout-s $((T_PRE - 10)) --out "$OUT_DIR/precompile.json"
    step bench-tp1 "$T_BENCH" $PY benchmarks/bench_fused_ar_rms_quant.py --world-size 1 --replays 100 \
        --out-dir "$OUT_DIR" --name h200_tp1 --deadline-s $((T_BENCH - 30))
    step selftest 90 $PY -m vllm_rocm_fused.cli selftest --hidden 2048 4096 5120 --check-up-to 8192 \
        --out "$OUT_DIR/selftest"
    ;;
*)
    echo "unknown step $STEP"; status=1
    ;;
esac
rm -f "$OUT_DIR"/*.tmp
kill "$CLOCKS_PID" 2>/dev/null
echo "=== done at $(( $(date +%s) - START ))s"
exit $status
