"""The `serve` page's training-history views in headless Chromium over a real server (DevTools protocol).

A real Trainer writes a directory with a history of six windows (a checkpoint every 2 steps; from step 3 the
switching SAE moves some latents to other tokens, so they change meaning, stops some and starts others) and two
validation snapshots. Every
expected value is read from the files (``FeatureHistory``) or the server's API, never written here.
"""

import json
import urllib.parse

import pytest
from chromium import CHROMIUM, api, choose, errors, open_chromium, wait_js
from render_support import FakeTokenizer, hostile_vocab

from lightning_sae_samples.analysis.history import FeatureHistory, quoted_tokens
from lightning_sae_samples.render.escaping import token_label, visible

pytest.importorskip("starlette")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)"),
]


def fit(root):
    """Two epochs of 6 steps, a window every 2 steps, a snapshot after each epoch's validation (steps 6 and 12)."""
    from helpers import SwitchingSAE, TokenDataset, loader, trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_sae_samples import ActivationSampleCallback

    callback = ActivationSampleCallback(
        collection_freq=1, max_samples_per_feature=5, context_size=4, activation_threshold=0.5,
        top_features_to_save=6, samples_per_feature_to_save=3, dirpath=root / "samples",
        tokenizer=FakeTokenizer(hostile_vocab()), write_report=False, collect_in=("train", "validate"),
        history_windows_per_level=100, dead_window_steps=4,
    )
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_top_k=-1)
    run = trainer(root, [callback, checkpoints], max_epochs=2, enable_checkpointing=True, check_val_every_n_epoch=1,
                  num_sanity_val_steps=0)
    sae = SwitchingSAE(num_latents=48, drift_step=3, mode="sparse")
    run.fit(sae, loader(TokenDataset(num_sequences=24, seq_len=64)), loader(TokenDataset(num_sequences=8, seed=5)))
    return root / "samples"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from lightning_sae_samples.serve import Server

    root = tmp_path_factory.mktemp("serve-history")
    samples = fit(root)
    history = FeatureHistory.from_dir(samples)
    server = Server(samples, poll_seconds=0.3)
    server.start_thread()
    try:
        for tools in open_chromium(server.url, root / "profile", 1280, 1000):
            wait_js(tools, "document.querySelectorAll('#feature-rows tr').length > 0")
            yield tools, server, history
    finally:
        server.stop()


def texts(tools, selector: str) -> list:
    return tools.js(f"Array.from(document.querySelectorAll({json.dumps(selector)})).map(n => n.textContent)")


def click(tools, selector: str) -> None:
    tools.js(f"document.querySelector({json.dumps(selector)})"
             ".dispatchEvent(new MouseEvent('click', {bubbles: true}))")


def chips(tokens) -> list:
    return [f"{token_label(t.text)} ×{t.count}" for t in tokens]


def open_feature(tools, latent: int) -> None:
    tools.js(f"location.hash = '#/feature/{latent}'")
    wait_js(tools, f"document.getElementById('feature-title').textContent === 'Feature {latent}'"
                   " && !document.getElementById('feature-view').hidden"
                   " && !document.getElementById('feature-history').hidden"
                   f" && document.getElementById('timeline-caption').dataset.latent === '{latent}'")


def check_timeline(tools, history, latent: int) -> None:
    """The feature page of ``latent`` draws one point and one bar per window, its events and each window's tokens."""
    open_feature(tools, latent)
    windows = len(history.windows)
    assert tools.js("document.querySelectorAll('#timeline-chart g.window').length") == windows
    assert tools.js("document.querySelectorAll('#timeline-chart circle.point').length") == windows
    assert tools.js("document.querySelectorAll('#timeline-chart rect.bar').length") == windows
    events = history.events(latent)
    kinds = tools.js("Array.from(document.querySelectorAll('#timeline-chart g.event'))"
                     ".map(g => [g.dataset.kind, Number(g.dataset.step)])")
    assert kinds == [[e.kind, e.step] for e in events]
    titles = texts(tools, "#timeline-chart g.event title")
    assert [t.startswith(f"{e.kind.replace('_', ' ')} at step {e.step}") for e, t in zip(events, titles)] \
        == [True] * len(events)
    # Each window's top tokens in the table; a silent window has none.
    rows = tools.js("Array.from(document.querySelectorAll('#timeline-rows tr')).map(r => Array.from("
                    "r.querySelectorAll('td.tokens .chip')).map(c => c.textContent))")
    by_window = {s.window.index: s for s in history.feature(latent)}
    assert rows == [chips(by_window[i].top_tokens) if i in by_window else [] for i in range(windows)]
    # A window says when the latent was silent, rare, or had too few activations there to be compared.
    notes = tools.js("Array.from(document.querySelectorAll('#timeline-rows tr')).map(r => Array.from("
                     "r.querySelectorAll('td.tokens .caption')).map(c => c.textContent.trim()))")

    def note(i):
        if i not in by_window:
            return ["silent"]
        count = by_window[i].count
        return ["rare"] if count < 5 else ["too few to compare"] if count < 20 else []

    assert notes == [note(i) for i in range(windows)]


def show_window(tools, index: int) -> None:
    click(tools, f"#timeline-chart g.window[data-window='{index}']")
    wait_js(tools, f"document.getElementById('window-detail').dataset.shown === '{index}'")


def test_the_timeline_draws_every_window_and_event_and_a_window_shows_its_tokens_and_samples(served):
    tools, server, history = served
    changed = history.most_changed(100)
    latent = next(i for i in changed if any(s.samples for s in history.feature(i)))
    check_timeline(tools, history, latent)
    change = next(e for e in history.events(latent) if e.kind == "meaning_change")
    title = tools.js("document.querySelector('#timeline-chart g.event-meaning_change title').textContent")
    assert f"{quoted_tokens(change.before)} → {quoted_tokens(change.after)}" in title
    assert f"({round(change.shift * 100)}% of activations moved, p " in title
    assert title.endswith(f", against window {change.before_window})")
    # Clicking a window with kept samples shows them, the activating token marked as on the feature page.
    for stats in history.feature(latent)[:3]:
        show_window(tools, stats.window.index)
        assert texts(tools, "#window-tokens .chip") == chips(stats.top_tokens)
        assert texts(tools, "#window-samples li .act") == [visible(s.text) for s in stats.samples]
        assert tools.js("document.getElementById('window-empty').hidden") == bool(stats.samples)
    # A latent that died, or fired without kept samples: its markers, and a window without samples says so.
    dying = [i for i in range(history.num_latents) if any(e.kind == "death" for e in history.events(i))]
    bare = next(i for i in dying + changed if any(not s.samples for s in history.feature(i)))
    check_timeline(tools, history, bare)
    stats = next(s for s in history.feature(bare) if not s.samples)
    show_window(tools, stats.window.index)
    assert texts(tools, "#window-tokens .chip") == chips(stats.top_tokens)
    assert tools.js("document.querySelectorAll('#window-samples li').length") == 0
    assert texts(tools, "#window-empty") == ["no samples kept for this window"]
    assert not tools.js("document.getElementById('window-empty').hidden")
    assert errors(tools, server.url) == []


HISTORY_ROWS = "Array.from(document.querySelectorAll('#history-rows tr')).map(r => Number(r.dataset.feature))"


def test_history_filters_list_the_latents_the_api_and_the_file_give(served):
    tools, server, history = served
    tools.js("location.hash = '#/'")
    wait_js(tools, "!document.getElementById('history-label').hidden")
    changed = [r["latent"] for r in api(server, "history/latents?filter=changed&sort=changes")["rows"]]
    assert changed and set(changed) == set(history.event_counts()["meaning_change"].nonzero().flatten().tolist())
    choose(tools, "history-select", "changed")
    assert wait_js(tools, f"!document.getElementById('history-table').hidden && {HISTORY_ROWS}.length"
                          f" && {HISTORY_ROWS}") == changed
    assert tools.js("document.getElementById('feature-table').hidden")
    most = [r["latent"] for r in api(server, "history/latents?filter=all&sort=changes")["rows"]]
    choose(tools, "history-select", "most_changes")
    wait_js(tools, f"{HISTORY_ROWS}.length === {len(most)}")
    assert tools.js(HISTORY_ROWS) == most and most[: len(changed)] == changed
    died = [r["latent"] for r in api(server, "history/latents?filter=died&sort=changes")["rows"]]
    assert died and set(died) == set(history.event_counts()["death"].nonzero().flatten().tolist())
    choose(tools, "history-select", "died")
    wait_js(tools, f"JSON.stringify({HISTORY_ROWS}) === {json.dumps(json.dumps(died, separators=(',', ':')))}")
    births = history.first_event_step("birth").tolist()
    step = history.windows[0].start
    born = sorted(i for i, b in enumerate(births) if b > step)
    assert 0 < len(born) < sum(b >= 0 for b in births)  # some latents were born later than the first window
    choose(tools, "history-select", "born_after")
    tools.js(f"""(() => {{ const s = document.getElementById('history-step'); s.value = '{step}';
                 s.dispatchEvent(new Event('change', {{bubbles: true}})); }})()""")
    wait_js(tools, f"document.getElementById('list-title').textContent.endsWith(' {step}')")
    assert sorted(wait_js(tools, f"{HISTORY_ROWS}.length === {len(born)} && {HISTORY_ROWS}")) == born
    # A row links to the feature page.
    choose(tools, "history-select", "changed")
    wait_js(tools, f"{HISTORY_ROWS}.length === {len(changed)}")
    tools.js("document.querySelector('#history-rows tr a').click()")
    wait_js(tools, f"document.getElementById('feature-title').textContent === 'Feature {changed[0]}'")
    choose(tools, "history-select", "")
    wait_js(tools, "!document.getElementById('feature-table').hidden")
    assert errors(tools, server.url) == []


def test_the_run_chart_has_one_entry_per_window(served):
    tools, server, history = served
    tools.js("document.getElementById('history-link').click()")
    wait_js(tools, "!document.getElementById('history-view').hidden")
    series = history.run_series()
    drawn = tools.js("document.querySelectorAll('#run-chart g.run-window').length")
    assert drawn == len(series) == len(history.windows)
    titles = texts(tools, "#run-chart g.run-window title")
    assert [f"alive {w['alive']} · births {w['births']} · deaths {w['deaths']}" in t for w, t in zip(series, titles)] \
        == [True] * len(series)
    table = tools.js("Array.from(document.querySelectorAll('#run-rows tr')).map(r => Array.from(r.cells).slice(1)"
                     ".map(c => c.textContent))")
    assert table == [[f"{w['start']}–{w['end']}", str(w["alive"]), str(w["rare"]), str(w["births"]),
                      str(w["deaths"]), str(w["revivals"]), str(w["meaning_changes"])] for w in series]
    assert errors(tools, server.url) == []


def side_stats(tools, side: str) -> dict:
    return tools.js(f"Object.fromEntries(Array.from(document.querySelectorAll('#{side} dl.stats > div'))"
                    ".map(d => [d.querySelector('dt').textContent, d.querySelector('dd').textContent]))")


def test_side_by_side_shows_one_latent_in_two_windows(served):
    tools, server, history = served
    latent = history.most_changed(1)[0]
    active = history.feature(latent)
    first, last = active[0], active[-1]
    open_feature(tools, latent)
    choose(tools, "compare-window-a", str(first.window.index))
    choose(tools, "compare-window-b", str(last.window.index))
    tools.js("document.getElementById('compare-windows').click()")
    wait_js(tools, "!document.getElementById('compare-view').hidden")
    assert tools.js("location.hash") == f"#/compare/{latent}/windows/{first.window.index}/{last.window.index}"
    timeline = api(server, f"history/features/{latent}")
    shown = {w["index"]: w for w in timeline["windows"]}
    for side, stats in (("compare-a", first), ("compare-b", last)):
        values = side_stats(tools, side)
        assert values["Count"] == str(stats.count)
        assert values["Max"] == shown[stats.window.index]["shown"]["max"]
        assert texts(tools, f"#{side} .window-tokens .chip") == chips(stats.top_tokens)
        assert texts(tools, f"#{side} li .act") == [visible(s.text) for s in stats.samples]
    assert first.top_tokens != last.top_tokens  # the latent changed meaning in between
    assert errors(tools, server.url) == []


def test_side_by_side_shows_one_latent_in_two_snapshots(served):
    tools, server, history = served
    names = [r["name"] for r in api(server, "runs")["runs"]]
    snapshots = [n for n in names if "/snapshots/step_" in n]
    folders = sorted((history.path.parent / "snapshots").iterdir(), key=lambda p: int(p.name.removeprefix("step_")))
    assert len(folders) == 2 and snapshots == [f"samples/snapshots/{p.name}" for p in folders]  # listed by step
    latent = history.most_changed(1)[0]
    open_feature(tools, latent)
    assert not tools.js("document.getElementById('compare-runs-form').hidden")
    choose(tools, "compare-run-a", snapshots[0])
    choose(tools, "compare-run-b", snapshots[1])
    tools.js("document.getElementById('compare-runs').click()")
    wait_js(tools, "!document.getElementById('compare-view').hidden && document.querySelectorAll("
                   "'#compare-b dl.stats').length")
    for side, name in (("compare-a", snapshots[0]), ("compare-b", snapshots[1])):
        feature = api(server, f"features/{latent}?examples=10&run={urllib.parse.quote(name)}")
        assert tools.js(f"document.getElementById('{side}').dataset.run") == name
        assert texts(tools, f"#{side} h4") == [f"{name} · step {feature['global_step']}"]
        values = side_stats(tools, side)
        assert [values[k] for k in ("Max", "Mean", "Count", "Frequency")] == [feature[k] for k in
                                                                                ("max", "mean", "count", "frequency")]
        assert texts(tools, f"#{side} .window-tokens .chip") == [f"{t['label']} ×{t['samples']}"
                                                                 for t in feature["top_tokens"]]
        assert len(texts(tools, f"#{side} li .act")) == len(feature["examples"]) > 0
    assert errors(tools, server.url) == []


def test_a_snapshot_written_while_the_page_is_open_joins_the_run_list(served):
    import shutil

    tools, server, history = served
    folder = history.path.parent / "snapshots"
    first = sorted(folder.iterdir(), key=lambda p: int(p.name.removeprefix("step_")))[0]
    copy = folder / "step_99"
    options = "Array.from(document.querySelectorAll('#run-select option')).map(o => o.value)"
    before = tools.js(options)
    try:
        shutil.copytree(first, copy)  # a complete save, as a snapshot written now would be
        wait_js(tools, f"{options}.includes('samples/snapshots/step_99')")
        assert tools.js(options) == [*before, "samples/snapshots/step_99"]
        assert tools.js("document.getElementById('run-select').value") == before[0]  # the run shown stays
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    wait_js(tools, f"!{options}.includes('samples/snapshots/step_99')")
    assert errors(tools, server.url) == []
