import os
import subprocess
import sys

import pytest
from render_support import FakeTokenizer, hostile_vocab, write_fixture_dir

from lightning_sae_samples.analysis.analyzer import ActivationSampleAnalyzer
from lightning_sae_samples.cli import main


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    return write_fixture_dir(tmp_path_factory.mktemp("cli") / "samples", tokenizer=FakeTokenizer(hostile_vocab()))


def run_all(commands, cwd, timeout=120, **env_changes):
    """Run ``python -m lightning_sae_samples`` command lines concurrently; returns CompletedProcess-likes.

    ``env_changes``: environment variables to set (a ``None`` value removes one).
    """
    env = {**os.environ, "COLUMNS": "160", "NO_COLOR": "1", **env_changes}
    env = {k: v for k, v in env.items() if v is not None}
    procs = [
        subprocess.Popen([sys.executable, "-m", "lightning_sae_samples", *args], cwd=cwd, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8")
        for args in commands
    ]
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
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
    assert main([str(samples), "--report", str(tmp_path / "no" / "such" / "r.md")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist. Create it first." in err
    assert main([str(samples), "--top-k", "-1"]) == 2
    assert "--top-k must be >= 0" in capsys.readouterr().err
    assert main([str(samples), "--feature", "999"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-sae-samples: error: Feature 999 does not exist: valid indices are 0 to 15.")
    assert err.count("\n") == 1 and "Saved features near 999" in err


def test_usage_line_names_the_export_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err  # one line that points to --help, whose usage names the subcommands
    assert err == ("lightning-sae-samples: error: the following arguments are required: SAMPLES_DIR."
                   " See `lightning-sae-samples --help`.\n")
    with pytest.raises(SystemExit):
        main(["--help"])
    usage = capsys.readouterr().out.split("\n\n")[0]
    assert "usage: lightning-sae-samples" in usage and "lightning-sae-samples export SAMPLES_DIR OUT" in usage


def test_a_parent_of_samples_directories_suggests_them(samples, tmp_path):
    import shutil

    inside = tmp_path / "lightning_logs" / "version_0" / "activation_samples"
    shutil.copytree(samples, inside)
    (result,) = run_all([[str(tmp_path / "lightning_logs")]], cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "collection_summary.json is missing" in lines[0]
    assert f"Run: lightning-sae-samples {inside}" in lines[0]


@pytest.fixture(scope="module")
def undecodable(tmp_path_factory):
    """Saved without a tokenizer, recording a tokenizer name that is nowhere on this machine."""
    return write_fixture_dir(tmp_path_factory.mktemp("ids") / "samples", tokenizer=None, top_features=2,
                             recorded_tokenizer="no-such-org/no-such-tokenizer")


def test_unsaved_feature_shows_spaced_ids_and_how_to_decode_them(undecodable, tmp_path):
    analyzer = ActivationSampleAnalyzer(undecodable)
    unsaved = next(s.feature_idx for s in analyzer.features() if s.feature_idx not in analyzer.saved_features)
    sample = analyzer.feature(unsaved).samples[0]
    (result,) = run_all([[str(undecodable), "--feature", str(unsaved), "--num-examples", "1"]], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    ids = [t.token_id for t in sample.context][: sample.context_position]
    assert len(ids) >= 2 and " ".join(f"[{i}]" for i in ids) in result.stdout  # never glued
    note = [line for line in result.stderr.splitlines() if line.startswith("lightning-sae-samples: note:")]
    assert len(note) == 1 and "no-such-org/no-such-tokenizer" in note[0] and "--tokenizer NAME_OR_PATH" in note[0]


@pytest.mark.parametrize("offline", ["1", None])
def test_an_unavailable_tokenizer_name_fails_at_once_with_a_clear_message(undecodable, tmp_path, offline):
    # An endpoint that refuses connections stands for "no network"; without the fix the Hub client retries
    # for about 50 s, past the subprocess timeout.
    (result,) = run_all(
        [[str(undecodable), "--feature", "3", "--tokenizer", "bogus-org/bogus-tokenizer"]], cwd=tmp_path, timeout=40,
        HF_HUB_OFFLINE=offline, HF_ENDPOINT="http://127.0.0.1:9",
    )
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    head = "lightning-sae-samples: error: Tokenizer 'bogus-org/bogus-tokenizer'"
    assert len(lines) == 1 and lines[0].startswith(head)
    assert ("HF_HUB_OFFLINE" if offline else "cannot be reached") in lines[0]
