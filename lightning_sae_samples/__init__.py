"""Exact top activating contexts of every SAE latent, collected during Lightning training."""

from lightning_sae_samples.callback import ActivationSampleCallback
from lightning_sae_samples.collector import CollectorConfig, SampleCollector, merge_states
from lightning_sae_samples.inputs import LatentInputError
from lightning_sae_samples.schedule import CollectionSchedule
from lightning_sae_samples.storage import SamplesDirectory, SamplesDirectoryError, read_samples_dir

__all__ = [
    "ActivationSampleCallback",
    "CollectionSchedule",
    "CollectorConfig",
    "LatentInputError",
    "SampleCollector",
    "SamplesDirectory",
    "SamplesDirectoryError",
    "merge_states",
    "read_samples_dir",
]
