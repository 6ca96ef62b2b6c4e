"""Running wavllm-serve for others: the API key (401 on every API route without it, through the OpenAI client
too), the queue limit (503 with Retry-After), the request timeout (504, and an error event mid-stream; its own
server),
/metrics in Prometheus' format with the figures moving as requests are answered, and SIGTERM under load
(stop accepting, finish what is in flight, exit 0). A tiny random stage-2 checkpoint on loopback."""
import concurrent.futures
import http.client
import json
import signal
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from helpers import require_installed
from serve_helpers import health
from wavllm_fairseq.bench.serve_load import chat_body, post_json, stream_chat
from wavllm_fairseq.bench.serve_process import ServerProcess, presets, tiny_checkpoint, tone_clips

KEY = "k-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
TIMEOUT_S = 0.3  # the tiny model wrote 875 tokens (its context's limit) in 0.99 s here: 1 s was too close


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(str(tmp_path_factory.mktemp("serve_ops")), stage=2)


@pytest.fixture(scope="module")
def srv(ckpt, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve_ops_log") / "server.log"
    with ServerProcess(ckpt, "--threads", "1", "--loop-guard-ngram", "0", "--api-key", KEY, "--max-batch", "1",
                       "--max-queue", "1", "--default-max-tokens", "8",
                       log_path=str(log)) as server:
        yield server


def call(url, body=None, headers=None):
    """(status, headers, bytes) of a GET, or of a POST of ``body`` as JSON."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def get(url, headers=None):
    return call(url, None, headers)


def test_every_api_route_needs_the_key(srv):
    require_installed("openai")
    import openai

    for path in ("/v1/models", "/v1/chat/completions", "/v1/audio/instruct", "/v1/audio/transcriptions",
                 "/v1/audio/translations", "/v1/no/such/route"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            req = urllib.request.Request(srv.url + path, data=b"{}" if path != "/v1/models" else None,
                                         headers=headers)
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(req, timeout=60)
            assert err.value.code == 401, path
            assert err.value.headers["WWW-Authenticate"] == "Bearer"
            body = json.loads(err.value.read())
            assert body["error"]["code"] == "invalid_api_key" and "--api-key" in body["error"]["message"]
    for path in ("/health", "/metrics", "/", "/static/app.js"):  # the page and the server's state stay open
        assert get(srv.url + path)[0] == 200, path
    assert get(srv.url + "/v1/models", AUTH)[0] == 200
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
    r = client.chat.completions.create(model="wavllm", max_tokens=3, temperature=0,
                                       messages=[{"role": "user", "content": presets()[0]}])
    assert r.usage.completion_tokens == 3 and r.choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_beyond_the_queue_limit_503_with_retry_after(srv):
    require_installed("openai")
    import openai

    clip = tone_clips(1, seed=2)[0]
    long_body = json.dumps(chat_body(clip, presets()[1], 900, stream=True)).encode()
    u = urllib.parse.urlparse(srv.url)
    running = socket.create_connection((u.hostname, u.port), timeout=60)  # decoding: the one batch slot
    running.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(long_body)}\r\n\r\n".encode() + long_body)
    got = b""
    while got.count(b"data: ") < 3:
        got += running.recv(4096)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    queued = pool.submit(post_json, srv.url + "/v1/chat/completions", chat_body(None, presets()[2], 2),
                         headers=AUTH)
    deadline = time.time() + 30
    while health(srv.url)["waiting"] < 1:
        assert time.time() < deadline
        time.sleep(0.02)
    status, headers, data = call(srv.url + "/v1/chat/completions", chat_body(None, presets()[3], 2), AUTH)
    assert status == 503 and int(headers["Retry-After"]) >= 1
    assert json.loads(data)["error"]["code"] == "queue_full"
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(model="wavllm", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 503 and err.value.response.headers["retry-after"]
    running.close()  # the long one leaves: the queued one decodes
    status, body = queued.result(timeout=60)
    pool.shutdown()
    assert status == 200 and body["usage"]["completion_tokens"] == 2


def test_request_timeout_is_504_and_an_error_event_mid_stream(ckpt, tmp_path):
    with ServerProcess(ckpt, "--threads", "1", "--loop-guard-ngram", "0", "--request-timeout", str(TIMEOUT_S),
                       log_path=str(tmp_path / "server.log")) as server:
        url = server.url
        t = time.time()
        status, headers, data = call(url + "/v1/chat/completions", chat_body(None, presets()[0], 900))
        assert status == 504 and TIMEOUT_S - 0.2 < time.time() - t < TIMEOUT_S + 20
        err = json.loads(data)["error"]
        assert err["code"] == "timeout" and "--request-timeout" in err["message"]
        assert headers["x-should-retry"] == "false"
        out = stream_chat(url, chat_body(None, presets()[1], 900))
        assert out.status == 200 and "--request-timeout" in out.error and out.text  # it had streamed some first
        deadline = time.time() + 30
        while health(url)["stats"]["cancelled"] < 2 or health(url)["running"]:
            assert time.time() < deadline, "the timed-out rows were not ended"
            time.sleep(0.05)
        assert post_json(url + "/v1/chat/completions", chat_body(None, "hi", 2))[0] == 200


def metrics(url):
    from prometheus_client.parser import text_string_to_metric_families

    status, headers, data = get(url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(data.decode()) for s in family.samples}


def test_metrics_count_tokens_requests_and_latencies(srv):
    require_installed("prometheus_client")
    before = metrics(srv.url)
    for name in ("wavllm_queue_depth", "wavllm_running_batch_size", "wavllm_generated_tokens_total",
                 "wavllm_time_to_first_token_seconds_count", "wavllm_request_latency_seconds_count"):
        assert (name, ()) in before, name
    status, body = post_json(srv.url + "/v1/chat/completions", chat_body(None, presets()[4], 5), headers=AUTH)
    assert status == 200
    post_json(srv.url + "/v1/chat/completions", {"messages": []}, headers=AUTH)  # a 400
    get(srv.url + "/v1/models")  # a 401
    after = metrics(srv.url)

    def grew(name, labels=()):
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    assert grew("wavllm_generated_tokens_total") == body["usage"]["completion_tokens"] == 5
    assert grew("wavllm_time_to_first_token_seconds_count") == 1 and grew("wavllm_request_latency_seconds_count") == 1
    assert grew("wavllm_requests_finished_total", (("reason", "length"),)) == 1
    chat = "/v1/chat/completions"
    assert grew("wavllm_requests_total", (("endpoint", chat), ("status", "200"))) == 1
    assert grew("wavllm_requests_total", (("endpoint", chat), ("status", "400"))) == 1
    assert grew("wavllm_requests_total", (("endpoint", "/v1/models"), ("status", "401"))) == 1
    assert after[("wavllm_queue_depth", ())] == 0 and after[("wavllm_running_batch_size", ())] == 0


def test_sigterm_under_load_finishes_in_flight_requests_and_exits_0(ckpt, tmp_path):
    clips = tone_clips(6, seed=9)
    bodies = [chat_body(c, presets()[i % 5], 120) for i, c in enumerate(clips)]
    with ServerProcess(ckpt, "--threads", "1", "--loop-guard-ngram", "0", "--max-batch", "4",
                       "--shutdown-timeout", "60", log_path=str(tmp_path / "server.log")) as server:
        expected = [post_json(server.url + "/v1/chat/completions", b)[1]["choices"][0]["message"]["content"]
                    for b in bodies]
        pool = concurrent.futures.ThreadPoolExecutor(len(bodies))
        streams = [pool.submit(stream_chat, server.url, b) for b in bodies]
        deadline = time.time() + 30
        while health(server.url)["running"] < 4:  # four decoding, two waiting
            assert time.time() < deadline
            time.sleep(0.02)
        server.proc.send_signal(signal.SIGTERM)
        u = urllib.parse.urlparse(server.url)
        refused = threading.Event()
        deadline = time.time() + 10
        while not refused.is_set() and time.time() < deadline:  # no new connections once it stops accepting
            try:
                conn = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
                conn.request("GET", "/health")
                conn.getresponse().read()
                conn.close()
                time.sleep(0.05)
            except ConnectionRefusedError:
                refused.set()
        outcomes = [s.result(timeout=120) for s in streams]
        pool.shutdown()
        assert refused.is_set()
        assert [(o.status, o.error) for o in outcomes] == [(200, "")] * len(bodies)
        assert [o.text for o in outcomes] == expected and all(o.tokens == 120 for o in outcomes)
        assert server.proc.wait(timeout=60) == 0
        assert "Traceback" not in server.log()
