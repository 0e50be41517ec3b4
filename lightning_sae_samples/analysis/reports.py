"""Report files written into a samples directory or next to it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from lightning_sae_samples.analysis.analyzer import ActivationSampleAnalyzer, PathLike
from lightning_sae_samples.samples_dir.names import REPORT_NAME


def write_report(
    dirpath: PathLike,
    tokenizer: Any = None,
    *,
    top_k_features: Optional[int] = None,
    examples_per_feature: Optional[int] = None,
    rank_by: Optional[str] = None,
    template_dir: Optional[PathLike] = None,
) -> Path:
    """Write ``interpretability_report.md`` into a samples directory, atomically.

    Meant to be called after each save. With the defaults it reads only the saved feature files (all
    of them, with every sample they hold), never ``full_state.pt``.

    Args:
        dirpath: The samples directory just written.
        tokenizer: The run's tokenizer (only used for latents read from ``full_state.pt``).
        top_k_features: Features in the report (default: every saved feature).
        examples_per_feature: Examples per feature (default: the run's ``samples_per_feature_to_save``).
        rank_by: Ranking (default: the run's ``rank_features_by``).
        template_dir: Folder overriding ``report.md.j2``.

    Returns:
        The path of the report.
    """
    analyzer = ActivationSampleAnalyzer(dirpath, template_dir=template_dir, tokenizer=tokenizer)
    top_k = len(analyzer.saved_features) if top_k_features is None else top_k_features
    if examples_per_feature is None:
        saved_counts = [len(analyzer.feature(i).samples) for i in analyzer.saved_features]
        examples_per_feature = int(analyzer.summary.config.get("samples_per_feature_to_save") or 0) or max(
            saved_counts, default=0
        )
    path = analyzer.directory.path / REPORT_NAME
    return analyzer.generate_interpretability_report(path, top_k, examples_per_feature, rank_by)
