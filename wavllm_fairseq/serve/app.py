"""The HTTP app: FastAPI with the endpoints of routes.py, the middleware of middleware.py, OpenAI's error shape.

Errors are JSON ``{"error": {"message", "type", "param", "code"}}``: 4xx for bad requests (413 for a body
over ``max_body_bytes``, counted as it arrives, so a chunked upload without Content-Length is cut off too;
401 without the API key), 503 with ``Retry-After`` when the queue is full, 504 past the request timeout
(answers.py), 500 when decoding fails.
"""
from typing import Optional

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .answers import Answering
from .engine import Engine
from .forms import AudioTasks
from .metrics import ServeMetrics
from .middleware import ApiKey, BodyLimit, StatusCounts
from .protocol import APIError, Limits
from .routes import API_ROUTES, STATIC, add_audio_routes, add_chat_routes, add_state_routes


def add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: refusals (APIError), starlette's (404, 405), anything else (500).

    Args:
        app (FastAPI): the app
    """

    @app.exception_handler(APIError)
    async def api_error(_request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return JSONResponse(APIError(err.status_code, str(err.detail), code).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def server_error(_request, err: Exception):
        return JSONResponse(APIError(500, f"internal error: {type(err).__name__}: {err}", "server_error").body(),
                            status_code=500)


def create_app(engine: Engine, limits: Limits, max_body_bytes: int = 25 * 2 ** 20, api_key: Optional[str] = None,
               request_timeout: Optional[float] = None, tasks: Optional[AudioTasks] = None) -> FastAPI:
    """The FastAPI app serving ``engine``'s model under ``limits.model_name``.

    Args:
        engine (Engine): decodes (a scheduler of schedulers.py)
        limits (Limits): the limits requests are checked against
        max_body_bytes (int): larger request bodies are refused (413)
        api_key (Optional[str]): paths under /v1/ need it as a bearer token (None: open)
        request_timeout (Optional[float]): seconds before an unanswered request is ended with a 504 (None: none)
        tasks (Optional[AudioTasks]): what the transcription and translation endpoints ask (default: AudioTasks())

    Returns:
        FastAPI: the app (``app.state.metrics`` holds its figures)
    """
    app = FastAPI(title="wavllm-serve", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = app.state.metrics = ServeMetrics(engine, routes=API_ROUTES + ("/health", "/metrics", "/"))
    # the last added runs first: counts see every answer, the key is checked before the body is read
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    if api_key:
        app.add_middleware(ApiKey, key=api_key)
    app.add_middleware(StatusCounts, metrics=metrics)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    add_error_handlers(app)
    answering = Answering(engine, limits, request_timeout)
    add_state_routes(app, answering, metrics)
    add_chat_routes(app, answering)
    add_audio_routes(app, answering, tasks or AudioTasks())
    return app
