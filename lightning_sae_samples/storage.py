"""Deprecated: the samples directory moved to :mod:`lightning_sae_samples.samples_dir` (one module per idea)."""

from lightning_sae_samples._moved import forwarder, homes_of

__getattr__ = forwarder(
    __name__,
    homes_of(
        "lightning_sae_samples.samples_dir.names",
        "lightning_sae_samples.samples_dir.atomic",
        "lightning_sae_samples.samples_dir.files",
        "lightning_sae_samples.samples_dir.commit",
        "lightning_sae_samples.samples_dir.serialize",
        "lightning_sae_samples.samples_dir.writer",
        "lightning_sae_samples.samples_dir.reader",
    ),
)
