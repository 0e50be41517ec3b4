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
                          random_score=0.5, samples_step=step - 1),
        ExplanationRecord(latent=3, text="numbers in a census", score=0.6, samples_step=step),
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
    assert tools.js(f"{row}.querySelector('td.score').textContent") == "0.85"
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
    assert "score 0.85 on 20 contexts (random explanation 0.50)" in note and "older than these" in note
    tools.js("document.getElementById('label-input').focus()")
    tools.send("Input.insertText", text="the Lord, in verses")
    tools.js("document.getElementById('label-save').click()")
    wait_js(tools, "document.getElementById('label-status').textContent === 'label saved'")
    assert read_labels(samples)[2].text == "the Lord, in verses"
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
