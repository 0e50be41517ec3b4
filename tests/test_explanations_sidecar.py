"""The explanations sidecar: appended under a lock, validated on read, kept by later saves."""

import json
import multiprocessing
import os

import pytest
from helpers import SyntheticSAE, TokenDataset, loader, make_callback, trainer

from lightning_sae_samples import read_samples_dir
from lightning_sae_samples.analysis.explanations import (
    ExplanationRecord,
    append_explanations,
    explanations_path,
    iter_explanation_records,
    read_explanations,
    read_labels,
)
from lightning_sae_samples.samples_dir.names import EXPLANATIONS_LOCK, SamplesDirectoryError


def record(latent, text="numbers", **kw):
    return ExplanationRecord(latent=latent, text=text, model="m", prompt_version="v1", samples_step=3, **kw)


def test_latest_record_per_latent_and_kind_counts(tmp_path):
    append_explanations(tmp_path, [record(1, "old"), record(2, "two", score=0.75, score_contexts=40)])
    append_explanations(tmp_path, [record(1, "new"), record(1, "Bible verses", kind="label", source="label")])
    explained = read_explanations(tmp_path)
    assert {k: v.text for k, v in explained.items()} == {1: "new", 2: "two"}
    assert explained[2].score == 0.75 and explained[2].score_contexts == 40
    assert {k: v.text for k, v in read_labels(tmp_path).items()} == {1: "Bible verses"}
    assert len(list(iter_explanation_records(tmp_path))) == 4


def test_no_sidecar_reads_empty(tmp_path):
    assert read_explanations(tmp_path) == {} and read_labels(tmp_path) == {}


def test_a_torn_last_line_is_ignored_and_cut_by_the_next_append(tmp_path):
    append_explanations(tmp_path, [record(1), record(2)])
    path = explanations_path(tmp_path)
    with open(path, "ab") as handle:
        handle.write(b'{"latent": 3, "text": "cut in the mid')
    with pytest.warns(UserWarning, match="incomplete"):
        assert sorted(read_explanations(tmp_path)) == [1, 2]
    append_explanations(tmp_path, [record(4)])
    assert sorted(read_explanations(tmp_path)) == [1, 2, 4]
    assert all(json.loads(line) for line in path.read_text().splitlines())


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ('{"latent": -1}', "latent"),
        ('{"latent": true}', "latent"),
        ('{"score": NaN}', "NaN"),
        ('{"score": 1.5}', "score"),
        ('{"kind": "x"}', "kind"),
        ('{"text": 5}', "text"),
        ('{"time": "yesterday"}', "time"),
        ('{"source": "web"}', "source"),
        ('{"embedding_score": -0.1}', "embedding_score"),
        ('{"embedding_contexts": 2.5}', "embedding_contexts"),
        ('{"embedding_random_score": "0.5"}', "embedding_random_score"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_hostile_lines_are_refused_naming_file_line_and_field(tmp_path, line, field):
    append_explanations(tmp_path, [record(1)])
    path = explanations_path(tmp_path)
    good = json.loads(path.read_text())
    bad = line if line.startswith("[") else json.dumps({**good, **json.loads(line.replace("NaN", "0"))})
    if "NaN" in line:
        bad = json.dumps(good).replace('"score": null', '"score": NaN')
    with open(path, "a") as handle:
        handle.write(bad + "\n")
    with pytest.raises(SamplesDirectoryError, match=rf"explanations.jsonl, line 2: .*{field}"):
        read_explanations(tmp_path)


def test_lines_written_before_the_embedding_auroc_read_it_as_null(tmp_path):
    append_explanations(tmp_path, [record(1, score=0.7), record(2, embedding_score=0.8, embedding_contexts=40,
                                                                 embedding_random_score=0.5)])
    path = explanations_path(tmp_path)
    first, second = (json.loads(line) for line in path.read_text().splitlines())
    old = {k: v for k, v in first.items() if not k.startswith("embedding_")}
    path.write_text(json.dumps(old) + "\n" + json.dumps(second) + "\n")
    explained = read_explanations(tmp_path)
    assert explained[1].score == 0.7 and explained[1].embedding_score is None
    assert explained[1].embedding_contexts is None and explained[1].embedding_random_score is None
    assert (explained[2].embedding_score, explained[2].embedding_contexts, explained[2].embedding_random_score) == (
        0.8, 40, 0.5)


def test_missing_field_is_named(tmp_path):
    (tmp_path / "explanations").mkdir()
    explanations_path(tmp_path).write_text('{"latent": 1, "text": "a"}\n')
    with pytest.raises(SamplesDirectoryError, match="line 1: missing field `kind`"):
        read_explanations(tmp_path)


def test_links_are_never_followed(tmp_path):
    outside = tmp_path / "outside.jsonl"
    outside.write_text("")
    samples = tmp_path / "samples"
    (samples / "explanations").mkdir(parents=True)
    os.symlink(outside, explanations_path(samples))
    with pytest.raises(SamplesDirectoryError, match="not a regular file"):
        append_explanations(samples, [record(1)])
    with pytest.raises(SamplesDirectoryError, match="not a regular file"):
        read_explanations(samples)
    assert outside.read_text() == ""


def _append_many(samples, start, ready):
    ready.wait()  # both begin together: their appends overlap
    for i in range(start, start + 50):
        append_explanations(samples, [record(i, "x" * 2000)])


def test_concurrent_appenders_interleave_whole_lines(tmp_path):
    # Forked, not spawned: the workers only append (no torch), and a spawned worker spends seconds importing
    # this module, so one finished before the other began.
    context = multiprocessing.get_context("fork")
    ready = context.Barrier(2)
    workers = [context.Process(target=_append_many, args=(tmp_path, s, ready)) for s in (0, 1000)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert [w.exitcode for w in workers] == [0, 0]
    assert sorted(read_explanations(tmp_path)) == [*range(50), *range(1000, 1050)]


def test_an_appender_waits_for_a_line_another_writer_has_in_progress(tmp_path):
    """The lock keeps an appender from cutting another writer's half-written line as a torn tail."""
    import threading

    from filelock import FileLock

    append_explanations(tmp_path, [record(1)])
    path = explanations_path(tmp_path)
    line = (json.dumps(record(2).to_json()) + "\n").encode()
    with FileLock(path.parent / EXPLANATIONS_LOCK):  # another writer, half way through its line
        with open(path, "ab") as handle:
            handle.write(line[:20])
        appender = threading.Thread(target=append_explanations, args=(tmp_path, [record(3)]))
        appender.start()
        appender.join(timeout=0.5)
        assert appender.is_alive(), "the appender did not wait for the lock"
        with open(path, "ab") as handle:
            handle.write(line[20:])
    appender.join()
    assert sorted(read_explanations(tmp_path)) == [1, 2, 3]


def test_a_later_save_keeps_the_sidecar_and_a_new_run_may_reuse_the_directory(tmp_path):
    samples = tmp_path / "samples"
    trainer(tmp_path, [make_callback(samples)], max_steps=2).fit(SyntheticSAE(), loader(TokenDataset()))
    append_explanations(samples, [record(3)])
    before = explanations_path(samples).read_bytes()
    trainer(tmp_path, [make_callback(samples)], max_steps=3).fit(SyntheticSAE(), loader(TokenDataset(seed=1)))
    assert read_samples_dir(samples).summary["global_step"] == 3
    assert explanations_path(samples).read_bytes() == before


def test_a_directory_holding_only_the_sidecar_is_accepted(tmp_path):
    samples = tmp_path / "samples"
    samples.mkdir()
    append_explanations(samples, [record(3)])
    trainer(tmp_path, [make_callback(samples)], max_steps=2).fit(SyntheticSAE(), loader(TokenDataset()))
    assert read_samples_dir(samples).summary["global_step"] == 2
    assert sorted(read_explanations(samples)) == [3]


def test_records_are_validated_when_made():
    with pytest.raises(ValueError, match="score"):
        record(1, score=2.0)


def test_deeply_nested_json_in_an_imported_file_names_the_file_and_line(tmp_path):
    from render_support import write_fixture_dir

    from lightning_sae_samples.explain.imports import ImportFormatError, import_explanations

    samples = write_fixture_dir(tmp_path / "samples")
    deep = "[" * 100_000 + "]" * 100_000
    batch = tmp_path / "explanations" / "batch-0.jsonl"
    batch.parent.mkdir()
    batch.write_text(json.dumps({"index": 1, "description": "fine"}) + "\n" + deep + "\n")
    with pytest.raises(ImportFormatError, match=r"batch-0\.jsonl, line 2: not valid JSON \(nested too deeply\)"):
        import_explanations(samples, tmp_path / "explanations", fmt="neuronpedia")
    (tmp_path / "export.json").write_text(deep)
    with pytest.raises(ImportFormatError, match=r"export\.json: not valid JSON \(nested too deeply\)"):
        import_explanations(samples, tmp_path / "export.json", fmt="neuronpedia")
    assert read_explanations(samples) == {}  # nothing is written
