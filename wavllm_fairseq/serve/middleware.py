"""ASGI middleware of the server: the body-size limit, the API key, the status counts of ``/metrics``.

    BodyLimit     413 for a body over the limit, by Content-Length or while it streams in (a chunked upload)
    ApiKey        401 on every path under /v1/ without ``Authorization: Bearer <key>``; the page, its files,
                  /health and /metrics stay open (as vLLM's --api-key leaves them)
    StatusCounts  counts every response by path and status (metrics.py)
"""
import hmac
import json

from .protocol import APIError


class BodyTooLarge(APIError):
    """A body over the server's limit (413)."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is over the server's limit of {limit} bytes "
                              "(wavllm-serve --max-body-mb); send a shorter or compressed (flac) clip",
                         "body_too_large")


async def send_json(send, err: APIError, close: bool = False) -> None:
    """Send ``err`` as a whole JSON response from ASGI middleware.

    Args:
        send: the ASGI send callable
        err (APIError): the error (its status, body and headers)
        close (bool): ask the client to close the connection
    """
    data = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    headers += [(k.lower().encode(), str(v).encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status,
                "headers": headers + ([(b"connection", b"close")] if close else [])})
    await send({"type": "http.response.body", "body": data})


class BodyLimit:
    """ASGI middleware: refuse bodies over ``limit`` bytes, by Content-Length or while they stream in.

    A body up to ``DRAIN_FACTOR`` times the limit is read to its end (and dropped) before the 413 is
    sent, so that a client still sending gets to read the answer instead of a broken pipe; a larger
    one is answered at once and the connection closed.

    Args:
        app: the ASGI app it wraps
        limit (int): the most bytes a body may have
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
            return await send_json(send, BodyTooLarge(self.limit), close=not drained)
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


class ApiKey:
    """ASGI middleware: paths under ``/v1/`` need ``Authorization: Bearer <key>``, else 401 in OpenAI's shape.

    Args:
        app: the ASGI app it wraps
        key (str): the key
    """

    PROTECTED = "/v1/"

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(self.PROTECTED):
            return await self.app(scope, receive, send)
        scheme, _, token = dict(scope.get("headers") or []).get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        given = "an incorrect API key" if token.strip() else "no API key"
        err = APIError(401, f"{given} was given: send the server's key (wavllm-serve --api-key or WAVLLM_API_KEY) "
                            "as 'Authorization: Bearer <key>' (the OpenAI clients' api_key)", "invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
        await send_json(send, err)


class StatusCounts:
    """ASGI middleware: count every HTTP response by path and status.

    Args:
        app: the ASGI app it wraps
        metrics (ServeMetrics): counts them (``request(path, status)``)
    """

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.request(scope["path"], message["status"])
            await send(message)

        await self.app(scope, receive, counted)
