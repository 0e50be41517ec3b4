"""sparsify's own Trainer on two hookpoints: one samples directory per hookpoint, exact against the oracle."""

from __future__ import annotations

import pytest

pytest.importorskip("sparsify")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

import torch  # noqa: E402
from helpers import read_dir  # noqa: E402
from oracle import Seen, assert_dir_matches_oracle  # noqa: E402
from sparsify import SparseCoderConfig, TrainConfig  # noqa: E402

from lightning_sae_samples.integrations.sparsify import STATE_NAME, SamplesSparsifyTrainer  # noqa: E402
from lightning_sae_samples.samples_dir.names import RUN_INDEX_NAME  # noqa: E402

HOOKPOINTS = ["encoder.layer.0", "encoder.layer.1"]
F, TOPK, CTX, KEEP, THR = 24, 4, 4, 3, 0.0
EXCLUDED = 3  # a token id sparsify does not train on


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    return transformers.BertModel(config).eval()


def token_dataset(num=24, seq=8):
    ids = torch.randint(0, 40, (num, seq), generator=torch.Generator().manual_seed(1))
    return datasets.Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")


def make_trainer(tmp_path, model, dataset, collection_freq=2, **cfg):
    config = TrainConfig(
        SparseCoderConfig(num_latents=F, k=TOPK), batch_size=4, hookpoints=HOOKPOINTS, log_to_wandb=False,
        save_dir=str(tmp_path / "ckpt"), run_name="run", save_every=3, lr=1e-3, exclude_tokens=[EXCLUDED], **cfg,
    )
    return SamplesSparsifyTrainer(
        config, dataset, model, samples_dir=tmp_path / "samples", collection_freq=collection_freq,
        max_samples_per_feature=KEEP, context_size=CTX, activation_threshold=THR, top_features_to_save=F,
        samples_per_feature_to_save=KEEP, write_report=False,
    )


def record(trainer):
    """Every batch's tokens and what each SAE returned (dense ``[B, T, F]``, excluded tokens all zero)."""
    seen = {name: [] for name in HOOKPOINTS}
    batch = {}
    trainer.model.register_forward_pre_hook(lambda m, args: batch.update(tokens=args[0].detach().clone()))

    def keeper(name):
        def keep(module, args, out):
            tokens = batch["tokens"]
            kept = (tokens != EXCLUDED).view(-1)
            dense = torch.zeros(tokens.numel(), F)
            rows = torch.zeros(int(kept.sum()), F).scatter(-1, out.latent_indices, out.latent_acts.detach())
            dense[kept] = rows
            seen[name].append(Seen(trainer.global_step, 0, 0, tokens, dense.view(*tokens.shape, F)))
        return keep

    for name in HOOKPOINTS:
        trainer.saes[name].register_forward_hook(keeper(name))
    return seen


def check(samples_dir, seen):
    for name in HOOKPOINTS:
        collected = [s for s in seen[name] if s.step % 2 == 0]
        assert_dir_matches_oracle(read_dir(samples_dir / name), collected, F, KEEP, CTX, THR, exclude=(EXCLUDED,))


def test_sparsify_trainer_on_two_hookpoints_equals_the_oracle(tmp_path):
    trainer = make_trainer(tmp_path, tiny_bert(), token_dataset())
    seen = record(trainer)
    trainer.fit()
    assert len(seen[HOOKPOINTS[0]]) == 6
    check(tmp_path / "samples", seen)
    assert (tmp_path / "samples" / RUN_INDEX_NAME).is_file()
    assert (tmp_path / "ckpt" / "run" / STATE_NAME).is_file()


class Crash(Exception):
    pass


def test_sparsify_resume_after_a_crash_equals_the_oracle(tmp_path):
    """A crash after the checkpoint at batch 1; sparsify's resume trains batch 1 again, which is not counted twice."""
    first = make_trainer(tmp_path, tiny_bert(), token_dataset(), collection_freq=1)
    seen_first = record(first)

    def crash(module, args):
        if first.global_step == 3:
            raise Crash

    first.model.register_forward_pre_hook(crash)
    with pytest.raises(Crash):
        first.fit()
    first.samples.close()
    resumed = make_trainer(tmp_path, tiny_bert(), token_dataset(), collection_freq=1)
    seen_resumed = record(resumed)
    resumed.load_state(str(tmp_path / "ckpt" / "run"))
    assert resumed.global_step == 1, "sparsify restarts at the batch its checkpoint was saved in"
    resumed.fit()
    for name in HOOKPOINTS:
        seen = [s for s in seen_first[name] if s.step <= 1] + [s for s in seen_resumed[name] if s.step >= 2]
        assert [s.step for s in seen] == list(range(6))
        assert_dir_matches_oracle(read_dir(tmp_path / "samples" / name), seen, F, KEEP, CTX, THR,
                                  exclude=(EXCLUDED,))
