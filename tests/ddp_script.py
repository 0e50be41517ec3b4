"""Run the synthetic SAE with the callback under DDP (launched by tests as a subprocess)."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from helpers import SyntheticSAE, end_process_group, fit_dirs, loader  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from lightning_sae_samples import ActivationSampleCallback  # noqa: E402


def fit(args: argparse.Namespace, mode: str, out: Path) -> None:
    callbacks = [ActivationSampleCallback(
        collection_freq=2, max_samples_per_feature=4, context_size=4, activation_threshold=0.5,
        top_features_to_save=args.num_latents, samples_per_feature_to_save=4, dirpath=out / "samples",
        recent_window_steps=3, samples_per_interval=2, deduplicate_contexts=True,
    )]
    if args.save_ckpt:
        callbacks.append(ModelCheckpoint(dirpath=args.save_ckpt, save_last=True))
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=args.strategy if args.devices > 1 else "auto",
        max_epochs=args.max_epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=bool(args.save_ckpt), default_root_dir=out, callbacks=callbacks,
    )
    module = SyntheticSAE(num_latents=args.num_latents, mode=mode)
    module.seen_dir = str(out)
    trainer.fit(module, loader(), ckpt_path=args.ckpt_path)
    torch.save(module.seen, out / f"seen_{args.max_epochs}_{trainer.global_rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mode", nargs="+", default=["dense"],
                        help="several: one fit each, in <out>/<mode>, by the same processes (one launch)")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--max-epochs", type=int, default=2)
    parser.add_argument("--ckpt-path", default=None)
    parser.add_argument("--save-ckpt", type=Path, default=None)
    parser.add_argument("--num-latents", type=int, default=10)
    args = parser.parse_args()
    for mode, out in fit_dirs(args.out, args.mode):
        fit(args, mode, out)


if __name__ == "__main__":
    main()
    end_process_group()
