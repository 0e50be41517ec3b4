"""The `serve` page's explanations, labels and neighbours in headless Chromium over a real server (DevTools protocol).

A real Trainer writes the directory with the decoder (``logit_effects``) and the explanations sidecar holds a few
records. A second local server on another port plays a foreign web site that tries to write a label.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from chromium import CHROMIUM, errors, open_chromium, wait_js
from render_support import FakeTokenizer, decoder_matrices, hostile_vocab, write_run_dir

from lightning_sae_samples.analysis.explanations import ExplanationRecord, append_explanations, read_labels

pytest.importorskip("starlette")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)"),
]
NUM_LATENTS = 12


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from lightning_sae_samples.serve import Server

    root = tmp_path_factory.mktemp("serve-meaning")
    samples = write_run_dir(root, FakeTokenizer(hostile_vocab()), num_latents=NUM_LATENTS, top_features=4,
                            logit_effects=decoder_matrices)
    step = json.loads((samples / "collection_summary.json").read_text())["global_step"]
    append_explanations(samples, [
        ExplanationRecord(latent=2, text="verses <i>about</i> the Lord", score=0.85, score_contexts=20,
                          random_score=0.5, samples_step=step - 1, embedding_score=0.7, embedding_contexts=40,
                          embedding_random_score=0.48),
        ExplanationRecord(latent=3, text="numbers in a census", score=0.6, samples_step=step, embedding_score=0.9),
        ExplanationRecord(latent=5, text='"gold", "silver" (after "of")', model="top-tokens", samples_step=step,
                          embedding_score=0.8, embedding_contexts=40, embedding_random_score=0.51),
    ])
    server = Server(samples, poll_seconds=0.3)
    server.start_thread()
    try:
        for tools in open_chromium(server.url, root / "profile", 1280, 1000):
            yield tools, server, samples
    finally:
        server.stop()


def test_list_shows_explanations_and_search_by_explanation_finds_the_latent(served):
    tools, server, _ = served
    wait_js(tools, f"document.querySelectorAll('#feature-rows tr').length === {NUM_LATENTS}")
    row = "document.querySelector('#feature-rows tr[data-feature=\"2\"]')"
    assert tools.js(f"{row}.querySelector('td.explanation').textContent").startswith("verses <i>about</i> the Lord")
    assert tools.js(f"{row}.querySelector('td.score.detection').textContent") == "0.85"
    assert tools.js(f"{row}.querySelector('td.score.embedding').textContent") == "0.70"
    heads = tools.js("Array.from(document.querySelectorAll('#feature-table th.score')).map(th => th.textContent)")
    assert heads == ["Detection", "Embedding AUROC"]
    assert tools.js(f"{row}.querySelector('i')") is None  # the explanation is text, never markup
    tools.js("""(() => { document.getElementById('search-mode').value = 'explanation';
        document.getElementById('search-input').value = 'census numbers';
        document.getElementById('search-button').click(); })()""")
    found = wait_js(tools, "document.querySelectorAll('#token-rows tr').length && Array.from("
                           "document.querySelectorAll('#token-rows tr')).map(r => Number(r.dataset.feature))")
    assert found == [3]
    assert tools.js("location.hash") == "#/explanation/census%20numbers"
    assert errors(tools, server.url) == []


def test_feature_page_shows_staleness_neighbours_and_saves_a_typed_label(served):
    tools, server, samples = served
    tools.js("location.hash = '#/feature/3'")
    wait_js(tools, "document.getElementById('feature-title').textContent === 'Feature 3'"
                   " && document.querySelectorAll('#neighbour-list li').length === 10")
    neighbours = tools.js("Array.from(document.querySelectorAll('#neighbour-list li')).map(li => ({"
                          "idx: Number(li.dataset.feature), text: li.textContent}))")
    assert neighbours[0]["idx"] == 2 and "verses <i>about</i> the Lord" in neighbours[0]["text"]  # its partner
    tools.js("document.querySelector('#neighbour-list li a').click()")
    wait_js(tools, "document.getElementById('feature-title').textContent === 'Feature 2'")
    note = wait_js(tools, "document.getElementById('explanation-note').textContent")
    assert "detection 0.85 on 20 contexts (random explanation 0.50)" in note and "older than these" in note
    assert "embedding AUROC 0.70 on 40 contexts (random explanation 0.48)" in note
    tools.js("document.getElementById('label-input').focus()")
    tools.send("Input.insertText", text="the Lord, in verses")
    tools.js("document.getElementById('label-save').click()")
    wait_js(tools, "document.getElementById('label-status').textContent === 'label saved'")
    assert read_labels(samples)[2].text == "the Lord, in verses"
    assert errors(tools, server.url) == []


def _sort_shows_first(tools, sort, first):
    tools.js(f"""(() => {{ const s = document.getElementById('sort-select'); s.value = '{sort}';
        s.dispatchEvent(new Event('change')); }})()""")
    shown = "JSON.stringify(Array.from(document.querySelectorAll('#feature-rows tr'))"
    shown += f".slice(0, {len(first)}).map(tr => Number(tr.dataset.feature)))"
    return wait_js(tools, f"{shown} === '{json.dumps(first).replace(' ', '')}'")


def test_the_list_sorts_by_either_score_each_named_for_what_it_is(served):
    tools, server, _ = served
    tools.js("location.hash = '#/'")
    wait_js(tools, f"document.querySelectorAll('#feature-rows tr').length === {NUM_LATENTS}")
    names = tools.js("Array.from(document.querySelectorAll('#sort-select option')).map(o => o.value + ':' + o.text)")
    assert "score:detection score" in names and "embedding_score:embedding AUROC" in names
    wait_js(tools, "document.getElementById('order-select').value === 'desc'")
    assert _sort_shows_first(tools, "embedding_score", [3, 5, 2])
    row = "document.querySelector('#feature-rows tr[data-feature=\"5\"]')"
    cells = tools.js(f"Array.from({row}.querySelectorAll('td.score')).map(td => td.textContent)")
    assert cells == ["–", "0.80"]  # the top-tokens explanation has no detection score
    assert _sort_shows_first(tools, "score", [2, 3])
    tools.js("""(() => { const s = document.getElementById('sort-select'); s.value = 'max_activation';
        s.dispatchEvent(new Event('change')); })()""")
    assert errors(tools, server.url) == []


class _Foreign(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the http.server name
        body = b"<!DOCTYPE html><title>another site</title><p>hello</p>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_write_from_another_site_is_refused(served):
    tools, server, samples = served
    foreign = ThreadingHTTPServer(("127.0.0.1", 0), _Foreign)
    threading.Thread(target=foreign.serve_forever, daemon=True).start()
    try:
        tools.send("Page.navigate", url=f"http://127.0.0.1:{foreign.server_address[1]}/")
        wait_js(tools, "document.title === 'another site'")
        target = json.dumps(server.url + "api/features/5/label")
        # A simple cross-site POST goes out (no preflight) but the server refuses it: wrong Origin, no token.
        status = tools.js(f"""fetch({target}, {{method: 'POST', mode: 'no-cors', body: '{{"text": "pwned"}}',
            headers: {{'Content-Type': 'text/plain'}}}}).then(r => r.type, e => 'failed: ' + e)""")
        assert status in ("opaque", "failed: TypeError: Failed to fetch")
        # A JSON POST with a guessed token needs a preflight, which the server never grants.
        guessed = tools.js(f"""fetch({target}, {{method: 'POST', body: '{{"text": "pwned"}}',
            headers: {{'Content-Type': 'application/json', 'X-SAE-Samples-Token': 'guess'}}}})
            .then(r => 'status ' + r.status, e => 'blocked')""")
        assert guessed == "blocked"
        assert 5 not in read_labels(samples)
    finally:
        foreign.shutdown()
        tools.send("Page.navigate", url=server.url)
        wait_js(tools, "document.querySelectorAll('#feature-rows tr').length > 0")
