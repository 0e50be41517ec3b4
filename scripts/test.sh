#!/usr/bin/env bash
# Set up from nothing and run the whole test suite:  bash scripts/test.sh  [pytest arguments]
# Installs Debian's Chromium (for the HTML report test) when run as root, uses the active virtual environment
# (else $VENV, else .venv in the checkout, created if missing), installs torch (CPU wheel) if the environment has
# none, the package with its test and example extras, checks ruff, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
VENV="${VENV:-${VIRTUAL_ENV:-.venv}}"
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
# torch==2.13.0 is the CPU wheel this project's machines install from local disk (a pip constraint there caps
# torch; the index's default build would also pull CUDA). The project requires only torch>=2.1: a torch already
# in the environment is kept.
"$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q -e ".[test,examples]"
"$VENV/bin/ruff" check .
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/python" -m pytest "$@"
