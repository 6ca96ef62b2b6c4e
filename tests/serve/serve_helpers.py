"""What the tests of the served endpoints share: the test server's limits and small HTTP helpers."""
import http.client
import json
import urllib.parse
import urllib.request

from wavllm_fairseq.bench.serve_load import chat_body, post_json

MAX_AUDIO_S = 5
MAX_BODY_MB = 1


def health(url):
    with urllib.request.urlopen(url + "/health") as r:
        return json.loads(r.read())


def chat(url, audio, instruction, max_tokens=12, **extra):
    status, body = post_json(url + "/v1/chat/completions", chat_body(audio, instruction, max_tokens, **extra))
    assert status == 200, body
    return body


def answer(body):
    return body["choices"][0]["message"]["content"]


def expect_error(status_body, status, code, mentions=()):
    got_status, body = status_body
    assert got_status == status, body
    err = body["error"]
    assert err["code"] == code and err["type"] == "invalid_request_error", err
    for word in mentions:
        assert word in err["message"], err["message"]
    return err


def multipart(url, fields, files, path="/v1/audio/instruct"):
    boundary = "wavllmtestboundary"
    parts = []
    for k, v in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    for k, (name, data) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{name}"\r\n'
                     f"Content-Type: audio/wav\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", path, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, (json.loads(data) if r.getheader("content-type", "").startswith("application/json") else data)


def sse_events(raw: bytes):
    events = [e for e in raw.decode().split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events), raw[:300]
    return [e[len("data: "):] for e in events]


def stream_chat(url, body):
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
    raw = r.read()
    conn.close()
    return sse_events(raw)
