"""The Starlette application: the page, its script and stylesheets, and the JSON API over the loaded runs.

No request path reaches the file system: the page's files are read once at start into memory under fixed
names, feature ids are parsed as integers, and run names are looked up in the list built at start. Every
error is a JSON object ``{"error": message}`` with its status (400, 404, 503), never a traceback.
"""

from __future__ import annotations

import contextlib
import math
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

from lightning_sae_samples.analysis.history import FeatureHistory
from lightning_sae_samples.health import DENSE_FREQUENCY
from lightning_sae_samples.render.templates import shipped_template_dir
from lightning_sae_samples.samples_dir.names import SamplesDirectoryError
from lightning_sae_samples.serve.history_api import history_list, run_chart, timeline
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


def _json(data: Any) -> JSONResponse:
    return JSONResponse(jsonable(data), headers=HEADERS)


def _lifespan(runs: RunSet):
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        runs.stop()

    return lifespan


def create_app(runs: RunSet, allowed_hosts: Optional[list[str]] = None) -> Starlette:
    """The web application over ``runs``.

    Args:
        runs: The runs to show (found at start; see :class:`~lightning_sae_samples.serve.runs.RunSet`).
        allowed_hosts: ``Host`` headers accepted (``None``: any). A server on the loopback interface accepts
            only local names, so that a web page elsewhere cannot reach it through DNS rebinding.
    """
    folder = shipped_template_dir()
    assets = {name: ((folder / path).read_bytes(), media) for name, (path, media) in ASSETS.items()}
    page = (folder / PAGE).read_bytes()

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
        out = []
        for name in runs.names:
            status = runs.runs[name].status()
            out.append({"name": name, "path": str(runs.runs[name].path), **status.__dict__})
        return _json({"root": str(runs.root), "runs": out})

    def status(request: Request) -> Response:
        run = live(request)
        return _json({"run": run.name, **run.status().__dict__})

    def summary(request: Request) -> Response:
        run = live(request)
        index = loaded(request)
        return _json({"run": run.name, "version": run.version, **index.summary_json()})

    def features(request: Request) -> Response:
        index = loaded(request)
        params = request.query_params
        order = params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise BadRequestError(f"`order` must be asc or desc; got {order!r}.")
        low, high = _float_arg(request, "log10_low", None), _float_arg(request, "log10_high", None)
        if (low is None) != (high is None):
            raise BadRequestError("Pass both `log10_low` and `log10_high` (a log10 frequency range), or neither.")
        return _json(
            index.feature_list(
                sort=params.get("sort", "max_activation"),
                descending=order == "desc",
                kind=params.get("filter", "all"),
                dense_above=_float_arg(request, "dense_above", DENSE_FREQUENCY),
                log10_frequency=None if low is None else (low, high),
                offset=_int_arg(request, "offset", 0, high=1 << 40),
                limit=_int_arg(request, "limit", 50, low=1),
            )
        )

    def feature(request: Request) -> Response:
        index = loaded(request)
        raw = request.path_params["idx"]
        if not raw.isascii() or not raw.isdigit():
            raise NotFoundError(f"Feature {raw!r} does not exist: a feature is a number from 0 to"
                                f" {index.analyzer.num_features - 1}.")
        examples = _int_arg(request, "examples", DEFAULT_EXAMPLES, low=0, high=MAX_EXAMPLES)
        return _json(index.feature_page(index.check_index(int(raw)), examples))

    def token_search(request: Request) -> Response:
        index = loaded(request)
        text, token_id = request.query_params.get("text"), request.query_params.get("id")
        if (text is None) == (token_id is None):
            raise BadRequestError("Pass `text` (a token's text, e.g. ' Lord') or `id` (a token id), not both.")
        if token_id is not None:
            ids = [_int_arg(request, "id", 0, high=(1 << 31) - 1)]
        else:
            ids = index.token_ids_for(text or "")
        offset, limit = _int_arg(request, "offset", 0, high=1 << 40), _int_arg(request, "limit", 50, 1)
        result = index.token_search(ids, offset, limit)
        return _json({"query": text if token_id is None else int(token_id), **result})

    def context_search(request: Request) -> Response:
        index = loaded(request)
        text = request.query_params.get("text", "")
        if not text.strip():
            raise BadRequestError("Pass `text`: a piece of context text to look for in the kept samples.")
        if len(text) > 200:
            raise BadRequestError(f"`text` is limited to 200 characters; got {len(text)}.")
        offset, limit = _int_arg(request, "offset", 0, high=1 << 40), _int_arg(request, "limit", 20, 1, 100)
        return _json({"query": text, **index.context_search(text, offset, limit)})

    # ------------------------------------------------------------------ history (training_history.pt)
    def loaded_history(request: Request) -> FeatureHistory:
        index = loaded(request)
        history = index.analyzer.history
        if history is None:
            raise NotFoundError(f"{index.analyzer.directory.path} has no training history (training_history.pt).")
        return history

    def history_timeline(request: Request) -> Response:
        history = loaded_history(request)
        index = loaded(request)
        raw = request.path_params["idx"]
        if not raw.isascii() or not raw.isdigit():
            raise NotFoundError(f"Feature {raw!r} does not exist: a feature is a number.")
        return _json(timeline(history, index.check_index(int(raw))))

    def history_run(request: Request) -> Response:
        return _json(run_chart(loaded_history(request)))

    def history_latents(request: Request) -> Response:
        history = loaded_history(request)
        params = request.query_params
        step = _int_arg(request, "step", -1, low=-1, high=1 << 62) if "step" in params else None
        try:
            return _json(history_list(
                history, params.get("filter", "all"), step, params.get("sort", "changes"),
                _int_arg(request, "offset", 0, high=1 << 40), _int_arg(request, "limit", 50, low=1),
            ))
        except ValueError as err:
            raise BadRequestError(str(err)) from None

    async def on_not_found(request: Request, exc: Exception) -> Response:
        return _error(404, str(exc))

    async def on_bad_request(request: Request, exc: Exception) -> Response:
        return _error(400, str(exc))

    async def on_not_ready(request: Request, exc: Exception) -> Response:
        return _error(503, str(exc))

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
        Route("/api/search/token", token_search),
        Route("/api/search/context", context_search),
        Route("/api/history/run", history_run),
        Route("/api/history/latents", history_latents),
        Route("/api/history/features/{idx}", history_timeline),
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
            HTTPException: on_http,
            Exception: on_crash,
        },
        lifespan=_lifespan(runs),
    )


def static_files() -> list[Path]:
    """The shipped files the page is built from (for the wheel test)."""
    folder = shipped_template_dir()
    return [folder / PAGE, *(folder / path for path, _ in ASSETS.values())]
