"""The LLM tokenizer's own chat template as an alternative to the reference's LLaMA-2 template.

``task.chat_template`` picks how a row becomes token ids:

* ``reference`` (default): the LLaMA-2 template of the reference implementation, token-exact with the
  released model (``prompt_template.encode_example``, spec section 3).
* ``tokenizer``: the chat template that the LLM folder's tokenizer carries (``tokenizer_config.json`` /
  ``chat_template.jinja``: ChatML for SmolLM2 and Qwen2, LLaMA-3's header tokens, ...), for an LLM
  that was chat-tuned with it. Messages are ``system`` (``task.system_prompt``), then per turn
  ``user`` and ``assistant``; the first user turn's content is ``<SPEECH>{speech}</SPEECH> {instruction}``
  on a row with speech, so the speech span sits inside the user turn::

      <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n<SPEECH>  | {speech} |
      </SPEECH> {instruction}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>      (SmolLM2)

The template is rendered as text with a marker where the speech goes, cut into segments (before the
speech, after it up to the answer, the answer up to and including the eos token, the next turn's
prompt, ...) and each segment is tokenized on its own without added special tokens, so the
generation prefix (rendered with ``add_generation_prompt``) is a token prefix of the training
sequence. The loss covers each answer and the eos token that ends it (what generation stops on);
text the template puts after the eos (a newline) belongs to the next prompt. The returned
``EncodedPrompt`` has the same fields as the reference template's, so the dataset, the prompt-aware
adapter (``adapter_input`` = enc('"' + instruction + '"')) and the generator are unchanged.
"""
from typing import Callable, List, Optional, Sequence, Tuple

from ..errors import WavLLMInputError
from .prompt_template import (DEFAULT_SYSTEM_PROMPT, SPEECH_CLOSE, SPEECH_OPEN, EncodedPrompt, Turn, adapter_text,
                              check_turns, encode_example)

TEMPLATES = ("reference", "tokenizer")
SPEECH_MARK = "\u27e6wavllm-speech\u27e7"  # stands for the speech embeddings while the template is text


def prompt_encoder(name: str) -> Callable[..., EncodedPrompt]:
    """The encoder of a ``task.chat_template`` name.

    Args:
        name (str): one of ``TEMPLATES``.

    Returns:
        Callable[..., EncodedPrompt]: ``encode(tokenizer, turns, with_speech, system=...)``.

    Raises:
        WavLLMInputError: for another name.
    """
    if name == "reference":
        return encode_example
    if name == "tokenizer":
        return encode_with_chat_template
    raise WavLLMInputError(f"task.chat_template must be one of {TEMPLATES}, got {name!r}")


def _messages(turns: Sequence[Turn], with_speech: bool, system: str, upto: int, with_answer: bool) -> List[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    for i, (instruction, answer) in enumerate(turns[: upto + 1]):
        instruction = instruction or ""
        if i == 0 and with_speech:
            instruction = f"{SPEECH_OPEN}{SPEECH_MARK}{SPEECH_CLOSE} {instruction}".rstrip()
        msgs.append({"role": "user", "content": instruction})
        if i < upto or with_answer:
            msgs.append({"role": "assistant", "content": answer})
    return msgs


def encode_with_chat_template(tokenizer, turns: Sequence[Turn], with_speech: bool,
                              system: str = DEFAULT_SYSTEM_PROMPT) -> EncodedPrompt:
    """Encode a conversation with the tokenizer's chat template (the layout: module docstring).

    Args:
        tokenizer (HFTokenizer): a tokenizer with a chat template.
        turns (Sequence[Turn]): [(instruction, answer), ...]; the last answer may be None (generation prefix).
        with_speech (bool): whether the row has speech (its span opens the first user turn).
        system (str): the system prompt ('' for none).

    Returns:
        EncodedPrompt: the token spans around the speech and the answer-only loss mask.

    Raises:
        WavLLMInputError: for a tokenizer or template that cannot encode it token-exactly.
    """
    hf = _chat_tokenizer(tokenizer)
    check_turns(turns)

    def render(upto: int, with_answer: bool) -> str:
        try:
            return hf.apply_chat_template(_messages(turns, with_speech, system, upto, with_answer), tokenize=False,
                                          add_generation_prompt=not with_answer)
        except Exception as e:  # jinja's TemplateError: e.g. a template without a system role
            raise WavLLMInputError(f"the chat template of {tokenizer.path} cannot render this conversation "
                                   f"({type(e).__name__}: {e}); set task.system_prompt='' if it has no system role, "
                                   "or use task.chat_template=reference", reason="bad_tokenizer") from e

    enc, eos_id = tokenizer.encode, tokenizer.eos_id
    eos_text = hf.convert_ids_to_tokens(eos_id)
    pre: List[int] = []
    post: List[int] = []
    mask: List[bool] = []
    starts: List[int] = []
    done = ""  # the text encoded so far (speech marker included)
    for i, (_, answer) in enumerate(turns):
        prompt = render(i, with_answer=False)
        if not prompt.startswith(done):
            raise WavLLMInputError(f"the chat template of {tokenizer.path} re-renders earlier turns differently "
                                   "once a turn is added; it cannot be used for training", reason="bad_tokenizer")
        segment = prompt[len(done):]
        if i == 0:
            left, segment = _split_at_speech(segment, turns[0][0], with_speech, tokenizer.path)
            pre = enc(left)
        ids = enc(segment)
        post += ids
        mask += [False] * len(ids)
        starts.append(len(post))
        done = prompt
        if answer is None:
            break
        full = render(i, with_answer=True)
        if not full.startswith(prompt):
            raise WavLLMInputError(f"the chat template of {tokenizer.path} does not continue its generation "
                                   "prompt with the answer; it cannot be used for training", reason="bad_tokenizer")
        ids, answered = _answer_ids(enc, full[len(prompt):], answer, eos_text, eos_id)
        done = prompt + answered
        post += ids
        mask += [True] * len(ids)
    first = turns[0][0] or ""
    return EncodedPrompt(pre=pre, post=post, post_target_mask=mask, instruction=enc(first), has_speech=with_speech,
                         turn_starts=starts, adapter_input=enc(adapter_text(first)))


def _chat_tokenizer(tokenizer):
    """The ``transformers`` tokenizer of ``tokenizer``, or a clear error when it has no chat template."""
    hf = getattr(tokenizer, "hf", None)
    if hf is None or not getattr(hf, "chat_template", None):
        raise WavLLMInputError(
            f"task.chat_template=tokenizer needs a Hugging Face tokenizer with a chat template, but "
            f"{getattr(tokenizer, 'path', tokenizer)} has none (a sentencepiece tokenizer.model, or no chat_template "
            "in tokenizer_config.json); use task.chat_template=reference", reason="bad_tokenizer")
    return hf


def _split_at_speech(segment: str, instruction: Optional[str], with_speech: bool, path: str) -> Tuple[str, str]:
    """The first prompt segment cut where the speech goes: (text before it, text after it). Without
    speech the (empty) span sits where the instruction starts."""
    left, mark, right = segment.partition(SPEECH_MARK)
    if with_speech and not mark:
        raise WavLLMInputError(f"the chat template of {path} dropped the user turn's text", reason="bad_tokenizer")
    if not with_speech:
        cut = segment.find(instruction) if instruction else -1
        left, right = (segment[:cut], segment[cut:]) if cut > 0 else (segment, "")
    return left, right


def _answer_ids(enc, reply: str, answer: str, eos_text: str, eos_id: int) -> Tuple[List[int], str]:
    """The ids of an answer's turn text up to and including the eos token, and the text they cover
    (the rest, a newline, opens the next prompt segment). A template that does not end a turn with
    eos gets one after the answer anyway."""
    cut = reply.find(eos_text, reply.find(answer) + len(answer) if answer and answer in reply else 0)
    if cut < 0:
        return enc(reply) + [eos_id], reply
    return enc(reply[: cut + len(eos_text)]), reply[: cut + len(eos_text)]
