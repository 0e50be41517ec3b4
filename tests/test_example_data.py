"""The example datamodule's windows and cached hidden states, with a stand-in tokenizer and model (fast).

``drop_first_positions`` feeds the model extra leading tokens (the end of the previous window) whose
hidden states are computed but not kept: the kept hidden states must be those of the window's own tokens,
at the positions the model saw them, and no text may be lost between windows.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import sae_data  # noqa: E402
from sae_data import ActivationDataModule  # noqa: E402

BOS = 1


class WordTokenizer:
    """Token id = the integer written in the text (documents are space-separated numbers)."""

    cls_token_id = None
    sep_token_id = None
    bos_token_id = BOS

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [int(w) for w in text.split()]}


class EchoModel(torch.nn.Module):
    """``hidden_states[layer][b, p] = (input id, position p in the model input)``, for every layer."""

    config = SimpleNamespace(num_hidden_layers=4)

    def forward(self, input_ids, attention_mask=None, output_hidden_states=True):
        positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        state = torch.stack([input_ids.float(), positions.float()], dim=-1)
        return SimpleNamespace(hidden_states=(state,) * 5)


def datamodule(tmp_path, monkeypatch, drop: int, seq_len: int = 5) -> ActivationDataModule:
    documents = [" ".join(str(i) for i in range(100 + 40 * d, 140 + 40 * d)) for d in range(3)]  # ids 100..219
    monkeypatch.setattr(sae_data, "load_model", lambda name: EchoModel())
    dm = ActivationDataModule(
        model_name="echo", layer=2, source="files", text_files=["unused"], seq_len=seq_len, max_tokens=30,
        drop_first_positions=drop, shuffle_documents=False, lm_batch_size=4, cache_dir=str(tmp_path),
        cache_dtype="float32",
    )
    monkeypatch.setattr(dm, "_documents", lambda: documents)
    monkeypatch.setattr(dm, "_source_key", lambda: {"source": "files", "files": []})
    dm._tokenizer = WordTokenizer()
    dm._d_model = 2
    return dm


@pytest.mark.parametrize("drop", [0, 1, 3])
def test_windows_continue_the_text_and_hidden_states_skip_the_leading_positions(tmp_path, monkeypatch, drop):
    dm = datamodule(tmp_path, monkeypatch, drop)
    dm.setup("fit")
    tokens, acts = dm.tokens, dm.activations
    assert tokens.shape == (6, 5) and acts.shape == (6, 5, 2)  # 30 tokens in windows of 5
    # Windows are consecutive text after the first `drop` tokens: nothing lost between windows.
    assert tokens.reshape(-1).tolist() == list(range(100 + drop, 130 + drop))
    # Each kept hidden state belongs to the window's own token ...
    assert torch.equal(acts[..., 0].long(), tokens)
    # ... seen after [BOS] and `drop` leading tokens (the model input position of window token j is 1 + drop + j).
    assert acts[..., 1].long().tolist() == [list(range(1 + drop, 6 + drop))] * 6


def test_drop_first_positions_is_part_of_the_cache_key(tmp_path, monkeypatch):
    keys = {datamodule(tmp_path, monkeypatch, drop).cache_key() for drop in (0, 1, 2)}
    assert len(keys) == 3


def test_negative_drop_first_positions_is_refused():
    with pytest.raises(ValueError, match="drop_first_positions"):
        ActivationDataModule(drop_first_positions=-1)
