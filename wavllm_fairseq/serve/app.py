"""The HTTP layer: OpenAI-compatible chat completions, a multipart endpoint, health, models, the page.

    GET  /                      the web page (static/index.html; plain HTML + JS, nothing from a CDN)
    GET  /health                {"status": "ok", "model", "max_batch", "max_wait_ms", "waiting", "stats"}
    GET  /v1/models             the one served model, in OpenAI's list format
    POST /v1/chat/completions   OpenAI chat format, audio as input_audio parts (protocol.py); "stream": true
                                sends server-sent events, one chunk per decoded piece of text
    POST /v1/audio/instruct     multipart: file=@clip.wav, instruction=..., [max_tokens, temperature, top_p,
                                seed, stream]; answers {"text", "finish_reason", "usage"}

Errors are JSON ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status for bad
requests (413 for a body over ``max_body_bytes``, counted as it arrives, so a chunked upload
without Content-Length is cut off too). A client that disconnects, while waiting or mid-stream,
has its row ended at the next decoding step; the other rows of the batch go on.
"""
import asyncio
import json
import os
import time
import uuid
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Answer, BatchEngine, Job
from .protocol import APIError, ChatRequest, Limits, decode_audio, decoding_from, encode, parse_chat

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
POLL_DISCONNECT_S = 0.25  # how often a waiting non-streaming request checks that its client is still there


class BodyTooLarge(APIError):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is over the server's limit of {limit} bytes "
                              "(wavllm-serve --max-body-mb); send a shorter or compressed (flac) clip",
                         "body_too_large")


class BodyLimit:
    """ASGI middleware: refuse bodies over ``limit`` bytes, by Content-Length or while they stream in.

    A body up to ``DRAIN_FACTOR`` times the limit is read to its end (and dropped) before the 413 is
    sent, so that a client still sending gets to read the answer instead of a broken pipe; a larger
    one is answered at once and the connection closed.
    """

    DRAIN_FACTOR = 4

    def __init__(self, app, limit: int):
        self.app, self.limit = app, int(limit)

    async def _drain(self, receive, seen: int) -> bool:
        """Read the rest of the body while it stays under the drain bound; True when it all came."""
        more = True
        while more and seen <= self.DRAIN_FACTOR * self.limit:
            message = await receive()
            if message["type"] != "http.request":
                return False
            seen += len(message.get("body", b""))
            more = message.get("more_body", False)
        return not more

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            drained = int(length) <= self.DRAIN_FACTOR * self.limit and await self._drain(receive, 0)
            return await _send_json(send, BodyTooLarge(self.limit), close=not drained)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    if message.get("more_body", False):
                        await self._drain(receive, seen)
                    raise BodyTooLarge(self.limit)  # raised inside the handler's body read -> its 413 handler
            return message

        await self.app(scope, limited, send)


async def _send_json(send, err: APIError, close: bool = False) -> None:
    data = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": err.status,
                "headers": headers + ([(b"connection", b"close")] if close else [])})
    await send({"type": "http.response.body", "body": data})


def usage(a: Answer) -> dict:
    """OpenAI usage; prompt tokens count the speech positions too, as OpenAI counts audio tokens."""
    prompt = a.text_tokens + a.speech_tokens
    return {"prompt_tokens": prompt, "completion_tokens": len(a.tokens), "total_tokens": prompt + len(a.tokens),
            "prompt_tokens_details": {"text_tokens": a.text_tokens, "audio_tokens": a.speech_tokens}}


def create_app(engine: BatchEngine, limits: Limits, max_body_bytes: int = 25 * 2 ** 20) -> FastAPI:
    """The FastAPI app serving ``engine``'s model under ``limits.model_name``."""
    app = FastAPI(title="wavllm-serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    tok = engine.api.tokenizer
    system_default = engine.api.task.cfg.system_prompt
    chat_template = getattr(engine.api.task.cfg, "chat_template", "reference")
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return JSONResponse(APIError(err.status_code, str(err.detail), code).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def server_error(_request, err: Exception):
        return JSONResponse(APIError(500, f"internal error: {type(err).__name__}: {err}", "server_error").body(),
                            status_code=500)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(os.path.join(STATIC, "index.html"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": limits.model_name, "max_batch": engine.max_batch,
                "max_wait_ms": engine.max_wait * 1000, "waiting": engine.waiting(), "stats": dict(engine.stats)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": limits.model_name, "object": "model", "created": created,
                                            "owned_by": "wavllm_fairseq"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON ({e}); send the OpenAI chat format", "invalid_json")
        req = await run_in_threadpool(parse_chat, body, limits)
        return await answer(request, req, chat_format=True)

    @app.post("/v1/audio/instruct")
    async def instruct(request: Request):
        try:
            form = await request.form(max_files=1, max_fields=16)
        except APIError:
            raise
        except Exception as e:  # noqa: BLE001 - starlette raises several kinds for a malformed multipart body
            raise APIError(400, f"the body is not valid multipart/form-data ({e})", "invalid_multipart")
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise APIError(400, "no file: send the clip as a multipart file field, e.g. curl -F file=@clip.wav",
                           "missing_file", "file")
        instruction = form.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            raise APIError(400, "no instruction: add a non-empty instruction field, e.g. -F 'instruction=Transcribe "
                                "the audio.'", "missing_instruction", "instruction")
        fields = {}
        for key, kind in (("max_tokens", int), ("temperature", float), ("top_p", float), ("seed", int)):
            value = form.get(key)
            if isinstance(value, str) and value.strip():
                try:
                    fields[key] = kind(value)
                except ValueError:
                    raise APIError(400, f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}",
                                   "invalid_value", key) from None
        stream = str(form.get("stream", "false")).strip().lower() in ("1", "true", "yes")
        data = await upload.read()
        await form.close()
        max_tokens, decoding = decoding_from(fields, limits)
        audio = await run_in_threadpool(decode_audio, data, "file", limits.max_audio_seconds)
        req = ChatRequest([(instruction.strip(), None)], audio, None, max_tokens, decoding, stream, True)
        return await answer(request, req, chat_format=False)

    async def answer(request: Request, req: ChatRequest, chat_format: bool):
        n = 0 if req.audio is None else len(req.audio)
        enc = encode(tok, req.turns, req.audio, req.system or system_default, engine.speech_tokens(n), limits,
                     chat_template)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def put(kind):
            return lambda value: loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        job = engine.submit(Job(enc, req.audio, req.max_tokens, req.decoding,
                                on_token=put("token") if req.stream else None, on_done=put("done")))
        rid = ("chatcmpl-" if chat_format else "instruct-") + uuid.uuid4().hex[:24]
        if req.stream:
            return StreamingResponse(stream(job, events, rid, req, chat_format), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        result = await wait_done(request, job, events)
        if result is None:  # the client left; nobody reads this
            return JSONResponse({}, status_code=499)
        if isinstance(result, Exception):
            raise APIError(500, f"decoding failed: {type(result).__name__}: {result}", "server_error")
        if not chat_format:
            return {"id": rid, "text": result.text, "finish_reason": result.finish_reason, "usage": usage(result)}
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": limits.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": result.finish_reason}],
                "usage": usage(result)}

    async def wait_done(request: Request, job: Job, events: asyncio.Queue):
        while True:
            try:
                kind, value = await asyncio.wait_for(events.get(), POLL_DISCONNECT_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled.set()
                    return None
                continue
            if kind == "done":
                return value

    async def stream(job: Job, events: asyncio.Queue, rid: str, req: ChatRequest, chat_format: bool):
        now = int(time.time())

        def chunk(delta: dict, finish: Optional[str] = None, **extra) -> str:
            if chat_format:
                body = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": limits.model_name,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            else:
                body = {"id": rid, "text": delta.get("content", ""), "finish_reason": finish, **extra}
            return f"data: {json.dumps(body)}\n\n"

        finished = False
        try:
            if chat_format:
                yield chunk({"role": "assistant", "content": ""})
            ids, sent = [], ""
            while True:
                kind, value = await events.get()
                if kind == "token":
                    if value == tok.eos_id:
                        continue
                    ids.append(value)
                    text = tok.decode(ids)
                    # only whole characters, and never take back what was sent
                    if len(text) > len(sent) and text.startswith(sent) and not text.endswith("\ufffd"):
                        yield chunk({"content": text[len(sent):]})
                        sent = text
                    continue
                finished = True
                if isinstance(value, Exception):
                    err = APIError(500, f"decoding failed: {type(value).__name__}: {value}", "server_error")
                    yield f"data: {json.dumps(err.body())}\n\n"
                    return
                if value.text != sent and value.text.startswith(sent):
                    yield chunk({"content": value.text[len(sent):]})
                yield chunk({}, value.finish_reason, **({} if chat_format or not req.include_usage
                                                        else {"usage": usage(value)}))
                if chat_format and req.include_usage:
                    body = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": limits.model_name,
                            "choices": [], "usage": usage(value)}
                    yield f"data: {json.dumps(body)}\n\n"
                yield "data: [DONE]\n\n"
                return
        finally:
            if not finished:  # the client went away mid-stream: end its row at the next step
                job.cancelled.set()

    return app
