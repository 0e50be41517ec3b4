"""EleutherAI sparsify: its own ``Trainer`` on several ``hookpoints``, with one samples directory per hookpoint.

:class:`SamplesSparsifyTrainer` is sparsify's ``Trainer``, unchanged in what it trains. On the steps
``collection_freq`` schedules, forward hooks on its SAEs (opened only for those language-model passes) catch each
``ForwardOutput`` (``latent_indices``, ``latent_acts``), and the batch's ``input_ids`` are their tokens; a
:class:`~lightning_sae_samples.MultiSAECollector` keeps them by hookpoint. Each sparsify checkpoint (``save``)
writes the collection beside it and the run folder ``samples_dir/<hookpoint>/``; ``load_state`` restores both.

With ``distribute_modules=True`` each rank trains only its own SAEs, on the batch of every rank (sparsify gathers
each hookpoint's outputs, in rank order, onto the SAE's rank). So each rank collects only its own SAEs, with the
gathered batch's tokens, writes their folders and its own collection state (``state_name(rank)``), and rank 0
writes the run index naming the SAEs of every rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch
from sparsify import Trainer
from torch import Tensor

from lightning_sae_samples.multi.capture import LatentCapture
from lightning_sae_samples.multi.collector import MULTI_STATE_VERSION, MultiSAECollector, load_trainer_state_file
from lightning_sae_samples.samples_dir.atomic import atomic_torch_save
from lightning_sae_samples.schedule import CollectionSchedule
from lightning_sae_samples.tokens import load_tokenizer

#: The collection beside each sparsify checkpoint.
STATE_NAME = "activation_samples_state.pt"
PathLike = Union[str, Path]


def state_name(rank: Optional[int] = None) -> str:
    """The collection's file beside a checkpoint: ``STATE_NAME``, or with ``distribute_modules`` one per rank."""
    return STATE_NAME if rank is None else f"activation_samples_state_rank_{rank}.pt"


def sae_name(sparsify_name: str) -> str:
    """The SAE (and folder) name of one of sparsify's SAEs: ``layers.3``, or ``layers.3.seed1`` for ``/seed1``."""
    return sparsify_name.replace("/", ".")


class SamplesSparsifyTrainer(Trainer):
    """sparsify's ``Trainer`` that also keeps every latent's top activating contexts, per hookpoint.

    Args:
        cfg: sparsify's ``TrainConfig`` (``loss_fn="fvu"``, the default, or ``"ce"``/``"kl"``).
        dataset: sparsify's dataset of ``input_ids`` sequences.
        model: The language model.
        samples_dir: The run folder: ``<hookpoint>/`` per SAE and the run index (default:
            ``<cfg.save_dir>/<run name>/activation_samples``).
        collection_freq: Collect every N-th optimizer step, or a schedule ``{start_step: N, ...}``.
        tokenizer: Decodes the saved contexts: a tokenizer object, a Hugging Face name or path, or ``None``.
        **settings: Fields of :class:`~lightning_sae_samples.CollectionConfig` for every SAE (``exclude_token_ids``
            defaults to ``cfg.exclude_tokens``, which sparsify does not train on).

    Raises:
        ValueError: ``micro_acc_steps > 1``, which this class does not collect yet.
    """

    def __init__(
        self,
        cfg: Any,
        dataset: Any,
        model: Any,
        *,
        samples_dir: Optional[PathLike] = None,
        collection_freq: Union[int, dict[int, int]] = 1000,
        tokenizer: Any = None,
        **settings: Any,
    ) -> None:
        if cfg.micro_acc_steps > 1:
            raise ValueError(
                f"{type(self).__name__} does not collect with micro_acc_steps > 1 yet (an SAE then runs several"
                " times a batch). Use grad_acc_steps instead."
            )
        super().__init__(cfg, dataset, model)
        self.schedule = CollectionSchedule(collection_freq)
        self.exclude_tokens_ids = [int(t) for t in cfg.exclude_tokens]
        settings.setdefault("exclude_token_ids", self.exclude_tokens_ids)
        # With distribute_modules, ``self.saes`` holds this rank's SAEs only.
        self.samples = MultiSAECollector(
            {sae_name(name): {"num_latents": int(sae.num_latents)} for name, sae in self.saes.items()},
            process_local=bool(cfg.distribute_modules), **settings,
        )
        self.checkpoint_dir = Path(cfg.save_dir) / (cfg.run_name or "unnamed")
        self.samples_dir = Path(samples_dir) if samples_dir is not None else self.checkpoint_dir / "activation_samples"
        self.tokenizer = load_tokenizer(tokenizer)
        self._capture = LatentCapture({sae_name(name): sae for name, sae in self.saes.items()})
        self._batch_tokens: Optional[Tensor] = None
        self._batch = -1
        #: Batches the restored collection covers: a checkpoint of sparsify's records the step of the last batch
        #: it trained, which a resumed ``fit`` trains again; the collection does not count it twice.
        self._batches_collected = 0
        self.model.register_forward_pre_hook(self._before_model, with_kwargs=True)
        self.model.register_forward_hook(self._after_model)

    @property
    def optimizer_step(self) -> int:
        """The optimizer step of the batch being trained (sparsify counts batches in ``global_step``)."""
        return self.global_step // self.cfg.grad_acc_steps

    def _before_model(self, module: Any, args: tuple, kwargs: dict) -> None:
        """On a scheduled step, keep the batch's tokens and hook the SAEs for this language-model pass."""
        self._batch = self.global_step
        if self.global_step < self._batches_collected or not self.schedule.is_due(self.optimizer_step):
            return
        tokens = args[0] if args else kwargs.get("input_ids")
        if isinstance(tokens, Tensor):
            self._batch_tokens = self._gathered(tokens) if self.cfg.distribute_modules else tokens
            self._capture.open()

    @staticmethod
    def _gathered(tokens: Tensor) -> Tensor:
        """Every rank's batch ``[world * B, T]`` in rank order: the rows sparsify gathers for each SAE's rank."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return tokens
        world = tokens.new_empty(tokens.shape[0] * torch.distributed.get_world_size(), *tokens.shape[1:])
        torch.distributed.all_gather_into_tensor(world, tokens.contiguous())
        return world

    def _after_model(self, module: Any, args: tuple, output: Any) -> None:
        """Fold what the SAEs returned during the pass (none in a clean pass of ``loss_fn="kl"``)."""
        if not self._capture.is_open:
            return
        self._capture.close()
        outputs, tokens, self._batch_tokens = self._capture.take(), self._batch_tokens, None
        if not outputs:
            return
        latents = {name: self._per_token(tokens, out) for name, out in outputs.items()}
        self.samples.update(tokens, latents=latents, step=self.optimizer_step)

    def _per_token(self, tokens: Tensor, out: Any) -> tuple[Tensor, Tensor]:
        """An SAE's ``(indices, values)`` ``[B*T, k]``: sparsify encodes only the tokens it trains on."""
        indices, values = out.latent_indices, out.latent_acts
        if not self.exclude_tokens_ids:
            return indices, values
        kept = ~torch.isin(tokens, torch.tensor(self.exclude_tokens_ids, device=tokens.device)).view(-1)
        # Excluded tokens are never collected (exclude_token_ids); they get distinct indices with value 0.
        all_indices = torch.arange(indices.shape[-1], device=indices.device).expand(kept.numel(), -1).clone()
        all_values = values.new_zeros(kept.numel(), values.shape[-1])
        all_indices[kept], all_values[kept] = indices, values
        return all_indices, all_values

    def save(self) -> None:
        """The sparsify checkpoint, the collection beside it (:func:`state_name`), then the run folder."""
        super().save()
        batches = max(self._batch + 1, self._batches_collected)
        state = {"version": MULTI_STATE_VERSION, "batches": batches, "collector": self.samples.state_dict()}
        if self.cfg.distribute_modules or self._rank() == 0:
            atomic_torch_save(self.checkpoint_dir / self._state_name(), state)
        self.save_samples()

    def _state_name(self) -> str:
        return state_name(self._rank() if self.cfg.distribute_modules else None)

    def save_samples(self) -> dict[str, list[int]]:
        """Write the run folder (a collective under DDP); each SAE's saved feature indices, best first."""
        return self.samples.save(self.samples_dir, self.tokenizer, global_step=self.optimizer_step)

    def load_state(self, path: str) -> None:
        """The sparsify state and the collection saved beside it (a checkpoint without one starts afresh).

        Raises:
            ValueError: The collection's file is not a state this class wrote, or holds other SAEs.
        """
        super().load_state(path)
        file = Path(path) / self._state_name()
        if not file.is_file():
            return
        batches = load_trainer_state_file(self.samples, file, "batches")
        self._batches_collected = batches

    def _rank(self) -> int:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        return torch.distributed.get_rank() if distributed else 0
