"""The HTML report in headless Chromium, driven through the Chrome DevTools Protocol.

Needs ``chromium`` (``apt-get install -y chromium``) and ``websocket-client``; skipped without them.
Two reports: one from the collector fixture (top samples only) and one from a real Trainer run with
interval and recent sample groups and latents that drift (``render_support.write_run_dir``).
Set ``SAE_REPORT_SCREENSHOT=/some/file.png`` to keep full-size screenshots for a human to look at (the
groups report's goes next to it, as ``/some/file.groups.png``).
"""

import json
import os
import struct
import zlib
from pathlib import Path

import pytest
from chromium import CHROMIUM, open_chromium
from render_support import FakeTokenizer, hostile_vocab, write_fixture_dir, write_run_dir

from lightning_sae_samples.analysis.analyzer import ActivationSampleAnalyzer
from lightning_sae_samples.render.escaping import visible

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)"),
]
WIDTH, HEIGHT = 1280, 1600


def open_report(report: Path, profile: Path):
    """Chromium showing ``report``; yields its DevTools client, closes the browser after."""
    yield from open_chromium(report.resolve().as_uri(), profile, WIDTH, HEIGHT)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    samples = write_fixture_dir(root / "samples", tokenizer=FakeTokenizer(hostile_vocab()))
    analyzer = ActivationSampleAnalyzer(samples)
    report = analyzer.generate_html_report(root / "report.html", top_k_features=14, examples_per_feature=6)
    for tools in open_report(report, root / "profile"):
        yield tools, analyzer


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


# ---------------------------------------------------------------- interval and recent groups, drift flag
GROUP_FEATURES, GROUP_EXAMPLES = 12, 3


@pytest.fixture(scope="module")
def group_page(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser-groups")
    samples = write_run_dir(root, FakeTokenizer(hostile_vocab()), recent_window_steps=2, samples_per_interval=2)
    analyzer = ActivationSampleAnalyzer(samples)
    report = analyzer.generate_html_report(root / "report.html", GROUP_FEATURES, GROUP_EXAMPLES)
    features = analyzer.top_features(GROUP_FEATURES, GROUP_EXAMPLES)
    flagged = [f for f in features if f.recent_drift]
    assert flagged and len(flagged) < len(features), "the run needs flagged and unflagged features"
    assert all(f.interval_groups and f.recent_samples for f in features)
    for tools in open_report(report, root / "profile"):
        yield tools, features


def group_state(tools, idx: int, kind: str) -> dict:
    """A feature's ``details.<kind>``: open or not, and its tokens (text, title, class, rendered or not).

    A closed ``<details>`` keeps its content laid out but skips rendering it (``content-visibility``), so
    "rendered" is ``checkVisibility()``, not the size of its box.
    """
    return tools.js(f"""(() => {{
        const d = document.querySelector('#feature-{idx} details.{kind}');
        return {{open: d.open, tokens: Array.from(d.querySelectorAll('.ctx .tok')).map(t => ({{
            text: t.textContent, title: t.title, act: t.classList.contains('act'),
            shown: t.checkVisibility() && t.getBoundingClientRect().width > 0}}))}};
    }})()""")


def mouse(tools, kind: str, point: dict) -> None:
    tools.send("Input.dispatchMouseEvent", type=kind, x=point["x"], y=point["y"], button="left", clickCount=1)


def point_on(tools, selector: str, dx: float = 0.5) -> dict:
    """Scroll ``selector`` into view; a point on it that is really it (not covered), in viewport pixels."""
    point = tools.js(f"""(() => {{
        const e = document.querySelector({json.dumps(selector)});
        e.scrollIntoView({{block: 'center'}});
        const r = e.getBoundingClientRect();
        const x = r.left + Math.min(r.width * {dx}, 40), y = r.top + r.height / 2;
        const hit = document.elementFromPoint(x, y);
        return {{x, y, hit: hit === e || e.contains(hit)}};
    }})()""")
    assert point["hit"], f"{selector} is covered or not rendered"
    return point


def click(tools, selector: str) -> None:
    point = point_on(tools, selector)
    mouse(tools, "mousePressed", point)
    mouse(tools, "mouseReleased", point)


def expected_tokens(samples) -> tuple[list[str], list[float]]:
    return [visible(t.text) for s in samples for t in s.context], [s.activation_value for s in samples]


def test_group_report_loads_with_groups_closed_and_drifted_recent_open(group_page):
    tools, features = group_page
    assert tools.errors() == []
    assert tools.js("document.querySelectorAll('script').length") == 1
    assert tools.js("document.querySelectorAll('img, iframe, [onerror]').length") == 0
    for f in features:
        intervals, recent = group_state(tools, f.feature_idx, "intervals"), group_state(tools, f.feature_idx, "recent")
        assert intervals["open"] is False and recent["open"] is f.recent_drift
        assert not any(t["shown"] for t in intervals["tokens"])  # collapsed: not rendered
        assert all(t["shown"] for t in recent["tokens"]) is f.recent_drift
        for state, samples in ((intervals, [s for g in f.interval_groups for s in g.samples]),
                               (recent, f.recent_samples)):
            texts, values = expected_tokens(samples)
            assert [t["text"] for t in state["tokens"]] == texts
            assert all(t["title"].startswith("activation ") for t in state["tokens"])
            active = [t for t in state["tokens"] if t["act"]]
            assert [t["title"].split()[1] for t in active] == [f"{v:.6g}" for v in values]


def test_groups_open_and_close_on_click_and_tokens_have_hover_titles(group_page):
    tools, features = group_page
    calm = next(f for f in features if not f.recent_drift)
    drifted = next(f for f in features if f.recent_drift)
    for f, kind in ((calm, "intervals"), (calm, "recent"), (drifted, "intervals")):
        summary = f"#feature-{f.feature_idx} details.{kind} > summary"
        click(tools, summary)
        state = group_state(tools, f.feature_idx, kind)
        assert state["open"] is True and state["tokens"] and all(t["shown"] for t in state["tokens"])
    # Clicking the open recent group of a drifted feature closes it.
    click(tools, f"#feature-{drifted.feature_idx} details.recent > summary")
    state = group_state(tools, drifted.feature_idx, "recent")
    assert state["open"] is False and not any(t["shown"] for t in state["tokens"])
    click(tools, f"#feature-{drifted.feature_idx} details.recent > summary")
    assert group_state(tools, drifted.feature_idx, "recent")["open"] is True
    # Hovering tokens of an opened interval group: the pointer is on that token only, its title holds its
    # activation, and it gets the hover outline.
    selector = f"#feature-{calm.feature_idx} details.intervals .ctx .tok:not(.act)"
    count = tools.js(f"document.querySelectorAll({json.dumps(selector)}).length")
    assert count >= 2
    for n in (0, count - 1):
        target = f"document.querySelectorAll({json.dumps(selector)})[{n}]"
        before = tools.js(f"getComputedStyle({target}).outlineStyle")
        point = tools.js(f"""(() => {{ const t = {target}; t.scrollIntoView({{block: 'center'}});
            const r = t.getBoundingClientRect(); return {{x: r.left + r.width / 2, y: r.top + r.height / 2}}; }})()""")
        mouse(tools, "mouseMoved", point)
        hovered = tools.js(f"""(() => {{ const t = {target}, h = Array.from(document.querySelectorAll('.tok:hover'));
            return {{same: h.length === 1 && h[0] === t, title: t.title, outline: getComputedStyle(t).outlineStyle}};
        }})()""")
        assert hovered["same"] and before == "none" and hovered["outline"] == "solid"
        assert hovered["title"].startswith("activation ")
    assert tools.errors() == []


def test_drift_badge_is_visible_only_for_flagged_features(group_page):
    tools, features = group_page
    for f in features:
        badges = tools.js(f"""Array.from(document.querySelectorAll('#feature-{f.feature_idx} .drift-badge')).map(b => {{
            b.scrollIntoView({{block: 'center'}});
            const r = b.getBoundingClientRect(), style = getComputedStyle(b);
            const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
            return {{text: b.textContent, width: r.width, height: r.height, color: style.color,
                     visibility: style.visibility, opacity: style.opacity, hit: hit === b || b.contains(hit),
                     inHeading: b.closest('h2') !== null}};
        }})""")
        if not f.recent_drift:
            assert badges == []
            continue
        assert len(badges) == 1
        badge = badges[0]
        assert "meaning may have moved" in badge["text"] and badge["inHeading"] and badge["hit"]
        assert badge["width"] > 20 and badge["height"] > 5
        assert badge["visibility"] == "visible" and float(badge["opacity"]) == 1.0
        assert badge["color"] == "rgb(185, 28, 28)"
    links = tools.js("Array.from(document.querySelectorAll('#drift-flagged a.flag')).map(a => a.textContent)")
    assert links == [str(f.feature_idx) for f in features if f.recent_drift]
    cells = tools.js("Array.from(document.querySelectorAll('td.overlap.drift'))"
                     ".map(td => td.closest('tr').dataset.feature)")
    assert cells == [str(f.feature_idx) for f in features if f.recent_drift]
    assert tools.errors() == []


def test_group_report_screenshot_shows_opened_groups(group_page, tmp_path):
    tools, features = group_page
    drifted = next(f for f in features if f.recent_drift)
    section = f"#feature-{drifted.feature_idx}"
    if not tools.js(f"document.querySelector('{section} details.intervals').open"):
        click(tools, f"{section} details.intervals > summary")
    tools.js(f"document.querySelector('{section}').scrollIntoView({{block: 'start'}})")
    shot = __import__("base64").b64decode(tools.send("Page.captureScreenshot", format="png")["data"])
    keep = os.environ.get("SAE_REPORT_SCREENSHOT")
    if keep:
        Path(keep).with_suffix(".groups.png").write_bytes(shot)
    width, height, rows = png_pixels(shot)
    assert (width, height) == (WIDTH, HEIGHT)
    red = sum(1 for row in rows[::4] for i in range(0, len(row), 12)
              if row[i] > 150 and row[i + 1] < 80 and row[i + 2] < 80)
    assert red > 5  # the drift badge, the drifted group's border
    assert tools.errors() == []


# ---------------------------------------------------------------- layout on a phone and on a wide screen
LAYOUT_JS = """(() => {
    const boxOf = t => {
        const rects = Array.from(t.getClientRects()).filter(r => r.width > 0);
        const style = getComputedStyle(t);
        const ring = style.outlineStyle === 'none' ? 0
            : parseFloat(style.outlineWidth) + Math.max(0, parseFloat(style.outlineOffset));
        return {first: rects[0], last: rects[rects.length - 1], ring, text: t.textContent};
    };
    const overlaps = (a, b) => a.left < b.right - 0.5 && b.left < a.right - 0.5
        && a.top < b.bottom - 0.5 && b.top < a.bottom - 0.5;
    const glued = [], covered = [], marks = [];
    for (const ctx of document.querySelectorAll('ol.top-examples .ctx')) {
        const tokens = Array.from(ctx.querySelectorAll('.tok')).map(boxOf).filter(b => b.first);
        for (let i = 1; i < tokens.length; i++) {
            const a = tokens[i - 1], b = tokens[i];
            const sameLine = a.last.top < b.first.bottom && b.first.top < a.last.bottom;
            if (sameLine && a.last.right + a.ring > b.first.left - b.ring + 0.5) {
                glued.push([a.text, b.text, a.last.right + a.ring, b.first.left - b.ring]);
            }
        }
        for (const badge of ctx.querySelectorAll('.val')) {
            const r = badge.getBoundingClientRect();
            for (const t of ctx.querySelectorAll('.tok')) {
                for (const q of t.getClientRects()) {
                    if (overlaps(r, q)) covered.push([badge.textContent, t.textContent]);
                }
            }
        }
        for (const t of ctx.querySelectorAll('.tok.punct')) {
            const r = t.getBoundingClientRect(), size = parseFloat(getComputedStyle(t).fontSize);
            if (r.width < 0.9 * size) marks.push([t.textContent, r.width]);
        }
    }
    const cards = Array.from(document.querySelectorAll('.card')).filter(c => c.offsetParent !== null);
    const spilled = [];
    for (const card of cards) {
        const edge = card.getBoundingClientRect();
        for (const figure of card.querySelectorAll('svg.hist')) {
            const r = figure.getBoundingClientRect();
            if (r.right > edge.right + 0.5 || r.left < edge.left - 0.5) {
                spilled.push([card.id, r.left, r.right, edge.right]);
            }
        }
    }
    const box = document.querySelector('.table-scroll'), table = box.querySelector('table');
    return {scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth,
            tokens: document.querySelectorAll('ol.top-examples .tok').length, glued, covered, marks, spilled,
            tableScrolls: getComputedStyle(box).overflowX === 'auto', tableWidth: table.scrollWidth,
            tableBox: box.clientWidth, tableRight: box.getBoundingClientRect().right};
})()"""


@pytest.mark.parametrize("width", [420, 1400])
def test_layout_fits_the_viewport_and_tokens_do_not_overlap(page, width, tmp_path):
    tools, _ = page
    tools.send("Emulation.setDeviceMetricsOverride", width=width, height=900, deviceScaleFactor=1, mobile=False)
    try:
        tools.js("window.scrollTo(0, 0)")
        layout = tools.js(LAYOUT_JS)
        shot = __import__("base64").b64decode(tools.send("Page.captureScreenshot", format="png")["data"])
        keep = os.environ.get("SAE_REPORT_SCREENSHOT")
        target = Path(keep).with_suffix(f".w{width}.png") if keep else tmp_path / f"w{width}.png"
        target.write_bytes(shot)
        tools.js("document.querySelector('ol.top-examples').scrollIntoView({block: 'start'})")
        target.with_suffix(".examples.png").write_bytes(
            __import__("base64").b64decode(tools.send("Page.captureScreenshot", format="png")["data"]))
    finally:
        tools.send("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)
    assert layout["innerWidth"] == width
    assert layout["scrollWidth"] <= layout["innerWidth"], "the page scrolls sideways"
    assert layout["tokens"] > 50
    assert layout["glued"] == [], "adjacent tokens (or the activating token's ring) overlap"
    assert layout["covered"] == [], "the value badge covers a token"
    assert layout["marks"] == [], "a punctuation token's box is narrower than a letter"
    assert layout["spilled"] == [], "a histogram spills out of its card"
    assert layout["tableScrolls"] and layout["tableRight"] <= width
    if width == 420:
        assert layout["tableWidth"] > layout["tableBox"], "at 420 px the index table scrolls in its own box"
    assert tools.errors() == []


def test_group_report_with_opened_groups_fits_a_phone(group_page):
    tools, features = group_page
    tools.send("Emulation.setDeviceMetricsOverride", width=420, height=900, deviceScaleFactor=1, mobile=False)
    try:
        tools.js("document.querySelectorAll('details').forEach(d => { d.open = true; })")
        widths = tools.js("({scroll: document.documentElement.scrollWidth, inner: window.innerWidth})")
        keep = os.environ.get("SAE_REPORT_SCREENSHOT")
        if keep:
            tools.js(f"document.querySelector('#feature-{features[0].feature_idx} details.intervals').scrollIntoView()")
            shot = tools.send("Page.captureScreenshot", format="png")["data"]
            Path(keep).with_suffix(".groups.w420.png").write_bytes(__import__("base64").b64decode(shot))
    finally:
        tools.send("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)
    assert widths["inner"] == 420 and widths["scroll"] <= 420, "the page scrolls sideways"
    assert tools.errors() == []
