"""Terminal rendering with rich: feature reports with highlighted contexts, and run summaries.

Token text is only ever appended to :class:`rich.text.Text` as plain text (never parsed as rich
markup), after :func:`~lightning_sae_samples.render.escaping.visible`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from rich.color import Color
from rich.console import Console, Group
from rich.panel import Panel
from rich.style import Style
from rich.table import Table
from rich.text import Text

from lightning_sae_samples.analysis.records import DRIFT_THRESHOLD, FeatureSamples, FeatureStats, RunSummary, Sample
from lightning_sae_samples.render import formatting, heat, views
from lightning_sae_samples.render.escaping import token_label, visible
from lightning_sae_samples.render.histogram import display_bins, text_bar
from lightning_sae_samples.render.views import interval_share, needs_gap

BAR_STYLE = "dark_orange"
ACTIVATING = Style(bold=True, underline=True)
VALUE_STYLE = Style(color="bright_red", bold=True)


def token_style(activation: Optional[float], feature_max: float) -> Style:
    """Style of a context token: background strength follows its activation relative to the max."""
    level = heat.strength(activation, feature_max)
    if level == 0:
        return Style()
    r, g, b = heat.rgb(level)
    text_colour = Color.from_rgb(255, 255, 255) if heat.needs_light_text(level) else Color.from_rgb(0, 0, 0)
    return Style(color=text_colour, bgcolor=Color.from_rgb(r, g, b))


def highlighted_context(sample: Sample, feature_max: float) -> Text:
    """A sample's context, each token on its heat background, the activating token marked.

    The activating token is bold and underlined and followed by its value in brackets; an undecoded id
    (``[12575]``) is spaced from its neighbours.
    """
    text = Text()
    for i, token in enumerate(sample.context):
        style = token_style(token.activation, feature_max)
        if i and needs_gap(sample.context[i - 1].text, token.text):
            text.append(" ")
        if i == sample.context_position:
            text.append(visible(token.text), style + ACTIVATING)
            text.append(f"[{formatting.value(token.activation)}]", VALUE_STYLE)
        else:
            text.append(visible(token.text), style)
    return text


def histogram_text(edges: Sequence[float], counts: Sequence[int], width: int = 30, log10: bool = False) -> Text:
    """A histogram as aligned lines of bars."""
    bins = display_bins(edges, counts, log10_edges=log10)
    text = Text()
    if not bins:
        return Text("(empty)", style="dim")
    label_width = max(len(b.label) for b in bins)
    count_width = max(len(formatting.count(b.count)) for b in bins)
    for n, b in enumerate(bins):
        if n:
            text.append("\n")
        text.append(f"{b.label:>{label_width}} ", style="dim")
        text.append(f"{text_bar(b.fraction, width):<{width}}", style=BAR_STYLE)
        text.append(f" {formatting.count(b.count):>{count_width}}")
    return text


def statistics_table(stats: FeatureStats) -> Table:
    """Two-column table of a latent's statistics."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold cyan")
    table.add_column()
    rows = [
        ("Max activation", formatting.value(stats.max_activation)),
        ("Mean ± std", f"{formatting.value(stats.mean_activation)} ± {formatting.value(stats.std_activation)}"),
        ("Min activation", formatting.value(stats.min_activation)),
        ("Activation count", formatting.count(stats.activation_count)),
        ("Frequency", formatting.frequency(stats.frequency)),
        ("Samples kept", formatting.count(stats.num_samples)),
        ("Steps fired", _step_range(stats.first_step, stats.last_step)),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def logit_effects_table(feature: FeatureSamples) -> Optional[Table]:
    """Promoted and suppressed tokens side by side, or ``None`` when the logit effects are unknown."""
    effects = feature.logit_effects
    if effects is None:
        return None
    table = Table(title="Logit effects", title_justify="left", header_style="bold", show_edge=False)
    table.add_column("Promotes")
    table.add_column("", justify="right", no_wrap=True)
    table.add_column("Suppresses")
    table.add_column("", justify="right", no_wrap=True)
    for n in range(max(len(effects.promoted), len(effects.suppressed))):
        cells: list = []
        for side in (effects.promoted, effects.suppressed):
            if n < len(side):
                cells += [Text(token_label(side[n].token)), Text(formatting.signed(side[n].value), style="dim")]
            else:
                cells += ["", ""]
        table.add_row(*cells)
    return table


def _step_range(first: Optional[int], last: Optional[int]) -> str:
    return "never" if first is None else f"{first} – {last}"


def examples_table(samples: Sequence[Sample], feature_max: float) -> Table:
    """Numbered examples: activation, step and highlighted context."""
    table = Table(show_header=True, header_style="bold", expand=True, show_lines=False)
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("Activation", justify="right", no_wrap=True)
    table.add_column("Step", justify="right", no_wrap=True)
    table.add_column("Context", ratio=1)
    for n, sample in enumerate(samples, start=1):
        value = formatting.value(sample.activation_value)
        table.add_row(str(n), value, str(sample.step), highlighted_context(sample, feature_max))
    return table


def interval_table(feature: FeatureSamples) -> Optional[Table]:
    """One table of the random samples per activation interval (a section per interval), or ``None``.

    Intervals the latent never reached are left out; ``None`` when the run kept no interval samples.
    """
    if not feature.interval_groups:
        return None
    stats = feature.stats
    table = Table(
        title="Samples across the activation range", title_justify="left", title_style="bold",
        header_style="bold", expand=True,
    )
    table.add_column("Interval", no_wrap=True)
    table.add_column("Count", justify="right", no_wrap=True)
    table.add_column("Activation", justify="right", no_wrap=True)
    table.add_column("Step", justify="right", no_wrap=True)
    table.add_column("Context", ratio=1)
    groups = [g for g in feature.interval_groups if g.count or g.samples]
    for n, group in enumerate(groups):
        if n:
            table.add_section()
        label = formatting.interval(group.low, group.high, group.low_open)
        share = interval_share(group.count, stats.activation_count)
        count = f"{formatting.count(group.count)} ({share})"
        if not group.samples:
            table.add_row(label, count, "", "", Text("no samples kept", style="dim"))
        for i, sample in enumerate(group.samples):
            table.add_row(
                label if i == 0 else "",
                count if i == 0 else "",
                formatting.value(sample.activation_value),
                str(sample.step),
                highlighted_context(sample, stats.max_activation),
            )
    if not groups:
        table.add_row("", "", "", "", Text("no activations", style="dim"))
    return table


def drift_text(feature: FeatureSamples) -> Optional[Text]:
    """The drift flag of a latent (bold red), or ``None`` when it is not flagged."""
    note = formatting.drift_note(feature.recent_overlap, len(feature.recent_samples), DRIFT_THRESHOLD)
    return None if note is None else Text(f"⚠ {note}", style="bold red")


def print_recent(feature: FeatureSamples, console: Console, window: Optional[tuple[int, int]] = None) -> None:
    """Print a latent's recent top samples and its recent overlap, flagged when low; nothing without a window."""
    if feature.recent_overlap is None:
        return
    head = Text("\nRecent top samples", style="bold")
    if window is not None:
        head.append(f" (steps {formatting.step_range(window)})", style="bold")
    head.append(f"  recent overlap {formatting.overlap(feature.recent_overlap)}", style="dim")
    console.print(head)
    flag = drift_text(feature)
    if flag is not None:
        console.print(flag)
    if feature.recent_samples:
        console.print(examples_table(feature.recent_samples, feature.stats.max_activation))
    else:
        console.print(Text("No activation in the recent window.", style="dim"))


def print_feature(
    feature: FeatureSamples, console: Optional[Console] = None, recent_window: Optional[tuple[int, int]] = None
) -> None:
    """Print one latent: statistics, histogram, highlighted examples, interval samples and recent samples.

    Args:
        feature: The latent.
        console: Where to print; default: a new console on stdout.
        recent_window: First and last step of the run's recent window, shown with the recent samples.
    """
    console = console or Console()
    stats = feature.stats
    source = "" if feature.saved else " (from full_state.pt)"
    console.rule(Text(f"Feature {stats.feature_idx}{source}", style="bold"))
    hist = stats.histogram
    console.print(
        Group(
            statistics_table(stats),
            Text(""),
            Text("Activation histogram", style="bold"),
            histogram_text(hist.bin_edges, hist.counts),
        )
    )
    if feature.story:
        story = Text("\nThrough training: ", style="bold")
        story.append(visible(feature.story), style="")
        console.print(story)
    meaning = meaning_text(feature)
    if meaning is not None:
        console.print(Group(Text(""), meaning))
    neighbours = neighbours_table(feature)
    if neighbours is not None:
        console.print(Text(""), neighbours)
    effects = logit_effects_table(feature)
    if effects is not None:
        console.print(Text(""), effects)
    if not feature.samples:
        console.print(Text("\nNo examples: this latent never fired above the threshold.", style="dim"))
        return
    console.print(Text(f"\nTop {len(feature.samples)} examples", style="bold"))
    note = views.unknown_note(feature.samples)
    if note is not None:
        console.print(Text(note, style="dim"))
    console.print(examples_table(feature.samples, stats.max_activation))
    intervals = interval_table(feature)
    if intervals is not None:
        console.print(Text(""), intervals)
    print_recent(feature, console, recent_window)


def meaning_text(feature: FeatureSamples) -> Optional[Text]:
    """The latent's label, explanation and score (and whether it is older than the samples), or ``None``."""
    view = views.meaning_view(feature)
    if view is None:
        return None
    text = Text()
    if view["label"]:
        text.append("Label: ", style="bold")
        text.append(view["label"])
        text.append("\n")
    if view["explanation"]:
        text.append("Explanation: ", style="bold")
        text.append(view["explanation"])
        text.append(f" ({view['scores']})", style="dim")
        if view["stale"]:
            text.append(f"\n⚠ {view['stale']}", style="bold yellow")
    text.rstrip()
    return text if text.plain else None


def neighbours_table(feature: FeatureSamples) -> Optional[Table]:
    """The latents of closest decoder direction with their cosine and explanation or top tokens, or ``None``."""
    if not feature.neighbours:
        return None
    table = Table(title="Neighbours (decoder cosine)", header_style="bold", title_justify="left")
    table.add_column("Feature", justify="right")
    table.add_column("Cosine", justify="right")
    table.add_column("Explanation or top tokens")
    for n in views.neighbours_view(feature):
        tokens = ", ".join(token_label(t) for t in n["top_tokens"]) or "–"
        what = Text(n["explanation"]) if n["explanation"] else Text(tokens, style="dim")
        table.add_row(str(n["idx"]), n["cosine"], what)
    return table


def top_tokens_text(feature: FeatureSamples, limit: int = 3) -> Text:
    """``token ×n`` for the tokens a latent fires on most."""
    text = Text()
    for n, (token, occurrences) in enumerate(feature.top_tokens(limit)):
        if n:
            text.append(", ")
        text.append(token_label(token), style="bold")
        text.append(f" ×{occurrences}", style="dim")
    if text:
        text.append(f" (of {feature.top_tokens_over})", style="dim")
    return text


def _meaning_cells(feature: FeatureSamples) -> list[Text]:
    view = views.meaning_view(feature)
    if view is None:
        return [Text(""), Text("–"), Text("–")]
    return [Text(view["label"] or view["explanation"] or ""), Text(view["score"]), Text(view["embedding_score"])]


def print_summary(
    summary: RunSummary, features: Sequence[FeatureSamples], rank_by: str, console: Optional[Console] = None
) -> None:
    """Print the run summary and a table of top latents.

    When the run kept a recent window, the table has a recent-overlap column and the flagged latents follow it.
    """
    console = console or Console()
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold cyan")
    facts.add_column()
    facts.add_row("Samples directory", Text(str(summary.path)))
    facts.add_row("Global step", str(summary.global_step))
    facts.add_row("What it is", Text(summary.kind))
    facts.add_row(
        "Steps collected",
        f"{summary.steps_collected} ({formatting.step(summary.first_collected_step)}"
        f" – {formatting.step(summary.last_collected_step)})",
    )
    facts.add_row("Tokens seen", formatting.count(summary.tokens_seen))
    facts.add_row("Latents tracked", formatting.count(summary.num_features_tracked))
    facts.add_row(
        "Alive latents",
        f"{formatting.count(summary.alive_features)} ({formatting.frequency(summary.alive_fraction)})",
    )
    facts.add_row("Never fired", formatting.count(summary.never_fired_features))
    facts.add_row("Samples kept", formatting.count(summary.total_samples_stored))
    freq = summary.frequency_histogram
    console.print(
        Panel(
            Group(facts, Text(""), Text("Firing frequency", style="bold"),
                  histogram_text(freq.bin_edges, freq.counts, width=24, log10=True)),
            title="Activation samples",
            expand=False,
        )
    )
    recent = summary.recent_window_steps is not None
    table = Table(title=f"Top {len(features)} features by {rank_by}", header_style="bold")
    for name in ("Rank", "Feature", "Max", "Mean", "Count", "Frequency", *(["Recent overlap"] if recent else [])):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("Fires most on")
    explained = any(f.meaning is not None for f in features)
    if explained:
        table.add_column("Explanation")
        table.add_column("Detection", justify="right")
        table.add_column("Embedding AUROC", justify="right")
    for rank, feature in enumerate(features, start=1):
        s = feature.stats
        overlap = []
        if recent:
            flagged = feature.recent_drift
            overlap = [Text(("⚠ " if flagged else "") + formatting.overlap(s.recent_overlap),
                            style="bold red" if flagged else "")]
        table.add_row(
            str(rank),
            str(s.feature_idx),
            formatting.value(s.max_activation),
            formatting.value(s.mean_activation),
            formatting.count(s.activation_count),
            formatting.frequency(s.frequency),
            *overlap,
            top_tokens_text(feature),
            *(_meaning_cells(feature) if explained else []),
        )
    console.print(table)
    if recent:
        flagged_idx = [f.feature_idx for f in features if f.recent_drift]
        line = Text(f"Recent window: steps {formatting.step_range(summary.recent_window)}. ")
        if flagged_idx:
            flagged_list = ", ".join(map(str, flagged_idx))
            message = f"Meaning may have moved (recent overlap < {DRIFT_THRESHOLD:g}): {flagged_list}"
            line.append(message, style="bold red")
        else:
            line.append("No feature in this table is flagged for a low recent overlap.", style="dim")
        console.print(line)


def print_run_summary(path: object, saes: Sequence[Any], console: Optional[Console] = None) -> None:
    """Print one table with a row per SAE of a run folder: latents, alive, dead, dense, tokens seen.

    ``saes`` are :class:`~lightning_sae_samples.analysis.run.SAESummary` rows.
    """
    console = console or Console()
    table = Table(title=Text(f"SAEs of the run {path}"), title_justify="left", header_style="bold")
    table.add_column("SAE", no_wrap=True)
    for name in ("Latents", "Alive", "Dead", "Dense", "Tokens seen", "Step"):
        table.add_column(name, justify="right", no_wrap=True)

    def known(number: Optional[int]) -> str:
        return "–" if number is None else formatting.count(number)

    for s in saes:
        table.add_row(Text(s.name), formatting.count(s.num_latents), formatting.count(s.alive), known(s.dead),
                      known(s.dense), formatting.count(s.tokens_seen), str(s.global_step))
    console.print(table)
    note = "Dead: silent for the run's dead_window_steps (or never fired); dense: firing on more than 10% of tokens."
    if any(s.dead is None for s in saes):
        note += " –: no full_state.pt to count them from."
    console.print(note, style="dim", highlight=False, markup=False, soft_wrap=True)
    first = saes[0].name if saes else "NAME"
    console.print(f"One SAE: lightning-sae-samples {Path(os.fspath(path)) / first}", highlight=False, markup=False,
                  soft_wrap=True)
