"""What the real backbones do alone on the real recipe's test sets: the ceilings its scores are read against.

* ``whisper_ceiling``: Whisper tiny.en's own WER on the ASR test clips (transformers' ``generate``, greedy):
  the content branch can bring no more than its encoder holds.
* ``llm_text_accuracy``: the LLM's accuracy on the SQQA test questions given as text (its chat template and
  the task's system prompt, greedy): what "answers from its own knowledge" can reach when nothing is spoken.
"""
import os
from typing import Dict, List, Tuple

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..data.manifest import read_manifest
from ..data.text_norm import normalise
from ..evaluation.metrics import find_words
from ..tools.small_backbones import whisper_wer


def unique_clips(manifest: str) -> List[Tuple[str, str]]:
    """Each clip of a manifest once (a test set asks about every clip with a seen and an unseen prompt).

    Args:
        manifest (str): an ASR manifest (audio relative to its folder).

    Returns:
        List[Tuple[str, str]]: (audio path, transcript), in manifest order.
    """
    rows, _ = read_manifest(manifest)
    root = os.path.dirname(os.path.abspath(manifest))
    seen, out = set(), []
    for r in rows:
        if r.with_speech and r.audio not in seen:
            seen.add(r.audio)
            out.append((os.path.join(root, r.audio), r.tgt_text))
    return out


def whisper_ceiling(whisper_dir: str, manifest: str, batch: int = 16) -> Dict[str, float]:
    """Whisper's own WER on the manifest's clips.

    Args:
        whisper_dir (str): a Hugging Face Whisper folder.
        manifest (str): the ASR test manifest.
        batch (int): clips per ``generate`` call.

    Returns:
        Dict[str, float]: ``wer`` (%) and ``clips``.
    """
    clips = unique_clips(manifest)
    return {"wer": whisper_wer(whisper_dir, clips, batch)[0], "clips": len(clips)}


def llm_text_accuracy(llm_dir: str, manifest: str, system_prompt: str, batch: int = 16,
                      max_new_tokens: int = 32) -> Dict[str, float]:
    """The LLM's accuracy on the SQQA manifest's questions asked as text.

    Args:
        llm_dir (str): a Hugging Face chat LLM folder (its tokenizer's chat template is used).
        manifest (str): the SQQA test manifest (``transcript``: the question; ``label``: the answer words, ``|``).
        system_prompt (str): the system turn (the task's ``system_prompt``; "" for none).
        batch (int): questions per ``generate`` call.
        max_new_tokens (int): the answer's length limit.

    Returns:
        Dict[str, float]: ``accuracy`` (0-1) and ``questions``.
    """
    rows, _ = read_manifest(manifest)
    items, seen = [], set()
    for r in rows:
        q = r.extra.get("transcript", "")
        if q and q not in seen:
            seen.add(q)
            items.append((q, [w for w in r.extra.get("label", "").split("|") if w]))
    tok = AutoTokenizer.from_pretrained(llm_dir, local_files_only=True)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(llm_dir, local_files_only=True, dtype=torch.float32).eval()
    right = 0
    for i in range(0, len(items), batch):
        chunk = items[i: i + batch]
        texts = [tok.apply_chat_template(([{"role": "system", "content": system_prompt}] if system_prompt else [])
                                         + [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
                 for q, _ in chunk]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        for (_, words), ids in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
            answer = normalise(tok.decode(ids, skip_special_tokens=True))
            right += any(find_words(answer, normalise(w)) >= 0 for w in words)
    return {"accuracy": right / max(1, len(items)), "questions": len(items)}
