"""Neuronpedia's formats, from a samples directory: its bulk export and its Python package's upload classes.

:func:`export_neuronpedia` writes the folder Neuronpedia's importer reads (the layout of its
``convert-saedashboard-to-neuronpedia-export`` script): ``OUT/<model>/<layer>-<source set>/`` with
``release.jsonl``, ``model.jsonl``, ``sourceset.jsonl``, ``source.jsonl``, ``features/batch-N.jsonl.gz`` and
``activations/batch-N.jsonl.gz``. Per feature: its index, density, the tokens its decoder direction promotes
and suppresses (when the run recorded ``logit_effects``), and activation examples: the top group, then one
group per activation interval with its bounds and the share of the collected token activations it holds. Token strings
are the tokenizer's vocabulary pieces (``convert_ids_to_tokens``) with the whitespace stand-ins replaced as
Neuronpedia's dashboard runner replaces them. Every row respects the limits of Neuronpedia's upload route.
:func:`package_features` reads such a folder back into the ``neuronpedia`` package's ``Feature`` objects,
in batches its ``upload_batch`` accepts. The mapping, field by field, is in ``docs/export.md``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Protocol, Union

from lightning_sae_samples.analysis.explanations import ExplanationRecord, read_explanations
from lightning_sae_samples.analysis.records import FeatureSamples, IntervalGroup, RunSummary, Sample
from lightning_sae_samples.render.progress import progress as progress_bar
from lightning_sae_samples.samples_dir.atomic import atomic_write_bytes
from lightning_sae_samples.samples_dir.files import is_plain_file, load_json, lstat_or_none
from lightning_sae_samples.samples_dir.names import WRITER_ID
from lightning_sae_samples.samples_dir.reader import SamplesDirectory
from lightning_sae_samples.tokens import load_tokenizer, without_surrogates

PathLike = Union[str, os.PathLike]

FORMAT_NAME = "neuronpedia"
#: Byte-level BPE stand-ins (and a few mis-decoded punctuation pieces) replaced in every vocabulary piece,
#: as Neuronpedia's dashboard runner (SAEDashboard's ``HTML_ANOMALIES``) replaces them.
WHITESPACE_PIECES = {
    "âĢĶ": "—",
    "âĢĵ": "–",
    "âĢľ": "“",
    "âĢĿ": "”",
    "âĢĺ": "‘",
    "âĢĻ": "’",
    "âĢĭ": " ",
    "Ġ": " ",
    "Ċ": "\n",
    "ĉ": "\t",
}
#: The string Neuronpedia shows for a token id the vocabulary does not hold.
OUT_OF_RANGE_TOKEN = "<|outofrange|>"
#: Limits of Neuronpedia's upload route: tokens (and values) per activation, logits per side, features per call.
MAX_ACTIVATION_TOKENS = 1024
MAX_LOGITS = 20
MAX_FEATURES_PER_UPLOAD = 128
#: What a top-group activation carries as ``binMin`` and ``binContains`` (its ``binMax`` is the latent's max).
TOP_GROUP_BIN = -1.0
#: The default value Neuronpedia's schema gives ``vectorDefaultSteerStrength``.
DEFAULT_STEER_STRENGTH = 10.0
#: Lists the files this export wrote into ``OUT``: the proof that rewriting them is allowed.
EXPORT_MANIFEST_NAME = "neuronpedia_export_manifest.json"
RECORD_NAMES = ("release.jsonl", "model.jsonl", "sourceset.jsonl", "source.jsonl")
BATCH_FOLDERS = ("features", "activations")
#: Folder of the explanation rows (from the samples directory's ``explanations/`` sidecar), batched as the features.
EXPLANATIONS_FOLDER = "explanations"
#: Neuronpedia ``typeName`` of an exported explanation, by the sidecar record's ``source``.
EXPLANATION_TYPES = {"explain": "lightning-sae-samples", "delphi": "eleuther_delphi", "neuronpedia": "neuronpedia",
                     "label": "human"}
#: ``collection_summary.json`` ``source`` values of a directory collected with one SAE state (a snapshot).
SNAPSHOT_SOURCES = ("validate", "test", "predict")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_BATCH_FILE = re.compile(r"batch-(\d+)\.jsonl\.gz")
_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"


class FeatureSource(Protocol):
    """What the export reads from: an opened samples directory (an ``ActivationSampleAnalyzer``)."""

    directory: SamplesDirectory
    summary: RunSummary
    tokenizer: Any

    @property
    def saved_features(self) -> list[int]:
        """Saved feature indices in rank order."""

    def feature(self, feature_idx: int, num_examples: Optional[int] = None) -> FeatureSamples:
        """One latent with up to ``num_examples`` samples."""


class MixedSAEStatesWarning(UserWarning):
    """A training-time samples directory was exported: its samples were scored by different SAE states."""


class ModelIdMismatchWarning(UserWarning):
    """The Neuronpedia model id does not name the model of the tokenizer the run recorded."""


#: A Hugging Face Hub tokenizer name (``gpt2``, ``google/gemma-2-2b``), as opposed to a local folder.
_HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def _checked_name(value: Any, name: str, example: str) -> str:
    text = str(value)
    if _NAME.fullmatch(text) is None or ".." in text:
        raise ValueError(
            f"`{name}` must be 1-100 letters, digits, '.', '_' or '-' starting with a letter or digit (it names a"
            f" folder and a Neuronpedia id); got {text!r}. Use e.g. {example!r}."
        )
    return text


@dataclass(frozen=True)
class NeuronpediaSource:
    """Where the features go on Neuronpedia, and the release/model/source records that describe them.

    Attributes:
        model_id: Neuronpedia model id (e.g. ``"gpt2-small"``); the first folder below ``OUT``.
        source_set: Source set name without the layer (e.g. ``"res-jb"``).
        layer: Layer number; the source id is ``f"{layer}-{source_set}"``.
        release_id: Release name (default: ``source_set``).
        release_title: Human-readable release description (default: the release id).
        creator_name: Author shown on Neuronpedia.
        creator_id: Neuronpedia user id of the creator (empty: the importing instance sets its own).
        description: Source set description (e.g. ``"Residual Stream - 16k"``).
        urls: Links of the release (paper, weights).
        dataset: Text the samples came from (e.g. a Hugging Face dataset path).
        hf_repo_id: Hugging Face repository of the SAE weights.
        hf_folder_id: Folder of the weights inside ``hf_repo_id``.
        created_at: Timestamp written into every record (default: now, UTC); fix it for byte-identical exports.
    """

    model_id: str = "model"
    source_set: str = "sae"
    layer: int = 0
    release_id: Optional[str] = None
    release_title: Optional[str] = None
    creator_name: str = ""
    creator_id: str = ""
    description: str = ""
    urls: tuple[str, ...] = ()
    dataset: Optional[str] = None
    hf_repo_id: Optional[str] = None
    hf_folder_id: Optional[str] = None
    created_at: Optional[datetime] = field(default=None, compare=False)

    def __post_init__(self) -> None:
        _checked_name(self.model_id, "model_id", "gpt2-small")
        _checked_name(self.source_set, "source_set", "res-jb")
        _checked_name(self.release_name, "release_id", "my-saes")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"`layer` must be an int >= 0 (the model layer the SAE reads); got {self.layer!r}.")

    @property
    def source_id(self) -> str:
        """Neuronpedia's source id (its ``layer`` field): ``f"{layer}-{source_set}"``."""
        return f"{self.layer}-{self.source_set}"

    @property
    def release_name(self) -> str:
        """The release id, defaulting to the source set name."""
        return self.release_id or self.source_set

    def timestamp(self) -> str:
        """``created_at`` as ISO 8601 text."""
        return (self.created_at or datetime.now(timezone.utc)).isoformat()


def default_model_id(summary: RunSummary) -> str:
    """A Neuronpedia model id from the run's recorded Hub tokenizer name (``"google/gemma-2-2b"``: ``gemma-2-2b``).

    Raises:
        ValueError: The run recorded a local folder, a class name or nothing, which names no model: the message
            asks for the id.
    """
    name = summary.config.get("tokenizer")
    if isinstance(name, str) and _HUB_NAME.fullmatch(name) and "Tokenizer" not in name and not os.path.exists(name):
        tail = name.rsplit("/", 1)[-1].lower()
        if _NAME.fullmatch(tail) and ".." not in tail:
            return tail
    recorded = f"the tokenizer {name!r}" if isinstance(name, str) and name.strip() else "no tokenizer name"
    raise ValueError(
        f"Pass --model-id (Python: NeuronpediaSource(model_id=...)), Neuronpedia's id of the model the SAE read, e.g."
        f" gpt2-small: the run recorded {recorded}, which names no model on the Hugging Face Hub."
    )


def _model_family(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _warn_if_other_model(summary: RunSummary, model_id: str) -> None:
    """Warn when the model id's first word (``gpt2`` of ``gpt2-small``) is not in the recorded tokenizer's name."""
    name = summary.config.get("tokenizer")
    if not isinstance(name, str) or not name.strip() or "Tokenizer" in name:
        return  # nothing to compare with
    family = _model_family(re.split(r"[-_.]", model_id, maxsplit=1)[0])
    if family and family not in _model_family(name):
        warnings.warn(
            f"The model id {model_id!r} does not look like the model of the run's tokenizer ({name}): Neuronpedia"
            f" would show these latents under {model_id}. Pass the id of the model the SAE was trained on.",
            ModelIdMismatchWarning,
            stacklevel=3,
        )


def neuronpedia_piece(piece: Optional[str]) -> str:
    """A vocabulary piece as Neuronpedia shows it: whitespace stand-ins replaced; ``None`` is out of range."""
    if piece is None:
        return OUT_OF_RANGE_TOKEN
    text = without_surrogates(str(piece))
    for stand_in, replacement in WHITESPACE_PIECES.items():
        text = text.replace(stand_in, replacement)
    return text


class TokenPieces:
    """Token id to Neuronpedia token string, each distinct id converted once.

    With a tokenizer, the string is its ``convert_ids_to_tokens`` piece through :func:`neuronpedia_piece`.
    Without one, it is the display string the samples directory recorded (``fallbacks``), and
    :attr:`used_fallback` says so.

    Args:
        tokenizer: An object with ``convert_ids_to_tokens``, or ``None``.
    """

    def __init__(self, tokenizer: Any = None) -> None:
        convert = getattr(tokenizer, "convert_ids_to_tokens", None)
        self._convert = convert if callable(convert) else None
        self._pieces: dict[int, str] = {}
        self.used_fallback = False

    @property
    def has_tokenizer(self) -> bool:
        """Whether strings come from a tokenizer's vocabulary."""
        return self._convert is not None

    def prepare(self, token_ids: Iterable[int]) -> None:
        """Convert every id not seen yet, in one call to the tokenizer."""
        if self._convert is None:
            return
        new = sorted({int(i) for i in token_ids} - self._pieces.keys())
        if not new:
            return
        try:
            pieces = list(self._convert(new))
        except (IndexError, KeyError, OverflowError, ValueError, TypeError):
            pieces = []
            for token_id in new:
                try:
                    pieces.append(self._convert([token_id])[0])
                except (IndexError, KeyError, OverflowError, ValueError, TypeError):
                    pieces.append(None)
        if len(pieces) != len(new):
            raise ValueError(
                f"The tokenizer's convert_ids_to_tokens returned {len(pieces)} pieces for {len(new)} ids;"
                " pass a tokenizer whose convert_ids_to_tokens takes a list of ids."
            )
        self._pieces.update((i, neuronpedia_piece(p)) for i, p in zip(new, pieces))

    def piece(self, token_id: int, fallback: str) -> str:
        """Neuronpedia's string of one token (after :meth:`prepare`); ``fallback`` without a tokenizer."""
        if self._convert is None:
            self.used_fallback = True
            return fallback
        return self._pieces[int(token_id)]


def _activation_id(*parts: Any) -> str:
    """A deterministic id in Neuronpedia's cuid shape: 25 lowercase letters and digits, starting with a letter."""
    digest = int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=16).digest(), "big")
    chars = []
    for _ in range(24):
        digest, rest = divmod(digest, 36)
        chars.append(_BASE36[rest])
    return "c" + "".join(chars)


def _window(sample: Sample, limit: int) -> tuple[int, int]:
    """Start and stop of at most ``limit`` context tokens that keep the activating token inside."""
    length = len(sample.context)
    if length <= limit:
        return 0, length
    start = min(max(sample.context_position - limit // 2, 0), length - limit)
    return start, start + limit


def _groups(feature: FeatureSamples) -> list[tuple[str, int, Optional[IntervalGroup], tuple[Sample, ...]]]:
    """``(group name, group index, interval or None, samples)``: the top group, then each non-empty interval.

    Intervals come highest first, the order of SAEDashboard's interval groups.
    """
    groups: list[tuple[str, int, Optional[IntervalGroup], tuple[Sample, ...]]] = [("top", 0, None, feature.samples)]
    intervals = [("interval", n, g, g.samples) for n, g in enumerate(feature.interval_groups) if g.samples]
    return groups + intervals[::-1]


def activation_rows(
    feature: FeatureSamples, source: NeuronpediaSource, pieces: TokenPieces, created_at: str
) -> list[dict[str, Any]]:
    """Neuronpedia activation rows of one latent: its top samples, then the samples of each activation interval.

    A top-group row has ``binMin = binContains = -1`` and ``binMax`` the latent's largest activation; an
    interval row has the interval's bounds (the open last interval ends at the latent's largest activation)
    and ``binContains`` the share of all collected token activations that fall in it (``count / tokens_seen``,
    as SAEDashboard's "CONTAINS x%" counts the tokens in an interval among all tokens).
    """
    stats = feature.stats
    top_max = stats.all_time_max
    rows = []
    for group, number, interval, samples in _groups(feature):
        if interval is None:
            bin_min, bin_max, contains = TOP_GROUP_BIN, top_max, TOP_GROUP_BIN
        else:
            bin_min, bin_max = interval.low, top_max if interval.high is None else interval.high
            contains = interval.count / stats.tokens_seen if stats.tokens_seen else 0.0
        pieces.prepare(t.token_id for s in samples for t in s.context)
        for rank, sample in enumerate(samples):
            start, stop = _window(sample, MAX_ACTIVATION_TOKENS)
            context = sample.context[start:stop]
            # Neuronpedia's values are numbers: a shuffled row's unknown neighbours go as 0 (unshaded), and the
            # export warns that only the activating token's value is known.
            values = [0.0 if t.activation is None else float(t.activation) for t in context]
            max_value = max(values)
            rows.append({
                "id": _activation_id(source.model_id, source.source_id, stats.feature_idx, group, number, rank,
                                     sample.step, sample.position),
                "tokens": [pieces.piece(t.token_id, t.text) for t in context],
                "index": str(stats.feature_idx),
                "layer": source.source_id,
                "modelId": source.model_id,
                "maxValue": max_value,
                "maxValueTokenIndex": values.index(max_value),
                "minValue": min(values),
                "values": values,
                "creatorId": source.creator_id,
                "dataSource": None,
                "dataIndex": None,
                "dfaValues": [],
                "dfaTargetIndex": None,
                "dfaMaxValue": None,
                "createdAt": created_at,
                "lossValues": [],
                "logitContributions": None,
                "binMin": float(bin_min),
                "binMax": float(bin_max),
                "binContains": float(contains),
                "qualifyingTokenIndex": sample.context_position - start,
            })
    return rows


def _histogram_bars(feature: FeatureSamples) -> tuple[list[float], list[float]]:
    """``(bar heights, bar values)``: the latent's activation histogram, one bar per bin at its midpoint."""
    edges, counts = feature.stats.histogram.bin_edges, feature.stats.histogram.counts
    values = [(edges[i] + edges[i + 1]) / 2 for i in range(len(counts))]
    return [float(c) for c in counts], values


def feature_row(
    feature: FeatureSamples, source: NeuronpediaSource, pieces: TokenPieces, created_at: str
) -> dict[str, Any]:
    """Neuronpedia's feature row of one latent (density, logits, histogram; correlation lists left empty)."""
    effects = feature.logit_effects
    promoted = () if effects is None else effects.promoted[:MAX_LOGITS]
    suppressed = () if effects is None else effects.suppressed[:MAX_LOGITS]
    pieces.prepare(t.token_id for t in (*promoted, *suppressed))
    heights, bar_values = _histogram_bars(feature)
    empty: list = []
    return {
        "modelId": source.model_id,
        "layer": source.source_id,
        "index": str(feature.feature_idx),
        "creatorId": source.creator_id,
        "createdAt": created_at,
        "maxActApprox": float(feature.stats.all_time_max),
        "hasVector": False,
        "vector": [],
        "vectorLabel": None,
        "vectorDefaultSteerStrength": DEFAULT_STEER_STRENGTH,
        "hookName": None,
        "topkCosSimIndices": [],
        "topkCosSimValues": [],
        **{name: list(empty) for name in (
            "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
            "correlated_neurons_indices", "correlated_neurons_pearson", "correlated_neurons_l1",
            "correlated_features_indices", "correlated_features_pearson", "correlated_features_l1",
        )},
        "neg_str": [pieces.piece(t.token_id, t.token) for t in suppressed],
        "neg_values": [float(t.value) for t in suppressed],
        "pos_str": [pieces.piece(t.token_id, t.token) for t in promoted],
        "pos_values": [float(t.value) for t in promoted],
        "frac_nonzero": float(feature.stats.frequency),
        "freq_hist_data_bar_heights": heights,
        "freq_hist_data_bar_values": bar_values,
        "logits_hist_data_bar_heights": [],
        "logits_hist_data_bar_values": [],
        "decoder_weights_dist": [],
    }


def explanation_row(record: ExplanationRecord, source: NeuronpediaSource) -> dict[str, Any]:
    """Neuronpedia's explanation row (its export's ``explanations/batch-N.jsonl.gz`` shape) of a sidecar record.

    The detection score (``score``), the embedding AUROC (``embedding_score``), the contexts each was computed on,
    the random explanation's of each and the samples' step go into ``notes`` (JSON text), which Neuronpedia keeps
    as it is.
    """
    notes = {"score": record.score, "score_contexts": record.score_contexts, "random_score": record.random_score,
             "embedding_score": record.embedding_score, "embedding_contexts": record.embedding_contexts,
             "embedding_random_score": record.embedding_random_score,
             "prompt_version": record.prompt_version, "samples_step": record.samples_step, "kind": record.kind}
    return {
        "id": _activation_id(source.model_id, source.source_id, record.latent, "explanation", record.time),
        "modelId": source.model_id,
        "layer": source.source_id,
        "index": str(record.latent),
        "description": record.text,
        "authorId": source.creator_id,
        "triggeredByUserId": None,
        "notes": json.dumps(notes, allow_nan=False),
        "typeName": EXPLANATION_TYPES[record.source],
        "explanationModelName": record.model or None,
        "createdAt": record.time,
        "updatedAt": record.time,
    }


def source_records(source: NeuronpediaSource, summary: RunSummary, created_at: str) -> dict[str, dict[str, Any]]:
    """The ``release.jsonl``, ``model.jsonl``, ``sourceset.jsonl`` and ``source.jsonl`` records."""
    title = source.release_title or source.release_name
    release = {
        "name": source.release_name, "description": title, "creatorName": source.creator_name,
        "creatorId": source.creator_id, "visibility": "PUBLIC", "isNewUi": False, "featured": False,
        "descriptionShort": title, "urls": list(source.urls), "creatorEmail": None,
        "creatorNameShort": source.creator_name, "defaultSourceSetName": None, "defaultSourceId": None,
        "defaultUmapSourceIds": [], "createdAt": created_at,
    }
    model = {
        "id": source.model_id, "instruct": source.model_id.endswith("-it"), "creatorId": source.creator_id,
        "displayNameShort": source.model_id, "displayName": source.model_id, "tlensId": None, "dimension": None,
        "visibility": "PUBLIC", "defaultSourceSetName": None, "defaultSourceId": None, "inferenceEnabled": False,
        "layers": 0, "neuronsPerLayer": 0, "createdAt": created_at, "owner": "", "updatedAt": created_at,
        "website": None,
    }
    sourceset = {
        "modelId": source.model_id, "name": source.source_set, "creatorId": source.creator_id,
        "hasDashboards": True, "visibility": "PUBLIC", "description": source.description, "type": "",
        "creatorName": source.creator_name, "urls": list(source.urls), "creatorEmail": None,
        "releaseName": source.release_name, "defaultOfModelId": None, "defaultRange": 1, "defaultShowBreaks": True,
        "showDfa": False, "showCorrelated": False, "showHeadAttribution": False, "showUmap": False,
        "createdAt": created_at,
    }
    record = {
        "id": source.source_id, "modelId": source.model_id, "setName": source.source_set,
        "creatorId": source.creator_id, "hasDashboards": True, "inferenceEnabled": False, "inferenceHosts": [],
        "saelensConfig": None, "saelensRelease": None, "saelensSaeId": None, "hfRepoId": source.hf_repo_id,
        "hfFolderId": source.hf_folder_id, "visibility": "PUBLIC", "defaultOfModelId": None, "hasUmap": False,
        "hasUmapLogSparsity": False, "hasUmapClusters": False, "num_prompts": None, "num_tokens_in_prompt": None,
        "dataset": source.dataset, "notes": _source_note(summary), "createdAt": created_at,
    }
    return dict(zip(RECORD_NAMES, (release, model, sourceset, record)))


def collection_kind(raw_summary: dict) -> str:
    """``"snapshot"`` (one SAE state: the summary's ``source`` is an evaluation loop) or ``"training"``.

    A summary without ``source`` (every directory written before snapshots existed) is a training-time one.
    """
    return "snapshot" if raw_summary.get("source") in SNAPSHOT_SOURCES else "training"


def _source_note(summary: RunSummary) -> str:
    steps = f"steps {summary.first_collected_step}-{summary.last_collected_step}"
    return (f"Exported by lightning-sae-samples from {summary.tokens_seen} tokens ({summary.steps_collected}"
            f" collected steps, {steps}) at global step {summary.global_step}.")


def _warn_if_mixed(analyzer: FeatureSource) -> None:
    raw = analyzer.directory.summary
    if collection_kind(raw) == "snapshot":
        return
    s = analyzer.summary
    warnings.warn(
        f"{analyzer.directory.path} is a training-time samples directory (its summary records no evaluation"
        f" `source`): its samples were scored by the SAE as it was at steps {s.first_collected_step} to"
        f" {s.last_collected_step}, so the exported activations mix SAE states. For dashboards of one SAE, export"
        " a snapshot written by an evaluation run (trainer.validate) instead.",
        MixedSAEStatesWarning,
        stacklevel=3,
    )


def _resolve_tokenizer(analyzer: FeatureSource, tokenizer: Any) -> Any:
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    if getattr(analyzer, "tokenizer", None) is not None:
        return analyzer.tokenizer
    name = analyzer.summary.config.get("tokenizer")
    if isinstance(name, str) and name.strip():
        try:
            return load_tokenizer(name, local_only=True)
        except Exception:  # noqa: BLE001 - no loadable tokenizer: the recorded display strings are used, with a warning
            return None
    return None


def _jsonl_gz(rows: Iterable[dict]) -> bytes:
    text = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows)
    return gzip.compress(text.encode("utf-8"), compresslevel=5, mtime=0)


def _jsonl(row: dict) -> bytes:
    return (json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def check_upload_limits(feature: dict, activations: Sequence[dict]) -> None:
    """Raise ``ValueError`` naming the feature when a row breaks a limit of Neuronpedia's upload route."""
    where = f"feature {feature['index']} of {feature['modelId']}/{feature['layer']}"
    if not activations:
        raise ValueError(f"{where} has no activation; Neuronpedia needs at least one per feature.")
    for side in ("pos", "neg"):
        if len(feature[f"{side}_str"]) != len(feature[f"{side}_values"]) or len(feature[f"{side}_str"]) > MAX_LOGITS:
            raise ValueError(f"{where}: {side}_str/{side}_values must have equal length <= {MAX_LOGITS}.")
    for row in activations:
        if len(row["tokens"]) != len(row["values"]) or not 0 < len(row["tokens"]) <= MAX_ACTIVATION_TOKENS:
            raise ValueError(
                f"{where}: an activation has {len(row['tokens'])} tokens and {len(row['values'])} values; both"
                f" must be equal and between 1 and {MAX_ACTIVATION_TOKENS}."
            )


# ---------------------------------------------------------------------------------------------- safe writing
def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _read_manifest(root: Path) -> set[str]:
    """Files a previous export listed in ``root``'s manifest (only safe relative names); empty when none."""
    path = root / EXPORT_MANIFEST_NAME
    if lstat_or_none(path) is None:
        return set()
    if not is_plain_file(path):
        raise FileExistsError(f"{path} is not a regular file; move it away before exporting into {root}.")
    record = load_json(path)
    if not isinstance(record, dict) or record.get("writer") != WRITER_ID or not isinstance(record.get("files"), list):
        raise FileExistsError(
            f"{path} is not a manifest lightning-sae-samples wrote; export into an empty folder or move it away."
        )
    return {f for f in record["files"] if isinstance(f, str) and _safe_relative(f)}


def _safe_relative(name: str) -> bool:
    parts = name.split("/")
    return not name.startswith("/") and "\\" not in name and all(p not in ("", ".", "..") for p in parts)


def _ensure_dir(path: Path, root: Path) -> None:
    """Create ``path`` below ``root``, refusing links and files on the way (nothing outside ``root`` is touched)."""
    current = root
    for part in path.relative_to(root).parts:
        current = current / part
        info = lstat_or_none(current)
        if info is None:
            current.mkdir()
        elif not current.is_dir() or current.is_symlink():
            raise FileExistsError(f"{current} exists and is not a folder; move it away or choose another OUT.")


def _real_dirs_between(root: Path, folder: Path) -> bool:
    """Whether every folder from ``root`` down to ``folder`` is a real folder (no link leads out of ``root``)."""
    current = root
    for part in folder.relative_to(root).parts:
        current = current / part
        if current.is_symlink() or not current.is_dir():
            return False
    return True


@dataclass(frozen=True)
class NeuronpediaExport:
    """What :func:`export_neuronpedia` wrote.

    Attributes:
        out_dir: The ``OUT`` folder.
        source_dir: ``OUT/<model_id>/<source_id>``: the folder Neuronpedia imports.
        files: Every file written, relative to ``out_dir``.
        features: Features exported.
        activations: Activation rows exported.
        skipped_features: Latents left out because they have no sample.
        kind: ``"snapshot"`` (one SAE state) or ``"training"`` (mixed states; warned).
        token_strings: ``"tokenizer"`` (vocabulary pieces) or ``"display"`` (no tokenizer: the recorded strings).
        explanations: Explanation rows exported (the latest explanation of each exported latent that has one).
    """

    out_dir: Path
    source_dir: Path
    files: tuple[str, ...]
    features: int
    activations: int
    skipped_features: tuple[int, ...]
    kind: str
    token_strings: str
    explanations: int = 0


def export_neuronpedia(
    analyzer: FeatureSource,
    out_dir: PathLike,
    source: Optional[NeuronpediaSource] = None,
    features: Optional[Iterable[int]] = None,
    num_examples: Optional[int] = None,
    tokenizer: Any = None,
    features_per_batch: int = MAX_FEATURES_PER_UPLOAD,
    progress: bool = False,
) -> NeuronpediaExport:
    """Write Neuronpedia's bulk export of a samples directory into ``out_dir/<model_id>/<source_id>/``.

    Warns (:class:`MixedSAEStatesWarning`) when the directory is a training-time one. Files are written
    atomically, only inside ``out_dir``; a file already there is replaced only if this export's manifest
    (``neuronpedia_export_manifest.json``) lists it, and batch files an earlier export of the same source wrote
    but this one does not are removed.

    Args:
        analyzer: The opened samples directory.
        out_dir: Output folder (created if missing).
        source: Neuronpedia ids and records; default: model id from the recorded Hub tokenizer name, source
            ``0-sae``. Warns (:class:`ModelIdMismatchWarning`) when the model id does not match that tokenizer.
        features: Latent indices; default: the saved features in rank order.
        num_examples: Top samples per feature; default: those in its feature file.
        tokenizer: Tokenizer (object, name or local path) for the vocabulary pieces; default: the analyzer's,
            else the run's recorded one (local files only), else the recorded display strings (warned).
        features_per_batch: Features per ``batch-N.jsonl.gz`` (at most 128, the upload route's limit per call).
        progress: Show a progress bar on stderr.

    Raises:
        ValueError: Bad ids or ``features_per_batch``, or no ``source`` for a run that recorded no Hub tokenizer
            name (see :func:`default_model_id`).
        FileExistsError: A file in the way that this export did not write.
    """
    if isinstance(features_per_batch, bool) or not isinstance(features_per_batch, int) or not (
        1 <= features_per_batch <= MAX_FEATURES_PER_UPLOAD
    ):
        raise ValueError(f"`features_per_batch` must be an int from 1 to {MAX_FEATURES_PER_UPLOAD}; got"
                         f" {features_per_batch!r}.")
    source = source or NeuronpediaSource(model_id=default_model_id(analyzer.summary))
    _warn_if_other_model(analyzer.summary, source.model_id)
    _warn_if_mixed(analyzer)
    created_at = source.timestamp()
    pieces = TokenPieces(_resolve_tokenizer(analyzer, tokenizer))
    indices = analyzer.saved_features if features is None else list(features)

    explained = read_explanations(analyzer.directory.path)
    feature_rows: list[dict] = []
    activations: list[list[dict]] = []
    skipped: list[int] = []
    unknown = False
    for idx in progress_bar(indices, progress, "Converting features"):
        feature = analyzer.feature(idx, num_examples)
        unknown = unknown or any(not s.neighbours_known for _, _, _, samples in _groups(feature) for s in samples)
        rows = activation_rows(feature, source, pieces, created_at)
        if not rows:
            skipped.append(int(idx))
            continue
        row = feature_row(feature, source, pieces, created_at)
        check_upload_limits(row, rows)
        feature_rows.append(row)
        activations.append(rows)
    if unknown:
        warnings.warn(
            "The samples come from shuffled rows, which know only the activating token's activation: its"
            " neighbours' values are unknown and exported as 0, so Neuronpedia shades only the activating token.",
            UserWarning,
            stacklevel=2,
        )
    if skipped:
        warnings.warn(
            f"{len(skipped)} latent(s) have no sample and are left out (Neuronpedia needs at least one activation"
            f" per feature): {', '.join(map(str, skipped[:10]))}{' ...' if len(skipped) > 10 else ''}.",
            UserWarning,
            stacklevel=2,
        )
    if pieces.used_fallback:
        warnings.warn(
            "No tokenizer could be loaded, so the token strings are the run's display strings (decoded text), not"
            " the vocabulary pieces Neuronpedia shows. Pass the tokenizer (--tokenizer NAME_OR_PATH).",
            UserWarning,
            stacklevel=2,
        )

    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    source_dir = root / source.model_id / source.source_id
    contents: dict[Path, bytes] = {
        source_dir / name: _jsonl(record)
        for name, record in source_records(source, analyzer.summary, created_at).items()
    }
    for n, start in enumerate(range(0, len(feature_rows), features_per_batch)):
        chunk = slice(start, start + features_per_batch)
        contents[source_dir / "features" / f"batch-{n}.jsonl.gz"] = _jsonl_gz(feature_rows[chunk])
        contents[source_dir / "activations" / f"batch-{n}.jsonl.gz"] = _jsonl_gz(
            r for rows in activations[chunk] for r in rows
        )
        explanation_rows = [explanation_row(explained[int(row["index"])], source) for row in feature_rows[chunk]
                            if int(row["index"]) in explained]
        if explanation_rows:
            contents[source_dir / EXPLANATIONS_FOLDER / f"batch-{n}.jsonl.gz"] = _jsonl_gz(explanation_rows)
    written = _write_owned(root, source_dir, contents)
    return NeuronpediaExport(
        out_dir=root, source_dir=source_dir, files=written, features=len(feature_rows),
        activations=sum(map(len, activations)), skipped_features=tuple(skipped),
        kind=collection_kind(analyzer.directory.summary),
        token_strings="tokenizer" if pieces.has_tokenizer else "display",
        explanations=sum(int(row["index"]) in explained for row in feature_rows),
    )


def _write_owned(root: Path, source_dir: Path, contents: dict[Path, bytes]) -> tuple[str, ...]:
    """Write ``contents`` below ``root``, replacing only files the manifest lists; returns the relative names."""
    owned = _read_manifest(root)
    names = {_relative(p, root): p for p in contents}
    for name, path in names.items():
        if lstat_or_none(path) is not None and (name not in owned or not is_plain_file(path)):
            raise FileExistsError(
                f"{path} exists and this export did not write it (it is not in {root / EXPORT_MANIFEST_NAME});"
                " move it away or export into another folder."
            )
    batch_folders = {_relative(source_dir / folder, root) for folder in (*BATCH_FOLDERS, EXPLANATIONS_FOLDER)}
    stale = sorted(n for n in owned - names.keys()
                   if n.rpartition("/")[0] in batch_folders and _BATCH_FILE.fullmatch(n.rpartition("/")[2]))
    for path in sorted({p.parent for p in contents}):
        _ensure_dir(path, root)
    for path, data in contents.items():
        atomic_write_bytes(path, data)
    for name in stale:
        path = root / name
        if _real_dirs_between(root, path.parent) and is_plain_file(path):
            path.unlink()
    listed = sorted((owned - set(stale)) | names.keys())
    manifest = {"writer": WRITER_ID, "format": FORMAT_NAME, "files": listed}
    atomic_write_bytes(root / EXPORT_MANIFEST_NAME, json.dumps(manifest, indent=2).encode("utf-8"))
    return tuple(sorted(names))




# ---------------------------------------------------------------------------------------------- reading back
def read_batches(source_dir: PathLike) -> tuple[list[dict], list[dict]]:
    """The feature rows and activation rows of an exported source folder, batch after batch."""
    rows = _read_batch_folders(source_dir, BATCH_FOLDERS)
    return rows["features"], rows["activations"]


def read_explanation_batches(source_dir: PathLike) -> list[dict]:
    """The explanation rows of an exported source folder (none if it has no ``explanations/`` folder)."""
    return _read_batch_folders(source_dir, (EXPLANATIONS_FOLDER,))[EXPLANATIONS_FOLDER]


def _read_batch_folders(source_dir: PathLike, kinds: Sequence[str]) -> dict[str, list[dict]]:
    folder = Path(source_dir)
    out: dict[str, list[dict]] = {}
    for kind in kinds:
        files = sorted(
            (p for p in (folder / kind).iterdir() if _BATCH_FILE.fullmatch(p.name) and is_plain_file(p)),
            key=lambda p: int(_BATCH_FILE.fullmatch(p.name).group(1)),  # type: ignore[union-attr]
        ) if (folder / kind).is_dir() else []
        out[kind] = [json.loads(line) for p in files for line in gzip.decompress(p.read_bytes()).splitlines() if line]
    return out


def package_features(source_dir: PathLike, batch_size: int = MAX_FEATURES_PER_UPLOAD) -> Iterator[list[Any]]:
    """The ``neuronpedia`` package's ``Feature`` objects of an exported source folder, ``batch_size`` at a time.

    Each batch goes to ``FeatureRequest().upload_batch(model_id, source, batch)`` as it is (at most 128 features
    a call). Needs ``pip install neuronpedia``.

    Example::

        from neuronpedia.requests.feature_request import FeatureRequest
        for batch in package_features("OUT/gpt2-small/6-my-saes"):
            FeatureRequest().upload_batch("gpt2-small", "6-my-saes", batch)
    """
    try:
        from neuronpedia.np_activation import Activation
        from neuronpedia.np_explanation import Explanation
        from neuronpedia.np_feature import Feature, Logit
    except ImportError as err:
        raise ImportError("`package_features` needs the `neuronpedia` package: run `pip install neuronpedia`.") from err
    if not 1 <= batch_size <= MAX_FEATURES_PER_UPLOAD:
        raise ValueError(f"`batch_size` must be from 1 to {MAX_FEATURES_PER_UPLOAD}; got {batch_size!r}.")
    feature_rows, activation_rows_ = read_batches(source_dir)
    by_feature: dict[tuple[str, str, str], list[Any]] = {}
    for row in activation_rows_:
        activation = Activation(
            modelId=row["modelId"], source=row["layer"], index=int(row["index"]), tokens=row["tokens"],
            values=row["values"], quantileMax=row["binMax"], quantileMin=row["binMin"],
            quantileFraction=None if row["binContains"] == TOP_GROUP_BIN else row["binContains"],
        )
        by_feature.setdefault((row["modelId"], row["layer"], str(row["index"])), []).append(activation)
    explanations: dict[tuple[str, str, str], list[Any]] = {}
    for row in read_explanation_batches(source_dir):
        explanations.setdefault((row["modelId"], row["layer"], str(row["index"])), []).append(Explanation(
            modelId=row["modelId"], source=row["layer"], index=int(row["index"]), text=row["description"],
            method=row["typeName"], explainer_model=row["explanationModelName"],
        ))
    batch: list[Any] = []
    for row in feature_rows:
        key = (row["modelId"], row["layer"], str(row["index"]))
        batch.append(Feature(
            modelId=row["modelId"], source=row["layer"], index=int(row["index"]), density=row["frac_nonzero"],
            top_logits=[Logit(t, v) for t, v in zip(row["pos_str"], row["pos_values"])],
            bottom_logits=[Logit(t, v) for t, v in zip(row["neg_str"], row["neg_values"])],
            activations=by_feature.get(key, []), explanations=explanations.get(key) or None,
        ))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------------- command line
def add_arguments(parser: Any) -> None:
    """The ``export --format neuronpedia`` options (an ``argparse`` parser's argument group)."""
    group = parser.add_argument_group("--format neuronpedia (Neuronpedia's bulk export; see docs/export.md)")
    group.add_argument("--model-id", metavar="ID",
                       help="Neuronpedia model id (default: from the recorded Hub tokenizer name; needed otherwise)")
    group.add_argument("--source-set", metavar="NAME", default="sae", help="source set name, without layer")
    group.add_argument("--layer", type=int, default=0, metavar="N", help="model layer (source id: N-SOURCE_SET)")
    group.add_argument("--release-id", metavar="ID", help="release id (default: the source set name)")
    group.add_argument("--release-title", metavar="TEXT", help="release description")
    group.add_argument("--creator-name", metavar="NAME", default="", help="author shown on Neuronpedia")
    group.add_argument("--dataset", metavar="NAME", help="the text the samples came from")
    group.add_argument("--url", metavar="URL", action="append", default=[], help="release link (repeatable)")
    group.add_argument("--sae-layer", metavar="NAME=N", action="append", default=[],
                       help="a run folder's SAE NAME is on layer N (default: the one number in its name; repeatable)")
    group.add_argument("--sae-source-set", metavar="NAME=SET", action="append", default=[],
                       help="a run folder's SAE NAME goes to source set SET (default: --source-set; repeatable)")


def source_from_args(args: Any, summary: RunSummary) -> NeuronpediaSource:
    """The :class:`NeuronpediaSource` of parsed :func:`add_arguments` options."""
    return NeuronpediaSource(
        model_id=args.model_id or default_model_id(summary), source_set=args.source_set, layer=args.layer,
        release_id=args.release_id, release_title=args.release_title, creator_name=args.creator_name,
        urls=tuple(args.url), dataset=args.dataset,
    )
