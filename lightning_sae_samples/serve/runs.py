"""The runs a server shows, found once at start, and the watcher that swaps in each new committed save.

A run's save is replaced atomically: a request takes :attr:`LiveRun.current` once and reads only that
:class:`~lightning_sae_samples.serve.index.RunIndex`, so it sees the old save or the new one, never a mix. A new
save is recognised by the commit protocol (``docs/format.md``): the manifest is moved into place last, so a
change of the manifest (or of the summary, for a directory without one) marks a complete save. A load that
overlaps a commit is detected (:func:`~lightning_sae_samples.samples_dir.reader.save_signature` differs before
and after it, the check every reader makes) and redone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from lightning_sae_samples.analysis.explanations import explanations_path, read_new_records
from lightning_sae_samples.samples_dir.files import lstat_or_none
from lightning_sae_samples.samples_dir.names import (
    LOCK_NAME,
    MANIFEST_NAME,
    SNAPSHOTS_DIR,
    SUMMARY_NAME,
    SamplesDirectoryError,
)
from lightning_sae_samples.samples_dir.reader import file_identity, find_samples_dirs, save_signature
from lightning_sae_samples.samples_dir.run_index import is_run_folder, read_run_index
from lightning_sae_samples.serve.explanations import SCORE_FIELDS, ExplanationIndex, empty_index
from lightning_sae_samples.serve.index import RunIndex

log = logging.getLogger(__name__)

#: How deep below a parent folder runs are looked for.
SEARCH_DEPTH = 6
MAX_RUNS = 200
POLL_SECONDS = 1.0
LOAD_ATTEMPTS = 5


def is_run_dir(path: Path) -> bool:
    """A samples directory, written already or waiting for its first save (it holds our lock or is empty)."""
    if any(lstat_or_none(path / name) is not None for name in (SUMMARY_NAME, MANIFEST_NAME, LOCK_NAME)):
        return True
    try:
        return not any(path.iterdir())
    except OSError:
        return False


def find_runs(root: Path, depth: int = SEARCH_DEPTH, limit: int = MAX_RUNS) -> list[Path]:
    """Samples directories below ``root`` (also ones still waiting for their first save), sorted by path."""
    return sorted(find_samples_dirs(root, depth, limit, (SUMMARY_NAME, MANIFEST_NAME, LOCK_NAME)))


def snapshot_runs(path: Path) -> list[Path]:
    """The snapshots of a samples directory (``snapshots/step_<N>/`` holding a save), by step; links are skipped."""
    folder = path / SNAPSHOTS_DIR
    if folder.is_symlink() or not folder.is_dir():
        return []
    found = []
    try:
        children = list(folder.iterdir())
    except OSError:
        return []
    for child in children:
        step = child.name[len("step_"):]
        marked = any(lstat_or_none(child / name) is not None for name in (SUMMARY_NAME, MANIFEST_NAME))
        if (child.name.startswith("step_") and step.isascii() and step.isdigit() and not child.is_symlink()
                and child.is_dir() and marked):
            found.append((int(step), child))
    return [child for _, child in sorted(found)]


@dataclass
class Status:
    """What the page polls: whether a save is loaded, which one, and a counter that changes at each swap."""

    state: str  # "waiting" (no save yet), "ready", or "error" (the message says why)
    version: int
    save_id: Optional[int]
    global_step: Optional[int]
    message: Optional[str]
    explanations_version: int = 0
    #: Why the explanations sidecar cannot be read (the page shows the explanations loaded before, or none).
    explanations_error: Optional[str] = None


class LiveRun:
    """One samples directory: its current loaded save, reloaded when a new one is committed.

    Args:
        name: The name the page shows and requests use (from the list built at start).
        path: The directory.
        tokenizer: Passed to the analyzer for latents only ``full_state.pt`` holds.
    """

    def __init__(self, name: str, path: Path, tokenizer: Any = None) -> None:
        self.name, self.path, self.tokenizer = name, path, tokenizer
        self.current: Optional[RunIndex] = None
        #: The explanations and labels of the sidecar, rebuilt when it changes (or a new save is loaded).
        self.explanations: ExplanationIndex = empty_index(0)
        self.explanations_error: Optional[str] = None
        self._explanations_key: Optional[tuple] = None
        self.explanations_version = 0
        self._sidecar: tuple[Optional[int], int] = (None, 0)  # inode and byte offset read so far
        self._records: dict[str, dict] = {"explanation": {}, "label": {}}
        self.version = 0
        self.error: Optional[str] = None
        self._loaded_signature: Optional[tuple] = None
        self._refresh_lock = threading.Lock()

    def status(self) -> Status:
        """The page's view of this run now."""
        current = self.current
        if current is not None:
            summary = current.summary
            return Status("ready", self.version, summary.save_id, summary.global_step,
                          self.error or self.explanations_error, self.explanations_version, self.explanations_error)
        return Status("error" if self.error else "waiting", self.version, None, None, self.error)

    def refresh(self) -> bool:
        """Load the directory's save if it changed since the last load; returns whether a new one was swapped in.

        A failure keeps the save already loaded and is reported by :meth:`status` (``message``).
        """
        with self._refresh_lock:
            before = save_signature(self.path)
            if before == self._loaded_signature:
                return False
            if before[0] is None and before[1] is None:
                return False  # no save committed yet
            error: Optional[str] = None
            for _ in range(LOAD_ATTEMPTS):
                try:
                    loaded = RunIndex.load(self.path, self.tokenizer)
                except Exception as err:  # noqa: BLE001 - a directory is untrusted input; report, keep the old save
                    loaded, error = None, " ".join(str(err).split()) or type(err).__name__
                after = save_signature(self.path)
                if after == before:
                    break
                before = after  # a commit ran during the load: read it again
                time.sleep(0.05)
            else:
                return False  # the directory keeps changing; the next poll tries again
            self._loaded_signature = before
            if loaded is None:
                self.error = error
                log.warning("Cannot load %s: %s", self.path, error)
                return False
            self.current, self.error = loaded, None
            self.version += 1
            self.refresh_explanations()
            return True

    def refresh_explanations(self) -> bool:
        """Rebuild :attr:`explanations` if the sidecar changed (or the loaded save did); returns whether it did.

        The sidecar only grows, so only its new lines are read (all of it when it was replaced); a new label alone
        rebuilds only the label index. A sidecar that cannot be read keeps the explanations already loaded;
        :attr:`explanations_error` says why.
        """
        current = self.current
        if current is None:
            return False
        path = explanations_path(self.path)
        key = (file_identity(path), id(current))
        if key == self._explanations_key:
            return False
        num_latents = current.analyzer.num_features
        inode = None if key[0] is None else key[0][0]
        previous_inode, offset = self._sidecar
        if inode != previous_inode or (key[0] is not None and key[0][1] < offset):
            offset, self._records = 0, {"explanation": {}, "label": {}}  # a new or shortened file: read it all
        try:
            records, offset = read_new_records(self.path, offset)
        except Exception as err:  # noqa: BLE001 - the sidecar is untrusted input; report, keep the old index
            self.explanations_error = " ".join(str(err).split()) or type(err).__name__
            log.warning("Cannot read the explanations of %s: %s", self.path, self.explanations_error)
            if self.explanations.num_latents != num_latents:
                self.explanations = empty_index(num_latents)
            self._explanations_key = key
            return False
        for record in records:
            self._records[record.kind][record.latent] = record
        self._sidecar = (inode, offset)
        reuse = self.explanations if not any(r.kind == "explanation" for r in records) else None
        explanations = ExplanationIndex(self._records["explanation"], self._records["label"], num_latents,
                                        reuse=reuse)
        if explanations.explanations:
            # The list's sorts by score, best first, are sorted here, off the requests (an argsort of every latent).
            for by in SCORE_FIELDS:
                explanations.order_by_score(current.table.latents, descending=True, by=by)
        self.explanations = explanations
        self.explanations_error, self._explanations_key = None, key
        self.explanations_version += 1
        return True


class RunSet:
    """The runs of one server, by name, in the order they were found; a thread polls the loaded ones.

    Args:
        root: A samples directory, a run folder of many SAEs (each SAE a run named as in its index), or a folder
            holding several (found once, here).
        tokenizer: For latents only ``full_state.pt`` holds.

    Raises:
        SamplesDirectoryError: ``root`` is not a folder, or holds no samples directory.
    """

    def __init__(self, root: Path, tokenizer: Any = None, poll_seconds: float = POLL_SECONDS) -> None:
        root = Path(root)
        if not root.is_dir():
            raise SamplesDirectoryError(
                f"{root} is not a directory. Pass a samples directory (the callback's `dirpath`) or a folder"
                " holding some, such as lightning_logs."
            )
        #: The SAE names of a run folder of many SAEs (its index, validated), else ``()``.
        self.sae_names: tuple[str, ...] = ()
        if is_run_folder(root):
            self.sae_names = read_run_index(root)
            paths = [root / name for name in self.sae_names]
            names = list(self.sae_names)
        elif is_run_dir(root):
            paths = [root]
            names = [root.name or str(root)]
        else:
            paths = find_runs(root)
            names = [p.relative_to(root).as_posix() for p in paths]
        if not paths:
            raise SamplesDirectoryError(
                f"{root} holds no samples directory (no {SUMMARY_NAME} or {MANIFEST_NAME} within {SEARCH_DEPTH}"
                " levels). Pass the callback's `dirpath` (default: <log_dir>/activation_samples)."
            )
        self.root, self.tokenizer = root, tokenizer
        #: The directories found at start, whose snapshots the watcher keeps listing as they are written.
        self._parents = list(zip(paths, names))
        self.runs: dict[str, LiveRun] = {}
        self._list_snapshots()
        self._wanted: set[str] = set()
        self._poll = poll_seconds
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _adopt_run_index(self) -> None:
        """List the SAEs of a run folder whose index came after the server started (it waited for the first save).

        A run of many SAEs writes its index after their first saves; until then its folder looks like one samples
        directory waiting for its first save. An index that cannot be read is logged and tried again at the next poll.
        """
        if self.sae_names or [path for path, _ in self._parents] != [self.root] or not is_run_folder(self.root):
            return
        try:
            names = read_run_index(self.root)
        except SamplesDirectoryError as err:
            log.warning("%s", err)
            return
        self.sae_names = names
        self._parents = [(self.root / name, name) for name in names]

    def _list_snapshots(self) -> bool:
        """List each found directory's snapshots after it (new ones too); returns whether the list changed.

        A snapshot is a complete samples directory of its own (listed so that the page can show a latent in two of
        them); the search for runs does not descend into a samples directory, so they are listed here. A run folder's
        SAEs replace the folder itself once its index is written (:meth:`_adopt_run_index`).
        """
        self._adopt_run_index()
        listed: dict[Path, str] = {}
        for path, name in self._parents:
            listed.setdefault(path, name)
            for snapshot in snapshot_runs(path):
                listed.setdefault(snapshot, f"{name}/{snapshot.relative_to(path).as_posix()}")
        names = list(listed.values())[:MAX_RUNS]
        if names == list(self.runs):
            return False
        known = self.runs
        # A new dict, swapped in whole: a request reads the old list or the new one.
        self.runs = {name: known[name] if name in known and known[name].path == path
                     else LiveRun(name, path, self.tokenizer) for path, name in list(listed.items())[:MAX_RUNS]}
        return True

    @property
    def names(self) -> Sequence[str]:
        """Run names in order."""
        return list(self.runs)

    @property
    def searchable(self) -> list[str]:
        """The runs a search across SAEs covers by default: each one found at start (snapshots left out)."""
        return [name for _, name in self._parents if name in self.runs]

    def get(self, name: Optional[str]) -> Optional[LiveRun]:
        """The run called ``name`` (the first run when ``None``), loaded on first use; ``None`` if unknown."""
        run = self.runs.get(name) if name is not None else next(iter(self.runs.values()))
        if run is None:
            return None
        self._wanted.add(run.name)
        if run.current is None:
            run.refresh()  # also waits for a first load that another request or the watcher started
        return run

    def start(self) -> None:
        """Start polling the runs that were asked for (and the first one)."""
        self.get(None)
        self._thread = threading.Thread(target=self._watch, name="sae-samples-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                self._list_snapshots()
            except OSError:
                log.exception("Listing the snapshots under %s failed", self.root)
            runs = self.runs
            for name in list(self._wanted):
                run = runs.get(name)
                if run is None:
                    continue  # a snapshot that was removed
                try:
                    run.refresh()
                    run.refresh_explanations()
                except Exception:  # noqa: BLE001 - the watcher must survive anything a directory holds
                    log.exception("Reloading %s failed", run.path)
            self._wake.wait(self._poll)
            self._wake.clear()
