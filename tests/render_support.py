"""Samples directories for the analyzer/report tests, written by a real collector and writer.

:func:`write_fixture_dir` drives the collector and the writer directly (no sample groups);
:func:`write_run_dir` runs a real ``lightning.Trainer`` with the callback, optionally with interval and
recent sample groups and latents that change meaning mid-run (so that the drift flag shows).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from helpers import engine_config

from lightning_sae_samples.engine.sample_collector import SampleCollector
from lightning_sae_samples.samples_dir.writer import write_samples_dir

HOSTILE_TOKENS = [
    "<script>alert(1)</script>",
    "|",
    "`code`",
    "*",
    "_",
    "#",
    "[x](javascript:alert(1))",
    "\\",
    "</td>",
    "\n",
    " ",
    "<img src=x onerror=alert(2)>",
    "a|b",
    "**bold**",
    "\t",
    "&amp;",
    "'\"",
    "-",
]
PLAIN_TOKENS = ["the", " Lord", " said", " unto", " Moses", ",", " and", " the", " people", "."]


def save_word_tokenizer(path: Path, words: list[str]) -> Path:
    """A real Hugging Face tokenizer folder (``tokenizers`` WordLevel, token ``i`` is ``words[i]``) at ``path``."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=words[0]))
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=words[0]).save_pretrained(str(path))
    return Path(path)


class FakeTokenizer:
    """A tokenizer whose vocabulary is a fixed list of strings (``convert_ids_to_tokens`` / ``decode``)."""

    def __init__(self, vocab: list[str]) -> None:
        self.vocab = vocab

    def convert_ids_to_tokens(self, ids):
        return [self.vocab[i] for i in ids]

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)


def hostile_vocab(size: int = 30) -> list[str]:
    words = HOSTILE_TOKENS + PLAIN_TOKENS
    return [words[i % len(words)] for i in range(size)]


def collect_state(vocab: int = 30, num_latents: int = 16, steps: int = 3, seed: int = 0) -> dict:
    """A collector state where latent ``f`` fires mostly on token ``f`` (and a little elsewhere).

    Latents 14 and 15 never fire.
    """
    gen = torch.Generator().manual_seed(seed)
    table = torch.rand(vocab, num_latents, generator=gen) * 0.6
    for f in range(num_latents):
        table[f % vocab, f] = 2.0 + f * 0.5
    table[:, 14:] = 0.0
    collector = SampleCollector(engine_config(num_latents, 8, 6, 0.3))
    for step in range(steps):
        tokens = torch.randint(0, vocab, (4, 12), generator=gen)
        noise = torch.rand(4, 12, num_latents, generator=gen)
        collector.update_dense(tokens, table[tokens] * (0.5 + noise), step=step * 10)
    return collector.state_dict()


def write_fixture_dir(
    path: Path,
    tokenizer=None,
    top_features: int = 6,
    samples_per_feature: int = 4,
    rank_by: str = "max_activation",
    keep_full_state: bool = True,
    recorded_tokenizer: Optional[str] = "class name",
    **state_kwargs,
) -> Path:
    """A samples directory of :func:`collect_state`, written by the real writer.

    ``recorded_tokenizer`` is the ``config["tokenizer"]`` the summary records: by default the tokenizer's
    class name (what a run records for a tokenizer object without a name), else the given name or path.
    """
    state = collect_state(**state_kwargs)
    config = {
        "collection_freq": 10,
        "max_samples_per_feature": 8,
        "context_size": 6,
        "activation_threshold": 0.3,
        "top_features_to_save": top_features,
        "samples_per_feature_to_save": samples_per_feature,
        "rank_features_by": rank_by,
        "tokenizer": (None if tokenizer is None else type(tokenizer).__name__)
        if recorded_tokenizer == "class name" else recorded_tokenizer,
    }
    write_samples_dir(
        path, state, config=config, tokenizer=tokenizer, top_features=top_features,
        samples_per_feature=samples_per_feature, rank_by=rank_by, global_step=30,
    )
    if not keep_full_state:
        (Path(path) / "full_state.pt").unlink()
    return Path(path)


def _drifting_sae(num_latents: int, drift_step: int):
    from helpers import DriftingSAE

    return DriftingSAE(num_latents=num_latents, drift_step=drift_step)


def write_run_dir(
    root: Path,
    tokenizer=None,
    *,
    recent_window_steps: Optional[int] = None,
    samples_per_interval: int = 0,
    num_latents: int = 12,
    top_features: int = 6,
    samples_per_feature: int = 3,
    drift_step: int = 2,
    logit_effects=None,
) -> Path:
    """``root/samples`` written by a real ``Trainer`` run (6 steps) with the callback.

    Odd latents change meaning at ``drift_step``: with a recent window, some of them are flagged
    (``recent_drift``). ``recent_window_steps=None, samples_per_interval=0`` keeps no sample group.
    """
    from helpers import loader, trainer

    from lightning_sae_samples.callback import ActivationSampleCallback

    root = Path(root)
    cb = ActivationSampleCallback(
        collection_freq=1, max_samples_per_feature=5, context_size=4, activation_threshold=0.5,
        top_features_to_save=top_features, samples_per_feature_to_save=samples_per_feature,
        dirpath=root / "samples", tokenizer=tokenizer, write_report=False,
        recent_window_steps=recent_window_steps, samples_per_interval=samples_per_interval,
        logit_effects=logit_effects,
    )
    trainer(root, [cb], max_epochs=1).fit(_drifting_sae(num_latents, drift_step), loader())
    return root / "samples"


def decoder_matrices(module, d_model: int = 6, vocab: int = 30):
    """A fixed ``(W_dec [F, d_model], W_U [d_model, vocab])`` for the ``logit_effects`` of a test SAE.

    Importable as ``render_support:decoder_matrices``; latents ``2j`` and ``2j + 1`` share most of a direction, so
    each has an obvious nearest neighbour.
    """
    gen = torch.Generator().manual_seed(7)
    base = torch.randn((module.num_latents + 1) // 2, d_model, generator=gen)
    w_dec = base.repeat_interleave(2, 0)[: module.num_latents] + 0.1 * torch.randn(module.num_latents, d_model,
                                                                                  generator=gen)
    return w_dec, torch.randn(d_model, vocab, generator=gen)
