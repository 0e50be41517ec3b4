"""Write the README's settings table from ``CallbackConfig``: ``python scripts/settings_table.py [README.md]``."""

import sys
from pathlib import Path

from lightning_sae_samples.config import SETTINGS_BEGIN, SETTINGS_END, settings_table


def with_table(text: str) -> str:
    """``text`` with the block between the settings markers replaced by the generated table."""
    head, found, rest = text.partition(SETTINGS_BEGIN)
    _, end, tail = rest.partition(SETTINGS_END)
    if not found or not end:
        raise SystemExit(f"The README has no settings block: add the lines {SETTINGS_BEGIN!r} and {SETTINGS_END!r}.")
    return f"{head}{SETTINGS_BEGIN}\n{settings_table()}\n{SETTINGS_END}{tail}"


if __name__ == "__main__":
    readme = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parents[1] / "README.md")
    readme.write_text(with_table(readme.read_text(encoding="utf-8")), encoding="utf-8")
