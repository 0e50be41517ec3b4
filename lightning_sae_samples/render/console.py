"""Terminal rendering with rich: feature reports with highlighted contexts, and run summaries.

Token text is only ever appended to :class:`rich.text.Text` as plain text (never parsed as rich
markup), after :func:`~lightning_sae_samples.render.escaping.visible`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

from rich.color import Color
from rich.console import Console, Group
from rich.panel import Panel
from rich.style import Style
from rich.table import Table
from rich.text import Text

from lightning_sae_samples.render import formatting, heat
from lightning_sae_samples.render.escaping import visible
from lightning_sae_samples.render.histogram import display_bins, text_bar

if TYPE_CHECKING:
    from lightning_sae_samples.analyzer import FeatureSamples, FeatureStats, RunSummary, Sample

BAR_STYLE = "dark_orange"
ACTIVATING = Style(bold=True, underline=True)
VALUE_STYLE = Style(color="bright_red", bold=True)


def token_style(activation: float, feature_max: float) -> Style:
    """Style of a context token: background strength follows its activation relative to the max."""
    level = heat.strength(activation, feature_max)
    if level == 0:
        return Style()
    r, g, b = heat.rgb(level)
    text_colour = Color.from_rgb(255, 255, 255) if heat.needs_light_text(level) else Color.from_rgb(0, 0, 0)
    return Style(color=text_colour, bgcolor=Color.from_rgb(r, g, b))


def highlighted_context(sample: Sample, feature_max: float) -> Text:
    """A sample's context, each token on its heat background, the activating token marked.

    The activating token is bold and underlined and followed by its value in brackets.
    """
    text = Text()
    for i, token in enumerate(sample.context):
        style = token_style(token.activation, feature_max)
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
                cells += [Text(visible(side[n].token)), Text(formatting.signed(side[n].value), style="dim")]
            else:
                cells += ["", ""]
        table.add_row(*cells)
    return table


def _step_range(first: Optional[int], last: Optional[int]) -> str:
    return "never" if first is None else f"{first} – {last}"


def print_feature(feature: FeatureSamples, console: Optional[Console] = None) -> None:
    """Print one latent: statistics, activation histogram and highlighted examples."""
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
    effects = logit_effects_table(feature)
    if effects is not None:
        console.print(Text(""), effects)
    if not feature.samples:
        console.print(Text("\nNo examples: this latent never fired above the threshold.", style="dim"))
        return
    console.print(Text(f"\nTop {len(feature.samples)} examples", style="bold"))
    examples = Table(show_header=True, header_style="bold", expand=True, show_lines=False)
    examples.add_column("#", justify="right", no_wrap=True)
    examples.add_column("Activation", justify="right", no_wrap=True)
    examples.add_column("Step", justify="right", no_wrap=True)
    examples.add_column("Context", ratio=1)
    for n, sample in enumerate(feature.samples, start=1):
        examples.add_row(
            str(n),
            formatting.value(sample.activation_value),
            str(sample.step),
            highlighted_context(sample, stats.max_activation),
        )
    console.print(examples)


def top_tokens_text(feature: FeatureSamples, limit: int = 3) -> Text:
    """``token ×n`` for the tokens a latent fires on most."""
    text = Text()
    for n, (token, occurrences) in enumerate(feature.top_tokens(limit)):
        if n:
            text.append(", ")
        text.append(visible(token), style="bold")
        text.append(f" ×{occurrences}", style="dim")
    return text


def print_summary(
    summary: RunSummary, features: Sequence[FeatureSamples], rank_by: str, console: Optional[Console] = None
) -> None:
    """Print the run summary and a table of top latents."""
    console = console or Console()
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold cyan")
    facts.add_column()
    facts.add_row("Samples directory", Text(str(summary.path)))
    facts.add_row("Global step", str(summary.global_step))
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
    table = Table(title=f"Top {len(features)} features by {rank_by}", header_style="bold")
    for name in ("Rank", "Feature", "Max", "Mean", "Count", "Frequency"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("Fires most on")
    for rank, feature in enumerate(features, start=1):
        s = feature.stats
        table.add_row(
            str(rank),
            str(s.feature_idx),
            formatting.value(s.max_activation),
            formatting.value(s.mean_activation),
            formatting.count(s.activation_count),
            formatting.frequency(s.frequency),
            top_tokens_text(feature),
        )
    console.print(table)
