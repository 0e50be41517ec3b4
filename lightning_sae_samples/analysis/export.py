"""Flat tables of a samples directory: pandas DataFrames, JSON Lines and Parquet files.

One row per feature (statistics, histogram, logit effects, recent overlap and interval counts) and one row
per sample (activating token and its context window as list columns) of every sample group: the top
samples, the random samples per activation interval and the top samples of the recent window. The schema
is documented in ``docs/export.md``; pandas, DuckDB, Polars or a static viewer read the files directly.
``pandas`` and ``pyarrow`` are optional: only :func:`to_dataframe` and the Parquet format need them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional, Protocol, Union

from lightning_sae_samples.analysis.records import FeatureSamples, IntervalGroup, Meaning, Sample
from lightning_sae_samples.samples_dir.atomic import atomic_write_bytes, refuse_samples_dir_file
from lightning_sae_samples.samples_dir.files import is_plain_file, load_json, lstat_or_none
from lightning_sae_samples.samples_dir.names import WRITER_ID
from lightning_sae_samples.samples_dir.reader import SamplesDirectory

PathLike = Union[str, os.PathLike]
#: Flat-table formats; ``"neuronpedia"`` writes Neuronpedia's bulk export instead (``analysis/neuronpedia.py``).
TABLE_FORMATS = ("jsonl", "parquet")
FORMATS = (*TABLE_FORMATS, "neuronpedia")
LEVELS = ("feature", "sample")
#: Sample groups, in the order their rows come per feature (``group`` column of the samples table).
GROUPS = ("top", "interval", "recent")
EXPORT_VERSION = 2
FEATURES_NAME = "features"
SAMPLES_NAME = "samples"
SUMMARY_NAME = "summary.json"
HISTORY_TABLE_NAME = "history"
#: Columns of ``history.<ext>``: one row per (history window, exported latent that fired in it).
HISTORY_COLUMNS = {
    "step": "int", "window_start": "int", "latent": "int", "count": "int", "max": "float", "mean": "float",
    "frequency": "float", "top_token_ids": "list<int>", "top_tokens": "list<str>", "top_token_counts": "list<int>",
}
#: The files a table export wrote into its folder: the only ones a later export replaces (as Neuronpedia's does).
TABLES_MANIFEST_NAME = "export_manifest.json"



class FeatureSource(Protocol):
    """What the export reads from: an opened samples directory (an ``ActivationSampleAnalyzer``)."""

    directory: SamplesDirectory

    @property
    def saved_features(self) -> list[int]:
        """Saved feature indices in rank order."""

    def feature(self, feature_idx: int, num_examples: Optional[int] = None) -> FeatureSamples:
        """One latent with up to ``num_examples`` samples."""

    def meaning(self, feature_idx: int) -> Optional[Meaning]:
        """A latent's explanation and its scores from the explanations sidecar, or ``None``."""


# Column name -> type ("int", "float", "bool", "str", or "list<...>"); nullable columns end in "?".
FEATURE_COLUMNS = {
    "feature_idx": "int",
    "rank": "int",
    "saved": "bool",
    "num_samples": "int",
    "max_activation": "float",
    "mean_activation": "float",
    "std_activation": "float",
    "min_activation": "float",
    "activation_count": "int",
    "all_time_max": "float",
    "tokens_seen": "int",
    "frequency": "float",
    "first_step": "int?",
    "last_step": "int?",
    "histogram_bin_edges": "list<float>",
    "histogram_counts": "list<int>",
    "promoted_token_ids": "list<int>?",
    "promoted_tokens": "list<str>?",
    "promoted_values": "list<float>?",
    "suppressed_token_ids": "list<int>?",
    "suppressed_tokens": "list<str>?",
    "suppressed_values": "list<float>?",
    "recent_overlap": "float?",
    "recent_drift": "bool?",
    "interval_edges": "list<float>?",
    "interval_counts": "list<int>?",
    "explanation": "str?",
    "detection_score": "float?",
    "detection_random_score": "float?",
    "embedding_auroc": "float?",
    "embedding_random_auroc": "float?",
}
SAMPLE_COLUMNS = {
    "feature_idx": "int",
    "sample_rank": "int",
    "activation_value": "float",
    "step": "int",
    "position": "int",
    "token_id": "int",
    "token": "str",
    "context_position": "int",
    "context_text": "str",
    "context_token_ids": "list<int>",
    "context_tokens": "list<str>",
    "context_activations": "list<float>",
    "group": "str",
    "interval_index": "int?",
    "interval_low": "float?",
    "interval_high": "float?",
}
# Characters that JSON may leave raw but that some line splitters (Python's str.splitlines) treat as line
# breaks; escaped so that every JSON Lines record stays on one line for every reader.
_LINE_BREAKS = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"}


def _selected(
    analyzer: FeatureSource, features: Optional[Iterable[int]], num_examples: Optional[int]
) -> list[FeatureSamples]:
    indices = analyzer.saved_features if features is None else list(features)
    return [dataclasses.replace(analyzer.feature(i, num_examples), meaning=analyzer.meaning(i)) for i in indices]


def _check_groups(groups: Optional[Iterable[str]]) -> tuple[str, ...]:
    if groups is None:
        return GROUPS
    if isinstance(groups, str):
        groups = (groups,)
    chosen = tuple(groups)
    unknown = [g for g in chosen if g not in GROUPS]
    if unknown:
        raise ValueError(f"`groups` must be among {GROUPS}, got {unknown[0]!r}: 'top' are the top samples,"
                         " 'interval' the random samples per activation interval, 'recent' the recent top ones.")
    return tuple(g for g in GROUPS if g in chosen)


def feature_row(feature: FeatureSamples, rank: int) -> dict[str, Any]:
    """One feature's row (see ``FEATURE_COLUMNS``)."""
    s = feature.stats
    row: dict[str, Any] = {
        "feature_idx": s.feature_idx,
        "rank": rank,
        "saved": feature.saved,
        "num_samples": s.num_samples,
        "max_activation": s.max_activation,
        "mean_activation": s.mean_activation,
        "std_activation": s.std_activation,
        "min_activation": s.min_activation,
        "activation_count": s.activation_count,
        "all_time_max": s.all_time_max,
        "tokens_seen": s.tokens_seen,
        "frequency": s.frequency,
        "first_step": s.first_step,
        "last_step": s.last_step,
        "histogram_bin_edges": list(s.histogram.bin_edges),
        "histogram_counts": list(s.histogram.counts),
    }
    effects = feature.logit_effects
    for side in ("promoted", "suppressed"):
        items = None if effects is None else getattr(effects, side)
        row[f"{side}_token_ids"] = None if items is None else [t.token_id for t in items]
        row[f"{side}_tokens"] = None if items is None else [t.token for t in items]
        row[f"{side}_values"] = None if items is None else [t.value for t in items]
    row["recent_overlap"] = feature.recent_overlap
    row["recent_drift"] = None if feature.recent_overlap is None else feature.recent_drift
    groups = feature.interval_groups
    row["interval_edges"] = [g.low for g in groups] if groups else None
    row["interval_counts"] = [g.count for g in groups] if groups else None
    m = feature.meaning
    row["explanation"] = None if m is None else m.explanation
    row["detection_score"] = None if m is None else m.score
    row["detection_random_score"] = None if m is None else m.random_score
    row["embedding_auroc"] = None if m is None else m.embedding_score
    row["embedding_random_auroc"] = None if m is None else m.embedding_random_score
    return row


def _sample_row(sample: Sample, rank: int, group: str, interval: Optional[tuple[int, IntervalGroup]] = None
                ) -> dict[str, Any]:
    activating = sample.activating_token
    index, span = interval if interval is not None else (None, None)
    return {
        "feature_idx": sample.feature_idx,
        "sample_rank": rank,
        "activation_value": sample.activation_value,
        "step": sample.step,
        "position": sample.position,
        "token_id": activating.token_id,
        "token": activating.text,
        "context_position": sample.context_position,
        "context_text": sample.context_text,
        "context_token_ids": [t.token_id for t in sample.context],
        "context_tokens": [t.text for t in sample.context],
        "context_activations": [t.activation for t in sample.context],
        "group": group,
        "interval_index": index,
        "interval_low": None if span is None else span.low,
        "interval_high": None if span is None else span.high,
    }


def sample_rows(feature: FeatureSamples, groups: Optional[Iterable[str]] = None) -> list[dict[str, Any]]:
    """One row per sample of a feature (see ``SAMPLE_COLUMNS``).

    Top samples first (best first), then the interval samples (lowest interval first, in the feature file's
    order within one), then the recent top samples (best first); ``groups`` restricts them (default: all).
    """
    chosen = _check_groups(groups)
    rows = []
    if "top" in chosen:
        rows += [_sample_row(s, n, "top") for n, s in enumerate(feature.samples)]
    if "interval" in chosen:
        for i, group in enumerate(feature.interval_groups):
            rows += [_sample_row(s, n, "interval", (i, group)) for n, s in enumerate(group.samples)]
    if "recent" in chosen:
        rows += [_sample_row(s, n, "recent") for n, s in enumerate(feature.recent_samples)]
    return rows


def _check_level(level: str) -> None:
    if level not in LEVELS:
        raise ValueError(f"`level` must be one of {LEVELS}, got {level!r}: 'feature' gives one row per feature,"
                         " 'sample' one row per sample.")


def table_rows(
    analyzer: FeatureSource,
    level: str,
    features: Optional[Iterable[int]] = None,
    num_examples: Optional[int] = None,
    groups: Optional[Iterable[str]] = None,
) -> list[dict[str, Any]]:
    """Rows of the ``"feature"`` or ``"sample"`` table as plain dicts.

    Args:
        analyzer: The opened samples directory.
        level: ``"feature"`` or ``"sample"``.
        features: Latent indices, in the order wanted; default: the saved features in rank order.
        num_examples: Top (and recent) samples per feature; default: those in its feature file.
        groups: Sample groups of the ``"sample"`` table, among :data:`GROUPS` (default: all).
    """
    _check_level(level)
    chosen = _check_groups(groups)
    selected = _selected(analyzer, features, num_examples)
    if level == "feature":
        return [feature_row(f, rank) for rank, f in enumerate(selected, start=1)]
    return [row for f in selected for row in sample_rows(f, chosen)]


def _require(module: str, purpose: str) -> Any:
    try:
        return __import__(module)
    except ImportError as err:
        raise ImportError(
            f"{purpose} needs `{module}`, which is not installed: run `pip install {module}`"
            " (pandas and pyarrow cover every export format)."
        ) from err


def to_dataframe(
    analyzer: FeatureSource,
    level: str = "feature",
    features: Optional[Iterable[int]] = None,
    num_examples: Optional[int] = None,
    groups: Optional[Iterable[str]] = None,
) -> Any:
    """A pandas DataFrame with one row per feature or per sample (columns as in ``docs/export.md``).

    List columns hold Python lists; the nullable integer columns (``first_step``, ``last_step``,
    ``interval_index``) are ``Int64``, the nullable bool ``recent_drift`` is ``boolean``; other missing
    values are ``None`` (``NaN`` in the float columns).

    Args:
        analyzer: The opened samples directory.
        level: ``"feature"`` or ``"sample"``.
        features: Latent indices, in the order wanted; default: the saved features in rank order.
        num_examples: Top (and recent) samples per feature; default: those in its feature file.
        groups: For ``"sample"``: the sample groups wanted, among ``("top", "interval", "recent")``
            (default: all; ``("top",)`` gives the rows of export version 1).

    Raises:
        ImportError: pandas is not installed.
        ValueError: ``level`` is not ``"feature"`` or ``"sample"``, or an unknown group.
    """
    _check_level(level)
    chosen = _check_groups(groups)
    pandas = _require("pandas", "`to_dataframe`")
    columns = FEATURE_COLUMNS if level == "feature" else SAMPLE_COLUMNS
    rows = table_rows(analyzer, level, features, num_examples, chosen)
    frame = pandas.DataFrame.from_records(rows, columns=list(columns))
    for name, kind in columns.items():
        if kind == "int?":
            frame[name] = frame[name].astype("Int64")
        elif kind == "bool?":
            frame[name] = frame[name].astype("boolean")
        elif kind == "float?":
            frame[name] = frame[name].astype("float64")
    return frame


def _arrow_schema(columns: dict[str, str]) -> Any:
    pa = _require("pyarrow", "The parquet format")
    scalar = {"int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(), "str": pa.string()}

    def arrow_type(kind: str) -> Any:
        kind = kind.rstrip("?")
        if kind.startswith("list<"):
            return pa.list_(scalar[kind[5:-1]])
        return scalar[kind]

    return pa.schema([pa.field(name, arrow_type(kind), nullable=kind.endswith("?")) for name, kind in columns.items()])


def jsonl_bytes(rows: Iterable[dict]) -> bytes:
    """Strict JSON Lines (UTF-8, one object per line, no NaN) of ``rows``."""
    lines = []
    for row in rows:
        text = json.dumps(row, ensure_ascii=False, allow_nan=False)
        for char, escape in _LINE_BREAKS.items():
            text = text.replace(char, escape)
        lines.append(text + "\n")
    return "".join(lines).encode("utf-8")


def _write_parquet(path: Path, rows: list[dict], columns: dict[str, str]) -> None:
    pa = _require("pyarrow", "The parquet format")
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=_arrow_schema(columns))
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def export_samples(
    analyzer: FeatureSource,
    out_dir: PathLike,
    format: str = "jsonl",  # noqa: A002 - the natural name on the command line too
    features: Optional[Iterable[int]] = None,
    num_examples: Optional[int] = None,
    groups: Optional[Iterable[str]] = None,
) -> dict[str, Path]:
    """Write ``features.<ext>``, ``samples.<ext>``, ``history.<ext>`` (with a history) and ``summary.json``.

    ``format="neuronpedia"`` writes Neuronpedia's bulk export instead, with default ids (see
    :func:`~lightning_sae_samples.analysis.neuronpedia.export_neuronpedia` for the ids and records), and returns
    ``{"source": OUT/<model>/<source>, "manifest": OUT/neuronpedia_export_manifest.json}``.

    Args:
        analyzer: The opened samples directory.
        out_dir: Output folder (created if missing); the files of an earlier export into it (those its
            ``export_manifest.json`` lists) are replaced, any other file of the same name stops the export.
        format: ``"jsonl"``, ``"parquet"`` or ``"neuronpedia"``.
        features: Latent indices; default: the saved features in rank order.
        num_examples: Top (and recent) samples per feature; default: those in its feature file.
        groups: Sample groups in the samples table, among ``("top", "interval", "recent")`` (default: all).

    Returns:
        ``{"features": path, "samples": path, "summary": path}``, and ``"history": path`` when the directory has a
        history (``training_history.pt``): its rows for the exported features.

    Raises:
        ValueError: Unknown ``format`` or group.
        ImportError: ``format="parquet"`` without pyarrow.
        FileExistsError: A file to write is there and an earlier export did not write it.
    """
    if format not in FORMATS:
        raise ValueError(f"`format` must be one of {FORMATS}, got {format!r}.")
    chosen = _check_groups(groups)
    if format == "neuronpedia":
        from lightning_sae_samples.analysis.neuronpedia import EXPORT_MANIFEST_NAME, export_neuronpedia

        result = export_neuronpedia(analyzer, out_dir, features=features, num_examples=num_examples)  # type: ignore[arg-type]
        return {"source": result.source_dir, "manifest": result.out_dir / EXPORT_MANIFEST_NAME}
    if format == "parquet":
        _require("pyarrow", "The parquet format")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    history = analyzer.history  # read from the analyzer's own save
    names = [FEATURES_NAME, SAMPLES_NAME, *([HISTORY_TABLE_NAME] if history is not None else [])]
    targets = [*(out / f"{name}.{format}" for name in names), out / SUMMARY_NAME]
    owned = _owned_files(out)
    for path in targets:
        refuse_samples_dir_file(path, "an export")
        if lstat_or_none(path) is not None and (path.name not in owned or not is_plain_file(path)):
            raise FileExistsError(
                f"{path} exists and this export did not write it (it is not in {out / TABLES_MANIFEST_NAME});"
                " move it away or export into another folder."
            )
    selected = _selected(analyzer, features, num_examples)
    tables = {
        FEATURES_NAME: ([feature_row(f, rank) for rank, f in enumerate(selected, start=1)], FEATURE_COLUMNS),
        SAMPLES_NAME: ([row for f in selected for row in sample_rows(f, chosen)], SAMPLE_COLUMNS),
    }
    if history is not None:
        tables[HISTORY_TABLE_NAME] = (history.rows([f.feature_idx for f in selected]), HISTORY_COLUMNS)
    paths: dict[str, Path] = {}
    for name, (rows, columns) in tables.items():
        path = out / f"{name}.{format}"
        if format == "jsonl":
            atomic_write_bytes(path, jsonl_bytes(rows))
        else:
            _write_parquet(path, rows, columns)
        paths[name] = path
    summary = {
        "export_version": EXPORT_VERSION,
        "format": format,
        "samples_dir": str(analyzer.directory.path),
        "features": len(tables[FEATURES_NAME][0]),
        "samples": len(tables[SAMPLES_NAME][0]),
        "samples_by_group": {g: sum(r["group"] == g for r in tables[SAMPLES_NAME][0]) for g in chosen},
        **({"history_rows": len(tables[HISTORY_TABLE_NAME][0])} if history is not None else {}),
        "run": analyzer.directory.summary,
    }
    paths["summary"] = out / SUMMARY_NAME
    atomic_write_bytes(paths["summary"], json.dumps(summary, indent=2, ensure_ascii=False, allow_nan=False).encode())
    manifest = {"writer": WRITER_ID, "files": sorted(owned | {p.name for p in targets})}
    atomic_write_bytes(out / TABLES_MANIFEST_NAME, json.dumps(manifest, indent=2).encode("utf-8"))
    return paths


def _owned_files(out: Path) -> set[str]:
    """The file names an earlier table export listed in ``out``'s manifest; empty when there is none."""
    path = out / TABLES_MANIFEST_NAME
    if lstat_or_none(path) is None:
        return set()
    record = load_json(path) if is_plain_file(path) else None
    if not isinstance(record, dict) or record.get("writer") != WRITER_ID or not isinstance(record.get("files"), list):
        raise FileExistsError(
            f"{path} is not a manifest lightning-sae-samples wrote; export into another folder or move it away."
        )
    allowed = {f"{name}.{ext}" for name in (FEATURES_NAME, SAMPLES_NAME, HISTORY_TABLE_NAME) for ext in TABLE_FORMATS
               } | {SUMMARY_NAME}
    return {name for name in record["files"] if name in allowed}
