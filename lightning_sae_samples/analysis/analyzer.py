"""Read a samples directory back: typed statistics and samples of every latent, and reports.

:class:`ActivationSampleAnalyzer` opens what :class:`~lightning_sae_samples.ActivationSampleCallback`
wrote (see ``docs/format.md``). Saved features come from their JSON files, with display strings
decoded by the run's tokenizer; when ``full_state.pt`` is present every latent is reachable, and its
token ids are shown with the strings known from the saved files (or a tokenizer you pass).
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from importlib import import_module
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Optional, TypeVar, Union

import torch

from lightning_sae_samples.analysis.history import FeatureHistory, story_line
from lightning_sae_samples.analysis.logit_effects import compute_logit_effects
from lightning_sae_samples.analysis.records import (
    DRIFT_THRESHOLD,
    FeatureSamples,
    FeatureStats,
    Histogram,
    IntervalGroup,
    LogitEffects,
    Meaning,
    NeighbourInfo,
    RunSummary,
    Sample,
)
from lightning_sae_samples.arguments import choice
from lightning_sae_samples.health import health_counts
from lightning_sae_samples.render.progress import progress as progress_bar
from lightning_sae_samples.samples_dir.atomic import write_text_file
from lightning_sae_samples.samples_dir.decoder import load_decoder_directions
from lightning_sae_samples.samples_dir.files import load_json
from lightning_sae_samples.samples_dir.names import (
    FULL_STATE_INDEX_NAME,
    FULL_STATE_NAME,
    HISTORY_NAME,
    RUN_INDEX_NAME,
    SUMMARY_NAME,
    SamplesDirectoryError,
)
from lightning_sae_samples.samples_dir.parts import load_part_of
from lightning_sae_samples.samples_dir.reader import (
    SaveChangedError,
    load_full_state,
    part_locator,
    pin,
    read_one_save,
    read_samples_dir,
    save_signature,
)
from lightning_sae_samples.samples_dir.run_index import is_run_folder
from lightning_sae_samples.samples_dir.serialize import (
    ACTIVATING_TOKENS_LISTED,
    activating_token_counts,
    sample_groups,
    sample_records,
    window_token_ids,
    with_recent_view,
)
from lightning_sae_samples.state.statistics import RANK_CHOICES, feature_statistics, rank_features
from lightning_sae_samples.tokens import TokenDecoder, is_undecoded, load_tokenizer, undecoded

if TYPE_CHECKING:
    from lightning_sae_samples.analysis.run import RunAnalyzer

__all__ = [
    "DRIFT_THRESHOLD",
    "ActivationSampleAnalyzer",
    "FeatureSamples",
    "FeatureStats",
    "Histogram",
    "IntervalGroup",
    "RunFolderError",
    "RunSummary",
    "Sample",
    "UnknownFeatureError",
]


PathLike = Union[str, os.PathLike]


_T = TypeVar("_T")


_FULL_STATE_KEYS = (
    "num_latents",
    "half_window",
    "top",
    "count",
    "max",
    "hist",
    "hist_edges",
    "tokens_seen",
)


_RENDERERS = {
    "markdown": ("lightning_sae_samples.render.markdown", "render_markdown"),
    "html": ("lightning_sae_samples.render.html", "render_html"),
}


_UNREAD = object()


def _close_all(handles: dict[str, IO[bytes]]) -> None:
    for handle in handles.values():
        handle.close()
    handles.clear()


class RunFolderError(SamplesDirectoryError, AttributeError):
    """What only one SAE's samples directory has was asked of a run folder of many SAEs (the message says which)."""


class UnknownFeatureError(KeyError):
    """A feature index that the samples directory cannot show.

    The message gives the valid range and the saved features nearest to the requested one.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""




class _KnownTokenStrings:
    """Token strings for full-state samples when no tokenizer can be loaded: those seen in saved files.

    A token no saved file shows is displayed as ``[12575]`` and remembered in ``undecoded``.
    """

    def __init__(self, strings: dict[int, str], undecoded_ids: set[int]) -> None:
        self._strings = strings
        self.undecoded = undecoded_ids

    def prepare(self, token_ids: Iterable[int]) -> None:
        """Nothing to decode."""

    def token_str(self, token_id: int) -> str:
        """The saved display string of a token, or its id as ``[12575]``."""
        token_id = int(token_id)
        if token_id in self._strings:
            return self._strings[token_id]
        self.undecoded.add(token_id)
        return undecoded(token_id)

    def context_text(self, token_ids: list[int]) -> str:
        """Concatenated display strings, an undecoded id spaced from its neighbours."""
        text, previous = "", None
        for token_id in token_ids:
            piece = self.token_str(token_id)
            spaced = previous is not None and (is_undecoded(piece) or is_undecoded(previous))
            if spaced and not (previous[-1:].isspace() or piece[:1].isspace()):
                text += " "
            text, previous = text + piece, piece
        return text


class ActivationSampleAnalyzer:
    """Explore a samples directory and write reports from it.

    Example::

        analyzer = ActivationSampleAnalyzer("lightning_logs/version_0/activation_samples")
        analyzer.print_feature_report(feature_idx=42, num_examples=10)
        analyzer.generate_interpretability_report("report.md", top_k_features=50)
        analyzer.generate_html_report("report.html", top_k_features=50)

    A run folder of many SAEs (``DIR/<name>/`` per SAE and the run index ``sae_samples_run.json``) opens as the run:
    ``analyzer.saes`` maps each SAE's name to its own analyzer (``analyzer["layers.3.mlp"]``, opened on first use);
    :meth:`print_summary` prints a row per SAE and the ``generate_*_report`` methods write each SAE's report and an
    index page linking them (:class:`~lightning_sae_samples.analysis.run.RunAnalyzer`, also ``analyzer.run``).
    What only one SAE has (``summary``, ``feature()``, ...) raises :class:`RunFolderError` naming the SAEs.

    Args:
        samples_dir: The directory the callback wrote (or a run folder of many SAEs).
        template_dir: Folder of Jinja templates (``report.md.j2``, ``report.html.j2``) overriding the
            shipped ones by name.
        tokenizer: Tokenizer object or Hugging Face name or local path used to decode latents that only
            ``full_state.pt`` holds; default: the tokenizer the run recorded (``config["tokenizer"]``),
            loaded from local files only. Without either, they show the strings known from the saved
            feature files, else the token ids as ``[12575]`` (see :attr:`decoding_note`).

    The summary and feature files are read at once, ``full_state.pt`` and ``training_history.pt`` on first use;
    all come from one committed save (a read that overlaps a commit is redone, see ``docs/format.md``): the
    analyzer holds those two files open from the start, so later saves do not replace what it reads (POSIX).

    Raises:
        SamplesDirectoryError: The directory is missing, empty, or holds a corrupt file.
        SaveChangedError: Saves were committed during every read of one for ``READ_DEADLINE_SECONDS`` (where
            files cannot be held open, also later: a save was committed before a file was first needed).
    """

    def __init__(
        self, samples_dir: PathLike, template_dir: Optional[PathLike] = None, tokenizer: Any = None
    ) -> None:
        self._pinned: dict[str, IO[bytes]] = {}
        weakref.finalize(self, _close_all, self._pinned)
        #: The run folder of many SAEs this analyzer opened (``None`` for one SAE's samples directory).
        self.run: Optional[RunAnalyzer] = None
        if is_run_folder(samples_dir):
            from lightning_sae_samples.analysis.run import RunAnalyzer

            self.run = RunAnalyzer(samples_dir, template_dir, tokenizer)
            self.template_dir = template_dir
            return
        _, self._signature = read_one_save(samples_dir, lambda: self._read(samples_dir))
        self.template_dir = template_dir
        self.tokenizer = load_tokenizer(tokenizer)
        self._recorded_tokenizer_tried = tokenizer is not None
        self._tokenizer_problem: Optional[str] = None
        self._undecoded_ids: set[int] = set()
        self._state: Optional[dict] = None
        #: Of a full state in parts: the parts opened so far (one latent at a time), by their first latent.
        self._parts: dict[int, dict] = {}
        self._view: Optional[tuple[dict, dict]] = None
        self._computed_effects: dict[int, LogitEffects] = {}
        self._directions: Optional[torch.Tensor] = None
        self._explanations: Optional[dict[int, Any]] = None
        self._labels: dict[int, Any] = {}

    # ------------------------------------------------------------------ a run folder of many SAEs
    @property
    def saes(self) -> Mapping[str, ActivationSampleAnalyzer]:
        """Each SAE's analyzer by name, for a run folder of many SAEs (opened on first use); empty for one SAE."""
        return {} if self.run is None else self.run

    def __getitem__(self, name: str) -> ActivationSampleAnalyzer:
        """The analyzer of the SAE ``name`` of a run folder (``analyzer["layers.3.mlp"]``).

        Raises:
            UnknownSAEError: ``name`` is not one of the run's SAEs, or this is one SAE's samples directory.
        """
        if self.run is None:
            from lightning_sae_samples.analysis.run import UnknownSAEError

            raise UnknownSAEError(
                f"{self.directory.path} is one SAE's samples directory, not a run folder of many SAEs (it has no"
                f" {RUN_INDEX_NAME}): use this analyzer itself."
            )
        return self.run[name]

    def __getattr__(self, name: str) -> Any:
        # Only reached for what a run folder's analyzer lacks: the attributes of one SAE's samples directory.
        run = self.__dict__.get("run")
        if run is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        raise RunFolderError(
            f"{run.path} is a run folder of {len(run)} SAEs ({', '.join(run.names)}), not one SAE's samples"
            f" directory: pick one, e.g. analyzer[{run.names[0]!r}] (command line: {run.path / run.names[0]})."
        )

    def latent_health(self) -> tuple[int, Optional[int], Optional[int]]:
        """How many latents are alive, dead and dense; dead and dense are ``None`` without ``full_state.pt``.

        Dead: silent for the run's ``dead_window_steps`` up to its last collected step (never fired, while the
        collection is shorter than that). Dense: firing on more than 10% of the tokens seen.
        """
        state = self._full_state()
        if state is None:
            return self.summary.alive_features, None, None
        return health_counts(state["count"], state["last_step"], int(state["tokens_seen"]), self.summary.dead_before)

    # ------------------------------------------------------------------ loading
    def _read(self, samples_dir: PathLike) -> None:
        """The summary and every saved feature file (``full_state.pt`` is read on first use, from the same save)."""
        _close_all(self._pinned)  # of a read a commit overlapped
        self.directory = read_samples_dir(samples_dir)
        single = self.directory.full_state_path
        if single is not None and single.name != FULL_STATE_NAME:
            single = None  # a full state in parts: each part is read on its own, checked against this save
        for name, path in ((FULL_STATE_NAME, single), (HISTORY_NAME, self.directory.history_path)):
            opened = pin(path)
            if opened is not None:
                self._pinned[name] = opened
        try:
            self.summary = RunSummary.from_json(
                self.directory.summary, self.directory.path, self.directory.full_state_path is not None
            )
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as err:
            raise SamplesDirectoryError(
                f"{self.directory.path / 'collection_summary.json'} is not a valid samples summary"
                f" ({type(err).__name__}: {err}). Re-run the save, or point to a directory the callback wrote."
            ) from err
        self._saved = {idx: self._load_feature_file(idx) for idx in self.summary.saved_features}
        self._history: Any = _UNREAD

    def _load_feature_file(self, idx: int) -> FeatureSamples:
        path = self.directory.feature_files.get(idx)
        if path is None:
            raise SamplesDirectoryError(
                f"{self.directory.path} lists feature {idx} in its summary but its file"
                f" feature_{idx:05d}_samples.json is missing. The directory is incomplete; re-run the save."
            )
        record = load_json(path)
        try:
            stats = FeatureStats.from_json(record["statistics"])
            samples = tuple(Sample.from_json(s) for s in record["top_samples"])
            effects = record.get("logit_effects")
            effects = None if effects is None else LogitEffects.from_json(idx, effects)
            groups = tuple(
                IntervalGroup.from_json(g, first=n == 0) for n, g in enumerate(record.get("interval_samples") or [])
            )
            recent = tuple(Sample.from_json(s) for s in record.get("recent_samples") or [])
            kept_counts, kept = _activating_tokens(record.get("activating_tokens"))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as err:
            raise SamplesDirectoryError(
                f"{path} is not a valid feature samples file ({type(err).__name__}: {err})."
                " The file is corrupt; re-run the save."
            ) from err
        if stats.feature_idx != idx or any(s.feature_idx != idx for s in samples):
            raise SamplesDirectoryError(f"{path} holds samples of another feature than {idx} (`feature_idx`).")
        if stats.tokens_seen != self.summary.tokens_seen:
            raise SamplesDirectoryError(
                f"{path} was written after {stats.tokens_seen} tokens (`statistics.tokens_seen`) but"
                f" {self.directory.path / SUMMARY_NAME} after {self.summary.tokens_seen} (`tokens_seen`): the"
                " directory mixes two saves. Re-run the save."
            )
        return FeatureSamples(
            stats, samples, saved=True, logit_effects=effects, interval_groups=groups, recent_samples=recent,
            kept_token_counts=kept_counts, kept_samples=kept,
        )

    def _full_state(self) -> Optional[dict]:
        if self._state is None and self.directory.full_state_path is not None:
            path = self.directory.full_state_path
            state = self._read_pinned(FULL_STATE_NAME, lambda opened: load_full_state(path, opened))
            missing = [k for k in _FULL_STATE_KEYS if not isinstance(state, dict) or k not in state]
            if missing:
                raise SamplesDirectoryError(f"{path} is not a full collector state: it lacks {missing}.")
            if int(state["num_latents"]) != self.summary.num_features_tracked:
                raise SamplesDirectoryError(
                    f"{path} tracks {int(state['num_latents'])} latents but {self.directory.path / SUMMARY_NAME} says"
                    f" {self.summary.num_features_tracked} (`num_features_tracked`); the directory mixes two runs."
                )
            if int(state["tokens_seen"]) != self.summary.tokens_seen:
                raise SamplesDirectoryError(
                    f"{path} holds a collection of {int(state['tokens_seen'])} tokens (`tokens_seen`) but"
                    f" {self.directory.path / SUMMARY_NAME} one of {self.summary.tokens_seen}: the directory mixes"
                    " two saves. Re-run the save."
                )
            self._state = state
        return self._state

    def _read_pinned(self, name: str, load: Callable[[Optional[IO[bytes]]], _T]) -> _T:
        """``load`` the file ``name`` of this analyzer's save: from the handle opened with the save, else by path.

        By path, the directory must still hold this analyzer's save (else :class:`SaveChangedError`).
        """
        opened = self._pinned.pop(name, None)
        if opened is not None:
            with opened:
                return load(opened)
        self._check_same_save()
        try:
            loaded, signature = read_one_save(self.directory.path, lambda: load(None))
        except SamplesDirectoryError:
            self._check_same_save()  # the file was moved or removed by a later save: say so, not "corrupt"
            raise
        self._check_same_save(signature)
        return loaded

    def _state_of(self, idx: int) -> tuple[Optional[dict], int]:
        """The state that holds latent ``idx`` and the latent's index in it.

        Of a full state in parts, only the part the latent lives in is opened (each part once); else the full state.
        """
        path = self.directory.full_state_path
        if self._state is not None or path is None or path.name != FULL_STATE_INDEX_NAME:
            return self._full_state(), idx
        for start, part in self._parts.items():
            if start <= idx < start + int(part["num_latents"]):
                return part, idx - start
        self._check_same_save()
        try:
            (part, start), signature = read_one_save(
                self.directory.path, lambda: load_part_of(path, idx, part_locator(path)))
        except SamplesDirectoryError:
            self._check_same_save()
            raise
        self._check_same_save(signature)
        if int(part["tokens_seen"]) != self.summary.tokens_seen:
            raise SamplesDirectoryError(
                f"The part of {path} that holds latent {idx} is of a collection of {int(part['tokens_seen'])} tokens"
                f" but {self.directory.path / SUMMARY_NAME} one of {self.summary.tokens_seen}: the directory mixes"
                " two saves. Re-run the save."
            )
        self._parts[start] = part
        return part, idx - start

    def _check_same_save(self, signature: Optional[tuple] = None) -> None:
        """Raise :class:`SaveChangedError` if the directory no longer holds the save this analyzer read."""
        if (signature or save_signature(self.directory.path)) != self._signature:
            raise SaveChangedError(
                f"{self.directory.path}: a save was committed while reading; retry (this analyzer read the save of"
                f" step {self.summary.global_step}: open a new ActivationSampleAnalyzer for the full_state.pt of"
                " the current one)."
            )

    @property
    def recorded_tokenizer(self) -> Optional[str]:
        """The tokenizer name or local path the run recorded (``config["tokenizer"]``), if any."""
        name = self.summary.config.get("tokenizer")
        return name if isinstance(name, str) and name.strip() else None

    def _load_recorded_tokenizer(self) -> None:
        """Load the run's recorded tokenizer from local files only (never the network), once."""
        if self._recorded_tokenizer_tried:
            return
        self._recorded_tokenizer_tried = True
        name = self.recorded_tokenizer
        if name is None:
            self._tokenizer_problem = "the run recorded no tokenizer name or path"
            return
        try:
            self.tokenizer = load_tokenizer(name, local_only=True)
        except Exception as err:  # noqa: BLE001 - any failure leaves the ids undecoded, with the reason kept
            self._tokenizer_problem = f"its recorded tokenizer {name!r} cannot be loaded from local files ({err})"

    @property
    def decoding_note(self) -> Optional[str]:
        """Why some token ids were shown as ``[12575]``, and how to fix it; ``None`` when every token was decoded.

        Only latents that ``full_state.pt`` alone holds need decoding: their token strings come from the
        tokenizer passed in, else the run's recorded one (local files only), else the strings the saved
        feature files show.
        """
        if not self._undecoded_ids:
            return None
        reason = self._tokenizer_problem or "no tokenizer was given"
        count = len(self._undecoded_ids)
        return (
            f"{count} token id{'s' if count != 1 else ''} could not be decoded and show as [id]: {reason}."
            " Pass the tokenizer's name or local folder (command line: --tokenizer NAME_OR_PATH; Python:"
            " ActivationSampleAnalyzer(..., tokenizer=...))."
        )

    def _decoder(self) -> Any:
        self._load_recorded_tokenizer()
        if self.tokenizer is not None:
            return TokenDecoder(self.tokenizer)
        strings: dict[int, str] = {}
        for feature in self._saved.values():
            groups = (feature.samples, feature.recent_samples, *(g.samples for g in feature.interval_groups))
            for sample in (s for group in groups for s in group):
                strings.update((t.token_id, t.text) for t in sample.context if not is_undecoded(t.text))
        return _KnownTokenStrings(strings, self._undecoded_ids)

    def _state_stats(self, state: dict, idx: int) -> FeatureStats:
        try:
            return FeatureStats.from_json(feature_statistics(state, idx))
        except ValueError as err:  # a checked state gives none; say where, should one get through
            raise SamplesDirectoryError(
                f"{self.directory.full_state_path} gives latent {idx} statistics out of range ({err})."
            ) from err

    def _state_samples(self, state: dict, idx: int, start: int, stop: int) -> list[Sample]:
        if stop <= start:
            return []
        decoder = self._decoder()
        decoder.prepare(window_token_ids(state, "top", [idx], stop).tolist())
        records = sample_records(state, idx, stop, decoder)
        try:
            return [Sample.from_json(r) for r in records[start:]]
        except ValueError as err:  # a checked state gives none; say where, should one get through
            raise SamplesDirectoryError(
                f"{self.directory.full_state_path} gives latent {idx} a bad sample ({err})."
            ) from err

    def _state_groups(
        self, state: dict, idx: int
    ) -> tuple[tuple[IntervalGroup, ...], tuple[Sample, ...], Optional[float]]:
        """Interval groups, recent samples and recent overlap of a latent, as a feature file would hold them.

        Built by :func:`~lightning_sae_samples.samples_dir.serialize.sample_groups` with the run's
        ``samples_per_feature_to_save``, so ``recent_overlap`` is the value the writer would record.
        """
        if "interval" not in state and "recent" not in state:
            return (), (), None
        if self._view is None or self._view[0] is not state:
            self._view = (state, with_recent_view(state))
        view = self._view[1]
        limit = int(self.summary.config.get("samples_per_feature_to_save") or state["top"]["capacity"])
        decoder = self._decoder()
        ids = [window_token_ids(view, p, [idx], limit) for p in ("top", "recent", "interval") if p in view]
        decoder.prepare(torch.cat(ids).unique().tolist())
        raw = sample_groups(view, idx, limit, decoder)
        groups = tuple(
            IntervalGroup.from_json(g, first=n == 0) for n, g in enumerate(raw.get("interval_samples") or [])
        )
        recent = tuple(Sample.from_json(r) for r in raw.get("recent_samples") or [])
        return groups, recent, raw.get("recent_overlap")

    # ------------------------------------------------------------------ meaning: explanations and neighbours
    def decoder_directions(self) -> Optional[torch.Tensor]:
        """The unit decoder rows ``[F, d_model]`` of ``decoder_directions.pt`` (validated, memory-mapped), or ``None``.

        Raises:
            SamplesDirectoryError: The file is corrupt or does not fit the run.
        """
        if self._directions is None and self.directory.decoder_path is not None:
            self._directions = load_decoder_directions(self.directory.decoder_path, self.num_features)
        return self._directions

    def explanations(self) -> dict[int, Any]:
        """The latest explanation record per latent from the sidecar (``explanations/explanations.jsonl``), read once.

        Raises:
            SamplesDirectoryError: A line of the sidecar is not a valid record.
        """
        if self._explanations is None:
            from lightning_sae_samples.analysis.explanations import read_explanations, read_labels

            self._explanations = read_explanations(self.directory.path)
            self._labels = read_labels(self.directory.path)
        return self._explanations

    def meaning(self, feature_idx: int) -> Optional[Meaning]:
        """A latent's explanation, score and label from the sidecar, or ``None`` when it has neither."""
        record = self.explanations().get(feature_idx)
        label = self._labels.get(feature_idx)
        if record is None and label is None:
            return None
        if record is None:
            return Meaning(label=label.text)
        return Meaning(
            explanation=record.text, score=record.score, score_contexts=record.score_contexts,
            random_score=record.random_score, embedding_score=record.embedding_score,
            embedding_contexts=record.embedding_contexts, embedding_random_score=record.embedding_random_score,
            model=record.model, samples_step=record.samples_step,
            stale=record.samples_step < self.summary.global_step, label=None if label is None else label.text,
        )

    def _latent_tokens(self, idx: int, limit: int = 3) -> tuple[str, ...]:
        saved = self._saved.get(idx)
        if saved is not None:
            return tuple(text for text, _ in saved.top_tokens(limit))
        state = self._full_state()
        if state is None:
            return ()
        counts = Counter(s.activating_token.text for s in self._state_samples(state, idx, 0, 10))
        return tuple(text for text, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:limit])

    def neighbours(self, features: Iterable[int], k: int = 5) -> dict[int, tuple[NeighbourInfo, ...]]:
        """Each latent's ``k`` latents of closest decoder direction (cosine), with their explanation or top tokens.

        One chunked pass over ``decoder_directions.pt`` for all of ``features`` (empty tuples without the file).
        """
        from lightning_sae_samples.analysis.neighbours import nearest_latents_of

        indices = [self._check_index(f) for f in features]
        directions = self.decoder_directions()
        if directions is None or k < 1:
            return {i: () for i in indices}
        found = nearest_latents_of(directions, indices, k)
        out = {}
        for idx, near in zip(indices, found):
            infos = []
            for n in near:
                meaning = self.meaning(n.feature_idx)
                text = meaning and (meaning.label or meaning.explanation)
                infos.append(NeighbourInfo(n.feature_idx, n.cosine, text or None,
                                           () if text else self._latent_tokens(n.feature_idx)))
            out[idx] = tuple(infos)
        return out

    def with_meaning(self, features: list[FeatureSamples], neighbours: int = 5) -> list[FeatureSamples]:
        """``features`` with their explanations, labels and ``neighbours`` nearest latents attached."""
        near = self.neighbours([f.feature_idx for f in features], neighbours)
        return [
            dataclasses.replace(f, meaning=self.meaning(f.feature_idx), neighbours=near[f.feature_idx])
            for f in features
        ]

    # ------------------------------------------------------------------ accessors
    @property
    def num_features(self) -> int:
        """Number of latents the run tracked."""
        return self.summary.num_features_tracked

    @property
    def saved_features(self) -> list[int]:
        """Indices with a feature file, in the run's rank order."""
        return list(self.summary.saved_features)

    def _check_rank(self, rank_by: Optional[str]) -> str:
        rank = rank_by or self.summary.rank_by
        if rank not in RANK_CHOICES:
            raise ValueError(f"`rank_by` must be one of {', '.join(RANK_CHOICES)}; got {rank!r}.")
        return rank

    def features(self, rank_by: Optional[str] = None, limit: Optional[int] = None) -> list[FeatureStats]:
        """Statistics of the latents that fired, best first.

        With ``full_state.pt`` every latent that fired is listed; otherwise only the saved ones.

        Args:
            rank_by: ``"max_activation"``, ``"activation_count"`` or ``"frequency"``; default: the run's
                ``rank_features_by``.
            limit: Return at most this many.
        """
        rank = self._check_rank(rank_by)
        saved_cover = (
            self.directory.full_state_path is None
            or len(self._saved) >= self.summary.alive_features
            or (rank == self.summary.rank_by and limit is not None and limit <= len(self._saved))
        )
        if saved_cover:
            stats = [self._saved[i].stats for i in self.summary.saved_features]
            if rank != self.summary.rank_by:
                key = "max_activation" if rank == "max_activation" else "activation_count"
                stats.sort(key=lambda s: (-getattr(s, key), s.feature_idx))
            return stats if limit is None else stats[:limit]
        state = self._full_state()
        assert state is not None
        ranked = rank_features(state, rank, limit).tolist()
        return [
            self._saved[i].stats if i in self._saved else self._state_stats(state, i)
            for i in ranked
        ]

    def feature(self, feature_idx: int, num_examples: Optional[int] = None) -> FeatureSamples:
        """Statistics, top samples and sample groups of one latent.

        The interval groups, recent samples and ``recent_overlap`` come from its feature file, or, for a
        latent only ``full_state.pt`` holds, are built from it exactly as the writer builds a feature file.

        Args:
            feature_idx: Latent index.
            num_examples: Samples wanted; default: those in its feature file (or all kept ones for a
                latent only ``full_state.pt`` holds). More than the file holds are read from
                ``full_state.pt`` when present. Also caps the recent samples (not the interval groups,
                which hold ``samples_per_interval`` each).

        Raises:
            UnknownFeatureError: The index is out of range, or it has no feature file and there is no
                ``full_state.pt``.
        """
        return dataclasses.replace(self._feature(feature_idx, num_examples), story=self._story(feature_idx))

    @property
    def history(self) -> Optional[FeatureHistory]:
        """Every latent's windows through training (``training_history.pt``), or ``None`` when the run has none.

        Raises:
            SamplesDirectoryError: The history file is corrupt or hostile.
            SaveChangedError: Where files cannot be held open (not POSIX): a save was committed since this
                analyzer read its save (as for ``full_state.pt``).
        """
        if self._history is _UNREAD:
            path = self.directory.history_path
            if path is None:
                self._history = None
                return None
            self._history = self._read_pinned(HISTORY_NAME, lambda opened: FeatureHistory.from_file(path, opened))
        return self._history

    def _story(self, feature_idx: int) -> Optional[str]:
        history = self.history
        return None if history is None else story_line(history, int(feature_idx))

    def _feature(self, feature_idx: int, num_examples: Optional[int]) -> FeatureSamples:
        idx = self._check_index(feature_idx)
        saved = self._saved.get(idx)
        state, local = None, idx
        if saved is None or (num_examples is not None and num_examples > len(saved.samples)):
            if saved is None or saved.stats.num_samples > len(saved.samples):
                state, local = self._state_of(idx)
        if saved is not None:
            samples = list(saved.samples[:num_examples] if num_examples is not None else saved.samples)
            if state is not None and num_examples is not None:
                more = self._state_samples(state, local, len(samples), num_examples)
                samples += [dataclasses.replace(s, feature_idx=idx) for s in more]
            effects = self._computed_effects.get(idx, saved.logit_effects)
            recent = saved.recent_samples if num_examples is None else saved.recent_samples[:num_examples]
            return dataclasses.replace(saved, samples=tuple(samples), logit_effects=effects, recent_samples=recent)
        if state is None:
            raise UnknownFeatureError(
                f"Feature {idx} has no saved samples in {self.directory.path} and there is no full_state.pt"
                f" to read it from. {self._nearby_message(idx)}"
            )
        if local != idx:  # a latent of a full state in parts, read from its part
            numbered = _numbered(self._state_feature(state, local, num_examples), idx)
            return dataclasses.replace(numbered, logit_effects=self._computed_effects.get(idx))
        return self._state_feature(state, idx, num_examples)

    def _state_feature(self, state: dict, idx: int, num_examples: Optional[int]) -> FeatureSamples:
        """A latent's samples as the writer would build its feature file from ``state`` (latent ``idx`` of it)."""
        stats = self._state_stats(state, idx)
        limit = stats.num_samples if num_examples is None else min(num_examples, stats.num_samples)
        samples = tuple(self._state_samples(state, idx, 0, limit))
        groups, recent, overlap = self._state_groups(state, idx)
        if overlap is not None:
            stats = dataclasses.replace(stats, recent_overlap=float(overlap))
        ids, counts, kept = activating_token_counts(state, idx)  # as the writer's `activating_tokens`
        decoder = self._decoder()
        decoder.prepare(ids.tolist())
        return FeatureSamples(
            stats,
            samples,
            kept_token_counts=tuple(
                (t, decoder.token_str(t), n)
                for t, n in zip(ids[:ACTIVATING_TOKENS_LISTED].tolist(), counts[:ACTIVATING_TOKENS_LISTED].tolist())
            ),
            kept_samples=kept,
            saved=False,
            logit_effects=self._computed_effects.get(idx),
            interval_groups=groups,
            recent_samples=recent if num_examples is None else recent[:num_examples],
        )

    def _check_index(self, feature_idx: Any) -> int:
        try:
            idx = int(feature_idx)
        except (TypeError, ValueError):
            idx = -1
        if isinstance(feature_idx, bool) or idx != feature_idx or not 0 <= idx < self.num_features:
            raise UnknownFeatureError(
                f"Feature {feature_idx!r} does not exist: valid indices are 0 to {self.num_features - 1}."
                f" {self._nearby_message(idx if idx == feature_idx else 0)}"
            )
        return idx

    def _nearby_message(self, idx: int, count: int = 5) -> str:
        saved = self.summary.saved_features
        if not saved:
            return "No feature was saved (no latent fired above the threshold)."
        near = sorted(sorted(saved, key=lambda s: (abs(s - idx), s))[:count])
        return f"Saved features near {idx}: {', '.join(map(str, near))} ({len(saved)} saved in all)."

    def top_features(
        self,
        top_k: int = 50,
        examples_per_feature: int = 10,
        rank_by: Optional[str] = None,
        progress: bool = False,
        neighbours: int = 5,
    ) -> list[FeatureSamples]:
        """The ``top_k`` best latents with up to ``examples_per_feature`` samples each.

        Each comes with its explanation and label (:meth:`meaning`) and its ``neighbours`` nearest latents by
        decoder direction (when the run saved ``decoder_directions.pt``).

        Args:
            top_k: Number of latents.
            examples_per_feature: Samples per latent.
            rank_by: Ranking (default: the run's).
            progress: Show a progress bar on stderr.
            neighbours: Neighbours per latent (0: none).
        """
        if top_k < 0 or examples_per_feature < 0:
            raise ValueError("`top_k` and `examples_per_feature` must be >= 0.")
        ranked = self.features(rank_by, top_k)
        features = [
            self.feature(s.feature_idx, examples_per_feature)
            for s in progress_bar(ranked, progress, "Reading features")
        ]
        return self.with_meaning(features, neighbours)

    def logit_effects(
        self,
        W_dec: Any,  # noqa: N803 - the usual name of the matrix
        W_U: Any,  # noqa: N803
        k: int = 10,
        tokenizer: Any = None,
        features: Optional[Iterable[int]] = None,
    ) -> dict[int, LogitEffects]:
        """The tokens each latent's decoder direction promotes and suppresses most (``W_dec[j] @ W_U``).

        One matrix product per chunk of latents; each distinct token is decoded once. The results are
        also attached to this analyzer's features, so :meth:`feature` and every report show them.

        Example::

            effects = analyzer.logit_effects(sae.W_dec, lm.lm_head.weight.T, k=10)
            [t.token for t in effects[42].promoted]

        Args:
            W_dec: Decoder ``[F, d_model]`` (a tensor, or a function of no argument returning ``(W_dec, W_U)``
                when ``W_U`` is ``None``).
            W_U: Unembedding ``[d_model, vocab]`` (for a Hugging Face model: ``lm_head.weight.T``).
            k: Tokens per side.
            tokenizer: Tokenizer object or name for the token strings; default: the analyzer's tokenizer,
                else the strings known from the saved feature files, else token ids.
            features: Latent indices; default: the saved features.

        Returns:
            Latent index to its :class:`~lightning_sae_samples.logit_effects.LogitEffects`.

        Raises:
            ValueError: A shape does not fit (the message says which transpose fixes it), or ``k`` < 1.
        """
        if W_U is None and callable(W_dec):
            W_dec, W_U = W_dec()
        from lightning_sae_samples.analysis.logit_effects import check_matrices

        check_matrices(W_dec, W_U, self.num_features)
        indices = self.saved_features if features is None else [self._check_index(f) for f in features]
        if tokenizer is not None:
            decoder: Any = TokenDecoder(load_tokenizer(tokenizer))
        elif self.tokenizer is not None:
            decoder = TokenDecoder(self.tokenizer)
        else:
            decoder = self._decoder()
        effects = compute_logit_effects(W_dec, W_U, indices, k, decoder=decoder)
        self._computed_effects.update(effects)
        return effects

    # ------------------------------------------------------------------ export
    def to_dataframe(
        self,
        level: str = "feature",
        features: Optional[Iterable[int]] = None,
        num_examples: Optional[int] = None,
        groups: Optional[Iterable[str]] = None,
    ) -> Any:
        """A pandas DataFrame with one row per feature or one row per sample (schema: ``docs/export.md``).

        Example::

            samples = analyzer.to_dataframe("sample")
            samples[samples.feature_idx == 42][["activation_value", "token", "context_text"]]

        Args:
            level: ``"feature"`` (statistics, histogram, logit effects) or ``"sample"`` (activating token and
                context window as list columns).
            features: Latent indices, in the order wanted; default: the saved features in rank order.
            num_examples: Samples per feature for ``"sample"``; default: those in its feature file.
            groups: Sample groups for ``"sample"`` (``"top"``, ``"interval"``, ``"recent"``); default: all.

        Raises:
            ImportError: pandas is not installed (``pip install pandas``).
            ValueError: ``level`` is neither ``"feature"`` nor ``"sample"``.
        """
        from lightning_sae_samples.analysis.export import to_dataframe

        return to_dataframe(self, level, features, num_examples, groups=groups)

    def export(
        self,
        out_dir: PathLike,
        format: str = "jsonl",  # noqa: A002 - the command line's name too
        features: Optional[Iterable[int]] = None,
        num_examples: Optional[int] = None,
        groups: Optional[Iterable[str]] = None,
    ) -> dict[str, Path]:
        """Write ``features.<ext>``, ``samples.<ext>`` and ``summary.json`` into ``out_dir`` (``docs/export.md``).

        Args:
            out_dir: Output folder, created if missing.
            format: ``"jsonl"`` (JSON Lines) or ``"parquet"`` (needs pyarrow).
            features: Latent indices; default: the saved features in rank order.
            num_examples: Samples per feature; default: those in its feature file.
            groups: Sample groups to write (``"top"``, ``"interval"``, ``"recent"``); default: all.

        Returns:
            The written paths by table name (``"features"``, ``"samples"``, ``"summary"``).
        """
        from lightning_sae_samples.analysis.export import export_samples

        return export_samples(self, out_dir, format, features, num_examples, groups=groups)

    # ------------------------------------------------------------------ reports
    def print_feature_report(self, feature_idx: int, num_examples: int = 10, console: Any = None) -> None:
        """Print a latent's statistics, histogram, highlighted examples, interval and recent samples.

        Args:
            feature_idx: Latent index.
            num_examples: Examples to show.
            console: A ``rich.console.Console``; default: a new one on stdout.

        Raises:
            UnknownFeatureError: See :meth:`feature`.
        """
        from lightning_sae_samples.render.console import print_feature

        feature = self.with_meaning([self.feature(feature_idx, num_examples)])[0]
        print_feature(feature, console=console, recent_window=self.summary.recent_window)

    def print_summary(self, top_k: int = 20, rank_by: Optional[str] = None, console: Any = None) -> None:
        """Print the run summary and a table of the top latents.

        Args:
            top_k: Rows in the table.
            rank_by: Ranking (default: the run's).
            console: A ``rich.console.Console``; default: a new one on stdout.
        """
        if self.run is not None:
            self.run.print_summary(console)
            return
        from lightning_sae_samples.render.console import print_summary

        rank = self._check_rank(rank_by)
        print_summary(self.summary, self.top_features(top_k, 10, rank), rank, console=console)

    def render_report(
        self,
        kind: str,
        top_k_features: int = 50,
        examples_per_feature: int = 10,
        rank_by: Optional[str] = None,
        progress: bool = False,
    ) -> str:
        """A report as a string: run summary, top-feature table, one section per feature.

        Args:
            kind: ``"markdown"`` or ``"html"`` (self-contained: inline CSS and SVG, no network access).
            top_k_features: Features in the report.
            examples_per_feature: Examples per feature.
            rank_by: ``"max_activation"``, ``"activation_count"`` or ``"frequency"`` (default: the run's).
            progress: Show a progress bar on stderr.
        """
        module, function = _RENDERERS[choice(kind, "kind", _RENDERERS)]
        render = getattr(import_module(module), function)
        rank = self._check_rank(rank_by)
        features = self.top_features(top_k_features, examples_per_feature, rank, progress)
        return render(self.summary, features, rank, template_dir=self.template_dir)

    def render_markdown(self, *args: Any, **kwargs: Any) -> str:
        """The Markdown report as a string; the arguments of :meth:`render_report` after ``kind``."""
        return self.render_report("markdown", *args, **kwargs)

    def render_html(self, *args: Any, **kwargs: Any) -> str:
        """The HTML report as a string; the arguments of :meth:`render_report` after ``kind``."""
        return self.render_report("html", *args, **kwargs)

    def generate_interpretability_report(self, output_path: PathLike, *args: Any, **kwargs: Any) -> Path:
        """Write the Markdown report to ``output_path`` (atomically) and return the path; see :meth:`render_report`.

        For a run folder of many SAEs: each SAE's report beside it and an index page linking them at ``output_path``
        (:meth:`RunAnalyzer.generate_interpretability_report`).
        """
        if self.run is not None:
            return self.run.generate_interpretability_report(output_path, *args, **kwargs)
        return write_text_file(output_path, self.render_markdown(*args, **kwargs))

    def generate_html_report(self, output_path: PathLike, *args: Any, **kwargs: Any) -> Path:
        """Write the HTML report to ``output_path`` (atomically) and return the path; see :meth:`render_report`.

        For a run folder of many SAEs: each SAE's report beside it and an index page linking them at ``output_path``
        (:meth:`RunAnalyzer.generate_html_report`).
        """
        if self.run is not None:
            return self.run.generate_html_report(output_path, *args, **kwargs)
        return write_text_file(output_path, self.render_html(*args, **kwargs))


def _activating_tokens(record: Any) -> tuple[tuple[tuple[int, str, int], ...], int]:
    """A feature file's ``activating_tokens`` as ``(kept_token_counts, kept_samples)``; ``((), 0)`` when absent."""
    if record is None:  # files of earlier versions
        return (), 0
    kept = int(record["over"])
    counts = tuple((int(t["token_id"]), t["token"], int(t["samples"])) for t in record["tokens"])
    if kept < 0 or any(not isinstance(text, str) or not 0 < n <= kept for _, text, n in counts):
        raise ValueError("`activating_tokens` holds a token that is not a string or a count outside 1..`over`")
    return counts, kept


def _numbered(feature: FeatureSamples, idx: int) -> FeatureSamples:
    """``feature`` (read from a part of a full state, under the part's numbering) as latent ``idx`` of the SAE."""

    def samples(group: tuple[Sample, ...]) -> tuple[Sample, ...]:
        return tuple(dataclasses.replace(s, feature_idx=idx) for s in group)

    return dataclasses.replace(
        feature, stats=dataclasses.replace(feature.stats, feature_idx=idx), samples=samples(feature.samples),
        recent_samples=samples(feature.recent_samples),
        interval_groups=tuple(dataclasses.replace(g, samples=samples(g.samples)) for g in feature.interval_groups),
    )
