"""A real Trainer over shuffled rows of cached activations with token refs: the callback against the oracle."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import read_dir, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from oracle import assert_dir_matches_oracle
from rows_helpers import CTX, SETTINGS, THR, F, K, RowSAE, shuffled_rows, token_source

from lightning_sae_samples import ActivationSampleCallback, ActivationSampleCollector
from lightning_sae_samples.state.history import without_window_entries
from lightning_sae_samples.state.tables import padded_state

SCRIPT = Path(__file__).parent / "rows_ddp_script.py"


def collected(module: RowSAE) -> list:
    return [s for s in module.seen if s.step % 2 == 0]


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_the_callback_collects_shuffled_rows_exactly(tmp_path, mode):
    callback = ActivationSampleCallback(dirpath=tmp_path / "samples", token_source=token_source(), **SETTINGS)
    module = RowSAE(mode)
    trainer(tmp_path, [callback], max_epochs=2).fit(module, shuffled_rows())
    seen = collected(module)
    assert len(seen) > 3
    files = read_dir(tmp_path / "samples")
    assert_dir_matches_oracle(files, seen, F, K, CTX, THR)
    # The summary counts every real token once per epoch: padding rows never reach the SAE.
    assert files["collection_summary.json"]["tokens_seen"] == sum(len(s.refs) for s in seen)


def test_a_yaml_style_import_path_names_the_source(tmp_path):
    callback = ActivationSampleCallback(dirpath=tmp_path / "samples", token_source="rows_helpers:token_source",
                                        **SETTINGS)
    module = RowSAE()
    trainer(tmp_path, [callback]).fit(module, shuffled_rows())
    assert_dir_matches_oracle(read_dir(tmp_path / "samples"), collected(module), F, K, CTX, THR)


def test_without_a_token_source_the_callback_takes_the_modules(tmp_path):
    callback = ActivationSampleCallback(dirpath=tmp_path / "samples", **SETTINGS)
    module = RowSAE()
    module.token_source = token_source()
    trainer(tmp_path, [callback]).fit(module, shuffled_rows())
    assert_dir_matches_oracle(read_dir(tmp_path / "samples"), collected(module), F, K, CTX, THR)


@pytest.mark.parametrize("row_windows", ["auto", "tokens"])
def test_resuming_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path, row_windows):
    def fit(epochs, ckpt_path=None):
        callbacks = [ActivationSampleCallback(dirpath=tmp_path / "samples", token_source=token_source(),
                                              row_windows=row_windows, **SETTINGS),
                     ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)]
        module = RowSAE()
        trainer(tmp_path, callbacks, max_epochs=epochs, enable_checkpointing=True).fit(
            module, shuffled_rows(epochs), ckpt_path=ckpt_path)
        return collected(module)

    # Each run shuffles anew: the oracle over the rows both runs saw is what an uninterrupted run over them keeps.
    first = fit(1)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    (kept,) = [s["collector"] for key, s in checkpoint["callbacks"].items() if key.startswith("ActivationSample")]
    # With an array source the checkpoint holds each kept sample's ref, and no window.
    assert ("token_ref" in kept["top"]) == (row_windows == "auto")
    assert ("context_tokens" in kept["top"]) == (row_windows == "tokens")
    second = fit(2, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert {s.step for s in first}.isdisjoint(s.step for s in second)
    assert_dir_matches_oracle(read_dir(tmp_path / "samples"), first + second, F, K, CTX, THR)


def assert_equal_states(a: dict, b: dict) -> None:
    a, b = padded_state(a), padded_state(b)
    assert a.keys() == b.keys()
    for name, value in a.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == b[name].dtype and torch.equal(value.nan_to_num(-7.0), b[name].nan_to_num(-7.0)), name
        else:
            assert value == b[name], name


def one_process(seen: list, mode: str, **settings) -> ActivationSampleCollector:
    """One collector fed every rank's rows of each step in one batch."""
    settings = {**{k: v for k, v in SETTINGS.items() if k != "collection_freq"}, **settings}
    one = ActivationSampleCollector(num_latents=F, token_source=token_source(), **settings)
    for step in sorted({s.step for s in seen}):
        rows = [s for s in seen if s.step == step]
        refs = torch.tensor([r for s in rows for r in s.refs])
        latents = torch.cat([s.latents for s in rows])
        if mode == "sparse":
            values, indices = latents.topk(3, dim=-1)
            one.update(token_refs=refs, latent_indices=indices, latent_values=values, step=step)
        else:
            one.update(token_refs=refs, latents=latents, step=step)
    return one


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One launch of two DDP processes that fit a dense, then a sparse SAE: ``<out>/dense``, ``<out>/sparse``."""
    out = tmp_path_factory.mktemp("rows_ddp")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--mode", "dense", "sparse"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_two_process_ddp_equals_one_process_fed_the_same_rows(ddp_run, mode):
    out = ddp_run / mode
    seen = [s for rank in (0, 1) for s in torch.load(out / f"seen_{rank}.pt", weights_only=False)
            if s.step % 2 == 0]
    assert {s.rank for s in seen} == {0, 1}
    files = read_dir(out / "samples")
    assert_dir_matches_oracle(files, seen, F, K, CTX, THR)
    # One process fed both ranks' rows of each step in one batch keeps exactly the same state, ties included:
    # a row's order key is its ref, whichever process saw it.
    one = one_process(seen, mode)
    # full_state.pt leaves out the history window, which the save has just written to training_history.pt. It holds
    # windows: the DDP run kept refs (an array source), read back at save, as one process keeping windows has them.
    assert_equal_states(without_window_entries(one.with_windows(one.state_dict()["collector"])), files["full_state.pt"])
    tokens = one_process(seen, mode, row_windows="tokens")
    assert "context_tokens" in tokens.state_dict()["collector"]["top"]
    assert_equal_states(without_window_entries(tokens.state_dict()["collector"]), files["full_state.pt"])


def test_refs_with_a_ring_found_on_the_module_are_refused_at_fit_start(tmp_path):
    from lightning_sae_samples.token_sources import TokenRing

    callback = ActivationSampleCallback(dirpath=tmp_path / "samples", row_windows="refs", **SETTINGS)
    module = RowSAE()
    module.token_source = TokenRing(4 * 8)
    with pytest.raises(ValueError, match=r"row_windows='refs'.*TokenRing.*Set row_windows='tokens'"):
        trainer(tmp_path, [callback]).fit(module, shuffled_rows())
