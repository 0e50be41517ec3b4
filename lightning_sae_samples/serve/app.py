"""The Starlette application: the page, its script and stylesheets, and the JSON API over the loaded runs.

No request path reaches the file system: the page's files are read once at start into memory under fixed
names, feature ids are parsed as integers, and run names are looked up in the list built at start. Every
error is a JSON object ``{"error": message}`` with its status (400, 404, 503), never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import math
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lightning_sae_samples.analysis.explanations import ExplanationRecord, append_explanations
from lightning_sae_samples.analysis.history import FeatureHistory
from lightning_sae_samples.health import DENSE_FREQUENCY
from lightning_sae_samples.render.templates import shipped_template_dir
from lightning_sae_samples.samples_dir.names import SamplesDirectoryError
from lightning_sae_samples.serve.explanations import ExplanationIndex
from lightning_sae_samples.serve.history_api import history_list, run_chart, timeline, window_samples
from lightning_sae_samples.serve.index import MAX_PAGE, BadRequestError, NotFoundError, RunIndex, jsonable
from lightning_sae_samples.serve.runs import LiveRun, RunSet

#: The page's files: URL name to (file under the shipped templates, media type).
ASSETS = {
    "app.js": ("serve/app.js", "text/javascript; charset=utf-8"),
    "serve.css": ("serve/serve.css", "text/css; charset=utf-8"),
    "report.css": ("report.css", "text/css; charset=utf-8"),
}
PAGE = "serve/index.html"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:;"
    " base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}
#: Most examples a feature page asks for.
MAX_EXAMPLES = 1000
DEFAULT_EXAMPLES = 20
MAX_NEIGHBOURS = 100
#: Longest label a person may type.
MAX_LABEL = 500
#: Longest search text.
MAX_QUERY = 200
#: What a search across SAEs looks for: an activating token's text, or a piece of context text.
SEARCH_MODES = ("token", "context")
#: The header a write must carry with the page's token, and the placeholder of the token in the page.
TOKEN_HEADER = "X-SAE-Samples-Token"
_TOKEN_SLOT = b"__SAE_SAMPLES_TOKEN__"
_WRITES_SLOT = b"__SAE_SAMPLES_WRITES__"
#: Digits of the largest int64: a longer number in a path names no feature and no window.
_MAX_INDEX_DIGITS = 19


class ForbiddenError(PermissionError):
    """A write the server refuses: not from its own page, or the server is read-only."""


class NotReadyError(RuntimeError):
    """The run has no loaded save yet (training has not saved, or its save cannot be read)."""


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=HEADERS)


def _int_arg(request: Request, name: str, default: int, low: int = 0, high: int = MAX_PAGE) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequestError(f"`{name}` must be an integer; got {raw!r}.") from None
    if not low <= value <= high:
        raise BadRequestError(f"`{name}` must be between {low} and {high}; got {value}.")
    return value


def _float_arg(request: Request, name: str, default: Optional[float]) -> Optional[float]:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadRequestError(f"`{name}` must be a number; got {raw!r}.") from None
    if not math.isfinite(value):
        raise BadRequestError(f"`{name}` must be a finite number; got {raw!r}.")
    return value


def _page(request: Request, default_limit: int, most: int = MAX_PAGE) -> tuple[int, int]:
    """The ``offset`` and ``limit`` of a paged answer."""
    return _int_arg(request, "offset", 0, high=1 << 40), _int_arg(request, "limit", default_limit, 1, most)


def _query_text(request: Request, what: str) -> str:
    """The ``text`` of a search: not blank, at most :data:`MAX_QUERY` characters (``what``: what it looks for)."""
    text = request.query_params.get("text", "")
    if not text.strip():
        raise BadRequestError(f"Pass `text`: {what}.")
    if len(text) > MAX_QUERY:
        raise BadRequestError(f"`text` is limited to {MAX_QUERY} characters; got {len(text)}.")
    return text


def _shown_number(raw: str) -> str:
    """A path segment as an error message quotes it: a number of thousands of digits is cut."""
    return repr(raw) if len(raw) <= 40 else repr(raw[:20] + "...")


def _json(data: Any) -> JSONResponse:
    return JSONResponse(jsonable(data), headers=HEADERS)


def _lifespan(runs: RunSet):
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        runs.stop()

    return lifespan


def _with_explanations(result: dict, explanations: ExplanationIndex, global_step: int) -> dict:
    """``result`` with each of its ``rows`` given its ``explanation`` (``None`` where the latent has none)."""
    for row in result.get("rows", []):
        found = explanations.get(int(row["idx"]))
        row["explanation"] = None if found is None else jsonable(found.to_json(global_step))
    return result


def check_write(request: Request, token: str, writes_allowed: bool) -> None:
    """Refuse a write that does not come from this server's own page.

    A write must name this server as its ``Origin`` (scheme and ``Host``), must not be marked cross-site by the
    browser (``Sec-Fetch-Site``), must be JSON (so a cross-site page needs a preflight the server never grants),
    and must carry the per-server random token that only the page holds (``X-SAE-Samples-Token``).

    Raises:
        ForbiddenError: Which of these failed.
    """
    if not writes_allowed:
        raise ForbiddenError(
            "This server is read-only: it listens beyond 127.0.0.1. Start it with --allow-writes to save labels."
        )
    host = request.headers.get("host", "")
    origin = request.headers.get("origin")
    if origin is None or origin != f"{request.url.scheme}://{host}":
        raise ForbiddenError(f"Refused a write from origin {origin!r}: labels are saved only from this server's page.")
    if request.headers.get("sec-fetch-site", "same-origin") != "same-origin":
        raise ForbiddenError("Refused a cross-site write: labels are saved only from this server's page.")
    if not request.headers.get("content-type", "").startswith("application/json"):
        raise ForbiddenError("Refused a write that is not application/json.")
    given = request.headers.get(TOKEN_HEADER, "")
    if not secrets.compare_digest(given.encode(), token.encode()):
        raise ForbiddenError(f"Refused a write without this server's token ({TOKEN_HEADER}): reload the page.")


def create_app(
    runs: RunSet,
    allowed_hosts: Optional[list[str]] = None,
    allow_writes: bool = True,
    write_token: Optional[str] = None,
) -> Starlette:
    """The web application over ``runs``.

    Args:
        runs: The runs to show (found at start; see :class:`~lightning_sae_samples.serve.runs.RunSet`).
        allowed_hosts: ``Host`` headers accepted (``None``: any). A server on the loopback interface accepts
            only local names, so that a web page elsewhere cannot reach it through DNS rebinding.
        allow_writes: Accept labels from the page (saved to the run's explanations sidecar, never to its
            samples files); see :func:`check_write` for what a write must show.
        write_token: The token the page carries for writes (default: a new random one).
    """
    folder = shipped_template_dir()
    assets = {name: ((folder / path).read_bytes(), media) for name, (path, media) in ASSETS.items()}
    token = write_token or secrets.token_urlsafe(32)
    page = (folder / PAGE).read_bytes().replace(_TOKEN_SLOT, token.encode("ascii"))
    page = page.replace(_WRITES_SLOT, b"1" if allow_writes else b"0")

    def live(request: Request) -> LiveRun:
        name = request.query_params.get("run")
        run = runs.get(name)
        if run is None:
            raise NotFoundError(f"There is no run {name!r}. Runs: {', '.join(runs.names)}.")
        return run

    def loaded(request: Request) -> RunIndex:
        run = live(request)
        current = run.current
        if current is None:
            status = run.status()
            raise NotReadyError(
                status.message and f"{run.path} cannot be read: {status.message}"
                or f"{run.path} has no save yet: the page shows it as soon as the training saves."
            )
        return current

    def index_page(request: Request) -> Response:
        headers = {**HEADERS, "Content-Security-Policy": CSP}
        return Response(page, media_type="text/html; charset=utf-8", headers=headers)

    def asset(request: Request) -> Response:
        found = assets.get(request.path_params["name"])
        if found is None:
            raise NotFoundError(f"No file {request.path_params['name']!r} here; the page uses {', '.join(assets)}.")
        return Response(found[0], media_type=found[1], headers=HEADERS)

    def run_list(request: Request) -> Response:
        listed = runs.runs  # once: the watcher swaps in a new list when a snapshot comes or goes
        out = [{"name": name, "path": str(run.path), **run.status().__dict__} for name, run in listed.items()]
        return _json({"root": str(runs.root), "runs": out, "saes": list(runs.sae_names),
                      "searchable": runs.searchable})

    def status(request: Request) -> Response:
        run = live(request)
        return _json({"run": run.name, "runs": len(runs.runs), **run.status().__dict__})

    def summary(request: Request) -> Response:
        run = live(request)
        index = loaded(request)
        return _json({"run": run.name, "version": run.version, "explanations_version": run.explanations_version,
                      "explanations": len(run.explanations), "explanations_error": run.explanations_error,
                      "has_history": index.analyzer.directory.history_path is not None, **index.summary_json()})

    def features(request: Request) -> Response:
        index = loaded(request)
        params = request.query_params
        order = params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise BadRequestError(f"`order` must be asc or desc; got {order!r}.")
        low, high = _float_arg(request, "log10_low", None), _float_arg(request, "log10_high", None)
        if (low is None) != (high is None):
            raise BadRequestError("Pass both `log10_low` and `log10_high` (a log10 frequency range), or neither.")
        score_low, score_high = _float_arg(request, "score_low", None), _float_arg(request, "score_high", None)
        score_range = None
        if score_low is not None or score_high is not None:
            score_range = (-math.inf if score_low is None else score_low,
                           math.inf if score_high is None else score_high)
        explanations = live(request).explanations
        offset, limit = _page(request, 50)
        result = index.feature_list(
            sort=params.get("sort", "max_activation"),
            descending=order == "desc",
            kind=params.get("filter", "all"),
            dense_above=_float_arg(request, "dense_above", DENSE_FREQUENCY),
            log10_frequency=None if low is None else (low, high),
            offset=offset,
            limit=limit,
            explanations=explanations,
            score_range=score_range,
        )
        return _json(_with_explanations(result, explanations, index.summary.global_step))

    def feature(request: Request) -> Response:
        index = loaded(request)
        idx = feature_idx(request, index)
        examples = _int_arg(request, "examples", DEFAULT_EXAMPLES, low=0, high=MAX_EXAMPLES)
        view = index.feature_page(idx, examples)
        found = live(request).explanations.get(view["idx"])
        view["explanation"] = None if found is None else jsonable(found.to_json(index.summary.global_step))
        view["global_step"] = index.summary.global_step
        view["has_neighbours"] = index.directions is not None
        return _json(view)

    def feature_idx(request: Request, index: RunIndex) -> int:
        raw = request.path_params["idx"]
        last = index.analyzer.num_features - 1
        if not raw.isascii() or not raw.isdigit():
            raise NotFoundError(f"Feature {_shown_number(raw)} does not exist: a feature is a number from 0 to"
                                f" {last}.")
        if len(raw) > _MAX_INDEX_DIGITS:  # before `int`: thousands of digits raise ValueError there
            raise NotFoundError(f"Feature {_shown_number(raw)} does not exist: this run has latents 0 to {last}.")
        return index.check_index(int(raw))

    def neighbours(request: Request) -> Response:
        index = loaded(request)
        idx = feature_idx(request, index)
        k = _int_arg(request, "k", 10, low=1, high=MAX_NEIGHBOURS)
        return _json({"idx": idx, **index.neighbours(idx, k, live(request).explanations)})

    def explanation_search(request: Request) -> Response:
        index = loaded(request)
        text = _query_text(request, "words to look for in the latents' explanations and labels")
        offset, limit = _page(request, 50)
        explanations = live(request).explanations
        result = index.explanation_search(explanations, text, offset, limit)
        return _json({"query": text, **_with_explanations(result, explanations, index.summary.global_step)})

    async def save_label(request: Request) -> Response:
        check_write(request, token, allow_writes)
        run = live(request)
        index = loaded(request)
        idx = feature_idx(request, index)
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise BadRequestError('The body must be JSON: {"text": "your label"}.') from None
        text = body.get("text") if isinstance(body, dict) else None
        if not isinstance(text, str) or len(text) > MAX_LABEL:
            raise BadRequestError(f'The body must be {{"text": "..."}} with at most {MAX_LABEL} characters.')
        record = ExplanationRecord(latent=idx, text=" ".join(text.split()), kind="label", source="label",
                                   samples_step=index.summary.global_step)
        append_explanations(run.path, [record])
        run.refresh_explanations()
        found = run.explanations.get(idx)
        return _json({"idx": idx, "explanation": None if found is None else found.to_json(index.summary.global_step)})

    def token_search(request: Request) -> Response:
        index = loaded(request)
        text, token_id = request.query_params.get("text"), request.query_params.get("id")
        if (text is None) == (token_id is None):
            raise BadRequestError("Pass `text` (a token's text, e.g. ' Lord') or `id` (a token id), not both.")
        if token_id is not None:
            ids = [_int_arg(request, "id", 0, high=(1 << 31) - 1)]
        else:
            ids = index.token_ids_for(text or "")
        offset, limit = _page(request, 50)
        result = _with_explanations(index.token_search(ids, offset, limit), live(request).explanations,
                                    index.summary.global_step)
        return _json({"query": text if token_id is None else int(token_id), **result})

    def context_search(request: Request) -> Response:
        index = loaded(request)
        text = _query_text(request, "a piece of context text to look for in the kept samples")
        offset, limit = _page(request, 20, 100)
        return _json({"query": text, **index.context_search(text, offset, limit)})

    def sae_search(request: Request) -> Response:
        """A token or context search in each SAE: which latents, in which SAEs, have it among their top samples."""
        mode = request.query_params.get("mode", "token")
        if mode not in SEARCH_MODES:
            raise BadRequestError(f"`mode` must be one of {', '.join(SEARCH_MODES)}; got {mode!r}.")
        text = _query_text(request, "a token's text (mode=token) or context text (mode=context) to look for")
        limit = _int_arg(request, "limit", 20, low=1, high=100)
        listed = runs.searchable
        wanted = request.query_params.get("saes")
        names = listed if not wanted else list(dict.fromkeys(wanted.split(",")))
        unknown = [name for name in names if name not in listed]
        if unknown:
            raise NotFoundError(f"There is no SAE {unknown[0]!r} to search. SAEs: {', '.join(listed)}.")
        results = []
        for name in names:
            run = runs.get(name)
            current = None if run is None else run.current
            if run is None or current is None:
                results.append({"sae": name, "total": 0, "rows": [], "error": None if run is None else
                                run.status().message or "no save yet"})
                continue
            if mode == "token":
                found = current.token_search(current.token_ids_for(text), 0, limit)
                found["capped"] = False
            else:
                found = current.context_latents(text, limit)
            _with_explanations(found, run.explanations, current.summary.global_step)
            results.append({"sae": name, "total": found["total"], "rows": found["rows"], "capped": found["capped"],
                            "error": None, "global_step": current.summary.global_step})
        return _json({"query": text, "mode": mode, "saes": results})

    # ------------------------------------------------------------------ history (training_history.pt)
    def loaded_history(request: Request) -> tuple[RunIndex, FeatureHistory]:
        index = loaded(request)  # once: the history and the index are of the same save
        history = index.analyzer.history
        if history is None:
            raise NotFoundError(f"{index.analyzer.directory.path} has no training history (training_history.pt).")
        return index, history

    def history_timeline(request: Request) -> Response:
        index, history = loaded_history(request)
        return _json(timeline(history, feature_idx(request, index)))

    def history_window(request: Request) -> Response:
        index, history = loaded_history(request)
        idx = feature_idx(request, index)
        raw = request.path_params["window"]
        if (not raw.isascii() or not raw.isdigit() or len(raw) > _MAX_INDEX_DIGITS
                or int(raw) >= len(history.windows)):
            raise NotFoundError(f"Window {_shown_number(raw)} does not exist: the history has windows 0 to"
                                f" {len(history.windows) - 1}.")
        return _json(window_samples(history, idx, int(raw)))

    def history_run(request: Request) -> Response:
        return _json(run_chart(loaded_history(request)[1]))

    def history_latents(request: Request) -> Response:
        history = loaded_history(request)[1]
        params = request.query_params
        step = _int_arg(request, "step", -1, low=-1, high=1 << 62) if "step" in params else None
        try:
            return _json(history_list(history, params.get("filter", "all"), step, params.get("sort", "changes"),
                                      *_page(request, 50)))
        except ValueError as err:
            raise BadRequestError(str(err)) from None

    async def on_not_found(request: Request, exc: Exception) -> Response:
        return _error(404, str(exc))

    async def on_bad_request(request: Request, exc: Exception) -> Response:
        return _error(400, str(exc))

    async def on_not_ready(request: Request, exc: Exception) -> Response:
        return _error(503, str(exc))

    async def on_forbidden(request: Request, exc: Exception) -> Response:
        return _error(403, str(exc))

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = f"No such page: {request.url.path}." if exc.status_code == 404 else str(exc.detail)
        return _error(exc.status_code, message)

    async def on_crash(request: Request, exc: Exception) -> Response:
        return _error(500, f"Internal error ({type(exc).__name__}): {' '.join(str(exc).split())[:300]}")

    routes = [
        Route("/", index_page),
        Route("/static/{name}", asset),
        Route("/api/runs", run_list),
        Route("/api/status", status),
        Route("/api/summary", summary),
        Route("/api/features", features),
        Route("/api/features/{idx}", feature),
        Route("/api/features/{idx}/neighbours", neighbours),
        Route("/api/features/{idx}/label", save_label, methods=["POST"]),
        Route("/api/search/explanation", explanation_search),
        Route("/api/search/token", token_search),
        Route("/api/search/context", context_search),
        Route("/api/search/saes", sae_search),
        Route("/api/history/run", history_run),
        Route("/api/history/latents", history_latents),
        Route("/api/history/features/{idx}", history_timeline),
        Route("/api/history/features/{idx}/windows/{window}", history_window),
    ]
    middleware = [] if allowed_hosts is None else [Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)]
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={
            NotFoundError: on_not_found,
            BadRequestError: on_bad_request,
            NotReadyError: on_not_ready,
            SamplesDirectoryError: on_not_ready,
            ForbiddenError: on_forbidden,
            HTTPException: on_http,
            Exception: on_crash,
        },
        lifespan=_lifespan(runs),
    )


def static_files() -> list[Path]:
    """The shipped files the page is built from (for the wheel test)."""
    folder = shipped_template_dir()
    return [folder / PAGE, *(folder / path for path, _ in ASSETS.values())]
