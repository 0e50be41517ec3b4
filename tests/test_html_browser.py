"""The HTML report in headless Chromium, driven through the Chrome DevTools Protocol.

Needs ``chromium`` (``apt-get install -y chromium``) and ``websocket-client``; skipped without them.
Set ``SAE_REPORT_SCREENSHOT=/some/file.png`` to keep a full-size screenshot for a human to look at.
"""

import json
import os
import shutil
import struct
import subprocess
import time
import urllib.request
import zlib
from pathlib import Path

import pytest
from render_support import FakeTokenizer, hostile_vocab, write_fixture_dir

from lightning_sae_samples.analyzer import ActivationSampleAnalyzer

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)"),
]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-port=0", "--window-size=1280,1600"]
WIDTH, HEIGHT = 1280, 1600


class DevTools:
    """A minimal CDP client for one page: commands in order, events kept."""

    def __init__(self, url: str) -> None:
        websocket = pytest.importorskip("websocket", reason="pip install websocket-client")
        self.ws = websocket.create_connection(url, timeout=30, suppress_origin=True)
        self.events: list[dict] = []
        self._id = 0

    def send(self, method: str, **params):
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, method: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events:
                if event.get("method") == method:
                    self.events.remove(event)
                    return event
            self.events.append(json.loads(self.ws.recv()))
        raise TimeoutError(method)

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(result["exceptionDetails"])
        return result["result"].get("value")

    def errors(self) -> list[dict]:
        bad = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown" or method == "Page.javascriptDialogOpening":
                bad.append(event)
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                bad.append(event)
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                bad.append(event)
            elif method == "Network.requestWillBeSent" and not params["request"]["url"].startswith(("file:", "data:")):
                bad.append(event)
        return bad


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    samples = write_fixture_dir(root / "samples", tokenizer=FakeTokenizer(hostile_vocab()))
    analyzer = ActivationSampleAnalyzer(samples)
    report = analyzer.generate_html_report(root / "report.html", top_k_features=14, examples_per_feature=6)
    profile = root / "profile"
    proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            assert proc.poll() is None, "chromium exited at start"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        tools = DevTools(url)
        for domain in ("Runtime", "Log", "Page", "Network"):
            tools.send(f"{domain}.enable")
        tools.send("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)
        tools.send("Page.navigate", url=report.resolve().as_uri())
        tools.wait_for("Page.loadEventFired")
        yield tools, analyzer
        tools.ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def png_pixels(data: bytes) -> tuple[int, int, list[bytearray]]:
    """Decode an 8-bit RGB/RGBA PNG into rows of bytes (enough for a pixel-variance check)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour = header[:4]
    assert depth == 8 and colour in (2, 6)
    bpp = 3 if colour == 2 else 4
    raw, stride, rows, prev = zlib.decompress(idat), width * bpp, [], bytearray(width * bpp)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(line)
        prev = line
    return width, height, [bytearray(v for i, v in enumerate(r) if i % bpp < 3) for r in rows]


def test_report_loads_without_errors_and_highlights_tokens(page):
    tools, analyzer = page
    assert tools.errors() == []
    assert tools.js("document.querySelectorAll('script').length") == 1  # hostile tokens stayed text
    assert tools.js("document.querySelectorAll('img, iframe, [onerror]').length") == 0
    total = len(analyzer.features(limit=14))
    assert tools.js("document.getElementById('filter-count').textContent") == f"{total} of {total} features shown"
    tokens = tools.js("""Array.from(document.querySelectorAll('.ctx .tok')).map(t => ({
        text: t.textContent, title: t.title, act: t.classList.contains('act'),
        bg: getComputedStyle(t).backgroundColor, weight: getComputedStyle(t).fontWeight,
        underline: getComputedStyle(t).textDecorationLine}))""")
    samples = [s for f in analyzer.features(limit=14) for s in analyzer.feature(f.feature_idx, 6).samples]
    assert len(tokens) == sum(len(s.context) for s in samples)
    assert all(t["title"].startswith("activation ") for t in tokens)
    active = [t for t in tokens if t["act"]]
    assert len(active) == len(samples)
    assert all(int(t["weight"]) >= 700 and "underline" in t["underline"] for t in active)
    assert all(t["bg"] not in ("rgba(0, 0, 0, 0)", "transparent") for t in active)
    assert "<script>alert(1)</script>" in {t["text"] for t in tokens}
    bars = tools.js("""Array.from(document.querySelectorAll('svg.hist rect.bar'))
        .map(r => r.getBoundingClientRect()).filter(b => b.width > 0 && b.height > 0).length""")
    assert bars >= total
    assert tools.js("document.querySelectorAll('svg.hist').length") == total + 1


def test_filter_by_feature_number_and_anchor_links(page):
    tools, analyzer = page
    ranked = [s.feature_idx for s in analyzer.features(limit=14)]
    visible_sections = "Array.from(document.querySelectorAll('section.feature')).filter(s => s.offsetParent !== null)" \
                       ".map(s => Number(s.dataset.feature))"
    visible_rows = "Array.from(document.querySelectorAll('tr[data-feature]')).filter(r => r.offsetParent !== null)" \
                   ".map(r => Number(r.dataset.feature))"

    def type_filter(text):
        tools.js(f"""(() => {{ const i = document.getElementById('feature-filter'); i.value = {json.dumps(text)};
                     i.dispatchEvent(new Event('input', {{bubbles: true}})); }})()""")

    target = ranked[3]
    type_filter(str(target))
    assert tools.js(visible_sections) == [target] and tools.js(visible_rows) == [target]
    assert tools.js("document.getElementById('filter-count').textContent").startswith("1 of ")
    type_filter("0-9, 12")
    expected = [i for i in ranked if i <= 9 or i == 12]
    assert tools.js(visible_sections) == expected
    type_filter("abc")
    assert tools.js(visible_sections) == [] and tools.js("document.getElementById('no-match').hidden") is False
    type_filter("")
    assert tools.js(visible_sections) == ranked
    tools.js(f"document.querySelector('a[href=\"#feature-{target}\"]').click()")
    assert tools.js("location.hash") == f"#feature-{target}"
    top = tools.js(f"document.getElementById('feature-{target}').getBoundingClientRect().top")
    assert abs(top) < 5
    assert tools.errors() == []


def test_screenshot_is_not_blank(page):
    tools, _ = page
    tools.js("window.scrollTo(0, 0)")
    keep = os.environ.get("SAE_REPORT_SCREENSHOT")
    if keep:
        shot = tools.send("Page.captureScreenshot", format="png")
        Path(keep).write_bytes(__import__("base64").b64decode(shot["data"]))
    small = tools.send("Page.captureScreenshot", format="png",
                       clip={"x": 0, "y": 0, "width": WIDTH, "height": HEIGHT, "scale": 0.25})
    width, height, rows = png_pixels(__import__("base64").b64decode(small["data"]))
    assert (width, height) == (WIDTH // 4, HEIGHT // 4)
    values = [v for row in rows for v in row]
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / len(values)
    assert variance > 200, f"screenshot looks blank (variance {variance:.1f})"
    orange = sum(1 for row in rows for i in range(0, len(row), 3) if row[i] > 200 and row[i + 2] < 120)
    assert orange > 50  # highlighted tokens and histogram bars are visible
