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
           "list": "≤ 300 ms"}


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
    args = p.parse_args()
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
