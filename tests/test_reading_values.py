"""Values read from disk are checked for value, not only shape: each bad one is a SamplesDirectoryError naming the
file and the field, for the analyzer and for `serve` (503 with that message, never 500)."""

import json
import math
import shutil

import pytest
import torch

from lightning_sae_samples import ActivationSampleAnalyzer, ActivationSampleCollector, SamplesDirectoryError

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from starlette.testclient import TestClient  # noqa: E402

from lightning_sae_samples.serve.app import create_app  # noqa: E402
from lightning_sae_samples.serve.runs import RunSet  # noqa: E402


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A real save with interval and recent samples and a full state."""
    collector = ActivationSampleCollector(num_latents=8, max_samples_per_feature=3, context_size=4,
                                          activation_threshold=0.2, top_features_to_save=3,
                                          samples_per_feature_to_save=2, samples_per_interval=2,
                                          recent_window_steps=2, write_report=False)
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        collector.update(torch.randint(0, 20, (2, 6), generator=gen),
                         latents=torch.rand(2, 6, 8, generator=gen) * 3, step=step)
    path = tmp_path_factory.mktemp("values") / "samples"
    collector.save(path)
    return path


def _state(change):
    def apply(path):
        state = torch.load(path / "full_state.pt", weights_only=True)
        change(state)
        torch.save(state, path / "full_state.pt")
        return "full_state.pt"
    return apply


def _json(name, change):
    def apply(path):
        file = path / name if name != "feature" else sorted(path.glob("feature_*_samples.json"))[0]
        record = json.loads(file.read_text())
        change(record)
        file.write_text(json.dumps(record))  # json.dumps writes NaN and Infinity, as a stranger's file may hold
        return file.name
    return apply


def _raw(name, text):
    def apply(path):
        file = path / name if name != "feature" else sorted(path.glob("feature_*_samples.json"))[0]
        file.write_text(text)
        return file.name
    return apply


def _set(record, keys, value):
    for key in keys[:-1]:
        record = record[key]
    record[keys[-1]] = value


def _first(state, key, value):
    state[key].view(-1)[0] = value


def _hole(state):
    """A -1 inside a window, between real tokens: not the fill beyond a sequence's edge."""
    window = state["top"]["context_tokens"]
    window[int((window >= 0).all(1).nonzero()[0]), 1] = -1


def _fired(state):
    return int((state["count"] > 0).nonzero()[0])


CASES = {
    "NaN in max": (_state(lambda s: s["max"].__setitem__(0, math.nan)), "`max`"),
    "Inf in sum": (_state(lambda s: s["sum"].__setitem__(0, math.inf)), "`sum`"),
    "NaN in interval_edges": (_state(lambda s: s["interval_edges"].__setitem__(1, math.nan)), "`interval_edges`"),
    "NaN in values": (_state(lambda s: _first(s["top"], "values", math.nan)), "`top.values`"),
    "NaN in recent values": (_state(lambda s: _first(s["recent"], "values", math.nan)), "`recent.values`"),
    "negative context token": (_state(lambda s: _first(s["top"], "context_tokens", -7)), "`top.context_tokens`"),
    "EMPTY at a sample's own token": (_state(lambda s: s["top"]["context_tokens"][:, s["half_window"]].fill_(-1)),
                                      "`top.context_tokens`"),
    "hist_edges of 1e308": (_state(lambda s: s["hist_edges"].__setitem__(-1, 1e308)), "`hist_edges`"),
    "negative histogram count": (_state(lambda s: s["hist"]["value"].__setitem__(0, -3)), "`hist`"),
    "count beyond tokens_seen": (_state(lambda s: s["count"].__setitem__(0, 2**62)), "`count`"),
    "negative first_step": (_state(lambda s: s["first_step"].__setitem__(0, -9)), "`first_step`"),
    "NaN threshold": (_state(lambda s: s.__setitem__("threshold", math.nan)), "`threshold`"),
    "first_collected_step 'abc'": (_json("collection_summary.json",
                                         lambda r: r.__setitem__("first_collected_step", "abc")),
                                   "`first_collected_step`"),
    "summary histogram counts of 10**30": (_json("collection_summary.json",
                                                 lambda r: _set(r, ["frequency_histogram", "counts"], [10**30])),
                                           "frequency_histogram.counts"),
    "summary histogram edges of ±1e308": (_json("collection_summary.json",
                                                lambda r: _set(r, ["frequency_histogram", "bin_edges"],
                                                               [-1e308, 1e308])),
                                          "frequency_histogram.bin_edges"),
    "huge global_step": (_json("collection_summary.json", lambda r: r.__setitem__("global_step", 10**30)),
                         "`global_step`"),
    "NaN in an unread summary field": (_json("collection_summary.json",
                                             lambda r: r.__setitem__("avg_samples_per_feature", math.nan)),
                                       "`avg_samples_per_feature`"),
    "string for recent_window_steps": (_json("collection_summary.json",
                                             lambda r: _set(r, ["config", "recent_window_steps"], "abc")),
                                       "recent_window_steps"),
    "summary nested 100,000 deep": (_raw("collection_summary.json", "[" * 100_000 + "]" * 100_000),
                                    "nested too deeply"),
    "feature nested 100,000 deep": (_raw("feature", '{"a":' * 100_000 + "1" + "}" * 100_000), "nested too deeply"),
    "feature histogram edges of ±1e308": (_json("feature", lambda r: _set(r, ["statistics", "histogram", "bin_edges"],
                                                                          [-1e308, 1e308])), "histogram.bin_edges"),
    "feature histogram counts of 10**30": (_json("feature", lambda r: _set(r, ["statistics", "histogram", "counts"],
                                                                           [10**30] * 40)), "histogram.counts"),
    "sum of 1e308 (a mean beyond float32)": (_state(lambda s: s["sum"].__setitem__(_fired(s), 1e308)), "`sum`"),
    "EMPTY inside a window": (_state(_hole), "`top.context_tokens`"),
    "feature NaN max": (_json("feature", lambda r: _set(r, ["statistics", "max_activation"], math.nan)),
                        "`max_activation`"),
    "feature negative token": (_json("feature", lambda r: _set(r, ["top_samples", 0, "context_tokens", 0], -1)),
                               "`context_tokens`"),
    "feature step 'abc'": (_json("feature", lambda r: _set(r, ["top_samples", 0, "step"], "abc")), "`step`"),
    "feature Inf interval bound": (_json("feature", lambda r: _set(r, ["interval_samples", 0, "interval", 0],
                                                                   math.inf)), "`interval`"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_value_is_refused_naming_the_file_and_the_field(tmp_path, pristine, case):
    change, field = CASES[case]
    path = shutil.copytree(pristine, tmp_path / "samples")
    name = change(path)
    with pytest.raises(SamplesDirectoryError) as err:
        analyzer = ActivationSampleAnalyzer(path)
        analyzer.feature(next(i for i in range(8) if i not in analyzer.saved_features))  # reads full_state.pt
        analyzer.render_html(top_k_features=8)
    message = str(err.value)
    assert name in message and field in message, message
    with TestClient(create_app(RunSet(path))) as client:
        response = client.get("/api/summary")
    assert response.status_code == 503, response.text
    assert name in response.json()["error"] and field in response.json()["error"]


def test_the_pristine_save_reads(pristine):
    analyzer = ActivationSampleAnalyzer(pristine)
    assert [analyzer.feature(i).stats.feature_idx for i in range(8)] == list(range(8))

