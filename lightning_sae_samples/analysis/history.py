"""Read ``training_history.pt``: each latent's windows through training, and its events (birth, death, ...)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple, Optional

import torch
from torch import Tensor

from lightning_sae_samples.analysis.meaning_change import DEFAULT_RULE, EventRule, token_shift_test
from lightning_sae_samples.samples_dir.history_file import load_history, payload_vocab, windows_of_payload
from lightning_sae_samples.samples_dir.names import HISTORY_INDEX_NAME, PathLike, SamplesDirectoryError
from lightning_sae_samples.samples_dir.reader import part_locator, read_one_save, read_samples_dir

#: Event kinds, in the order they are listed within one step.
EVENT_KINDS = ("birth", "meaning_change", "death", "revival")


@dataclass(frozen=True)
class HistoryWindow:
    """One window of the history: what the collection saw between two saves (or merged neighbours).

    Attributes:
        index: Position in the history, oldest first.
        start: The step it begins at (the previous save's).
        end: The step of the save that closed it (of the last save merged into it).
        level: Merges it went through (0: one save).
        saves: Saves it covers.
        tokens_seen: Tokens collected in it.
    """

    index: int
    start: int
    end: int
    level: int
    saves: int
    tokens_seen: int


@dataclass(frozen=True)
class TopToken:
    """One of a window's most frequent activating tokens of a latent."""

    token_id: int
    text: str
    count: int


@dataclass(frozen=True)
class HistorySample:
    """One of a window's top samples of a saved feature."""

    activation_value: float
    step: int
    context_tokens: tuple[int, ...]
    context_token_strs: tuple[str, ...]
    context_activations: tuple[float, ...]
    context_position: int

    @property
    def text(self) -> str:
        """Display string of the activating token."""
        return self.context_token_strs[self.context_position]


@dataclass(frozen=True)
class WindowStats:
    """One latent in one window where it fired."""

    window: HistoryWindow
    count: int
    max_activation: float
    mean_activation: float
    top_tokens: tuple[TopToken, ...]
    samples: tuple[HistorySample, ...]

    @property
    def frequency(self) -> float:
        """Activations per collected token of the window."""
        return self.count / self.window.tokens_seen if self.window.tokens_seen else 0.0


@dataclass(frozen=True)
class FeatureEvent:
    """A moment of a latent's story.

    Attributes:
        kind: ``"birth"`` (first window it was active in), ``"death"`` (silent or rare for ``dead_window_steps``),
            ``"revival"`` (active again after a death) or ``"meaning_change"`` (its activating tokens differ from
            those of the last window it had enough data in, beyond sampling noise: see :class:`EventRule`).
        latent: The latent.
        step: Where the window of the event begins; for a death, the end of the window by which it had been
            silent or rare ``dead_window_steps``.
        window: The window's index.
        before: Top token strings before (a meaning change), else empty.
        after: Top token strings after (a meaning change, a birth, a revival), else empty.
        before_window: The window a meaning change compares with, else ``None``.
        p_value: How likely a meaning change's difference is under sampling noise alone, else ``None``.
        shift: The share of activations that moved to other tokens in a meaning change (at least), else ``None``.
    """

    kind: str
    latent: int
    step: int
    window: int
    before: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    before_window: Optional[int] = None
    p_value: Optional[float] = None
    shift: Optional[float] = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"kind": self.kind, "latent": self.latent, "step": self.step, "window": self.window,
                "before": list(self.before), "after": list(self.after), "before_window": self.before_window,
                "p_value": self.p_value, "shift": self.shift}


class _Found(NamedTuple):
    """Events of one kind.

    Per event: its latent, step, window and row (into the latent-sorted rows); for a meaning change, the row it
    was compared with, the p-value and the shift.
    """

    latent: Tensor
    step: Tensor
    window: Tensor
    row: Tensor
    before: Tensor
    p_value: Tensor
    shift: Tensor


class _Rows(NamedTuple):
    """History rows sorted by latent, then window: latent, window, top token ids and counts, total count."""

    latent: Tensor
    window: Tensor
    token_ids: Tensor
    token_counts: Tensor
    count: Tensor


def _runs(latent: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For rows sorted by latent: whether each is its latent's first, its last, and the next row's index."""
    n = len(latent)
    first = torch.ones(n, dtype=torch.bool)
    first[1:] = latent[1:] != latent[:-1]
    last = torch.ones(n, dtype=torch.bool)
    last[:-1] = first[1:]
    return first, last, (torch.arange(n) + 1).clamp(max=max(n - 1, 0))


class FeatureHistory:
    """Every latent's windows through training, read from a samples directory's ``training_history.pt``.

    Args:
        payload: A checked history payload (see :meth:`from_dir`).
    """

    def __init__(self, payload: dict, path: Optional[Path] = None) -> None:
        self.path = path
        self.num_latents = int(payload["num_latents"])
        self.dead_window_steps = int(payload["dead_window_steps"])
        self._windows = windows_of_payload(payload)
        self._vocab = payload_vocab(payload)
        self.windows = [
            HistoryWindow(i, w["start"], w["end"], w["level"], w["saves"], w["tokens_seen"])
            for i, w in enumerate(self._windows)
        ]
        lengths = torch.tensor([len(w["latent"]) for w in self._windows], dtype=torch.int64)
        self._row_window = torch.repeat_interleave(torch.arange(len(self._windows)), lengths)
        rows = payload["rows"]
        self._latent, self._count, self._token_ids = rows["latent"].long(), rows["count"], rows["token_ids"]
        self._token_counts = rows["token_counts"]
        self._events: dict[EventRule, dict[str, _Found]] = {}
        self._sorted_rows = _Rows(self._latent, self._row_window, self._token_ids, self._token_counts, self._count)

    @classmethod
    def from_dir(cls, path: PathLike) -> Optional[FeatureHistory]:
        """The history of a samples directory, or ``None`` when it has none (older runs, snapshots).

        A committed but unfinished save's history is read, as :func:`read_samples_dir` reads its other files.

        Raises:
            SamplesDirectoryError: The file is there but corrupt or hostile (one line naming it and the field).
        """
        return read_one_save(path, lambda: cls.from_file(read_samples_dir(path).history_path))[0]

    @classmethod
    def from_file(cls, file: Optional[PathLike], opened: Optional[IO[bytes]] = None) -> Optional[FeatureHistory]:
        """The history in ``file`` (``None``: none); read from ``opened`` (``file`` held open) if given."""
        if file is None:
            return None
        file = Path(file)
        if opened is None and (file.is_symlink() or not file.is_file()):
            raise SamplesDirectoryError(f"{file} is not a regular file; it is not read.")
        if file.name == HISTORY_INDEX_NAME:  # a sharded run's history in parts: joined into one
            return cls(load_history(file, locate=part_locator(file)), file)
        return cls(load_history(file, opened), file)

    def token_str(self, token_id: int) -> str:
        """Display string of a token id, as the writer decoded it."""
        return self._vocab.get(int(token_id), f"[{int(token_id)}]")

    # ------------------------------------------------------------------ one latent
    def _rows_of(self, latent: int) -> list[tuple[int, int]]:
        """``(window index, row)`` of each window where ``latent`` fired, oldest first (a window's rows are sorted)."""
        found = []
        for index, window in enumerate(self._windows):
            rows = window["latent"]
            at = int(torch.searchsorted(rows, torch.tensor(latent, dtype=rows.dtype)))
            if at < len(rows) and int(rows[at]) == latent:
                found.append((index, at))
        return found

    def feature(self, latent: int) -> list[WindowStats]:
        """The windows where ``latent`` fired, oldest first."""
        out = []
        for index, at in self._rows_of(int(latent)):
            info, window = self.windows[index], self._windows[index]
            count = int(window["count"][at])
            tokens = tuple(TopToken(int(t), self.token_str(int(t)), int(c))
                           for t, c in zip(window["token_ids"][at].tolist(), window["token_counts"][at].tolist())
                           if t >= 0)
            out.append(WindowStats(info, count, float(window["max"][at]), float(window["sum"][at]) / count, tokens,
                                   self._samples(window, int(latent))))
        return out

    def samples(self, latent: int, window: int) -> tuple[HistorySample, ...]:
        """The samples kept of ``latent`` in the window at position ``window`` (empty when none were kept).

        Raises:
            IndexError: There is no such window.
        """
        if not 0 <= window < len(self._windows):
            raise IndexError(f"The history has windows 0 to {len(self._windows) - 1}; there is no window {window}.")
        return self._samples(self._windows[window], int(latent))

    def _samples(self, window: dict, latent: int) -> tuple[HistorySample, ...]:
        samples = window["samples"]
        picked = (samples["latent"] == latent).nonzero(as_tuple=True)[0].tolist()
        out = []
        for i in picked:
            tokens = samples["context_tokens"][i].tolist()
            inside = [j for j, t in enumerate(tokens) if t >= 0]
            half = len(tokens) // 2
            kept = tokens[inside[0]: inside[-1] + 1] if inside else []
            acts = samples["context_acts"][i].tolist()[inside[0]: inside[-1] + 1] if inside else []
            out.append(HistorySample(float(samples["values"][i]), int(samples["step"][i]), tuple(kept),
                                     tuple(self.token_str(t) for t in kept), tuple(acts),
                                     half - (inside[0] if inside else 0)))
        return tuple(out)

    def events(self, latent: Optional[int] = None, rule: EventRule = DEFAULT_RULE) -> list[FeatureEvent]:
        """Births, deaths, revivals and meaning changes of one latent, or of every latent (by step, then latent).

        One latent's are found from its own windows, unless every latent's are known already.
        """
        if latent is None or rule in self._events:
            found, rows = self._all_events(rule), self._sorted_rows
        else:
            found, rows = self._latent_events(int(latent), rule)
        ids = rows.token_ids
        listed = []
        for rank, kind in enumerate(EVENT_KINDS):
            events = found[kind]
            lat = events.latent
            picked = torch.arange(len(lat)) if latent is None else (lat == int(latent)).nonzero(as_tuple=True)[0]
            for i in picked.tolist():
                after = self._strings(ids[int(events.row[i])]) if kind != "death" else ()
                change: dict[str, Any] = {}
                if kind == "meaning_change":
                    was = int(events.before[i])
                    change = {"before": self._strings(ids[was]), "before_window": int(rows.window[was]),
                              "p_value": float(events.p_value[i]), "shift": float(events.shift[i])}
                event = FeatureEvent(kind, int(lat[i]), int(events.step[i]), int(events.window[i]), after=after,
                                     **change)
                listed.append((event.step, rank, event.latent, event))
        listed.sort(key=lambda item: item[:3])
        return [item[3] for item in listed]

    def event_counts(self, rule: EventRule = DEFAULT_RULE) -> dict[str, Tensor]:
        """Per latent (``[F]`` int64 each): how many events of each kind it had, by kind."""
        found = self._all_events(rule)
        return {kind: torch.bincount(found[kind].latent, minlength=self.num_latents) for kind in EVENT_KINDS}

    def first_event_step(self, kind: str, rule: EventRule = DEFAULT_RULE) -> Tensor:
        """Per latent (``[F]`` int64), the step of its first event of ``kind`` (``-1``: none)."""
        events = self._all_events(rule)[kind]
        out = torch.full((self.num_latents,), torch.iinfo(torch.int64).max, dtype=torch.int64)
        out.scatter_reduce_(0, events.latent, events.step, reduce="amin")
        return torch.where(out == torch.iinfo(torch.int64).max, -1, out)

    def _all_events(self, rule: EventRule) -> dict[str, _Found]:
        """Per kind, every latent's events (rows index the latent-sorted rows, :attr:`_sorted_rows`)."""
        cached = self._events.get(rule)
        if cached is not None:
            return cached
        order = torch.argsort(self._latent * max(len(self.windows), 1) + self._row_window)
        self._sorted_rows = _Rows(self._latent[order], self._row_window[order], self._token_ids[order],
                                  self._token_counts[order], self._count[order])
        found = self._find_events(self._sorted_rows, rule)
        self._events[rule] = found
        return found

    def _latent_events(self, latent: int, rule: EventRule) -> tuple[dict[str, _Found], _Rows]:
        """:meth:`_all_events` of one latent, from the windows it fired in, and its rows."""
        found = self._rows_of(latent)
        windows = torch.tensor([index for index, _ in found], dtype=torch.int64)
        top = self._token_ids.shape[1]

        def stacked(name: str, dtype: torch.dtype) -> Tensor:
            picked = [self._windows[index][name][at] for index, at in found]
            return torch.stack(picked) if picked else torch.empty((0, top), dtype=dtype)

        count = torch.tensor([int(self._windows[index]["count"][at]) for index, at in found], dtype=torch.int64)
        rows = _Rows(torch.full_like(windows, latent), windows, stacked("token_ids", self._token_ids.dtype),
                     stacked("token_counts", torch.int64), count)
        return self._find_events(rows, rule), rows

    def _find_events(self, rows: _Rows, rule: EventRule) -> dict[str, _Found]:
        """The events of rows sorted by latent, then window."""
        count_w = len(self.windows)
        ends = torch.tensor([w.end for w in self.windows], dtype=torch.int64)
        starts = torch.tensor([w.start for w in self.windows], dtype=torch.int64)
        found = {}
        # Births, deaths and revivals read only the windows where a latent was active (fired often enough).
        active = (rows.count >= rule.min_active_count).nonzero(as_tuple=True)[0]
        latent, window = rows.latent[active], rows.window[active]
        first, last, following = _runs(latent)
        none_f, none_i = torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.int64)

        def pick(at: Tensor, steps: Tensor, windows: Tensor) -> _Found:
            return _Found(latent[at], steps, windows, active[at], none_i, none_f, none_f)

        births = first.nonzero(as_tuple=True)[0]
        found["birth"] = pick(births, starts[window[births]], window[births])
        # Dead from the first window ending `dead_window_steps` after its last active one, if it stays inactive
        # until then (the next window it is active in comes later).
        n = len(latent)
        next_window = torch.where(last, torch.full_like(window, count_w), window[following]) if n else window
        death_window = torch.searchsorted(ends, ends[window] + self.dead_window_steps) if n else window
        dead = (death_window < next_window).nonzero(as_tuple=True)[0]
        found["death"] = pick(dead, ends[death_window[dead]], death_window[dead])
        revived = dead[~last[dead]] + 1
        found["revival"] = pick(revived, starts[window[revived]], window[revived])
        # A meaning change compares each window with enough data with the latent's last one before it.
        tested = (rows.count >= rule.min_tested_count).nonzero(as_tuple=True)[0]
        pair = (~_runs(rows.latent[tested])[1]).nonzero(as_tuple=True)[0]
        before, after = tested[pair], tested[pair + 1]
        p_value, shift = token_shift_test(rows.token_ids[before], rows.token_counts[before], rows.count[before],
                                          rows.token_ids[after], rows.token_counts[after], rows.count[after])
        changed = (p_value < rule.false_alarm_rate) & (shift >= rule.min_shift)
        at, was = after[changed], before[changed]
        found["meaning_change"] = _Found(rows.latent[at], starts[rows.window[at]], rows.window[at], at, was,
                                         p_value[changed], shift[changed])
        return found

    def _strings(self, ids: Tensor) -> tuple[str, ...]:
        return tuple(self.token_str(t) for t in ids.tolist() if t >= 0)

    # ------------------------------------------------------------------ the whole run
    def run_series(self, rule: EventRule = DEFAULT_RULE) -> list[dict[str, int]]:
        """Per window: its steps, the latents active (alive) and rare in it, and the events it saw by kind.

        A latent is rare in a window where it fired fewer than ``rule.min_active_count`` times.
        """
        count_w = len(self.windows)
        active = self._count >= rule.min_active_count
        alive = torch.bincount(self._row_window[active], minlength=count_w).tolist()
        rare = torch.bincount(self._row_window[~active], minlength=count_w).tolist()
        found = self._all_events(rule)
        per_kind = {kind: torch.bincount(found[kind].window, minlength=count_w).tolist() for kind in EVENT_KINDS}
        return [{"start": w.start, "end": w.end, "alive": alive[w.index], "rare": rare[w.index],
                 "births": per_kind["birth"][w.index],
                 "deaths": per_kind["death"][w.index], "revivals": per_kind["revival"][w.index],
                 "meaning_changes": per_kind["meaning_change"][w.index]} for w in self.windows]

    def rows(self, latents: Optional[Iterable[int]] = None) -> list[dict[str, Any]]:
        """One row per (window, latent that fired): step, latent, count, max, mean, top tokens (for export).

        Args:
            latents: Only these latents (default: all).
        """
        out = []
        wanted = None if latents is None else torch.tensor(sorted({int(i) for i in latents}), dtype=torch.int64)
        for info, window in zip(self.windows, self._windows):
            counts, sums = window["count"].tolist(), window["sum"].tolist()
            picked = range(len(counts)) if wanted is None else torch.isin(window["latent"].long(), wanted).nonzero(
                as_tuple=True)[0].tolist()
            for r in picked:
                latent = int(window["latent"][r])
                tokens = [t for t in window["token_ids"][r].tolist() if t >= 0]
                out.append({
                    "step": info.end, "window_start": info.start, "latent": latent, "count": counts[r],
                    "max": float(window["max"][r]), "mean": sums[r] / counts[r],
                    "frequency": counts[r] / info.tokens_seen if info.tokens_seen else 0.0,
                    "top_token_ids": tokens, "top_tokens": [self.token_str(t) for t in tokens],
                    "top_token_counts": window["token_counts"][r].tolist()[: len(tokens)],
                })
        return out

    def most_changed(self, limit: int = 3, rule: EventRule = DEFAULT_RULE) -> list[int]:
        """The latents with the most meaning changes (then the lower index), at most ``limit``."""
        changes = self.event_counts(rule)["meaning_change"]
        ranked = torch.argsort(-changes, stable=True)[:limit]
        return [int(i) for i in ranked if int(changes[i]) > 0]


SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float]) -> str:
    """One block character per value, scaled to the largest (a zero shows as a space)."""
    top = max(values, default=0.0)
    if top <= 0:
        return " " * len(values)
    return "".join(" " if v <= 0 else SPARK[min(len(SPARK) - 1, int(v / top * (len(SPARK) - 1) + 0.5))]
                   for v in values)


def quoted_tokens(tokens: Sequence[str]) -> str:
    """Tokens as ``"a", " b"``: quoted, so where a token starts and ends (and its spaces) can be seen."""
    return ", ".join(f'"{token}"' for token in tokens)


def story_line(history: FeatureHistory, latent: int, rule: EventRule = DEFAULT_RULE, tokens: int = 3
               ) -> Optional[str]:
    """A latent's "through training" line (raw token text), or ``None`` when it never fired in the history.

    For example ``born at step 0 · meaning changed at step 8,000 (" the", " of" → " Lord", " God") · frequency
    ▁▃█▅``: the top tokens before and after, each quoted (word pieces and their leading spaces stay readable).
    A change found against an earlier window than the previous one reads ``meaning changed between steps 250 and
    1,000``. A latent never active (see :class:`EventRule`) reads ``rare (...)``.
    """
    active = {stats.window.index: stats for stats in history.feature(latent)}
    if not active:
        return None
    parts = []
    for event in history.events(latent, rule):
        if event.kind == "meaning_change":
            # Compared with an earlier window than the previous one (those between had too little data).
            since = event.before_window is not None and event.before_window < event.window - 1
            when = (f"between steps {history.windows[event.before_window].end:,} and {event.step:,}" if since
                    else f"at step {event.step:,}")
            parts.append(f"meaning changed {when} ({quoted_tokens(event.before[:tokens])} →"
                         f" {quoted_tokens(event.after[:tokens])})")
        else:
            verb = {"birth": "born", "death": "died", "revival": "revived"}[event.kind]
            parts.append(f"{verb} at step {event.step:,}")
    if not parts:
        parts.append(f"rare (fewer than {rule.min_active_count} activations in every window)")
    frequencies = [active[w.index].frequency if w.index in active else 0.0 for w in history.windows]
    parts.append(f"frequency {sparkline(frequencies)}")
    return " · ".join(parts)
