"""The names a samples directory holds, and which of them this writer produces."""

from __future__ import annotations

import os
import re
from typing import Any, Union

SUMMARY_NAME = "collection_summary.json"


FULL_STATE_NAME = "full_state.pt"
#: The full state of sharded latents in parts (``full_state-00001-of-0000n.pt``, ...) and their index.
FULL_STATE_INDEX_NAME = "full_state.index.json"


#: The SAE's decoder directions, unit rows ``[F, d_model]`` in a compact dtype, for a latent's neighbours.
DECODER_NAME = "decoder_directions.pt"


REPORT_NAME = "interpretability_report.md"


#: Every latent's story through training: one window per save (see ``docs/history.md``).
HISTORY_NAME = "training_history.pt"
#: The history of sharded latents in parts (``training_history-00001-of-0000n.pt``, ...) and their index.
HISTORY_INDEX_NAME = "training_history.index.json"


MANIFEST_NAME = "sae_samples_manifest.json"


LOCK_NAME = "sae_samples.lock"


PENDING_DIR = ".sae_samples_pending"


PENDING_MARKER = "WRITER"


#: A pending directory is made under ``<prefix><unique>``, given its marker there, then renamed to ``PENDING_DIR``:
#: so ``PENDING_DIR`` never exists without the marker that proves it ours.
PENDING_STAGING_PREFIX = f"{PENDING_DIR}.new-"


COMMIT_NAME = "COMMIT"
#: Evaluation-run snapshots, each a complete samples directory ``snapshots/step_<N>/`` inside the training one.
SNAPSHOTS_DIR = "snapshots"


#: The explainer's sidecar folder (``explanations.jsonl`` and its lock); saves never touch it.
EXPLANATIONS_DIR = "explanations"


EXPLANATIONS_NAME = "explanations.jsonl"


EXPLANATIONS_LOCK = "explanations.lock"


WRITER_ID = "lightning-sae-samples"


#: The run index of a run folder of many SAEs (``DIR/<name>/`` each a samples directory); see ``docs/format.md``.
RUN_INDEX_NAME = "sae_samples_run.json"


RUN_FORMAT_VERSION = 1


_SAE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


_FEATURE_FILE = re.compile(r"^feature_(\d+)_samples\.json$")


_FULL_STATE_PART = re.compile(r"^full_state-(\d{5})-of-(\d{5})\.pt$")


_HISTORY_PART = re.compile(r"^training_history-(\d{5})-of-(\d{5})\.pt$")


_FIXED_NAMES = frozenset({SUMMARY_NAME, FULL_STATE_NAME, DECODER_NAME, REPORT_NAME, MANIFEST_NAME, HISTORY_NAME,
                          FULL_STATE_INDEX_NAME, HISTORY_INDEX_NAME})


PathLike = Union[str, os.PathLike]


class SamplesDirectoryError(ValueError):
    """A samples directory is missing, empty, corrupt, of an unknown format version, or not ours to write."""


def feature_filename(feature_idx: int) -> str:
    """File name of one feature's samples."""
    return f"feature_{int(feature_idx):05d}_samples.json"


def _is_feature_name(name: str) -> bool:
    match = _FEATURE_FILE.fullmatch(name)
    return match is not None and feature_filename(int(match.group(1))) == name


def full_state_part_name(number: int, count: int) -> str:
    """File name of part ``number`` (from 1) of a full state in ``count`` parts."""
    return f"full_state-{int(number):05d}-of-{int(count):05d}.pt"


def is_full_state_part_name(name: str) -> bool:
    """Whether ``name`` is the name of a part of a full state in parts."""
    match = _FULL_STATE_PART.fullmatch(name)
    return match is not None and 1 <= int(match.group(1)) <= int(match.group(2))


def history_part_name(number: int, count: int) -> str:
    """File name of part ``number`` (from 1) of a history in ``count`` parts."""
    return f"training_history-{int(number):05d}-of-{int(count):05d}.pt"


def is_history_part_name(name: str) -> bool:
    """Whether ``name`` is the name of a part of a history in parts."""
    match = _HISTORY_PART.fullmatch(name)
    return match is not None and 1 <= int(match.group(1)) <= int(match.group(2))


def _is_stale_name(name: str) -> bool:
    """A file a later save may remove when it does not write it again: a feature file, the full state, the decoder.

    A history's parts and index too: a save that writes the history whole replaces them.
    """
    return (name in (FULL_STATE_NAME, FULL_STATE_INDEX_NAME, DECODER_NAME, HISTORY_INDEX_NAME)
            or _is_feature_name(name) or is_full_state_part_name(name) or is_history_part_name(name))


def is_writer_name(name: Any) -> bool:
    """Whether ``name`` is a plain file name the writer produces (no separator, no ``..``, nothing else)."""
    return isinstance(name, str) and (name in _FIXED_NAMES or _is_feature_name(name) or is_full_state_part_name(name)
                                      or is_history_part_name(name))


def snapshot_dirname(global_step: int) -> str:
    """Folder name of the snapshot taken with the weights of ``global_step``."""
    return f"step_{int(global_step)}"


def check_sae_name(name: Any) -> str:
    """``name`` if it can name an SAE of a run and its folder ``DIR/<name>/``, else a ``ValueError`` saying why.

    1 to 100 characters of ``[A-Za-z0-9._-]``, starting with a letter or digit (hook names such as
    ``layers.3.mlp`` or ``blocks.3.hook_resid_pre`` fit), and not a folder a samples directory holds itself.
    """
    if not isinstance(name, str) or not 1 <= len(name) <= 100 or not _SAE_NAME.fullmatch(name):
        raise ValueError(
            f"SAE name {name!r} is not 1-100 characters of letters, digits, '.', '_' and '-' starting with a letter"
            " or digit (e.g. 'layers.3.mlp'); it names the SAE's folder in the run."
        )
    if name in (SNAPSHOTS_DIR, EXPLANATIONS_DIR):
        raise ValueError(f"SAE name {name!r} is the name of a folder a samples directory holds; choose another.")
    return name
