"""Train a sparse autoencoder on language-model activations and collect its top activating contexts.

Run (from the repository root)::

    HF_HUB_OFFLINE=1 python examples/train_sae.py fit --config examples/configs/minilm_kjv.yaml

Any setting can be overridden on the command line, for example
``--trainer.max_steps 500 --trainer.callbacks.collection_freq '{0: 100, 300: 2}' --data.max_tokens 100000``
(a shorter run needs a shorter collection schedule; the callback warns when it would collect almost nothing).
Use ``--data.source files --data.text_files '["notes/**/*.txt"]'`` for your own text, or
``--data.model_name <hugging-face-name>`` for another model (hidden size is picked up automatically).

After ``fit`` the program prints where the samples directory and the reports are, and prints the
console report of the strongest feature. With ``data.val_tokens`` and a callback whose ``collect_in`` has
``validate`` (the default config), it then runs ``trainer.validate(model, datamodule=dm)`` on the weights training
ended with (not a checkpoint: ``last.ckpt`` may be older) over held-out KJV chapters, written as a snapshot of that
one SAE state, and prints where it is.
The configs set no ``dirpath``, so every run writes its own
``<default_root_dir>/lightning_logs/version_N/activation_samples``. ``ActivationSampleCallback`` (configured under
``trainer.callbacks``) finds the tokenizer on the datamodule (``trainer.datamodule.tokenizer``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lightning.pytorch.cli import LightningCLI  # noqa: E402
from log_progress import progress_bar_for  # noqa: E402
from next_steps import next_steps  # noqa: E402
from rich.console import Console  # noqa: E402
from sae_data import ActivationDataModule  # noqa: E402
from sae_models import SAEModule  # noqa: E402

console = Console()


def find_sample_callback(trainer):
    """The trainer's ``ActivationSampleCallback``, or ``None``."""
    try:
        from lightning_sae_samples import ActivationSampleCallback
    except ImportError:
        return None
    for cb in trainer.callbacks:
        if isinstance(cb, ActivationSampleCallback):
            return cb
    return None


def print_meaning_changes(analyzer) -> None:
    """The three latents whose meaning changed most through training (from the samples' history)."""
    from lightning_sae_samples.analysis.history import story_line

    history = analyzer.history
    if history is None:
        return
    changed = history.most_changed(3)
    console.print(f"\nLatents whose meaning changed most ({len(history.windows)} history windows):")
    for latent in changed:
        console.print(f"  latent {latent}: {story_line(history, latent)}", markup=False, soft_wrap=True)
    if not changed:
        console.print("  none: no latent's activating tokens changed beyond sampling noise (docs/history.md).")


def samples_dir_of(callback, trainer) -> Path:
    """Where the callback wrote its samples (its resolved ``dirpath``, else the documented default)."""
    if getattr(callback, "dirpath", None):
        return Path(callback.dirpath)
    root = trainer.log_dir or trainer.default_root_dir
    return Path(root) / "activation_samples"


def report(trainer, top_k_features: int = 50, examples_per_feature: int = 10) -> None:
    """Print where the samples and reports are, write the HTML report, print one feature."""
    callback = find_sample_callback(trainer)
    if callback is None:
        console.print("[yellow]No ActivationSampleCallback in trainer.callbacks: nothing collected.[/yellow]")
        return
    samples = samples_dir_of(callback, trainer)
    console.rule("[bold]Activation samples")
    console.print(f"samples directory : {samples.resolve()}", soft_wrap=True)
    md = samples / "interpretability_report.md"
    try:
        from lightning_sae_samples import ActivationSampleAnalyzer
    except ImportError:
        console.print(
            "[yellow]lightning_sae_samples.ActivationSampleAnalyzer is not available in this version; "
            "the samples directory above is complete (see docs/format.md).[/yellow]"
        )
        return
    try:
        analyzer = ActivationSampleAnalyzer(str(samples))
        # The callback's report lists every saved feature; rewrite it with report.top_k_features like the HTML.
        analyzer.generate_interpretability_report(
            str(md), top_k_features=top_k_features, examples_per_feature=examples_per_feature
        )
        console.print(f"Markdown report   : {md.resolve()}", soft_wrap=True)
        html = samples / "report.html"
        analyzer.generate_html_report(
            str(html), top_k_features=top_k_features, examples_per_feature=examples_per_feature
        )
        console.print(f"HTML report       : {html.resolve()}", soft_wrap=True)
        feature = _strongest_feature(samples)
        if feature is not None:
            analyzer.print_feature_report(feature_idx=feature, num_examples=5)
        print_meaning_changes(analyzer)
    except Exception as err:  # noqa: BLE001 - training is done; a report problem must not hide the paths
        from lightning_sae_samples.printed_commands import program_command

        console.print(f"[red]Report failed: {type(err).__name__}: {err}[/red]")
        console.print(f"The samples directory is complete: {program_command(samples)} (or the analyzer API).",
                      soft_wrap=True, markup=False)
        raise SystemExit(1) from err


def _strongest_feature(samples: Path):
    """First feature of the summary's ranking, or ``None``."""
    from lightning_sae_samples import read_samples_dir

    ranked = read_samples_dir(samples).summary.get("top_features_by_activation", [])
    return int(ranked[0]["feature_idx"]) if ranked else None


def validate_final_sae(trainer, model, datamodule):
    """``trainer.validate`` of the weights training ended with, on held-out text; the snapshot's directory or ``None``.

    The in-memory model, not ``ckpt_path="last"``: with ``every_n_train_steps`` and ``save_last``, Lightning writes
    ``last.ckpt`` at the last periodic save and not again at the end, so it can be hundreds of steps older.
    """
    callback = find_sample_callback(trainer)
    if callback is None or "validate" not in callback.settings.collect_in or not getattr(datamodule, "val_tokens", 0):
        return None
    trainer.validate(model, datamodule=datamodule)
    return callback.last_snapshot_dir


class SAECLI(LightningCLI):
    """LightningCLI that takes the SAE input width from the datamodule and reports after ``fit``."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.d_model", "model.init_args.d_model", apply_on="instantiate")
        parser.add_argument("--report.top_k_features", type=int, default=50, help="Features in the reports")
        parser.add_argument(
            "--report.examples_per_feature", type=int, default=10, help="Examples per feature in the reports"
        )

    def before_fit(self) -> None:
        self._fit_start = time.perf_counter()

    def after_fit(self) -> None:
        snapshot = validate_final_sae(self.trainer, self.model, self.datamodule)
        if self.trainer.global_rank != 0:
            return
        console.print(f"fit took {time.perf_counter() - self._fit_start:.1f} s")
        cfg = self.config.get(self.subcommand, self.config)
        rep = cfg.get("report", {}) if hasattr(cfg, "get") else {}
        report(
            self.trainer,
            top_k_features=rep.get("top_k_features", 50),
            examples_per_feature=rep.get("examples_per_feature", 10),
        )
        if snapshot is not None:
            console.rule("[bold]Snapshot of the final SAE on held-out text")
            console.print(f"snapshot directory: {snapshot.resolve()}", soft_wrap=True)
        callback = find_sample_callback(self.trainer)
        if callback is not None:
            console.rule("[bold]Next (each line runs as printed, from this directory, in any shell)")
            for what, command in next_steps(samples_dir_of(callback, self.trainer), snapshot):
                console.print(f"{what}:\n  {command}", soft_wrap=True, markup=False, highlight=False)


def main(args=None) -> None:
    SAECLI(
        SAEModule,
        ActivationDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        # On a terminal a rich bar labelled with steps; in a log file a line every 5% of the steps or minute.
        trainer_defaults={"callbacks": [progress_bar_for()]},
        args=args,
    )


if __name__ == "__main__":
    main()
