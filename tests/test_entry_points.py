"""What the callback and the plain-loop collector both promise, tested once on each (the ``entry`` fixture)."""

import json
import math

import pytest
import torch
from conftest import CTX
from helpers import PAD, PAD_ACTIVATION, padded_batches

from lightning_sae_samples import ActivationSampleCallback, ActivationSampleCollector
from lightning_sae_samples.state.tables import padded_state


def _full_state(dirpath):
    return padded_state(torch.load(dirpath / "full_state.pt", weights_only=True))


@pytest.mark.parametrize("mode", ["dense", "sparse"])
@pytest.mark.parametrize("pad_id", [PAD, -1, 0])
def test_a_padded_stream_equals_the_oracle_that_skips_padding(entry, mode, pad_id):
    dirpath, seen = entry.collect(padded_batches(6, pad_id=pad_id), mode)
    files = entry.check(dirpath, seen)
    assert files["collection_summary.json"]["tokens_seen"] < sum(s.tokens.numel() for s in seen)  # padding unseen
    state = _full_state(dirpath)
    kept = torch.isfinite(state["top_values"])
    assert bool((state["top_values"][kept] < PAD_ACTIVATION).all())  # padding activations are never kept
    context = state["top_context_tokens"][kept]
    assert int(context.min()) == -1  # windows stop at padding, shown as -1
    if pad_id < 0:
        assert pad_id not in context or pad_id == -1


def test_negative_token_ids_without_a_mask_are_padding(entry):
    batches = [(torch.where(mask, tokens, -1), None, latents) for tokens, mask, latents in padded_batches(4, seed=2)]
    dirpath, seen = entry.collect(batches)
    entry.check(dirpath, seen)


def test_excluded_tokens_are_seen_but_not_collected_and_still_shown_in_contexts(entry):
    dirpath, seen = entry.collect(padded_batches(6, seed=3, vocab=4), exclude_token_ids=[1, 2])
    files = entry.check(dirpath, seen, exclude=(1, 2))
    assert files["collection_summary.json"]["config"]["exclude_token_ids"] == [1, 2]
    state = _full_state(dirpath)
    kept = torch.isfinite(state["top_values"])
    centre = state["top_context_tokens"][..., CTX // 2][kept]
    assert not torch.isin(centre, torch.tensor([1, 2])).any()
    assert torch.isin(state["top_context_tokens"][kept], torch.tensor([1, 2])).any()


@pytest.mark.parametrize("setting, first, second", [("context_size", 6, 8), ("max_samples_per_feature", 4, 5)])
def test_resuming_with_other_sizes_names_the_setting(entry, setting, first, second):
    ckpt = entry.checkpoint_path("first")
    entry.collect(padded_batches(2), ckpt=ckpt, **{setting: first})
    with pytest.raises(ValueError, match=rf"{setting}={first}.*{setting}={second}"):
        entry.collect(padded_batches(3), dirpath=entry.root / "again", resume=ckpt, **{setting: second})


def test_resuming_with_another_threshold_is_refused_naming_both_values_and_the_fix(entry):
    # A real checkpoint (Trainer's, or the collector's state_dict) of a collection made at 0.1.
    ckpt = entry.checkpoint_path("first")
    entry.collect(padded_batches(2), ckpt=ckpt, activation_threshold=0.1)
    with pytest.raises(ValueError, match=r"activation_threshold=0\.1, this .* has activation_threshold=0\.9.*"
                                         r"Pass activation_threshold=0\.1 to continue"):
        entry.collect(padded_batches(3), dirpath=entry.root / "again", resume=ckpt, activation_threshold=0.9)
    assert not (entry.root / "again" / "collection_summary.json").exists()
    # (The same threshold resumes exactly: test_callback's test_resume_writes_identical_files, test_collector's.)


def test_a_state_that_holds_no_collection_yet_resumes_at_the_new_threshold(tmp_path):
    # Nothing collected, so nothing was counted at 0.1.
    empty = ActivationSampleCollector(activation_threshold=0.1, context_size=CTX).state_dict()
    collector = ActivationSampleCollector(activation_threshold=0.5, context_size=CTX)
    collector.load_state_dict(empty)
    collector.update(torch.arange(8).view(1, 8), latents=torch.full((1, 8, 3), 0.3), step=0)
    collector.save(tmp_path)
    summary = json.loads((tmp_path / "collection_summary.json").read_text())
    assert summary["config"]["activation_threshold"] == 0.5 and summary["total_samples_seen"] == 0


@pytest.mark.parametrize("owner", [ActivationSampleCallback, ActivationSampleCollector], ids=["callback", "collector"])
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_latents=0), "num_latents"),
        (dict(max_samples_per_feature=0), "max_samples_per_feature"),
        (dict(context_size=-2), "context_size"),
        (dict(activation_threshold=math.inf), "activation_threshold"),
        (dict(activation_threshold=math.nan), "activation_threshold"),
        (dict(activation_threshold="high"), "activation_threshold"),
        (dict(top_features_to_save=-1), "top_features_to_save"),
        (dict(samples_per_feature_to_save=0), "samples_per_feature_to_save"),
        (dict(samples_per_feature_to_save=20, max_samples_per_feature=10), "cannot exceed"),
        (dict(rank_features_by="size"), "rank_features_by"),
        (dict(recent_window_steps=0), "recent_window_steps"),
        (dict(seed=1.5), "seed"),
        (dict(exclude_token_ids=[1, -3]), "exclude_token_ids"),
        (dict(exclude_token_ids="bos"), "exclude_token_ids"),
        (dict(exclude_token_ids=[2**40]), "exclude_token_ids"),
    ],
)
def test_bad_arguments_name_the_argument(owner, kwargs, match):
    with pytest.raises(ValueError, match=match):
        owner(**kwargs)
