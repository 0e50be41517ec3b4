import os
import subprocess
import sys

import pytest
from render_support import FakeTokenizer, hostile_vocab, write_fixture_dir

from lightning_sae_samples.analyzer import ActivationSampleAnalyzer
from lightning_sae_samples.cli import main


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    return write_fixture_dir(tmp_path_factory.mktemp("cli") / "samples", tokenizer=FakeTokenizer(hostile_vocab()))


def run_all(commands, cwd):
    """Run ``python -m lightning_sae_samples`` command lines concurrently; returns CompletedProcess-likes."""
    env = {**os.environ, "COLUMNS": "160", "NO_COLOR": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-m", "lightning_sae_samples", *args], cwd=cwd, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8")
        for args in commands
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def test_cli_feature_reports_and_error_exit_as_subprocesses(samples, tmp_path):
    analyzer = ActivationSampleAnalyzer(samples)
    top = analyzer.saved_features[0]
    (tmp_path / "out").mkdir()
    feature, missing = run_all(
        [
            [str(samples), "--feature", str(top), "--num-examples", "2", "--report", "out/r.md", "--html",
             "out/r.html", "--top-k", "4", "--examples-per-feature", "3"],
            [str(tmp_path / "nowhere")],
        ],
        cwd=tmp_path,
    )
    assert feature.returncode == 0, feature.stderr
    assert f"Feature {top}" in feature.stdout and "Top 2 examples" in feature.stdout
    assert "Wrote Markdown report to out/r.md" in feature.stdout
    md = (tmp_path / "out" / "r.md").read_text(encoding="utf-8")
    assert "## Top 4 features" in md and md.count("\n## Feature ") == 4
    html = (tmp_path / "out" / "r.html").read_text(encoding="utf-8")
    assert html.count('<section class="card feature"') == 4 and "Traceback" not in feature.stderr

    assert missing.returncode != 0 and missing.stdout == "" and "Traceback" not in missing.stderr
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lightning-sae-samples: error:") and "does not exist" in lines[0]


def test_cli_summary_table_of_top_features(samples, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    assert main([str(samples), "--top-k", "3", "--rank-by", "activation_count"]) == 0
    out = capsys.readouterr().out
    analyzer = ActivationSampleAnalyzer(samples)
    assert "Top 3 features by activation_count" in out
    rows = [line.split("│") for line in out.splitlines() if line.startswith("│")]
    ranked = [int(r[2]) for r in rows if r[1].strip().isdigit()]
    assert ranked == [s.feature_idx for s in analyzer.features("activation_count", 3)]
    assert f"Alive latents      {analyzer.summary.alive_features}" in out


def test_cli_help_shows_an_example(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "lightning-sae-samples activation_samples --feature 42" in out


def test_cli_reports_bad_arguments_in_one_line(samples, tmp_path, capsys):
    assert main([str(samples), "--report", str(tmp_path / "no" / "such" / "r.md")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist. Create it first." in err
    assert main([str(samples), "--top-k", "-1"]) == 1
    assert "--top-k must be >= 0" in capsys.readouterr().err
    assert main([str(samples), "--feature", "999"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lightning-sae-samples: error: Feature 999 does not exist: valid indices are 0 to 15.")
    assert err.count("\n") == 1 and "Saved features near 999" in err
