"""The WavLLM chat template (paper appendix D) as token ids, with the answer-only loss mask.

One turn with speech::

    <s>[INST]<<SYS>>\\n {system} \\n<</SYS>>\\n\\n <SPEECH>{speech}</SPEECH>{instruction} [/INST]{target}</s>

``{speech}`` is where the projected speech embeddings go, so a row is kept as two token spans around
it: ``pre`` (``<s>`` ... ``<SPEECH>``) and ``post`` (``</SPEECH>`` ... ``</s>``). A row without speech
has no speech span: ``pre`` ends after the system block and ``post`` starts with the instruction.
Later turns of a multi-round dialogue follow LLaMA-2 chat: ``<s>[INST] {instruction} [/INST]{target}</s>``,
appended to ``post``. The loss mask (``post_target_mask``) is True exactly on every turn's
``{target}`` tokens and its ``</s>``; system text, instructions, tags, speech and padding never count.

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


def system_block(system: str) -> str:
    return f"{INST_OPEN}<<SYS>>\n {system} \n<</SYS>>\n\n"


@dataclass
class EncodedPrompt:
    """Token ids of one example. ``pre`` starts with ``<s>``; ``instruction`` is the first turn's
    instruction alone (no tags), the input of the prompt-aware LoRA adapter."""

    pre: List[int]
    post: List[int]
    post_target_mask: List[bool]
    instruction: List[int]
    has_speech: bool
    turn_starts: List[int] = field(default_factory=list)  # index in post where each turn's answer starts

    @property
    def num_target_tokens(self) -> int:
        return sum(self.post_target_mask)


Turn = Tuple[str, Optional[str]]


def encode_example(tokenizer, turns: Sequence[Turn], with_speech: bool,
                   system: str = DEFAULT_SYSTEM_PROMPT) -> EncodedPrompt:
    """Encode ``turns`` = [(instruction, answer), ...]; the last answer may be None (generation prefix).

    Only the last turn may leave its answer out; the first instruction may be empty on a row with
    speech (the question is spoken).
    """
    if not turns:
        raise ValueError("an example needs at least one (instruction, answer) turn")
    for i, (_, answer) in enumerate(turns[:-1]):
        if answer is None:
            raise ValueError(f"turn {i + 1} has no answer; only the last turn may be open")
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    enc = tokenizer.encode
    if with_speech:
        pre = [bos] + enc(system_block(system) + " " + SPEECH_OPEN)
    else:
        pre = [bos] + enc(system_block(system))
    post: List[int] = []
    mask: List[bool] = []
    starts: List[int] = []
    first_instruction = turns[0][0] or ""
    for i, (instruction, answer) in enumerate(turns):
        instruction = instruction or ""
        if i == 0:
            head = (SPEECH_CLOSE + instruction if with_speech else instruction) + " " + INST_CLOSE
            ids = enc(head)
        else:
            ids = [bos] + enc(f"{INST_OPEN} {instruction} {INST_CLOSE}")
        post += ids
        mask += [False] * len(ids)
        starts.append(len(post))
        if answer is not None:
            ans = enc(answer) + [eos]
            post += ans
            mask += [True] * len(ans)
    return EncodedPrompt(pre=pre, post=post, post_target_mask=mask, instruction=enc(first_instruction),
                         has_speech=with_speech, turn_starts=starts)


def render_text(turns: Sequence[Turn], with_speech: bool, system: str = DEFAULT_SYSTEM_PROMPT,
                speech: str = "{speech}") -> str:
    """The template as a string (docs, logs, debugging); ``speech`` stands for the speech embeddings."""
    out = "<s>" + system_block(system)
    for i, (instruction, answer) in enumerate(turns):
        instruction = instruction or ""
        if i == 0:
            out += (f" {SPEECH_OPEN}{speech}{SPEECH_CLOSE}" if with_speech else "") + f"{instruction} {INST_CLOSE}"
        else:
            out += f"<s>{INST_OPEN} {instruction} {INST_CLOSE}"
        if answer is not None:
            out += f"{answer}</s>"
    return out
