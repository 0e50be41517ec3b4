"""Train several SAEs with MultiSAECallback under DDP (launched by tests as a subprocess)."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from helpers import end_process_group, fit_dirs, loader  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from multi_helpers import SETTINGS, THREE_SAES, MultiSAEModule  # noqa: E402

from lightning_sae_samples import MultiSAECallback  # noqa: E402


def fit(args: argparse.Namespace, route: str, out: Path) -> None:
    module = MultiSAEModule(THREE_SAES, route=route)
    saes = {name: {"num_latents": f} for name, (f, _) in THREE_SAES.items()}
    if route == "hooks":
        saes = {name: {**own, "module": module.module_name(name)} for name, own in saes.items()}
    callbacks = [MultiSAECallback(saes, dirpath=out / "run", collection_freq=2, recent_window_steps=3,
                                  deduplicate_contexts=True, **SETTINGS)]
    if args.save_ckpt:
        callbacks.append(ModelCheckpoint(dirpath=args.save_ckpt, save_last=True))
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=args.max_epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=bool(args.save_ckpt), default_root_dir=out, callbacks=callbacks,
    )
    trainer.fit(module, loader(), ckpt_path=args.ckpt_path)
    torch.save(module.seen, out / f"seen_{args.max_epochs}_{trainer.global_rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--route", nargs="+", default=["outputs"],
                        help="several: one fit each, in <out>/<route>, by the same processes (one launch)")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--max-epochs", type=int, default=2)
    parser.add_argument("--ckpt-path", default=None)
    parser.add_argument("--save-ckpt", type=Path, default=None)
    args = parser.parse_args()
    for route, out in fit_dirs(args.out, args.route):
        fit(args, route, out)


if __name__ == "__main__":
    main()
    end_process_group()
