"""Collect the top activating contexts of an SAE that SAELens trains on shuffled rows, with SAELens' own trainer.

SAELens' ``SAETrainer`` trains a SAELens ``TopKTrainingSAE`` on MiniLM's layer-3 activations over the King James
Bible (the default example's cache, ``sae_data.ActivationDataModule``). The language-model batches go through
SAELens' own ``mixing_buffer``, which shuffles rows across batches; each row carries a token ref into a
``TokenRing`` of the recent batches, so ``SamplesSAETrainer`` (``lightning_sae_samples.integrations.sae_lens``)
knows every row's context window. It writes the samples directory at each SAELens checkpoint and at the end,
then this script prints the console report of the top feature.

Run (from the repository root; needs ``pip install -e '.[examples,sae-lens]'``)::

    HF_HUB_OFFLINE=1 python examples/sae_lens_rows.py                      # 600 steps of 1024 rows, F = 2048
    HF_HUB_OFFLINE=1 python examples/sae_lens_rows.py --steps 100 --num-latents 512 --max-tokens 60000
    HF_HUB_OFFLINE=1 python examples/sae_lens_rows.py --resume lightning_logs/sae_lens_rows/version_0/checkpoints/N

The run goes to ``lightning_logs/sae_lens_rows/version_N`` (``checkpoints/`` of SAELens, ``activation_samples/``),
or to ``--out``. ``--resume`` continues a checkpoint folder (SAELens' trainer state and the collection beside it).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from sae_data import ActivationDataModule  # noqa: E402

from lightning_sae_samples import ActivationSampleAnalyzer, ActivationSampleCollector, read_samples_dir  # noqa: E402

console = Console()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--steps", type=int, default=600, help="training steps")
    p.add_argument("--batch-size", type=int, default=1024, help="rows (tokens) per training step")
    p.add_argument("--num-latents", type=int, default=2048, help="SAE latents F")
    p.add_argument("--k", type=int, default=32, help="active latents per row")
    p.add_argument("--lr", type=float, default=4e-4, help="Adam learning rate")
    p.add_argument("--lm-batch", type=int, default=16, help="windows per language-model batch")
    p.add_argument("--buffer-size", type=int, default=8192, help="rows in SAELens' mixing buffer")
    p.add_argument("--mix-fraction", type=float, default=0.5, help="share of the buffer kept for mixing")
    p.add_argument("--collect-from", type=int, default=None,
                   help="collect every --collect-every step from here on (default: the last third)")
    p.add_argument("--collect-every", type=int, default=2, help="collection frequency from --collect-from on")
    p.add_argument("--checkpoints", type=int, default=1, help="SAELens checkpoints during the run")
    p.add_argument("--max-tokens", type=int, default=200_000, help="tokens of text to cache")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per window")
    p.add_argument("--cache-dir", default=".cache/lightning-sae-samples", help="activation cache")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-features", type=int, default=100, help="feature files written")
    p.add_argument("--root", default="lightning_logs/sae_lens_rows", help="runs go to <root>/version_N")
    p.add_argument("--out", default=None, help="run folder (default: <root>/version_N)")
    p.add_argument("--resume", default=None, help="a checkpoint folder of an earlier run to continue")
    return p.parse_args(argv)


def next_version_dir(root: Path) -> Path:
    """``root/version_N`` with ``N`` one above the largest existing version (0 when none)."""
    versions = [int(p.name[8:]) for p in root.glob("version_*") if p.name[8:].isdigit()]
    return root / f"version_{max(versions, default=-1) + 1}"


def lm_batches(data: ActivationDataModule, lm_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """What a language model gives SAELens, batch after batch: ``(activations [B, T, d], tokens [B, T])``.

    Read from the cache in order, epoch after epoch (SAELens would run the model here).
    """
    n = data.tokens.shape[0] - data.tokens.shape[0] % lm_batch
    while True:
        for i in range(0, n, lm_batch):
            yield data.activations[i : i + lm_batch].float(), data.tokens[i : i + lm_batch].long()


def main(argv=None) -> Path:
    args = parse_args(argv)
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    from lightning_sae_samples.integrations.sae_lens import SamplesSAETrainer, mixed_rows

    torch.manual_seed(args.seed)
    data = ActivationDataModule(seq_len=args.seq_len, max_tokens=args.max_tokens, cache_dir=args.cache_dir,
                                seed=args.seed)
    data.prepare_data()
    data.setup("fit")
    tokenizer = data.tokenizer

    # SAELens' own mixing buffer shuffles the rows; their token refs ride along (see the module's docstring).
    rows = mixed_rows(
        lm_batches(data, args.lm_batch), buffer_size=args.buffer_size, batch_size=args.batch_size,
        mix_fraction=args.mix_fraction, exclude_token_ids=tokenizer.all_special_ids,
    )
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=data.d_model, d_sae=args.num_latents, k=args.k))
    run = Path(args.out) if args.out else next_version_dir(Path(args.root))
    cfg = SAETrainerConfig(
        total_training_samples=args.steps * args.batch_size, train_batch_size_samples=args.batch_size,
        lr=args.lr, lr_end=args.lr,
        n_checkpoints=args.checkpoints, checkpoint_path=str(run / "checkpoints"), feature_sampling_window=100,
    )
    collect_from = args.collect_from if args.collect_from is not None else args.steps * 2 // 3
    collector = ActivationSampleCollector(
        num_latents=args.num_latents, token_source=rows.token_source, max_samples_per_feature=100,
        context_size=20, top_features_to_save=args.top_features,
    )
    trainer = SamplesSAETrainer(
        cfg, sae, rows, collector=collector, tokenizer=tokenizer, samples_dir=run / "activation_samples",
        collection_freq={0: max(1, collect_from), collect_from: args.collect_every} if collect_from else 1,
    )
    if args.resume:
        trainer.load_trainer_state(args.resume)
        sae.load_weights_from_checkpoint(args.resume)
        console.print(f"resumed from {args.resume} at step {trainer.steps_taken}")
    trainer.fit()
    rows.close()
    report(trainer.samples_dir)
    return trainer.samples_dir


def report(samples: Path) -> None:
    """Print where the samples are, write the HTML report, print the top feature."""
    console.rule("[bold]Activation samples (SAELens, shuffled rows)")
    console.print(f"samples directory : {samples.resolve()}", soft_wrap=True)
    analyzer = ActivationSampleAnalyzer(str(samples))
    html = samples / "report.html"
    analyzer.generate_html_report(str(html), top_k_features=20, examples_per_feature=10)
    console.print(f"HTML report       : {html.resolve()}", soft_wrap=True)
    ranked = read_samples_dir(samples).summary.get("top_features_by_activation", [])
    if ranked:
        analyzer.print_feature_report(feature_idx=int(ranked[0]["feature_idx"]), num_examples=5)


if __name__ == "__main__":
    main()
