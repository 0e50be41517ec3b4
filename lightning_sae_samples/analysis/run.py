"""Read a run folder of many SAEs: each SAE's samples directory by name, one summary row per SAE, an index report.

A run folder ``DIR/`` holds ``DIR/<name>/`` per SAE (each an ordinary samples directory) and the run index
``DIR/sae_samples_run.json`` naming them (``docs/format.md``). :class:`RunAnalyzer` reads the index (validated:
only the names it lists, each a real folder in ``DIR``, are ever opened) and opens each SAE's
:class:`~lightning_sae_samples.ActivationSampleAnalyzer` on first use. ``ActivationSampleAnalyzer(DIR)`` on a run
folder gives one (``analyzer.run``, ``analyzer["l3"]``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from lightning_sae_samples.arguments import choice
from lightning_sae_samples.samples_dir.atomic import write_text_file
from lightning_sae_samples.samples_dir.names import PathLike
from lightning_sae_samples.samples_dir.run_index import read_run_index

if TYPE_CHECKING:
    from lightning_sae_samples.analysis.analyzer import ActivationSampleAnalyzer

_INDEX_RENDERERS = {
    "markdown": ("lightning_sae_samples.render.markdown", "render_run_index_markdown", ".md"),
    "html": ("lightning_sae_samples.render.html", "render_run_index_html", ".html"),
}


class UnknownSAEError(KeyError):
    """A name that is not one of the run folder's SAEs (the message lists them)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class SAESummary:
    """One SAE of a run at its last save: the run summary table's row.

    Attributes:
        name: The SAE's name in the run index (its folder ``DIR/<name>``).
        path: Its samples directory.
        num_latents: Latents ``F``.
        alive: Latents that fired at least once.
        dead: Latents silent for the run's ``dead_window_steps`` up to the last collected step, or never fired
            while the collection is shorter (``None`` without ``full_state.pt``).
        dense: Latents firing on more than 10% of tokens (``None`` without ``full_state.pt``).
        tokens_seen: Tokens in collected batches.
        global_step: Trainer step of the save.
        saved_features: Features with a feature file.
    """

    name: str
    path: Path
    num_latents: int
    alive: int
    dead: Optional[int]
    dense: Optional[int]
    tokens_seen: int
    global_step: int
    saved_features: int


class RunAnalyzer(Mapping[str, "ActivationSampleAnalyzer"]):
    """A run folder of many SAEs: a read-only mapping of SAE name to its analyzer, in the run index's order.

    Example::

        run = RunAnalyzer("samples")            # or ActivationSampleAnalyzer("samples").run
        run.names                               # ('layers.3.mlp', 'layers.5.mlp')
        run["layers.3.mlp"].print_feature_report(42)
        run.generate_html_report("report.html")  # the index page, and report.<name>.html per SAE

    Args:
        run_dir: The run folder.
        template_dir: Passed to each SAE's analyzer (report template overrides).
        tokenizer: Passed to each SAE's analyzer (for latents only ``full_state.pt`` holds).

    Raises:
        SamplesDirectoryError: The run index is missing or invalid (the message names it and the fix).
    """

    def __init__(self, run_dir: PathLike, template_dir: Optional[PathLike] = None, tokenizer: Any = None) -> None:
        self.path = Path(run_dir)
        self.names = read_run_index(self.path)
        self.template_dir = template_dir
        self.tokenizer = tokenizer
        self._opened: dict[str, ActivationSampleAnalyzer] = {}

    def __getitem__(self, name: str) -> ActivationSampleAnalyzer:
        """The analyzer of the SAE ``name`` (opened on first use, then kept).

        Raises:
            UnknownSAEError: ``name`` is not in the run index.
            SamplesDirectoryError: Its samples directory cannot be read.
        """
        if name not in self.names:
            raise UnknownSAEError(
                f"{self.path} has no SAE {name!r}; its SAEs are {', '.join(map(repr, self.names))}."
            )
        if name not in self._opened:
            from lightning_sae_samples.analysis.analyzer import ActivationSampleAnalyzer

            self._opened[name] = ActivationSampleAnalyzer(self.path / name, self.template_dir, self.tokenizer)
        return self._opened[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __repr__(self) -> str:
        return f"RunAnalyzer({os.fspath(self.path)!r}, saes={list(self.names)!r})"

    # ------------------------------------------------------------------ summary
    def sae_summaries(self) -> list[SAESummary]:
        """One :class:`SAESummary` per SAE, in the run's order (reads each SAE's ``full_state.pt`` when present)."""
        rows = []
        for name in self.names:
            analyzer = self[name]
            summary = analyzer.summary
            alive, dead, dense = analyzer.latent_health()
            rows.append(SAESummary(
                name=name, path=summary.path, num_latents=summary.num_features_tracked, alive=alive, dead=dead,
                dense=dense, tokens_seen=summary.tokens_seen, global_step=summary.global_step,
                saved_features=len(summary.saved_features),
            ))
        return rows

    def print_summary(self, console: Any = None) -> None:
        """Print one table with a row per SAE: latents, alive, dead, dense, tokens seen.

        Args:
            console: A ``rich.console.Console``; default: a new one on stdout.
        """
        from lightning_sae_samples.render.console import print_run_summary

        print_run_summary(self.path, self.sae_summaries(), console=console)

    # ------------------------------------------------------------------ reports
    def report_paths(self, output_path: PathLike) -> dict[str, Path]:
        """Where each SAE's report goes beside the index page ``output_path``: ``report.md`` -> ``report.<name>.md``."""
        path = Path(output_path)
        return {name: path.with_name(f"{path.stem}.{name}{path.suffix}") for name in self.names}

    def render_index(self, kind: str, links: Mapping[str, str]) -> str:
        """The run's index page as a string: the summary table, each SAE's name linking to ``links[name]``.

        Args:
            kind: ``"markdown"`` or ``"html"``.
            links: SAE name to the (relative) address of its report.
        """
        module, function, _ = _INDEX_RENDERERS[choice(kind, "kind", _INDEX_RENDERERS)]
        render = getattr(import_module(module), function)
        return render(self.path, self.sae_summaries(), links, template_dir=self.template_dir)

    def _write_reports(self, kind: str, output_path: PathLike, args: Sequence[Any], kwargs: dict) -> Path:
        paths = self.report_paths(output_path)
        for name, path in paths.items():
            write_text_file(path, self[name].render_report(kind, *args, **kwargs))
        return write_text_file(output_path, self.render_index(kind, {n: p.name for n, p in paths.items()}))

    def generate_interpretability_report(self, output_path: PathLike, *args: Any, **kwargs: Any) -> Path:
        """Write each SAE's Markdown report (:meth:`report_paths`) and the index page linking them to ``output_path``.

        The other arguments are those of :meth:`ActivationSampleAnalyzer.render_report` after ``kind``, for each
        SAE. Returns the index page's path.
        """
        return self._write_reports("markdown", output_path, args, kwargs)

    def generate_html_report(self, output_path: PathLike, *args: Any, **kwargs: Any) -> Path:
        """Write each SAE's HTML report (:meth:`report_paths`) and the index page linking them to ``output_path``.

        The other arguments are those of :meth:`ActivationSampleAnalyzer.render_report` after ``kind``, for each
        SAE. Returns the index page's path.
        """
        return self._write_reports("html", output_path, args, kwargs)
