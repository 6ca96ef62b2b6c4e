"""A bounded load and fault run on a ``wavllm-serve`` over loopback; it stops by itself.

    python -m wavllm_fairseq.bench.serve_faults [--checkpoint C] [--requests 300] [--clients 16]
                                                [--scheduler continuous] [--max-batch 8] [--threads N]

``--clients`` threads send ``--requests`` requests between them: greedy chat requests (every other one
streamed) over a few distinct clips and instructions, whose answers must equal the ones the server gave
them one at a time before the load; every ``KILL_EVERY``-th a long streamed request whose client closes its
socket after two pieces of text; every ``MALFORMED_EVERY``-th a malformed one (bad JSON, bad base64, a
corrupt clip, another model, n=2, a cap over the context, a form without a file), which must get its 4xx.
It prints the figures: requests by kind, server errors (5xx or no answer), lost, wrong and duplicated
answers, the rows the killed clients left (cancelled by the server) and the rows still decoding or waiting
afterwards, the server's resident memory before and after (MB), and the seconds it took; one column per
``--rounds``.
"""
import argparse
import base64
import concurrent.futures
import http.client
import json
import os
import socket
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from typing import Callable, Dict, List, Tuple

from .serve_load import chat_body, post_json, stream_chat
from .serve_process import ServerProcess, presets, tiny_checkpoint, tone_clips

KILL_EVERY = 10
MALFORMED_EVERY = 7
KILL_TOKENS = 300  # a killed request's cap: it is still decoding when its client leaves


def _raw(url: str, path: str, data: bytes, content_type: str) -> int:
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    conn.request("POST", path, data, {"Content-Type": content_type})
    r = conn.getresponse()
    r.read()
    conn.close()
    return r.status


def malformed(url: str, clip: bytes) -> List[Tuple[str, Callable[[], int]]]:
    """Malformed requests, each a (name, send returning the HTTP status) pair; every one must get a 4xx.

    Args:
        url (str): the server
        clip (bytes): a good wav clip (cut or mislabelled by some of them)

    Returns:
        List[Tuple[str, Callable[[], int]]]: the requests
    """
    chat = url + "/v1/chat/completions"
    good = chat_body(clip, presets()[0], 4)
    bad_audio = json.loads(json.dumps(good))
    bad_audio["messages"][0]["content"][1]["input_audio"]["data"] = "not base64!"
    corrupt = json.loads(json.dumps(good))
    corrupt["messages"][0]["content"][1]["input_audio"]["data"] = base64.b64encode(os.urandom(2000)).decode()
    return [("invalid_json", lambda: _raw(url, "/v1/chat/completions", b'{"messages": [', "application/json")),
            ("bad_base64", lambda: post_json(chat, bad_audio)[0]),
            ("corrupt_audio", lambda: post_json(chat, corrupt)[0]),
            ("other_model", lambda: post_json(chat, {**good, "model": "gpt-4o"})[0]),
            ("n_2", lambda: post_json(chat, {**good, "n": 2})[0]),
            ("cap_over_context", lambda: post_json(chat, {**good, "max_tokens": 10 ** 6})[0]),
            ("form_without_file", lambda: _raw(url, "/v1/audio/transcriptions", b"--b--\r\n",
                                               "multipart/form-data; boundary=b"))]


def kill_mid_stream(url: str, body: dict) -> bool:
    """Stream ``body`` and close the socket after two pieces of text.

    Args:
        url (str): the server
        body (dict): a chat body (sent streamed)

    Returns:
        bool: whether the two pieces came before the close
    """
    u = urllib.parse.urlparse(url)
    data = json.dumps({**body, "stream": True}).encode()
    s = socket.create_connection((u.hostname, u.port), timeout=120)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    got = b""
    while got.count(b'"content"') < 3:  # the role chunk and two pieces of text
        piece = s.recv(4096)
        if not piece:
            break
        got += piece
    s.close()
    return got.count(b'"content"') >= 3


def rss_mb(pid: int) -> float:
    """A process's resident memory, from Linux's /proc (nan elsewhere).

    Args:
        pid (int): the process

    Returns:
        float: its resident set size in MB
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            line = next(x for x in f if x.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return float("nan")


def _health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=60) as r:
        return json.loads(r.read())


def _normal(url: str, body: dict, streamed: bool) -> Tuple[int, str, str]:
    """(status, answer, response id or "") of one greedy request."""
    if streamed:
        out = stream_chat(url, body)
        return (out.status if not out.error else 500), out.text, ""
    status, resp = post_json(url + "/v1/chat/completions", body)
    if status != 200:
        return status, "", ""
    return status, resp["choices"][0]["message"]["content"], resp["id"]


def fault_load(url: str, pid: int, bodies: List[dict], expected: List[str], kill_body: dict, requests: int = 300,
               clients: int = 16) -> Dict[str, float]:
    """The run of the module docstring against a server that answered ``bodies`` with ``expected`` alone.

    Args:
        url (str): the server
        pid (int): its process id (for its resident memory)
        bodies (List[dict]): the distinct greedy chat bodies the normal requests cycle through
        expected (List[str]): their answers, one at a time
        kill_body (dict): the body of the requests whose clients leave mid-stream
        requests (int): requests in all
        clients (int): client threads

    Returns:
        Dict[str, float]: the figures (module docstring); ``ok`` is 1 when every check passed
    """
    bad = malformed(url, tone_clips(1, seed=1)[0])
    rss_before = rss_mb(pid)
    stats0 = _health(url)["stats"]

    def one(i: int):
        if i % MALFORMED_EVERY == MALFORMED_EVERY - 1:
            return "malformed", bad[(i // MALFORMED_EVERY) % len(bad)][1](), None
        if i % KILL_EVERY == KILL_EVERY - 1:
            return "killed", 200 if kill_mid_stream(url, kill_body) else 0, None
        status, text, rid = _normal(url, bodies[i % len(bodies)], streamed=i % 2 == 0)
        return "normal", status, (text == expected[i % len(bodies)], rid)

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    deadline = time.time() + 60  # the killed rows end at their next step
    while (_health(url)["running"] or _health(url)["waiting"]) and time.time() < deadline:
        time.sleep(0.05)
    end = _health(url)
    kinds = [k for k, _, _ in results]
    normal = [(s, r) for k, s, r in results if k == "normal"]
    ids = [r[1] for s, r in normal if s == 200 and r[1]]
    f = {"requests": requests, "normal": kinds.count("normal"), "killed": kinds.count("killed"),
         "malformed": kinds.count("malformed"),
         "server_errors": sum(s >= 500 or s == 0 for _, s, _ in results),
         "malformed_not_4xx": sum(not 400 <= s < 500 for k, s, _ in results if k == "malformed"),
         "lost": sum(s != 200 for s, _ in normal), "wrong": sum(s == 200 and not r[0] for s, r in normal),
         "duplicated": len(ids) - len(set(ids)),
         "decoded": end["stats"]["requests"] - stats0["requests"],
         "cancelled": end["stats"]["cancelled"] - stats0["cancelled"],
         "running_after": end["running"], "waiting_after": end["waiting"],
         "rss_before_mb": round(rss_before, 1), "rss_after_mb": round(rss_mb(pid), 1),
         "seconds": round(wall, 1)}
    f["ok"] = int(f["server_errors"] == f["malformed_not_4xx"] == f["lost"] == f["wrong"] == f["duplicated"] == 0
                  and f["decoded"] == f["normal"] + f["killed"] and f["cancelled"] == f["killed"]
                  and f["running_after"] == f["waiting_after"] == 0)
    return f


def workload(n: int = 12, max_tokens: Tuple[int, ...] = (4, 8, 16)) -> Tuple[List[dict], dict]:
    """The distinct greedy bodies of a run (mixed caps, one text-only) and the killed clients' body.

    Args:
        n (int): distinct bodies
        max_tokens (Tuple[int, ...]): their caps, in turn

    Returns:
        Tuple[List[dict], dict]: the bodies and the kill body
    """
    clips, prompts = tone_clips(n, seed=4), presets()
    bodies = [chat_body(None if i == 3 else clips[i], prompts[i % len(prompts)], max_tokens[i % len(max_tokens)])
              for i in range(n)]
    return bodies, chat_body(clips[0], prompts[1], KILL_TOKENS)


def main(argv=None) -> int:
    """The command line (module docstring).

    Args:
        argv (Optional[List[str]]): the arguments (default: ``sys.argv[1:]``)

    Returns:
        int: 0 when every check passed
    """
    p = argparse.ArgumentParser(prog="python -m wavllm_fairseq.bench.serve_faults", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="default: a tiny random stage-2 checkpoint in a temp folder")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--scheduler", default="continuous", choices=["continuous", "batch"])
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch threads of the server")
    p.add_argument("--rounds", type=int, default=2, help="runs one after the other (memory that grows run after run "
                                                         "is a leak; the first run also warms the server up)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or tiny_checkpoint(tmp, stage=2)
        extra = ["--threads", str(args.threads)] if args.threads else []
        with ServerProcess(ckpt, "--scheduler", args.scheduler, "--max-batch", str(args.max_batch),
                           "--loop-guard-ngram", "0", *extra) as srv:
            bodies, kill_body = workload()
            expected = [post_json(srv.url + "/v1/chat/completions", b)[1]["choices"][0]["message"]["content"]
                        for b in bodies]
            rounds = [fault_load(srv.url, srv.pid, bodies, expected, kill_body, args.requests, args.clients)
                      for _ in range(args.rounds)]
    for key in rounds[0]:
        print(f"{key} " + " ".join(str(f[key]) for f in rounds))
    return 0 if all(f["ok"] for f in rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
