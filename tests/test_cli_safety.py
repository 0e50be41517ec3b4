"""The commands never write over a run's files, read only regular files, and say what went wrong in one line."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from render_support import write_fixture_dir

from lightning_sae_samples.analysis.analyzer import ActivationSampleAnalyzer
from lightning_sae_samples.cli import main
from lightning_sae_samples.samples_dir.names import SUMMARY_NAME
from lightning_sae_samples.samples_dir.reader import read_samples_dir


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    return write_fixture_dir(tmp_path_factory.mktemp("safety") / "samples")


def _run(commands, cwd):
    """``python -m lightning_sae_samples`` for each command line, concurrently."""
    env = {**os.environ, "COLUMNS": "160", "NO_COLOR": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "lightning_sae_samples", *args], cwd=cwd, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8")
             for args in commands]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        results.append((proc.returncode, out, err))
    return results


def _one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and "usage:" not in err, err
    return lines[0]


def test_the_commands_as_a_user_sees_them(samples, tmp_path):
    summary = (samples / SUMMARY_NAME).read_bytes()
    regular_file = tmp_path / "notes.txt"
    regular_file.write_text("not a samples directory")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "features.jsonl").write_text("mine\n")
    results = _run(
        [
            [str(samples), "--html", str(samples / SUMMARY_NAME)],
            [str(samples), "--report", str(samples / "feature_00003_samples.json")],
            ["export", str(samples), str(tmp_path / "foreign"), "--format", "jsonl"],
            ["serve", str(tmp_path / "nowhere")],
            [str(regular_file)],
            [str(samples), "--template-dir", str(tmp_path / "nonexistent")],
            [str(samples), "--top-k", "many"],
            ["export", str(samples)],
            ["serve", str(samples), "--port", "http"],
        ],
        cwd=tmp_path,
    )
    html, report, export, serve, file_dir, template, top_k, export_args, serve_args = results
    assert all(code == 2 for code, _, _ in results), [(code, err) for code, _, err in results]
    assert "Will not write a report to" in _one_line(html[2]) and f"samples directory {samples}" in html[2]
    assert "Will not write a report to" in _one_line(report[2])
    assert (samples / SUMMARY_NAME).read_bytes() == summary  # the run's summary is untouched
    assert "exists and this export did not write it" in _one_line(export[2])
    assert (tmp_path / "foreign" / "features.jsonl").read_text() == "mine\n"
    assert _one_line(serve[2]).startswith("lightning-sae-samples serve: error:")
    assert "is not a directory" in _one_line(file_dir[2]) and "does not exist" not in file_dir[2]
    assert "--template-dir" in _one_line(template[2]) and "is not a directory" in template[2]
    for (_, _, err), prog in ((top_k, "lightning-sae-samples"), (export_args, "lightning-sae-samples export"),
                              (serve_args, "lightning-sae-samples serve")):
        line = _one_line(err)
        assert line.startswith(f"{prog}: error:") and line.endswith(f"See `{prog} --help`.")


def test_reports_refuse_every_file_of_a_samples_directory_also_through_a_link(samples, tmp_path):
    analyzer = ActivationSampleAnalyzer(samples)
    (tmp_path / "link.html").symlink_to(samples / SUMMARY_NAME)
    for target in (samples / SUMMARY_NAME, samples / "full_state.pt", samples / "sae_samples_manifest.json",
                   samples / "sae_samples.lock", samples / ".sae_samples_pending" / "x.md", tmp_path / "link.html"):
        with pytest.raises(ValueError, match="Will not write a report"):
            analyzer.generate_html_report(target, 3, 2)
    # a file of another name in the directory is the user's to write, as anything else there, and the run's
    # Markdown report may be rewritten (with other settings) as examples/train_sae.py does
    assert analyzer.generate_html_report(samples / "my_report.html", 3, 2).is_file()
    (samples / "my_report.html").unlink()
    assert analyzer.generate_interpretability_report(samples / "interpretability_report.md", 3, 2).is_file()


def test_a_table_export_replaces_only_what_an_earlier_export_wrote(samples, tmp_path):
    out = tmp_path / "out"
    assert main(["export", str(samples), str(out)]) == 0
    manifest = json.loads((out / "export_manifest.json").read_text())
    assert manifest["files"] == ["features.jsonl", "samples.jsonl", "summary.json"]
    assert main(["export", str(samples), str(out), "--top-k", "2"]) == 0  # its own files: replaced
    assert len((out / "features.jsonl").read_text().splitlines()) == 2
    (out / "samples.jsonl").unlink()
    (out / "samples.jsonl").write_text("someone else's\n")
    os.remove(out / "export_manifest.json")
    assert main(["export", str(samples), str(out)]) == 2
    assert (out / "samples.jsonl").read_text() == "someone else's\n"


def test_the_reader_does_not_follow_links_to_regular_files(samples, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(samples, copy)
    feature = sorted(copy.glob("feature_*_samples.json"))[0]
    elsewhere = tmp_path / "elsewhere.json"
    shutil.move(feature, elsewhere)
    feature.symlink_to(elsewhere)
    index = int(feature.name.split("_")[1])
    with pytest.warns(UserWarning, match="not a regular file"):
        assert index not in read_samples_dir(copy).feature_files
    (copy / SUMMARY_NAME).rename(tmp_path / "summary.json")
    (copy / SUMMARY_NAME).symlink_to(tmp_path / "summary.json")
    with pytest.raises(ValueError, match="holds no samples"), pytest.warns(UserWarning, match="not a regular file"):
        read_samples_dir(copy)
