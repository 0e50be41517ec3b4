"""The names a samples directory holds, and which of them this writer produces."""

from __future__ import annotations

import os
import re
from typing import Any, Union

SUMMARY_NAME = "collection_summary.json"


FULL_STATE_NAME = "full_state.pt"


#: The SAE's decoder directions, unit rows ``[F, d_model]`` in a compact dtype, for a latent's neighbours.
DECODER_NAME = "decoder_directions.pt"


REPORT_NAME = "interpretability_report.md"


#: Every latent's story through training: one window per save (see ``docs/history.md``).
HISTORY_NAME = "training_history.pt"


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


_FEATURE_FILE = re.compile(r"^feature_(\d+)_samples\.json$")


_FIXED_NAMES = frozenset({SUMMARY_NAME, FULL_STATE_NAME, DECODER_NAME, REPORT_NAME, MANIFEST_NAME, HISTORY_NAME})


PathLike = Union[str, os.PathLike]


class SamplesDirectoryError(ValueError):
    """A samples directory is missing, empty, corrupt, of an unknown format version, or not ours to write."""


def feature_filename(feature_idx: int) -> str:
    """File name of one feature's samples."""
    return f"feature_{int(feature_idx):05d}_samples.json"


def _is_feature_name(name: str) -> bool:
    match = _FEATURE_FILE.fullmatch(name)
    return match is not None and feature_filename(int(match.group(1))) == name


def _is_stale_name(name: str) -> bool:
    """A file a later save may remove when it does not write it again: a feature file, the full state, the decoder."""
    return name in (FULL_STATE_NAME, DECODER_NAME) or _is_feature_name(name)


def is_writer_name(name: Any) -> bool:
    """Whether ``name`` is a plain file name the writer produces (no separator, no ``..``, nothing else)."""
    return isinstance(name, str) and (name in _FIXED_NAMES or _is_feature_name(name))


def snapshot_dirname(global_step: int) -> str:
    """Folder name of the snapshot taken with the weights of ``global_step``."""
    return f"step_{int(global_step)}"
