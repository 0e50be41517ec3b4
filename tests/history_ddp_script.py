"""Run the drifting synthetic SAE under 2-process DDP with the callback and checkpoints (test_history)."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from helpers import DriftingSAE, TokenDataset, end_process_group, loader, make_callback  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    callbacks = [make_callback(args.out / "samples"),
                 ModelCheckpoint(dirpath=args.out / "ckpt", every_n_train_steps=2, save_top_k=-1)]
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=5, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=args.out, callbacks=callbacks,
    )
    module = DriftingSAE(drift_step=3, mode="sparse", num_latents=10)
    trainer.fit(module, loader(TokenDataset(num_sequences=40)))
    torch.save(module.seen, args.out / f"seen_{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
    end_process_group()
