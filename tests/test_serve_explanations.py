"""`serve` with explanations, labels and neighbours, on a directory a real Trainer writes (ASGI test client)."""

import json
import time

import pytest
import torch
from helpers import SyntheticSAE
from render_support import FakeTokenizer, decoder_matrices, hostile_vocab, write_run_dir

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from starlette.testclient import TestClient  # noqa: E402

from lightning_sae_samples.analysis.explanations import (  # noqa: E402
    ExplanationRecord,
    append_explanations,
    explanations_path,
    read_labels,
)
from lightning_sae_samples.serve.app import TOKEN_HEADER, create_app  # noqa: E402
from lightning_sae_samples.serve.runs import RunSet  # noqa: E402

NUM_LATENTS = 12
TOKEN = "test-token-123"
ORIGIN = "http://testserver"
TEXTS = {
    0: ("words about the Lord and God", 0.9),
    1: ("the word Lord at the start of a verse", 0.55),
    2: ("numbers and counting", 0.7),
    3: ("punctuation marks", None),
}


@pytest.fixture()
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-explanations")
    path = write_run_dir(root, FakeTokenizer(hostile_vocab()), num_latents=NUM_LATENTS, top_features=4,
                         logit_effects=decoder_matrices)
    step = json.loads((path / "collection_summary.json").read_text())["global_step"]
    append_explanations(path, [
        ExplanationRecord(latent=i, text=t, score=s, score_contexts=20 if s is not None else None,
                          random_score=0.5 if s is not None else None, model="tiny-model",
                          samples_step=step - 1 if i == 2 else step)
        for i, (t, s) in TEXTS.items()
    ])
    return path


@pytest.fixture()
def client(run_dir):
    runs = RunSet(run_dir)
    assert runs.get(None).current is not None
    with TestClient(create_app(runs, write_token=TOKEN)) as test_client:
        yield test_client


def get(client, url, status=200):
    response = client.get(url)
    assert response.status_code == status, response.text
    return response.json()


def test_rows_and_page_carry_explanation_score_and_staleness(client):
    rows = {r["idx"]: r for r in get(client, "/api/features?sort=index&order=asc&limit=100")["rows"]}
    assert len(rows) == NUM_LATENTS
    for i, (text, score) in TEXTS.items():
        assert rows[i]["explanation"]["text"] == text and rows[i]["explanation"]["score"] == score
    assert all(rows[i]["explanation"] is None for i in range(4, NUM_LATENTS))
    page = get(client, "/api/features/2")
    assert page["explanation"]["stale"] is True and page["explanation"]["samples_step"] == page["global_step"] - 1
    assert get(client, "/api/features/0")["explanation"]["stale"] is False
    assert get(client, "/api/features/0")["explanation"]["random_score"] == 0.5


def test_search_by_explanation_is_ranked(client):
    result = get(client, "/api/search/explanation?text=lord%20GOD")
    assert [r["idx"] for r in result["rows"]] == [0, 1]  # both words beat one
    assert result["total"] == 2 and result["rows"][0]["relevance"] > result["rows"][1]["relevance"]
    assert result["rows"][0]["explanation"]["text"] == TEXTS[0][0]
    assert get(client, "/api/search/explanation?text=nothing-like-it")["total"] == 0
    assert get(client, "/api/search/explanation?text=%20", 400)["error"].startswith("Pass `text`")
    assert [r["idx"] for r in get(client, "/api/search/explanation?text=lord&offset=1&limit=1")["rows"]] == [1]


def test_sort_and_filter_by_score(client):
    rows = get(client, "/api/features?sort=score&order=desc&limit=100")["rows"]
    assert [r["idx"] for r in rows[:3]] == [0, 2, 1]  # unscored last
    assert [r["idx"] for r in get(client, "/api/features?sort=score&order=asc&limit=3")["rows"]] == [1, 2, 0]
    explained = get(client, "/api/features?filter=explained&sort=index&order=asc")
    assert explained["total"] == 4 and [r["idx"] for r in explained["rows"]] == [0, 1, 2, 3]
    assert get(client, "/api/features?filter=unexplained")["total"] == NUM_LATENTS - 4
    high = get(client, "/api/features?score_low=0.6&sort=index&order=asc")
    assert [r["idx"] for r in high["rows"]] == [0, 2]


def test_sort_by_embedding_auroc_is_its_own_column(run_dir):
    step = json.loads((run_dir / "collection_summary.json").read_text())["global_step"]
    append_explanations(run_dir, [  # 3: scored by embedding only (a top-tokens explanation); 0: both
        ExplanationRecord(latent=3, text='"," (before "and")', model="top-tokens", samples_step=step,
                          embedding_score=0.95, embedding_contexts=40, embedding_random_score=0.5),
        ExplanationRecord(latent=0, text=TEXTS[0][0], score=0.9, score_contexts=20, random_score=0.5,
                          model="tiny-model", samples_step=step, embedding_score=0.6, embedding_contexts=40,
                          embedding_random_score=0.45),
    ])
    with TestClient(create_app(RunSet(run_dir), write_token=TOKEN)) as client:
        rows = get(client, "/api/features?sort=embedding_score&order=desc&limit=100")["rows"]
        assert [r["idx"] for r in rows[:2]] == [3, 0]  # the others have no embedding AUROC: last
        assert rows[0]["explanation"]["embedding_score"] == 0.95 and rows[0]["explanation"]["score"] is None
        assert rows[1]["explanation"]["embedding_random_score"] == 0.45
        assert [r["idx"] for r in get(client, "/api/features?sort=score&order=desc&limit=3")["rows"]] == [0, 2, 1]
        asc = get(client, "/api/features?sort=embedding_score&order=asc&limit=2")["rows"]
        assert [r["idx"] for r in asc] == [0, 3]


def test_neighbours_endpoint_matches_brute_force(client):
    w_dec, _ = decoder_matrices(SyntheticSAE(num_latents=NUM_LATENTS))
    unit = w_dec / w_dec.norm(dim=1, keepdim=True)
    for latent in (0, 5, 11):
        got = get(client, f"/api/features/{latent}/neighbours?k=4")
        cos = unit @ unit[latent]
        cos[latent] = -2
        assert [n["idx"] for n in got["neighbours"]] == torch.topk(cos, 4).indices.tolist()
        assert got["neighbours"][0]["cosine"] == pytest.approx(float(cos.max()), abs=2e-3)
    first = get(client, "/api/features/1/neighbours?k=1")["neighbours"][0]
    assert first["idx"] == 0 and first["explanation"]["text"] == TEXTS[0][0]
    assert get(client, "/api/features/0")["has_neighbours"] is True


def test_reload_when_the_sidecar_changes(run_dir):
    runs = RunSet(run_dir, poll_seconds=0.05)
    runs.start()  # the watcher polls the sidecar as `serve` does
    try:
        with TestClient(create_app(runs, write_token=TOKEN)) as client:
            version = get(client, "/api/status")["explanations_version"]
            assert get(client, "/api/search/explanation?text=brand")["total"] == 0
            append_explanations(run_dir, [ExplanationRecord(latent=7, text="a brand new idea", score=0.8,
                                                            samples_step=9)])
            deadline = time.monotonic() + 20
            while get(client, "/api/status")["explanations_version"] == version:
                assert time.monotonic() < deadline, "the sidecar was not reloaded"
                time.sleep(0.05)
            assert [r["idx"] for r in get(client, "/api/search/explanation?text=brand")["rows"]] == [7]
            assert get(client, "/api/features/7")["explanation"]["text"] == "a brand new idea"
    finally:
        runs.stop()


def label(client, idx, text, headers=None, **kwargs):
    base = {"Origin": ORIGIN, TOKEN_HEADER: TOKEN, "Content-Type": "application/json"}
    base.update(headers or {})
    return client.post(f"/api/features/{idx}/label", content=json.dumps({"text": text}),
                       headers={k: v for k, v in base.items() if v is not None}, **kwargs)


def test_same_origin_label_is_saved_to_the_sidecar_only(run_dir, client):
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir() if p.is_file()}
    response = label(client, 5, "  my   favourite latent ")
    assert response.status_code == 200, response.text
    assert response.json()["explanation"]["label"] == "my favourite latent"
    record = read_labels(run_dir)[5]
    assert (record.kind, record.source, record.text) == ("label", "label", "my favourite latent")
    assert get(client, "/api/features/5")["explanation"]["label"] == "my favourite latent"
    assert [r["idx"] for r in get(client, "/api/search/explanation?text=favourite")["rows"]] == [5]
    after = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir() if p.is_file()}
    assert after == before  # the samples files are never written
    assert explanations_path(run_dir).exists()


@pytest.mark.parametrize(
    "headers, why",
    [
        ({"Origin": "http://evil.example"}, "origin"),
        ({"Origin": None}, "origin"),
        ({TOKEN_HEADER: None}, "token"),
        ({TOKEN_HEADER: "guessed"}, "token"),
        ({"Sec-Fetch-Site": "cross-site"}, "cross-site"),
        ({"Content-Type": "text/plain"}, "application/json"),
    ],
)
def test_cross_site_or_tokenless_writes_are_refused(run_dir, client, headers, why):
    response = label(client, 4, "sneaky", headers)
    assert response.status_code == 403 and why in response.json()["error"]
    assert 4 not in read_labels(run_dir)


def test_a_read_only_server_refuses_writes(run_dir):
    runs = RunSet(run_dir)
    with TestClient(create_app(runs, write_token=TOKEN, allow_writes=False)) as read_only:
        response = label(read_only, 4, "nope")
        assert response.status_code == 403 and "--allow-writes" in response.json()["error"]
        page = read_only.get("/").text
        assert 'name="sae-samples-writes" content="0"' in page
    assert 4 not in read_labels(run_dir)


def test_page_embeds_its_token(client):
    page = client.get("/").text
    assert f'name="sae-samples-token" content="{TOKEN}"' in page


def bm25_oracle(texts, query, k1=1.2, b=0.75):
    """Latents by BM25 relevance to ``query``, computed word by word in Python (ties: the lower latent first)."""
    import math
    import re

    docs = {i: re.findall(r"[0-9a-z_]+", t.casefold()) for i, t in texts.items()}
    average = sum(map(len, docs.values())) / len(docs)
    words = set(re.findall(r"[0-9a-z_]+", query.casefold()))
    scores = {}
    for i, doc in docs.items():
        total = 0.0
        for w in words:
            tf = doc.count(w)
            if tf:
                df = sum(w in d for d in docs.values())
                idf = math.log1p((len(docs) - df + 0.5) / (df + 0.5))
                total += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(doc) / average))
        if total > 0:
            scores[i] = total
    return sorted(scores, key=lambda i: (-round(scores[i], 4), i)), scores


@pytest.mark.parametrize("query", ["w1", "w7 w3", "w0", "w0 w1 w2", "W5_", "nothing", "w150 w190", "w120 w0"])
def test_explanation_search_ranks_as_bm25_on_both_paths(query):
    from lightning_sae_samples.serve.explanations import ExplanationIndex

    gen = torch.Generator().manual_seed(0)
    weights = 1.0 / torch.arange(1, 201, dtype=torch.float64)  # w0 is in most texts (dense path), w150 in few
    texts = {}
    for latent in range(0, 1600, 2):
        n = int(torch.randint(3, 9, (1,), generator=gen))
        texts[latent] = " ".join(f"w{int(i)}" for i in torch.multinomial(weights, n, replacement=True, generator=gen))
    index = ExplanationIndex({i: ExplanationRecord(latent=i, text=t) for i, t in texts.items()}, {}, 1600)
    expected, scores = bm25_oracle(texts, query)
    latents, relevance, total = index.search(query, 0, 10_000)
    assert total == len(expected)
    assert latents.tolist() == expected
    assert relevance.tolist() == pytest.approx([scores[i] for i in expected], rel=1e-4)
    page = index.search(query, 5, 7)[0].tolist()
    assert page == expected[5:12]


def test_new_lines_only_are_read_and_a_bad_one_is_named(run_dir):
    from lightning_sae_samples.analysis.explanations import read_new_records
    from lightning_sae_samples.samples_dir.names import SamplesDirectoryError

    records, offset = read_new_records(run_dir)
    assert [r.latent for r in records] == list(TEXTS)
    append_explanations(run_dir, [ExplanationRecord(latent=9, text="later", samples_step=1)])
    later, end = read_new_records(run_dir, offset)
    assert [r.text for r in later] == ["later"] and end == explanations_path(run_dir).stat().st_size
    with open(explanations_path(run_dir), "ab") as handle:
        handle.write(b'{"latent": 1}\n{"partial"')
    with pytest.raises(SamplesDirectoryError, match=rf"byte {end}: missing field"):
        read_new_records(run_dir, end)
    with open(explanations_path(run_dir), "r+b") as handle:
        handle.truncate(end)
        handle.seek(end)
        bad = {**ExplanationRecord(latent=1, text="x").to_json(), "score": 7}
        handle.write((json.dumps(bad) + "\n").encode() + b'{"torn')
    with pytest.raises(SamplesDirectoryError, match=r"field `score` must be null or a number in \[0, 1\]"):
        read_new_records(run_dir, end)
    with open(explanations_path(run_dir), "r+b") as handle:
        handle.truncate(end)
        handle.seek(end)
        handle.write(b'{"latent": 3, "te')  # an append in progress: left for the next read
    assert read_new_records(run_dir, end) == ([], end)


def test_a_label_holding_nul_leaves_search_on_the_right_latent(run_dir, client):
    """Issue 33 (item 4): the word index counted NUL bytes to find documents; a NUL in a label moved every later one."""
    assert label(client, 4, "alpha\x00beta\x00\x00gamma").status_code == 200
    assert label(client, 6, "zebra crossing").status_code == 200
    assert label(client, 8, "other words").status_code == 200
    for word, latent in (("zebra", 6), ("other", 8), ("gamma", 4), ("alpha", 4)):
        rows = get(client, f"/api/search/explanation?text={word}")["rows"]
        assert [r["idx"] for r in rows] == [latent], word
        assert rows[0]["explanation"]["label"] == read_labels(run_dir)[latent].text


def test_a_deeply_nested_label_body_is_a_bad_request(run_dir, client):
    headers = {"Origin": ORIGIN, TOKEN_HEADER: TOKEN, "Content-Type": "application/json"}
    response = client.post("/api/features/4/label", content="[" * 100_000 + "]" * 100_000, headers=headers)
    assert response.status_code == 400 and "The body must be JSON" in response.json()["error"]
    assert 4 not in read_labels(run_dir)


def _corrupt_sidecar(run_dir, line: bytes) -> None:
    with open(explanations_path(run_dir), "ab") as handle:
        handle.write(line + b"\n")


@pytest.mark.parametrize("line, problem", [(b'{"latent": 1, "text": ', "not a JSON object"),
                                           (b"[" * 100_000 + b"]" * 100_000, "nested too deeply")])
def test_a_corrupt_sidecar_is_named_in_the_api_and_on_the_page(run_dir, line, problem):
    _corrupt_sidecar(run_dir, line)
    runs = RunSet(run_dir)
    with TestClient(create_app(runs, write_token=TOKEN)) as client:
        summary = get(client, "/api/summary")
        status = get(client, "/api/status")
        for answer in (summary, status):
            error = answer["explanations_error"]
            assert str(explanations_path(run_dir)) in error and problem in error and "\n" not in error
        assert status["state"] == "ready"
        page = client.get("/").text
        script = client.get("/static/app.js").text
    assert 'id="explanations-banner"' in page and 'role="alert"' in page.split('id="explanations-banner"')[1][:40]
    assert "explanations_error" in script and '"explanations-banner"' in script


def test_deeply_nested_json_in_the_sidecar_names_the_file_and_line(run_dir):
    from lightning_sae_samples.analysis.explanations import iter_explanation_records, read_new_records
    from lightning_sae_samples.samples_dir.names import SamplesDirectoryError

    _corrupt_sidecar(run_dir, b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(SamplesDirectoryError, match=r"explanations\.jsonl, line 5: .*nested too deeply"):
        list(iter_explanation_records(run_dir))
    with pytest.raises(SamplesDirectoryError, match=r"explanations\.jsonl, line at byte \d+: .*nested too deeply"):
        read_new_records(run_dir)
