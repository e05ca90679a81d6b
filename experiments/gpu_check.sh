#!/usr/bin/env bash
# The GPU acceptance check (experiments/gpu_check.py) on a CUDA machine whose Python has torch,
# transformers, lightning, peft and pandas but not the harness's other requirements, and no
# network: the wheels that `make gpu-wheels` put in .whl/ (hydra-core, omegaconf, antlr4's
# runtime, liger-kernel, cut-cross-entropy) are installed into a temporary directory first.
#   bash experiments/gpu_check.sh --out outputs/gpu_check          # arguments go to gpu_check.py
# PYTHON names the interpreter (default python3). In a venv made by `make setup`, run
# `.venv/bin/python experiments/gpu_check.py` directly instead.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
  site="$(mktemp -d)"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$py" experiments/gpu_check.py "$@"
