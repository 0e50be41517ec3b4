"""Collect an SAE's top activating contexts from a plain PyTorch loop (no Lightning), with EleutherAI's sparsify.

Trains sparsify's ``SparseCoder`` (TopK SAE) the way sparsify's own trainer does, on the default example's
cached MiniLM activations over the King James Bible (``sae_data.ActivationDataModule``; the cache is shared
with ``train_sae.py`` when the data settings match), and feeds its sparse latents to
``ActivationSampleCollector`` on the scheduled steps. At the end it writes the samples directory and the
reports, and prints the console report of the top feature.

Run (from the repository root; needs ``pip install -e '.[examples]'``, which brings ``eai-sparsify``)::

    HF_HUB_OFFLINE=1 python examples/plain_loop_sparsify.py                  # 1500 steps, F = 4096, k = 32
    HF_HUB_OFFLINE=1 python examples/plain_loop_sparsify.py --steps 300 --collect-from 200

The samples go to ``lightning_logs/plain_loop_sparsify/version_N/activation_samples`` (a new ``N`` per
run, as Lightning's loggers do), or to ``--out``.

The collector sees exactly what the loop trained on: ``tokens [B, T]`` and sparsify's
``latent_indices``/``latent_acts`` ``[B*T, k]``, with ``step`` = optimizer steps taken before this batch.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn  # noqa: E402
from sae_data import ActivationDataModule  # noqa: E402

from lightning_sae_samples import (  # noqa: E402
    ActivationSampleAnalyzer,
    ActivationSampleCollector,
    CollectionSchedule,
    read_samples_dir,
)

console = Console()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps")
    p.add_argument("--num-latents", type=int, default=4096, help="SAE latents F")
    p.add_argument("--k", type=int, default=32, help="active latents per token")
    p.add_argument("--lr", type=float, default=None, help="Adam lr (default: sparsify's 2e-4 / sqrt(F / 2**14))")
    p.add_argument("--warmup-steps", type=int, default=100, help="linear learning-rate warmup")
    p.add_argument("--auxk-alpha", type=float, default=1 / 32, help="weight of sparsify's AuxK loss (0: off)")
    p.add_argument("--dead-after-tokens", type=int, default=200_000, help="a latent silent this long counts as dead")
    p.add_argument("--collect-from", type=int, default=None,
                   help="collect every --collect-every step from here on (default: the last third); step 0 is "
                        "always collected")
    p.add_argument("--collect-every", type=int, default=2, help="collection frequency from --collect-from on")
    p.add_argument("--model-name", default="minilm", help="language model (see sae_data.py)")
    p.add_argument("--layer", type=int, default=3, help="hidden_states[layer] of the language model")
    p.add_argument("--max-tokens", type=int, default=400_000, help="tokens of text to cache")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window")
    p.add_argument("--batch-size", type=int, default=8, help="windows per step")
    p.add_argument("--cache-dir", default=".cache/lightning-sae-samples", help="activation cache")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-features", type=int, default=100, help="feature files written")
    p.add_argument("--report-features", type=int, default=50, help="features in the HTML report")
    p.add_argument("--root", default="lightning_logs/plain_loop_sparsify", help="runs go to <root>/version_N")
    p.add_argument("--out", default=None, help="samples directory (default: <root>/version_N/activation_samples)")
    return p.parse_args(argv)


def next_version_dir(root: Path) -> Path:
    """``root/version_N`` with ``N`` one above the largest existing version (0 when none)."""
    versions = [int(p.name[8:]) for p in root.glob("version_*") if p.name[8:].isdigit()]
    return root / f"version_{max(versions, default=-1) + 1}"


def batches(loader) -> Iterator[dict[str, torch.Tensor]]:
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


def main(argv=None) -> Path:
    args = parse_args(argv)
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = ActivationDataModule(
        model_name=args.model_name, layer=args.layer, seq_len=args.seq_len, max_tokens=args.max_tokens,
        batch_size=args.batch_size, cache_dir=args.cache_dir, seed=args.seed,
    )
    data.prepare_data()
    data.setup("fit")

    sae = SparseCoder(data.d_model, SparseCoderConfig(num_latents=args.num_latents, k=args.k), device,
                      dtype=torch.float32)
    lr = args.lr or 2e-4 / math.sqrt(args.num_latents / 2**14)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, args.warmup_steps)))
    tokens_since_fired = torch.zeros(args.num_latents, dtype=torch.long, device=device)

    collect_from = args.collect_from if args.collect_from is not None else args.steps * 2 // 3
    schedule = CollectionSchedule({0: max(1, collect_from), collect_from: args.collect_every}
                                  if collect_from > 0 else args.collect_every)
    if (problem := schedule.sparse_run_warning(args.steps)) is not None:
        console.print(f"[yellow]{problem}[/yellow]")
    collector = ActivationSampleCollector(
        num_latents=args.num_latents, max_samples_per_feature=100, context_size=20, activation_threshold=0.1,
        top_features_to_save=args.top_features, samples_per_feature_to_save=10,
        deduplicate_contexts=True,  # several epochs over the cached text: keep distinct contexts only
    )

    scale = None
    fvu = dead = 0.0
    start = time.perf_counter()
    stream = batches(data.train_dataloader())
    with Progress(
        TextColumn("[bold]training sparsify SAE"), BarColumn(), MofNCompleteColumn(),
        TextColumn("steps  fvu {task.fields[fvu]:.3f}  dead {task.fields[dead]:.1%}  collected {task.fields[n]}"),
        TimeRemainingColumn(), console=console,
    ) as progress:
        task = progress.add_task("train", total=args.steps, fvu=1.0, dead=0.0, n=0)
        for step in range(args.steps):
            batch = next(stream)
            tokens = batch["tokens"]
            x = batch["activations"].to(device).reshape(-1, data.d_model)
            if scale is None:
                # One constant for the whole run, so that the activation threshold means the same on any model.
                scale = math.sqrt(data.d_model) / x.norm(dim=-1).mean().item()
            x = x * scale
            if step == 0:
                sae.b_dec.data = x.mean(0)  # sparsify: centre the pre-activations at initialization
            sae.set_decoder_norm_to_unit_norm()
            dead_mask = tokens_since_fired > args.dead_after_tokens if args.auxk_alpha > 0 else None
            out = sae(x, dead_mask=dead_mask)
            loss = out.fvu + args.auxk_alpha * out.auxk_loss
            loss.backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            warmup.step()

            with torch.no_grad():
                tokens_since_fired += x.shape[0]
                tokens_since_fired[out.latent_indices.flatten()] = 0
            if schedule.is_due(step):
                # `step` = optimizer steps taken before this batch, as the Lightning callback records it.
                collector.update(tokens, latent_indices=out.latent_indices.detach(),
                                 latent_values=out.latent_acts.detach(), step=step)
            fvu, dead = out.fvu.item(), (tokens_since_fired > args.dead_after_tokens).float().mean().item()
            progress.update(task, advance=1, fvu=fvu, dead=dead, n=schedule.num_due_before(step + 1))
    console.print(f"trained {args.steps} steps in {time.perf_counter() - start:.1f} s: fvu {fvu:.3f}, "
                  f"dead {dead:.1%}")

    samples = Path(args.out) if args.out else next_version_dir(Path(args.root)) / "activation_samples"
    collector.save(samples, tokenizer=data.tokenizer)
    # The SAE and the collection together: `collector.load_state_dict(ckpt["samples"])` continues it exactly.
    checkpoint = samples.parent / f"{samples.name}_checkpoint.pt"
    tmp = checkpoint.with_name(checkpoint.name + ".tmp")
    torch.save({"sae": sae.state_dict(), "input_scale": scale, "step": args.steps, "samples": collector.state_dict()},
               tmp)
    os.replace(tmp, checkpoint)
    console.print(f"checkpoint        : {checkpoint.resolve()}", soft_wrap=True)
    report(samples, args.report_features)
    return samples


def report(samples: Path, top_k_features: int) -> None:
    """Print where the samples are, write the HTML report, print the top feature."""
    console.rule("[bold]Activation samples")
    console.print(f"samples directory : {samples.resolve()}", soft_wrap=True)
    md = samples / "interpretability_report.md"
    if md.exists():
        console.print(f"Markdown report   : {md.resolve()}", soft_wrap=True)
    analyzer = ActivationSampleAnalyzer(str(samples))
    html = samples / "report.html"
    analyzer.generate_html_report(str(html), top_k_features=top_k_features, examples_per_feature=10)
    console.print(f"HTML report       : {html.resolve()}", soft_wrap=True)
    ranked = read_samples_dir(samples).summary.get("top_features_by_activation", [])
    if ranked:
        analyzer.print_feature_report(feature_idx=int(ranked[0]["feature_idx"]), num_examples=5)


if __name__ == "__main__":
    main()
