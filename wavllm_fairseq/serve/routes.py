"""The endpoints, by group: the page and the server's state; chat completions; the audio endpoints.

    GET  /                          the web page (static/index.html; plain HTML + JS, nothing from a CDN)
    GET  /health                    {"status", "model", "scheduler", "max_batch", "max_wait_ms", "max_queue",
                                    "accepting", "waiting", "running", "stats"}
    GET  /metrics                   Prometheus' text format (metrics.py)
    GET  /v1/models                 the one served model, in OpenAI's list format
    POST /v1/chat/completions       OpenAI chat format, audio as input_audio parts (protocol.py); "stream": true
                                    sends server-sent events, one chunk per decoded piece of text
    POST /v1/audio/instruct         multipart: file=@clip.wav, instruction=..., [max_tokens, temperature, top_p,
                                    seed, stream]; answers {"text", "finish_reason", "usage"}
    POST /v1/audio/transcriptions   OpenAI's multipart transcription request and answer (forms.py)
    POST /v1/audio/translations     OpenAI's multipart translation request and answer (forms.py)
"""
import json
import os
import time

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from .answers import Answering
from .forms import AudioTasks, instruct_request, read_form, speech_request, upload_of
from .formats import ChatFormat, InstructFormat, TranscriptionFormat
from .metrics import CONTENT_TYPE, ServeMetrics
from .protocol import APIError, decode_audio, parse_chat

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
API_ROUTES = ("/v1/models", "/v1/chat/completions", "/v1/audio/instruct", "/v1/audio/transcriptions",
              "/v1/audio/translations")


def add_state_routes(app: FastAPI, answering: Answering, metrics: ServeMetrics) -> None:
    """The page, /health, /metrics and /v1/models.

    Args:
        app (FastAPI): the app
        answering (Answering): its engine and limits
        metrics (ServeMetrics): the figures /metrics shows
    """
    engine, limits = answering.engine, answering.limits
    created = int(time.time())

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(os.path.join(STATIC, "index.html"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": limits.model_name, "scheduler": engine.scheduler,
                "max_batch": engine.max_batch, "max_wait_ms": engine.max_wait * 1000, "max_queue": engine.max_queue,
                "accepting": engine.accepting, "waiting": engine.waiting(), "running": engine.running(),
                "stats": dict(engine.stats)}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": limits.model_name, "object": "model", "created": created,
                                            "owned_by": "wavllm_fairseq"}]}


def add_chat_routes(app: FastAPI, answering: Answering) -> None:
    """POST /v1/chat/completions.

    Args:
        app (FastAPI): the app
        answering (Answering): answers the checked requests
    """

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON ({e}); send the OpenAI chat format", "invalid_json")
        req = await run_in_threadpool(parse_chat, body, answering.limits)
        return await answering.respond(request, req, ChatFormat(answering.limits.model_name, req.include_usage))


def add_audio_routes(app: FastAPI, answering: Answering, tasks: AudioTasks) -> None:
    """POST /v1/audio/instruct, /v1/audio/transcriptions and /v1/audio/translations (multipart).

    Args:
        app (FastAPI): the app
        answering (Answering): answers the checked requests
        tasks (AudioTasks): what the transcription and translation endpoints ask the model
    """
    limits = answering.limits

    async def clip(form, upload):
        data = await upload.read()
        await form.close()
        return await run_in_threadpool(decode_audio, data, "file", limits.max_audio_seconds)

    @app.post("/v1/audio/instruct")
    async def instruct(request: Request):
        form = await read_form(request)
        upload = upload_of(form)
        req = instruct_request(form, limits)
        req.audio = await clip(form, upload)
        return await answering.respond(request, req, InstructFormat())

    async def speech(request: Request, translate: bool):
        form = await read_form(request)
        upload = upload_of(form)
        req, fmt = speech_request(form, limits, tasks, translate)
        req.audio = await clip(form, upload)
        return await answering.respond(request, req, TranscriptionFormat(fmt))

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        return await speech(request, translate=False)

    @app.post("/v1/audio/translations")
    async def translations(request: Request):
        return await speech(request, translate=True)
