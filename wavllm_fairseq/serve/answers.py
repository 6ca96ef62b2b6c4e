"""From a checked request to its HTTP answer: encode it, submit it to the engine, wait for the answer or
stream it, in the endpoint's format (formats.py).

A request the engine refuses is a 503 with ``Retry-After`` (queue full) or a 503 while the server shuts
down; a request still unanswered ``request_timeout`` seconds after it arrived is ended and answered 504
(``timeout``, with ``x-should-retry: false`` so the OpenAI clients do not send it again) or, mid-stream,
one error event. A client that disconnects, while waiting or mid-stream, has its row ended at the next
decoding step; the other rows of the batch go on.
"""
import asyncio
import time
import uuid
from typing import Optional

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from .engine import Engine, EngineBusy, Job
from .formats import event
from .protocol import APIError, ChatRequest, Limits, encode

POLL_DISCONNECT_S = 0.25  # how often a waiting non-streaming request checks that its client is still there
TIMED_OUT = "timed out"


class Answering:
    """Answers checked requests through an engine.

    Args:
        engine (Engine): decodes
        limits (Limits): the server's limits
        request_timeout (Optional[float]): seconds from arrival to answer before a request is ended (None: none)
    """

    def __init__(self, engine: Engine, limits: Limits, request_timeout: Optional[float] = None):
        self.engine, self.limits = engine, limits
        self.timeout = request_timeout if request_timeout and request_timeout > 0 else None
        self.tok = engine.api.tokenizer
        self.system_default = engine.api.task.cfg.system_prompt
        self.chat_template = getattr(engine.api.task.cfg, "chat_template", "reference")

    def timeout_error(self) -> APIError:
        """Returns: APIError: the 504 of a request over ``request_timeout``."""
        return APIError(504, f"the request was not answered within the server's limit of {self.timeout:g} s "
                             "(wavllm-serve --request-timeout); ask for fewer max_tokens or retry later", "timeout",
                        headers={"x-should-retry": "false"})

    def _submit(self, job: Job) -> Job:
        try:
            return self.engine.submit(job)
        except EngineBusy as e:
            headers = {"Retry-After": str(e.retry_after)} if e.retry_after else {"Connection": "close"}
            raise APIError(503, str(e), e.reason, headers=headers) from None

    async def respond(self, request: Request, req: ChatRequest, fmt):
        """Answer ``req`` in ``fmt``'s shapes.

        Args:
            request (Request): the HTTP request (to see its client leave)
            req (ChatRequest): the checked request
            fmt: a format of formats.py (ChatFormat, InstructFormat, TranscriptionFormat)

        Returns:
            the response: a JSON body, a StreamingResponse, or the format's own response
        """
        n = 0 if req.audio is None else len(req.audio)
        enc = encode(self.tok, req.turns, req.audio, req.system or self.system_default, self.engine.speech_tokens(n),
                     self.limits, self.chat_template)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def put(kind):
            return lambda value: loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        job = self._submit(Job(enc, req.audio, req.max_tokens, req.decoding,
                               on_token=put("token") if req.stream else None, on_done=put("done")))
        deadline = None if self.timeout is None else job.arrival + self.timeout
        rid = fmt.prefix + uuid.uuid4().hex[:24]
        if req.stream:
            return StreamingResponse(self._stream(job, events, rid, fmt, deadline), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        result = await self._wait(request, job, events, deadline)
        if result is None:  # the client left; nobody reads this
            return JSONResponse({}, status_code=499)
        if result is TIMED_OUT:
            raise self.timeout_error()
        if isinstance(result, Exception):
            raise APIError(500, f"decoding failed: {type(result).__name__}: {result}", "server_error")
        return fmt.body(rid, result)

    async def _next(self, events: asyncio.Queue, deadline: Optional[float], poll: Optional[float] = None):
        """The next (kind, value) event, or None when ``poll`` seconds pass or the deadline does."""
        wait = poll
        if deadline is not None:
            left = max(0.0, deadline - time.monotonic())
            wait = left if wait is None else min(wait, left)
        try:
            return await asyncio.wait_for(events.get(), wait)
        except asyncio.TimeoutError:
            return None

    async def _wait(self, request: Request, job: Job, events: asyncio.Queue, deadline: Optional[float]):
        """The answer (or the exception that failed it); None if the client left; TIMED_OUT past the deadline."""
        while True:
            got = await self._next(events, deadline, POLL_DISCONNECT_S)
            if got is not None:
                kind, value = got
                if kind == "done":
                    return value
                continue
            if deadline is not None and time.monotonic() >= deadline:
                job.cancelled.set()
                return TIMED_OUT
            if await request.is_disconnected():
                job.cancelled.set()
                return None

    async def _stream(self, job: Job, events: asyncio.Queue, rid: str, fmt, deadline: Optional[float]):
        finished = False
        try:
            for e in fmt.opening(rid):
                yield e
            ids, sent = [], ""
            while True:
                got = await self._next(events, deadline)
                if got is None:  # past the deadline
                    yield event(self.timeout_error().body())
                    return
                kind, value = got
                if kind == "token":
                    if value == self.tok.eos_id:
                        continue
                    ids.append(value)
                    text = self.tok.decode(ids)
                    # only whole characters, and never take back what was sent
                    if len(text) > len(sent) and text.startswith(sent) and not text.endswith("\ufffd"):
                        yield fmt.delta(rid, text[len(sent):])
                        sent = text
                    continue
                finished = True
                if isinstance(value, Exception):
                    yield event(APIError(500, f"decoding failed: {type(value).__name__}: {value}",
                                         "server_error").body())
                    return
                if value.text != sent and value.text.startswith(sent):
                    yield fmt.delta(rid, value.text[len(sent):])
                for e in fmt.closing(rid, value):
                    yield e
                return
        finally:
            if not finished:  # the client went away mid-stream, or its time ran out: end its row at the next step
                job.cancelled.set()
