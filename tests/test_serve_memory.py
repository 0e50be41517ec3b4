"""`serve`'s index grows with the tokens and latents a save holds, never with the largest token id or a claimed count.

Every tensor operation of the load runs under a dispatch mode that refuses, before allocating it, any tensor of
more than ``LIMIT`` elements (factory functions and ``bincount``'s ``minlength`` are checked from their arguments),
so the test fails fast and small where the old index allocated gigabytes.
"""

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_sae_samples import ActivationSampleCollector
from lightning_sae_samples.serve.index import RunIndex

LIMIT = 1 << 20
_FACTORIES = {"full", "zeros", "ones", "empty", "arange", "new_full", "new_zeros", "new_empty", "empty_strided"}


def _numel(size) -> int:
    n = 1
    for d in size:
        n *= int(d)
    return n


class AllocationGuard(TorchDispatchMode):
    """Raise before any op creates a tensor of more than ``LIMIT`` elements; remember the largest one."""

    largest = 0

    def _check(self, n: int, what) -> None:
        self.largest = max(self.largest, n)
        assert n <= LIMIT, f"{what} would allocate {n} elements"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _FACTORIES and args and isinstance(args[0], (list, tuple, torch.Size)):
            self._check(_numel(args[0]), func)
        if name in ("new_full", "new_zeros", "new_empty") and len(args) > 1:
            self._check(_numel(args[1]), func)
        if name == "bincount":
            self._check(int(kwargs.get("minlength", args[2] if len(args) > 2 else 0)), func)
        out = func(*args, **kwargs)
        for tensor in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self._check(tensor.numel(), func)
        return out


def _save(path, tokens, full_state=True):
    collector = ActivationSampleCollector(num_latents=6, max_samples_per_feature=3, context_size=2,
                                          activation_threshold=0.2, top_features_to_save=4,
                                          samples_per_feature_to_save=2, write_report=False)
    gen = torch.Generator().manual_seed(0)
    collector.update(tokens, latents=torch.rand(*tokens.shape, 6, generator=gen), step=0)
    collector.save(path, full_state=full_state)
    return path


def test_a_token_id_of_2_to_the_31_minus_1_is_indexed_by_the_ids_present(tmp_path):
    tokens = torch.tensor([[5, 2**31 - 1, 7, 2**31 - 1, 9, 3]])
    path = _save(tmp_path / "s", tokens)
    with AllocationGuard() as guard:
        index = RunIndex.load(path)
    assert guard.largest <= 4096
    assert (2**31 - 1) in index.tokens.token_ids.tolist() and len(index.tokens.token_ids) <= 6
    # The search answers still find the latents that fire on it, as a loop over the kept samples does.
    expected = sorted({s.feature_idx for i in range(6) for s in index.analyzer.feature(i).samples
                       if s.activating_token.token_id == 2**31 - 1})
    found = index.token_search([2**31 - 1], 0, 50)
    assert sorted(r["idx"] for r in found["rows"]) == expected and expected
    assert index.context_search(index.token_strings[2**31 - 1], 0, 50)["hits"]


def test_a_summary_claiming_300_million_latents_is_served_with_bounded_memory(tmp_path):
    path = _save(tmp_path / "s", torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1)),
                 full_state=False)
    summary_path = path / "collection_summary.json"
    summary = json.loads(summary_path.read_text())
    summary["num_features_tracked"] = 300_000_000
    summary["never_fired_features"] = 300_000_000 - summary["alive_features"]
    summary_path.write_text(json.dumps(summary))
    with AllocationGuard() as guard:
        index = RunIndex.load(path)
    assert guard.largest <= 4096
    assert index.analyzer.num_features == 300_000_000
    latent = index.analyzer.saved_features[0]
    token = index.analyzer.feature(latent).samples[0].activating_token.token_id
    assert latent in [r["idx"] for r in index.token_search([token], 0, 50)["rows"]]
    assert index.tokens.top_tokens(299_999_999) == []


def test_the_guard_catches_a_dense_table_by_id():
    with pytest.raises(AssertionError, match="would allocate"), AllocationGuard():
        torch.full((2**31,), 0, dtype=torch.int64)
