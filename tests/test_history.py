"""The history of every latent through training (training_history.pt): windows, thinning, resume, DDP, reading."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    BlockPendingDir,
    DriftingSAE,
    SwitchingSAE,
    TokenDataset,
    assert_same,
    loader,
    make_callback,
    trainer,
)
from history_oracle import assert_window_matches, window_oracle
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_sae_samples.analysis.history import FeatureHistory
from lightning_sae_samples.samples_dir.history_file import load_history, windows_of_payload
from lightning_sae_samples.samples_dir.names import SamplesDirectoryError

F, THR, CTX = 10, 0.5, 2
SCRIPT = Path(__file__).parent / "history_ddp_script.py"


def fit(root, max_steps, ckpt_every=2, ckpt_path=None, switching=False, **settings):
    """``switching``: latents of two tokens each over longer sequences, so that the odd ones' change shows."""
    model = (SwitchingSAE if switching else DriftingSAE)(drift_step=3, mode="sparse", num_latents=F)
    callback = make_callback(root / "samples", **settings)
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=ckpt_every, save_top_k=-1)
    run = trainer(root, [callback, checkpoints], max_steps=max_steps, max_epochs=None, enable_checkpointing=True)
    run.fit(model, loader(TokenDataset(num_sequences=40, seq_len=64 if switching else 9)), ckpt_path=ckpt_path)
    return model, callback


def windows(root):
    return windows_of_payload(load_history(root / "samples" / "training_history.pt"))


def saved_features(root):
    import json

    summary = json.loads((root / "samples" / "collection_summary.json").read_text())
    return {entry["feature_idx"] for entry in summary["top_features_by_activation"]}


def test_each_save_appends_the_window_the_brute_force_oracle_gives(tmp_path):
    model, callback = fit(tmp_path, max_steps=7, history_windows_per_level=100)
    found = windows(tmp_path)
    assert [(w["start"], w["end"]) for w in found] == [(0, 2), (2, 4), (4, 6), (6, 7)]
    for window in found:
        seen = [s for s in model.seen if window["start"] <= s.step < window["end"]]
        expected = window_oracle(seen, F, THR, CTX, top_tokens=5, samples=3)
        # Only the last window's saved features are known from the summary; its samples are checked exactly.
        saved = saved_features(tmp_path) if window is found[-1] else set(window["samples"]["latent"].tolist())
        assert_window_matches(window, expected, saved)
    assert found[-1]["tokens_seen"] == sum(s.tokens.numel() for s in model.seen if s.step >= 6)


def test_a_failed_save_leaves_its_window_open_for_the_next_save(tmp_path):
    model = DriftingSAE(drift_step=3, mode="sparse", num_latents=F)
    callbacks = [make_callback(tmp_path / "samples", history_windows_per_level=100),
                 BlockPendingDir(tmp_path / "samples", block=2, unblock=3),
                 ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)]
    run = trainer(tmp_path, callbacks, max_steps=5, max_epochs=None, enable_checkpointing=True)
    run.fit(model, loader(TokenDataset(num_sequences=40)))
    found = windows(tmp_path)
    # The save of step 2 failed: its window goes on to the save of step 3, none of its activations lost.
    assert [(w["start"], w["end"]) for w in found] == [(0, 1), (1, 3), (3, 4), (4, 5)]
    for window in found[:-1]:
        seen = [s for s in model.seen if window["start"] <= s.step < window["end"]]
        assert_window_matches(window, window_oracle(seen, F, THR, CTX, top_tokens=5, samples=3),
                              set(window["samples"]["latent"].tolist()))
    # The checkpoint of the failed step holds the open window, so a run resumed from it writes it too.
    ckpt = torch.load(tmp_path / "ckpt" / "epoch=0-step=2.ckpt", weights_only=False)
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("ActivationSampleCallback"))["collector"]
    assert state["window_start"] == 1
    before = window_oracle([s for s in model.seen if s.step == 1], F, THR, CTX, top_tokens=5, samples=3)
    assert int(state["window_count"].sum()) == sum(v["count"] for v in before.values()) > 0


def test_thinning_merges_the_oldest_windows_of_a_level_and_keeps_the_totals(tmp_path):
    model, _ = fit(tmp_path, max_steps=8, ckpt_every=1, history_windows_per_level=1)
    found = windows(tmp_path)
    # 8 saves with one window per level: a binary counter, here one window of level 3 covering everything.
    assert [(w["start"], w["end"], w["level"], w["saves"]) for w in found] == [(0, 8, 3, 8)]
    state = torch.load(tmp_path / "samples" / "full_state.pt", weights_only=True)
    latents = found[0]["latent"].long()
    assert torch.equal(found[0]["count"], state["count"][latents])
    assert torch.equal(found[0]["max"], state["max"][latents])
    assert found[0]["tokens_seen"] == int(state["tokens_seen"])


def test_resume_from_an_earlier_checkpoint_gives_the_uninterrupted_history(tmp_path):
    def run(root, epochs, ckpt_path=None):
        callback = make_callback(root / "samples", history_windows_per_level=2)
        checkpoints = ModelCheckpoint(dirpath=root / "ckpt", every_n_epochs=2, save_top_k=-1)
        fit_run = trainer(root, [callback, checkpoints], max_epochs=epochs, enable_checkpointing=True)
        fit_run.fit(DriftingSAE(drift_step=3, mode="sparse", num_latents=F), loader(TokenDataset(num_sequences=8)),
                    ckpt_path=ckpt_path)

    run(tmp_path / "ref", 6)  # saves at steps 4, 8, 12
    resumed = tmp_path / "resumed"
    run(resumed, 5)  # saves at 4, 8 and at the end, mid-window (10): the resumed run replaces that window
    run(resumed, 6, ckpt_path=resumed / "ckpt" / "epoch=3-step=8.ckpt")
    a = load_history(tmp_path / "ref" / "samples" / "training_history.pt")
    b = load_history(resumed / "samples" / "training_history.pt")
    assert [(w["start"], w["end"]) for w in windows_of_payload(a)] == [(0, 8), (8, 12)]
    assert_same(a, b, "history")


def test_resume_into_another_dirpath_carries_the_history(tmp_path):
    def run(root, epochs, ckpt_path=None):
        callback = make_callback(root / "samples", history_windows_per_level=2)  # thinned: merged windows travel
        checkpoints = ModelCheckpoint(dirpath=root / "ckpt", every_n_epochs=1, save_top_k=-1)
        fit_run = trainer(root, [callback, checkpoints], max_epochs=epochs, enable_checkpointing=True)
        fit_run.fit(DriftingSAE(drift_step=3, mode="sparse", num_latents=F), loader(TokenDataset(num_sequences=8)),
                    ckpt_path=ckpt_path)

    run(tmp_path / "ref", 5)  # 2 steps an epoch: saves at steps 2, 4, 6, 8, 10
    run(tmp_path / "first", 3)
    run(tmp_path / "second", 5, ckpt_path=tmp_path / "first" / "ckpt" / "epoch=2-step=6.ckpt")  # a new dirpath
    ref, resumed = (load_history(tmp_path / name / "samples" / "training_history.pt") for name in ("ref", "second"))
    assert [(w["start"], w["end"], w["level"]) for w in windows_of_payload(ref)] == [(0, 4, 1), (4, 8, 1), (8, 10, 0)]
    assert_same(ref, resumed, "history")
    # No latent reads as born where the second directory's run began.
    births = [e.step for e in FeatureHistory.from_dir(tmp_path / "second" / "samples").events() if e.kind == "birth"]
    assert births and 6 not in births


def test_plain_loop_resume_mid_window_is_exact(tmp_path):
    from helpers import make_collector

    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 20, (2, 6), generator=gen), torch.relu(torch.randn(2, 6, 9, generator=gen)) * 2)
               for _ in range(6)]

    def run(dirpath, resume_at=None):
        collector = make_collector()
        for step, (tokens, latents) in enumerate(batches):
            if step == resume_at:
                state = collector.state_dict()  # mid-window: the window so far is in the checkpoint
                collector = make_collector()
                collector.load_state_dict(state)
            collector.update(tokens, latents=latents, step=step)
            if step in (1, 5):
                collector.save(dirpath)
        return load_history(dirpath / "training_history.pt")

    assert_same(run(tmp_path / "a"), run(tmp_path / "b", resume_at=3), "history")


def test_two_process_ddp_history_equals_the_oracle_over_both_ranks(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = []
    for file in sorted(tmp_path.glob("seen_*.pt")):
        seen.extend(torch.load(file, weights_only=False))
    assert {s.rank for s in seen} == {0, 1}
    found = windows(tmp_path)
    assert [(w["start"], w["end"]) for w in found] == [(0, 2), (2, 4), (4, 5)]
    for window in found:
        part = [s for s in seen if window["start"] <= s.step < window["end"]]
        expected = window_oracle(part, F, THR, CTX, top_tokens=5, samples=3)
        saved = saved_features(tmp_path) if window is found[-1] else set(window["samples"]["latent"].tolist())
        assert_window_matches(window, expected, saved)


@pytest.mark.parametrize("field, value, named", [
    ("format_version", 7, "format_version"),
    ("rows.latent", "out of range", "rows.latent"),
    ("windows.end", "backwards", "windows.end"),
    ("vocab.strings", [1], "vocab.strings"),
    ("samples.context_tokens", torch.zeros(3), "samples.context_tokens"),
])
def test_a_hostile_history_file_gives_one_line_naming_file_and_field(tmp_path, field, value, named):
    fit(tmp_path, max_steps=4)
    path = tmp_path / "samples" / "training_history.pt"
    payload = torch.load(path, weights_only=True)
    group, _, key = field.rpartition(".")
    target = payload[group] if group else payload
    if value == "out of range":
        value = target[key] + F
    elif value == "backwards":
        value = target[key].flip(0) - 10
    target[key] = value
    torch.save(payload, path)
    with pytest.raises(SamplesDirectoryError) as err:
        load_history(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and f"`{named}`" in message


def test_reports_console_and_export_tell_each_saved_feature_through_training(tmp_path):
    import io
    import json

    from rich.console import Console

    from lightning_sae_samples import ActivationSampleAnalyzer

    fit(tmp_path, max_steps=7, switching=True, history_windows_per_level=100)
    analyzer = ActivationSampleAnalyzer(tmp_path / "samples")
    history = analyzer.history
    latent = analyzer.saved_features[0]
    story = analyzer.feature(latent).story
    first = history.feature(latent)[0].window
    assert story.startswith(f"born at step {first.start}") and "frequency " in story
    assert len(story.rsplit("frequency ", 1)[1]) == len(history.windows)
    # The switching SAE moves its odd latents to other tokens from step 3: they change meaning, listed by step.
    changed = [e for e in history.events() if e.kind == "meaning_change"]
    assert changed and all(e.latent % 2 == 1 for e in changed)
    assert "meaning changed at step" in analyzer.feature(changed[0].latent).story
    out = io.StringIO()
    analyzer.print_feature_report(latent, console=Console(file=out, width=200, color_system=None))
    assert f"Through training: {story}" in out.getvalue()
    assert "Through training: born at step" in analyzer.render_markdown()
    assert "Through training: born at step" in analyzer.render_html()
    paths = analyzer.export(tmp_path / "export")
    rows = [json.loads(line) for line in paths["history"].read_text().splitlines()]
    assert {row["latent"] for row in rows} <= set(analyzer.saved_features)
    want = [r for r in history.rows() if r["latent"] == latent]
    assert [r for r in rows if r["latent"] == latent] == want and len(want) == len(history.feature(latent))


def test_serve_answers_the_timeline_the_run_chart_and_the_history_filters(tmp_path):
    pytest.importorskip("starlette")
    pytest.importorskip("httpx")
    from starlette.testclient import TestClient

    from lightning_sae_samples import ActivationSampleAnalyzer
    from lightning_sae_samples.serve.app import create_app
    from lightning_sae_samples.serve.runs import RunSet

    fit(tmp_path, max_steps=7, switching=True, history_windows_per_level=100)
    history = ActivationSampleAnalyzer(tmp_path / "samples").history
    changed = history.most_changed(100)
    with TestClient(create_app(RunSet(tmp_path / "samples"))) as client:
        page = client.get(f"/api/history/features/{changed[0]}").json()
        assert [w["count"] for w in page["windows"]] == [s.count for s in history.feature(changed[0])]
        assert [e["kind"] for e in page["events"]][0] == "birth" and "meaning_change" in [e["kind"] for e in
                                                                                          page["events"]]
        change = next(e for e in page["events"] if e["kind"] == "meaning_change")
        assert change["p_value"] < 0.001 and change["shift"] >= 0.3 and change["before_window"] < change["window"]
        assert [(w["rare"], w["tested"]) for w in page["windows"]] == [(w["count"] < 5, w["count"] >= 20)
                                                                       for w in page["windows"]]
        chart = client.get("/api/history/run").json()["windows"]
        assert [(w["alive"], w["rare"]) for w in chart] == [(int((w["count"] >= 5).sum()), int((w["count"] < 5).sum()))
                                                            for w in windows(tmp_path)]
        listed = client.get("/api/history/latents?filter=changed&sort=changes").json()
        assert [r["latent"] for r in listed["rows"]] == changed and listed["total"] == len(changed)
        born = client.get("/api/history/latents?filter=born_after&step=0&sort=birth").json()["rows"]
        assert all(r["birth"] > 0 for r in born)
        assert client.get("/api/history/latents?filter=nonsense").status_code == 400
        assert client.get("/api/history/features/x").status_code == 404
        # A window's kept samples come apart from the timeline, which only counts them.
        kept = next(i for i in sorted(saved_features(tmp_path)) if any(s.samples for s in history.feature(i)))
        stats = next(s for s in history.feature(kept) if s.samples)
        counted = {w["index"]: w["kept_samples"] for w in client.get(f"/api/history/features/{kept}").json()["windows"]}
        assert counted == {s.window.index: len(s.samples) for s in history.feature(kept)}
        shown = client.get(f"/api/history/features/{kept}/windows/{stats.window.index}").json()["samples"]
        assert [[t["text"] for t in s["tokens"] if t["activating"]] for s in shown] == [[s.text] for s in stats.samples]
        assert [s["step"] for s in shown] == [s.step for s in stats.samples]
        missing = client.get(f"/api/history/features/{kept}/windows/{len(history.windows)}")
        assert missing.status_code == 404 and "windows 0 to" in missing.json()["error"]
