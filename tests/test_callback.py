import json

import pytest
import torch
from helpers import (
    CTX,
    THR,
    F,
    K,
    SyntheticSAE,
    TokenDataset,
    callback_factory,
    check_against_oracle,
    loader,
    read_dir,
    trainer,
)
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_sae_samples.engine import MergePolicy
from lightning_sae_samples.schedule import CollectionSchedule
from lightning_sae_samples.state.tables import padded_state


@pytest.fixture(params=["merge-when-read", "merge-often"])
def merge_policy(request):
    """With "merge-often", tables this small merge their staged samples every few inserts (default: at saves)."""
    return MergePolicy(min_stage_limit=1) if request.param == "merge-often" else MergePolicy()


make_callback = callback_factory(
    collection_freq=2, max_samples_per_feature=K, context_size=CTX, activation_threshold=THR, top_features_to_save=F,
    samples_per_feature_to_save=K,
)


def collected(module, schedule):
    return [s for s in module.seen if CollectionSchedule(schedule).is_due(s.step)]


@pytest.mark.parametrize("mode, dedup", [("dense", False), ("flat", True), ("sparse", False), ("sparse", True)])
def test_files_match_brute_force_oracle(tmp_path, mode, dedup, merge_policy):
    module = SyntheticSAE(num_latents=F, mode=mode)
    cb = make_callback(tmp_path, recent_window_steps=3, samples_per_interval=2, seed=7, deduplicate_contexts=dedup,
                       merge_policy=merge_policy)
    data = TokenDataset(vocab=3) if dedup else TokenDataset()  # few tokens: identical contexts across sequences
    trainer(tmp_path, [cb], max_epochs=2).fit(module, loader(data))
    seen = collected(module, 2)
    assert len(seen) == 6 and len(module.seen) == 12
    files = check_against_oracle(tmp_path / "samples", seen)
    assert files["collection_summary.json"]["never_fired_features"] >= 2  # latents 0 and 1 never fire
    state = padded_state(files["full_state.pt"])
    assert state["top_values"].shape == (F, K)


def test_windows_clip_at_sequence_edges(tmp_path):
    module = SyntheticSAE(num_latents=F)
    trainer(tmp_path, [make_callback(tmp_path, context_size=6)]).fit(module, loader())
    files = read_dir(tmp_path / "samples")
    positions = set()
    for name, record in files.items():
        if name.startswith("feature_"):
            for s in record["top_samples"]:
                lo = max(0, s["position"] - 3)
                assert s["context_position"] == s["position"] - lo
                assert len(s["context_tokens"]) == min(9, s["position"] + 4) - lo
                assert len(s["context_activations"]) == len(s["context_tokens"]) == len(s["context_token_strs"])
                positions.add(s["position"])
    assert 0 in positions and 8 in positions


def test_gradient_accumulation_collects_every_micro_batch_of_a_due_step(tmp_path):
    module = SyntheticSAE(num_latents=F, mode="sparse")
    cb = make_callback(tmp_path, collection_freq=2)
    trainer(tmp_path, [cb], accumulate_grad_batches=2).fit(module, loader())
    seen = collected(module, 2)
    assert {s.step for s in seen} == {0, 2}
    assert len(seen) == 4  # two micro-batches per collected step
    check_against_oracle(tmp_path / "samples", seen)


def test_schedule_dict(tmp_path):
    module = SyntheticSAE(num_latents=F)
    schedule = {0: 4, 3: 1}
    trainer(tmp_path, [make_callback(tmp_path, collection_freq=schedule)], max_epochs=2).fit(module, loader())
    seen = collected(module, schedule)
    assert sorted({s.step for s in seen}) == [0, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    check_against_oracle(tmp_path / "samples", seen)


class Snapshot(Callback):
    """Records the collector state after every batch (runs after the sample callback)."""

    def __init__(self, sample_cb):
        self.sample_cb, self.states = sample_cb, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        collector = self.sample_cb.collector
        self.states.append(None if collector is None else padded_state(collector.state_dict()))


def test_non_collection_step_leaves_state_untouched(tmp_path):
    module = SyntheticSAE(num_latents=F)
    cb = make_callback(tmp_path, collection_freq=3)
    snap = Snapshot(cb)
    trainer(tmp_path, [cb, snap]).fit(module, loader())
    steps = [s.step for s in module.seen]
    for i in range(1, len(steps)):
        before, after = snap.states[i - 1], snap.states[i]
        if steps[i] % 3:
            for key, value in before.items():
                if torch.is_tensor(value):
                    assert torch.equal(value, after[key]), (steps[i], key)
                else:
                    assert value == after[key]
        else:
            assert not torch.equal(before["count"], after["count"])


@pytest.mark.parametrize("dtype, precision", [(torch.bfloat16, "bf16-mixed"), (torch.float16, "32-true")])
def test_half_precision_latents_requiring_grad_are_collected_and_untouched(tmp_path, dtype, precision):
    module = SyntheticSAE(num_latents=F, dtype=dtype)
    trainer(tmp_path, [make_callback(tmp_path, collection_freq=1)], precision=precision).fit(module, loader())
    assert module.scale.grad is not None
    check_against_oracle(tmp_path / "samples", module.seen)


RESUME_ARGS = dict(collection_freq=2, recent_window_steps=4, samples_per_interval=3, deduplicate_contexts=True)


def _two_epoch_run(tmp_path, mode, merge_policy=None):
    module = SyntheticSAE(num_latents=F, mode=mode)
    cb = make_callback(tmp_path, merge_policy=merge_policy, **RESUME_ARGS)
    trainer(tmp_path, [cb], max_epochs=2).fit(module, loader())
    return read_dir(tmp_path / "samples")


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_resume_writes_identical_files(tmp_path, mode, merge_policy):
    full = _two_epoch_run(tmp_path / "full", mode, merge_policy)

    ckpt_dir = tmp_path / "ckpt"
    first = trainer(
        tmp_path / "part",
        [make_callback(tmp_path / "part", merge_policy=merge_policy, **RESUME_ARGS),
         ModelCheckpoint(dirpath=ckpt_dir, save_last=True)],
        max_epochs=1, enable_checkpointing=True,
    )
    first.fit(SyntheticSAE(num_latents=F, mode=mode), loader())
    resumed = trainer(
        tmp_path / "part", [make_callback(tmp_path / "part", merge_policy=merge_policy, **RESUME_ARGS)], max_epochs=2
    )
    resumed.fit(SyntheticSAE(num_latents=F, mode=mode), loader(), ckpt_path=ckpt_dir / "last.ckpt")
    part = read_dir(tmp_path / "part" / "samples")

    assert full.keys() == part.keys()
    for name in full:
        if name == "full_state.pt":
            want, got = padded_state(full[name]), padded_state(part[name])
            for key, value in want.items():
                assert torch.equal(value, got[key]) if torch.is_tensor(value) else value == got[key]
        else:
            if name == "collection_summary.json":
                full[name]["config"].pop("dirpath", None), part[name]["config"].pop("dirpath", None)
            assert full[name] == part[name], name


def test_resume_with_another_latent_count_is_a_clear_error(tmp_path):
    # (other sizes: test_entry_points, for the callback and the collector)
    ckpt_dir = tmp_path / "ckpt"
    trainer(tmp_path, [make_callback(tmp_path), ModelCheckpoint(dirpath=ckpt_dir, save_last=True)],
            enable_checkpointing=True).fit(SyntheticSAE(num_latents=F), loader())
    with pytest.raises(ValueError, match=r"10 latents.*12"):
        trainer(tmp_path, [make_callback(tmp_path)], max_epochs=2).fit(
            SyntheticSAE(num_latents=12), loader(), ckpt_path=ckpt_dir / "last.ckpt")


def test_feature_files_that_leave_the_top_are_removed(tmp_path):
    cb = make_callback(tmp_path, top_features_to_save=3, collection_freq=1)
    trainer(tmp_path, [cb], max_steps=1).fit(SyntheticSAE(num_latents=F), loader())
    first = sorted(p.name for p in (tmp_path / "samples").glob("feature_*"))
    cb2 = make_callback(tmp_path, top_features_to_save=3, collection_freq=1, rank_features_by="activation_count")
    trainer(tmp_path, [cb2], max_epochs=2).fit(SyntheticSAE(num_latents=F), loader(TokenDataset(seed=5)))
    second = sorted(p.name for p in (tmp_path / "samples").glob("feature_*"))
    summary = json.loads((tmp_path / "samples" / "collection_summary.json").read_text())
    assert len(second) == 3
    assert second == sorted(e["file"] for e in summary["top_features_by_activation"])
    counts = [e["activation_count"] for e in summary["top_features_by_activation"]]
    assert counts == sorted(counts, reverse=True)
    assert len(first) == 3


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_131072_latents_collect_and_save_in_seconds(tmp_path, mode):
    wide = 131072
    module = SyntheticSAE(num_latents=wide, mode=mode, k=4)
    cb = make_callback(tmp_path, collection_freq=1, max_samples_per_feature=8, top_features_to_save=100,
                       samples_per_feature_to_save=3)
    trainer(tmp_path, [cb], max_steps=3).fit(module, loader())
    files = read_dir(tmp_path / "samples")
    summary = files["collection_summary.json"]
    dense = torch.cat([s.latents.reshape(-1, wide) for s in module.seen])
    fired = (dense.double() > THR).sum(0)
    assert summary["alive_features"] == int((fired > 0).sum())
    assert summary["num_features_tracked"] == wide
    assert len([n for n in files if n.startswith("feature_")]) == 100
    top = files["full_state.pt"]["top"]
    assert top["capacity"] == 8 and top["count"].shape == (wide,) and len(top["values"]) == int(top["count"].sum())
    best = summary["top_features_by_activation"][0]["feature_idx"]
    want = torch.sort(dense[:, best][dense[:, best].double() > THR], descending=True).values[:3]
    got = [s["activation_value"] for s in files[f"feature_{best:05d}_samples.json"]["top_samples"]]
    assert got == want.tolist()
    assert files[f"feature_{best:05d}_samples.json"]["statistics"]["activation_count"] == int(fired[best])


def test_each_save_writes_the_markdown_report_unless_turned_off(tmp_path):
    trainer(tmp_path, [make_callback(tmp_path)]).fit(SyntheticSAE(num_latents=F), loader())
    report = (tmp_path / "samples" / "interpretability_report.md").read_text()
    summary = json.loads((tmp_path / "samples" / "collection_summary.json").read_text())
    top = summary["top_features_by_activation"][0]["feature_idx"]
    assert "Steps collected" in report and f"[{top}](#feature-{top})" in report
    trainer(tmp_path / "off", [make_callback(tmp_path / "off", write_report=False)]).fit(
        SyntheticSAE(num_latents=F), loader())
    assert not (tmp_path / "off" / "samples" / "interpretability_report.md").exists()
    assert (tmp_path / "off" / "samples" / "collection_summary.json").exists()


class WordPieceLike:
    """A tokenizer with WordPiece's conventions: '##' marks a continuation, tokens join with spaces."""

    vocab = {i: (f"##p{i}" if i % 4 == 0 else f"w{i}") for i in range(30)}

    def convert_ids_to_tokens(self, ids):
        return [self.vocab[i] for i in ids]

    def decode(self, ids):
        return self.convert_tokens_to_string(self.convert_ids_to_tokens(ids))

    def convert_tokens_to_string(self, tokens):
        return " ".join(tokens).replace(" ##", "")


def test_wordpiece_display_strings_read_as_text(tmp_path):
    trainer(tmp_path, [make_callback(tmp_path, tokenizer=WordPieceLike())]).fit(SyntheticSAE(num_latents=F), loader())
    files = read_dir(tmp_path / "samples")
    checked = 0
    for name, record in files.items():
        if name.startswith("feature_"):
            for s in record["top_samples"]:
                joined = "".join(s["context_token_strs"])
                assert joined.strip() == s["context_text"].replace("##", "")
                checked += 1
    assert checked


@pytest.mark.parametrize("on", [True, False])
def test_fit_start_logs_the_serve_command_for_the_directory(tmp_path, caplog, on):
    import logging

    caplog.set_level(logging.INFO)
    trainer(tmp_path, [make_callback(tmp_path, log_serve_command=on)]).fit(SyntheticSAE(num_latents=F), loader())
    lines = [r.getMessage() for r in caplog.records if "lightning-sae-samples serve" in r.getMessage()]
    assert len(lines) == int(on)
    if on:
        assert lines[0].endswith(f"lightning-sae-samples serve {tmp_path / 'samples'}")
