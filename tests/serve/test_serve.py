"""wavllm-serve through the real server on a loopback port, with a tiny random checkpoint.

Every endpoint, the streaming format, the OpenAI client, batching invariance on a stage-2 model
(per-row prompt-aware LoRA scale: concurrent greedy requests answer what each answers alone, through
the server and through the Python API), sampling with a seed, every
bad input of the issue (4xx JSON error, the server keeps serving), a client leaving mid-stream, and a
bounded load test (64 requests from 16 clients).
"""
import base64
import http.client
import json
import os
import socket
import time
import urllib.parse

import numpy as np
import pytest
import soundfile as sf

from helpers import require_installed
from wavllm_fairseq.bench.serve import (ServerProcess, chat_body, post_json, presets, run_load, tiny_checkpoint,
                                        tone_clips, wav_bytes)
from wavllm_fairseq.serve.cli import bind_notice

MAX_AUDIO_S = 5
MAX_BODY_MB = 1


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    ckpt = tiny_checkpoint(str(tmp), stage=2)
    clips = tone_clips(8, seed=3)
    paths = []
    for i, c in enumerate(clips):
        paths.append(str(tmp / f"clip{i}.wav"))
        with open(paths[-1], "wb") as f:
            f.write(c)
    # no loop guard: the random model's answers run to max_tokens (the Python API is called the same way)
    with ServerProcess(ckpt, "--max-batch", "8", "--max-wait-ms", "150", "--threads", "1", "--loop-guard-ngram", "0",
                       "--max-audio-seconds", str(MAX_AUDIO_S), "--max-body-mb", str(MAX_BODY_MB),
                       "--default-max-tokens", "12", log_path=str(tmp / "server.log")) as srv:
        yield {"url": srv.url, "ckpt": ckpt, "clips": clips, "paths": paths, "tmp": tmp, "srv": srv}


class _API:
    """The Python API on the server's checkpoint, decoding as the test server does (no loop guard)."""

    def __init__(self, ckpt):
        from wavllm_fairseq import WavLLM

        self.m = WavLLM.from_pretrained(ckpt)
        self.model = self.m.model

    def generate(self, audios, prompts, **kw):
        return self.m.generate(audios, prompts, loop_guard_ngram=0, **kw)


@pytest.fixture(scope="module")
def api(env):
    return _API(env["ckpt"])


def health(url):
    import urllib.request

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


# ---------------------------------------------------------------------------------------------- endpoints
def test_health_models_and_page(env):
    h = health(env["url"])
    assert h["status"] == "ok" and h["model"] == "wavllm" and h["max_batch"] == 8
    import urllib.request

    with urllib.request.urlopen(env["url"] + "/v1/models") as r:
        models = json.loads(r.read())
    assert [m["id"] for m in models["data"]] == ["wavllm"] and models["object"] == "list"
    with urllib.request.urlopen(env["url"] + "/") as r:
        page = r.read().decode()
    assert "<title>WavLLM</title>" in page and 'src="/static/app.js"' in page
    assert "http://" not in page and "https://" not in page  # nothing from outside the machine
    for asset in ("app.js", "style.css", "recorder-worklet.js", "presets.json"):
        with urllib.request.urlopen(env["url"] + "/static/" + asset) as r:
            text = r.read().decode()
            assert r.status == 200 and "https://" not in text
    status, body = post_json(env["url"] + "/no/such/path", {})
    assert status == 404 and body["error"]["code"] == "not_found"


def test_chat_completion_matches_python_api_and_reports_usage(env, api):
    body = chat(env["url"], env["clips"][0], "Transcribe the audio.", max_tokens=10)
    assert body["object"] == "chat.completion" and body["model"] == "wavllm"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    expected = api.generate([env["paths"][0]], ["Transcribe the audio."], max_len_b=10)[0]
    assert choice["message"]["content"] == expected and expected
    u = body["usage"]
    wav = sf.read(env["paths"][0])[0]
    speech = int(api.model.speech_frames(__import__("torch").tensor([len(wav)]))[0])
    assert u["prompt_tokens_details"]["audio_tokens"] == speech > 0
    assert u["prompt_tokens"] == u["prompt_tokens_details"]["text_tokens"] + speech
    assert 1 <= u["completion_tokens"] <= 10 and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    # max_tokens is a cap on the answer
    short = chat(env["url"], env["clips"][0], "Transcribe the audio.", max_tokens=2)
    assert short["usage"]["completion_tokens"] <= 2
    if short["usage"]["completion_tokens"] == 2:
        assert short["choices"][0]["finish_reason"] == "length"


def test_text_only_and_multi_turn(env, api):
    body = chat(env["url"], None, "Translate the audio into German.", max_tokens=8)
    assert body["usage"]["prompt_tokens_details"]["audio_tokens"] == 0
    assert answer(body) == api.generate([None], ["Translate the audio into German."], max_len_b=8)[0]
    a64 = base64.b64encode(env["clips"][1]).decode()
    turns = {"model": "wavllm", "max_tokens": 6, "messages": [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": a64, "format": "wav"}},
                                     {"type": "text", "text": "Transcribe the audio."}]},
        {"role": "assistant", "content": "the red cat"},
        {"role": "user", "content": "Translate the audio into German."}]}
    status, body = post_json(env["url"] + "/v1/chat/completions", turns)
    assert status == 200 and body["usage"]["prompt_tokens_details"]["audio_tokens"] > 0
    # spoken question: audio without text is allowed
    status, body = post_json(env["url"] + "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": a64, "format": "wav"}}]}], "max_tokens": 4})
    assert status == 200, body


def test_stream_sends_tokens_one_by_one_and_ends_with_usage_and_done(env):
    full = answer(chat(env["url"], env["clips"][2], "What emotion does the speaker express?", max_tokens=12))
    events = stream_chat(env["url"], chat_body(env["clips"][2], "What emotion does the speaker express?", 12,
                                               stream=True, stream_options={"include_usage": True}))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] >= 1
    final = chunks[-2]["choices"][0]
    assert final["finish_reason"] in ("stop", "length") and final["delta"] == {}
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks[1:-2]]
    assert "".join(pieces) == full
    # token by token: one content chunk per answer token (the tiny tokenizer's pieces are whole characters)
    assert len([p for p in pieces if p]) == usage_chunk["usage"]["completion_tokens"] >= 2


def test_openai_client(env):
    require_installed("openai")
    import openai  # optional (the test extra), checked above

    client = openai.OpenAI(base_url=env["url"] + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["wavllm"]
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "Transcribe the audio."},
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(env["clips"][3]).decode(), "format": "wav"}}]}]
    r = client.chat.completions.create(model="wavllm", messages=messages, max_tokens=8, temperature=0)
    text = r.choices[0].message.content
    assert text and r.usage.prompt_tokens_details.audio_tokens > 0
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="wavllm", messages=messages, max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == text
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=2)


def test_audio_instruct_multipart(env, api):
    status, body = multipart(env["url"], {"instruction": "Transcribe the audio.", "max_tokens": "9"},
                             {"file": ("clip.wav", env["clips"][4])})
    assert status == 200, body
    assert body["text"] == api.generate([env["paths"][4]], ["Transcribe the audio."], max_len_b=9)[0]
    assert body["usage"]["prompt_tokens_details"]["audio_tokens"] > 0
    status, raw = multipart(env["url"], {"instruction": "Transcribe the audio.", "max_tokens": "9", "stream": "true"},
                            {"file": ("clip.wav", env["clips"][4])})
    assert status == 200
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == body["text"] and chunks[-1]["usage"] == body["usage"]


def test_sampling_with_a_seed_repeats_and_without_one_runs(env):
    body = chat_body(env["clips"][6], "Transcribe the audio.", 10, temperature=0.9, top_p=0.95, seed=123)
    results, _ = run_load(env["url"], [body] * 3, concurrency=3)
    assert [s for s, _, _ in results] == [200] * 3
    assert len({answer(r) for _, r, _ in results}) == 1  # seeded samples decode alone, so they repeat
    unseeded = {k: v for k, v in body.items() if k != "seed"}
    results, _ = run_load(env["url"], [unseeded] * 3, concurrency=3)
    assert [s for s, _, _ in results] == [200] * 3 and all(answer(r) for _, r, _ in results)


# ---------------------------------------------------------------------------------------------- batching
def test_concurrent_requests_batch_and_answer_as_alone(env, api):
    """Different clip lengths, instructions, a text-only row and different max_tokens, sent at once:
    they share batches, and each greedy answer equals decoding it alone (Python API, batch of one)."""
    prompts = presets()
    bodies, alone = [], []
    for i in range(8):
        audio = None if i == 5 else env["clips"][i]
        q, n = prompts[i % len(prompts)], 6 + 2 * (i % 4)
        bodies.append(chat_body(audio, q, n))
        alone.append(api.generate([None if audio is None else env["paths"][i]], [q], max_len_b=n)[0])
    before = health(env["url"])["stats"]
    results, _ = run_load(env["url"], bodies, concurrency=8)
    after = health(env["url"])["stats"]
    assert [s for s, _, _ in results] == [200] * 8
    assert [answer(r) for _, r, _ in results] == alone
    assert after["requests"] - before["requests"] == 8
    assert after["batches"] - before["batches"] < 8 and after["largest_batch"] >= 2  # they did share batches


def test_static_compiled_decoding_server_answers_as_the_dynamic_path(env, api):
    """A server on the static path with a compiled layer step (what a GPU server runs with
    ``--compile-decode-step``): concurrent greedy requests of different lengths (rows leave the batch at
    different steps, the stage-2 LoRA scale differs per row) and a streamed one answer what the Python API
    answers alone on the dynamic path."""
    prompts = presets()
    bodies, alone = [], []
    for i in range(6):
        q, n = prompts[i % len(prompts)], 5 + 2 * (i % 3)
        bodies.append(chat_body(env["clips"][i], q, n))
        alone.append(api.generate([env["paths"][i]], [q], max_len_b=n)[0])
    with ServerProcess(env["ckpt"], "--max-batch", "6", "--max-wait-ms", "300", "--threads", "1",
                       "--loop-guard-ngram", "0", "--decode-path", "static", "--compile-decode-step",
                       log_path=str(env["tmp"] / "server_static.log")) as srv:
        results, _ = run_load(srv.url, bodies, concurrency=6)
        assert [s for s, _, _ in results] == [200] * 6
        assert [answer(r) for _, r, _ in results] == alone
        assert health(srv.url)["stats"]["largest_batch"] >= 2
        events = stream_chat(srv.url, {**bodies[1], "stream": True})
        pieces = [json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1]
                  if json.loads(e)["choices"]]
        assert "".join(pieces) == alone[1]


@pytest.mark.slow
def test_load_64_requests_16_clients_all_answered_as_sequential(env):
    """Bounded load test: 64 requests (16 distinct, each sent 4 times) from 16 concurrent clients.
    Every request is answered, none lost, each answer equals the sequential one (the throughput gain
    is measured by wavllm-bench-serve, not asserted here)."""
    prompts = presets()
    distinct = [chat_body(env["clips"][i % 8], prompts[i % len(prompts)], 8) for i in range(16)]
    sequential = [answer(post_json(env["url"] + "/v1/chat/completions", b)[1]) for b in distinct]
    bodies = [distinct[i % 16] for i in range(64)]
    before = health(env["url"])["stats"]
    t = time.time()
    results, wall = run_load(env["url"], bodies, concurrency=16, timeout=120)
    assert time.time() - t < 180
    after = health(env["url"])["stats"]
    assert len(results) == 64 and [s for s, _, _ in results] == [200] * 64
    assert [answer(r) for _, r, _ in results] == [sequential[i % 16] for i in range(64)]
    assert after["requests"] - before["requests"] == 64 and after["failed_batches"] == before["failed_batches"]
    assert after["largest_batch"] >= 4


# ---------------------------------------------------------------------------------------------- bad input
def audio_chat(url, data_b64, fmt="wav", text="Transcribe the audio."):
    body = {"model": "wavllm", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "text", "text": text}, {"type": "input_audio", "input_audio": {"data": data_b64, "format": fmt}}]}]}
    return post_json(url + "/v1/chat/completions", body)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_bad_audio_is_a_400_naming_the_field(env):
    url = env["url"]
    field = "messages[0].content[1].input_audio.data"
    err = expect_error(audio_chat(url, b64(os.urandom(3000))), 400, "audio_corrupt", [field, "not audio"])
    assert err["param"] == field
    good = env["clips"][0]
    expect_error(audio_chat(url, b64(good[: len(good) // 2])), 400, "audio_corrupt", ["truncated"])
    expect_error(audio_chat(url, ""), 400, "audio_empty", ["empty"])
    header_only = wav_bytes(np.zeros(0, dtype=np.float32))
    expect_error(audio_chat(url, b64(header_only)), 400, "audio_zero_length")
    long = wav_bytes(0.1 * np.ones(16000 * (MAX_AUDIO_S + 1), dtype=np.float32))
    expect_error(audio_chat(url, b64(long)), 400, "audio_too_long", [f"maximum of {MAX_AUDIO_S} s"])
    expect_error(audio_chat(url, "not base64!"), 400, "invalid_audio", ["base64"])
    expect_error(audio_chat(url, b64(good), fmt="webm"), 400, "invalid_audio", ["wav"])
    status, body = post_json(url + "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]})
    expect_error((status, body), 400, "invalid_value", ["image_url", "input_audio"])
    expect_error(post_json(url + "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "audio_url", "audio_url": {"url": "http://example.org/a.wav"}}]}]}), 400, "invalid_audio",
        ["data: URL"])
    assert health(url)["status"] == "ok"


def test_stereo_44k_and_silence_are_answered(env, api, tmp_path):
    rng = np.random.default_rng(0)
    t = np.arange(44100) / 44100
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 220 * t), 0.2 * rng.standard_normal(len(t))], 1).astype(np.float32)
    path = str(tmp_path / "stereo44k.flac")
    sf.write(path, stereo, 44100, format="FLAC")
    with open(path, "rb") as f:
        status, body = audio_chat(env["url"], b64(f.read()), fmt="flac")
    assert status == 200, body
    assert answer(body) == api.generate([path], ["Transcribe the audio."], max_len_b=4)[0]
    status, body = audio_chat(env["url"], b64(wav_bytes(np.zeros(8000, dtype=np.float32))))
    assert status == 200, body  # silence is valid audio (SPEC section 9)


def test_bad_requests_are_4xx_json(env):
    url = env["url"] + "/v1/chat/completions"
    u = urllib.parse.urlparse(env["url"])

    def raw_post(data: bytes, headers):
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        conn.request("POST", "/v1/chat/completions", data, headers)
        r = conn.getresponse()
        out = r.status, json.loads(r.read())
        conn.close()
        return out

    expect_error(raw_post(b'{"messages": [', {"Content-Type": "application/json"}), 400, "invalid_json")
    expect_error(raw_post(b"\xff\xfe", {"Content-Type": "application/json"}), 400, "invalid_json")
    expect_error(post_json(url, [1, 2]), 400, "invalid_json", ["JSON object"])
    expect_error(post_json(url, {"model": "wavllm"}), 400, "invalid_value", ["messages"])
    err = expect_error(post_json(url, chat_body(None, "hi", 4, model="gpt-4o")), 404, "model_not_found", ["gpt-4o"])
    assert err["param"] == "model"
    expect_error(post_json(url, chat_body(None, "", 4)), 400, "missing_instruction", ["instruction"])
    expect_error(post_json(url, chat_body(None, "   ", 4)), 400, "missing_instruction")
    expect_error(post_json(url, chat_body(None, "hi", 4, n=2)), 400, "invalid_value", ["n must be 1"])
    expect_error(post_json(url, chat_body(None, "hi", 0)), 400, "invalid_value", ["max_tokens"])
    expect_error(post_json(url, {**chat_body(None, "hi", 4), "temperature": "hot"}), 400, "invalid_value",
                 ["temperature"])
    expect_error(post_json(url, {**chat_body(None, "hi", 4), "stream": "yes"}), 400, "invalid_value", ["stream"])
    expect_error(post_json(url, {**chat_body(None, "hi", 4), "stop": ["\n"]}), 400, "unsupported_parameter", ["stop"])
    # multipart endpoint: missing instruction / file, malformed body
    expect_error(multipart(env["url"], {}, {"file": ("a.wav", env["clips"][0])}), 400, "missing_instruction")
    expect_error(multipart(env["url"], {"instruction": " "}, {"file": ("a.wav", env["clips"][0])}), 400,
                 "missing_instruction")
    expect_error(multipart(env["url"], {"instruction": "Transcribe the audio."}, {}), 400, "missing_file")
    expect_error(multipart(env["url"], {"instruction": "x", "max_tokens": "many"},
                           {"file": ("a.wav", env["clips"][0])}),
                 400, "invalid_value", ["max_tokens"])
    expect_error(multipart(env["url"], {"instruction": "x"}, {"file": ("a.wav", b"")}), 400, "audio_empty")
    assert health(env["url"])["status"] == "ok"


def test_body_over_the_limit_is_413_by_header_and_while_streaming_in(env):
    u = urllib.parse.urlparse(env["url"])
    big = json.dumps(chat_body(os.urandom(MAX_BODY_MB * 2 ** 20), "Transcribe the audio.", 4)).encode()
    expect_error(post_json(env["url"] + "/v1/chat/completions", json.loads(big)), 413, "body_too_large",
                 ["--max-body-mb"])
    # a declared size far over the limit is answered before any of the body is sent
    s = socket.create_connection((u.hostname, u.port), timeout=30)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100000000\r\n\r\n")
    reply = b""
    while not reply.endswith(b"}}"):  # headers, then the JSON error; the server closes after it
        data = s.recv(65536)
        if not data:
            break
        reply += data
    s.close()
    assert reply.startswith(b"HTTP/1.1 413") and b"body_too_large" in reply
    # chunked upload without Content-Length: cut off once the limit is passed
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    try:
        for i in range(0, len(big), 65536):
            piece = big[i: i + 65536]
            conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        conn.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed before the upload ended
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"]["code"] == "body_too_large"
    conn.close()
    assert health(env["url"])["status"] == "ok"


def test_client_leaving_mid_stream_ends_its_row_and_the_server_goes_on(env):
    before = health(env["url"])["stats"]
    body = json.dumps(chat_body(env["clips"][5], "Transcribe the audio.", 400, stream=True)).encode()
    u = urllib.parse.urlparse(env["url"])
    s = socket.create_connection((u.hostname, u.port), timeout=30)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    got = b""
    while got.count(b"data: ") < 3:  # the role chunk and two content chunks
        data = s.recv(4096)
        assert data, got
        got += data
    assert b"200 OK" in got
    s.close()
    deadline = time.time() + 30
    while health(env["url"])["stats"]["cancelled"] == before["cancelled"]:
        assert time.time() < deadline, "the row of the departed client was not cancelled"
        time.sleep(0.1)
    spent = health(env["url"])["stats"]["answer_tokens"] - before["answer_tokens"]
    assert 2 <= spent < 400  # ended early, not run to max_tokens
    assert answer(chat(env["url"], env["clips"][1], "Transcribe the audio.", max_tokens=3))  # and it still serves


@pytest.mark.slow
def test_bench_serve_reports_the_gain_and_equal_answers(capsys):
    from wavllm_fairseq.bench.serve import main

    assert main(["--requests", "8", "--concurrency", "4", "--max-tokens", "4", "--threads", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2] == "answers_equal True" and out[-1].startswith("throughput_gain ")
    assert float(out[-1].split()[1]) > 0
    assert any(line.startswith("batched ") and "requests=8" in line for line in out)


def test_bind_notice_only_off_loopback():
    assert bind_notice("127.0.0.1") is None and bind_notice("localhost") is None
    assert "0.0.0.0" in bind_notice("0.0.0.0") and "network" in bind_notice("0.0.0.0")


def test_cli_help_and_unloadable_checkpoint(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "wavllm_fairseq.serve.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--max-wait-ms" in out.stdout and "127.0.0.1" in out.stdout
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    out = subprocess.run([sys.executable, "-m", "wavllm_fairseq.serve.cli", "--checkpoint", str(bad), "--port", "0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "bad.pt" in out.stderr and "Traceback" not in out.stderr
