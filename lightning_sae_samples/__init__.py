"""Exact top activating contexts of every SAE latent, collected during Lightning training.

The callback (which imports Lightning) and the collector are loaded on first use, so the command line and
the analyzer start without importing Lightning.
"""

from __future__ import annotations

import warnings
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from lightning_sae_samples.analysis.analyzer import ActivationSampleAnalyzer, UnknownFeatureError
from lightning_sae_samples.analysis.records import (
    DRIFT_THRESHOLD,
    FeatureSamples,
    FeatureStats,
    IntervalGroup,
    RunSummary,
    Sample,
)
from lightning_sae_samples.analysis.reports import write_report
from lightning_sae_samples.samples_dir.names import SamplesDirectoryError
from lightning_sae_samples.samples_dir.reader import SamplesDirectory, SaveChangedError, read_samples_dir

try:
    __version__ = version("lightning-sae-samples")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"

_LAZY = {
    "ActivationSampleCallback": "lightning_sae_samples.callback",
    "ActivationSampleCollector": "lightning_sae_samples.collector",
    "CollectionConfig": "lightning_sae_samples.config",
    "CollectionSchedule": "lightning_sae_samples.schedule",
    "LatentInputError": "lightning_sae_samples.inputs",
    "LogitEffects": "lightning_sae_samples.analysis.records",
    "RowsWithRefs": "lightning_sae_samples.rows_with_refs",
    "TokenEffect": "lightning_sae_samples.analysis.records",
}
# Engine internals that the top level exported in 0.1; they still resolve, with a DeprecationWarning.
_MOVED = {
    "SampleCollector": "lightning_sae_samples.engine",
    "estimate_state_bytes": "lightning_sae_samples.engine",
    "merge_states": "lightning_sae_samples.state",
    "padded_state": "lightning_sae_samples.state",
}

__all__ = [
    "DRIFT_THRESHOLD",
    "ActivationSampleAnalyzer",
    "ActivationSampleCallback",
    "ActivationSampleCollector",
    "CollectionConfig",
    "CollectionSchedule",
    "FeatureSamples",
    "FeatureStats",
    "IntervalGroup",
    "LatentInputError",
    "LogitEffects",
    "RowsWithRefs",
    "RunSummary",
    "Sample",
    "SamplesDirectory",
    "SamplesDirectoryError",
    "SaveChangedError",
    "TokenEffect",
    "UnknownFeatureError",
    "__version__",
    "read_samples_dir",
    "write_report",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    if name in _MOVED:
        warnings.warn(
            f"`lightning_sae_samples.{name}` is an engine internal and moved to `{_MOVED[name]}.{name}`; the"
            " top-level name goes away in the next release.",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'lightning_sae_samples' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
