"""The example's progress outside a terminal: log lines during training and validation, a label that makes sense."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The example's progress setup (train_sae.py: trainer_defaults={"callbacks": [progress_bar_for()]}) on a tiny
# Trainer bounded by max_steps with max_epochs=-1, as the default config is.
SCRIPT = textwrap.dedent(
    """
    import sys
    import lightning as L
    from helpers import SyntheticSAE, TokenDataset, loader
    from log_progress import LineProgressBar, progress_bar_for

    bar = progress_bar_for()
    assert isinstance(bar, LineProgressBar), type(bar)
    trainer = L.Trainer(accelerator="cpu", max_steps=40, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[bar], num_sanity_val_steps=0,
                        check_val_every_n_epoch=1000)
    module = SyntheticSAE(num_latents=8)
    trainer.fit(module, loader())
    trainer.validate(module, loader(TokenDataset(num_sequences=80, seed=5)))
    """
)


def test_a_run_whose_output_is_not_a_terminal_logs_progress_lines(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT / "examples"), str(ROOT)]))
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    lines = done.stdout.splitlines()
    training = [line for line in lines if line.startswith("training: Epoch ")]
    # A line every 5% of max_steps (2 steps here), labelled with steps, not Lightning's "Epoch 3/-2".
    assert len(training) >= 15, lines
    assert "training: Epoch 0 · step 0/40 (a line every 2 steps or 60 s)" in lines
    assert any(line.startswith("training: Epoch ") and "· step 40/40" in line and "steps/s" in line for line in lines)
    assert not [line for line in lines if "/-2" in line]
    assert any(line.startswith("training: done, 40 steps in") for line in lines)
    validation = [line for line in lines if line.startswith("validation: batch ")]
    assert "validation: 20 batches" in lines and len(validation) >= 10
    assert any(line.startswith("validation: done, 20 batches") for line in lines)
