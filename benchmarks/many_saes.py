"""Many SAEs in one run: one MultiSAECallback against one ActivationSampleCallback per SAE, in one Trainer.

Run from the repository root::

    python benchmarks/many_saes.py                       # 12 SAEs x 32,768 latents, TopK k=32, 1,024 tokens/step
    python benchmarks/many_saes.py --saes 4 --num-latents 8192 --steps 4

Each variant runs in its own process (so that its peak RSS is its own) with a LightningModule whose
``training_step`` returns precomputed TopK latents of every SAE (no SAE compute, so the table shows the
collection alone), collecting every step:

- ``multi``: one ``MultiSAECallback(saes={name: {"num_latents": F}})``, the outputs holding ``{name: (indices,
  values)}``;
- ``separate``: one ``ActivationSampleCallback`` per SAE, each with its own output keys and ``dirpath``.

Printed per variant: the callbacks' time in ``on_train_batch_end`` per collected step (median, and the first
step's, which allocates the states), the process's peak RSS, and ``trainer.save_checkpoint`` (the samples
directories of every SAE written with the checkpoint). A second table times a forward of the 12 SAE modules
with the hooks of a collected step open and with none (the other steps). Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from rich.console import Console
from rich.table import Table

from lightning_sae_samples import ActivationSampleCallback, MultiSAECallback
from lightning_sae_samples.multi.capture import LatentCapture

SETTINGS = dict(collection_freq=1, max_samples_per_feature=16, context_size=8, top_features_to_save=100,
                samples_per_feature_to_save=5, write_report=False, log_serve_command=False, log_feature_health=False)


def topk_latents(tokens: int, num_latents: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct TopK indices per token (a random start, then evenly spaced) and positive values."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, num_latents, (tokens, 1), generator=gen)
    indices = (start + torch.arange(k) * (num_latents // k)) % num_latents
    values = torch.rand(tokens, k, generator=gen) * 4
    return indices, values


class PrecomputedLatents(L.LightningModule):
    """Returns the step's precomputed latents of every SAE, as the variant reads them."""

    def __init__(self, names: list[str], steps: int, batch: int, seq: int, num_latents: int, k: int,
                 variant: str) -> None:
        super().__init__()
        self.names, self.variant, self.shape = names, variant, (batch, seq)
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.latents = [{name: topk_latents(batch * seq, num_latents, k, seed=step * 1000 + i)
                         for i, name in enumerate(names)} for step in range(steps)]

    def training_step(self, batch, batch_idx):
        out = {"loss": self.weight ** 2}
        for name, (indices, values) in self.latents[batch_idx].items():
            if self.variant == "multi":
                out[name] = (indices, values)
            else:
                out[f"{name}_indices"], out[f"{name}_values"] = indices, values
        return out

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class HookTimer(Callback):
    """Time spent in the samples callbacks' ``on_train_batch_end``, per step: wall clock and this process's CPU."""

    def __init__(self, callbacks: list[Callback]) -> None:
        self.per_step: list[float] = []
        self.cpu_per_step: list[float] = []
        for callback in callbacks:
            original = callback.on_train_batch_end

            def timed(*args, _original=original, **kwargs):
                start, cpu = time.perf_counter(), time.process_time()
                _original(*args, **kwargs)
                self.per_step[-1] += time.perf_counter() - start
                self.cpu_per_step[-1] += time.process_time() - cpu

            callback.on_train_batch_end = timed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.per_step.append(0.0)
        self.cpu_per_step.append(0.0)


def run_variant(args) -> dict:
    names = [f"layers.{i}" for i in range(args.saes)]
    root = Path(tempfile.mkdtemp(prefix="many_saes_"))
    settings = dict(SETTINGS, num_latents=args.num_latents)
    if args.variant == "multi":
        samples = [MultiSAECallback(names, dirpath=root / "run", **settings)]
    else:
        samples = [ActivationSampleCallback(dirpath=root / name, latent_indices_key=f"{name}_indices",
                                            latent_values_key=f"{name}_values", **settings) for name in names]
    timer = HookTimer(samples)
    tokens = torch.randint(0, 30_000, (args.steps, args.seq))
    data = [{"tokens": tokens[i:i + 1].expand(args.batch, -1).clone()} for i in range(args.steps)]
    module = PrecomputedLatents(names, args.steps, args.batch, args.seq, args.num_latents, args.k, args.variant)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[*samples, timer],
                        default_root_dir=root)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    start, cpu = time.perf_counter(), time.process_time()
    trainer.save_checkpoint(root / "last.ckpt")
    save, save_cpu = time.perf_counter() - start, time.process_time() - cpu
    shutil.rmtree(root, ignore_errors=True)
    return {"first": timer.per_step[0], "median": statistics.median(timer.per_step[1:]), "save": save,
            "first_cpu": timer.cpu_per_step[0], "median_cpu": statistics.median(timer.cpu_per_step[1:]),
            "save_cpu": save_cpu,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def hook_cost(saes: int, repeats: int = 2000) -> dict:
    """A forward of ``saes`` small modules with a collected step's hooks open, and with none."""
    modules = {f"layers.{i}": torch.nn.Identity() for i in range(saes)}
    x = torch.zeros(4, 4)

    def forward_all() -> float:
        start = time.perf_counter()
        for _ in range(repeats):
            for module in modules.values():
                module(x)
        return (time.perf_counter() - start) / repeats

    capture = LatentCapture(modules)
    bare = forward_all()
    capture.open()
    hooked = forward_all()
    capture.close()
    return {"bare": bare, "hooked": hooked}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saes", type=int, default=12)
    parser.add_argument("--num-latents", type=int, default=32_768)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--variant", choices=["multi", "separate"])
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = {}
    for variant in ("multi", "separate"):
        cmd = [sys.executable, __file__, "--variant", variant, *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    tokens = args.batch * args.seq
    table = Table(title=f"{args.saes} SAEs x {args.num_latents:,} latents, TopK k={args.k}, {tokens:,} tokens a step")
    for column in ("variant", "first collection", "collection (median)", "peak RSS", "save_checkpoint"):
        table.add_column(column, justify="right")
    for variant, row in results.items():
        label = "1 MultiSAECallback" if variant == "multi" else f"{args.saes} ActivationSampleCallbacks"
        table.add_row(label, f"{row['first']:.2f} s (CPU {row['first_cpu']:.2f} s)",
                      f"{row['median']:.2f} s (CPU {row['median_cpu']:.2f} s)", f"{row['peak_rss'] / 2**20:,.0f} MiB",
                      f"{row['save']:.2f} s (CPU {row['save_cpu']:.2f} s)")
    console = Console(width=140)
    console.print(table)
    cost = hook_cost(args.saes)
    hooks = Table(title=f"Forward of {args.saes} modules (nn.Identity on [4, 4])")
    hooks.add_column("hooks")
    hooks.add_column("time", justify="right")
    hooks.add_row("none (steps not collected)", f"{cost['bare'] * 1e6:.1f} us")
    hooks.add_row("open (collected steps)", f"{cost['hooked'] * 1e6:.1f} us")
    console.print(hooks)


if __name__ == "__main__":
    main()
