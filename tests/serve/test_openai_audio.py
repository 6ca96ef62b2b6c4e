"""OpenAI's /v1/audio/transcriptions and /v1/audio/translations through the official ``openai`` client, on a
tiny random stage-2 checkpoint: the answer is the task's instruction's (what the Python API answers to it),
json and text formats, a streamed transcription, and every field the server does not take refused with a
400 (or 404 for another model) naming it."""
import json
import urllib.error
import urllib.request

import pytest

from helpers import require_installed
from wavllm_fairseq import WavLLM
from wavllm_fairseq.bench.serve_process import ServerProcess, tiny_checkpoint, tone_clips

MAX_TOKENS = 10
TRANSCRIBE, TRANSLATE = "Transcribe the audio.", "Translate the audio into German."


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("openai_audio")
    ckpt = tiny_checkpoint(str(tmp), stage=2)
    paths = []
    for i, clip in enumerate(tone_clips(3, seed=11)):
        paths.append(str(tmp / f"clip{i}.wav"))
        with open(paths[-1], "wb") as f:
            f.write(clip)
    with ServerProcess(ckpt, "--threads", "1", "--loop-guard-ngram", "0", "--default-max-tokens", str(MAX_TOKENS),
                       log_path=str(tmp / "server.log")) as srv:
        yield {"url": srv.url, "ckpt": ckpt, "paths": paths}


@pytest.fixture(scope="module")
def alone(env):
    api = WavLLM.from_pretrained(env["ckpt"])
    return lambda path, instruction: api.generate([path], [instruction], max_len_b=MAX_TOKENS, loop_guard_ngram=0)[0]


@pytest.fixture(scope="module")
def client(env):
    require_installed("openai")
    import openai

    return openai.OpenAI(base_url=env["url"] + "/v1", api_key="unused", max_retries=0)


def test_transcription_and_translation_answer_the_task_instruction(env, alone, client):
    with open(env["paths"][0], "rb") as f:
        t = client.audio.transcriptions.create(model="wavllm", file=f, language="en", temperature=0)
    assert t.text == alone(env["paths"][0], TRANSCRIBE) and t.text
    assert t.usage.type == "tokens" and t.usage.output_tokens == MAX_TOKENS
    assert t.usage.input_token_details.audio_tokens > 0
    with open(env["paths"][1], "rb") as f:
        tr = client.audio.translations.create(model="wavllm", file=f)
    assert tr.text == alone(env["paths"][1], TRANSLATE)
    with open(env["paths"][1], "rb") as f:
        text = client.audio.translations.create(model="wavllm", file=f, response_format="text")
    assert text == tr.text  # the text format is the text itself
    with open(env["paths"][0], "rb") as f:
        text = client.audio.transcriptions.create(model="wavllm", file=f, response_format="text")
    assert text == t.text


def test_streamed_transcription_events(env, alone, client):
    with open(env["paths"][2], "rb") as f:
        events = list(client.audio.transcriptions.create(model="wavllm", file=f, stream=True))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    done = [e for e in events if e.type == "transcript.text.done"]
    assert len(done) == 1 and events[-1] is done[0] and len(deltas) >= 2
    assert "".join(deltas) == done[0].text == alone(env["paths"][2], TRANSCRIBE)
    assert done[0].usage.output_tokens == MAX_TOKENS


@pytest.mark.parametrize("fields, status, code, param", [
    ({"prompt": "Earlier, the speaker said"}, 400, "unsupported_parameter", "prompt"),
    ({"response_format": "srt"}, 400, "unsupported_value", "response_format"),
    ({"response_format": "verbose_json"}, 400, "unsupported_value", "response_format"),
    ({"language": "de"}, 400, "unsupported_language", "language"),
    ({"temperature": 1.5}, 400, "invalid_value", "temperature"),
    ({"temperature": "hot"}, 400, "invalid_value", "temperature"),
    ({"timestamp_granularities": ["word"]}, 400, "unsupported_parameter", "timestamp_granularities[]"),
    ({"model": "whisper-1"}, 404, "model_not_found", "model"),
])
def test_fields_the_server_does_not_take_are_refused(env, client, fields, status, code, param):
    import openai  # the test extra's; the client fixture checked it is installed

    body = {"model": "wavllm", **fields}
    with pytest.raises(openai.APIStatusError) as err, open(env["paths"][0], "rb") as f:
        client.audio.transcriptions.create(file=f, **body)
    assert err.value.status_code == status
    error = err.value.body
    assert error["code"] == code and error["param"] == param, error


def test_translation_does_not_stream_and_a_file_is_needed(env, client):
    import openai

    with pytest.raises(openai.BadRequestError) as err, open(env["paths"][0], "rb") as f:
        client.audio.translations.create(model="wavllm", file=f, extra_body={"stream": "true"})
    assert err.value.body["param"] == "stream"
    raw = client.with_raw_response.audio.transcriptions  # the raw answer of a form without a file
    with pytest.raises(openai.BadRequestError) as err:
        raw.create(model="wavllm", file=("x.wav", b""))
    assert err.value.body["code"] == "audio_empty"
    status, body = _post_form(env["url"] + "/v1/audio/transcriptions", {"model": "wavllm"})
    assert status == 400 and body["error"]["code"] == "missing_file"


def _post_form(url, fields):
    boundary = "b0undary"
    data = "".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                   for k, v in fields.items()) + f"--{boundary}--\r\n"
    req = urllib.request.Request(url, data=data.encode(),
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
