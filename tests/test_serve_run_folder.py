"""`serve` on a run folder of many SAEs: each SAE a run of its own, and searches across SAEs checked by brute force."""

import json
import threading
import time

import pytest
from render_support import FakeTokenizer, hostile_vocab
from test_run_folder import SAES, write_run_folder

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from starlette.testclient import TestClient  # noqa: E402

from lightning_sae_samples import ActivationSampleAnalyzer  # noqa: E402
from lightning_sae_samples.samples_dir.names import RUN_INDEX_NAME, SamplesDirectoryError  # noqa: E402
from lightning_sae_samples.serve.app import create_app  # noqa: E402
from lightning_sae_samples.serve.runs import RunSet  # noqa: E402

VOCAB = hostile_vocab()
FIRST = next(iter(SAES))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return write_run_folder(tmp_path_factory.mktemp("serve-many") / "run")


@pytest.fixture(scope="module")
def client(run):
    with TestClient(create_app(RunSet(run, tokenizer=FakeTokenizer(VOCAB)))) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def kept(run):
    """Each SAE's kept top samples of every latent, read one latent at a time through the analyzer."""
    out = {}
    for name in SAES:
        analyzer = ActivationSampleAnalyzer(run / name, tokenizer=FakeTokenizer(VOCAB))
        out[name] = {i: analyzer.feature(i, 1000).samples for i in range(analyzer.num_features)}
    return out


def get(client, url, status=200):
    response = client.get(url)
    assert response.status_code == status, response.text
    return response.json()


def test_each_sae_is_a_run_named_as_in_the_index(client):
    runs = get(client, "/api/runs")
    assert [r["name"] for r in runs["runs"]] == runs["saes"] == runs["searchable"] == list(SAES)
    for name, (num_latents, steps, _) in SAES.items():
        summary = get(client, f"/api/summary?run={name}")
        assert summary["run"] == name and summary["summary"]["num_features"] == num_latents
        assert summary["tokens_seen"] == f"{4 * 12 * steps:,}"


def _expected(kept, matches):
    """Per SAE: ``[(latent, matching samples)]`` by count then index, and each latent's best matching rank."""
    out = {}
    for name, latents in kept.items():
        counts, best = {}, {}
        for idx, samples in latents.items():
            ranks = [rank for rank, sample in enumerate(samples) if matches(sample)]
            if ranks:
                counts[idx], best[idx] = len(ranks), ranks[0] + 1
        out[name] = (sorted(counts.items(), key=lambda item: (-item[1], item[0])), best)
    return out


def test_context_search_across_saes_finds_exactly_the_latents_holding_it(client, kept):
    needle = " lord"
    expected = _expected(kept, lambda s: needle in "".join(t.text for t in s.context).casefold())
    assert all(rows for rows, _ in expected.values())
    found = get(client, "/api/search/saes?mode=context&text=%20LORD&limit=100")
    assert [s["sae"] for s in found["saes"]] == list(SAES)
    for result in found["saes"]:
        rows, best = expected[result["sae"]]
        assert result["total"] == len(rows) and not result["capped"]
        assert [(r["idx"], r["context_samples"]) for r in result["rows"]] == rows
        for row in result["rows"]:
            sample = kept[result["sae"]][row["idx"]][best[row["idx"]] - 1]
            assert row["example"]["rank"] == best[row["idx"]]
            assert [t["text"] for t in row["example"]["tokens"]] == [t.text for t in sample.context]


def test_token_search_across_saes_agrees_with_a_loop_over_kept_samples(client, kept):
    text = " Lord"
    expected = _expected(kept, lambda s: s.activating_token.text.strip().casefold() == "lord")
    assert any(rows for rows, _ in expected.values())
    found = get(client, "/api/search/saes?mode=token&text=" + text.replace(" ", "%20"))
    for result in found["saes"]:
        assert [(r["idx"], r["token_samples"]) for r in result["rows"]] == expected[result["sae"]][0]


def test_a_search_can_name_its_saes_and_bad_ones_are_refused(client):
    one = get(client, "/api/search/saes?mode=context&text=lord&saes=layers.3.mlp,layers.3.mlp")
    assert [s["sae"] for s in one["saes"]] == ["layers.3.mlp"]
    assert "no SAE '..'" in get(client, "/api/search/saes?mode=context&text=lord&saes=..", 404)["error"]
    assert "`mode` must be one of token, context" in get(client, "/api/search/saes?mode=regex&text=a", 400)["error"]
    assert "Pass `text`" in get(client, "/api/search/saes?mode=token", 400)["error"]
    assert "`limit` must be between 1 and 100" in get(client, "/api/search/saes?text=a&limit=0", 400)["error"]


def test_a_bad_run_index_is_refused_at_start_naming_it(tmp_path):
    root = write_run_folder(tmp_path / "run", {"a": (16, 1, 0)})
    (root / RUN_INDEX_NAME).write_text(json.dumps({"writer": "lightning-sae-samples", "run_format_version": 1,
                                                   "saes": [{"name": "../a", "dir": "../a"}]}))
    with pytest.raises(SamplesDirectoryError, match=RUN_INDEX_NAME):
        RunSet(root)


def test_a_run_folder_served_before_its_first_save_lists_its_saes_once_the_index_comes(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    runs = RunSet(root, poll_seconds=0.05)
    assert runs.names == ["run"] and runs.sae_names == ()
    runs.start()
    try:
        with TestClient(create_app(runs)) as client:
            assert get(client, "/api/status")["state"] == "waiting"
            write_run_folder(root)
            deadline = time.monotonic() + 20
            while runs.names != list(SAES):
                assert time.monotonic() < deadline, runs.names
                time.sleep(0.05)
            assert get(client, "/api/runs")["saes"] == list(SAES)
            assert get(client, f"/api/summary?run={FIRST}")["summary"]["num_features"] == SAES[FIRST][0]
            assert "no run 'run'" in get(client, "/api/status?run=run", 404)["error"]
    finally:
        runs.stop()


def test_requests_racing_to_an_sae_not_loaded_yet_all_get_its_save(run):
    runs = RunSet(run, tokenizer=FakeTokenizer(VOCAB))
    second = list(SAES)[1]
    with TestClient(create_app(runs)) as client:
        barrier = threading.Barrier(6)
        codes = []

        def ask():
            barrier.wait()
            codes.append(client.get(f"/api/features?run={second}&limit=5").status_code)

        threads = [threading.Thread(target=ask) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert codes == [200] * 6
