#!/usr/bin/env bash
# One GPU, one call: the single-GPU tests, the local kernel's launch-shape sweep, the launch
# table derived from it, and the TP=1 benchmark against Inductor, from the repository root:
#     bash scripts/gpu_issue13.sh [OUT_DIR]
# Needs torch + Triton (no vLLM). Each step has a time limit (seconds, overridable:
# T_PRECOMPILE, T_TESTS, T_SWEEP, T_BENCH), so the whole run ends within ~500 s including
# Triton/Inductor compiles; the sweep and the benchmark stop starting new points at their
# deadlines and keep what they measured. Everything goes to
# OUT_DIR (default: $OUT if set, else ./gpu-issue13-out), at most 8 files:
#   run.log, tests.log, precompile.json, h200_tp1_launch_sweep.json, local_launch_table.py,
#   h200_tp1.json, h200_tp1.png, clocks.csv
# The derived table is also written into this tree (vllm_rocm_fused/kernels/) before the
# benchmark, so "dispatched" runs the shapes just measured. Exit status: non-zero if a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-./gpu-issue13-out}}
mkdir -p "$OUT_DIR"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=".:tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# one Triton cache for all steps (Inductor would otherwise move later compiles to its own)
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-${HOME:-/tmp}/.triton/cache}
PY=${PYTHON:-python3}
T_PRE=${T_PRECOMPILE:-110} T_TESTS=${T_TESTS:-120} T_SWEEP=${T_SWEEP:-100} T_BENCH=${T_BENCH:-160}
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
# The GPU's clocks over the run (read only; nothing here sets them), to tell a clock ramp
# from a slow kernel.
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -lms 500 \
    > "$OUT_DIR/clocks.csv" 2>&1 &
CLOCKS_PID=$!
$PY -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, torch.cuda.get_device_name(0))'

# 1. Compile in parallel what the later steps would compile one by one (the local kernel at
#    every sweep candidate, the benchmark's Inductor graphs).
step precompile "$T_PRE" $PY benchmarks/precompile.py --sweep --inductor --timeout-s $((T_PRE - 10)) \
    --out "$OUT_DIR/precompile.json"
# 2. Single-GPU tests (quick).
step gpu-tests "$T_TESTS" bash -c "$PY -m pytest -q -rs -p no:cacheprovider --durations=5 \
    tests/gpu/test_cuda_single_gpu.py > '$OUT_DIR/tests.log' 2>&1; rc=\$?; tail -n 15 '$OUT_DIR/tests.log'; exit \$rc"
# 3. Launch-shape sweep of the local kernel.
step sweep "$T_SWEEP" $PY benchmarks/sweep_local_launch.py --out "$OUT_DIR/h200_tp1_launch_sweep.json" \
    --precompile-workers 0 --deadline-s $((T_SWEEP - 25))
# 4. The launch table from it, into this tree for the benchmark, and into OUT_DIR.
if [ -s "$OUT_DIR/h200_tp1_launch_sweep.json" ]; then
    step derive 30 $PY benchmarks/derive_launch_table.py "$OUT_DIR/h200_tp1_launch_sweep.json" \
        --write vllm_rocm_fused/kernels/local_launch_table.py \
        --source benchmarks/results/h200_tp1_launch_sweep.json
    cp vllm_rocm_fused/kernels/local_launch_table.py "$OUT_DIR/local_launch_table.py"
fi
# 5. TP=1 benchmark: dispatched vs Inductor (static, dynamic) vs the byte floor.
step bench-tp1 "$T_BENCH" $PY benchmarks/bench_fused_ar_rms_quant.py --world-size 1 --replays 100 \
    --out-dir "$OUT_DIR" --name h200_tp1 --deadline-s $((T_BENCH - 30))
rm -f "$OUT_DIR"/*.tmp
kill "$CLOCKS_PID" 2>/dev/null

echo "=== summary (at $(( $(date +%s) - START ))s)"
grep -E "passed|failed|error" "$OUT_DIR/tests.log" | tail -n 3
$PY - "$OUT_DIR" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
p = out / "h200_tp1.json"
if not p.exists():
    print("no h200_tp1.json"); sys.exit(0)
r = json.loads(p.read_text())
s = r.get("summary", {})
toks = sorted({int(t) for rows in s.values() for t in rows})
print(f"dispatched / compiled (copy {r.get('copy_bandwidth_GBps')} GB/s; * = over 1.0):")
print("hidden | " + " ".join(f"{t:>6}" for t in toks))
for h in sorted(s, key=int):
    cells = []
    for t in toks:
        row = s[h].get(str(t)) or s[h].get(t) or {}
        v = row.get("dispatched_over_compiled")
        cells.append("     -" if v is None else f"{v:5.2f}" + ("*" if v > 1 else " "))
    print(f"{h:>6} | " + " ".join(cells))
print("dispatched us at 1 token / dispatched over floor at 8192 tokens:")
for h in sorted(s, key=int):
    one, big = s[h].get("1", {}), s[h].get("8192", {})
    print(f"  {h}: {one.get('dispatched', float('nan')):.2f} us / {big.get('dispatched_over_floor', float('nan')):.2f}x")
t = r.get("targets", {})
for k, v in t.get("misses", {}).items():
    print(f"target {k}: {len(v)} misses of {t.get('points')}: {v[:8]}")
bad = [x for x in r["results"] if not x.get("ok")]
print(f"checks: {len(r['results']) - len(bad)} ok, {len(bad)} not ok; stopped early: {r.get('stopped_early')}")
EOF
ls -la "$OUT_DIR"
exit $status
