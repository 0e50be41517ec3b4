"""Reading a run folder of many SAEs: the run index, the analyzer by SAE name, the summary table, reports, export.

The run folder is built as the layout says (``DIR/<name>/`` per SAE, each an ordinary samples directory written by
the real collector and writer, plus ``DIR/sae_samples_run.json``), with SAEs of different ``F``.
"""

import gzip
import json
import os
import re

import pytest
import torch
from render_support import FakeTokenizer, hostile_vocab, write_fixture_dir
from test_cli import run_all

from lightning_sae_samples.analysis.analyzer import ActivationSampleAnalyzer, RunFolderError
from lightning_sae_samples.analysis.neuronpedia import NeuronpediaSource
from lightning_sae_samples.analysis.neuronpedia_run import layer_of, run_sources
from lightning_sae_samples.analysis.run import RunAnalyzer, UnknownSAEError
from lightning_sae_samples.cli import main
from lightning_sae_samples.samples_dir.names import RUN_INDEX_NAME, SamplesDirectoryError, check_sae_name
from lightning_sae_samples.samples_dir.run_index import read_run_index, write_run_index

#: SAE name -> (F, collected steps, seed): different latent counts and token counts per SAE.
SAES = {"layers.5.mlp": (24, 2, 1), "layers.3.mlp": (16, 3, 0)}


def write_run_folder(root, saes=SAES):
    tokenizer = FakeTokenizer(hostile_vocab())
    for name, (num_latents, steps, seed) in saes.items():
        write_fixture_dir(root / name, tokenizer=tokenizer, num_latents=num_latents, steps=steps, seed=seed)
    write_run_index(root, list(saes))
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return write_run_folder(tmp_path_factory.mktemp("many") / "run")


# ---------------------------------------------------------------------------------------------- the run index
def test_the_index_keeps_the_given_order_and_is_the_agreed_json(run):
    assert read_run_index(run) == tuple(SAES)
    assert json.loads((run / RUN_INDEX_NAME).read_text()) == {
        "writer": "lightning-sae-samples", "run_format_version": 1,
        "saes": [{"name": name, "dir": name} for name in SAES],
    }


@pytest.mark.parametrize("name", ["layers.3.mlp", "blocks.3.hook_resid_pre", "l3", "A-b_c.d", "x" * 100])
def test_hook_names_are_valid_sae_names(name):
    assert check_sae_name(name) == name


@pytest.mark.parametrize("name", ["", "../up", ".hidden", "a/b", "a\\b", "x" * 101, "snapshots", "explanations",
                                  "caf\u00e9", " l3", 3, None])
def test_names_that_could_leave_the_folder_or_clash_are_refused(name, tmp_path):
    with pytest.raises(ValueError):
        check_sae_name(name)
    with pytest.raises(ValueError):
        write_run_index(tmp_path, ["ok", name])
    assert not (tmp_path / RUN_INDEX_NAME).exists()


def _index(tmp_path, payload, folders=("a", "b")):
    for folder in folders:
        (tmp_path / folder).mkdir(exist_ok=True)
    text = payload if isinstance(payload, str) else json.dumps(payload)
    (tmp_path / RUN_INDEX_NAME).write_text(text)
    return tmp_path


def _saes(*names):
    return [{"name": n, "dir": n} for n in names]


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        ("{not json", "corrupt"),
        ({"writer": "someone", "run_format_version": 1, "saes": _saes("a")}, "`writer`"),
        ({"writer": "lightning-sae-samples", "run_format_version": 2, "saes": _saes("a")}, "run_format_version 2"),
        ({"writer": "lightning-sae-samples", "run_format_version": 1, "saes": []}, "non-empty list"),
        ({"writer": "lightning-sae-samples", "run_format_version": 1, "saes": [{"name": "a", "dir": "b"}]},
         "the folder is the name"),
        ({"writer": "lightning-sae-samples", "run_format_version": 1, "saes": _saes("../b")}, "SAE name"),
        ({"writer": "lightning-sae-samples", "run_format_version": 1, "saes": _saes("a", "a")}, "more than once"),
        ({"writer": "lightning-sae-samples", "run_format_version": 1, "saes": _saes("a", "c")}, "is missing"),
    ],
)
def test_a_bad_index_is_refused_naming_the_file_and_the_fix(tmp_path, payload, says):
    root = _index(tmp_path, payload)
    with pytest.raises(SamplesDirectoryError) as err:
        ActivationSampleAnalyzer(root)
    message = str(err.value)
    assert str(root / RUN_INDEX_NAME) in message and says in message
    assert re.search(r"re-run|Restore|Install|pass|open each", message, re.IGNORECASE)


def test_links_are_never_followed_out_of_the_folder(tmp_path):
    outside = write_fixture_dir(tmp_path / "elsewhere", tokenizer=FakeTokenizer(hostile_vocab()))
    root = tmp_path / "run"
    root.mkdir()
    os.symlink(outside, root / "a")  # an SAE folder that is a link to another directory
    (root / RUN_INDEX_NAME).write_text(json.dumps({"writer": "lightning-sae-samples", "run_format_version": 1,
                                                   "saes": _saes("a")}))
    with pytest.raises(SamplesDirectoryError, match="not a folder .links are not followed"):
        ActivationSampleAnalyzer(root)
    other = tmp_path / "other"
    (other / "a").mkdir(parents=True)
    write_run_index(other, ["a"])
    (root / RUN_INDEX_NAME).unlink()
    (root / "a").unlink()
    (root / "a").mkdir()
    os.symlink(other / RUN_INDEX_NAME, root / RUN_INDEX_NAME)  # the index itself a link
    with pytest.raises(SamplesDirectoryError, match="not a regular file"):
        ActivationSampleAnalyzer(root)


# ---------------------------------------------------------------------------------------------- the analyzer
def test_the_analyzer_gives_each_sae_by_name_as_its_own_directory_reads(run):
    analyzer = ActivationSampleAnalyzer(run)
    assert isinstance(analyzer.run, RunAnalyzer) and list(analyzer.saes) == list(SAES)
    for name, (num_latents, _, _) in SAES.items():
        alone = ActivationSampleAnalyzer(run / name)
        sae = analyzer[name]
        assert sae is analyzer.saes[name] and sae.num_features == num_latents == alone.num_features
        assert sae.saved_features == alone.saved_features
        top = alone.saved_features[0]
        assert sae.feature(top, 3) == alone.feature(top, 3)
    with pytest.raises(UnknownSAEError, match="'layers.5.mlp', 'layers.3.mlp'"):
        analyzer["layers.4.mlp"]


def test_what_only_one_sae_has_names_the_saes_and_how_to_pick_one(run):
    analyzer = ActivationSampleAnalyzer(run)
    with pytest.raises(RunFolderError, match=r"2 SAEs \(layers.5.mlp, layers.3.mlp\).*analyzer\['layers.5.mlp'\]"):
        analyzer.feature(0)
    assert not hasattr(analyzer, "summary")  # an AttributeError too, so that hasattr and introspection work


def test_a_single_sae_directory_is_read_as_before(run):
    analyzer = ActivationSampleAnalyzer(run / "layers.3.mlp")
    assert analyzer.run is None and analyzer.saes == {} and analyzer.num_features == 16
    with pytest.raises(UnknownSAEError, match="one SAE's samples directory"):
        analyzer["layers.3.mlp"]
    with pytest.raises(AttributeError):
        analyzer.no_such_attribute  # noqa: B018


def test_alive_dead_and_dense_counts_match_the_full_state(run):
    rows = {row.name: row for row in ActivationSampleAnalyzer(run).run.sae_summaries()}
    for name, (num_latents, steps, _) in SAES.items():
        state = torch.load(run / name / "full_state.pt", weights_only=True)
        count = state["count"]
        row = rows[name]
        assert row.num_latents == num_latents and row.tokens_seen == 4 * 12 * steps == int(state["tokens_seen"])
        assert row.alive == int((count > 0).sum()) == 14
        # The collection (steps 0-20) is shorter than the default 10,000-step window: dead means never fired.
        assert row.dead == int((count == 0).sum()) == num_latents - 14
        assert row.dense == int((count > 0.1 * row.tokens_seen).sum())
    (run.parent / "no_state").mkdir()
    bare = write_fixture_dir(run.parent / "no_state" / "a", keep_full_state=False)
    write_run_index(bare.parent, ["a"])
    (row,) = RunAnalyzer(bare.parent).sae_summaries()
    assert (row.alive, row.dead, row.dense) == (ActivationSampleAnalyzer(bare).summary.alive_features, None, None)


# ---------------------------------------------------------------------------------------------- command line
def test_the_summary_of_a_run_folder_is_one_table_with_a_row_per_sae(run, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    assert main([str(run)]) == 0
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if cells and cells[0] in SAES:
            rows[cells[0]] = cells[1:]
    assert list(rows) == list(SAES)  # the run's order
    for row in ActivationSampleAnalyzer(run).run.sae_summaries():
        assert rows[row.name] == [str(row.num_latents), str(row.alive), str(row.dead), str(row.dense),
                                  str(row.tokens_seen), str(row.global_step)]
    assert "Top " not in out and "Samples directories under" not in out


def test_reports_of_a_run_write_an_index_page_linking_each_saes_own_report(run, tmp_path):
    (tmp_path / "out").mkdir()
    done, feature = run_all(
        [[str(run), "--report", "out/r.md", "--html", "out/r.html", "--top-k", "3", "--examples-per-feature", "2"],
         [str(run), "--feature", "1"]],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    md, html = (out / "r.md").read_text(encoding="utf-8"), (out / "r.html").read_text(encoding="utf-8")
    analyzer = ActivationSampleAnalyzer(run)
    for name in SAES:
        assert f"[{name}](<r.{name}.md>)" in md and f'<a href="r.{name}.html">{name}</a>' in html
        assert (out / f"r.{name}.md").read_text(encoding="utf-8") == analyzer[name].render_markdown(3, 2)
        assert (out / f"r.{name}.html").read_text(encoding="utf-8") == analyzer[name].render_html(3, 2)
    assert md.index("layers.5.mlp") < md.index("layers.3.mlp")
    assert feature.returncode == 2 and feature.stdout == ""
    assert f"{run / 'layers.5.mlp'} --feature 1" in feature.stderr and len(feature.stderr.splitlines()) == 1


def _read_source(folder):
    source = json.loads((folder / "source.jsonl").read_text(encoding="utf-8"))
    with gzip.open(folder / "features" / "batch-0.jsonl.gz", "rt", encoding="utf-8") as f:
        features = [json.loads(line) for line in f]
    return source, features


def test_export_writes_each_sae_as_its_own_neuronpedia_source(run, tmp_path):
    code = main(["export", str(run), str(tmp_path / "np"), "--format", "neuronpedia", "--model-id", "gpt2-small",
                 "--source-set", "res-sae", "--sae-source-set", "layers.5.mlp=mlp-sae"])
    assert code == 0
    analyzer = ActivationSampleAnalyzer(run)
    model = tmp_path / "np" / "gpt2-small"
    assert sorted(p.name for p in model.iterdir()) == ["3-res-sae", "5-mlp-sae"]
    for name, folder in (("layers.3.mlp", "3-res-sae"), ("layers.5.mlp", "5-mlp-sae")):
        source, features = _read_source(model / folder)
        assert source["id"] == folder and source["modelId"] == "gpt2-small"
        assert [int(f["index"]) for f in features] == analyzer[name].saved_features
        assert {f["layer"] for f in features} == {folder}


def test_two_saes_on_one_source_id_or_a_name_without_a_layer_are_refused(run, tmp_path, capsys):
    assert layer_of("blocks.3.hook_resid_pre") == 3 and layer_of("embed") is None and layer_of("l3.l4") is None
    base = NeuronpediaSource(model_id="m", source_set="s")
    with pytest.raises(ValueError, match="--sae-source-set b.3.y=NAME"):
        run_sources(["a.3.x", "b.3.y"], base)
    with pytest.raises(ValueError, match="--sae-layer embed=N"):
        run_sources(["embed"], base)
    assert run_sources(["embed"], base, layers={"embed": 0})["embed"].source_id == "0-s"
    assert main(["export", str(run), str(tmp_path / "np"), "--format", "neuronpedia", "--model-id", "m",
                 "--sae-layer", "layers.5.mlp=3"]) == 2
    assert "--sae-source-set layers.3.mlp=NAME" in capsys.readouterr().err
    assert not (tmp_path / "np" / "m").exists()


def test_export_of_tables_writes_each_sae_into_its_own_folder(run, tmp_path):
    assert main(["export", str(run), str(tmp_path / "t"), "--top-k", "2"]) == 0
    for name in SAES:
        lines = (tmp_path / "t" / name / "features.jsonl").read_text(encoding="utf-8").splitlines()
        expected = ActivationSampleAnalyzer(run / name).saved_features[:2]
        assert [json.loads(line)["feature_idx"] for line in lines] == expected


hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
NAMES = st.sampled_from(["a", "b", "../a", "a/b", "", ".", "..", "snapshots", "c", "/etc", "a\x00", "x" * 101])
ENTRY = st.one_of(
    NAMES.map(lambda n: {"name": n, "dir": n}),
    st.fixed_dictionaries({"name": NAMES, "dir": NAMES}),
    st.dictionaries(st.sampled_from(["name", "dir", "extra"]), NAMES | st.integers() | st.none(), max_size=3),
    st.none() | st.integers() | NAMES,
)
INDEX = st.fixed_dictionaries({
    "writer": st.sampled_from(["lightning-sae-samples", "other", None]),
    "run_format_version": st.sampled_from([1, 2, "1", True, None]),
    "saes": st.lists(ENTRY, max_size=4) | st.none() | st.text(max_size=3),
})


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(INDEX)
def test_any_index_gives_names_of_real_folders_inside_or_one_error_naming_it(tmp_path_factory, payload):
    root = tmp_path_factory.mktemp("fuzz")
    for folder in ("a", "b"):  # "c" is never there; "../a" exists outside the folder
        (root / folder).mkdir()
    (root.parent / "a").mkdir(exist_ok=True)
    (root / RUN_INDEX_NAME).write_text(json.dumps(payload))
    try:
        names = read_run_index(root)
    except SamplesDirectoryError as err:
        assert str(root / RUN_INDEX_NAME) in str(err) and "\n" not in str(err)
        return
    assert names and set(names) <= {"a", "b"} and len(set(names)) == len(names)
    assert payload["writer"] == "lightning-sae-samples" and type(payload["run_format_version"]) is int
    assert payload["run_format_version"] == 1
