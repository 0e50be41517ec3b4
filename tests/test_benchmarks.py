"""The benchmark scripts that reach into the library's internals still run, in their smallest configuration.

docs/performance.md cites what they print; a change of an internal function they call must not leave them broken
until the next time someone measures (``benchmarks/history.py`` once was, for a day). The scripts that use the
public API alone, or that take minutes even small (``many_saes.py``, ``shards.py``, the scale rows), are left to
the hand runs.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

#: (script and arguments, text its output must hold)
RUNS = {
    "history": (["history.py", "--num-latents", "4096", "--collections", "1"], "| 4,096 |"),
    "floor": (["collection.py", "--floor", "2048", "--floor-collections", "2", "--floor-options", "defaults"],
              "defaults (history + interval samples)"),
    "rows": (["collection.py", "--rows", "--rows-latents", "2048", "--tokens", "256", "--rows-collections", "2"],
             "shuffled rows, refs kept"),
    "serve-history": (["serve.py", "--history", "--history-latents", "4096", "--repeat", "1"],
                      "timeline answer, saved latent"),
    "serve-meaning": (["serve.py", "--meaning", "--meaning-latents", "4096", "--d-model", "64", "--repeat", "1"],
                      "sidecar of 4,096 explanations"),
    "meaning-change": (["meaning_change.py", "--latents", "50"], "| zipf |"),
    "readers": (["readers.py", "--opens", "20"], "20 opens"),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_the_benchmark_runs_and_prints_its_rows(name, tmp_path):
    (script, *args), expected = RUNS[name]
    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expected in proc.stdout, proc.stdout[-3000:]
