"""Every collection setting, once: its type, default, documentation and check.

:class:`CollectionConfig` is what :class:`~lightning_sae_samples.ActivationSampleCollector` and the tensor
engine read; :class:`CallbackConfig` adds what only :class:`~lightning_sae_samples.ActivationSampleCallback`
decides (when to collect, which outputs to read, health metrics, saves). Each field's docstring is its
documentation: the classes' ``Args:`` sections (what ``help()``, LightningCLI and ``--help`` show) and the
README's table are made from them.

Field metadata says where a setting goes besides the object itself:

- ``state``: its key among the run-level entries of a collector state (checkpoint and ``full_state.pt``);
  the engine builds from these and ``merge_states`` requires them equal.
- ``merge``: two states merge only if their values are equal (the threshold shows in the histogram edges).
- ``resume``: a resumed collection must have the same value as the one that wrote the checkpoint (its config
  block). ``activation_threshold`` is checked against the checkpoint's collection instead, the value its counts
  were made with (a checkpoint that collected nothing yet resumes at any threshold).
- ``summary=False``: not recorded in ``collection_summary.json``'s ``config`` block.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import torch

from lightning_sae_samples.arguments import (
    choice,
    finite_float,
    integer,
    optional_positive_int,
    positive_int,
    token_ids,
)
from lightning_sae_samples.schedule import CollectionSchedule

RankBy = Literal["max_activation", "activation_count", "frequency"]
OnSaveError = Literal["log", "raise"]
SaveFullState = Literal["every", "end", "never"]
Loop = Literal["train", "validate", "test", "predict"]
RowWindows = Literal["auto", "tokens", "refs"]

#: Most history windows per level: with at most 63 levels it bounds what thinning keeps, and so what a reader of
#: ``training_history.pt`` accepts before it builds anything per window.
MAX_HISTORY_WINDOWS_PER_LEVEL = 256


def _engine(state_key: str, resume: bool = True, merge: bool = False) -> dict[str, Any]:
    return {"state": state_key, "resume": resume, "merge": merge}


@dataclass
class CollectionConfig:
    """What to keep for every latent, and what each save writes."""

    num_latents: Optional[int] = field(default=None, metadata=_engine("num_latents", resume=False, merge=True))
    """Latent count ``F`` of the SAE.

    Needed for sparse latents unless the callback finds it on the module; inferred from dense ones."""

    max_samples_per_feature: int = field(default=100, metadata=_engine("max_samples", merge=True))
    """Top samples kept in memory per latent."""

    context_size: int = field(default=20, metadata=_engine("context_size", merge=True))
    """Context tokens kept around the activating one, ``context_size // 2`` on each side.

    Windows are clipped at the sequence's edges and at padding."""

    activation_threshold: float = field(default=0.1, metadata=_engine("threshold", resume=False))
    """An activation counts only if strictly greater than this."""

    top_features_to_save: int = 100
    """Features written as JSON files at each save, best first by ``rank_features_by``."""

    samples_per_feature_to_save: int = 10
    """Samples written per feature file (the full-state file keeps all)."""

    rank_features_by: RankBy = "max_activation"
    """How saved features are ranked: ``"max_activation"``, ``"activation_count"`` or ``"frequency"``."""

    samples_per_interval: int = field(default=2, metadata=_engine("samples_per_interval", merge=True))
    """Random samples kept per latent from each activation interval, besides the top (0: none).

    The intervals are half-decades above the threshold; the samples are drawn uniformly among the activations
    that fell in an interval, reproducibly for a ``seed`` and across processes and resumes."""

    num_intervals: int = field(default=8, metadata=_engine("num_intervals"))
    """Number of activation intervals for ``samples_per_interval``."""

    recent_window_steps: Optional[int] = field(default=None, metadata=_engine("recent_window_steps", merge=True))
    """Also keep each latent's top samples of the last one to two blocks of this many steps (``None``: off).

    Feature files then show them and ``recent_overlap``, the share of activating tokens they have in common with
    the all-time top (low when the latent's meaning moved)."""

    recent_samples_per_feature: Optional[int] = field(default=None, metadata=_engine("recent_samples"))
    """Samples kept per latent for the recent window (default: ``samples_per_feature_to_save``)."""

    seed: int = field(default=0, metadata=_engine("seed"))
    """Seed of the interval sampling."""

    deduplicate_contexts: bool = field(default=False, metadata=_engine("deduplicate_contexts", merge=True))
    """Keep no two top (or recent) samples of a latent with overlapping windows or identical contexts.

    The kept set is the exact top-k under that rule (see :mod:`lightning_sae_samples.engine.dedup`). Useful on
    repetitive text."""

    history_samples_per_feature: int = field(default=3, metadata=_engine("history_samples", merge=True))
    """Top samples kept per latent for the current history window (between two saves); 0: none.

    Each save adds the window's count, max, mean and top tokens of every latent that fired to
    ``training_history.pt``, and these samples for the saved features (see ``docs/history.md``)."""

    history_top_tokens: int = 5
    """Most frequent activating token ids recorded per latent and history window, with their counts."""

    history_windows_per_level: int = 4
    """History windows kept per level before the two oldest of a level merge into one twice as long.

    A save adds a window of level 0; older windows are thinned so that ``n`` saves keep about
    ``history_windows_per_level * log2(n)`` windows (see ``docs/history.md``). At most 256."""

    exclude_token_ids: Sequence[int] = ()
    """Token ids never collected, such as BOS/CLS/SEP (attention sinks would fill the tops).

    No statistics and no sample are centred there, but they count in ``tokens_seen`` and show in other samples'
    contexts."""

    row_windows: RowWindows = "auto"
    """How a kept sample of a shuffled row holds its context window: ``"auto"``, ``"tokens"`` or ``"refs"``.

    ``"tokens"`` stores the window's ``context_size + 1`` token ids per kept sample; ``"refs"`` stores only the
    row's token ref (8 bytes) and reads the windows from the token source when the samples are written, which
    needs an ``ArrayTokenSource`` (its refs are global and permanent; a ``TokenRing``'s leave the ring). ``"auto"``:
    refs with an array source, tokens otherwise. Either way the written windows are the same (see
    ``docs/rows.md``)."""

    write_report: bool = field(default=True, metadata={"summary": False})
    """Also write ``interpretability_report.md`` into the samples directory at each save."""

    state_device: Optional[Union[str, torch.device]] = field(default=None, metadata={"summary": False})
    """Keep the collection on this device, e.g. ``"cpu"`` for an SAE that fills the GPU (default: the latents').

    Each collection then copies there only the active entries and the context windows of those that may enter
    the kept samples."""

    def __post_init__(self) -> None:
        self._check_sizes()
        self._check_choices()

    def _check_sizes(self) -> None:
        self.num_latents = optional_positive_int(self.num_latents, "num_latents", "It is the SAE's latent count F.")
        self.max_samples_per_feature = positive_int(
            self.max_samples_per_feature, "max_samples_per_feature", "Keep at least one sample per latent, e.g. 100."
        )
        self.context_size = positive_int(
            self.context_size, "context_size", "Use 0 for the activating token alone, e.g. 20 for ten each side.", 0
        )
        self.activation_threshold = finite_float(
            self.activation_threshold, "activation_threshold",
            "Use e.g. 0.1; only activations strictly above it count.",
        )
        self.top_features_to_save = positive_int(
            self.top_features_to_save, "top_features_to_save", "It is how many feature files each save writes.", 0
        )
        self.samples_per_feature_to_save = positive_int(
            self.samples_per_feature_to_save, "samples_per_feature_to_save", "Use e.g. 10."
        )
        if self.samples_per_feature_to_save > self.max_samples_per_feature:
            raise ValueError(
                f"`samples_per_feature_to_save` ({self.samples_per_feature_to_save}) cannot exceed"
                f" `max_samples_per_feature` ({self.max_samples_per_feature}): raise the latter or lower the former."
            )
        self.samples_per_interval = positive_int(
            self.samples_per_interval, "samples_per_interval", "Use 0 to keep no interval samples, e.g. 2.", 0
        )
        self.num_intervals = positive_int(self.num_intervals, "num_intervals", "Use e.g. 8 half-decade intervals.")
        self.recent_window_steps = optional_positive_int(
            self.recent_window_steps, "recent_window_steps", "Use a window of several collection steps, or None."
        )
        if self.recent_samples_per_feature is None:
            self.recent_samples_per_feature = self.samples_per_feature_to_save
        self.recent_samples_per_feature = positive_int(
            self.recent_samples_per_feature, "recent_samples_per_feature", "Use e.g. 10."
        )
        self.seed = integer(self.seed, "seed")
        self.history_samples_per_feature = positive_int(
            self.history_samples_per_feature, "history_samples_per_feature", "Use 0 to keep no window samples, e.g. 3.",
            0,
        )
        self.history_top_tokens = positive_int(
            self.history_top_tokens, "history_top_tokens", "Use e.g. 5 tokens per latent and window."
        )
        self.history_windows_per_level = positive_int(
            self.history_windows_per_level, "history_windows_per_level", "Use e.g. 4 windows per level."
        )
        if self.history_windows_per_level > MAX_HISTORY_WINDOWS_PER_LEVEL:
            raise ValueError(
                f"`history_windows_per_level` must be at most {MAX_HISTORY_WINDOWS_PER_LEVEL}, got"
                f" {self.history_windows_per_level}. Use e.g. 4 windows per level."
            )

    def _check_choices(self) -> None:
        self.rank_features_by = choice(self.rank_features_by, "rank_features_by", _choices(RankBy))
        self.row_windows = choice(self.row_windows, "row_windows", _choices(RowWindows))
        self.deduplicate_contexts = bool(self.deduplicate_contexts)
        self.exclude_token_ids = token_ids(self.exclude_token_ids, "exclude_token_ids")
        self.write_report = bool(self.write_report)
        if self.state_device is not None:
            try:
                torch.device(self.state_device)
            except (RuntimeError, TypeError) as err:
                raise ValueError(
                    f"`state_device` must name a torch device such as 'cpu' or 'cuda:0', or be None (the latents'"
                    f" device); got {self.state_device!r}: {err}"
                ) from None

    # ------------------------------------------------------------------ derived values
    @property
    def half_window(self) -> int:
        """Tokens kept on each side of the activating token."""
        return self.context_size // 2

    @property
    def window(self) -> int:
        """Length of a stored context window (activating token at index ``half_window``)."""
        return 2 * self.half_window + 1

    @property
    def device(self) -> Optional[torch.device]:
        """``state_device`` as a ``torch.device`` (``None``: the latents' device)."""
        return None if self.state_device is None else torch.device(self.state_device)

    # ------------------------------------------------------------------ where the settings go
    def summary(self) -> dict[str, Any]:
        """The settings recorded in ``collection_summary.json``'s ``config`` block, as JSON values."""
        recorded = [f.name for f in dataclasses.fields(self) if f.metadata.get("summary", True)]
        return {name: _json_value(getattr(self, name)) for name in recorded}

    def state_entries(self) -> dict[str, Any]:
        """The run-level configuration entries of a collector state (key -> value)."""
        return {f.metadata["state"]: getattr(self, f.name) for f in dataclasses.fields(self) if "state" in f.metadata}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> CollectionConfig:
        """The engine settings recorded in a collector state (the others at their defaults), checked.

        Raises:
            ValueError: A recorded value is out of range; the message names the setting.
        """
        values = {f.name: state[f.metadata["state"]] for f in engine_fields() if f.metadata["state"] in state}
        kept = values.get("max_samples_per_feature", 1)
        values["samples_per_feature_to_save"] = min(_default(cls, "samples_per_feature_to_save"), kept) if (
            isinstance(kept, int) and kept > 0) else 1
        return cls(**values)

    def resume_mismatch(self, saved: Mapping[str, Any]) -> Optional[tuple[str, Any, Any]]:
        """The first ``resume`` setting whose value in a checkpoint's config block differs: ``(name, saved, now)``."""
        for f in dataclasses.fields(self):
            if f.metadata.get("resume") and f.name in saved and _json_value(saved[f.name]) != _json_value(
                getattr(self, f.name)
            ):
                return f.name, saved[f.name], getattr(self, f.name)
        return None

    @classmethod
    def setting_names(cls) -> list[str]:
        """The settings' names, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def closest_setting(cls, name: str) -> Optional[str]:
        """The setting whose name is nearest ``name`` (for "did you mean" messages), if any is close."""
        found = difflib.get_close_matches(name, cls.setting_names(), n=1, cutoff=0.6)
        return found[0] if found else None

    @classmethod
    def check_names(cls, settings: Mapping[str, Any], owner: str) -> None:
        """Raise a ``TypeError`` naming the closest setting for each keyword of ``settings`` that is none.

        Called before ``cls(**settings)`` (whose own error does not say what was meant).
        """
        unknown = [name for name in settings if name not in cls.setting_names()]
        if unknown:
            hints = [f"`{n}`" + (f" (did you mean `{cls.closest_setting(n)}`?)" if cls.closest_setting(n) else "")
                     for n in unknown]
            raise TypeError(
                f"{owner} got unknown argument(s) {', '.join(hints)}. Its settings are the fields of"
                f" {cls.__name__}: {', '.join(cls.setting_names())}."
            )


@dataclass
class CallbackConfig(CollectionConfig):
    """The collection's settings, plus what the callback decides: when, from which outputs, health and saves."""

    collection_freq: Union[int, dict[int, int]] = 1000
    """Collect every N-th optimizer step (all its micro-batches), or a schedule ``{start_step: N, ...}``.

    For example ``{0: 5000, 20000: 1000}`` collects every 5000 steps, then every 1000 from step 20000."""

    collect_in: tuple[Loop, ...] = ("train",)
    """Loops that collect: ``"train"``, and ``"validate"``/``"test"``/``"predict"`` as one-SAE-state snapshots.

    Each evaluation run then collects, with the same settings and one SAE state, into its own samples directory
    ``<dirpath>/snapshots/step_<global_step>/``; ``trainer.validate(model, ckpt_path=...)`` alone is a post-hoc
    pass over any checkpoint. Snapshots never enter the training collection or the checkpoint."""

    latents_key: str = "latents"
    """Outputs key of dense latents ``[B, T, F]`` or ``[B*T, F]``."""

    latent_indices_key: str = "latent_indices"
    """Outputs key of sparse (TopK) latent indices ``[B, T, k]``."""

    latent_values_key: str = "latent_values"
    """Outputs key of sparse latent values, the same shape as the indices."""

    tokens_key: str = "tokens"
    """Outputs or batch key of the token ids ``[B, T]``."""

    token_refs_key: str = "token_refs"
    """Outputs or batch key of shuffled rows' token refs ``[N]``, read when there are no tokens.

    Each ref points at its row's token in the callback's ``token_source``; the latents are then rows ``[N, F]``
    (dense) or ``[N, k]`` (sparse)."""

    attention_mask_key: str = "attention_mask"
    """Outputs or batch key of the optional attention mask ``[B, T]`` (0 at padding).

    Padding is neither collected nor counted in ``tokens_seen``, and context windows stop at it as at a sequence
    edge. Without a mask, negative token ids (``-100``, ``-1``) are padding."""

    exclude_special_tokens: bool = False
    """Also exclude the tokenizer's ``all_special_ids`` (resolved at fit start)."""

    log_feature_health: bool = field(default=True, metadata={"summary": False})
    """Log feature-health metrics to the trainer's loggers at collected steps.

    ``feature_health/never_fired_frac``, ``dead_frac``, ``dense_frac``, ``alive_frac`` and ``l0``, and a histogram
    of log10 firing frequencies to loggers with ``experiment.add_histogram`` (TensorBoard); see
    :mod:`lightning_sae_samples.health`. Under DDP these are global rank 0's local view."""

    dead_window_steps: int = field(default=10_000, metadata={"summary": False})
    """A latent counts as dead if it did not fire in the last this many optimizer steps.

    Make it span several collection steps; ``dead_frac`` is logged once the collection covers a whole window."""

    logit_effects_k: int = field(default=10, metadata={"summary": False})
    """Tokens per side in ``logit_effects``."""

    on_save_error: OnSaveError = field(default="log", metadata={"summary": False})
    """What a failing samples save does: ``"log"`` it and go on, or ``"raise"``.

    With ``"log"`` it is reported at error level and training goes on, the collection kept in memory and in the
    model checkpoint and the next save retrying; ``"raise"`` stops training with the error."""

    log_serve_command: bool = field(default=True, metadata={"summary": False})
    """Log, at fit start, the ``lightning-sae-samples serve DIR`` command that browses the samples live."""

    save_full_state: SaveFullState = "every"
    """When ``full_state.pt`` is written: at ``"every"`` save, at the ``"end"``, or ``"never"``.

    The checkpoint holds the same state, so ``"end"`` or ``"never"`` make checkpoints of large SAEs faster. A save
    without it removes the previous one, which would be older than the summary."""

    save_decoder_directions: bool = field(default=True, metadata={"summary": False})
    """Write ``W_dec`` (from ``logit_effects``) as ``decoder_directions.pt`` for each latent's neighbours.

    Unit rows in bfloat16 (``F x d_model x 2`` bytes), written by the saves that write ``full_state.pt`` and by the
    last save of the run; reports and ``serve`` list the latents of closest decoder direction (cosine)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        CollectionSchedule(self.collection_freq)
        if isinstance(self.collect_in, str):
            self.collect_in = (self.collect_in,)
        bad = [loop for loop in self.collect_in if loop not in _choices(Loop)]
        if bad or not isinstance(self.collect_in, (tuple, list)):
            raise ValueError(
                f"`collect_in` must list loops among {_choices(Loop)}, got {self.collect_in!r}. Use e.g."
                " ('train', 'validate') to also snapshot every validation run."
            )
        self.collect_in = tuple(dict.fromkeys(self.collect_in))
        keys = self.input_key_names()
        if not all(isinstance(getattr(self, k), str) and getattr(self, k) for k in keys):
            raise ValueError(
                f"{', '.join(f'`{k}`' for k in keys)} must be non-empty strings naming entries of the training_step"
                " outputs or batch."
            )
        self.exclude_special_tokens = bool(self.exclude_special_tokens)
        self.log_feature_health = bool(self.log_feature_health)
        self.dead_window_steps = positive_int(
            self.dead_window_steps, "dead_window_steps", "Use a window of several collection steps, e.g. 10000."
        )
        self.logit_effects_k = positive_int(self.logit_effects_k, "logit_effects_k", "Use e.g. 10 tokens per side.")
        if self.on_save_error not in _choices(OnSaveError):
            raise ValueError(
                f"`on_save_error` must be one of {_choices(OnSaveError)}, got {self.on_save_error!r}. Use 'log' to"
                " keep training when a samples save fails, 'raise' to stop."
            )
        self.save_full_state = choice(self.save_full_state, "save_full_state", _choices(SaveFullState))

    @staticmethod
    def input_key_names() -> tuple[str, ...]:
        """The settings that name entries of the outputs or batch."""
        return (
            "latents_key", "latent_indices_key", "latent_values_key", "tokens_key", "attention_mask_key",
            "token_refs_key",
        )

    @property
    def schedule(self) -> CollectionSchedule:
        """``collection_freq`` as a schedule."""
        return CollectionSchedule(self.collection_freq)

    def summary(self) -> dict[str, Any]:
        """See :meth:`CollectionConfig.summary`; the schedule as its normalized form."""
        return {**super().summary(), "collection_freq": self.schedule.as_config()}


def engine_fields() -> list[dataclasses.Field]:
    """The settings that shape a collector state (those with a ``state`` key), in declaration order."""
    return [f for f in dataclasses.fields(CollectionConfig) if "state" in f.metadata]


def _choices(literal: Any) -> tuple[str, ...]:
    return tuple(literal.__args__)


def _default(cls: type, name: str) -> Any:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def _json_value(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string right after it in the class body), for every class of the MRO."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, after in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _with_args_section(cls: type) -> type:
    """Append a Google-style ``Args:`` section made of the field docstrings to ``cls.__doc__``."""
    lines = [f"        {name}: {' '.join(text.split())}" for name, text in field_docs(cls).items()]
    raises = "    Raises:\n        ValueError: If a setting is out of range; the message names it and a fix.\n"
    cls.__doc__ = f"{cls.__doc__}\n\n    Args:\n" + "\n".join(lines) + "\n\n" + raises
    return cls


_with_args_section(CollectionConfig)
_with_args_section(CallbackConfig)


SETTINGS_BEGIN = "<!-- settings table: generated by `python scripts/settings_table.py`, do not edit -->"
SETTINGS_END = "<!-- end of settings table -->"


def settings_table(cls: type = CallbackConfig) -> str:
    """A Markdown table of the settings of ``cls``: name, default and the first sentence of its docstring."""
    docs = field_docs(cls)
    rows = ["| setting | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        first = " ".join(docs[f.name].split("\n\n")[0].split()).rstrip(".").replace("``", "`").replace("|", "\\|")
        rows.append(f"| `{f.name}` | `{f.default!r}` | {first} |")
    return "\n".join(rows)


#: The configuration keys of the tool this project replaces, and the setting each one is here.
SEED_KEYS = {
    "sample_collection_freq": "collection_freq",
    "max_samples_per_feature": "max_samples_per_feature",
    "sample_context_size": "context_size",
    "sample_activation_threshold": "activation_threshold",
    "top_features_to_save": "top_features_to_save",
    "samples_per_feature_to_save": "samples_per_feature_to_save",
}
#: The seed's switch: false means no collection at all.
SEED_SWITCH = "save_activation_samples"


def seed_settings(cfg: Any) -> Optional[dict[str, Any]]:
    """The settings a seed-tool configuration (a mapping, or an object with attributes) asks for.

    Returns ``None`` when ``save_activation_samples`` is false. Keys that are not the seed's but look like them
    (close to a seed key or to a setting's name) are an error naming the closest key, so a typo is not ignored.

    Raises:
        ValueError: For a look-alike key; the message names the key and the one meant.
    """
    items = dict(cfg) if isinstance(cfg, Mapping) else {k: v for k, v in vars(cfg).items() if not k.startswith("_")}
    if not items.get(SEED_SWITCH, True):
        return None
    known = [*SEED_KEYS, SEED_SWITCH]
    for key in items:
        if key in known:
            continue
        near = difflib.get_close_matches(str(key), [*known, *CallbackConfig.setting_names()], n=1, cutoff=0.8)
        if near or "sample" in str(key):
            meant = near[0] if near else difflib.get_close_matches(str(key), known, n=1, cutoff=0)[0]
            raise ValueError(
                f"Unknown activation-sample key {key!r} in the config: did you mean {meant!r}? The keys read are"
                f" {', '.join(known)}."
            )
    return {SEED_KEYS[key]: value for key, value in items.items() if key in SEED_KEYS}
