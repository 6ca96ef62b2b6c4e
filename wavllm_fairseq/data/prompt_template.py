"""The WavLLM chat template as token ids, with the answer-only loss mask.

The strings are the reference implementation's (microsoft/SpeechT5 ``WavLLM/wavllm/data/
speechllm_dataset.py``: the tags at lines 227-233, left/right at lines 322-324 and 422-423), which
trained the released model; the paper's appendix D typesets them differently. One turn with speech::

    pre  = <s> + enc("[INST]<<SYS>>\\n" + system + "\\n<</SYS>>\\n\\n<SPEECH>")
           {speech embeddings}
    post = enc(" </SPEECH> " + instruction + " [/INST]") + enc(answer) + </s>

No space around the system prompt, none before ``<SPEECH>``, one on each side of ``</SPEECH>`` and
before ``[/INST]``. A row is kept as the two token spans around the speech: ``pre`` and ``post``.
A row without speech (text instruction tuning) has the same tags around an empty speech span: the
reference builds these strings the same way for every row (its ``with_speech`` column only decides
whether audio is fed). Later turns of a multi-round dialogue, which the reference does not define,
follow LLaMA-2 chat: ``<s>`` + enc("[INST] " + instruction + " [/INST]") + enc(answer) + ``</s>``,
appended to ``post``. The loss mask (``post_target_mask``) is True exactly on every turn's answer
tokens and their ``</s>``; system text, instructions, tags, speech and padding never count.

The prompt-aware adapter reads ``adapter_input`` = enc('"' + first instruction + '"') without
``<s>`` (reference line 319); an empty instruction (a spoken question) is enc('""').

Each text segment is tokenized on its own and the ids concatenated (as the reference does), so the
generation prefix (the same turns with the last answer left out) is a prefix of the training
sequence token for token.
"""
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

DEFAULT_SYSTEM_PROMPT = (
    "As a helpful language and speech assistant, you are able to understand the speech content provided by the "
    "user, and assist the user with a variety of tasks using natural language."
)
SPEECH_OPEN, SPEECH_CLOSE = "<SPEECH>", "</SPEECH>"
INST_OPEN, INST_CLOSE = "[INST]", "[/INST]"


def left_text(system: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """The text encoded (after ``<s>``) before the speech span.

    Args:
        system (str): the system prompt.

    Returns:
        str: ``[INST]<<SYS>>\\n{system}\\n<</SYS>>\\n\\n<SPEECH>``.
    """
    return f"{INST_OPEN}<<SYS>>\n{system}\n<</SYS>>\n\n{SPEECH_OPEN}"


def right_text(instruction: str) -> str:
    """The text encoded after the speech span, before the first answer.

    Args:
        instruction (str): the first instruction (may be empty).

    Returns:
        str: `` </SPEECH> {instruction} [/INST]``.
    """
    return f" {SPEECH_CLOSE} {instruction} {INST_CLOSE}"


def adapter_text(instruction: str) -> str:
    """The text the prompt-aware adapter reads (encoded without ``<s>``).

    Args:
        instruction (str): the first instruction (may be empty).

    Returns:
        str: the instruction in double quotes.
    """
    return f'"{instruction}"'


@dataclass
class EncodedPrompt:
    """Token ids of one example. ``pre`` starts with ``<s>``; ``instruction`` is the first turn's
    instruction alone (no tags, no quotes); ``adapter_input`` is the prompt-aware adapter's input."""

    pre: List[int]
    post: List[int]
    post_target_mask: List[bool]
    instruction: List[int]
    has_speech: bool
    turn_starts: List[int] = field(default_factory=list)  # index in post where each turn's answer starts
    adapter_input: List[int] = field(default_factory=list)

    @property
    def num_target_tokens(self) -> int:
        """The loss positions: every answer token and its ``</s>``."""
        return sum(self.post_target_mask)


Turn = Tuple[str, Optional[str]]


def check_turns(turns: Sequence[Turn]) -> None:
    """A conversation has at least one turn, and only the last may leave its answer out.

    Args:
        turns (Sequence[Turn]): [(instruction, answer), ...].

    Raises:
        ValueError: otherwise.
    """
    if not turns:
        raise ValueError("an example needs at least one (instruction, answer) turn")
    for i, (_, answer) in enumerate(turns[:-1]):
        if answer is None:
            raise ValueError(f"turn {i + 1} has no answer; only the last turn may be open")


def encode_example(tokenizer, turns: Sequence[Turn], with_speech: bool,
                   system: str = DEFAULT_SYSTEM_PROMPT) -> EncodedPrompt:
    """Encode a conversation with the reference's template (module docstring).

    Args:
        tokenizer (LlamaTokenizer or HFTokenizer): the LLM's tokenizer.
        turns (Sequence[Turn]): [(instruction, answer), ...]; only the last answer may be None (generation
            prefix); the first instruction may be empty on a row with speech (the question is spoken).
        with_speech (bool): whether the row has speech.
        system (str): the system prompt.

    Returns:
        EncodedPrompt: the token spans around the speech and the answer-only loss mask.
    """
    check_turns(turns)
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    enc = tokenizer.encode
    pre = [bos] + enc(left_text(system))
    post: List[int] = []
    mask: List[bool] = []
    starts: List[int] = []
    first_instruction = turns[0][0] or ""
    for i, (instruction, answer) in enumerate(turns):
        instruction = instruction or ""
        ids = enc(right_text(instruction)) if i == 0 else [bos] + enc(f"{INST_OPEN} {instruction} {INST_CLOSE}")
        post += ids
        mask += [False] * len(ids)
        starts.append(len(post))
        if answer is not None:
            ans = enc(answer) + [eos]
            post += ans
            mask += [True] * len(ans)
    return EncodedPrompt(pre=pre, post=post, post_target_mask=mask, instruction=enc(first_instruction),
                         has_speech=with_speech, turn_starts=starts,
                         adapter_input=enc(adapter_text(first_instruction)))


def render_text(turns: Sequence[Turn], with_speech: bool, system: str = DEFAULT_SYSTEM_PROMPT,
                speech: str = "{speech}") -> str:
    """The template as a string (docs, logs, debugging).

    Args:
        turns (Sequence[Turn]): [(instruction, answer), ...]; the last answer may be None.
        with_speech (bool): whether the row has speech.
        system (str): the system prompt.
        speech (str): what stands for the speech embeddings (nothing on a text-only row).

    Returns:
        str: ``<s>`` + the template text, answers followed by ``</s>``.
    """
    out = "<s>" + left_text(system) + (speech if with_speech else "")
    for i, (instruction, answer) in enumerate(turns):
        instruction = instruction or ""
        out += right_text(instruction) if i == 0 else f"<s>{INST_OPEN} {instruction} {INST_CLOSE}"
        if answer is not None:
            out += f"{answer}</s>"
    return out
