"""A rich progress bar over a sequence, on stderr, shown only on a terminal."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

_T = TypeVar("_T")


def progress(items: Sequence[_T], enabled: bool, description: str) -> Iterator[_T]:
    """Yield ``items``; with ``enabled`` and a terminal on stderr, under a transient progress bar."""
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield from items
        return
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(description, total=len(items))
        for item in items:
            yield item
            bar.advance(task)
