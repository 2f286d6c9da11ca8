#!/usr/bin/env bash
# Creates .venv with zeroplan and everything it needs. Idempotent: does nothing when .venv is
# up to date. Where a torch is already importable (a GPU machine), that torch is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.zeroplan-setup
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt requirements/cpu.txt ]; then
  exit 0
fi
echo "zeroplan: setting up .venv (first run only)..." >&2
if python3 -c "import torch" 2>/dev/null; then
  python3 -m venv --system-site-packages .venv
  pip=".venv/bin/python -m pip"
else
  python3 -m venv .venv
  pip=".venv/bin/python -m pip"
  $pip install -q "torch==$(sed -n 's/^torch==//p' requirements/cpu.txt)"
fi
# DeepSpeed's build needs torch, so it is built against the installed one, without isolation.
DS_BUILD_OPS=0 $pip install -q --no-build-isolation "$(grep '^deepspeed==' requirements/cpu.txt)"
$pip install -q -c requirements/cpu.txt -e '.[train,test]'
# Byte-compile the package now: where PYTHONDONTWRITEBYTECODE is set, nothing else would, and
# every command would compile zeroplan's modules again (a tenth of a second of each start).
.venv/bin/python -m compileall -q zeroplan
touch "$stamp"
