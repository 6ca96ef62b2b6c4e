"""wavllm-serve through the real server on a loopback port, with a tiny random checkpoint (conftest.py).

Every endpoint, the streaming format, the OpenAI client, batching invariance on a stage-2 model
(per-row prompt-aware LoRA scale: concurrent greedy requests answer what each answers alone, through
the server and through the Python API), sampling with a seed, a bounded load test (64 requests from 16
clients), the benchmark's report and the command line. Bad input: test_serve_input.py.
"""
import base64
import json
import time

import pytest
import soundfile as sf

from helpers import require_installed
from serve_helpers import answer, chat, health, multipart, sse_events, stream_chat
from wavllm_fairseq.bench.serve_load import chat_body, post_json, run_load
from wavllm_fairseq.bench.serve_process import ServerProcess, presets
from wavllm_fairseq.serve.cli import bind_notice


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


@pytest.mark.slow
def test_bench_serve_reports_the_gain_and_equal_answers(capsys):
    from wavllm_fairseq.bench.serve import main

    assert main(["--requests", "8", "--rates", "20,inf", "--max-tokens", "2,6", "--threads", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-3] == "answers_equal True" and out[-1].startswith("throughput_gain ")
    assert float(out[-1].split()[1]) > 0 and out[-2].split()[0] == "p99_lower_at_every_rate"
    for scheduler in ("batch", "continuous"):
        assert sum(line.split()[1:2] == [scheduler] and "requests=8" in line for line in out) == 2


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
