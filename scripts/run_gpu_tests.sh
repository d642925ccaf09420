#!/usr/bin/env bash
# The GPU tests, on a machine with CUDA GPUs (torch + Triton; vLLM not needed), from the
# repository root:  bash scripts/run_gpu_tests.sh [LOG_DIR]
# Runs: the machine facts, doctor at the machine's world size, the GPU tests (tests/gpu:
# world size 1 and every multi-GPU size the machine has, so 4 and 8 run unchanged where
# lent). Logs go to LOG_DIR (default: $OUT if set, else ./gpu-test-logs). NVLink multicast
# stays off. Exit status: non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR=${1:-${OUT:-./gpu-test-logs}}
mkdir -p "$LOG_DIR"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=".:tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0

step() {  # step NAME TIMEOUT_S CMD...
    local name=$1 limit=$2; shift 2
    echo "=== $name"
    timeout "$limit" "$@" 2>&1 | tee "$LOG_DIR/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc"
    [ "$rc" -eq 0 ] || status=1
}

step machine 60 bash -c "nvidia-smi; nvidia-smi topo -m; $PY -c 'import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.device_count(), torch.cuda.get_device_name(0))'"
WORLD=$($PY -c 'import torch; print(max(2, torch.cuda.device_count()))')
step doctor 120 $PY -m vllm_rocm_fused.cli doctor --world-size "$WORLD" --tokens 1 64 512 1024 2048 8192
# -s: the multi-GPU ranks print one line per case, so a run cut short shows where it was.
# The first run on a fresh machine spends most of its time compiling Triton kernels
# (a few seconds per kernel variant; several dozen variants).
step gpu-tests-single "${GPU_TESTS_TIMEOUT:-900}" $PY -m pytest -q -rs -s -p no:cacheprovider --durations=5 \
    tests/gpu/test_cuda_single_gpu.py
step gpu-tests-multi "${GPU_TESTS_TIMEOUT:-900}" $PY -m pytest -q -rs -s -p no:cacheprovider --durations=5 \
    tests/gpu/test_cuda_multi_gpu.py
exit $status
