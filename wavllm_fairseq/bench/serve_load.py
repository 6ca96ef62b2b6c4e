"""Load on a ``wavllm-serve``: request bodies, blocking clients, a streaming client that times the first
token, and open-loop Poisson arrivals (each request sent at its arrival time whether or not the earlier
ones were answered, as independent users send them).
"""
import base64
import concurrent.futures
import http.client
import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np


def chat_body(audio: Optional[bytes], instruction: str, max_tokens: int, model: str = "wavllm", **extra) -> dict:
    """A greedy ``/v1/chat/completions`` request body.

    Args:
        audio (Optional[bytes]): a wav file sent as ``input_audio``, or None for a text-only question
        instruction (str): the question
        max_tokens (int): the answer's cap
        model (str): the model name
        **extra: more body fields (they win over the defaults)

    Returns:
        dict: the JSON body
    """
    content = [{"type": "text", "text": instruction}]
    if audio is not None:
        content.append({"type": "input_audio",
                        "input_audio": {"data": base64.b64encode(audio).decode(), "format": "wav"}})
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, **extra}


def post_json(url: str, body: dict, timeout: float = 120.0, headers: Optional[dict] = None) -> Tuple[int, dict]:
    """POST ``body`` as JSON.

    Args:
        url (str): where
        body (dict): the JSON body
        timeout (float): seconds
        headers (Optional[dict]): more request headers (``Authorization``)

    Returns:
        Tuple[int, dict]: the HTTP status and the JSON answer (an error's too)
    """
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def run_load(base_url: str, bodies: List[dict], concurrency: int, timeout: float = 120.0):
    """POST every body to /v1/chat/completions from ``concurrency`` threads.

    Args:
        base_url (str): the server (``http://host:port``)
        bodies (List[dict]): the request bodies
        concurrency (int): client threads
        timeout (float): seconds per request

    Returns:
        Tuple[List[Tuple[int, dict, float]], float]: (status, response, latency s) in body order, and the wall
        seconds of the whole load
    """
    def one(body):
        t = time.perf_counter()
        status, resp = post_json(base_url + "/v1/chat/completions", body, timeout)
        return status, resp, time.perf_counter() - t

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, bodies))
    return results, time.perf_counter() - t0


@dataclass
class Outcome:
    """One streamed request as its client saw it."""

    status: int  # HTTP status (0: no answer: the connection failed)
    text: str  # the answer, assembled from the stream
    tokens: int  # completion tokens (the stream's usage)
    ttft: float  # seconds from sending to the first piece of text (nan without one)
    latency: float  # seconds from sending to the end of the stream
    error: str = ""  # what went wrong, if anything


def stream_chat(base_url: str, body: dict, timeout: float = 120.0, headers: Optional[dict] = None) -> Outcome:
    """Send ``body`` with ``"stream": true`` and read its server-sent events.

    Args:
        base_url (str): the server (``http://host:port``)
        body (dict): a chat request body (streamed, usage asked for)
        timeout (float): seconds
        headers (Optional[dict]): more request headers (``Authorization``)

    Returns:
        Outcome: status, answer, completion tokens, time to first token and latency
    """
    u = urllib.parse.urlparse(base_url)
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, pieces, tokens = math.nan, [], 0
    try:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
        conn.request("POST", "/v1/chat/completions", json.dumps(body),
                     {"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        if r.status != 200:
            data = r.read()
            conn.close()
            return Outcome(r.status, "", 0, math.nan, time.perf_counter() - t0, data.decode(errors="replace")[:300])
        for line in r:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            msg = json.loads(line[6:])
            if "error" in msg:
                conn.close()
                return Outcome(200, "".join(pieces), tokens, ttft, time.perf_counter() - t0, msg["error"]["message"])
            for choice in msg.get("choices", []):
                text = choice.get("delta", {}).get("content")
                if text:
                    if not pieces:
                        ttft = time.perf_counter() - t0
                    pieces.append(text)
            tokens = (msg.get("usage") or {}).get("completion_tokens", tokens)
        conn.close()
    except OSError as e:
        return Outcome(0, "".join(pieces), tokens, ttft, time.perf_counter() - t0, f"{type(e).__name__}: {e}")
    return Outcome(200, "".join(pieces), tokens, ttft, time.perf_counter() - t0)


def poisson_offsets(n: int, rate: float, seed: int = 0) -> List[float]:
    """Arrival times of a Poisson process.

    Args:
        n (int): how many arrivals
        rate (float): arrivals per second (inf: all at once)
        seed (int): seed of the gaps

    Returns:
        List[float]: seconds from the start, increasing, the first at 0
    """
    if math.isinf(rate):
        return [0.0] * n
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, n)
    gaps[0] = 0.0
    return np.cumsum(gaps).tolist()


def open_loop(base_url: str, bodies: Sequence[dict], offsets: Sequence[float],
              timeout: float = 120.0) -> Tuple[List[Outcome], float]:
    """Stream every body, each at its offset from now, whether or not the earlier ones were answered.

    Args:
        base_url (str): the server
        bodies (Sequence[dict]): the request bodies
        offsets (Sequence[float]): when to send each, seconds from the start
        timeout (float): seconds per request

    Returns:
        Tuple[List[Outcome], float]: the outcomes in body order, and the seconds from the start to the last answer
    """
    t0 = time.perf_counter()

    def one(i: int) -> Outcome:
        delay = t0 + offsets[i] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        return stream_chat(base_url, bodies[i], timeout)

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        outcomes = list(pool.map(one, range(len(bodies))))
    return outcomes, time.perf_counter() - t0
