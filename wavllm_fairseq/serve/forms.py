"""The multipart endpoints' forms -> checked requests: ``/v1/audio/instruct`` (ours) and OpenAI's
``/v1/audio/transcriptions`` and ``/v1/audio/translations``.

    /v1/audio/instruct        file, instruction, [max_tokens, temperature, top_p, seed, stream]
    /v1/audio/transcriptions  file, [model, language, prompt, response_format, temperature, stream]
    /v1/audio/translations    file, [model, language, prompt, response_format, temperature]

The transcription and translation endpoints ask the model the task's instruction (:class:`AudioTasks`:
``wavllm-serve --transcription-instruction`` / ``--translation-instruction``; WavLLM's speech translation
goes into German, where OpenAI's translations endpoint goes into English). ``language`` is the language
spoken in the clip and must be the model's (``--source-language``, en); ``prompt`` is refused when set
(WavLLM has no text prompt besides the instruction); ``response_format`` json (``{"text", "usage"}``) or
text, the others (verbose_json, srt, vtt: timestamps) are refused; ``temperature`` 0 or absent is greedy
(OpenAI's 0 means a temperature fallback; ours does not fall back). Any other field is refused, never
ignored.
"""
from dataclasses import dataclass
from typing import Tuple

from starlette.datastructures import FormData, UploadFile

from .protocol import APIError, ChatRequest, Limits, decoding_from

RESPONSE_FORMATS = ("json", "text")
TRANSCRIPTION_FIELDS = ("file", "model", "language", "prompt", "response_format", "temperature", "stream")


@dataclass
class AudioTasks:
    """What the transcription and translation endpoints ask the model, and the language it hears.

    Args:
        transcription (str): the instruction of ``/v1/audio/transcriptions``
        translation (str): the instruction of ``/v1/audio/translations`` (its target language is the model's)
        language (str): the language spoken in the clips the model takes (ISO-639-1)
    """

    transcription: str = "Transcribe the audio."
    translation: str = "Translate the audio into German."
    language: str = "en"


async def read_form(request, max_fields: int = 16) -> FormData:
    """A multipart body with at most one file.

    Args:
        request (starlette.requests.Request): the request
        max_fields (int): most fields taken

    Returns:
        FormData: the form (close it once its file is read)
    """
    try:
        return await request.form(max_files=1, max_fields=max_fields)
    except APIError:
        raise
    except Exception as e:  # noqa: BLE001 - starlette raises several kinds for a malformed multipart body
        raise APIError(400, f"the body is not valid multipart/form-data ({e})", "invalid_multipart") from None


def upload_of(form: FormData) -> UploadFile:
    """The form's ``file``.

    Args:
        form (FormData): the form

    Returns:
        UploadFile: the uploaded clip (400 missing_file without one)
    """
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise APIError(400, "no file: send the clip as a multipart file field, e.g. curl -F file=@clip.wav",
                       "missing_file", "file")
    return upload


def _numbers(form: FormData, kinds) -> dict:
    fields = {}
    for key, kind in kinds:
        value = form.get(key)
        if isinstance(value, str) and value.strip():
            try:
                fields[key] = kind(value)
            except ValueError:
                raise APIError(400, f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}",
                               "invalid_value", key) from None
    return fields


def _flag(form: FormData, key: str) -> bool:
    return str(form.get(key, "false")).strip().lower() in ("1", "true", "yes")


def instruct_request(form: FormData, limits: Limits) -> ChatRequest:
    """A ``/v1/audio/instruct`` form's fields, checked before its clip is decoded.

    Args:
        form (FormData): the form
        limits (Limits): the server's limits

    Returns:
        ChatRequest: the request without its audio (the caller decodes the clip into ``audio``); a stream's
        last chunk carries the usage
    """
    instruction = form.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise APIError(400, "no instruction: add a non-empty instruction field, e.g. -F 'instruction=Transcribe "
                            "the audio.'", "missing_instruction", "instruction")
    fields = _numbers(form, (("max_tokens", int), ("temperature", float), ("top_p", float), ("seed", int)))
    max_tokens, decoding = decoding_from(fields, limits)
    return ChatRequest([(instruction.strip(), None)], None, None, max_tokens, decoding, _flag(form, "stream"), True)


def speech_request(form: FormData, limits: Limits, tasks: AudioTasks, translate: bool) -> Tuple[ChatRequest, str]:
    """A transcription or translation form's fields, checked before its clip is decoded.

    Args:
        form (FormData): the form
        limits (Limits): the server's limits (the model's name; ``default_max_tokens`` caps the answer)
        tasks (AudioTasks): the instructions and the language the model hears
        translate (bool): the translations endpoint (which does not stream)

    Returns:
        Tuple[ChatRequest, str]: the request without its audio (the caller decodes the clip into ``audio``) and
        the response format (json or text)
    """
    allowed = [k for k in TRANSCRIPTION_FIELDS if not (translate and k == "stream")]
    for key in form.keys():
        if key not in allowed:
            raise APIError(400, f"{key} is not supported by this server (it takes {', '.join(allowed)}); leave "
                                "it out", "unsupported_parameter", key)
    model = form.get("model")
    if isinstance(model, str) and model.strip() and model.strip() != limits.model_name:
        raise APIError(404, f"model {model!r} is not served here; this server serves {limits.model_name!r} "
                            "(GET /v1/models)", "model_not_found", "model")
    language = str(form.get("language") or "").strip().lower()
    if language and language != tasks.language.lower():
        raise APIError(400, f"language {language!r}: this model takes speech in {tasks.language!r} only "
                            "(wavllm-serve --source-language)", "unsupported_language", "language")
    instruction = tasks.translation if translate else tasks.transcription
    if str(form.get("prompt") or "").strip():
        raise APIError(400, f"prompt is not supported: the model is asked the task's instruction ({instruction!r}, "
                            "wavllm-serve --transcription-instruction / --translation-instruction); to ask "
                            "something else use /v1/audio/instruct or /v1/chat/completions",
                       "unsupported_parameter", "prompt")
    fmt = str(form.get("response_format") or "json").strip()
    if fmt not in RESPONSE_FORMATS:
        raise APIError(400, f"response_format {fmt!r} is not supported (this model gives no timestamps); use "
                            f"{' or '.join(RESPONSE_FORMATS)}", "unsupported_value", "response_format")
    fields = _numbers(form, (("temperature", float),))
    if not 0 <= fields.get("temperature", 0.0) <= 1:
        raise APIError(400, f"temperature must be a number in [0, 1], got {fields['temperature']!r}",
                       "invalid_value", "temperature")
    max_tokens, decoding = decoding_from(fields, limits)
    stream = not translate and _flag(form, "stream")
    return ChatRequest([(instruction, None)], None, None, max_tokens, decoding, stream, True), fmt
