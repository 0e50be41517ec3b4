"""The tensor engine: pure torch, no Lightning and no I/O.

One vectorized pass per collected batch folds latents into a :class:`SampleCollector`: exact per-latent
top-k samples with their context windows, interval and recent samples, and streaming statistics.
"""

from lightning_sae_samples.engine.memory import estimate_state_bytes
from lightning_sae_samples.engine.sample_collector import SampleCollector
from lightning_sae_samples.engine.sample_table import MergePolicy

__all__ = ["MergePolicy", "SampleCollector", "estimate_state_bytes"]
