"""Real 2-process DDP runs (gloo on CPU), each in a subprocess."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import check_against_oracle

SCRIPT = Path(__file__).parent / "ddp_script.py"


def run(out, *args):
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def seen_of(out, epochs):
    seen = []
    for file in sorted(Path(out).glob(f"seen_{epochs}_*.pt")):
        seen.extend(s for s in torch.load(file, weights_only=False) if s.step % 2 == 0)
    return seen


@pytest.fixture(scope="module")
def modes_run(tmp_path_factory):
    """One launch of two processes that fit a dense, then a flat SAE: ``<out>/dense``, ``<out>/flat``."""
    out = tmp_path_factory.mktemp("ddp_modes")
    run(out, "--mode", "dense", "flat", "--devices", 2)
    return out


@pytest.mark.parametrize("mode", ["dense", "flat"])
def test_two_process_ddp_equals_oracle_over_both_ranks(modes_run, mode):
    out = modes_run / mode
    seen = seen_of(out, 2)
    assert {s.rank for s in seen} == {0, 1}
    check_against_oracle(out / "samples", seen)
    assert not list((out / "samples").glob(".*")), "no temporary files may remain"


def test_ddp_spawn_equals_oracle(tmp_path):
    run(tmp_path, "--mode", "sparse", "--devices", 2, "--strategy", "ddp_spawn")
    seen = seen_of(tmp_path, "spawn")
    assert {s.rank for s in seen} == {0, 1}
    check_against_oracle(tmp_path / "samples", seen)


@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_resume_across_process_counts_loses_nothing(tmp_path, first, second):
    ref = tmp_path / "ref"
    run(ref, "--devices", first, "--max-epochs", 1, "--save-ckpt", tmp_path / "ckpt")
    run(ref, "--devices", second, "--max-epochs", 2, "--ckpt-path", tmp_path / "ckpt" / "last.ckpt")
    seen = seen_of(ref, 1) + seen_of(ref, 2)
    check_against_oracle(ref / "samples", seen)
