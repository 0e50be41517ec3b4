"""A run folder of many SAEs in headless Chromium: the `serve` page's SAE picker and search across SAEs, and the
HTML index page of the reports.

Needs ``chromium`` and ``websocket-client`` (skipped without them), as ``test_serve_browser.py``.
"""

import json
import urllib.parse

import pytest
from chromium import CHROMIUM, api, choose, errors, open_chromium, wait_js
from render_support import FakeTokenizer, hostile_vocab
from test_run_folder import SAES, write_run_folder
from test_serve_browser import GEOMETRY

from lightning_sae_samples import ActivationSampleAnalyzer

pytest.importorskip("starlette")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)"),
]
FIRST, SECOND = list(SAES)
ROWS = "Array.from(document.querySelectorAll('#feature-rows tr')).map(r => Number(r.dataset.feature))"
ACROSS = ("Array.from(document.querySelectorAll('#across-rows tr[data-feature]'))"
          ".map(r => [r.dataset.sae, Number(r.dataset.feature)])")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from lightning_sae_samples.serve import Server

    root = tmp_path_factory.mktemp("serve-many-browser")
    run = write_run_folder(root / "run")
    server = Server(run, tokenizer=FakeTokenizer(hostile_vocab()), poll_seconds=0.3)
    server.start_thread()
    try:
        for tools in open_chromium(server.url, root / "profile", 1280, 1000):
            yield tools, server, run
    finally:
        server.stop()


def same(expression: str, value) -> str:
    return f"JSON.stringify({expression}) === {json.dumps(json.dumps(value, separators=(',', ':')))}"


def test_the_sae_picker_keeps_the_page_and_puts_the_sae_in_the_address(served):
    tools, server, run = served
    wait_js(tools, f"{ROWS}.length === {SAES[FIRST][0]}")
    assert tools.js("document.getElementById('run-pick-label').textContent") == "SAE"
    assert tools.js("Array.from(document.getElementById('run-select').options).map(o => o.value)") == list(SAES)
    choose(tools, "sort-select", "frequency")
    order = [r["idx"] for r in api(server, f"features?run={FIRST}&sort=frequency&limit=500")["rows"]]
    wait_js(tools, same(ROWS, order))

    # Another SAE: the list keeps its sort, and the address names the SAE.
    choose(tools, "run-select", SECOND)
    order = [r["idx"] for r in api(server, f"features?run={SECOND}&sort=frequency&limit=500")["rows"]]
    assert len(order) == SAES[SECOND][0]
    wait_js(tools, same(ROWS, order))
    assert tools.js("location.search") == f"?run={SECOND}"
    assert tools.js("document.getElementById('run-path').textContent") == str(run / SECOND)

    # A feature page stays on the same latent when the SAE changes; Back returns to the SAE before.
    tools.js("location.hash = '#/feature/3'")
    wait_js(tools, "document.getElementById('feature-title').textContent === 'Feature 3'")
    count = api(server, f"features/3?run={FIRST}")["stats"]["activation_count"]
    choose(tools, "run-select", FIRST)
    wait_js(tools, f"location.search === '?run={FIRST}' && location.hash === '#/feature/3'"
                   f" && document.getElementById('run-path').textContent === {json.dumps(str(run / FIRST))}")
    wait_js(tools, "Array.from(document.querySelectorAll('#feature-stats div')).some(d =>"
                   " d.querySelector('dt').textContent === 'Count'"
                   f" && d.querySelector('dd').textContent === '{count:,}')")
    tools.js("history.back()")
    wait_js(tools, f"location.search === '?run={SECOND}' && document.getElementById('run-select').value === '{SECOND}'"
                   f" && document.getElementById('run-path').textContent === {json.dumps(str(run / SECOND))}")

    # A reload (or a shared link) opens the same SAE and page.
    tools.send("Page.reload")
    tools.wait_for("Page.loadEventFired")
    wait_js(tools, f"document.getElementById('run-select').value === '{SECOND}'"
                   " && document.getElementById('feature-title').textContent === 'Feature 3'"
                   f" && document.getElementById('run-path').textContent === {json.dumps(str(run / SECOND))}")
    assert errors(tools, server.url) == []


def test_the_search_across_saes_lists_the_latents_of_each_sae_and_opens_one(served):
    tools, server, run = served
    tools.js("location.hash = '#/'")
    wait_js(tools, "!document.getElementById('across-label').hidden")
    tools.js("""(() => { document.getElementById('search-across').checked = true;
        document.getElementById('search-mode').value = 'context';
        document.getElementById('search-input').value = 'LORD';
        document.getElementById('search-button').click(); })()""")
    found = api(server, "search/saes?mode=context&text=LORD&limit=20")
    expected = [[s["sae"], r["idx"]] for s in found["saes"] for r in s["rows"]]
    assert {sae for sae, _ in expected} == set(SAES)  # both SAEs have latents with it among their tops
    wait_js(tools, same(ACROSS, expected))
    assert tools.js("location.hash") == "#/across/context/LORD"
    shown = tools.js("Array.from(document.querySelectorAll('#across-rows tr[data-feature] td.example'))"
                     ".map(td => td.textContent.toLowerCase().includes('lord'))")
    assert shown and all(shown)  # each row shows its best sample holding the text

    # A latent of the other SAE opens its feature page in that SAE.
    sae, idx = next(pair for pair in expected if pair[0] != tools.js("document.getElementById('run-select').value"))
    tools.js(f"document.querySelector('#across-rows tr[data-sae=\"{sae}\"][data-feature=\"{idx}\"] a').click()")
    wait_js(tools, f"document.getElementById('feature-title').textContent === 'Feature {idx}'"
                   f" && document.getElementById('run-select').value === '{sae}'")
    assert tools.js("location.search") == "?run=" + urllib.parse.quote(sae)
    assert errors(tools, server.url) == []


def test_the_picker_and_the_search_across_saes_fit_a_phone(served):
    tools, server, _ = served
    tools.send("Emulation.setDeviceMetricsOverride", width=420, height=900, deviceScaleFactor=1, mobile=False)
    try:
        tools.js("location.hash = '#/across/context/lord'")
        wait_js(tools, "!document.getElementById('across-view').hidden"
                       " && document.querySelectorAll('#across-rows tr').length > 0")
        layout = tools.js(GEOMETRY)
    finally:
        tools.send("Emulation.setDeviceMetricsOverride", width=1280, height=1000, deviceScaleFactor=1, mobile=False)
    assert layout["scroll"] <= 420 and layout["cut"] == [], layout
    assert errors(tools, server.url) == []


def test_the_html_index_page_links_each_saes_report_and_runs_nothing(tmp_path, served):
    _, _, run = served
    index = ActivationSampleAnalyzer(run).generate_html_report(tmp_path / "report.html", 3, 2)
    for tools in open_chromium(index.as_uri(), tmp_path / "profile", 1000, 700):
        links = tools.js("Array.from(document.querySelectorAll('#run-saes a')).map(a => [a.textContent, a.href])")
        assert [name for name, _ in links] == list(SAES)
        for name, href in links:
            assert href == (tmp_path / f"report.{name}.html").as_uri()
        tools.js("document.querySelector('#run-saes a').click()")
        wait_js(tools, f"location.href === {json.dumps(links[0][1])}"
                       " && document.querySelector('section.feature') !== null")
        assert errors(tools, "file:") == [] and tools.js("document.title").startswith("Interpretability report")
