"""Neighbours: the callback and the collector save the decoder directions; the analyzer finds the closest latents."""

import json

import pytest
import torch
from helpers import SyntheticSAE, loader, make_collector, trainer
from render_support import FakeTokenizer, decoder_matrices, hostile_vocab, write_run_dir

from lightning_sae_samples import ActivationSampleAnalyzer, ActivationSampleCallback
from lightning_sae_samples.analysis.explanations import ExplanationRecord, append_explanations
from lightning_sae_samples.analysis.neighbours import nearest_latents, nearest_latents_of
from lightning_sae_samples.samples_dir.decoder import load_decoder_directions
from lightning_sae_samples.samples_dir.names import DECODER_NAME, MANIFEST_NAME, SamplesDirectoryError

NUM_LATENTS = 12


def brute_force(w_dec, latent, k):
    unit = w_dec.double() / w_dec.double().norm(dim=1, keepdim=True)
    cos = unit @ unit[latent]
    cos[latent] = -2
    top = torch.topk(cos, k)
    return top.indices.tolist(), top.values.tolist()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("neighbours")
    return write_run_dir(root, FakeTokenizer(hostile_vocab()), num_latents=NUM_LATENTS, top_features=4,
                         logit_effects=decoder_matrices)


def test_callback_writes_unit_bfloat16_decoder_in_the_manifest(run_dir):
    directions = load_decoder_directions(run_dir / DECODER_NAME, NUM_LATENTS)
    w_dec, _ = decoder_matrices(SyntheticSAE(num_latents=NUM_LATENTS))
    assert directions.dtype == torch.bfloat16 and directions.shape == w_dec.shape
    expected = w_dec / w_dec.norm(dim=1, keepdim=True)
    assert torch.allclose(directions.float(), expected, atol=4e-3)
    assert DECODER_NAME in json.loads((run_dir / MANIFEST_NAME).read_text())["files"]


def test_analyzer_neighbours_match_brute_force_with_explanations_or_tokens(run_dir):
    w_dec, _ = decoder_matrices(SyntheticSAE(num_latents=NUM_LATENTS))
    append_explanations(run_dir, [ExplanationRecord(latent=1, text="the partner of zero", samples_step=6)])
    analyzer = ActivationSampleAnalyzer(run_dir)
    found = analyzer.neighbours(range(NUM_LATENTS), k=3)
    for latent in range(NUM_LATENTS):
        ids, cosines = brute_force(w_dec, latent, 3)
        assert [n.feature_idx for n in found[latent]] == ids
        assert [n.cosine for n in found[latent]] == pytest.approx(cosines, abs=4e-3)
    assert found[0][0].feature_idx == 1 and found[0][0].explanation == "the partner of zero"
    fired = next(n for n in found[1] if n.feature_idx in analyzer.saved_features)
    assert fired.explanation is None and fired.top_tokens  # no explanation: its top tokens instead


def exact_neighbours(unit, latent, k):
    """The top ``k`` of the stored rows, by float64 cosine, equal ones by latent: what the search must return."""
    rows = unit.double()
    cos = (rows * rows[latent]).sum(1).tolist()
    order = sorted((i for i in range(len(rows)) if i != latent), key=lambda i: (-cos[i], i))
    return [(i, cos[i]) for i in order[:k]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_chunked_search_is_the_exact_top_k_of_the_stored_rows(dtype):
    gen = torch.Generator().manual_seed(0)
    for trial in range(12):
        num, d = int(torch.randint(2, 300, (1,), generator=gen)), int(torch.randint(1, 40, (1,), generator=gen))
        w = torch.randn(num, d, generator=gen)
        if trial % 3 == 0:
            w[: num // 2] = w[0]  # many exact ties, which the rounded first pass cannot order
        unit = (w / w.norm(dim=1, keepdim=True)).to(dtype)
        k = int(torch.randint(1, 12, (1,), generator=gen))
        latents = list(range(0, num, max(1, num // 5)))
        chunk = int(torch.randint(1, 100, (1,), generator=gen))
        found = nearest_latents_of(unit, latents, k, chunk_rows=chunk)
        for latent, near in zip(latents, found):
            assert [(n.feature_idx, n.cosine) for n in near] == exact_neighbours(unit, latent, k)
            assert near == nearest_latents(unit, latent, k)  # one latent alone: the same answer
    unit[3] = 0
    assert nearest_latents(unit, 3, 5) == []  # a zero direction has no neighbours


def test_stored_cosines_are_within_bfloat16_rounding_of_the_true_ones():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(1000, 64, generator=gen)
    unit = (w / w.norm(dim=1, keepdim=True)).bfloat16()
    true = dict(zip(*brute_force(w, 500, 999)))
    assert all(abs(true[n.feature_idx] - n.cosine) < 4e-3 for n in nearest_latents(unit, 500, 20))


def test_collector_save_takes_a_decoder_and_a_later_save_without_it_removes_it(tmp_path):
    collector = make_collector(num_latents=8)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 9, (2, 5), generator=gen)
    collector.update(tokens, latents=torch.randn(2, 5, 8, generator=gen).abs() * 2, step=0)
    w_dec = torch.randn(8, 4, generator=gen)
    collector.save(tmp_path / "s", decoder=w_dec)
    assert torch.allclose(load_decoder_directions(tmp_path / "s" / DECODER_NAME, 8).float(),
                          w_dec / w_dec.norm(dim=1, keepdim=True), atol=4e-3)
    with pytest.raises(ValueError, match=r"pass `W_dec.T`"):
        collector.save(tmp_path / "s", decoder=w_dec.T)
    collector.save(tmp_path / "s")
    assert not (tmp_path / "s" / DECODER_NAME).exists()  # it would be older than the samples
    assert ActivationSampleAnalyzer(tmp_path / "s").neighbours([0]) == {0: ()}


@pytest.mark.parametrize(
    "payload, field",
    [
        ({"format_version": 1, "directions": torch.ones(3, 4, dtype=torch.float16) / 2}, "directions"),
        ({"format_version": 1, "directions": torch.full((12, 4), float("nan"), dtype=torch.float16)}, "directions"),
        ({"format_version": 1, "directions": torch.zeros(12, 4, dtype=torch.int8)}, "directions"),
        ({"format_version": 9, "directions": torch.zeros(12, 4)}, "format_version"),
    ],
)
def test_a_bad_decoder_file_is_refused_naming_file_and_field(tmp_path, payload, field):
    path = tmp_path / DECODER_NAME
    torch.save(payload, path)
    with pytest.raises(SamplesDirectoryError, match=rf"{DECODER_NAME}.*`{field}`"):
        load_decoder_directions(path, NUM_LATENTS)


def test_save_full_state_end_writes_the_decoder_at_the_end_and_the_setting_turns_it_off(tmp_path):
    cb = ActivationSampleCallback(collection_freq=1, max_samples_per_feature=3, context_size=2,
                                  samples_per_feature_to_save=2, activation_threshold=0.5, dirpath=tmp_path / "s",
                                  logit_effects=decoder_matrices,
                                  save_full_state="end", write_report=False, log_feature_health=False)
    trainer(tmp_path, [cb], max_steps=3, enable_checkpointing=True).fit(SyntheticSAE(num_latents=10), loader())
    files = json.loads((tmp_path / "s" / MANIFEST_NAME).read_text())["files"]
    assert DECODER_NAME in files and "full_state.pt" in files
    off = ActivationSampleCallback(collection_freq=1, dirpath=tmp_path / "t", logit_effects=decoder_matrices,
                                   save_decoder_directions=False, write_report=False, log_feature_health=False)
    trainer(tmp_path, [off], max_steps=2).fit(SyntheticSAE(num_latents=10), loader())
    assert not (tmp_path / "t" / DECODER_NAME).exists()
