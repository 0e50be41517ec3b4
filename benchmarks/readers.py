"""Readers while a writer commits saves back to back: how many analyzer opens give up (``SaveChangedError``).

Run from the repository root::

    python benchmarks/readers.py                    # 1,000 opens, saves back to back
    python benchmarks/readers.py --opens 200 --pause 0.05

A writer process (``tests/save_loop_script.py``: 24 latents, 6 feature files, ``full_state.pt`` and the
history, one more batch per save) commits saves into one directory in a loop for the whole run, while this
process opens an :class:`~lightning_sae_samples.ActivationSampleAnalyzer` on it ``--opens`` times and reads from
each the full state of a latent without a feature file (so that a commit between the open and that read counts
too). It prints the opens, the saves committed meanwhile, the errors (the target is 0) and the slowest open.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_sae_samples import ActivationSampleAnalyzer, SaveChangedError  # noqa: E402

SCRIPT = ROOT / "tests" / "save_loop_script.py"


def _writer(path: Path, saves: int, pause: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(path), str(saves), str(pause)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "0", "the writer did not save"
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--opens", type=int, default=1000)
    parser.add_argument("--pause", type=float, default=0.0, help="seconds between two saves (0: back to back)")
    args = parser.parse_args()
    errors, slowest = 0, 0.0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "samples"
        writer = _writer(path, 10**9, args.pause)
        try:
            for _ in range(args.opens):
                assert writer.poll() is None, "the writer stopped"
                began = time.perf_counter()
                try:
                    analyzer = ActivationSampleAnalyzer(path)
                    unsaved = next(i for i in range(analyzer.num_features) if i not in analyzer.saved_features)
                    analyzer.feature(unsaved)
                except SaveChangedError:
                    errors += 1
                slowest = max(slowest, time.perf_counter() - began)
        finally:
            writer.kill()
            saves = 1 + len(writer.communicate()[0].split())  # each committed save printed its step
    print(f"{args.opens} opens in {time.perf_counter() - started:.0f} s while {saves} saves were committed"
          f" (pause {args.pause} s between saves): {errors} SaveChangedError; slowest open {slowest:.2f} s")


if __name__ == "__main__":
    main()
