"""The example's logit lens goes through the final norm's weight: ``W_dec · diag(γ) · W_U`` (fast, tiny Llama)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import logit_lens  # noqa: E402

D, VOCAB = 8, 32


@pytest.fixture()
def tiny_llama(tmp_path) -> tuple[str, torch.nn.Module]:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        lm.model.norm.weight.copy_(torch.linspace(0.1, 3.0, D))  # far from ones: the norm changes the ranking
    lm.save_pretrained(tmp_path / "tiny")
    logit_lens.unembedding.cache_clear()
    return str(tmp_path / "tiny"), lm


def test_unembedding_folds_in_the_final_norm_weight(tiny_llama):
    path, lm = tiny_llama
    w_u = logit_lens.unembedding(path)
    expected = lm.model.norm.weight.detach().unsqueeze(1) * lm.get_output_embeddings().weight.detach().T
    torch.testing.assert_close(w_u, expected)


def test_logit_effects_rank_tokens_as_the_model_would(tiny_llama):
    # A direction written into the residual stream raises the logits by norm(direction) @ W_U^T, up to one
    # positive scale: the lens must rank tokens exactly like the model's own final norm and unembedding.
    path, lm = tiny_llama
    decoder = torch.nn.Linear(4, D)  # an SAE with 4 latents
    module = SimpleNamespace(decoder=decoder, trainer=SimpleNamespace(datamodule=SimpleNamespace(model_name=path)))
    w_dec, w_u = logit_lens.causal_lm_logit_matrices(module)
    effects = w_dec @ w_u
    with torch.no_grad():
        through_model = lm.lm_head(lm.model.norm(w_dec))
    def unit(rows: torch.Tensor) -> torch.Tensor:
        return rows / rows.norm(dim=-1, keepdim=True)

    torch.testing.assert_close(unit(effects), unit(through_model))
    without_norm = w_dec @ lm.get_output_embeddings().weight.detach().T
    assert not torch.equal(without_norm.argmax(dim=-1), through_model.argmax(dim=-1))
