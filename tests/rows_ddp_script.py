"""Two DDP processes (gloo on CPU) train on shuffled rows with token refs (launched by tests as a subprocess)."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from helpers import end_process_group, fit_dirs  # noqa: E402
from rows_helpers import SETTINGS, RowSAE, shuffled_rows  # noqa: E402

from lightning_sae_samples import ActivationSampleCallback  # noqa: E402


def fit(mode: str, out: Path) -> None:
    callback = ActivationSampleCallback(dirpath=out / "samples", token_source="rows_helpers:token_source",
                                        **SETTINGS)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=out, callbacks=[callback],
    )
    module = RowSAE(mode)
    trainer.fit(module, shuffled_rows())
    torch.save(module.seen, out / f"seen_{trainer.global_rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mode", nargs="+", default=["dense"],
                        help="several: one fit each, in <out>/<mode>, by the same processes (one launch)")
    args = parser.parse_args()
    for mode, out in fit_dirs(args.out, args.mode):
        fit(mode, out)


if __name__ == "__main__":
    main()
    end_process_group()
