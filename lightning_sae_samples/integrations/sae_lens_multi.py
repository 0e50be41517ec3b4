"""SAELens' ``MultiSAETrainer``: several SAEs trained in lockstep on one multi-hook stream, one samples directory each.

:func:`mixed_multi_hook_rows` mixes every hook's activations of a language-model batch as one row (concatenated
along the feature dimension, SAELens' own way to give all hooks one permutation) through
:func:`~lightning_sae_samples.integrations.sae_lens.mixed_rows`, so each row keeps its token ref; the provider
:class:`MultiHookRows` yields SAELens' ``dict[hook, rows]`` and tells the refs of the batch it yielded.
:class:`SamplesMultiSAETrainer` is SAELens' ``MultiSAETrainer``; on scheduled steps it folds every SAE's
``feature_acts`` with the batch's refs into a :class:`~lightning_sae_samples.MultiSAECollector` (the refs
checked once a step), saves the collection beside each SAELens checkpoint and the run folder
``samples_dir/<name>/``, and resumes both.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from sae_lens.training.multi_sae_trainer import MultiSAETrainer
from sae_lens.training.sae_trainer import SAETrainer
from torch import Tensor

from lightning_sae_samples.integrations.sae_lens import _sparse_topk, mixed_rows
from lightning_sae_samples.multi.collector import MULTI_STATE_VERSION, MultiSAECollector, load_trainer_state_file
from lightning_sae_samples.samples_dir.atomic import atomic_torch_save
from lightning_sae_samples.samples_dir.run_folder import claim_run_dir
from lightning_sae_samples.schedule import CollectionSchedule
from lightning_sae_samples.tokens import load_tokenizer

#: The collection beside each SAELens multi-SAE checkpoint.
STATE_NAME = "activation_samples_state.pt"
PathLike = Union[str, Path]


class MultiHookRows(Iterator[dict[str, Tensor]]):
    """``MultiSAETrainer``'s data provider: ``{hook: rows [N, d_hook]}`` per batch, every hook's row ``i`` of one token.

    Args:
        rows: Batches of all hooks' activations side by side ``[N, sum of widths]`` that tell their token refs by
            ``refs_of(batch)`` and hold a ``token_source`` (what :func:`mixed_rows` returns).
        widths: Each hook's width, in the order of the columns.
    """

    def __init__(self, rows: Any, widths: Mapping[str, int]) -> None:
        self.rows = rows
        self.widths = dict(widths)
        self._last: Optional[tuple[dict[str, Tensor], Optional[Tensor]]] = None

    @property
    def token_source(self) -> Any:
        """Where the refs point."""
        return self.rows.token_source

    def __iter__(self) -> MultiHookRows:
        return self

    def __next__(self) -> dict[str, Tensor]:
        batch = next(self.rows)
        refs = self.rows.refs_of(batch)
        parts = batch.split(list(self.widths.values()), dim=1)
        hooks = {hook: part.contiguous() for hook, part in zip(self.widths, parts)}
        self._last = (hooks, refs)
        return hooks

    def refs_of(self, batch: Union[Tensor, Mapping[str, Tensor]]) -> Optional[Tensor]:
        """The token refs ``[N]`` of the batch yielded last, if ``batch`` is it or one hook's rows of it."""
        if self._last is not None and (batch is self._last[0] or any(batch is rows for rows in self._last[0].values())):
            return self._last[1]
        return None

    def close(self) -> None:
        """Stop the underlying generators now rather than at interpreter exit."""
        close = getattr(self.rows, "close", None)
        if close is not None:
            close()


def mixed_multi_hook_rows(batches: Iterable[Any], **mixing: Any) -> MultiHookRows:
    """Language-model batches of several hooks as shuffled rows with token refs, one permutation for all hooks.

    Args:
        batches: Yields ``(activations, tokens)`` or ``(activations, tokens, refs)`` per language-model batch, as
            :func:`~lightning_sae_samples.integrations.sae_lens.mixed_rows` takes them, with ``activations`` a
            mapping ``{hook: [B, T, d_hook]}`` (the same hooks, in the same order, every batch).
        **mixing: :func:`~lightning_sae_samples.integrations.sae_lens.mixed_rows`' other arguments
            (``buffer_size``, ``batch_size``, ``mix_fraction``, ``exclude_token_ids``, ``token_source``, ...).

    Raises:
        ValueError: ``batches`` yields nothing, or a batch's hooks differ from the first's.
    """
    items = iter(batches)
    first = next(items, None)
    if first is None or not isinstance(first, (tuple, list)) or not isinstance(first[0], Mapping) or not first[0]:
        raise ValueError("`batches` must yield ({hook: activations [B, T, d]}, tokens [B, T]) per batch.")
    widths = {hook: int(acts.shape[-1]) for hook, acts in first[0].items()}

    def side_by_side() -> Iterator[tuple]:
        for index, (activations, *rest) in enumerate(itertools.chain([first], items)):
            if list(activations) != list(widths):
                raise ValueError(
                    f"`batches` item {index} has the hooks {list(activations)}, the first had {list(widths)}."
                )
            yield (torch.cat([activations[hook] for hook in widths], dim=-1), *rest)

    return MultiHookRows(mixed_rows(side_by_side(), **mixing), widths)


class _ReportingTrainer(SAETrainer):
    """SAELens' ``SAETrainer`` that hands each step's batch and output to ``report``."""

    def __init__(self, *args: Any, report: Callable[[Tensor, Any], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.report = report

    def step(self, batch: Tensor) -> Any:
        """SAELens' step, then the report."""
        output = super().step(batch)
        self.report(batch, output)
        return output


class SamplesMultiSAETrainer(MultiSAETrainer):
    """SAELens' ``MultiSAETrainer`` that also keeps every latent's top activating contexts, per SAE.

    Args:
        cfg: SAELens' ``SAETrainerConfig``.
        saes: Name -> ``TrainingSAE`` (each name also names its folder: letters, digits, ``.``, ``_``, ``-``).
        hook_names: Name -> the hook of its rows in the provider's batches.
        data_provider: A :class:`MultiHookRows` (:func:`mixed_multi_hook_rows`).
        evaluator: As ``MultiSAETrainer``'s.
        save_checkpoint_fn: As ``MultiSAETrainer``'s.
        collector: The collector (default: one SAE per name with its ``d_sae``, reading the provider's token
            source, with the default settings).
        collection_freq: Collect every N-th training step, or a schedule ``{start_step: N, ...}``.
        samples_dir: The run folder (default: ``activation_samples`` in ``cfg.checkpoint_path``, or in the working
            directory).
        tokenizer: Decodes the saved contexts: a tokenizer object, a Hugging Face name or path, or ``None``.
    """

    def __init__(
        self,
        cfg: Any,
        saes: Mapping[str, Any],
        hook_names: Mapping[str, str],
        data_provider: Any,
        evaluator: Any = None,
        save_checkpoint_fn: Any = None,
        *,
        collector: Optional[MultiSAECollector] = None,
        collection_freq: Union[int, dict[int, int]] = 1000,
        samples_dir: Optional[PathLike] = None,
        tokenizer: Any = None,
    ) -> None:
        super().__init__(cfg, dict(saes), dict(hook_names), data_provider, evaluator=evaluator,
                         save_checkpoint_fn=save_checkpoint_fn)
        self.trainers = {
            name: _ReportingTrainer(cfg=trainer.cfg, sae=trainer.sae, data_provider=iter(()), evaluator=None,
                                    save_checkpoint_fn=None, report=self._reporter(name))
            for name, trainer in self.trainers.items()
        }
        self.schedule = CollectionSchedule(collection_freq)
        if collector is None:
            collector = MultiSAECollector(
                {name: {"num_latents": int(sae.cfg.d_sae)} for name, sae in self.saes.items()},
                token_source=getattr(data_provider, "token_source", None),
            )
        self.collector = collector
        base = Path(cfg.checkpoint_path) if cfg.checkpoint_path is not None else Path.cwd()
        self.samples_dir = Path(samples_dir) if samples_dir is not None else base / "activation_samples"
        self.tokenizer = load_tokenizer(tokenizer)
        #: Training steps taken, counted here: SAELens' ``n_training_steps`` in a checkpoint lags by one.
        self.steps_taken = 0
        self._step_latents: dict[str, Any] = {}
        self._step_refs: Optional[Tensor] = None
        self._last_sae = list(self.trainers)[-1]
        self._saved_at: Optional[int] = None

    def _reporter(self, name: str) -> Callable[[Tensor, Any], None]:
        def report(batch: Tensor, output: Any) -> None:
            self._report(name, batch, output)

        return report

    def _report(self, name: str, batch: Tensor, output: Any) -> None:
        """Keep SAE ``name``'s latents of a scheduled step; after the last SAE's step, fold them all at once."""
        step = self.steps_taken
        if self.schedule.is_due(step):
            refs_of = getattr(self.data_provider, "refs_of", None)
            refs = refs_of(batch) if refs_of is not None else None
            if refs is None:
                raise ValueError(
                    f"{type(self).__name__}: SAE {name!r}'s batch of step {step} has no token refs. Train on a"
                    " MultiHookRows data provider (mixed_multi_hook_rows)."
                )
            self._step_refs = refs
            self._step_latents[name] = self._latents(output.feature_acts.detach())
        if name == self._last_sae:  # MultiSAETrainer steps its trainers in this order
            latents, self._step_latents = self._step_latents, {}
            if latents:
                self.collector.update(token_refs=self._step_refs, latents=latents, step=step)
            self.steps_taken += 1

    @staticmethod
    def _latents(feature_acts: Tensor) -> Any:
        """Dense ``feature_acts``, or a sparse COO's ``(indices, values)`` as SAELens' sparse mode gives them."""
        return _sparse_topk(feature_acts) if feature_acts.is_sparse else feature_acts

    def fit(self) -> Any:
        """SAELens' ``fit``, then the run folder of the whole run."""
        if self.samples_dir.is_dir():
            claim_run_dir(self.samples_dir, self.collector.names)  # refuse a folder not ours before training
        saes = super().fit()
        if self._saved_at != self.steps_taken:
            self.save_samples()
        return saes

    def save_samples(self) -> dict[str, list[int]]:
        """Write the run folder: each SAE's samples directory, then the run index."""
        self._saved_at = self.steps_taken
        return self.collector.save(self.samples_dir, self.tokenizer, global_step=self.steps_taken)

    def save_checkpoint(self, checkpoint_name: str, wandb_aliases: Optional[list[str]] = None) -> None:
        """SAELens' multi-SAE checkpoint, the collection beside it (``STATE_NAME``), then the run folder."""
        super().save_checkpoint(checkpoint_name, wandb_aliases)
        if self.cfg.checkpoint_path is not None:
            state = {"version": MULTI_STATE_VERSION, "steps_taken": self.steps_taken,
                     "collector": self.collector.state_dict()}
            atomic_torch_save(Path(self.cfg.checkpoint_path) / checkpoint_name / STATE_NAME, state)
        self.save_samples()

    def load_checkpoint(self, path: PathLike) -> None:
        """SAELens' multi-SAE checkpoint and the collection saved beside it (none: collecting starts afresh).

        Raises:
            ValueError: ``STATE_NAME`` is not a state this class wrote (the message names the file and field),
                holds other SAEs, or was collected with other settings.
        """
        super().load_checkpoint(path)
        file = Path(path) / STATE_NAME
        if not file.is_file():
            self.steps_taken = int(self.n_training_samples) // int(self.cfg.train_batch_size_samples)
            rank_zero_warn(f"{type(self).__name__}: {file} is missing, so the collection starts afresh.")
            return
        steps = load_trainer_state_file(self.collector, file, "steps_taken")
        self.steps_taken = steps
        self._saved_at = None
