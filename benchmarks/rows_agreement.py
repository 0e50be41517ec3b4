"""How far the top features of two runs agree, by what they fire on: the rows example against the sequence one.

Run from the repository root, after both runs (same data and SAE settings; see examples/README.md)::

    python benchmarks/rows_agreement.py SEQUENCE_SAMPLES_DIR ROWS_SAMPLES_DIR [--top 50]

For each of the sequence run's top features (its saved ranking), the set of activating tokens of its top
samples is compared (Jaccard) with that of every saved feature of the rows run: the best match's overlap, and
that of the feature with the same index (both SAEs start from the same seeded weights). Prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

try:
    from lightning_sae_samples import ActivationSampleAnalyzer
except ImportError:  # pragma: no cover - run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lightning_sae_samples import ActivationSampleAnalyzer


def activating_tokens(analyzer: ActivationSampleAnalyzer, idx: int) -> frozenset[int]:
    return frozenset(s.activating_token.token_id for s in analyzer.feature(idx).samples)


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sequences", type=Path)
    parser.add_argument("rows", type=Path)
    parser.add_argument("--top", type=int, default=50, help="top features of the sequence run compared")
    args = parser.parse_args(argv)
    seq, rows = ActivationSampleAnalyzer(args.sequences), ActivationSampleAnalyzer(args.rows)
    theirs = {idx: activating_tokens(rows, idx) for idx in rows.saved_features}
    best, same, same_saved = [], [], 0
    for idx in seq.saved_features[: args.top]:
        mine = activating_tokens(seq, idx)
        best.append(max(jaccard(mine, other) for other in theirs.values()))
        if idx in theirs:
            same_saved += 1
            same.append(jaccard(mine, theirs[idx]))
    n = len(best)
    table = Table(title=f"Top {n} features of the sequence run against the rows run (activating-token Jaccard)")
    for column in ("measure", "value"):
        table.add_column(column)
    table.add_row("best match: median Jaccard", f"{statistics.median(best):.2f}")
    table.add_row("best match: share with Jaccard >= 0.5", f"{sum(b >= 0.5 for b in best) / n:.0%}")
    table.add_row("best match: share with Jaccard > 0", f"{sum(b > 0 for b in best) / n:.0%}")
    table.add_row("same index also saved by the rows run", f"{same_saved} of {n}")
    if same:
        table.add_row("same index: median Jaccard", f"{statistics.median(same):.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
