"""Saves that meet odd text, a full disk, a second process or a failure: they succeed or fail cleanly."""

import builtins
import errno
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import WRITE, make_collector, padded_batches, read_dir, state_after

from lightning_sae_samples.analysis.analyzer import ActivationSampleAnalyzer
from lightning_sae_samples.samples_dir import atomic
from lightning_sae_samples.samples_dir.names import (
    FULL_STATE_NAME,
    LOCK_NAME,
    MANIFEST_NAME,
    PENDING_DIR,
    SUMMARY_NAME,
)
from lightning_sae_samples.samples_dir.reader import read_samples_dir
from lightning_sae_samples.samples_dir.writer import write_samples_dir

TESTS = Path(__file__).parent


class SurrogateTokenizer:
    """Decodes raw bytes as ``bytes.decode("utf-8", "surrogateescape")`` does: byte 0xFF of id 3 becomes '\\udcff'."""

    name_or_path = "surrogate-bytes"

    @staticmethod
    def _bytes(token_id):
        return bytes([0xFF]) if token_id == 3 else b"tok%d" % token_id

    def decode(self, ids):
        return b"".join(self._bytes(int(i)) for i in ids).decode("utf-8", "surrogateescape")

    def convert_ids_to_tokens(self, ids):
        return [self._bytes(int(i)).decode("utf-8", "surrogateescape") for i in ids]

    def convert_tokens_to_string(self, tokens):
        return "".join(tokens)


def _collected(**settings):
    collector = make_collector(**settings)
    for step, (tokens, mask, latents) in enumerate(padded_batches(3, vocab=5)):
        collector.update(tokens, latents=latents, step=step, attention_mask=mask)
    return collector


def test_lone_surrogates_from_the_tokenizer_become_the_replacement_character(tmp_path):
    collector = _collected(write_report=True)
    collector.save(tmp_path, SurrogateTokenizer())
    assert not (tmp_path / PENDING_DIR).exists()
    files = read_dir(tmp_path)
    texts = [(tmp_path / name).read_text(encoding="utf-8") for name in files if name.endswith((".json", ".md"))]
    joined = "".join(texts)
    assert "\ufffd" in joined and "tok1" in joined
    samples = [s for name, f in files.items() if name.startswith("feature_") for s in f["top_samples"]]
    centre = [s for s in samples if s["context_tokens"][s["context_position"]] == 3]
    assert centre and all(s["text"] == "\ufffd" for s in centre)
    assert all(s["context_token_strs"][s["context_tokens"].index(3)] == "\ufffd" for s in samples
               if 3 in s["context_tokens"])
    assert any("\ufffd" in s["context_text"] for s in samples)
    # what was written reads back, in the analyzer and in reports
    analyzer = ActivationSampleAnalyzer(tmp_path)
    assert "\ufffd" in analyzer.render_markdown(5, 3)


def test_a_failing_save_leaves_no_pending_directory(tmp_path):
    write_samples_dir(tmp_path, state_after(1), global_step=1, **WRITE)

    def crash(pending):
        raise RuntimeError("stopped before the commit")

    with pytest.raises(RuntimeError):
        write_samples_dir(tmp_path, state_after(4, seed=1), global_step=4, before_commit=crash, **WRITE)
    assert not (tmp_path / PENDING_DIR).exists()
    assert read_samples_dir(tmp_path).summary["global_step"] == 1


@pytest.fixture
def full_disk(monkeypatch):
    """Writes of the full-state file fail as on a full disk: the file's ``write`` raises ENOSPC part way, inside
    the real ``torch.save``, which reports it as its own ``RuntimeError`` with the ``OSError`` chained."""
    real_open = builtins.open

    class Full:
        def __init__(self, handle):
            self.handle, self.written = handle, 0

        def write(self, data):
            if self.written > 64:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(data)
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

    def open_(path, *args, **kwargs):
        handle = real_open(path, *args, **kwargs)
        return Full(handle) if str(path).endswith(f".{FULL_STATE_NAME}.tmp") else handle

    monkeypatch.setattr(atomic, "open", open_, raising=False)


def test_a_full_disk_is_named_and_the_partial_files_go_at_once(tmp_path, full_disk):
    collector = _collected()
    with pytest.raises(OSError, match="No space left on device") as caught:
        collector.save(tmp_path)
    assert caught.value.errno == errno.ENOSPC and str(tmp_path / PENDING_DIR / FULL_STATE_NAME) in str(caught.value)
    assert isinstance(caught.value.__cause__, RuntimeError)  # torch.save's own error stays in the chain
    assert not (tmp_path / PENDING_DIR).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]  # nothing else: no partial file stays


def test_a_full_disk_in_a_training_run_is_logged_by_its_cause(tmp_path, full_disk, caplog):
    from helpers import SyntheticSAE, loader, make_callback, trainer

    samples = tmp_path / "samples"
    trainer(tmp_path, [make_callback(samples)], max_steps=2).fit(SyntheticSAE(num_latents=10), loader())
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert errors and "No space left on device" in errors[0].getMessage()
    assert "unexpected pos" not in errors[0].getMessage().split("(RuntimeError")[0]
    assert not (samples / PENDING_DIR).exists()


def test_each_save_records_its_save_id_in_the_summary_and_the_manifest(tmp_path):
    ids = []
    for steps in (2, 3):
        write_samples_dir(tmp_path, state_after(steps), global_step=steps, **WRITE)
        summary = json.loads((tmp_path / SUMMARY_NAME).read_text())
        manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
        assert summary["save_id"] == manifest["save_id"] and summary["save_id"].startswith(f"{steps}-")
        ids.append(summary["save_id"])
    assert ids[0] != ids[1]
    # the id depends only on what was written: the same collection saved again (an exact resume) has the same id
    again = tmp_path / "again"
    write_samples_dir(again, state_after(3), global_step=3, **WRITE)
    assert json.loads((again / SUMMARY_NAME).read_text())["save_id"] == ids[1]
    write_samples_dir(again, state_after(3), global_step=3, **{**WRITE, "top_features": 2})
    assert json.loads((again / SUMMARY_NAME).read_text())["save_id"] != ids[1]


PLAIN_LOOP = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from helpers import make_collector, padded_batches

    dirpath, name, seed, other_started = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    (dirpath.parent / f"{{name}}.started").write_text("")
    deadline = time.monotonic() + 60
    while not other_started.exists() and time.monotonic() < deadline:  # both loops run at the same time
        time.sleep(0.01)
    collector = make_collector()
    results = []
    for step, (tokens, mask, latents) in enumerate(padded_batches(8, seed=seed)):
        collector.update(tokens, latents=latents, step=step, attention_mask=mask)
        try:
            collector.save(dirpath)
            results.append("ok")
        except Exception as err:
            results.append(f"{{type(err).__name__}}: {{err}}")
    print(json.dumps(results))
    """
)


def test_two_plain_loop_processes_saving_into_one_directory(tmp_path):
    script = tmp_path / "plain_loop.py"
    script.write_text(PLAIN_LOOP.format(tests=str(TESTS)))
    dirpath = tmp_path / "samples"
    runs = [subprocess.Popen([sys.executable, str(script), str(dirpath), name, str(seed),
                              str(tmp_path / f"{other}.started")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
            for name, other, seed in (("a", "b", 1), ("b", "a", 2))]
    outputs = [run.communicate(timeout=240) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err[-2000:] for _, err in outputs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    # Each loop's saves all succeed, or each is refused with the message that says why and what to do; no save
    # fails in any other way, and at least one loop saves every time.
    for saves in results:
        for result in saves:
            assert result == "ok" or (result.startswith("SamplesDirectoryError: Another run is writing samples")
                                      and "sae_samples.lock" in result and "own directory" in result), result
    assert any(all(r == "ok" for r in saves) for saves in results)
    refused = [saves for saves in results if any(r != "ok" for r in saves)]
    assert refused, "the two loops ran at the same time, so one must have been refused"
    # A loop holds the lock from its first save to its end: the other one is refused until then, never after.
    for saves in results:
        first_ok = saves.index("ok") if "ok" in saves else len(saves)
        assert all(r == "ok" for r in saves[first_ok:])
    summary = read_samples_dir(dirpath).summary
    assert summary["steps_collected"] == 8 and not (dirpath / PENDING_DIR).exists()


def test_a_collector_releases_its_lock_on_close(tmp_path):
    first, second = _collected(), _collected()
    first.save(tmp_path)
    with pytest.raises(ValueError, match="Another run is writing samples"):
        second.save(tmp_path)
    first.close()
    second.save(tmp_path)
    first.save(tmp_path / "other")  # another directory: its own lock
    with pytest.raises(ValueError, match="Another run is writing samples"):
        first.save(tmp_path)
