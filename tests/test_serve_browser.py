"""The `serve` page in headless Chromium over a real server on a directory a real Trainer writes (DevTools protocol).

Needs ``chromium`` and ``websocket-client`` (skipped without them), like ``test_html_browser.py``, whose DevTools
client it reuses. Set ``SAE_SERVE_SCREENSHOT=/some/file.png`` to keep screenshots for a human to look at.
"""

import base64
import json
import os
from pathlib import Path

import pytest
from chromium import CHROMIUM, api, choose, errors, open_chromium, wait_js
from render_support import FakeTokenizer, hostile_vocab

from lightning_sae_samples import ActivationSampleAnalyzer, ActivationSampleCallback
from lightning_sae_samples.render.escaping import visible

pytest.importorskip("starlette")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)"),
]
VOCAB = hostile_vocab()


def fit(root: Path, epochs: int) -> Path:
    """A real Trainer run with the callback into ``root/samples`` (6 optimizer steps per epoch)."""
    from helpers import DriftingSAE, loader, trainer

    cb = ActivationSampleCallback(
        collection_freq=1, max_samples_per_feature=5, context_size=4, activation_threshold=0.5,
        top_features_to_save=6, samples_per_feature_to_save=3, dirpath=root / "samples",
        tokenizer=FakeTokenizer(VOCAB), write_report=False, recent_window_steps=2, samples_per_interval=2,
    )
    trainer(root, [cb], max_epochs=epochs).fit(DriftingSAE(num_latents=24, drift_step=2), loader())
    return root / "samples"


def open_page(url: str, profile: Path):
    """Chromium showing ``url``; yields its DevTools client, closes the browser after."""
    yield from open_chromium(url, profile, 1280, 1000)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from lightning_sae_samples.serve import Server

    root = tmp_path_factory.mktemp("serve-browser")
    samples = fit(root, 1)
    server = Server(samples, poll_seconds=0.3)
    server.start_thread()
    try:
        for tools in open_page(server.url, root / "profile"):
            yield tools, server, root
    finally:
        server.stop()


ROWS = "Array.from(document.querySelectorAll('#feature-rows tr')).map(r => Number(r.dataset.feature))"


def test_list_loads_and_sorting_by_frequency_reorders_it(served):
    tools, server, _ = served
    wait_js(tools, "document.querySelectorAll('#feature-rows tr').length === 24")
    by_max = [r["idx"] for r in api(server, "features?sort=max_activation&limit=500")["rows"]]
    by_freq = [r["idx"] for r in api(server, "features?sort=frequency&limit=500")["rows"]]
    assert by_max != by_freq
    assert tools.js(ROWS) == by_max
    choose(tools, "sort-select", "frequency")
    wait_js(tools, f"JSON.stringify({ROWS}) === {json.dumps(json.dumps(by_freq, separators=(',', ':')))}")
    assert "frequency" in tools.js("document.getElementById('list-title').textContent")
    choose(tools, "filter-select", "dead")
    dead = [r["idx"] for r in api(server, "features?sort=frequency&filter=dead&limit=500")["rows"]]
    wait_js(tools, f"JSON.stringify({ROWS}) === {json.dumps(json.dumps(dead, separators=(',', ':')))}")
    choose(tools, "filter-select", "all")
    wait_js(tools, f"{ROWS}.length === 24")
    # A bar of the frequency histogram lists the latents of its range.
    tools.js("document.querySelector('#frequency-histogram rect.bar[data-bin]:not([height=\"0\"])')"
             ".dispatchEvent(new MouseEvent('click', {bubbles: true}))")
    wait_js(tools, "!document.getElementById('range-chip').hidden")
    assert 0 < len(wait_js(tools, f"{ROWS}.length < 24 && {ROWS}")) < 24
    tools.js("document.getElementById('range-clear').click()")
    wait_js(tools, f"{ROWS}.length === 24")
    assert errors(tools, server.url) == []


def test_token_search_finds_the_latent_that_fires_on_it(served):
    tools, server, root = served
    analyzer = ActivationSampleAnalyzer(root / "samples", tokenizer=FakeTokenizer(VOCAB))
    feature = analyzer.feature(analyzer.saved_features[0])
    token = feature.top_tokens(1)[0][0]
    tools.js(f"""(() => {{ document.getElementById('search-mode').value = 'token';
        document.getElementById('search-input').value = {json.dumps(token)};
        document.getElementById('search-button').click(); }})()""")
    found = wait_js(tools, "document.querySelectorAll('#token-rows tr').length && Array.from("
                           "document.querySelectorAll('#token-rows tr')).map(r => Number(r.dataset.feature))")
    assert feature.feature_idx in found
    assert tools.js("location.hash").startswith("#/token/")
    assert errors(tools, server.url) == []


def test_feature_page_marks_the_activating_token_and_shows_hostile_text_as_text(served):
    tools, server, root = served
    analyzer = ActivationSampleAnalyzer(root / "samples", tokenizer=FakeTokenizer(VOCAB))
    idx = next(i for i in range(analyzer.num_features) if not analyzer.feature(i).saved
               and analyzer.feature(i).stats.num_samples)  # a latent only full_state.pt holds
    feature = analyzer.feature(idx, 20)
    tools.js(f"location.hash = '#/feature/{idx}'")
    wait_js(tools, f"document.getElementById('feature-title').textContent === 'Feature {idx}'"
                   " && !document.getElementById('feature-view').hidden")
    shown = tools.js("""Array.from(document.querySelectorAll('#feature-examples li')).map(li => ({
        tokens: Array.from(li.querySelectorAll('.tok')).map(t => t.textContent),
        act: Array.from(li.querySelectorAll('.tok.act')).map(t => ({text: t.textContent, title: t.title,
             weight: getComputedStyle(t).fontWeight, bg: getComputedStyle(t).backgroundColor})),
        value: li.querySelector('.val').textContent}))""")
    assert len(shown) == len(feature.samples)
    for item, sample in zip(shown, feature.samples):
        assert item["tokens"] == [visible(t.text) for t in sample.context]
        assert [a["text"] for a in item["act"]] == [visible(sample.activating_token.text)]
        assert int(item["act"][0]["weight"]) >= 700 and item["act"][0]["bg"] not in ("rgba(0, 0, 0, 0)", "")
        assert item["act"][0]["title"].startswith("activation ")
    assert tools.js("document.getElementById('feature-badge').textContent") == "from full_state.pt"
    assert tools.js("document.querySelectorAll('#feature-histogram rect.bar').length") > 0
    # Token text such as "<script>alert(1)</script>" is shown, never run or parsed.
    assert tools.js("document.querySelectorAll('script').length") == 1
    assert tools.js("document.querySelectorAll('img, iframe, [onerror]').length") == 0
    tools.js("document.getElementById('next-feature').click()")
    wait_js(tools, f"document.getElementById('feature-title').textContent === 'Feature {idx + 1}'")
    assert tools.js("location.hash") == f"#/feature/{idx + 1}"
    assert errors(tools, server.url) == []


GEOMETRY = """(() => {
    const width = window.innerWidth, out = [];
    for (const e of document.querySelectorAll('body *')) {
        if (!e.checkVisibility() || e.closest('.table-scroll') && !e.classList.contains('table-scroll')) continue;
        if (e.closest('svg') && e.tagName.toLowerCase() !== 'svg') continue;
        const r = e.getBoundingClientRect();
        if (r.width === 0 && r.height === 0) continue;
        const name = e.id || e.className.baseVal || e.className;
        if (r.right > width + 0.5 || r.left < -0.5) out.push([e.tagName, name, r.left, r.right]);
    }
    return {scroll: document.documentElement.scrollWidth, width, cut: out.slice(0, 10)};
})()"""


@pytest.mark.parametrize("width", [420, 1400])
def test_nothing_is_cut_off_at_phone_and_wide_widths(served, width, tmp_path):
    tools, server, root = served
    keep = os.environ.get("SAE_SERVE_SCREENSHOT")
    tools.send("Emulation.setDeviceMetricsOverride", width=width, height=900, deviceScaleFactor=1, mobile=False)
    try:
        results = {}
        for name, hash_ in (("list", "#/"), ("feature", "#/feature/3"), ("search", "#/context/the")):
            tools.js(f"location.hash = '{hash_}'")
            wait_js(tools, {"list": "!document.getElementById('list-view').hidden",
                            "feature": "document.getElementById('feature-title').textContent === 'Feature 3'",
                            "search": "!document.getElementById('search-view').hidden"}[name])
            tools.js("document.querySelectorAll('details').forEach(d => { d.open = true; }); window.scrollTo(0, 0)")
            results[name] = tools.js(GEOMETRY)
            shot = base64.b64decode(tools.send("Page.captureScreenshot", format="png")["data"])
            target = Path(keep).with_suffix(f".{name}.w{width}.png") if keep else tmp_path / f"{name}.png"
            target.write_bytes(shot)
    finally:
        tools.send("Emulation.setDeviceMetricsOverride", width=1280, height=1000, deviceScaleFactor=1, mobile=False)
    for name, layout in results.items():
        assert layout["width"] == width
        assert layout["scroll"] <= width, f"{name}: the page scrolls sideways"
        assert layout["cut"] == [], f"{name}: elements reach past the viewport"
    assert errors(tools, server.url) == []


def test_a_new_save_appears_without_a_reload(served):
    tools, server, root = served
    tools.js("location.hash = '#/feature/3'")
    wait_js(tools, "document.getElementById('feature-title').textContent === 'Feature 3'")
    tools.js("window.__sameDocument = true")
    before = tools.js("document.getElementById('save-info').textContent")
    assert before.startswith("step 6")
    fit(root, 2)  # a second training run saves into the same directory while the page is open
    after = ActivationSampleAnalyzer(root / "samples").feature(3)
    banner = wait_js(tools, "!document.getElementById('live-banner').hidden"
                            " && document.getElementById('live-banner').textContent", timeout=30)
    assert "New save at step 12" in banner
    wait_js(tools, "document.getElementById('save-info').textContent.startsWith('step 12')")
    count = f"{after.stats.activation_count:,}"
    wait_js(tools, "Array.from(document.querySelectorAll('#feature-stats div')).some(d =>"
                   " d.querySelector('dt').textContent === 'Count'"
                   f" && d.querySelector('dd').textContent === '{count}')")
    assert tools.js("window.__sameDocument") is True  # no reload happened
    assert errors(tools, server.url) == []


def test_a_corrupt_explanations_sidecar_shows_a_warning_until_it_is_fixed(served):
    from lightning_sae_samples.analysis.explanations import explanations_path

    tools, server, root = served
    banner = "document.getElementById('explanations-banner')"
    assert tools.js(f"{banner}.hidden") is True
    path = explanations_path(root / "samples")
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b'{"latent": 1, "text": \n')  # not a record: the page must not pass it over in silence
    shown = wait_js(tools, f"!{banner}.hidden && {banner}.textContent", timeout=30)
    assert "explanations.jsonl, line at byte 0" in shown and "cannot be read" in shown
    assert tools.js(f"getComputedStyle({banner}).display") != "none"
    path.unlink()
    wait_js(tools, f"{banner}.hidden", timeout=30)
    assert errors(tools, server.url) == []
