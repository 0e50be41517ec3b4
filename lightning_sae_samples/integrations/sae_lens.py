"""SAELens: the exact top activating contexts of an SAE that SAELens' own ``SAETrainer`` trains on shuffled rows.

SAELens trains on rows of activations mixed across many language-model batches: its ``mixing_buffer`` shuffles
the rows of a buffer with one ``torch.randperm``, after special tokens were dropped. Here every row's token ref
(:mod:`lightning_sae_samples.token_sources`) goes through that same filtering and that same permutation: inside
:func:`mixed_rows` only, the ref's 8 bytes ride as extra columns of the rows (viewed in their dtype; the buffer
only concatenates and indexes, which copies them bit for bit), and :class:`TokenRefRows` splits them off as each
batch leaves the buffer. From there on the refs travel beside the activations
(:class:`~lightning_sae_samples.RowsWithRefs`): SAELens' activation scaler, evaluators and the SAE see exactly the
rows they would see without refs, and no transform of them can reach the refs.

:class:`SamplesSAETrainer` is SAELens' ``SAETrainer`` that feeds an
:class:`~lightning_sae_samples.ActivationSampleCollector` from its public ``step`` on the scheduled steps,
writes the samples directory at every SAELens checkpoint and at the end of ``fit``, and keeps the collector's
state beside SAELens' trainer state (``save_trainer_state`` / ``load_trainer_state``) for an exact resume.

Needs ``pip install 'lightning-sae-samples[sae-lens]'``. Example (``examples/sae_lens_rows.py`` runs one)::

    rows = mixed_rows(lm_batches, buffer_size=64 * 128, batch_size=4096, exclude_token_ids=[cls_id, sep_id])
    trainer = SamplesSAETrainer(cfg, sae, rows, collection_freq=100, samples_dir="samples", tokenizer=tokenizer)
    trainer.fit()  # writes samples/, readable by ActivationSampleAnalyzer and `lightning-sae-samples`
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_info, rank_zero_warn
from sae_lens.training.mixing_buffer import mixing_buffer
from sae_lens.training.sae_trainer import SAETrainer
from torch import Tensor

from lightning_sae_samples.collector import ActivationSampleCollector
from lightning_sae_samples.inputs import LatentInputError
from lightning_sae_samples.rows_with_refs import RowsWithRefs
from lightning_sae_samples.samples_dir.atomic import atomic_torch_save
from lightning_sae_samples.samples_dir.commit import claim_samples_dir
from lightning_sae_samples.schedule import CollectionSchedule, Frequency
from lightning_sae_samples.state.validate import check_state
from lightning_sae_samples.token_sources import TokenRing, TokenSource
from lightning_sae_samples.tokens import load_tokenizer

__all__ = [
    "STATE_NAME",
    "SamplesSAETrainer",
    "TokenRefRows",
    "activations_store_rows",
    "mixed_rows",
    "pack_refs",
    "ring_capacity",
    "unpack_refs",
]

#: The collector's state, written beside SAELens' trainer state in every checkpoint folder.
STATE_NAME = "activation_samples_state.pt"
STATE_VERSION = 1
_REF_BYTES = torch.empty((), dtype=torch.int64).element_size()
# A row outlives the ring with chance below this over this many rows (see ring_capacity).
_RISK, _MAX_ROWS = 1e-9, 10**12
PathLike = Union[str, Path]


# ---------------------------------------------------------------------------------------------- refs as columns
# Inside mixed_rows only. Each packed ref carries a 24-bit check of its 40 bits, so that a packed tensor that was
# transformed (scaled, normalized) on its way is refused by unpack_refs instead of giving other refs in range.
_REF_BITS, _CHECK_BITS = 40, 24
_REF_MASK = (1 << _REF_BITS) - 1
_CHECK_MASK = (1 << _CHECK_BITS) - 1
_CHECK_MULTIPLIER = 0x2545F4914F6CDD1D  # an odd 64-bit constant: multiplying spreads every bit of a ref


def _check_bits(refs: Tensor) -> Tensor:
    # Wrapping int64 multiplication, top bits kept (a multiplicative hash).
    return ((refs * _CHECK_MULTIPLIER) >> (64 - _CHECK_BITS)) & _CHECK_MASK


def ref_columns(dtype: torch.dtype) -> int:
    """Columns of ``dtype`` that hold one int64 ref (2 for float32, 4 for bfloat16 and float16)."""
    size = torch.empty((), dtype=dtype).element_size()
    if _REF_BYTES % size:
        raise ValueError(f"Token refs cannot ride in activations of dtype {dtype} (element size {size} bytes).")
    return _REF_BYTES // size


def _pack(activations: Tensor, refs: Tensor) -> Tensor:
    if activations.dim() != 2 or refs.numel() != activations.shape[0]:
        raise ValueError(
            f"pack_refs needs activations [N, d] and one ref per row, got {tuple(activations.shape)} and"
            f" {refs.numel()} refs."
        )
    refs = refs.to(device=activations.device, dtype=torch.int64).reshape(-1, 1)
    bits = ((_check_bits(refs) << _REF_BITS) | (refs & _REF_MASK)).contiguous()
    return torch.cat([activations, bits.view(activations.dtype)], dim=1)


def _unpack(packed: Tensor, d_in: int) -> tuple[Tensor, Tensor]:
    """The rows and the packed ref bits (see :func:`_refs` and :func:`_intact`)."""
    extra = ref_columns(packed.dtype)
    if packed.dim() != 2 or packed.shape[1] != d_in + extra:
        raise ValueError(
            f"A batch of shape {tuple(packed.shape)} does not hold rows of width {d_in} with their token refs"
            f" ({extra} more columns of {packed.dtype}). If it was cast after packing (e.g. to bfloat16), the ref"
            " columns were converted, not copied: carry the refs beside the activations (RowsWithRefs), or pass"
            " the batches of `mixed_rows` / `TokenRefRows`."
        )
    # A fresh contiguous copy: a one-row slice counts as contiguous at an odd offset, which view refuses.
    bits = packed[:, d_in:].clone(memory_format=torch.contiguous_format).view(torch.int64).view(-1)
    return packed[:, :d_in].contiguous(), bits


def _refs(bits: Tensor) -> Tensor:
    return bits & _REF_MASK


def _intact(bits: Tensor) -> Tensor:
    """``[N]`` bool: each packed ref's check bits hold (False where the bytes were bent on the way)."""
    return (bits >> _REF_BITS) & _CHECK_MASK == _check_bits(_refs(bits))


def pack_refs(activations: Tensor, refs: Tensor) -> Tensor:
    """Rows ``[N, d]`` and their int64 refs ``[N]`` (below 2**40) as one ``[N, d + c]`` tensor.

    ``c`` is :func:`ref_columns`.

    .. deprecated:: Refs that ride inside the activations are bent by any transform of them (a trainer's
       normalization divides them, a cast converts them). Yield ``(activations, refs)`` to
       :class:`~lightning_sae_samples.RowsWithRefs` instead, which keeps them beside.

    The refs' bytes are viewed in the activations' dtype, never converted: indexing and concatenation copy them
    bit for bit, and :func:`unpack_refs` gets them back exactly, or refuses a tensor that was transformed.
    """
    warnings.warn(_COLUMNS_DEPRECATED.format("pack_refs"), DeprecationWarning, stacklevel=2)
    return _pack(activations, refs)


def unpack_refs(packed: Tensor, d_in: int) -> tuple[Tensor, Tensor]:
    """The rows ``[N, d_in]`` (contiguous, as the SAE would get them) and their refs ``[N]`` of :func:`pack_refs`.

    .. deprecated:: See :func:`pack_refs`.

    Raises:
        ValueError: ``packed`` is not ``d_in`` columns and the refs, or its ref columns were changed on the way
            (e.g. the whole batch was scaled or normalized): the refs would name other tokens.
    """
    warnings.warn(_COLUMNS_DEPRECATED.format("unpack_refs"), DeprecationWarning, stacklevel=2)
    rows, bits = _unpack(packed, d_in)
    intact = _intact(bits)
    if not bool(intact.all()):
        row = int((~intact).nonzero()[0, 0])
        raise ValueError(
            f"unpack_refs: the token ref of row {row} was changed after pack_refs (its check bits no longer match),"
            " or was not below 2**40: the batch was transformed with its ref columns (a normalization or scaling of"
            " the whole batch), so every ref may name another token. Carry the refs beside the activations: yield"
            " (activations, refs) to RowsWithRefs and ask rows.refs_for(batch) at the collection step."
        )
    return rows, _refs(bits)


_COLUMNS_DEPRECATED = (
    "{} is deprecated: refs carried as columns of the activations are bent by a trainer's transforms (a"
    " normalization divides them, a cast converts them). Yield (activations, refs) batches to"
    " lightning_sae_samples.RowsWithRefs, which keeps them beside the activations."
)


def ring_capacity(buffer_size: int, llm_batch_tokens: int, mix_fraction: float, tokens_per_row: float = 1.0) -> int:
    """Tokens a :class:`TokenRing` must hold so that no row leaves it before the mixing buffer serves it.

    "No row" up to a chance below 1e-9 over 10**12 rows.

    Each time the buffer serves, a row stays in it with chance at most ``mix_fraction``, and between two serves
    fewer than ``buffer_size * tokens_per_row + llm_batch_tokens`` tokens are added (``tokens_per_row``: tokens
    per row kept after filtering). A ring of ``rounds + 1`` such spans covers every row that stays fewer than
    ``rounds`` serves.
    """
    fraction = min(max(float(mix_fraction), 0.0), 0.999)
    rounds = 1 if fraction == 0 else max(1, math.ceil(math.log(_RISK / _MAX_ROWS) / math.log(fraction)))
    return int((rounds + 1) * (math.ceil(buffer_size * max(tokens_per_row, 1.0)) + llm_batch_tokens))


# ---------------------------------------------------------------------------------------------- data providers
class TokenRefRows(RowsWithRefs):
    """``SAETrainer``'s data provider: batches of activation rows, each batch with the token refs of its rows.

    A :class:`~lightning_sae_samples.RowsWithRefs` over batches whose refs rode as columns through SAELens'
    mixing buffer (:func:`mixed_rows`): iterating yields the rows ``[batch_size, d_in]`` only (so SAELens'
    activation scaler and evaluators see plain activations); :meth:`refs_for` gives the refs of the batch it
    yielded last, as the trainer holds it.

    Args:
        packed_batches: Batches of rows with their refs as columns (what SAELens' ``mixing_buffer`` yields for
            :func:`mixed_rows`).
        d_in: The activations' width.
        token_source: Where the refs point (the collector reads the context windows there).
    """

    def __init__(self, packed_batches: Iterable[Tensor], d_in: int, token_source: TokenSource) -> None:
        self.d_in = d_in
        self._packed = iter(packed_batches)
        # Only SAELens' buffer (concatenation, indexing) touched the columns since _pack: the bits are the refs.
        split = (_unpack(packed, d_in) for packed in self._packed)
        super().__init__(((rows, _refs(bits)) for rows, bits in split), token_source)

    def close(self) -> None:
        """Stop the underlying generators (SAELens' mixing buffer) now rather than at interpreter exit."""
        super().close()
        close = getattr(self._packed, "close", None)
        if close is not None:
            close()

    def refs_of(self, batch: Tensor) -> Optional[Tensor]:
        """The token refs ``[N]`` of ``batch`` if it is the very tensor yielded last, else ``None``.

        :meth:`refs_for` also takes the trainer's copy of the batch (moved, scaled, cast) and says why it refuses.
        """
        if self._last is not None and batch is self._last[0]:
            return self._last[1]
        return None


def _parse(item: Any, index: int) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
        raise ValueError(
            f"`batches` item {index} must be (activations, tokens) or (activations, tokens, refs), got"
            f" {type(item).__name__}."
        )
    activations, tokens, refs = (*item, None) if len(item) == 2 else item
    if not isinstance(tokens, Tensor) or tokens.dim() != 2:
        raise ValueError(f"`batches` item {index}: tokens must be [B, T] token ids, got {_shape(tokens)}.")
    if not isinstance(activations, Tensor) or activations.dim() not in (2, 3):
        raise ValueError(
            f"`batches` item {index}: activations must be [B, T, d] or [B*T, d], got {_shape(activations)}."
        )
    activations = activations.reshape(-1, activations.shape[-1])
    if activations.shape[0] != tokens.numel():
        raise ValueError(
            f"`batches` item {index}: {activations.shape[0]} activation rows for {tokens.numel()} tokens"
            f" {tuple(tokens.shape)}; give one row per token."
        )
    if refs is not None and (not isinstance(refs, Tensor) or refs.numel() != tokens.numel()):
        raise ValueError(f"`batches` item {index}: refs must hold one ref per token, got {_shape(refs)}.")
    return activations, tokens, refs


def _shape(value: Any) -> str:
    return str(tuple(value.shape)) if isinstance(value, Tensor) else type(value).__name__


def mixed_rows(
    batches: Iterable[Any],
    *,
    buffer_size: int,
    batch_size: int,
    mix_fraction: float = 0.5,
    exclude_token_ids: Optional[Sequence[int]] = None,
    token_source: Optional[TokenSource] = None,
    pad_token_id: Optional[int] = None,
    ring_capacity_tokens: Optional[int] = None,
) -> TokenRefRows:
    """Language-model batches as shuffled rows with token refs, through SAELens' own ``mixing_buffer``.

    Args:
        batches: Yields ``(activations, tokens)`` per language-model batch, activations ``[B, T, d]`` (or
            ``[B*T, d]``) and tokens ``[B, T]``; each batch's tokens are added to a :class:`TokenRing` (made here
            unless ``token_source`` is one) and its rows get their refs there. Or ``(activations, tokens, refs)``
            with refs ``[B, T]`` into ``token_source``, e.g. an ``ArrayTokenSource`` over pretokenized ``[S, T]``
            data, where sequence ``s``, position ``t`` has the ref ``s * T + t``.
        buffer_size: SAELens' mixing buffer size in rows (an ``ActivationsStore`` uses
            ``n_batches_in_buffer * context_size``).
        batch_size: Rows per training batch (``train_batch_size_tokens``).
        mix_fraction: Share of the buffer kept for mixing (``activations_mixing_fraction``).
        exclude_token_ids: Rows of these tokens are dropped before mixing, as SAELens' ``exclude_special_tokens``
            drops them (they still show in their neighbours' windows).
        token_source: Where ``refs`` point, or the ring to add the batches to.
        pad_token_id: The ring made here treats this id as padding (windows stop at it).
        ring_capacity_tokens: Size of the ring made here (default: :func:`ring_capacity` for this buffer).

    Raises:
        ValueError: ``batches`` yields nothing or malformed items, or refs come without their ``token_source``.
    """
    items = iter(batches)
    first = next(items, None)
    if first is None:
        raise ValueError("`batches` yielded no batch; give (activations [B, T, d], tokens [B, T]) per batch.")
    activations, tokens, refs = _parse(first, 0)
    d_in = activations.shape[1]
    exclude = None if not exclude_token_ids else torch.as_tensor(list(exclude_token_ids), dtype=torch.int64)
    if refs is not None and token_source is None:
        raise ValueError("`batches` gives token refs, so pass the `token_source` they point into.")
    if refs is None and token_source is None:
        kept = tokens.numel() if exclude is None else int((~torch.isin(tokens.cpu(), exclude)).sum())
        capacity = ring_capacity_tokens or ring_capacity(
            buffer_size, tokens.numel(), mix_fraction, 2 * tokens.numel() / max(kept, 1)
        )
        token_source = TokenRing(capacity, pad_token_id=pad_token_id)
    if refs is None and not isinstance(token_source, TokenRing):
        raise ValueError(
            "`batches` gives no token refs: the rows get them from a TokenRing, and `token_source` is a"
            f" {type(token_source).__name__}. Yield (activations, tokens, refs), or pass a TokenRing or none."
        )
    ring = token_source

    def packed() -> Iterator[Tensor]:
        for index, item in enumerate(itertools.chain([first], items)):
            activations, tokens, refs = _parse(item, index)
            if refs is None:
                if not isinstance(ring, TokenRing):
                    raise ValueError(
                        f"`batches` item {index} has no refs, but the first had refs into a"
                        f" {type(ring).__name__}: yield (activations, tokens, refs) for every batch."
                    )
                refs = ring.add(tokens) + torch.arange(tokens.numel(), device=tokens.device)
            rows = _pack(activations, refs.reshape(-1))
            if exclude is not None:
                rows = rows[~torch.isin(tokens.reshape(-1).to(rows.device), exclude.to(rows.device))]
            yield rows

    return TokenRefRows(mixing_buffer(buffer_size, batch_size, packed(), mix_fraction), d_in, token_source)


def activations_store_rows(store: Any, *, ring_capacity_tokens: Optional[int] = None) -> TokenRefRows:
    """An ``ActivationsStore``'s rows with token refs, mixed as its own ``get_data_loader`` mixes them.

    Reads language-model batches with the store's public ``get_raw_llm_batch`` (a model's, or cached activations
    with their ``token_ids`` column) and mixes them with the store's buffer size, batch size, mixing fraction
    and ``exclude_special_tokens``, through SAELens' ``mixing_buffer``. Pass the result to
    :class:`SamplesSAETrainer` in place of the store.

    Raises:
        ValueError: Cached activations without a ``token_ids`` column (nothing tells the rows' tokens).
    """
    context = int(store.training_context_size)

    def lm_batches() -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            try:
                activations, token_ids = store.get_raw_llm_batch(raise_on_epoch_end=True)
            except StopIteration:
                warnings.warn("All samples in the training dataset have been exhausted, beginning new epoch.",
                              stacklevel=2)
                activations, token_ids = store.get_raw_llm_batch()
            if token_ids is None:
                raise ValueError(
                    "The ActivationsStore's cached activations have no `token_ids` column, so the rows' tokens are"
                    " unknown. Cache them again with SAELens' CacheActivationsRunner, which writes `token_ids`."
                )
            # A cached table's token ids come in the activations' dtype (SAELens sets one format for both).
            yield activations, token_ids.reshape(-1, context).to(torch.int64)

    exclude = store.exclude_special_tokens
    return mixed_rows(
        lm_batches(),
        buffer_size=int(store.n_batches_in_buffer) * context,
        batch_size=int(store.train_batch_size_tokens),
        mix_fraction=float(store.activations_mixing_fraction),
        exclude_token_ids=None if exclude is None else exclude.tolist(),
        ring_capacity_tokens=ring_capacity_tokens,
    )


# ---------------------------------------------------------------------------------------------- the trainer
def _sparse_topk(feature_acts: Tensor) -> tuple[Tensor, Tensor]:
    """A COO ``[N, F]`` as ``(indices, values)`` ``[N, k]``, ``k`` the most entries of a row (one host sync).

    Rows with fewer entries (a batch-level TopK, a sparse JumpReLU) are padded with index -1 and value 0.
    """
    acts = feature_acts.coalesce()
    rows, cols = acts.indices()
    n = acts.shape[0]
    counts = torch.bincount(rows, minlength=n)
    k = int(counts.max()) if n else 0
    # Coalesced entries come sorted by row: an entry's slot is its place after its row's first entry.
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(rows), device=rows.device) - starts[rows]
    indices = torch.full((n, k), -1, dtype=torch.int64, device=cols.device).index_put_((rows, slot), cols)
    values = acts.values()
    padded = torch.zeros((n, k), dtype=values.dtype, device=values.device).index_put_((rows, slot), values)
    return indices, padded


class SamplesSAETrainer(SAETrainer):
    """SAELens' ``SAETrainer`` that also collects every latent's top activating contexts while it trains.

    On each scheduled step, :meth:`step` folds the step's ``feature_acts`` and the batch's token refs into
    ``collector``. Every SAELens checkpoint (``save_trainer_state``) writes ``STATE_NAME`` beside the trainer
    state and the samples directory; ``fit`` writes the samples directory at the end; ``load_trainer_state``
    restores the collection, so a resumed run collects exactly what an uninterrupted one does on the same rows.

    Args:
        cfg: SAELens' ``SAETrainerConfig``.
        sae: The ``TrainingSAE``.
        data_provider: A :class:`TokenRefRows` (:func:`mixed_rows`, :func:`activations_store_rows`) or any
            :class:`~lightning_sae_samples.RowsWithRefs`.
        evaluator: As ``SAETrainer``'s.
        save_checkpoint_fn: As ``SAETrainer``'s.
        collector: The collector (default: one over ``sae.cfg.d_sae`` latents reading ``data_provider``'s token
            source, with the default settings).
        collection_freq: Collect every N-th training step, or a schedule ``{start_step: N, ...}``.
        samples_dir: The samples directory (default: ``activation_samples`` in ``cfg.checkpoint_path``, or in
            the working directory).
        tokenizer: Decodes the saved contexts: a tokenizer object, a Hugging Face name or path, or ``None``.

    Raises:
        ValueError: ``collection_freq`` is not a frequency or schedule.
    """

    def __init__(
        self,
        cfg: Any,
        sae: Any,
        data_provider: Iterator[Tensor],
        evaluator: Any = None,
        save_checkpoint_fn: Any = None,
        *,
        collector: Optional[ActivationSampleCollector] = None,
        collection_freq: Frequency = 1000,
        samples_dir: Optional[PathLike] = None,
        tokenizer: Any = None,
    ) -> None:
        super().__init__(cfg, sae, data_provider, evaluator=evaluator, save_checkpoint_fn=save_checkpoint_fn)
        self.schedule = CollectionSchedule(collection_freq)
        if collector is None:
            collector = ActivationSampleCollector(
                num_latents=int(sae.cfg.d_sae), token_source=getattr(data_provider, "token_source", None)
            )
        self.collector = collector
        base = Path(cfg.checkpoint_path) if cfg.checkpoint_path is not None else Path.cwd()
        self.samples_dir = Path(samples_dir) if samples_dir is not None else base / "activation_samples"
        self.tokenizer = load_tokenizer(tokenizer)
        #: Training steps taken, counted here: SAELens' ``n_training_steps`` in a checkpoint lags by one.
        self.steps_taken = 0
        self._saved_at: Optional[int] = None

    def step(self, batch: Tensor) -> Any:
        """SAELens' training step; on a scheduled step, also fold its latents and the batch's refs.

        Raises:
            ValueError: On a scheduled step, ``batch`` is not the batch the data provider yielded last (it has
                no token refs), or the data provider keeps no refs.
        """
        step = self.steps_taken
        refs = self._refs_of(batch, step) if self.schedule.is_due(step) else None
        output = super().step(batch)
        self.steps_taken += 1
        if refs is not None:
            self._collect(refs, output.feature_acts.detach(), step)
        return output

    def _refs_of(self, batch: Tensor, step: int) -> Tensor:
        refs_for = getattr(self.data_provider, "refs_for", None)
        if refs_for is not None:
            try:
                return refs_for(batch)
            except LatentInputError as err:
                raise LatentInputError(f"{type(self).__name__}, step {step}: {err}") from None
        refs_of = getattr(self.data_provider, "refs_of", None)  # a provider of the earlier interface
        refs = refs_of(batch) if refs_of is not None else None
        if refs is None:
            raise ValueError(
                f"{type(self).__name__}: the batch of step {step} has no token refs. Train on a TokenRefRows"
                " data provider (mixed_rows or activations_store_rows) and pass step() the batch it yielded."
            )
        return refs

    def _collect(self, refs: Tensor, feature_acts: Tensor, step: int) -> None:
        if feature_acts.is_sparse:
            indices, values = _sparse_topk(feature_acts)
            self.collector.update(token_refs=refs, latent_indices=indices, latent_values=values, step=step)
            return
        self.collector.update(token_refs=refs, latents=feature_acts, step=step)

    def fit(self) -> Any:
        """SAELens' ``fit``, then the samples directory of the whole run."""
        if self.samples_dir.is_dir():
            claim_samples_dir(self.samples_dir)  # refuse a folder that is not ours before training, not after
        sae = super().fit()
        if self._saved_at != self.steps_taken:
            self.save_samples()
        return sae

    def save_samples(self) -> list[int]:
        """Write the samples directory (and its reports); the saved feature indices, best first."""
        self._saved_at = self.steps_taken
        if not self.collector.has_collection:
            rank_zero_info(f"{type(self).__name__}: nothing collected yet, no samples written.")
            return []
        return self.collector.save(self.samples_dir, self.tokenizer, global_step=self.steps_taken)

    def save_trainer_state(self, checkpoint_path: Path) -> None:
        """The samples directory, then SAELens' trainer state and the collector's state beside it (``STATE_NAME``).

        The samples go first: a kill during their save leaves this checkpoint without SAELens' trainer state, so a
        resume takes the previous one and writes the same save again; and the state kept here is the one after the
        save (its history window closed), which an uninterrupted run goes on with. ``STATE_NAME`` comes before
        SAELens' state, so a checkpoint with the latter always has the former (it is never taken for a plain
        ``SAETrainer``'s, whose collection would start afresh).
        """
        self.save_samples()
        state = {"version": STATE_VERSION, "steps_taken": self.steps_taken, "collector": self.collector.state_dict()}
        atomic_torch_save(Path(checkpoint_path) / STATE_NAME, state)
        super().save_trainer_state(checkpoint_path)

    def load_trainer_state(self, checkpoint_path: PathLike) -> None:
        """SAELens' trainer state and the collection saved beside it.

        A checkpoint of a plain ``SAETrainer`` has no collection: collecting starts afresh, with a warning.

        Raises:
            ValueError: ``STATE_NAME`` is not a state this class wrote (the message names the file and field),
                or was collected with other settings.
        """
        super().load_trainer_state(checkpoint_path)
        path = Path(checkpoint_path) / STATE_NAME
        if not path.is_file():
            self.steps_taken = int(self.n_training_samples) // int(self.cfg.train_batch_size_samples)
            rank_zero_warn(
                f"{type(self).__name__}: {path} is missing (a checkpoint of a plain SAETrainer), so the collection"
                f" starts afresh at step {self.steps_taken}."
            )
            return
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file gets the same message
            raise ValueError(f"{path} cannot be read as a collector state: {err}") from None
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            found = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{path}: `version` must be {STATE_VERSION}, found {found!r}; it is not ours.")
        steps = state.get("steps_taken")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"{path}: `steps_taken` must be an integer >= 0, found {steps!r}.")
        collected = state.get("collector")
        if not isinstance(collected, dict):
            raise ValueError(f"{path}: `collector` must be a collector state, found {type(collected).__name__}.")
        if collected.get("collector") is not None:
            try:
                check_state(collected["collector"])
            except ValueError as err:
                raise ValueError(f"{path}: `collector`: {err}") from None
        self.collector.load_state_dict(collected, owner=type(self).__name__)
        self.steps_taken = steps
        self._saved_at = None
