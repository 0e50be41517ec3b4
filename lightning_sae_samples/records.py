"""Deprecated: the records moved to :mod:`lightning_sae_samples.analysis.records`."""

from lightning_sae_samples._moved import forwarder, homes_of

__getattr__ = forwarder(__name__, homes_of("lightning_sae_samples.analysis.records"))
