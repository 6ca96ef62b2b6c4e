"""wavllm-serve refusing bad input, on the shared test server (conftest.py): every bad input of the issue
gets a 4xx JSON error naming the field and the server keeps serving; odd but valid audio is answered; a
body over the limit is a 413 however it arrives; a client leaving mid-stream has its row ended.
"""
import base64
import http.client
import json
import os
import socket
import time
import urllib.parse

import numpy as np
import soundfile as sf

from serve_helpers import MAX_AUDIO_S, MAX_BODY_MB, answer, chat, expect_error, health, multipart
from wavllm_fairseq.bench.serve_load import chat_body, post_json
from wavllm_fairseq.bench.serve_process import wav_bytes


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
