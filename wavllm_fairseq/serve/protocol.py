"""Requests in, jobs out: the OpenAI chat format (with ``input_audio`` parts), checked field by field.

A chat request becomes one :class:`~.engine.Job`::

    {"model": "wavllm",                       # optional; any other name -> 404 model_not_found
     "messages": [                            # optional system message replaces the template's system prompt
       {"role": "user", "content": [
          {"type": "text", "text": "What is the speaker's emotion?"},
          {"type": "input_audio", "input_audio": {"data": "<base64 wav/flac/ogg/mp3>", "format": "wav"}}]}],
     "temperature": 0, "top_p": 1, "max_tokens": 200, "n": 1, "seed": null,
     "stream": false, "stream_options": {"include_usage": true}}

Earlier user/assistant turns become the template's earlier turns (LLaMA-2 chat); the audio belongs to
the first user message (the template has one speech span, in turn 1). A user message may hold
text, audio or both: audio with no text is a spoken question. ``temperature`` 0 or absent is greedy
(the paper's decoding; OpenAI's default of 1 would sample). ``audio_url`` parts are accepted as
``data:`` URLs only: the server fetches nothing. Parameters it does not implement (``stop``, tools,
``logprobs``, penalties; see ``UNSUPPORTED``) are refused when set rather than ignored.

Every problem raises :class:`APIError` with an HTTP status, an OpenAI-style ``code`` and a message
that names the field (``messages[0].content[1].input_audio.data``) and says what to do.
"""
import base64
import binascii
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..data.audio import load_audio
from ..data.chat_template import prompt_encoder
from ..errors import AudioError
from .engine import Decoding

AUDIO_FORMATS = ("wav", "flac", "ogg", "mp3", "aiff")


class APIError(Exception):
    """A request the server refuses: HTTP ``status``, machine-readable ``code``, the offending ``param``, and
    response ``headers`` (``Retry-After`` on a 503)."""

    def __init__(self, status: int, message: str, code: str, param: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = dict(headers or {})

    def body(self) -> dict:
        """Returns: dict: OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``."""
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    """Server-wide limits a request is checked against."""

    model_name: str = "wavllm"
    max_audio_seconds: float = 60.0
    default_max_tokens: int = 200
    context_length: int = 4096


@dataclass
class ChatRequest:
    """A checked request, whichever endpoint it came to: the template's turns, the clip and the settings."""

    turns: List[Tuple[str, Optional[str]]]  # [(instruction, answer)], the last answer None
    audio: Optional[np.ndarray]
    system: Optional[str]
    max_tokens: int
    decoding: Decoding
    stream: bool
    include_usage: bool


# ---------------------------------------------------------------------------------------------- audio
def decode_audio(data: bytes, where: str, max_seconds: Optional[float]) -> np.ndarray:
    """Uploaded bytes -> (T,) float32 16 kHz mono; any rate and channel count is resampled and mixed.

    Reuses audio.load_audio's checks (empty, truncated, corrupt, unsupported, too long) through a
    temporary file, with ``where`` (the request field) in place of the file name. Silence is answered
    (load_audio only warns).

    Args:
        data (bytes): the uploaded file
        where (str): the request field it came in (named in errors)
        max_seconds (Optional[float]): longer clips are refused

    Returns:
        np.ndarray: the waveform with shape (T,)
    """
    if not data:
        raise APIError(400, f"{where}: the audio is empty (0 bytes); send a wav/flac/ogg/mp3 file", "audio_empty",
                       where)
    fd, path = tempfile.mkstemp(prefix="wavllm-upload-", suffix=".audio")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            return load_audio(path, max_seconds=max_seconds)
        except AudioError as e:
            message = str(e).replace(f"audio {path}: ", "").replace(path, "the audio")
            hint = "" if e.reason == "too_long" else f" (formats: {', '.join(AUDIO_FORMATS)})"
            raise APIError(400, f"{where}: {message}{hint}", f"audio_{e.reason}", where) from None
    finally:
        os.unlink(path)


def _b64(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise APIError(400, f"{where} must be a base64 string of the audio file", "invalid_audio", where)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{where} is not valid base64 (standard alphabet, no data: prefix)", "invalid_audio",
                       where) from None


def _audio_part(part: dict, where: str, limits: Limits) -> np.ndarray:
    if part["type"] == "input_audio":
        spec = part.get("input_audio")
        if not isinstance(spec, dict):
            raise APIError(400, f"{where}.input_audio must be an object {{\"data\": base64, \"format\": \"wav\"}}",
                           "invalid_audio", f"{where}.input_audio")
        fmt = spec.get("format")
        if fmt is not None and (not isinstance(fmt, str) or fmt.lower() not in AUDIO_FORMATS):
            raise APIError(400, f"{where}.input_audio.format {fmt!r} is not supported; use one of "
                                f"{', '.join(AUDIO_FORMATS)}", "invalid_audio", f"{where}.input_audio.format")
        return decode_audio(_b64(spec.get("data"), f"{where}.input_audio.data"), f"{where}.input_audio.data",
                            limits.max_audio_seconds)
    url = part.get("audio_url")
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        raise APIError(400, f"{where}.audio_url must be a data: URL (data:audio/wav;base64,...); this server "
                            "fetches nothing", "invalid_audio", f"{where}.audio_url")
    return decode_audio(_b64(url.split(";base64,", 1)[1], f"{where}.audio_url"), f"{where}.audio_url",
                        limits.max_audio_seconds)


# ---------------------------------------------------------------------------------------------- numbers
def _number(body: dict, key: str, default, lo: float, hi: float, integer: bool = False):
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or not (lo <= value <= hi):
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"{key} must be {kind} in [{lo:g}, {hi:g}], got {value!r}", "invalid_value", key)
    return value


# OpenAI parameters this server does not implement: refused when set, never silently ignored
UNSUPPORTED = ("stop", "tools", "tool_choice", "functions", "response_format", "logprobs", "top_logprobs", "logit_bias",
               "presence_penalty", "frequency_penalty")


def decoding_from(body: dict, limits: Limits) -> Tuple[int, Decoding]:
    """``max_tokens`` (or ``max_completion_tokens``) and the decoding settings of a request body.

    Args:
        body (dict): the request's fields (JSON, or a form's converted to numbers)
        limits (Limits): the server's limits (the default and largest ``max_tokens``)

    Returns:
        Tuple[int, Decoding]: the answer's cap and the decoding settings
    """
    for key in UNSUPPORTED:
        if body.get(key) not in (None, False, 0, [], {}):
            raise APIError(400, f"{key} is not supported by this server (it takes temperature, top_p, max_tokens, "
                                "seed, n=1, stream); leave it out", "unsupported_parameter", key)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, limits.default_max_tokens, 1, limits.context_length, integer=True)
    temperature = float(_number(body, "temperature", 0.0, 0.0, 2.0))
    top_p = float(_number(body, "top_p", 1.0, 0.0, 1.0))
    if top_p == 0:
        raise APIError(400, "top_p must be > 0 (use temperature 0 for greedy decoding)", "invalid_value", "top_p")
    seed = _number(body, "seed", None, -2 ** 63, 2 ** 63 - 1, integer=True)
    if body.get("n") not in (None, 1):
        raise APIError(400, f"n must be 1 (one answer per request), got {body.get('n')!r}", "invalid_value", "n")
    return int(max_tokens), Decoding(temperature=temperature, top_p=top_p, seed=seed)


# ---------------------------------------------------------------------------------------------- chat
def _content(msg: dict, i: int, limits: Limits, audio_allowed: bool) -> Tuple[str, Optional[np.ndarray]]:
    where = f"messages[{i}].content"
    content = msg.get("content")
    if content is None:
        return "", None
    if isinstance(content, str):
        return content, None
    if not isinstance(content, list):
        raise APIError(400, f"{where} must be a string or a list of content parts", "invalid_value", where)
    texts, audio = [], None
    for k, part in enumerate(content):
        pw = f"{where}[{k}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise APIError(400, f"{pw} must be an object with a \"type\"", "invalid_value", pw)
        if part["type"] == "text":
            if not isinstance(part.get("text"), str):
                raise APIError(400, f"{pw}.text must be a string", "invalid_value", f"{pw}.text")
            texts.append(part["text"])
        elif part["type"] in ("input_audio", "audio_url"):
            if not audio_allowed:
                raise APIError(400, f"{pw}: audio is only taken in the first user message (the template has one "
                                    "speech span)", "invalid_value", pw)
            if audio is not None:
                raise APIError(400, f"{pw}: a second audio part; send one clip per request", "invalid_value", pw)
            audio = _audio_part(part, pw, limits)
        else:
            raise APIError(400, f"{pw} has type {part['type']!r}; this model takes \"text\" and \"input_audio\" "
                                "parts", "invalid_value", f"{pw}.type")
    return " ".join(t.strip() for t in texts if t.strip()), audio


def parse_chat(body: Any, limits: Limits) -> ChatRequest:
    """Check a ``/v1/chat/completions`` body and turn it into template turns + audio + settings.

    Args:
        body (Any): the parsed JSON body
        limits (Limits): the server's limits

    Returns:
        ChatRequest: the checked request
    """
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", "invalid_json")
    model = body.get("model")
    if model is not None and model != limits.model_name:
        raise APIError(404, f"model {model!r} is not served here; this server serves {limits.model_name!r} "
                            "(GET /v1/models)", "model_not_found", "model")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "messages must be a non-empty list of {\"role\", \"content\"} objects", "invalid_value",
                       "messages")
    system, turns, audio, question = None, [], None, None
    seen_user = False
    for i, msg in enumerate(msgs):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "developer", "user", "assistant"):
            raise APIError(400, f"messages[{i}] must be an object whose role is system, user or assistant",
                           "invalid_value", f"messages[{i}].role")
        role = msg["role"]
        text, clip = _content(msg, i, limits, audio_allowed=role == "user" and not seen_user)
        if role in ("system", "developer"):
            if turns or question is not None:
                raise APIError(400, f"messages[{i}]: a system message must come first", "invalid_value",
                               f"messages[{i}]")
            system = text or None
        elif role == "user":
            if question is not None:
                raise APIError(400, f"messages[{i}]: two user messages in a row; alternate user and assistant",
                               "invalid_value", f"messages[{i}]")
            if clip is not None:
                audio = clip
            if not text and clip is None:
                raise APIError(400, f"messages[{i}] has no instruction: give a text part (or, for a spoken "
                                    "question, an audio part)", "missing_instruction", f"messages[{i}].content")
            question, seen_user = text, True
        else:
            if question is None:
                raise APIError(400, f"messages[{i}]: an assistant message must answer a user message",
                               "invalid_value", f"messages[{i}]")
            turns.append((question, text))
            question = None
    if question is None:
        raise APIError(400, "the last message must be the user's question", "invalid_value",
                       f"messages[{len(msgs) - 1}]")
    turns.append((question, None))
    max_tokens, decoding = decoding_from(body, limits)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, f"stream must be true or false, got {stream!r}", "invalid_value", "stream")
    options = body.get("stream_options") or {}
    include_usage = bool(options.get("include_usage")) if isinstance(options, dict) else False
    return ChatRequest(turns, audio, system, max_tokens, decoding, stream, include_usage)


def encode(tokenizer, turns, audio: Optional[np.ndarray], system: str, speech_tokens: int, limits: Limits,
           chat_template: str = "reference"):
    """The template's token ids (``task.chat_template``, as the Python API encodes them); refuses a prompt
    that leaves no room for an answer in the LLM context.

    Args:
        tokenizer: the model's tokenizer
        turns (List[Tuple[str, Optional[str]]]): the conversation, the last answer None
        audio (Optional[np.ndarray]): the clip (T,), or None
        system (str): the system prompt
        speech_tokens (int): the LLM positions the clip takes
        limits (Limits): the server's limits (its context length)
        chat_template (str): the task's chat template name

    Returns:
        EncodedPrompt: the prompt's ``pre`` and ``post`` token ids
    """
    enc = prompt_encoder(chat_template)(tokenizer, turns, with_speech=audio is not None, system=system)
    used = len(enc.pre) + len(enc.post) + speech_tokens
    if used >= limits.context_length:
        raise APIError(400, f"the prompt takes {used} positions ({speech_tokens} of them speech) of the model's "
                            f"{limits.context_length}; shorten the audio or the conversation",
                       "context_length_exceeded", "messages")
    return enc

