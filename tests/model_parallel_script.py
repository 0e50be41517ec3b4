"""Run a tensor- and data-parallel SAE with the callback under ``ModelParallelStrategy`` (a subprocess of tests).

The encoder is a ``Linear`` over one-hot tokens (plus a position flag) whose weights are the synthetic latent table,
so its latents are exactly ``SyntheticSAE``'s; with ``--tp 2`` it is split by ``ColwiseParallel`` and returns a
``DTensor`` sharded on the latent dimension (``--form local``: the local shard as a plain tensor; ``full``: the
gathered latents on every rank).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from helpers import CTX, THR, K, TokenDataset, end_process_group, latent_table, loader  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from oracle import Seen  # noqa: E402

from lightning_sae_samples import ActivationSampleCallback  # noqa: E402

VOCAB = 30


class ParallelSAE(L.LightningModule):
    """Latents ``table[token] + 0.5 * (position % 3 == 0)``, from an encoder that tensor parallelism can split."""

    def __init__(self, num_latents: int, form: str = "dtensor", tell_num_latents: bool = True) -> None:
        super().__init__()
        if tell_num_latents:
            self.num_latents = num_latents
        self.form = form  # what training_step returns: the DTensor, its local shard, or the full latents
        weight = torch.cat([latent_table(VOCAB, num_latents), torch.full((1, num_latents), 0.5)]).T.contiguous()
        self.encoder = torch.nn.Linear(VOCAB + 1, num_latents, bias=False)
        self.encoder.weight.data.copy_(weight)
        self.encoder.weight.requires_grad_(False)
        self.scale = torch.nn.Parameter(torch.ones(2))
        self.seen: list[Seen] = []
        self.eval_seen: list[Seen] = []  # the validation batches, each at the step of the weights it ran with
        self._row_offset: dict[int, int] = {}
        self._eval_offset: dict[int, int] = {}

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        mesh = self.device_mesh
        if mesh["tensor_parallel"].size() > 1:
            parallelize_module(self, mesh["tensor_parallel"], {"encoder": ColwiseParallel(use_local_output=False)})
        if mesh["data_parallel"].size() > 1:  # the encoder's own unit: training_step calls it, not self.forward
            fully_shard(self.encoder, mesh=mesh["data_parallel"])
            fully_shard(self, mesh=mesh["data_parallel"])

    def training_step(self, batch, batch_idx):
        return {"loss": ((self.scale - 1.0) ** 2).sum(), "latents": self._latents(batch, self.seen, self._row_offset)}

    def validation_step(self, batch, batch_idx):
        return {"latents": self._latents(batch, self.eval_seen, self._eval_offset)}

    def on_validation_epoch_start(self):
        self._eval_offset = {}

    def _latents(self, batch, seen, row_offset):
        tokens = batch["tokens"]
        flag = (torch.arange(tokens.shape[1]) % 3 == 0).float().view(1, -1, 1).expand(*tokens.shape, 1)
        latents = self.encoder(torch.cat([torch.nn.functional.one_hot(tokens, VOCAB).float(), flag], -1))
        full = latents.full_tensor() if hasattr(latents, "full_tensor") else latents
        mesh = self.device_mesh
        if mesh["tensor_parallel"].get_local_rank() == 0:  # the batch of one data-parallel replica, once
            step = self.trainer.global_step
            offset = row_offset.get(step, 0)
            row_offset[step] = offset + tokens.shape[0]
            rank = mesh["data_parallel"].get_local_rank()
            seen.append(Seen(step, rank, offset, tokens.detach().cpu(), full.detach().float().cpu()))
        if self.form != "dtensor" and hasattr(latents, "to_local"):
            latents = latents.to_local() if self.form == "local" else full
        return latents

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(args: argparse.Namespace) -> None:
    callbacks = [ActivationSampleCallback(
        collection_freq=2, max_samples_per_feature=K, context_size=CTX, activation_threshold=THR,
        top_features_to_save=args.num_latents, samples_per_feature_to_save=K, dirpath=args.out / "samples",
        recent_window_steps=3, samples_per_interval=2, deduplicate_contexts=True, write_report=False,
        collect_in=("train", "validate") if args.validate else ("train",),
    )]
    if args.save_ckpt:
        callbacks.append(ModelCheckpoint(dirpath=args.save_ckpt, save_last=True))
    trainer = L.Trainer(
        accelerator="cpu", devices=args.dp * args.tp,
        strategy=ModelParallelStrategy(data_parallel_size=args.dp, tensor_parallel_size=args.tp),
        max_epochs=args.max_epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=bool(args.save_ckpt), default_root_dir=args.out, callbacks=callbacks,
        limit_val_batches=2 if args.validate else 0, num_sanity_val_steps=0,
    )
    module = ParallelSAE(args.num_latents, form=args.form, tell_num_latents=not args.no_num_latents)
    trainer.fit(module, loader(TokenDataset()), loader(TokenDataset(seed=1)) if args.validate else None,
                ckpt_path=args.ckpt_path)
    torch.save(module.seen, args.out / f"seen_{args.max_epochs}_{trainer.global_rank}.pt")
    torch.save(module.eval_seen, args.out / f"eval_seen_{trainer.global_rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser(
        epilog="Arguments separated by --then are fits run in turn by the same processes (one launch); each group "
               "takes every option, and all of them the same --dp and --tp.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--num-latents", type=int, default=10)
    parser.add_argument("--max-epochs", type=int, default=2)
    parser.add_argument("--form", choices=["dtensor", "local", "full"], default="dtensor")
    parser.add_argument("--no-num-latents", action="store_true")
    parser.add_argument("--ckpt-path", default=None)
    parser.add_argument("--save-ckpt", type=Path, default=None)
    parser.add_argument("--validate", action="store_true", help="also collect a snapshot of each validation run")
    groups: list[list[str]] = [[]]
    for arg in sys.argv[1:]:
        if arg == "--then":
            groups.append([])
        else:
            groups[-1].append(arg)
    for group in groups:
        fit(parser.parse_args(group))


if __name__ == "__main__":
    main()
    end_process_group()
