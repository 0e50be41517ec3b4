"""The ``lightning-sae-samples`` command: summarize a samples directory, show a feature, write reports."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Optional

from rich.console import Console

from lightning_sae_samples.analysis import neuronpedia
from lightning_sae_samples.arguments import OneLineErrorParser
from lightning_sae_samples.samples_dir.names import SUMMARY_NAME, SamplesDirectoryError
from lightning_sae_samples.samples_dir.reader import SaveChangedError, find_samples_dirs, retry_pauses
from lightning_sae_samples.samples_dir.run_index import is_run_folder
from lightning_sae_samples.state.statistics import RANK_CHOICES

if TYPE_CHECKING:
    from lightning_sae_samples.analysis.analyzer import ActivationSampleAnalyzer
    from lightning_sae_samples.analysis.run import RunAnalyzer


#: How deep below a given folder the command looks for samples directories to suggest.
SEARCH_DEPTH = 4
MAX_SUGGESTIONS = 5
#: Runs listed for a parent folder.
MAX_LISTED_RUNS = 200

PROG = "lightning-sae-samples"
EPILOG = f"""examples:
  {PROG} lightning_logs/version_0/activation_samples
  {PROG} activation_samples --feature 42 --num-examples 20
  {PROG} activation_samples --report report.md --html report.html --top-k 100 --rank-by frequency
  {PROG} export activation_samples --format parquet exported/   (features, samples and summary tables)
  {PROG} export snapshots/step_1500 --format neuronpedia np/ --model-id all-minilm-l6-v2 --layer 3 --source-set res-topk
  {PROG} serve lightning_logs --open   (every latent in the browser, live while it trains)
  {PROG} run_folder   (many SAEs: a row each; --report/--html: an index page and each SAE's report)
  {PROG} explain activation_samples --top 20   (explanations and scores by a local model; docs/explanations.md)
"""
EXPORT_COMMAND = "export"
EXPORT_USAGE = f"{PROG} {EXPORT_COMMAND} SAMPLES_DIR OUT [--format {{jsonl,parquet,neuronpedia}}] [--top-k K] [...]"
SERVE_COMMAND = "serve"
SERVE_USAGE = f"{PROG} {SERVE_COMMAND} DIR [--host HOST] [--port PORT] [--open]"
EXPLAIN_COMMAND = "explain"
EXPLAIN_USAGE = f"{PROG} {EXPLAIN_COMMAND} DIR [--top N] [--features I ...] [--endpoint URL] [--model NAME] [...]"
IMPORT_COMMAND = "import-explanations"
IMPORT_USAGE = f"{PROG} {IMPORT_COMMAND} DIR FILE_OR_FOLDER [--format {{auto,delphi,neuronpedia}}]"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used by ``python -m lightning_sae_samples``)."""
    parser = OneLineErrorParser(
        prog=PROG,
        description="Show the top activating contexts of SAE latents collected by ActivationSampleCallback,"
        " and write Markdown or HTML reports. Without --feature/--report/--html it prints a summary table.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("samples_dir", metavar="SAMPLES_DIR", help="directory the callback wrote (or a run of SAEs)")
    parser.add_argument("--feature", type=int, metavar="N", help="print the report of latent N")
    parser.add_argument("--num-examples", type=int, default=10, metavar="K", help="examples for --feature")
    parser.add_argument("--report", metavar="PATH", help="write a Markdown report to PATH")
    parser.add_argument("--html", metavar="PATH", help="write a self-contained HTML report to PATH")
    parser.add_argument("--top-k", type=int, default=50, metavar="K", help="features in reports and the table")
    parser.add_argument("--examples-per-feature", type=int, default=10, metavar="K", help="examples per feature")
    parser.add_argument("--rank-by", choices=RANK_CHOICES, default=None, help="ranking (default: the run's)")
    parser.add_argument("--template-dir", metavar="DIR", help="folder with report.md.j2/report.html.j2 overrides")
    parser.add_argument(
        "--tokenizer", metavar="NAME",
        help="Hugging Face tokenizer name or local folder to decode latents only full_state.pt holds"
        " (default: the one the run recorded, from local files)",
    )
    parser.usage = (
        f"{parser.format_usage().removeprefix('usage: ').strip()}\n       {EXPORT_USAGE}\n       {SERVE_USAGE}"
        f"\n       {EXPLAIN_USAGE}\n       {IMPORT_USAGE}"
    )
    return parser


def build_export_parser() -> argparse.ArgumentParser:
    """The parser of ``lightning-sae-samples export SAMPLES_DIR --format jsonl|parquet OUT``."""
    from lightning_sae_samples.analysis.export import FORMATS

    parser = OneLineErrorParser(
        prog=f"{PROG} {EXPORT_COMMAND}",
        description="Write the saved features, their statistics and samples as flat tables (features.<ext>,"
        " samples.<ext>, summary.json) that pandas, DuckDB or a static viewer read directly. Schema: docs/export.md.",
        epilog=f"example:\n  {PROG} {EXPORT_COMMAND} activation_samples --format parquet exported/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("samples_dir", metavar="SAMPLES_DIR", help="directory the callback wrote (or a run of SAEs)")
    parser.add_argument("out", metavar="OUT", help="output folder (created if missing)")
    parser.add_argument("--format", choices=FORMATS, default="jsonl", help="file format (default: jsonl)")
    parser.add_argument("--top-k", type=int, default=None, metavar="K", help="only the K best saved features")
    parser.add_argument(
        "--examples-per-feature", type=int, default=None, metavar="K",
        help="samples per feature (default: those in the feature files; more are read from full_state.pt)",
    )
    parser.add_argument(
        "--tokenizer", metavar="NAME", help="Hugging Face tokenizer for latents only full_state.pt holds"
    )
    neuronpedia.add_arguments(parser)
    return parser


def open_analyzer(samples_dir: str, **kwargs: object) -> ActivationSampleAnalyzer:
    """The analyzer of ``samples_dir``; when it is a parent of samples directories, the error names them."""
    from lightning_sae_samples.analysis.analyzer import ActivationSampleAnalyzer

    try:
        return ActivationSampleAnalyzer(samples_dir, **kwargs)  # type: ignore[arg-type]
    except SamplesDirectoryError as err:
        if not os.path.isdir(samples_dir) or os.path.isfile(os.path.join(samples_dir, SUMMARY_NAME)):
            raise
        found = [str(p) for p in find_samples_dirs(samples_dir, SEARCH_DEPTH, MAX_SUGGESTIONS)]
        if not found:
            raise
        raise SamplesDirectoryError(
            f"{samples_dir} is not a samples directory ({SUMMARY_NAME} is missing), but it holds"
            f" {'one' if len(found) == 1 else 'some'}: {', '.join(found)}. Run: {PROG} {found[0]}"
        ) from err


def runs_below(folder: str) -> list[str]:
    """The samples directories below ``folder`` when it is not one itself (a parent folder), else ``[]``."""
    if not os.path.isdir(folder) or os.path.isfile(os.path.join(folder, SUMMARY_NAME)):
        return []
    return [str(p) for p in find_samples_dirs(folder, SEARCH_DEPTH, MAX_LISTED_RUNS)]


def print_runs(folder: str, runs: list[str], console: Console) -> None:
    """A table of the samples directories below a parent folder: what each is, its step and size."""
    from rich.table import Table

    from lightning_sae_samples.analysis.analyzer import ActivationSampleAnalyzer

    table = Table(title=f"Samples directories under {folder}", title_justify="left")
    table.add_column("Run", no_wrap=True)
    table.add_column("What it is")
    for column in ("Step", "Latents", "Saved features"):
        table.add_column(column, justify="right")
    for run in runs:
        name = os.path.relpath(run, folder)
        try:
            summary = ActivationSampleAnalyzer(run).summary
        except SamplesDirectoryError as err:
            table.add_row(name, f"unreadable: {' '.join(str(err).split())}", "", "", "")
            continue
        table.add_row(name, summary.kind, str(summary.global_step), f"{summary.num_features_tracked:,}",
                      str(len(summary.saved_features)))
    console.print(table)
    more = " (the first ones)" if len(runs) >= MAX_LISTED_RUNS else ""
    console.print(f"{len(runs)} samples directories{more}. Look at one: {PROG} {runs[0]}", highlight=False,
                  markup=False, soft_wrap=True)


def _note_undecoded(analyzer: ActivationSampleAnalyzer, sae: str = "") -> None:
    if analyzer.run is not None:
        for name in analyzer.run.names:
            _note_undecoded(analyzer.run[name], f"SAE {name}: ")
        return
    note = analyzer.decoding_note
    if note is not None:
        sys.stderr.write(f"{PROG}: note: {sae}{note}\n")


def _run_export(args: argparse.Namespace, console: Console) -> None:
    for name in ("top_k", "examples_per_feature"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {value}.")
    analyzer = open_analyzer(args.samples_dir, tokenizer=args.tokenizer)
    if analyzer.run is not None:
        _run_export_saes(args, analyzer.run, console)
        return
    features = analyzer.saved_features if args.top_k is None else analyzer.saved_features[: args.top_k]
    if args.format == neuronpedia.FORMAT_NAME:
        _run_neuronpedia_export(args, analyzer, features, console)
        return
    paths = analyzer.export(args.out, args.format, features, args.examples_per_feature)
    names = ", ".join(p.name for p in paths.values())
    console.print(f"Wrote {names} to {paths['summary'].parent}", highlight=False, markup=False)
    _note_undecoded(analyzer)


def _run_export_saes(args: argparse.Namespace, run: RunAnalyzer, console: Console) -> None:
    """``export`` of a run folder: each SAE as its own Neuronpedia source, or its tables in ``OUT/<name>/``."""
    if args.format == neuronpedia.FORMAT_NAME:
        from lightning_sae_samples.analysis.neuronpedia_run import (
            export_neuronpedia_run,
            parse_assignments,
            run_sources,
        )

        layers = parse_assignments(args.sae_layer, "--sae-layer", run.names)
        for name, text in layers.items():
            if not text.isascii() or not text.isdigit():
                raise ValueError(f"--sae-layer {name}={text}: the layer must be a number >= 0.")
        sources = run_sources(
            run.names, neuronpedia.source_from_args(args, run[run.names[0]].summary),
            {name: int(text) for name, text in layers.items()},
            parse_assignments(args.sae_source_set, "--sae-source-set", run.names),
        )
        with _warnings_to_stderr():
            results = export_neuronpedia_run(run, args.out, sources, args.top_k, args.examples_per_feature,
                                             tokenizer=args.tokenizer, progress=True)
        for name, result in results.items():
            _print_neuronpedia_result(f"{name}: ", result, console)
        return
    for name in run.names:
        analyzer = run[name]
        features = analyzer.saved_features if args.top_k is None else analyzer.saved_features[: args.top_k]
        paths = analyzer.export(os.path.join(args.out, name), args.format, features, args.examples_per_feature)
        console.print(f"{name}: wrote {', '.join(p.name for p in paths.values())} to {paths['summary'].parent}",
                      highlight=False, markup=False, soft_wrap=True)
    for name in run.names:
        _note_undecoded(run[name], f"SAE {name}: ")


@contextlib.contextmanager
def _warnings_to_stderr() -> Iterator[None]:
    """Warnings raised inside, each as one ``warning:`` line on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        sys.stderr.write(f"{PROG}: warning: {' '.join(str(warning.message).split())}\n")


def _print_neuronpedia_result(prefix: str, result: neuronpedia.NeuronpediaExport, console: Console) -> None:
    kind = "one SAE state" if result.kind == "snapshot" else "mixed SAE states"
    explained = f" and {result.explanations} explanations" if result.explanations else ""
    console.print(f"{prefix}Wrote {result.features} features and {result.activations} activations{explained} ({kind})"
                  f" for Neuronpedia to {result.source_dir}", highlight=False, markup=False, soft_wrap=True)


def _run_neuronpedia_export(
    args: argparse.Namespace, analyzer: ActivationSampleAnalyzer, features: list[int], console: Console
) -> None:
    with _warnings_to_stderr():
        result = neuronpedia.export_neuronpedia(
            analyzer, args.out, neuronpedia.source_from_args(args, analyzer.summary), features,
            args.examples_per_feature, tokenizer=args.tokenizer, progress=True,
        )
    _print_neuronpedia_result("", result, console)


def _is_export(argv: Sequence[str], command: str = EXPORT_COMMAND) -> bool:
    # A samples directory literally named "export" stays reachable as before (or as ./export).
    return bool(argv) and argv[0] == command and not os.path.isfile(os.path.join(command, SUMMARY_NAME))


def _run(args: argparse.Namespace, console: Console) -> None:
    for name in ("num_examples", "top_k", "examples_per_feature"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}.")
    if args.template_dir is not None and not os.path.isdir(args.template_dir):
        raise ValueError(
            f"--template-dir {args.template_dir} is not a directory. Pass a folder holding report.md.j2 and/or"
            " report.html.j2, or leave it out to use the shipped templates."
        )
    if args.feature is None and not args.report and not args.html and not is_run_folder(args.samples_dir):
        runs = runs_below(args.samples_dir)
        if runs:
            print_runs(args.samples_dir, runs, console)
            return
    analyzer = open_analyzer(args.samples_dir, template_dir=args.template_dir, tokenizer=args.tokenizer)
    if analyzer.run is not None and args.feature is not None:
        run = analyzer.run
        raise ValueError(
            f"{run.path} is a run folder of {len(run)} SAEs ({', '.join(run.names)}): --feature shows a latent of one"
            f" SAE. Run: {PROG} {run.path / run.names[0]} --feature {args.feature}"
        )
    # Everything is read before anything is printed, so that a command redone after a commit prints once.
    written = []
    if args.report:
        written.append(("Markdown", analyzer.generate_interpretability_report(
            args.report, args.top_k, args.examples_per_feature, args.rank_by, progress=True
        )))
    if args.html:
        written.append(("HTML", analyzer.generate_html_report(
            args.html, args.top_k, args.examples_per_feature, args.rank_by, progress=True
        )))
    if args.feature is not None:
        analyzer.print_feature_report(args.feature, args.num_examples, console=console)
    for kind, path in written:
        console.print(f"Wrote {kind} report to {path}", highlight=False, markup=False)
    if args.feature is None and not args.report and not args.html:
        analyzer.print_summary(args.top_k, args.rank_by, console=console)
    _note_undecoded(analyzer)


def _run_one_save(run: Callable[[argparse.Namespace, Console], None], args: argparse.Namespace) -> None:
    """``run``, redone with a fresh analyzer when a save was committed between reading its parts (for a while)."""
    for _ in retry_pauses():
        try:
            run(args, Console())
            return
        except SaveChangedError as err:
            error = err
    raise error


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (0 on success, 2 on an error, as for a bad argument)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if _is_export(argv, SERVE_COMMAND):
        from lightning_sae_samples.serve import main as serve_main

        return serve_main(argv[1:])
    if _is_export(argv, EXPLAIN_COMMAND) or _is_export(argv, IMPORT_COMMAND):
        from lightning_sae_samples.explain import command

        parser = command.build_explain_parser() if argv[0] == EXPLAIN_COMMAND else command.build_import_parser()
        args = parser.parse_args(argv[1:])
        run = command.run_explain if argv[0] == EXPLAIN_COMMAND else command.run_import
    else:
        export = _is_export(argv)
        parser = build_export_parser() if export else build_parser()
        args = parser.parse_args(argv[1:] if export else argv)
        run = _run_export if export else _run
    try:
        _run_one_save(run, args)  # explain is resumable: a redo skips what it wrote
    except KeyboardInterrupt:
        sys.stderr.write("Interrupted.\n")
        return 130
    except Exception as err:  # noqa: BLE001 - every failure becomes one line, never a traceback
        message = " ".join(str(err).split()) or type(err).__name__
        sys.stderr.write(f"{PROG}: error: {message}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
