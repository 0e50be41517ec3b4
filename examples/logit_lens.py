"""Logit lens for the example SAEs: ``(W_dec, W_U)`` for ``ActivationSampleCallback(logit_effects=...)``.

In a config: ``logit_effects: logit_lens:causal_lm_logit_matrices`` (``examples/`` is on the path when
``train_sae.py`` runs). Each saved feature then lists the tokens its decoder direction promotes and
suppresses through the language model's unembedding. Only meaningful for causal LMs (SmolLM2 here).
"""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=2)
def unembedding(model_name: str) -> torch.Tensor:
    """``W_U [d_model, vocab]`` of a causal LM, loaded once (SmolLM2 ties it to its input embeddings)."""
    from sae_data import resolve_model
    from transformers import AutoModelForCausalLM

    path, kwargs = resolve_model(model_name)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    return lm.get_output_embeddings().weight.detach().T.contiguous()


def causal_lm_logit_matrices(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_dec [F, d_model], W_U [d_model, vocab])`` of the example SAE and its datamodule's language model.

    The SAE's input normalization is one positive scale, so it does not change the ranking of tokens.
    """
    w_dec = module.decoder.weight.detach().T  # nn.Linear(F, d_model).weight is [d_model, F]
    w_u = unembedding(module.trainer.datamodule.model_name)
    return w_dec, w_u.to(w_dec.device)
