"""The `serve` JSON API on samples directories written by a real Trainer, checked against brute force."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from render_support import FakeTokenizer, hostile_vocab, write_run_dir

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from starlette.testclient import TestClient  # noqa: E402

from lightning_sae_samples import ActivationSampleAnalyzer, ActivationSampleCollector  # noqa: E402
from lightning_sae_samples.printed_commands import program_command  # noqa: E402
from lightning_sae_samples.serve import serve_command  # noqa: E402
from lightning_sae_samples.serve.app import create_app  # noqa: E402
from lightning_sae_samples.serve.runs import RunSet  # noqa: E402

VOCAB = hostile_vocab()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-api")
    return write_run_dir(root, FakeTokenizer(VOCAB), recent_window_steps=2, samples_per_interval=2,
                         num_latents=12, top_features=4, samples_per_feature=2)


@pytest.fixture(scope="module")
def client(run_dir):
    runs = RunSet(run_dir)  # the watcher thread is not started: nothing reads the disk after the first load
    assert runs.get(None).current is not None
    with TestClient(create_app(runs)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def oracle(run_dir):
    """Every latent's statistics and all its kept top samples, read one by one through the analyzer."""
    analyzer = ActivationSampleAnalyzer(run_dir, tokenizer=FakeTokenizer(VOCAB))
    return {i: analyzer.feature(i, 1000) for i in range(analyzer.num_features)}


def get(client, url, status=200):
    response = client.get(url)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    return response.json()


def all_rows(client, query):
    return get(client, f"/api/features?limit=500&{query}")["rows"]


def test_summary_and_status(client, run_dir):
    summary = get(client, "/api/summary")
    analyzer = ActivationSampleAnalyzer(run_dir)
    assert summary["global_step"] == analyzer.summary.global_step
    assert summary["summary"]["num_features"] == summary["summary"]["listed_features"] == 12
    assert summary["alive"] == str(analyzer.summary.alive_features)
    assert sum(summary["histogram"]["counts"]) == analyzer.summary.alive_features
    status = get(client, "/api/status")
    assert status["state"] == "ready" and status["version"] == 1 and status["global_step"] == summary["global_step"]
    runs = get(client, "/api/runs")
    assert [r["name"] for r in runs["runs"]] == ["samples"]


KEYS = {
    "max_activation": lambda f: f.stats.all_time_max if f.stats.activation_count else 0.0,
    "activation_count": lambda f: f.stats.activation_count,
    "frequency": lambda f: f.stats.frequency,
    "mean_activation": lambda f: f.stats.mean_activation,
    "recent_overlap": lambda f: f.stats.recent_overlap,
    "first_step": lambda f: f.stats.first_step,
    "last_step": lambda f: f.stats.last_step,
}


@pytest.mark.parametrize("key", list(KEYS))
@pytest.mark.parametrize("order", ["desc", "asc"])
def test_list_sorts_every_latent_like_a_python_sort(client, oracle, key, order):
    rows = all_rows(client, f"sort={key}&order={order}")
    assert sorted(r["idx"] for r in rows) == list(range(12))  # every latent, not only the 4 saved ones
    present = [i for i in oracle if KEYS[key](oracle[i]) is not None]
    sign = -1 if order == "desc" else 1
    expected = sorted(present, key=lambda i: (sign * KEYS[key](oracle[i]), i))
    expected += [i for i in oracle if KEYS[key](oracle[i]) is None]  # missing values (never fired) last
    assert [r["idx"] for r in rows] == expected


def test_list_pages(client):
    whole = [r["idx"] for r in all_rows(client, "sort=frequency")]
    pages = [get(client, f"/api/features?sort=frequency&offset={o}&limit=5") for o in (0, 5, 10)]
    assert [r["idx"] for p in pages for r in p["rows"]] == whole
    assert all(p["total"] == 12 for p in pages)


def test_filters_match_their_definitions(client, oracle):
    def listed(query):
        return sorted(r["idx"] for r in all_rows(client, query))

    alive = [i for i, f in oracle.items() if f.stats.activation_count > 0]
    assert alive and len(alive) < 12
    assert listed("filter=alive") == alive
    assert listed("filter=dead") == [i for i in oracle if i not in alive]  # a 6-step run: dead = never fired
    assert listed("filter=dense&dense_above=0.3") == [i for i, f in oracle.items() if f.stats.frequency > 0.3]
    drifting = [i for i, f in oracle.items() if f.recent_overlap is not None and f.recent_overlap < 0.25]
    assert drifting and listed("filter=drifting") == drifting
    freq = {i: math.log10(f.stats.frequency) for i, f in oracle.items() if f.stats.frequency > 0}
    edges = get(client, "/api/summary")["histogram"]["log10_edges"]
    low, high = edges[-3], edges[-2]
    inside = sorted(i for i, v in freq.items() if low <= v <= high)
    assert inside and listed(f"log10_low={low}&log10_high={high}") == inside


def test_feature_page_is_the_reports_view(client, oracle):
    for idx, feature in oracle.items():
        page = get(client, f"/api/features/{idx}?examples=1000")
        assert page["idx"] == idx and page["saved"] == feature.saved
        assert page["count"] == f"{feature.stats.activation_count:,}"
        assert len(page["examples"]) == len(feature.samples) == feature.stats.num_samples
        for shown, sample in zip(page["examples"], feature.samples):
            assert [t["text"] for t in shown["tokens"]] == [t.text for t in sample.context]
            assert [t["activating"] for t in shown["tokens"]].index(True) == sample.context_position
            assert shown["value"] == f"{sample.activation_value:.4g}"
        assert page["has_intervals"] and (page["recent"] is not None)
        in_groups = sum(len(g.samples) for g in feature.interval_groups)
        assert sum(len(g["examples"]) for g in page["interval_groups"]) == in_groups


def test_token_search_agrees_with_a_loop_over_kept_samples(client, oracle):
    by_token: dict[int, dict[int, int]] = {}
    for idx, feature in oracle.items():
        for sample in feature.samples:
            token = sample.activating_token.token_id
            by_token.setdefault(token, {}).setdefault(idx, 0)
            by_token[token][idx] += 1
    assert len(by_token) > 3
    for token, latents in by_token.items():
        found = get(client, f"/api/search/token?id={token}")
        expected = sorted(latents.items(), key=lambda item: (-item[1], item[0]))
        assert [(r["idx"], r["token_samples"]) for r in found["rows"]] == expected
    # By text: ignoring case and outer spaces, every token id that reads so is searched.
    token = max(by_token, key=lambda t: len(by_token[t]))
    text = VOCAB[token].strip().upper() if VOCAB[token].strip() else VOCAB[token]
    same = [t for t in by_token if VOCAB[t].strip().casefold() == text.strip().casefold()]
    totals: dict[int, int] = {}
    for t in same:
        for idx, n in by_token[t].items():
            totals[idx] = totals.get(idx, 0) + n
    found = get(client, "/api/search/token?text=" + urllib.request.quote(text))
    assert sorted(t["token_id"] for t in found["tokens"]) == sorted(same)
    expected = sorted(totals.items(), key=lambda i: (-i[1], i[0]))
    assert [(r["idx"], r["token_samples"]) for r in found["rows"]] == expected
    assert get(client, "/api/search/token?text=no-such-token")["rows"] == []


def test_context_search_finds_exactly_the_samples_holding_the_text(client, oracle):
    needle = " lord"
    expected = sorted(
        (idx, rank + 1)
        for idx, f in oracle.items()
        for rank, s in enumerate(f.samples)
        if needle in "".join(t.text for t in s.context).casefold()
    )
    assert expected
    hits, offset = [], 0
    while True:
        page = get(client, f"/api/search/context?text=%20LORD&offset={offset}&limit=3")
        hits += [(h["feature_idx"], h["rank"]) for h in page["hits"]]
        offset += len(page["hits"])
        if not page["more"]:
            break
    assert sorted(hits) == expected
    hit = get(client, "/api/search/context?text=%20LORD&limit=1")["hits"][0]
    sample = oracle[hit["feature_idx"]].samples[hit["rank"] - 1]
    assert [t["text"] for t in hit["tokens"]] == [t.text for t in sample.context]


@pytest.mark.parametrize(
    "url, status, words",
    [
        ("/api/features/12", 404, "latents 0 to 11"),
        ("/api/features/-1", 404, "a number from 0 to 11"),
        ("/api/features/abc", 404, "a number from 0 to 11"),
        ("/api/features/%2e%2e%2f%2e%2e%2fetc%2fpasswd", 404, "No such page"),
        ("/api/features/99999999999999999999999", 404, "latents 0 to 11"),
        ("/api/features/" + "9" * 5000, 404, "latents 0 to 11"),  # int() refuses over 4,300 digits
        ("/api/features/" + "7" * 5000 + "/neighbours", 404, "latents 0 to 11"),
        ("/api/history/features/" + "9" * 5000, 404, "latents 0 to 11"),
        ("/api/history/features/3/windows/" + "9" * 5000, 404, "the history has windows 0 to"),
        ("/api/features/3?examples=lots", 400, "`examples` must be an integer"),
        ("/api/features?sort=bogus", 400, "`sort` must be one of"),
        ("/api/features?filter=bogus", 400, "`filter` must be one of"),
        ("/api/features?order=up", 400, "`order` must be asc or desc"),
        ("/api/features?limit=100000", 400, "`limit` must be between 1 and 500"),
        ("/api/features?log10_low=-2", 400, "Pass both"),
        ("/api/features?dense_above=nan", 400, "finite"),
        ("/api/search/token", 400, "Pass `text`"),
        ("/api/search/token?id=x", 400, "`id` must be an integer"),
        ("/api/search/context?text=", 400, "Pass `text`"),
        ("/api/summary?run=../../etc", 404, "There is no run '../../etc'"),
        ("/api/nothing", 404, "No such page"),
        ("/static/report.html.j2", 404, "No file 'report.html.j2'"),
        ("/static/..%2f..%2fpyproject.toml", 404, "No"),
        ("/etc/passwd", 404, "No such page"),
    ],
)
def test_bad_requests_get_a_json_message_never_a_traceback(client, url, status, words):
    body = get(client, url, status)
    assert words in body["error"] and body["status"] == status
    assert "Traceback" not in json.dumps(body)


def test_no_request_reaches_the_file_system(client):
    """An audit hook records every file the process opens or lists while the whole API is exercised."""
    touched, recording = [], threading.Event()

    def hook(event, args):
        if recording.is_set() and event in ("open", "os.listdir", "os.scandir", "os.chdir"):
            touched.append((event, args[0]))

    sys.addaudithook(hook)
    recording.set()
    try:
        for url in ["/", "/static/app.js", "/static/report.css", "/static/serve.css", "/api/runs", "/api/status",
                    "/api/summary", "/api/features?sort=last_step&filter=alive", "/api/features/0", "/api/features/5",
                    "/api/features/11?examples=100", "/api/search/token?id=3", "/api/search/token?text=*",
                    "/api/search/context?text=the", "/static/..%2f..%2fpyproject.toml", "/api/summary?run=/etc",
                    "/api/features/..%2f..%2f"]:
            client.get(url)
    finally:
        recording.clear()
    assert [t for t in touched if not str(t[1]).startswith("/dev/")] == []


def test_page_is_static_and_token_text_stays_data(client, oracle):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy and "unsafe-inline" not in policy
    assert re.findall(r"<script[^>]*>", page.text) == ['<script src="/static/app.js" defer>']
    script = client.get("/static/app.js").text
    assert "innerHTML" not in script and "http://" not in script.replace("http://www.w3.org/2000/svg", "")
    assert client.get("/static/report.css").headers["x-content-type-options"] == "nosniff"
    # Token text such as "<script>alert(1)</script>" travels as JSON data; the page shows it via textContent.
    hostile = [i for i, f in oracle.items() if any(t.text == VOCAB[0] for s in f.samples for t in s.context)]
    assert hostile
    page = get(client, f"/api/features/{hostile[0]}?examples=100")
    assert VOCAB[0] in {t["shown"] for e in page["examples"] for t in e["tokens"]}


def write_plain_save(path, step, seed):
    """One more save of a plain-loop collector into ``path`` (a different collection each time)."""
    gen = torch.Generator().manual_seed(seed)
    collector = ActivationSampleCollector(num_latents=8, max_samples_per_feature=3, context_size=2,
                                          activation_threshold=0.2, top_features_to_save=3,
                                          samples_per_feature_to_save=2, write_report=False)
    for s in range(step + 1):
        tokens = torch.randint(0, 20, (2, 6), generator=gen)
        collector.update(tokens, latents=torch.rand(2, 6, 8, generator=gen) * (1 + seed), step=s)
    collector.save(path, global_step=step)


def test_each_committed_save_is_loaded_whole_while_saves_keep_coming(tmp_path):
    path = tmp_path / "live"
    write_plain_save(path, 0, 0)
    runs = RunSet(path)
    run = runs.get(None)
    assert run.current.summary.global_step == 0
    seen, done = [], threading.Event()

    def writer():
        for n in range(1, 9):
            write_plain_save(path, n, n)
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    while not done.is_set() or run.refresh():
        run.refresh()
        index = run.current
        summary, table = index.summary, index.table
        # The summary and the full state of one loaded save come from the same save, never a mix of two.
        state_alive = int((table.columns["activation_count"] > 0).sum())
        kept = len(index.sample_latent)
        assert (state_alive, kept) == (summary.alive_features, summary.total_samples_stored)
        assert index.analyzer.summary.steps_collected == summary.global_step + 1
        seen.append(summary.global_step)
    thread.join()
    run.refresh()
    assert run.current.summary.global_step == 8 and seen == sorted(seen)
    assert run.version >= 2


def test_a_directory_waiting_for_its_first_save(tmp_path):
    (tmp_path / "samples").mkdir()
    runs = RunSet(tmp_path / "samples")
    with TestClient(create_app(runs)) as test_client:
        assert get(test_client, "/api/status")["state"] == "waiting"
        assert "has no save yet" in get(test_client, "/api/summary", 503)["error"]
        write_plain_save(tmp_path / "samples", 2, 1)
        assert runs.runs["samples"].refresh()  # (a request, through runs.get, would load it too)
        assert get(test_client, "/api/summary")["global_step"] == 2


def test_a_parent_folder_lists_its_runs_and_unknown_folders_are_refused(tmp_path, run_dir):
    for n in (0, 1):
        write_plain_save(tmp_path / "logs" / f"version_{n}" / "activation_samples", n + 1, n)
    runs = RunSet(tmp_path / "logs")
    assert runs.names == ["version_0/activation_samples", "version_1/activation_samples"]
    with TestClient(create_app(runs)) as test_client:
        second = get(test_client, "/api/summary?run=version_1/activation_samples")
        assert second["global_step"] == 2 and get(test_client, "/api/summary")["global_step"] == 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="holds no samples directory"):
        RunSet(tmp_path / "other")


def test_a_directory_lists_its_snapshots_as_runs_by_step(tmp_path):
    samples = tmp_path / "logs" / "version_0" / "samples"
    write_plain_save(samples, 12, 0)
    for step in (10, 2):
        write_plain_save(samples / "snapshots" / f"step_{step}", step, step)
    write_plain_save(tmp_path / "elsewhere", 4, 4)
    (samples / "snapshots" / "step_7").symlink_to(tmp_path / "elsewhere")  # a link is not followed
    (samples / "snapshots" / "step_x").mkdir()
    names = ["samples", "samples/snapshots/step_2", "samples/snapshots/step_10"]
    assert RunSet(samples).names == names
    assert RunSet(tmp_path / "logs").names == [f"version_0/{n}" for n in names]
    with TestClient(create_app(RunSet(samples))) as test_client:
        assert [r["name"] for r in get(test_client, "/api/runs")["runs"]] == names
        assert get(test_client, "/api/summary?run=samples/snapshots/step_2")["global_step"] == 2
        assert get(test_client, "/api/summary")["has_history"] is True  # a plain loop's saves keep one


def test_a_snapshot_written_while_serving_is_listed_and_a_removed_one_goes(tmp_path):
    samples = tmp_path / "samples"
    write_plain_save(samples, 12, 0)
    write_plain_save(samples / "snapshots" / "step_2", 2, 2)
    runs = RunSet(samples, poll_seconds=0.05)
    runs.start()
    try:
        write_plain_save(samples / "snapshots" / "step_10", 10, 10)
        wait_for(lambda: runs.names == ["samples", "samples/snapshots/step_2", "samples/snapshots/step_10"])
        assert runs.get("samples/snapshots/step_10").current.summary.global_step == 10
        shutil.rmtree(samples / "snapshots" / "step_2")
        wait_for(lambda: runs.names == ["samples", "samples/snapshots/step_10"])
        write_plain_save(samples / "snapshots" / "step_20", 20, 20)  # the watcher lived through the removal
        wait_for(lambda: runs.names[-1] == "samples/snapshots/step_20")
    finally:
        runs.stop()


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_serve_command_quotes_the_directory():
    program = program_command()  # this environment's script by path (tests/test_printed_commands.py runs it)
    assert serve_command("/tmp/my runs/samples") == f"{program} serve '/tmp/my runs/samples'"
    assert serve_command(Path("logs")) == f"{program} serve logs"


def test_command_line_prints_the_url_warns_for_all_interfaces_and_serves(run_dir):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lightning_sae_samples", "serve", str(run_dir), "--host", "0.0.0.0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = [proc.stdout.readline() for _ in range(3)]
        text = " ".join(" ".join(lines).split())
        url = re.search(r"http://127\.0\.0\.1:\d+/", text).group(0)
        assert "Warning: --host 0.0.0.0 makes the page reachable from other machines" in text
        deadline = time.monotonic() + 30
        while True:
            try:
                body = json.load(urllib.request.urlopen(url + "api/status", timeout=5))
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert body["state"] == "ready"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_local_server_refuses_foreign_host_names_and_bad_directories(run_dir, tmp_path):
    from lightning_sae_samples.serve import Server, main

    server = Server(run_dir, port=0)
    server.start_thread()
    try:
        ok = urllib.request.urlopen(server.url + "api/status", timeout=10)
        assert ok.status == 200 and server.url.startswith("http://127.0.0.1:")
        request = urllib.request.Request(server.url + "api/status", headers={"Host": "evil.example"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=10)
        assert err.value.code == 400
    finally:
        server.stop()
    assert main([str(tmp_path / "missing")]) == 2


def test_without_full_state_the_saved_features_are_served(tmp_path):
    gen = torch.Generator().manual_seed(3)
    collector = ActivationSampleCollector(num_latents=10, max_samples_per_feature=3, context_size=2,
                                          activation_threshold=0.2, top_features_to_save=4,
                                          samples_per_feature_to_save=3, write_report=False)
    for s in range(3):
        tokens = torch.randint(0, 20, (2, 6), generator=gen)
        collector.update(tokens, latents=torch.rand(2, 6, 10, generator=gen), step=s)
    collector.save(tmp_path / "s", full_state=False)
    analyzer = ActivationSampleAnalyzer(tmp_path / "s")
    assert analyzer.directory.full_state_path is None
    with TestClient(create_app(RunSet(tmp_path / "s"))) as test_client:
        rows = get(test_client, "/api/features?sort=index&order=asc&limit=500")["rows"]
        assert [r["idx"] for r in rows] == sorted(analyzer.saved_features)
        feature = analyzer.feature(analyzer.saved_features[0])
        token = feature.samples[0].activating_token.token_id
        found = get(test_client, f"/api/search/token?id={token}")["rows"]
        assert feature.feature_idx in [r["idx"] for r in found]
        page = get(test_client, f"/api/features/{feature.feature_idx}")
        assert len(page["examples"]) == len(feature.samples)
        unsaved = next(i for i in range(10) if i not in analyzer.saved_features)
        assert "no full_state.pt" in get(test_client, f"/api/features/{unsaved}", 404)["error"]


def test_fires_most_on_is_counted_over_the_kept_samples_in_the_report_and_in_serve(client, run_dir):
    # samples_per_feature=2 per file, up to 8 kept: both count every kept sample and say over how many.
    analyzer = ActivationSampleAnalyzer(run_dir, tokenizer=FakeTokenizer(VOCAB))
    rows = {row["idx"]: row for row in all_rows(client, "sort=max_activation")}
    markdown, html = analyzer.render_markdown(4), analyzer.render_html(4)
    checked = 0
    for idx in analyzer.saved_features:
        feature = analyzer.feature(idx)
        kept = feature.stats.num_samples
        assert len(feature.samples) <= 2 and feature.top_tokens_over == kept == rows[idx]["top_tokens_over"]
        by_serve = [(chip["token_id"], chip["samples"]) for chip in rows[idx]["top_tokens"]]
        brute = {}
        for sample in analyzer.feature(idx, 1000).samples:
            token = sample.activating_token.token_id
            brute[token] = brute.get(token, 0) + 1
        assert by_serve == sorted(brute.items(), key=lambda item: (-item[1], item[0]))[:3]
        assert [n for _, n in feature.top_tokens(3)] == [n for _, n in by_serve]
        assert f"(of {kept})" in markdown and f"of {kept}</span>" in html
        checked += kept > len(feature.samples)
    assert checked, "no saved feature keeps more samples than its file shows: the test shows nothing"

    # Without full_state.pt, serve shows the counts the feature files hold: the same ones.
    import shutil

    bare = shutil.copytree(run_dir, run_dir.parent / "no-full-state")
    (bare / "full_state.pt").unlink()
    with TestClient(create_app(RunSet(bare))) as bare_client:
        bare_rows = {row["idx"]: row for row in all_rows(bare_client, "sort=max_activation")}
    assert {i: (r["top_tokens"], r["top_tokens_over"]) for i, r in bare_rows.items()} == {
        i: (rows[i]["top_tokens"], rows[i]["top_tokens_over"]) for i in analyzer.saved_features
    }
