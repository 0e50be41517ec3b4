"""A tiny BERT and token dataset for sparsify's own Trainer (its tests and their subprocess script)."""

from __future__ import annotations

import datasets
import torch
import transformers

HOOKPOINTS = ["encoder.layer.0", "encoder.layer.1"]
F, TOPK, CTX, KEEP, THR = 24, 4, 4, 3, 0.0
EXCLUDED = 3  # a token id sparsify does not train on
#: The collection settings of every SAE (``top_features_to_save=F``: every latent is written).
SETTINGS = dict(max_samples_per_feature=KEEP, context_size=CTX, activation_threshold=THR, top_features_to_save=F,
                samples_per_feature_to_save=KEEP, write_report=False)


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    return transformers.BertModel(config).eval()


def token_ids(num=24, seq=8):
    return torch.randint(0, 40, (num, seq), generator=torch.Generator().manual_seed(1))


def token_dataset(ids=None):
    ids = token_ids() if ids is None else ids
    return datasets.Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")


def dense_latents(tokens, indices, values):
    """What an SAE returned for the trained (not excluded) tokens of ``tokens``, as dense ``[B, T, F]``."""
    kept = (tokens != EXCLUDED).view(-1)
    dense = torch.zeros(tokens.numel(), F)
    dense[kept] = torch.zeros(int(kept.sum()), F).scatter(-1, indices, values)
    return dense.view(*tokens.shape, F)
