"""The run index of a run folder of many SAEs: which samples directories ``DIR/<name>/`` it holds, in order.

``DIR/sae_samples_run.json`` is ``{"writer": "lightning-sae-samples", "run_format_version": 1, "saes": [{"name":
"l3", "dir": "l3"}, ...]}`` (``docs/format.md``). It is written atomically after the SAEs' saves; a reader takes it as
untrusted input: every name is checked before it is joined to ``DIR``, and each must be a real folder there.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from pathlib import Path

from lightning_sae_samples.samples_dir.atomic import atomic_write_json
from lightning_sae_samples.samples_dir.files import is_plain_file, load_json, lstat_or_none
from lightning_sae_samples.samples_dir.names import (
    RUN_FORMAT_VERSION,
    RUN_INDEX_NAME,
    WRITER_ID,
    PathLike,
    SamplesDirectoryError,
    check_sae_name,
)


def _checked_names(names: Iterable[str]) -> list[str]:
    """``names`` as a list, each a valid SAE name, none twice (``ValueError`` otherwise)."""
    checked = [check_sae_name(name) for name in names]
    twice = sorted({name for name in checked if checked.count(name) > 1})
    if twice:
        raise ValueError(f"SAE names must differ; {', '.join(map(repr, twice))} is given more than once.")
    if not checked:
        raise ValueError("A run index names at least one SAE.")
    return checked


def write_run_index(dirpath: PathLike, names: Iterable[str]) -> Path:
    """Write ``dirpath/sae_samples_run.json`` atomically, naming the SAEs ``names`` in this order; returns its path.

    Call it after the SAEs' own saves into ``dirpath/<name>/``.

    Raises:
        ValueError: A name is not a valid SAE name (:func:`~lightning_sae_samples.samples_dir.names.check_sae_name`),
            a name is given twice, or there is none.
    """
    checked = _checked_names(names)
    path = Path(dirpath) / RUN_INDEX_NAME
    atomic_write_json(path, {"writer": WRITER_ID, "run_format_version": RUN_FORMAT_VERSION,
                             "saes": [{"name": name, "dir": name} for name in checked]})
    return path


def is_run_folder(dirpath: PathLike) -> bool:
    """Whether ``dirpath`` holds a run index (anything by that name: reading it then says what is wrong)."""
    return lstat_or_none(Path(dirpath) / RUN_INDEX_NAME) is not None


def read_run_index(dirpath: PathLike) -> tuple[str, ...]:
    """The SAE names of the run folder ``dirpath``, in the order of its index; each ``dirpath/<name>`` is a folder.

    Raises:
        SamplesDirectoryError: The index is missing, a link, not JSON, of another writer or version, names an SAE
            badly or twice, or names a folder that is not there (a link is not followed); the message names the
            file and the fix.
    """
    root = Path(dirpath)
    path = root / RUN_INDEX_NAME
    if not is_plain_file(path):
        what = "missing" if lstat_or_none(path) is None else "not a regular file (links are not followed)"
        raise SamplesDirectoryError(f"{path} is {what}. A run of many SAEs writes it after their saves; pass a"
                                    " run folder, or one SAE's samples directory in it.")
    fix = "The file is corrupt or not ours: re-run the save, or open each SAE's samples directory DIR/<name>/."
    try:
        raw = load_json(path)
    except SamplesDirectoryError as err:
        raise SamplesDirectoryError(f"{err} Re-run the save, or open each SAE's directory DIR/<name>/.") from err
    if not isinstance(raw, dict) or raw.get("writer") != WRITER_ID:
        raise SamplesDirectoryError(f"{path} is not a run index of {WRITER_ID} (`writer` is not {WRITER_ID!r}). {fix}")
    version = raw.get("run_format_version")
    if type(version) is not int or version != RUN_FORMAT_VERSION:
        raise SamplesDirectoryError(
            f"{path} has run_format_version {version!r}, this version reads {RUN_FORMAT_VERSION}. Install the"
            " lightning-sae-samples version that wrote it."
        )
    entries = raw.get("saes")
    if not isinstance(entries, list) or not entries:
        raise SamplesDirectoryError(f"{path}: `saes` must be a non-empty list of {{\"name\", \"dir\"}} records. {fix}")
    names = []
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) != {"name", "dir"} or entry["dir"] != entry["name"]:
            raise SamplesDirectoryError(
                f"{path}: `saes[{n}]` must be {{\"name\": NAME, \"dir\": NAME}} (the folder is the name). {fix}"
            )
        try:
            names.append(check_sae_name(entry["name"]))
        except ValueError as err:
            raise SamplesDirectoryError(f"{path}: `saes[{n}]`: {err} {fix}") from err
    try:
        _checked_names(names)
    except ValueError as err:
        raise SamplesDirectoryError(f"{path}: {err} {fix}") from err
    for name in names:
        info = lstat_or_none(root / name)
        if info is None or not stat.S_ISDIR(info.st_mode):
            what = "missing" if info is None else "not a folder (links are not followed)"
            raise SamplesDirectoryError(
                f"{path} names the SAE {name!r}, but {root / name} is {what}. Restore that folder, or re-run the"
                " save that writes the run."
            )
    return tuple(names)
