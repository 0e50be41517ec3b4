"""dictionary_learning: the exact top activating contexts of an SAE that its own ``trainSAE`` trains on shuffled rows.

``trainSAE(data, trainer_configs, ...)`` draws batches of activation rows from ``data`` and hands each, after its
own transforms (``normalize_activations=True`` divides the batch by a norm factor; ``autocast_dtype`` casts it),
to every trainer's ``update(step, activations)``. Give it a :class:`~lightning_sae_samples.RowsWithRefs` as
``data``, whose batches are the activations alone with their token refs kept beside them, and a trainer class
wrapped by :func:`with_samples`: on the scheduled steps its ``update`` encodes the batch with the trainer's own
``ae`` (as the trainer is about to train on it) and folds the latents, with the refs of that batch, into a
collector. No transform of the batch can reach the refs.

The wrapper needs no import of ``dictionary_learning`` (any class with ``ae.encode`` and ``update(step, x)``
works). Example::

    rows = RowsWithRefs(DataLoader(TensorDataset(acts, refs), batch_size=4096, shuffle=True), source)
    collector = ActivationSampleCollector(num_latents=dict_size, token_source=source)
    trainSAE(rows, [dict(trainer=with_samples(TopKTrainer), collector=collector, rows=rows, collection_freq=100,
                         steps=steps, activation_dim=d, dict_size=dict_size, k=32, layer=3, lm_name="m")],
             steps=steps, normalize_activations=True, autocast_dtype=torch.bfloat16)
    collector.save("activation_samples", tokenizer)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_sae_samples.collector import ActivationSampleCollector
from lightning_sae_samples.rows_with_refs import RowsWithRefs
from lightning_sae_samples.schedule import CollectionSchedule, Frequency

__all__ = ["with_samples"]


def with_samples(trainer_class: type) -> type:
    """``trainer_class`` (a dictionary_learning trainer such as ``TopKTrainer``) that also collects samples.

    The returned class takes three more keyword arguments, which ``trainSAE`` passes from the trainer's config:
    ``collector`` (an :class:`~lightning_sae_samples.ActivationSampleCollector` reading the rows' token source),
    ``rows`` (the :class:`~lightning_sae_samples.RowsWithRefs` given to ``trainSAE`` as ``data``) and
    ``collection_freq`` (every N-th step, or a schedule ``{start_step: N, ...}``; default 1000). The other steps
    cost one schedule lookup.

    Raises:
        TypeError: ``trainer_class`` is not a class.
    """
    if not isinstance(trainer_class, type):
        raise TypeError(f"with_samples takes a trainer class (e.g. TopKTrainer), got {type(trainer_class).__name__}.")

    class SamplesTrainer(trainer_class):  # type: ignore[misc, valid-type]
        def __init__(
            self,
            *args: Any,
            collector: ActivationSampleCollector,
            rows: RowsWithRefs,
            collection_freq: Frequency = 1000,
            **kwargs: Any,
        ) -> None:
            super().__init__(*args, **kwargs)
            if not isinstance(collector, ActivationSampleCollector):
                raise TypeError(f"`collector` must be an ActivationSampleCollector, got {type(collector).__name__}.")
            if not callable(getattr(rows, "refs_for", None)):
                raise TypeError(
                    f"`rows` must be the RowsWithRefs given to trainSAE as `data`, got {type(rows).__name__}."
                )
            self.collector = collector
            self.rows = rows
            self.schedule = CollectionSchedule(collection_freq)

        def update(self, step: int, activations: Tensor) -> Any:
            if self.schedule.is_due(step):
                refs = self.rows.refs_for(activations)
                with torch.no_grad():
                    latents = self.ae.encode(_as_parameters(activations, self.ae))
                self.collector.update(token_refs=refs, latents=latents, step=step)
            return super().update(step, activations)

    SamplesTrainer.__name__ = SamplesTrainer.__qualname__ = f"Samples{trainer_class.__name__}"
    return SamplesTrainer


def _as_parameters(activations: Tensor, module: Any) -> Tensor:
    """``activations`` on the device and in the dtype of ``module``'s parameters, as its own ``update`` uses them.

    ``trainSAE`` hands the batch over where the data source made it (often the CPU) and the trainer moves it; a
    batch cast to bfloat16 meets float32 parameters, which its first operation promotes it to.
    """
    parameter = next(iter(module.parameters()), None)
    return activations if parameter is None else activations.to(parameter.device, parameter.dtype)
