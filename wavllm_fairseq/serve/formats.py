"""What each endpoint answers: the JSON body of a finished request and the server-sent events of a stream.

    chat           {"id": "chatcmpl-..", "object": "chat.completion", "choices": [{"message", "finish_reason"}],
                   "usage"}; stream: chat.completion.chunk events (role, then one per decoded piece of text,
                   then finish_reason, then usage when stream_options.include_usage), then [DONE]
    instruct       {"id": "instruct-..", "text", "finish_reason", "usage"}; stream: {"id", "text",
                   "finish_reason"} events, the last with usage, then [DONE]
    transcription  {"text", "usage"} (response_format json) or the text itself (text); stream (transcriptions):
                   {"type": "transcript.text.delta", "delta"} events, then {"type": "transcript.text.done",
                   "text", "usage"}, as OpenAI streams a transcription (no [DONE])

A failure mid-stream is one ``{"error": {...}}`` event (the OpenAI clients raise it), and the stream ends.
"""
import json
import time
from typing import List

from fastapi.responses import PlainTextResponse

from .engine import Answer


def usage(a: Answer) -> dict:
    """OpenAI's chat usage; prompt tokens count the speech positions too, as OpenAI counts audio tokens.

    Args:
        a (Answer): the answer

    Returns:
        dict: ``prompt_tokens``, ``completion_tokens``, ``total_tokens``, ``prompt_tokens_details``
    """
    prompt = a.text_tokens + a.speech_tokens
    return {"prompt_tokens": prompt, "completion_tokens": len(a.tokens), "total_tokens": prompt + len(a.tokens),
            "prompt_tokens_details": {"text_tokens": a.text_tokens, "audio_tokens": a.speech_tokens}}


def speech_usage(a: Answer) -> dict:
    """OpenAI's transcription usage (``type`` "tokens").

    Args:
        a (Answer): the answer

    Returns:
        dict: ``type``, ``input_tokens``, ``input_token_details``, ``output_tokens``, ``total_tokens``
    """
    prompt = a.text_tokens + a.speech_tokens
    return {"type": "tokens", "input_tokens": prompt,
            "input_token_details": {"text_tokens": a.text_tokens, "audio_tokens": a.speech_tokens},
            "output_tokens": len(a.tokens), "total_tokens": prompt + len(a.tokens)}


def event(body) -> str:
    """Args: body: a JSON value, or the string "[DONE]". Returns: str: one server-sent event."""
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


class ChatFormat:
    """``/v1/chat/completions``' shapes.

    Args:
        model (str): the served model's name
        include_usage (bool): a stream ends with a usage chunk (``stream_options.include_usage``)
    """

    prefix = "chatcmpl-"

    def __init__(self, model: str, include_usage: bool = False):
        self.model, self.include_usage = model, include_usage
        self.created = int(time.time())

    def _chunk(self, rid: str, choices: list, **extra) -> str:
        return event({"id": rid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                      "choices": choices, **extra})

    def body(self, rid: str, a: Answer):
        """Args: rid (str): the response id; a (Answer): the answer. Returns: the response body."""
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": a.text},
                             "finish_reason": a.finish_reason}],
                "usage": usage(a)}

    def opening(self, rid: str) -> List[str]:
        """Args: rid (str): the response id. Returns: List[str]: the events before the first piece of text."""
        return [self._chunk(rid, [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])]

    def delta(self, rid: str, text: str) -> str:
        """Args: rid (str): the response id; text (str): new text. Returns: str: its event."""
        return self._chunk(rid, [{"index": 0, "delta": {"content": text}, "finish_reason": None}])

    def closing(self, rid: str, a: Answer) -> List[str]:
        """Args: rid (str): the response id; a (Answer): the answer. Returns: List[str]: the last events."""
        out = [self._chunk(rid, [{"index": 0, "delta": {}, "finish_reason": a.finish_reason}])]
        if self.include_usage:
            out.append(self._chunk(rid, [], usage=usage(a)))
        return out + [event("[DONE]")]


class InstructFormat:
    """``/v1/audio/instruct``'s shapes (ours)."""

    prefix = "instruct-"

    def body(self, rid: str, a: Answer):
        """Args: rid (str): the response id; a (Answer): the answer. Returns: the response body."""
        return {"id": rid, "text": a.text, "finish_reason": a.finish_reason, "usage": usage(a)}

    def opening(self, rid: str) -> List[str]:
        """Args: rid (str): the response id. Returns: List[str]: no events."""
        return []

    def delta(self, rid: str, text: str) -> str:
        """Args: rid (str): the response id; text (str): new text. Returns: str: its event."""
        return event({"id": rid, "text": text, "finish_reason": None})

    def closing(self, rid: str, a: Answer) -> List[str]:
        """Args: rid (str): the response id; a (Answer): the answer. Returns: List[str]: the last events."""
        return [event({"id": rid, "text": "", "finish_reason": a.finish_reason, "usage": usage(a)}), event("[DONE]")]


class TranscriptionFormat:
    """``/v1/audio/transcriptions``' and ``/v1/audio/translations``' shapes.

    Args:
        response_format (str): json or text
    """

    prefix = "transcript-"

    def __init__(self, response_format: str = "json"):
        self.response_format = response_format

    def body(self, rid: str, a: Answer):
        """Args: rid (str): the response id (not sent); a (Answer): the answer. Returns: the response body."""
        if self.response_format == "text":
            return PlainTextResponse(a.text)
        return {"text": a.text, "usage": speech_usage(a)}

    def opening(self, rid: str) -> List[str]:
        """Args: rid (str): the response id. Returns: List[str]: no events."""
        return []

    def delta(self, rid: str, text: str) -> str:
        """Args: rid (str): the response id; text (str): new text. Returns: str: its event."""
        return event({"type": "transcript.text.delta", "delta": text})

    def closing(self, rid: str, a: Answer) -> List[str]:
        """Args: rid (str): the response id; a (Answer): the answer. Returns: List[str]: the last event."""
        return [event({"type": "transcript.text.done", "text": a.text, "usage": speech_usage(a)})]

