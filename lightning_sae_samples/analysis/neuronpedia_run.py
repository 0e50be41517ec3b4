"""Neuronpedia's bulk export of a run folder of many SAEs: each SAE its own source ``<model-id>/<layer>-<set>/``.

Each SAE is exported exactly as one samples directory is (:func:`~lightning_sae_samples.analysis.neuronpedia.
export_neuronpedia`): its own ``source.jsonl`` record and its own ``{layer}-{sourceSet}`` folder, all under one
``OUT`` and its one manifest. The layer of an SAE defaults to the one number in its name (``layers.3.mlp``,
``blocks.3.hook_resid_pre``: 3); two SAEs may not share a source id.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional

from lightning_sae_samples.analysis.neuronpedia import (
    NeuronpediaExport,
    NeuronpediaSource,
    export_neuronpedia,
)

if TYPE_CHECKING:
    from lightning_sae_samples.analysis.run import RunAnalyzer

_NUMBER = re.compile(r"\d+")


def layer_of(name: str) -> Optional[int]:
    """The model layer an SAE name gives: its one number (``layers.3.mlp`` -> 3), else ``None`` (none, or several)."""
    numbers = _NUMBER.findall(name)
    return int(numbers[0]) if len(numbers) == 1 else None


def parse_assignments(values: Sequence[str], option: str, names: Sequence[str]) -> dict[str, str]:
    """``NAME=VALUE`` command-line options as a dict; each ``NAME`` must be one of the run's SAEs.

    Raises:
        ValueError: A value without ``=``, an unknown SAE name or one given twice (the message names the option).
    """
    found: dict[str, str] = {}
    for value in values:
        name, sep, text = value.partition("=")
        if not sep or not text:
            raise ValueError(f"{option} takes NAME=VALUE, e.g. {option} {names[0]}=3; got {value!r}.")
        if name not in names:
            raise ValueError(f"{option} {value}: the run has no SAE {name!r}; its SAEs are {', '.join(names)}.")
        if name in found:
            raise ValueError(f"{option} names the SAE {name!r} twice.")
        found[name] = text
    return found


def run_sources(
    names: Sequence[str],
    base: NeuronpediaSource,
    layers: Optional[Mapping[str, int]] = None,
    source_sets: Optional[Mapping[str, str]] = None,
) -> dict[str, NeuronpediaSource]:
    """One :class:`NeuronpediaSource` per SAE: ``base`` with the SAE's layer and source set.

    Args:
        names: The run's SAE names.
        base: Model id, release and the other records' fields shared by every SAE; its ``source_set`` is every
            SAE's unless ``source_sets`` gives one.
        layers: SAE name to its layer; default: :func:`layer_of` its name.
        source_sets: SAE name to its source set name (without the layer).

    Raises:
        ValueError: An SAE without a layer in its name nor in ``layers``, or two SAEs with one source id.
    """
    layers, source_sets = dict(layers or {}), dict(source_sets or {})
    sources: dict[str, NeuronpediaSource] = {}
    for name in names:
        layer = layers.get(name, layer_of(name))
        if layer is None:
            raise ValueError(f"The SAE name {name!r} gives no layer (it needs exactly one number); pass it: "
                             f"--sae-layer {name}=N (Python: layers={{{name!r}: N}}).")
        sources[name] = dataclasses.replace(base, layer=layer, source_set=source_sets.get(name, base.source_set))
    by_id: dict[str, str] = {}
    for name, source in sources.items():
        other = by_id.setdefault(source.source_id, name)
        if other != name:
            raise ValueError(
                f"The SAEs {other!r} and {name!r} would both be the Neuronpedia source {source.source_id!r}. Give one"
                f" its own source set: --sae-source-set {name}=NAME (Python: source_sets={{{name!r}: 'NAME'}})."
            )
    return sources


def export_neuronpedia_run(
    run: RunAnalyzer,
    out_dir: Any,
    sources: Mapping[str, NeuronpediaSource],
    top_k: Optional[int] = None,
    num_examples: Optional[int] = None,
    tokenizer: Any = None,
    progress: bool = False,
) -> dict[str, NeuronpediaExport]:
    """Write each SAE of ``run`` as its own Neuronpedia source into ``out_dir`` (see :func:`export_neuronpedia`).

    Args:
        run: The opened run folder.
        out_dir: Output folder (created if missing); each SAE goes to ``out_dir/<model_id>/<layer>-<set>/``.
        sources: SAE name to its source (:func:`run_sources`); every SAE of the run needs one.
        top_k: Only each SAE's ``top_k`` best saved features (default: all saved ones).
        num_examples: Top samples per feature; default: those in its feature file.
        tokenizer: As for :func:`export_neuronpedia`.
        progress: Show a progress bar on stderr.

    Returns:
        SAE name to what its export wrote, in the run's order.
    """
    missing = [name for name in run.names if name not in sources]
    if missing:
        raise ValueError(f"No Neuronpedia source given for the SAE(s) {', '.join(missing)} (see run_sources).")
    ids = [(s.model_id, s.source_id) for s in sources.values()]
    if len(set(ids)) != len(ids):
        raise ValueError("Two SAEs have one Neuronpedia source id; give each its own (see run_sources).")
    results = {}
    for name in run.names:
        analyzer = run[name]
        features = analyzer.saved_features if top_k is None else analyzer.saved_features[:top_k]
        results[name] = export_neuronpedia(analyzer, out_dir, sources[name], features, num_examples,
                                           tokenizer=tokenizer, progress=progress)
    return results
