"""Read ``training_history.pt``: each latent's windows through training, and its events (birth, death, ...)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Optional

import torch
from torch import Tensor

from lightning_sae_samples.samples_dir.history_file import load_history, payload_vocab, windows_of_payload
from lightning_sae_samples.samples_dir.names import PathLike, SamplesDirectoryError
from lightning_sae_samples.samples_dir.reader import read_one_save, read_samples_dir

#: Default top-token overlap (Jaccard of the top-token sets) below which two consecutive windows differ in meaning.
MEANING_CHANGE_OVERLAP = 0.2


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
        kind: ``"birth"`` (first window it fired in), ``"death"`` (silent for ``dead_window_steps``),
            ``"revival"`` (fired again after a death) or ``"meaning_change"`` (its top tokens overlap those of
            its previous window below the threshold).
        latent: The latent.
        step: Where the window of the event begins; for a death, the end of the window by which it had been
            silent ``dead_window_steps``.
        window: The window's index.
        before: Top token strings before (a meaning change), else empty.
        after: Top token strings after (a meaning change, a birth, a revival), else empty.
        overlap: The top-token overlap of a meaning change, else ``None``.
    """

    kind: str
    latent: int
    step: int
    window: int
    before: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    overlap: Optional[float] = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"kind": self.kind, "latent": self.latent, "step": self.step, "window": self.window,
                "before": list(self.before), "after": list(self.after), "overlap": self.overlap}


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
        self._events: dict[float, dict[str, tuple[Tensor, ...]]] = {}
        self._sorted_ids = self._token_ids

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

    def events(self, latent: Optional[int] = None, change_overlap: float = MEANING_CHANGE_OVERLAP
               ) -> list[FeatureEvent]:
        """Births, deaths, revivals and meaning changes of one latent, or of every latent (by step, then latent).

        One latent's are found from its own windows, unless every latent's are known already.
        """
        if latent is None or change_overlap in self._events:
            found, ids = self._all_events(change_overlap), self._sorted_ids
        else:
            found, ids = self._latent_events(int(latent), change_overlap)
        listed = []
        for rank, kind in enumerate(EVENT_KINDS):
            lat, step, win, row, overlap = found[kind]
            picked = torch.arange(len(lat)) if latent is None else (lat == int(latent)).nonzero(as_tuple=True)[0]
            for i in picked.tolist():
                r = int(row[i])
                after = self._strings(ids[r]) if kind != "death" else ()
                before = self._strings(ids[r - 1]) if kind == "meaning_change" else ()
                value = float(overlap[i]) if kind == "meaning_change" else None
                listed.append((int(step[i]), rank, int(lat[i]),
                               FeatureEvent(kind, int(lat[i]), int(step[i]), int(win[i]), before, after, value)))
        listed.sort(key=lambda item: item[:3])
        return [item[3] for item in listed]

    def event_counts(self, change_overlap: float = MEANING_CHANGE_OVERLAP) -> dict[str, Tensor]:
        """Per latent (``[F]`` int64 each): how many events of each kind it had, by kind."""
        found = self._all_events(change_overlap)
        return {kind: torch.bincount(found[kind][0], minlength=self.num_latents) for kind in EVENT_KINDS}

    def first_event_step(self, kind: str, change_overlap: float = MEANING_CHANGE_OVERLAP) -> Tensor:
        """Per latent (``[F]`` int64), the step of its first event of ``kind`` (``-1``: none)."""
        lat, step = self._all_events(change_overlap)[kind][:2]
        out = torch.full((self.num_latents,), torch.iinfo(torch.int64).max, dtype=torch.int64)
        out.scatter_reduce_(0, lat, step, reduce="amin")
        return torch.where(out == torch.iinfo(torch.int64).max, -1, out)

    def _all_events(self, change_overlap: float) -> dict[str, tuple[Tensor, ...]]:
        """Per kind: latent, step, window, row (into the latent-sorted rows) and overlap tensors of its events."""
        cached = self._events.get(change_overlap)
        if cached is not None:
            return cached
        order = torch.argsort(self._latent * max(len(self.windows), 1) + self._row_window)
        self._sorted_ids = self._token_ids[order]
        found = self._find_events(self._latent[order], self._row_window[order], self._sorted_ids, change_overlap)
        self._events[change_overlap] = found
        return found

    def _latent_events(self, latent: int, change_overlap: float) -> tuple[dict[str, tuple[Tensor, ...]], Tensor]:
        """:meth:`_all_events` of one latent, from the windows it fired in, and its rows' top token ids."""
        found = self._rows_of(latent)
        windows = [index for index, _ in found]
        ids = [self._windows[index]["token_ids"][at] for index, at in found]
        top = self._token_ids.shape[1]
        ids_t = torch.stack(ids) if ids else torch.empty((0, top), dtype=self._token_ids.dtype)
        window_t = torch.tensor(windows, dtype=torch.int64)
        return self._find_events(torch.full_like(window_t, latent), window_t, ids_t, change_overlap), ids_t

    def _find_events(self, latent: Tensor, window: Tensor, ids: Tensor, change_overlap: float
                     ) -> dict[str, tuple[Tensor, ...]]:
        """The events of rows sorted by latent, then window (``ids``: their top token ids)."""
        count_w = len(self.windows)
        ends = torch.tensor([w.end for w in self.windows], dtype=torch.int64)
        starts = torch.tensor([w.start for w in self.windows], dtype=torch.int64)
        n = len(latent)
        first = torch.ones(n, dtype=torch.bool)
        first[1:] = latent[1:] != latent[:-1]
        last = torch.ones(n, dtype=torch.bool)
        last[:-1] = first[1:]
        following = (torch.arange(n) + 1).clamp(max=max(n - 1, 0))
        none = torch.empty(0, dtype=torch.float64)

        def pick(rows: Tensor, steps: Tensor, windows: Tensor, overlap: Tensor = none) -> tuple[Tensor, ...]:
            return latent[rows], steps, windows, rows, overlap

        found = {}
        births = first.nonzero(as_tuple=True)[0]
        found["birth"] = pick(births, starts[window[births]], window[births])
        # Dead from the first window ending `dead_window_steps` after its last active one, if it stays silent
        # until then (the next window it fires in comes later).
        next_window = torch.where(last, torch.full_like(window, count_w), window[following]) if n else window
        death_window = torch.searchsorted(ends, ends[window] + self.dead_window_steps) if n else window
        dead = (death_window < next_window).nonzero(as_tuple=True)[0]
        found["death"] = pick(dead, ends[death_window[dead]], death_window[dead])
        revived = dead[~last[dead]] + 1
        found["revival"] = pick(revived, starts[window[revived]], window[revived])
        pair = (~last).nonzero(as_tuple=True)[0]
        a, b = ids[pair], ids[pair + 1]
        valid_a, valid_b = a >= 0, b >= 0
        shared = ((a.unsqueeze(2) == b.unsqueeze(1)) & valid_a.unsqueeze(2) & valid_b.unsqueeze(1)).any(2).sum(1)
        union = valid_a.sum(1) + valid_b.sum(1) - shared
        overlap = shared.double() / union.clamp(min=1).double()
        low = overlap < change_overlap
        changed = pair[low] + 1
        found["meaning_change"] = pick(changed, starts[window[changed]], window[changed], overlap[low])
        return found

    def _strings(self, ids: Tensor) -> tuple[str, ...]:
        return tuple(self.token_str(t) for t in ids.tolist() if t >= 0)

    # ------------------------------------------------------------------ the whole run
    def run_series(self, change_overlap: float = MEANING_CHANGE_OVERLAP) -> list[dict[str, int]]:
        """Per window: its steps, the latents that fired in it (alive), and the events it saw by kind."""
        count_w = len(self.windows)
        alive = torch.bincount(self._row_window, minlength=count_w).tolist()
        found = self._all_events(change_overlap)
        per_kind = {kind: torch.bincount(found[kind][2], minlength=count_w).tolist() for kind in EVENT_KINDS}
        return [{"start": w.start, "end": w.end, "alive": alive[w.index], "births": per_kind["birth"][w.index],
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

    def most_changed(self, limit: int = 3, change_overlap: float = MEANING_CHANGE_OVERLAP) -> list[int]:
        """The latents with the most meaning changes (then the lower index), at most ``limit``."""
        changes = self.event_counts(change_overlap)["meaning_change"]
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


def story_line(history: FeatureHistory, latent: int, change_overlap: float = MEANING_CHANGE_OVERLAP,
               tokens: int = 3) -> Optional[str]:
    """A latent's "through training" line (raw token text), or ``None`` when it never fired in the history.

    For example ``born at step 0 · meaning changed at step 8,000 (" the", " of" → " Lord", " God") · frequency
    ▁▃█▅``: the top tokens before and after, each quoted (word pieces and their leading spaces stay readable).
    """
    active = {stats.window.index: stats for stats in history.feature(latent)}
    if not active:
        return None
    parts = []
    for event in history.events(latent, change_overlap):
        if event.kind == "meaning_change":
            parts.append(f"meaning changed at step {event.step:,} ({quoted_tokens(event.before[:tokens])} →"
                         f" {quoted_tokens(event.after[:tokens])})")
        else:
            verb = {"birth": "born", "death": "died", "revival": "revived"}[event.kind]
            parts.append(f"{verb} at step {event.step:,}")
    frequencies = [active[w.index].frequency if w.index in active else 0.0 for w in history.windows]
    parts.append(f"frequency {sparkline(frequencies)}")
    return " · ".join(parts)
