"""The serialized collector state, shared by the writer and the readers; imports nothing of the engine."""

from lightning_sae_samples.state.merge import merge_states
from lightning_sae_samples.state.tables import padded_state

__all__ = ["merge_states", "padded_state"]
