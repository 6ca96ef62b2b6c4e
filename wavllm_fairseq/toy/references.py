"""What the real backbones do alone on the real recipe's test sets: the ceilings its scores are read against.

* ``whisper_ceiling``: Whisper tiny.en's own WER on the ASR test clips (transformers' ``generate``, greedy):
  the content branch can bring no more than its encoder holds.
* ``llm_text_accuracy``: the LLM's accuracy on the SQQA test questions given as text (its chat template and
  the task's system prompt, greedy): what "answers from its own knowledge" can reach when nothing is spoken.
* ``self_answer_manifest``: the SQQA training manifest with the LLM's own answers to the questions as text
  for targets (``train_sqqa_llm.tsv``, what the small_real yamls train on). Trained on the corpus's answers
  ("The answer is Paris."), the LoRA learns the 105 training questions' answers and gives them to held-out
  questions too (SQQA 0.0 at f37e253, 76% of the answers another question's); trained to say what the LLM
  says when it reads the question, it learns to pass the question on, and the answer comes from the
  LLM's own knowledge, as SQQA asks (the behaviour-alignment targets of BLSP and DeSTA2).

``python -m wavllm_fairseq.toy.references --llm DIR --sqqa-train IN.tsv --out OUT.tsv [--system-prompt S]``
writes that manifest by hand.
"""
import argparse
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..data.manifest import read_manifest
from ..data.manifest_row import escape_cell, unescape_cell
from ..data.text_norm import normalise
from ..evaluation.metrics import find_words
from ..tools.small_backbones import whisper_wer
from .breakdown import wer_by_source


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
        Dict[str, float]: ``wer`` (%), ``clips`` and ``by_source``: {sentence source: {"wer", "clips"}} (the
        grammar's sentences, open vocabulary: ``breakdown.wer_by_source``).
    """
    clips = unique_clips(manifest)
    value, hyps = whisper_wer(whisper_dir, clips, batch)
    by_source = {src: {"wer": w, "clips": n} for src, (w, n) in wer_by_source([t for _, t in clips], hyps).items()}
    return {"wer": value, "clips": len(clips), "by_source": by_source}


def llm_text_answers(llm_dir: str, questions: Sequence[str], system_prompt: str, batch: int = 16,
                     max_new_tokens: int = 32) -> List[str]:
    """The chat LLM's greedy answers to questions asked as text (its chat template, the system turn, left
    padding, batches of ``batch``).

    Args:
        llm_dir (str): a Hugging Face chat LLM folder.
        questions (Sequence[str]): the user turns.
        system_prompt (str): the system turn ("" for none).
        batch (int): questions per ``generate`` call.
        max_new_tokens (int): the answer's length limit.

    Returns:
        List[str]: the answers, stripped, in the order of ``questions``.
    """
    tok = AutoTokenizer.from_pretrained(llm_dir, local_files_only=True)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(llm_dir, local_files_only=True, dtype=torch.float32).eval()
    answers: List[str] = []
    for i in range(0, len(questions), batch):
        texts = [tok.apply_chat_template(([{"role": "system", "content": system_prompt}] if system_prompt else [])
                                         + [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
                 for q in questions[i: i + batch]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        answers += [tok.decode(ids, skip_special_tokens=True).strip() for ids in out[:, enc["input_ids"].shape[1]:]]
    return answers


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
    items: Dict[str, List[str]] = {}
    for r in rows:
        q = r.extra.get("transcript", "")
        if q and q not in items:
            items[q] = [w for w in r.extra.get("label", "").split("|") if w]
    answers = llm_text_answers(llm_dir, list(items), system_prompt, batch, max_new_tokens)
    right = sum(any(find_words(normalise(a), normalise(w)) >= 0 for w in words)
                for a, words in zip(answers, items.values()))
    return {"accuracy": right / max(1, len(items)), "questions": len(items)}


BRIEF = " Answer in one short sentence."


def self_answer_manifest(llm_dir: str, src: str, out: str, system_prompt: str, ask_suffix: str = BRIEF,
                         max_new_tokens: int = 32) -> dict:
    """``src`` (an SQQA manifest: ``transcript`` holds the spoken question) with every target replaced by the
    LLM's own greedy answer to that question as text, written to ``out`` (every other cell as it was;
    atomically, through ``out.tmp``). A question the LLM answers with nothing keeps its target.

    ``ask_suffix`` follows the question in the user turn: asked plainly, SmolLM2-135M-Instruct rambles (48 tokens
    often end mid-sentence, "Denmark is a country in Northern Europe. ... The capital of Denmark is Copenhagen.");
    asked for one short sentence it says "The capital of Denmark is Copenhagen." (11 words on average, the
    answer word in 70 of the corpus's 105 training questions against 73 asked plainly, 2026-12-07).

    Args:
        llm_dir (str): the chat LLM folder the model is built on.
        src (str): the SQQA training manifest.
        out (str): the manifest to write.
        system_prompt (str): the system turn the task trains with.
        ask_suffix (str): appended to each question in the user turn ("" for the bare question).
        max_new_tokens (int): the answers' length limit.

    Returns:
        dict: ``rows``, ``questions`` (distinct), ``kept`` (rows whose target stayed) and ``out``.

    Raises:
        ValueError: naming ``src`` and the line of a row without a ``transcript``.
    """
    with open(src, encoding="utf-8") as f:
        lines = f.read().splitlines()
    header = lines[0].split("\t")
    for col in ("tgt_text", "transcript"):
        if col not in header:
            raise ValueError(f"{src}: no {col!r} column (an SQQA manifest names the spoken question in 'transcript')")
    tgt, tr = header.index("tgt_text"), header.index("transcript")
    rows = [line.split("\t") for line in lines[1:] if line.strip()]
    for n, cells in enumerate(rows, start=2):
        if len(cells) != len(header) or not unescape_cell(cells[tr]).strip():
            raise ValueError(f"{src}, line {n}: a row needs all {len(header)} cells and a spoken question in "
                             "'transcript'")
    questions = list(dict.fromkeys(unescape_cell(c[tr]) for c in rows))
    answers = dict(zip(questions, llm_text_answers(llm_dir, [q + ask_suffix for q in questions], system_prompt,
                                                   max_new_tokens=max_new_tokens)))
    kept = 0
    for cells in rows:
        a = answers[unescape_cell(cells[tr])]
        if a:
            cells[tgt] = escape_cell(a)
        else:
            kept += 1
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        f.write("\n".join(["\t".join(header)] + ["\t".join(c) for c in rows]) + "\n")
    os.replace(out + ".tmp", out)
    return {"rows": len(rows), "questions": len(questions), "kept": kept, "out": out}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m wavllm_fairseq.toy.references``: write the SQQA training manifest with the LLM's own answers."""
    p = argparse.ArgumentParser(description="the SQQA training manifest with the chat LLM's own answers to the "
                                            "questions as text for targets (what the small_real yamls train on)")
    p.add_argument("--llm", required=True, help="the Hugging Face chat LLM folder the model is built on")
    p.add_argument("--sqqa-train", required=True,
                   help="the SQQA training manifest (e.g. manifests/real/train_sqqa.tsv)")
    p.add_argument("--out", required=True, help="the manifest to write (e.g. manifests/real/train_sqqa_llm.tsv)")
    p.add_argument("--system-prompt", default="You are a helpful speech assistant.",
                   help="the system turn the task trains with (the small_real yamls': the default)")
    p.add_argument("--ask-suffix", default=BRIEF, help=f"follows each question in the user turn (default {BRIEF!r})")
    args = p.parse_args(argv)
    info = self_answer_manifest(args.llm, args.sqqa_train, args.out, args.system_prompt, args.ask_suffix)
    print(f"[references] {info['rows']} rows ({info['questions']} questions) -> {info['out']}; "
          f"{info['kept']} kept their target (empty answer)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
