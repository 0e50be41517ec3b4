"""Exact top activating contexts of every SAE latent, collected during Lightning training.

The callback (which imports Lightning) and the tensor engine are loaded on first use, so the command line and
the analyzer start without importing Lightning.
"""

from importlib import import_module
from typing import Any

from lightning_sae_samples.analyzer import (
    DRIFT_THRESHOLD,
    ActivationSampleAnalyzer,
    FeatureSamples,
    FeatureStats,
    IntervalGroup,
    RunSummary,
    Sample,
    UnknownFeatureError,
    write_report,
)
from lightning_sae_samples.storage import SamplesDirectory, SamplesDirectoryError, read_samples_dir

_LAZY = {
    "ActivationSampleCallback": "lightning_sae_samples.callback",
    "ActivationSampleCollector": "lightning_sae_samples.activation_collector",
    "CollectionSchedule": "lightning_sae_samples.schedule",
    "CollectorConfig": "lightning_sae_samples.collector",
    "SampleCollector": "lightning_sae_samples.collector",
    "merge_states": "lightning_sae_samples.collector",
    "LatentInputError": "lightning_sae_samples.inputs",
    "LogitEffects": "lightning_sae_samples.logit_effects",
    "TokenEffect": "lightning_sae_samples.logit_effects",
}

__all__ = [
    "DRIFT_THRESHOLD",
    "ActivationSampleAnalyzer",
    "ActivationSampleCallback",
    "ActivationSampleCollector",
    "CollectionSchedule",
    "CollectorConfig",
    "FeatureSamples",
    "FeatureStats",
    "IntervalGroup",
    "LatentInputError",
    "LogitEffects",
    "RunSummary",
    "Sample",
    "SampleCollector",
    "SamplesDirectory",
    "SamplesDirectoryError",
    "TokenEffect",
    "UnknownFeatureError",
    "merge_states",
    "read_samples_dir",
    "write_report",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_sae_samples' has no attribute {name!r}")
