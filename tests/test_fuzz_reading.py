"""Fuzzing the reading side: whatever a stranger leaves in a samples directory, readers fail with one clear error.

Random, truncated and type-confused ``collection_summary.json``, feature files, manifests and ``full_state.pt``
dicts go through the analyzer, the reports, the export and the CLI. They must end in ``SamplesDirectoryError`` (or
the analyzer's ``UnknownFeatureError``) naming the file, never another exception type, never a hang, and never
write outside the output path.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from render_support import write_fixture_dir

from lightning_sae_samples import ActivationSampleAnalyzer, SamplesDirectoryError, UnknownFeatureError
from lightning_sae_samples.analysis.export import export_samples

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

ALLOWED = (SamplesDirectoryError, UnknownFeatureError)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
TENSORS = st.sampled_from([
    torch.zeros(0), torch.zeros(3, 2, 5), torch.full((4,), 2**40, dtype=torch.int64), torch.ones(2, dtype=torch.bool),
    torch.tensor([float("nan")]), torch.tensor(-7), torch.arange(10**6 // 8, dtype=torch.int64),
])


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return write_fixture_dir(tmp_path_factory.mktemp("pristine") / "samples", keep_full_state=True)


def _paths(value, prefix=()):
    """Every (path, value) inside a JSON value."""
    yield prefix, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, (*prefix, i))


def _set(root, path, value):
    if not path:
        return value
    node = root
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return root


@st.composite
def corruptions(draw):
    target = draw(st.sampled_from(["summary", "feature", "manifest", "full_state"]))
    kind = draw(st.sampled_from(["truncate", "replace", "confuse", "delete"]))
    return target, kind, draw(st.randoms(use_true_random=False)), draw(JSON), draw(TENSORS)


def _corrupt(directory: Path, target, kind, rng, junk, tensor) -> str:
    if target == "summary":
        path = directory / "collection_summary.json"
    elif target == "manifest":
        path = directory / "sae_samples_manifest.json"
    elif target == "feature":
        path = rng.choice(sorted(directory.glob("feature_*_samples.json")))
    else:
        path = directory / "full_state.pt"
    if kind == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: rng.randrange(len(data))])
        return path.name
    if target == "full_state":
        state = torch.load(path, weights_only=True)
        key = rng.choice(sorted(state))
        if kind == "delete":
            del state[key]
        elif kind == "confuse" and isinstance(state[key], dict) and state[key]:
            state[key][rng.choice(sorted(state[key]))] = tensor
        else:
            state[key] = tensor if kind == "confuse" else junk
        torch.save(state, path)
        return path.name
    record = json.loads(path.read_text(encoding="utf-8"))
    places = list(_paths(record))
    where, _ = rng.choice(places)
    if kind == "replace":
        record = junk
    elif kind == "delete" and where:
        parent = record
        for key in where[:-1]:
            parent = parent[key]
        del parent[where[-1]]
    else:
        record = _set(record, where, junk)
    path.write_text(json.dumps(record), encoding="utf-8")
    return path.name


def _listing(root: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*")}


def read_everything(directory: Path, out: Path) -> None:
    analyzer = ActivationSampleAnalyzer(directory)
    analyzer.summary  # noqa: B018 - reading it is the test
    features = analyzer.features(limit=None)
    for idx in [*analyzer.saved_features[:3], *[f.feature_idx for f in features[-2:]]]:
        analyzer.feature(idx, num_examples=3)
    analyzer.generate_interpretability_report(out / "report.md", top_k_features=3, examples_per_feature=2)
    analyzer.generate_html_report(out / "report.html", top_k_features=3, examples_per_feature=2)
    export_samples(analyzer, out / "export", format="jsonl")


@hypothesis.settings(max_examples=80)
@hypothesis.given(corruptions())
def test_a_corrupt_directory_gives_one_clear_error_and_writes_nothing_outside(tmp_path_factory, pristine, case):
    root = tmp_path_factory.mktemp("case")
    directory = shutil.copytree(pristine, root / "samples")
    name = _corrupt(directory, *case)
    (root / "out").mkdir()
    before = _listing(directory)
    try:
        read_everything(directory, root / "out")
    except ALLOWED as err:
        assert name in str(err) or "samples directory" in str(err).lower() or isinstance(err, UnknownFeatureError), (
            f"the error does not name {name}: {err}"
        )
    assert _listing(directory) == before, "a reader wrote into the samples directory"
    assert {p.name for p in root.iterdir()} == {"samples", "out"}


@pytest.mark.parametrize("target, kind", [("summary", "truncate"), ("feature", "confuse"), ("full_state", "confuse"),
                                          ("manifest", "replace"), ("summary", "confuse")])
def test_the_cli_answers_a_corrupt_directory_with_exit_code_2_and_one_line(tmp_path, pristine, target, kind):
    import random

    directory = shutil.copytree(pristine, tmp_path / "samples")
    for seed in range(20):  # the first corruption this seed makes that a reader refuses
        shutil.rmtree(directory)
        shutil.copytree(pristine, directory)
        _corrupt(directory, target, kind, random.Random(seed), {"x": [1, "y"]}, torch.zeros(3, 2, 5))
        try:
            read_everything(directory, tmp_path)
        except ALLOWED:
            break
    else:
        pytest.skip("no refused corruption found for this target")
    for args in ([str(directory)], [str(directory), "--feature", "3"], [str(directory), "--report", "r.md"]):
        proc = subprocess.run([sys.executable, "-m", "lightning_sae_samples", *args], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path, env={**os.environ, "COLUMNS": "100"})
        if proc.returncode == 0:
            continue  # this command does not read the corrupt part
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ---------------------------------------------------------------------- values, not only shapes and types
_DEEP = "__deeply_nested__"
#: Values a stranger's file may hold where the writer writes a number, a string or a list.
SPECIAL_VALUES = [math.nan, math.inf, -math.inf, 1e308, -1e308, 3.5e38, 10**30, -(10**30), 2**63, 2**64, -1, -7,
                  -(2**31), "abc", "", "1e3", None, True, [], {}, [math.nan], {"x": math.inf}, _DEEP]
VALUES = st.one_of(
    st.sampled_from(SPECIAL_VALUES),
    st.sampled_from(SPECIAL_VALUES),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**70), 2**70),
    st.text(max_size=4),
)
#: Values put into one element of a tensor of ``full_state.pt`` (cast to its dtype).
TENSOR_SPECIALS = [math.nan, math.inf, -math.inf, 1e308, -1e308, -1, -2, -(2**31), 2**31 - 1, 2**62, -(2**62)]
TENSOR_VALUES = st.one_of(
    st.sampled_from(TENSOR_SPECIALS),
    st.sampled_from(TENSOR_SPECIALS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**63), 2**63 - 1),
)
EXAMPLES = 20 if os.environ.get("HYPOTHESIS_PROFILE", "default") == "default" else None


def _tensors(state, prefix=()):
    """Every (path, tensor) inside a state, tables and sparse counts included."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.numel():
            yield (*prefix, key), value
        elif isinstance(value, dict):
            yield from _tensors(value, (*prefix, key))


def _replace_file(path: Path, data: bytes) -> None:
    path.unlink()  # the copy is hard-linked to the pristine directory: never write through the link
    path.write_bytes(data)


@st.composite
def bad_values(draw):
    target = draw(st.sampled_from(["summary", "feature", "full_state"]))
    pick, element = draw(st.integers(0, 255)), draw(st.integers(0, 255))
    if target == "full_state":
        return target, pick, draw(TENSOR_VALUES), element
    return target, pick, draw(VALUES), draw(st.sampled_from([2, 40, 100_000]))


def _put_value(directory: Path, target, pick, value, extra) -> str:
    if target == "full_state":
        path = directory / "full_state.pt"
        state = torch.load(path, weights_only=True)
        places = sorted(_tensors(state), key=lambda p: p[0])
        where, tensor = places[pick % len(places)]
        flat = tensor.view(-1)
        element = extra % flat.numel()
        if tensor.is_floating_point():
            flat[element] = torch.tensor(float(value), dtype=torch.float64).to(tensor.dtype)  # 1e308: inf in fp32
        else:
            info = torch.iinfo(tensor.dtype)
            flat[element] = max(info.min, min(info.max, int(value) if math.isfinite(value) else -1))
        data = __import__("io").BytesIO()
        torch.save(state, data)
        _replace_file(path, data.getvalue())
        return path.name
    if target == "summary":
        path = directory / "collection_summary.json"
    else:
        files = sorted(directory.glob("feature_*_samples.json"))
        path = files[pick % len(files)]
    record = json.loads(path.read_text(encoding="utf-8"))
    places = [p for p, _ in _paths(record) if p]
    where = places[pick % len(places)]
    record = _set(record, where, value)
    text = json.dumps(record)  # NaN and Infinity are written as a stranger's file may hold them
    text = text.replace(json.dumps(_DEEP), "[" * extra + "]" * extra)
    _replace_file(path, text.encode("utf-8"))
    return path.name


def read_and_serve(directory: Path) -> None:
    from lightning_sae_samples.serve.index import RunIndex

    analyzer = ActivationSampleAnalyzer(directory)
    for idx in range(analyzer.num_features):
        analyzer.feature(idx, num_examples=3)
    analyzer.render_html(top_k_features=4, examples_per_feature=2)
    index = RunIndex.load(directory)
    index.summary_json()
    index.feature_list(sort="mean_activation", kind="alive")
    for idx in index.analyzer.saved_features[:2]:
        index.feature_page(idx, 3)
    index.token_search(index.token_ids_for("1"))
    index.context_search("1", 0, 5)


@hypothesis.settings(max_examples=EXAMPLES) if EXAMPLES else (lambda test: test)
@hypothesis.given(bad_values())
def test_a_bad_value_anywhere_gives_one_clear_error_naming_the_file(tmp_path_factory, pristine, case):
    directory = tmp_path_factory.mktemp("value") / "samples"
    shutil.copytree(pristine, directory, copy_function=os.link)
    name = _put_value(directory, *case)
    try:
        read_and_serve(directory)
    except ALLOWED as err:
        assert name in str(err) or isinstance(err, UnknownFeatureError), f"the error does not name {name}: {err}"
HISTORY = dict(top_tokens=3, per_level=2, samples_per_feature=2, dead_window_steps=10)


@pytest.fixture(scope="module")
def history_dir(tmp_path_factory):
    from render_support import collect_state

    from lightning_sae_samples.samples_dir.writer import write_samples_dir

    path = tmp_path_factory.mktemp("history") / "samples"
    write_samples_dir(path, collect_state(), config={}, tokenizer=None, top_features=3, samples_per_feature=2,
                      rank_by="max_activation", global_step=30, history=HISTORY)
    return path


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(data=st.data())
def test_a_hostile_history_file_is_one_line_naming_it(tmp_path_factory, history_dir, data):
    from lightning_sae_samples.analysis.history import FeatureHistory, story_line

    payload = torch.load(history_dir / "training_history.pt", weights_only=True)
    group = data.draw(st.sampled_from([None, "windows", "rows", "samples", "vocab"]))
    target = payload if group is None else payload[group]
    target[data.draw(st.sampled_from(sorted(target)))] = data.draw(TENSORS | JSON)
    copy = tmp_path_factory.mktemp("hostile_history") / "samples"
    shutil.copytree(history_dir, copy)
    torch.save(payload, copy / "training_history.pt")
    try:
        history = FeatureHistory.from_dir(copy)
        history.events(), history.rows(), history.run_series(), story_line(history, 0)
    except SamplesDirectoryError as err:
        assert "\n" not in str(err) and "training_history.pt" in str(err)
