"""Every reader sees one committed save, whole, while a real writer in another process commits saves in a loop.

The writer (``save_loop_script.py``) collects one more batch per save, so every file of a save carries its
``tokens_seen``: a read that mixed two saves shows two values. Readers must never mix them, and never call a
directory corrupt because a commit moved or removed a file under them.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_sae_samples import ActivationSampleAnalyzer, SaveChangedError
from lightning_sae_samples.analysis.export import export_samples
from lightning_sae_samples.cli import main as cli_main
from lightning_sae_samples.samples_dir.reader import read_one_save, save_signature

SCRIPT = Path(__file__).parent / "save_loop_script.py"


def _writer(path: Path, saves: int, pause: float = 0.0) -> subprocess.Popen:
    root = str(Path(__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(path), str(saves), str(pause)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    assert proc.stdout.readline().strip() == "0", "the writer did not commit its first save"
    return proc


def _check_whole(analyzer: ActivationSampleAnalyzer) -> None:
    summary = analyzer.summary
    assert summary.last_collected_step == summary.global_step
    for idx in analyzer.saved_features:
        stats = analyzer.feature(idx).stats
        assert stats.tokens_seen == summary.tokens_seen, "a feature file of another save"
        assert stats.last_step is None or stats.last_step <= summary.global_step
    unsaved = next(i for i in range(analyzer.num_features) if i not in analyzer.saved_features)
    assert analyzer.feature(unsaved).stats.tokens_seen == summary.tokens_seen, "a full_state.pt of another save"


def test_the_analyzer_reports_and_export_read_one_save_while_saves_keep_coming(tmp_path):
    path = tmp_path / "samples"
    # Saves far more often than a training run's (a pause of 50 ms), so many reads overlap a commit, and commits
    # land between opening an analyzer and its first read of full_state.pt: at any load, no read may fail.
    writer = _writer(path, 12, pause=0.05)
    good, steps = 0, []
    try:
        while writer.poll() is None:
            analyzer = ActivationSampleAnalyzer(path)
            _check_whole(analyzer)
            if good % 5 == 0:
                analyzer.render_markdown(top_k_features=3, examples_per_feature=2)
                exported = export_samples(analyzer, tmp_path / "export", format="jsonl")
                run = json.loads(exported["summary"].read_text())["run"]
                assert run["tokens_seen"] == analyzer.summary.tokens_seen
                rows = [json.loads(line) for line in exported["features"].read_text().splitlines()]
                assert {r["tokens_seen"] for r in rows} <= {analyzer.summary.tokens_seen}
            good += 1
            steps.append(analyzer.summary.global_step)
    finally:
        writer.kill()
        writer.communicate()  # waits, and closes its pipe
    assert good >= 5
    assert len(set(steps)) >= 3, "the reads did not overlap the saves"


def test_an_analyzer_reads_its_own_saves_full_state_after_later_saves_replaced_it(tmp_path):
    import torch

    from lightning_sae_samples import ActivationSampleCollector

    path = tmp_path / "samples"
    collector = ActivationSampleCollector(num_latents=6, max_samples_per_feature=2, context_size=2,
                                          top_features_to_save=2, samples_per_feature_to_save=1, write_report=False)
    for step in range(3):
        collector.update(torch.randint(0, 9, (2, 5)), latents=torch.rand(2, 5, 6) * (1 + step), step=step)
        collector.save(path, global_step=step)
        if step == 0:
            analyzer = ActivationSampleAnalyzer(path)  # opened on the save of step 0; full_state.pt not read yet
    assert ActivationSampleAnalyzer(path).summary.global_step == 2
    _check_whole(analyzer)  # full_state.pt of the analyzer's save, though two saves replaced it since


def test_the_command_line_reads_one_save_while_saves_keep_coming(tmp_path, capsys):
    path = tmp_path / "samples"
    writer = _writer(path, 8)
    codes = []
    try:
        while writer.poll() is None:
            codes.append(cli_main([str(path), "--report", str(tmp_path / "r.md"), "--feature", "0", "--top-k", "3"]))
            codes.append(cli_main(["export", str(path), str(tmp_path / "e")]))
    finally:
        writer.kill()
        writer.communicate()  # waits, and closes its pipe
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert codes and set(codes) == {0}, errors


def test_a_read_overlapping_commits_every_time_says_so(tmp_path):
    path = tmp_path / "samples"
    path.mkdir()
    (path / "collection_summary.json").write_text("{}")

    def read_while_a_save_lands():
        (path / "collection_summary.json").write_text(json.dumps({"n": os.urandom(4).hex()}))
        return "read"

    started = time.monotonic()
    with pytest.raises(SaveChangedError, match=r"a save was committed while reading; retry \(\d+ reads in 0.3 s"):
        read_one_save(path, read_while_a_save_lands, seconds=0.3)
    assert 0.3 <= time.monotonic() - started < 5, "the reader waits for its deadline, not for a count of reads"
    assert read_one_save(path, lambda: "read") == ("read", save_signature(path))


def test_the_history_read_on_first_use_belongs_to_the_analyzers_save(tmp_path):
    import torch

    from lightning_sae_samples import ActivationSampleCollector

    path = tmp_path / "samples"
    collector = ActivationSampleCollector(num_latents=6, max_samples_per_feature=2, context_size=2,
                                          top_features_to_save=3, samples_per_feature_to_save=1, write_report=False)
    for step in range(2):
        collector.update(torch.randint(0, 9, (2, 5)), latents=torch.rand(2, 5, 6) * (1 + step), step=step)
        collector.save(path, global_step=step)
        if step == 0:
            analyzer = ActivationSampleAnalyzer(path)  # opened on the save of step 0; history not read yet
    assert [w.end for w in analyzer.history.windows] == [0]  # the history of its save, not the directory's now
    assert [w.end for w in ActivationSampleAnalyzer(path).history.windows] == [0, 1]
