"""Real token streams through a Trainer: padding and attention masks, excluded tokens, odd batches, exact bins."""

import json
import math

import pytest
import torch
from helpers import (
    CTX,
    THR,
    F,
    K,
    SyntheticSAE,
    assert_same,
    callback_factory,
    check_against_oracle,
    loader,
    trainer,
)
from torch.utils.data import Dataset

from lightning_sae_samples import LatentInputError
from lightning_sae_samples.engine.bins import histogram_edges, interval_edges

PAD_ACTIVATION = 9.0


class PaddedDataset(Dataset):
    """Right-padded sequences of random length with an ``attention_mask``, and one hole inside sequence 0."""

    def __init__(self, pad_id: int = -100, num_sequences: int = 16, seq_len: int = 9, vocab: int = 30, seed: int = 0,
                 with_mask: bool = True, bos: bool = False) -> None:
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, vocab, (num_sequences, seq_len), generator=gen)
        if bos:
            tokens[:, 0] = 0
        lengths = torch.randint(2, seq_len + 1, (num_sequences,), generator=gen)
        self.mask = torch.arange(seq_len).unsqueeze(0) < lengths.unsqueeze(1)
        self.mask[0, 1] = False
        self.tokens = torch.where(self.mask, tokens, pad_id)
        self.with_mask = with_mask

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict:
        item = {"tokens": self.tokens[i]}
        if self.with_mask:
            item["attention_mask"] = self.mask[i].long()
        return item


class PaddedSAE(SyntheticSAE):
    """Padding positions get large activations (the SAE sees the pad embedding): they must not be collected."""

    def latents_for(self, tokens):
        padding = tokens < 0
        if "mask" in self.__dict__:
            padding = padding | ~self.mask
        return torch.where(padding.unsqueeze(-1), PAD_ACTIVATION, super().latents_for(tokens.clamp(min=0)))

    def training_step(self, batch, batch_idx):
        self.mask = batch["attention_mask"].bool() if "attention_mask" in batch else None
        if self.mask is None:
            del self.mask
        out = super().training_step(batch, batch_idx)
        self.seen[-1].mask = batch["attention_mask"].cpu() if "attention_mask" in batch else None
        return out


make_callback = callback_factory(
    collection_freq=1, max_samples_per_feature=K, context_size=CTX, activation_threshold=THR, top_features_to_save=F,
    samples_per_feature_to_save=K, samples_per_interval=2, recent_window_steps=2,
)


def test_attention_mask_key_names_the_mask(tmp_path):
    class Renamed(PaddedDataset):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            return {"tokens": item["tokens"], "pad_mask": item.pop("attention_mask")}

    class Module(PaddedSAE):
        def training_step(self, batch, batch_idx):
            return super().training_step({"tokens": batch["tokens"], "attention_mask": batch["pad_mask"]}, batch_idx)

    module = Module(num_latents=F)
    trainer(tmp_path, [make_callback(tmp_path, attention_mask_key="pad_mask")]).fit(module, loader(Renamed(7)))
    check_against_oracle(tmp_path / "samples", module.seen)


class DynamicallyPadded(Dataset):
    """Sequences whose lengths make batches of two (a dynamic-padding collate) 7, 12, 9 and 16 positions long."""

    LENGTHS = (7, 3, 12, 5, 4, 9, 16, 11) * 2

    def __init__(self, vocab: int = 30, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.sequences = [torch.randint(0, vocab, (n,), generator=gen) for n in self.LENGTHS]

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.sequences[i]


def pad_collate(items: list, to_length: int | None = None) -> dict:
    """Right-pads a batch to its longest sequence (or ``to_length``), as tokenizers' dynamic padding does."""
    length = to_length or max(len(t) for t in items)
    tokens = torch.full((len(items), length), -100)
    mask = torch.zeros(len(items), length, dtype=torch.long)
    for row, sequence in enumerate(items):
        tokens[row, : len(sequence)], mask[row, : len(sequence)] = sequence, 1
    return {"tokens": tokens, "attention_mask": mask}


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_gradient_accumulation_over_dynamically_padded_micro_batches(tmp_path, mode):
    """Micro-batches of one optimizer step with 7, 12, 9 and 16 positions: collected exactly, as if padded to 16."""
    runs = {}
    for name, to_length in (("dynamic", None), ("fixed", 16)):
        module = PaddedSAE(num_latents=F, mode=mode)
        data = torch.utils.data.DataLoader(DynamicallyPadded(), batch_size=2,
                                           collate_fn=lambda items, n=to_length: pad_collate(items, n))
        trainer(tmp_path / name, [make_callback(tmp_path / name)], accumulate_grad_batches=4).fit(module, data)
        assert module.trainer.global_step == 2
        runs[name] = module.seen
    assert [s.tokens.shape[1] for s in runs["dynamic"][:4]] == [7, 12, 9, 16]
    check_against_oracle(tmp_path / "dynamic" / "samples", runs["dynamic"])
    # Padding to 16 moves the order keys (token offsets), and with them the hash priorities of interval samples;
    # every statistic and the top and recent samples stay equal.
    states = []
    for name in runs:
        state = torch.load(tmp_path / name / "samples" / "full_state.pt", weights_only=True)
        del state["interval"]
        for table in ("top", "recent", "recent_prev"):
            del state[table]["order"]
        states.append(state)
    assert_same(*states, "full_state")


class SpecialTokenizer:
    """A tokenizer with special ids 0 and 1 (as BOS and SEP)."""

    all_special_ids = [0, 1]

    def convert_ids_to_tokens(self, ids):
        return [f"t{i}" for i in ids]

    def decode(self, ids):
        return "".join(f"t{i}" for i in ids)


def test_excluded_special_tokens_are_resolved_seen_not_collected_and_shown_in_contexts(tmp_path):
    class BosSAE(PaddedSAE):
        def training_step(self, batch, batch_idx):
            self.table[0] = 5.0  # BOS (every sequence starts with it) has the largest activations
            return super().training_step(batch, batch_idx)

    kwargs = dict(exclude_special_tokens=True, tokenizer=SpecialTokenizer())  # (exclude_token_ids: test_entry_points)
    module = BosSAE(num_latents=F, vocab=4)
    trainer(tmp_path, [make_callback(tmp_path, **kwargs)]).fit(module, loader(PaddedDataset(-100, vocab=4, bos=True)))
    files = check_against_oracle(tmp_path / "samples", module.seen, exclude=(0, 1))
    shown = 0
    for name, record in files.items():
        if name.startswith("feature_"):
            for sample in record["top_samples"]:
                assert sample["context_tokens"][sample["context_position"]] not in (0, 1)
                shown += 0 in sample["context_tokens"]
    assert shown  # BOS still appears in the contexts of later tokens
    assert files["collection_summary.json"]["config"]["exclude_token_ids"] == [0, 1]  # special ids resolved


def test_exclude_special_tokens_without_a_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="exclude_special_tokens=True.*tokenizer"):
        trainer(tmp_path, [make_callback(tmp_path, exclude_special_tokens=True)]).fit(
            PaddedSAE(num_latents=F), loader(PaddedDataset()))


class EmptySequences(Dataset):
    """Batches with ``T = 0`` (every sequence empty)."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"tokens": torch.zeros(0, dtype=torch.long)}


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_empty_batches_are_skipped(tmp_path, mode):
    class EmptyRows(SyntheticSAE):
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            if batch_idx % 2:  # B = 0: the step's outputs hold no rows
                for key in ("latents", "latent_indices", "latent_values"):
                    if key in out:
                        out[key] = out[key][:0]
                out["tokens"] = batch["tokens"][:0]
                self.seen.pop()
            return out

    module = EmptyRows(num_latents=F, mode=mode)
    trainer(tmp_path, [make_callback(tmp_path)]).fit(module, loader())
    check_against_oracle(tmp_path / "samples", module.seen)
    module = SyntheticSAE(num_latents=F, mode=mode)
    trainer(tmp_path / "t0", [make_callback(tmp_path / "t0")]).fit(module, loader(EmptySequences()))
    assert not (tmp_path / "t0" / "samples" / "collection_summary.json").exists()  # nothing collected


def test_duplicate_latent_indices_name_the_position(tmp_path):
    class Duplicates(SyntheticSAE):
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            out["latent_indices"] = out["latent_indices"].clone()
            out["latent_indices"][1, 3, 2] = out["latent_indices"][1, 3, 0]
            return out

    with pytest.raises(LatentInputError, match=r"latent \d+ more than once .*batch row 1, position 3"):
        trainer(tmp_path, [make_callback(tmp_path)]).fit(Duplicates(num_latents=F, mode="sparse"), loader())


def test_token_ids_beyond_int32_name_the_position_and_value(tmp_path):
    class HugeIds(SyntheticSAE):
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            out["tokens"] = batch["tokens"].clone()
            out["tokens"][2, 5] = 2**40
            return out

    with pytest.raises(LatentInputError, match=rf"token id {2**40} at \(batch row 2, position 5\)"):
        trainer(tmp_path, [make_callback(tmp_path)]).fit(HugeIds(num_latents=F), loader())


def just_below(edge: float) -> float:
    """The largest float32 strictly below a float64 edge."""
    value = torch.tensor(edge, dtype=torch.float64).float()
    if float(value) >= edge:
        value = torch.nextafter(value, torch.tensor(-math.inf))
    return float(value)


def just_above(edge: float) -> float:
    """The smallest float32 at or above a float64 edge."""
    value = torch.tensor(edge, dtype=torch.float64).float()
    if float(value) < edge:
        value = torch.nextafter(value, torch.tensor(math.inf))
    return float(value)


def test_values_next_to_bin_edges_land_in_the_bins_the_published_edges_say(tmp_path):
    edges = [float(e) for e in histogram_edges(THR)[1:-1]] + [float(e) for e in interval_edges(THR, 8)[1:-1]]
    values = torch.tensor([f(e) for e in edges for f in (just_below, just_above)], dtype=torch.float32)
    values = values[values > THR]

    class EdgeSAE(SyntheticSAE):
        def latents_for(self, tokens):
            flat = torch.arange(tokens.numel(), device=tokens.device) % len(values)
            lat = torch.zeros(*tokens.shape, self.num_latents, device=tokens.device)
            lat[..., 2] = values.to(tokens.device)[flat].view(tokens.shape)
            return lat

    module = EdgeSAE(num_latents=F)
    trainer(tmp_path, [make_callback(tmp_path, max_samples_per_feature=100, samples_per_interval=100,
                                     num_intervals=8)], max_steps=2).fit(module, loader())
    record = json.loads((tmp_path / "samples" / "feature_00002_samples.json").read_text())
    bin_edges = record["statistics"]["histogram"]["bin_edges"]
    seen_values = torch.cat([s.latents[..., 2].reshape(-1) for s in module.seen]).double()
    seen_values = seen_values[seen_values > THR]
    want = [sum(1 for v in seen_values.tolist() if sum(1 for e in bin_edges[1:-1] if v >= e) == i)
            for i in range(len(bin_edges) - 1)]
    assert record["statistics"]["histogram"]["counts"] == want
    published = [float(e) for e in interval_edges(THR, 8)[1:-1]]
    for i, group in enumerate(record["interval_samples"]):
        want_count = sum(1 for v in seen_values.tolist() if sum(1 for e in published if v >= e) == i)
        assert group["count"] == want_count
        for sample in group["samples"]:
            assert sum(1 for e in published if sample["activation_value"] >= e) == i


class SparsifyLikeSae(torch.nn.Module):
    """Keeps the latent count where EleutherAI's sparsify does: ``sae.num_latents``."""

    def __init__(self, num_latents):
        super().__init__()
        self.num_latents = num_latents


class SaeLensLikeSae(torch.nn.Module):
    """Keeps the latent count where SAELens does: ``sae.cfg.d_sae``."""

    def __init__(self, d_sae):
        super().__init__()
        self.cfg = type("Cfg", (), {"d_sae": d_sae})()


@pytest.mark.parametrize("submodule", [SparsifyLikeSae, SaeLensLikeSae])
def test_latent_count_is_found_on_the_sae_submodule(tmp_path, submodule):
    module = SyntheticSAE(num_latents=F, mode="sparse")
    del module.num_latents
    module.sae = submodule(F)
    trainer(tmp_path, [make_callback(tmp_path)], max_steps=3).fit(module, loader())
    summary = json.loads((tmp_path / "samples" / "collection_summary.json").read_text())
    assert summary["num_features_tracked"] == F
    assert summary["config"]["num_latents"] == F
