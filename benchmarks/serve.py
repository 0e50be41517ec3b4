"""Cost of ``lightning-sae-samples serve`` on the scale benchmark's samples directories (16,384 and 1,048,576 latents).

Run from the repository root::

    python benchmarks/serve.py                          # F = 16384 and 1048576
    python benchmarks/serve.py --scale 16384 --repeat 20

Each size: a directory is written by a real ``Trainer`` with the callback's defaults over random TopK latents, as
``benchmarks/collection.py --scale`` does (its ``RandomTopK`` module and loader, imported from it: 2048 tokens per
collection, 4 collections with k = 32, 3 with k = 64 at F = 1,048,576). Then, in a fresh process (so that peak RSS
is the server's own), the server loads it (``RunSet``, what ``serve`` does at start) and answers through the ASGI
test client, HTTP encoding and JSON included:

* load: reading the directory and building the in-memory index;
* peak RSS of the process (imports included), and the part the load added, next to ``full_state.pt``'s size;
* feature page: ``/api/features/N`` for latents only ``full_state.pt`` holds and saved ones (median, max);
* token search: ``/api/search/token?id=`` for the most common activating tokens and ``?text=`` (median, max);
* sorted list page: ``/api/features?sort=...`` (50 rows) for every sort key and filter, first call (the sort is
  computed and cached) and repeated (median, max);
* context search: ``/api/search/context?text=`` (20 hits).

``--meaning`` measures, at F = 1,048,576 (``--meaning-latents``), what the feature pages' words and neighbours
cost: a latent's neighbours over random unit decoder rows in bfloat16 (``--d-model``, one or more), and, with every
latent explained (synthetic explanations of 6-12 words drawn from a Zipf-distributed vocabulary of 5,000 words),
reading the sidecar, building the explanation index, ranked explanation searches and the sort by score.

``--history`` measures the feature page's timeline answer (``/api/history/features/N``: ``timeline`` and its
JSON encoding, as the route does) at F = 1,048,576 (``--history-latents``) on a synthetic history of 30 windows
built as ``benchmarks/history.py`` builds one (a real collector's window of 4 sparse collections, k = 32; two
such windows from different seeds alternate, so that latents change meaning, die and come back), read from its
file as the server reads it: the first answer after a save (one latent's events, from its own windows), the first
history list answer (which finds every latent's events once) and later timelines, for saved latents (with kept
samples) and random ones.

Nothing here asserts a time; the issue's targets are printed next to the measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

TARGETS = {"load": "≤ 15 s", "rss": "≤ 2.5× full_state.pt", "feature": "≤ 200 ms", "token": "≤ 500 ms",
           "list": "≤ 300 ms", "neighbours": "≤ 100 ms", "explanation": "≤ 200 ms", "timeline": "≤ 200 ms"}


def build(num_latents: int, dirpath: str, tokens: int, seq_len: int, vocab: int) -> None:
    """Child: write the samples directory as the scale benchmark does."""
    import lightning as L
    import torch
    from collection import RandomTopK, loader_of

    from lightning_sae_samples import ActivationSampleCallback

    k, collections = (64, 3) if num_latents >= 1 << 20 else (32, 4)
    gen = torch.Generator().manual_seed(0)
    batch = {"tokens": torch.randint(0, vocab, (tokens // seq_len, seq_len), generator=gen)}
    callback = ActivationSampleCallback(collection_freq=1, dirpath=dirpath, write_report=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=collections, callbacks=[callback], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=os.path.dirname(dirpath), num_sanity_val_steps=0)
    trainer.fit(RandomTopK(num_latents, k, seq_len), loader_of(batch, collections))


def _ms(values: list[float]) -> dict:
    return {"median": statistics.median(values) * 1e3, "max": max(values) * 1e3, "n": len(values)}


def measure(dirpath: str, repeat: int) -> None:
    """Child: load the directory the way the server does and time its answers; prints one JSON line."""
    import torch
    from starlette.testclient import TestClient

    from lightning_sae_samples.serve.app import create_app
    from lightning_sae_samples.serve.runs import RunSet

    def rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = rss()
    start = time.perf_counter()
    runs = RunSet(Path(dirpath))
    run = runs.get(None)
    load_s = time.perf_counter() - start
    after = rss()
    index = run.current
    client = TestClient(create_app(runs))

    def timed(url: str) -> float:
        t0 = time.perf_counter()
        response = client.get(url)
        elapsed = time.perf_counter() - t0
        assert response.status_code == 200, (url, response.text[:300])
        return elapsed

    num_latents = index.analyzer.num_features
    gen = torch.Generator().manual_seed(1)
    alive = (index.table.columns["activation_count"] > 0).nonzero().flatten()
    picks = alive[torch.randint(0, len(alive), (repeat,), generator=gen)].tolist()
    saved = list(index.analyzer.saved_features[:repeat])
    feature = [timed(f"/api/features/{i}") for i in picks]
    feature_saved = [timed(f"/api/features/{i}") for i in saved]
    pair_tokens, pairs = torch.unique(index.tokens.pair_token, return_counts=True)
    common = pair_tokens[torch.argsort(pairs, descending=True)][:repeat].tolist()
    token = [timed(f"/api/search/token?id={t}") for t in common]
    texts = [index.token_strings[t] for t in common]
    token_text = [timed("/api/search/token?text=" + __import__("urllib.parse").parse.quote(t)) for t in texts]
    keys = ["max_activation", "activation_count", "frequency", "mean_activation", "recent_overlap", "first_step",
            "last_step"]
    first = [timed(f"/api/features?sort={k}&order=desc") for k in keys]
    again = [timed(f"/api/features?sort={k}&order=desc&offset={50 * n}") for n in range(repeat) for k in keys]
    filtered = [timed(f"/api/features?sort=frequency&filter={f}") for f in ("alive", "dead", "dense", "drifting")]
    context = [timed("/api/search/context?text=" + __import__("urllib.parse").parse.quote(t[:4])) for t in texts[:5]]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    full_state = os.path.getsize(os.path.join(dirpath, "full_state.pt"))
    print(json.dumps({
        "num_latents": num_latents, "kept_samples": len(index.sample_latent), "full_state_bytes": full_state,
        "load_s": load_s, "rss_before": before, "rss_after_load": after, "peak_rss": peak,
        "corpus_bytes": len(index.corpus.data), "feature": _ms(feature), "feature_saved": _ms(feature_saved),
        "token_id": _ms(token), "token_text": _ms(token_text), "list_first": _ms(first), "list": _ms(again),
        "list_filtered": _ms(filtered), "context": _ms(context), "load_average": os.getloadavg()[0],
    }))


def _timed(fn, repeat: int) -> dict:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return _ms(times)


def measure_meaning(num_latents: int, d_models: list[int], repeat: int, sidecar: bool) -> list[tuple[str, str, str]]:
    """Neighbours and explanation search at ``num_latents``; rows of (what, measurement, target)."""
    import torch

    from lightning_sae_samples.analysis.explanations import ExplanationRecord, append_explanations, read_explanations
    from lightning_sae_samples.analysis.neighbours import nearest_latents
    from lightning_sae_samples.serve.explanations import ExplanationIndex

    rows = []
    gen = torch.Generator().manual_seed(0)
    picks = torch.randint(0, num_latents, (repeat,), generator=gen).tolist()
    for d in d_models:
        directions = torch.empty(num_latents, d, dtype=torch.bfloat16)  # what a save writes
        for start in range(0, num_latents, 1 << 16):
            block = torch.randn(min(1 << 16, num_latents - start), d, generator=gen)
            directions[start : start + len(block)] = block / block.norm(dim=1, keepdim=True)
        nearest_latents(directions, picks[0], 10)  # first touch of the pages
        times = []
        for latent in picks:
            t0 = time.perf_counter()
            nearest_latents(directions, latent, 10)
            times.append(time.perf_counter() - t0)
        result = _ms(times)
        rows.append((f"neighbours of one latent (10), d_model {d}, bfloat16 rows {mib(directions.numel() * 2)}",
                     f"{result['median']:.0f} / {result['max']:.0f} ms", TARGETS["neighbours"]))
        del directions
    words = [f"w{n}" for n in range(5000)]
    zipf = 1.0 / torch.arange(1, len(words) + 1, dtype=torch.float64)
    lengths = torch.randint(6, 13, (num_latents,), generator=gen)
    drawn = torch.multinomial(zipf, int(lengths.sum()), replacement=True, generator=gen).tolist()
    texts, at = [], 0
    for n in lengths.tolist():
        texts.append(" ".join(words[i] for i in drawn[at : at + n]))
        at += n
    scores = torch.rand(num_latents, generator=gen).tolist()
    records = {i: ExplanationRecord(latent=i, text=t, score=s, samples_step=1, time="2026-12-03T00:00:00+00:00")
               for i, (t, s) in enumerate(zip(texts, scores))}
    if sidecar:
        folder = Path(tempfile.mkdtemp(prefix="sae-sidecar-bench-"))
        t0 = time.perf_counter()
        append_explanations(folder, records.values())
        write_s = time.perf_counter() - t0
        size = (folder / "explanations" / "explanations.jsonl").stat().st_size
        t0 = time.perf_counter()
        records = read_explanations(folder)
        read_s = time.perf_counter() - t0
        rows.append((f"sidecar of {num_latents:,} explanations ({mib(size)}): append / read and validate",
                     f"{write_s:.1f} s / {read_s:.1f} s", ""))
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    index = ExplanationIndex(records, {}, num_latents)
    built_s = time.perf_counter() - t0
    rows.append((f"explanation index build ({len(index.explanation_words.post_doc):,} postings)", f"{built_s:.1f} s",
                 "once per new explanations"))
    queries = {"one common word": [words[0]], "one rare word": [words[4000]], "three words": words[10:13],
               "five mixed words": [words[1], words[50], words[300], words[2000], words[4999]]}
    for name, query in queries.items():
        text = " ".join(query)
        total = index.search(text, 0, 50)[2]
        result = _timed(lambda text=text: index.search(text, 0, 50), repeat)
        rows.append((f"explanation search, {name} ({total:,} matches), 50 rows",
                     f"{result['median']:.0f} / {result['max']:.0f} ms", TARGETS["explanation"]))
    latents = torch.arange(num_latents)
    first = _timed(lambda: index.order_by_score(latents, True), 1)
    rows.append(("sort by score, best first: sorted when the explanations load (off the requests)",
                 f"{first['median']:.0f} ms", "once per new explanations"))
    second = _timed(lambda: index.order_by_score(latents, True), repeat)
    rows.append(("sort by score, a request (cached)", f"{second['median']:.0f} / {second['max']:.0f} ms",
                 TARGETS["list"]))
    return rows


def measure_history(num_latents: int, repeat: int) -> list[tuple[str, str, str]]:
    """The timeline answer at ``num_latents`` on a 30-window history; rows of (what, measurement, target)."""
    import torch
    from history import PER_LEVEL, SAVES, collected_state, levels_kept
    from starlette.responses import JSONResponse

    from lightning_sae_samples.analysis.history import FeatureHistory
    from lightning_sae_samples.samples_dir.history_file import history_payload
    from lightning_sae_samples.serve.history_api import history_list, timeline, window_samples
    from lightning_sae_samples.serve.index import jsonable
    from lightning_sae_samples.state.history import window_of_state

    saved = list(range(100))
    t0 = time.perf_counter()
    pair = [window_of_state(collected_state(num_latents, 4, seed), 100, 5, saved, 3) for seed in (0, 1)]
    built_s = time.perf_counter() - t0
    levels = levels_kept(SAVES, PER_LEVEL)
    windows = [dict(pair[i % 2], start=100 * i, end=100 * (i + 1), level=lv) for i, lv in enumerate(levels)]
    folder = Path(tempfile.mkdtemp(prefix="sae-history-bench-"))
    file = folder / "training_history.pt"
    torch.save(history_payload(windows, num_latents=num_latents, top_tokens=5, context_window=21,
                               dead_window_steps=150, vocab={}), file)
    size = file.stat().st_size
    t0 = time.perf_counter()
    history = FeatureHistory.from_file(file)
    read_s = time.perf_counter() - t0

    def answer(latent: int) -> int:
        return len(JSONResponse(jsonable(timeline(history, latent))).body)

    gen = torch.Generator().manual_seed(2)
    fired = torch.unique(torch.cat([w["latent"].long() for w in pair]))
    picks = fired[torch.randint(0, len(fired), (repeat,), generator=gen)].tolist()
    t0 = time.perf_counter()
    answer(picks[0])
    cold_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    history_list(history, "changed")
    run_events_s = time.perf_counter() - t0
    sizes = []
    random_ms = _timed(lambda: sizes.append(answer(picks[len(sizes) % len(picks)])), repeat)
    saved_sizes = []
    saved_ms = _timed(lambda: saved_sizes.append(answer(saved[len(saved_sizes) % len(saved)])), repeat)
    window_sizes = []
    window_ms = _timed(lambda: window_sizes.append(len(JSONResponse(jsonable(window_samples(
        history, saved[len(window_sizes) % len(saved)], len(window_sizes) % len(windows)))).body)), repeat)
    events = len(history.events())
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    return [
        (f"history: {len(windows)} windows, {sum(len(w['latent']) for w in windows):,} rows, {events:,} events,"
         f" file {mib(size)}", f"built {built_s:.0f} s, read {read_s:.1f} s", ""),
        ("timeline answer, the first after a save (the latent's events from its own windows)",
         f"{cold_s * 1e3:.0f} ms", TARGETS["timeline"]),
        ("history list answer, the first after a save (finds every latent's events once)",
         f"{run_events_s * 1e3:.0f} ms", "once per save"),
        (f"timeline answer, random fired latent (JSON {statistics.median(sizes) / 1024:.1f} KiB)",
         f"{random_ms['median']:.0f} / {random_ms['max']:.0f} ms", TARGETS["timeline"]),
        (f"timeline answer, saved latent with kept samples (JSON {statistics.median(saved_sizes) / 1024:.1f} KiB)",
         f"{saved_ms['median']:.0f} / {saved_ms['max']:.0f} ms", TARGETS["timeline"]),
        (f"one window's kept samples of a saved latent (JSON {statistics.median(window_sizes) / 1024:.1f} KiB)",
         f"{window_ms['median']:.0f} / {window_ms['max']:.0f} ms", TARGETS["timeline"]),
    ]


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=int, nargs="+", default=[16384, 1 << 20], metavar="F")
    p.add_argument("--repeat", type=int, default=10, help="requests per row")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per collection")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--keep", metavar="DIR", help="write the directories under DIR and keep them (reused if present)")
    p.add_argument("--build", nargs=2, metavar=("F", "DIR"), help=argparse.SUPPRESS)
    p.add_argument("--measure", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--meaning", action="store_true", help="measure neighbours and explanation search only")
    p.add_argument("--meaning-latents", type=int, default=1 << 20, metavar="F")
    p.add_argument("--d-model", type=int, nargs="+", default=[256, 768], metavar="D")
    p.add_argument("--no-sidecar", action="store_true", help="with --meaning: skip writing and reading the sidecar")
    p.add_argument("--history", action="store_true", help="measure the feature timeline answer only")
    p.add_argument("--history-latents", type=int, default=1 << 20, metavar="F")
    args = p.parse_args()
    if args.history:
        from rich.console import Console
        from rich.table import Table

        load = os.getloadavg()[0]
        rows = measure_history(args.history_latents, args.repeat)
        table = Table(title=f"serve: the feature timeline at F = {args.history_latents:,} (CPU; median / max of"
                            f" {args.repeat}; load average {load:.1f} before, {os.getloadavg()[0]:.1f} after)")
        for name in ("row", "measured", "target"):
            table.add_column(name, justify="left" if name == "row" else "right")
        for row in rows:
            table.add_row(*row)
        Console(width=int(os.environ.get("COLUMNS", "150"))).print(table)
        return
    if args.meaning:
        from rich.console import Console
        from rich.table import Table

        load = os.getloadavg()[0]
        table = Table(title=f"serve: neighbours and explanations at F = {args.meaning_latents:,} (CPU; median / max"
                            f" of {args.repeat}; load average {load:.1f})")
        for name in ("row", "measured", "target"):
            table.add_column(name, justify="left" if name == "row" else "right")
        for row in measure_meaning(args.meaning_latents, args.d_model, args.repeat, not args.no_sidecar):
            table.add_row(*row)
        Console(width=int(os.environ.get("COLUMNS", "150"))).print(table)
        return
    if args.build:
        build(int(args.build[0]), args.build[1], args.tokens, args.seq_len, args.vocab)
        return
    if args.measure:
        measure(args.measure, args.repeat)
        return
    from rich.console import Console
    from rich.table import Table

    root = Path(args.keep or tempfile.mkdtemp(prefix="sae-serve-bench-"))
    results = []
    for num_latents in args.scale:
        dirpath = root / f"F{num_latents}" / "activation_samples"
        if not (dirpath / "full_state.pt").exists():
            subprocess.run([sys.executable, __file__, "--build", str(num_latents), str(dirpath), "--tokens",
                            str(args.tokens), "--seq-len", str(args.seq_len), "--vocab", str(args.vocab)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out = subprocess.run([sys.executable, __file__, "--measure", str(dirpath), "--repeat", str(args.repeat)],
                             check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    table = Table(title="lightning-sae-samples serve at scale (CPU, one process; median / max of the requests)")
    table.add_column("row")
    for r in results:
        table.add_column(f"F = {r['num_latents']:,}", justify="right")
    table.add_column("target")

    def row(name, fn, target=""):
        table.add_row(name, *[fn(r) for r in results], target)

    def ms(key):
        return lambda r: f"{r[key]['median']:.0f} / {r[key]['max']:.0f} ms"

    row("kept top samples indexed", lambda r: f"{r['kept_samples']:,}")
    row("full_state.pt", lambda r: mib(r["full_state_bytes"]))
    row("load (read + index)", lambda r: f"{r['load_s']:.1f} s", TARGETS["load"])
    row("peak RSS of the process (× full_state.pt)",
        lambda r: f"{mib(r['peak_rss'])} ({r['peak_rss'] / r['full_state_bytes']:.1f}×)", TARGETS["rss"])
    row("RSS added by the load (× full_state.pt)",
        lambda r: f"{mib(r['rss_after_load'] - r['rss_before'])} "
                  f"({(r['rss_after_load'] - r['rss_before']) / r['full_state_bytes']:.1f}×)")
    row("RSS before the load (Python, torch, Starlette)", lambda r: mib(r["rss_before"]))
    row("context corpus in memory", lambda r: mib(r["corpus_bytes"]))
    row("feature page, latent only full_state.pt holds", ms("feature"), TARGETS["feature"])
    row("feature page, saved latent", ms("feature_saved"), TARGETS["feature"])
    row("token search by id", ms("token_id"), TARGETS["token"])
    row("token search by text", ms("token_text"), TARGETS["token"])
    row("sorted list page, first call of a sort key", ms("list_first"), TARGETS["list"])
    row("sorted list page, sort cached", ms("list"), TARGETS["list"])
    row("filtered list page (alive, dead, dense, drifting)", ms("list_filtered"), TARGETS["list"])
    row("context search (20 hits)", ms("context"))
    row("load average during the run", lambda r: f"{r['load_average']:.1f}")
    Console(width=int(os.environ.get("COLUMNS", "150"))).print(table)
    if not args.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
