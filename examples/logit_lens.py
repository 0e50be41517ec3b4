"""Logit lens for the example SAEs: ``(W_dec, W_U)`` for ``ActivationSampleCallback(logit_effects=...)``.

In a config: ``logit_effects: logit_lens:causal_lm_logit_matrices`` (``examples/`` is on the path when
``train_sae.py`` runs). Each saved feature then lists the tokens its decoder direction promotes and
suppresses through the language model's final norm and unembedding: ``W_dec · diag(γ) · W_U``, where
``γ`` is the weight of the final RMSNorm/LayerNorm (the logit lens; the norm's division by the residual's
RMS is one positive scale per token and does not change the ranking). Only meaningful for causal LMs
(SmolLM2 here), and readable mainly for late layers: a middle layer's directions are not yet written in
the unembedding's basis.
"""

from __future__ import annotations

from functools import lru_cache

import torch

FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_layer_norm")


def final_norm_weight(lm: torch.nn.Module) -> torch.Tensor:
    """``γ [d_model]``: the weight of the norm applied before the unembedding (ones if there is none)."""
    base = lm.base_model
    for name in FINAL_NORM_NAMES:
        norm = getattr(base, name, None)
        if isinstance(norm, torch.nn.Module) and getattr(norm, "weight", None) is not None:
            return norm.weight.detach()
    return torch.ones(lm.get_output_embeddings().weight.shape[1])


@lru_cache(maxsize=2)
def unembedding(model_name: str) -> torch.Tensor:
    """``diag(γ) · W_U [d_model, vocab]`` of a causal LM (final norm weight folded in), loaded once.

    SmolLM2 ties ``W_U`` to its input embeddings.
    """
    from sae_data import resolve_model
    from transformers import AutoModelForCausalLM

    path, kwargs = resolve_model(model_name)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    w_u = lm.get_output_embeddings().weight.detach().T
    return (final_norm_weight(lm).unsqueeze(1) * w_u).contiguous()


def causal_lm_logit_matrices(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_dec [F, d_model], diag(γ) · W_U [d_model, vocab])`` of the example SAE and its datamodule's LM.

    The SAE's input normalization is one positive scale, so it does not change the ranking of tokens.
    """
    w_dec = module.decoder.weight.detach().T  # nn.Linear(F, d_model).weight is [d_model, F]
    w_u = unembedding(module.trainer.datamodule.model_name)
    return w_dec, w_u.to(w_dec.device)
