"""The LLaMA stand-in: a ``LlamaForCausalLM`` and its sentencepiece ``tokenizer.model``, trained as a
language model on the chat-formatted training rows with each clip as text in the speech span (its words,
repeated as speech frames repeat them, tagged with what is heard besides the words), standing in for a
chat LLM that can read, copy, translate and question the text in its context."""
import json
import math
import os
import random
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from ...data.prompt_template import (DEFAULT_SYSTEM_PROMPT, INST_CLOSE, INST_OPEN, SPEECH_CLOSE, SPEECH_OPEN,
                                encode_example)
from ..tables import all_sentences, is_train_sentence, prompt_pools, translate
from .data import rows, second_utterance, train_manifests
from .loop import Batches, log, train_steps


def tokenizer_texts(corpus: str) -> List[str]:
    """What the toy sentencepiece model is trained on: the chat template's fixed parts (weighted) and the
    corpus's training text.

    Args:
        corpus (str): the toy corpus folder (its ``lm_text.txt``).

    Returns:
        List[str]: the training lines.
    """
    with open(os.path.join(corpus, "lm_text.txt"), encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    special = [DEFAULT_SYSTEM_PROMPT, f"{INST_OPEN}<<SYS>>", "<</SYS>>", SPEECH_OPEN + SPEECH_CLOSE, INST_CLOSE]
    return special * 50 + lines


SPAN_REPEATS = (1, 2, 2, 3, 3, 4)  # how often a word's piece is repeated in a text span (80 ms frames per word)
SECOND_SPEAKER_TAG = "two"  # tag of the words a second, different speaker says in an SV clip
TAG_SCALE = 0.5  # tags are added at half a token's scale, so the word stays the main part of a position

# A span position holds a word piece id and, summed into its embedding, the ids of the clip's tags.
Span = Tuple[List[int], List[Tuple[int, ...]]]


def word_tags(tok, row) -> List[Tuple[int, ...]]:
    """Per spoken word of a toy clip: the pieces of what is heard besides the words (the speaker's
    gender, the speaking style, and a second speaker's turn in an SV clip), read from the row's columns.

    Args:
        tok: the toy tokenizer (``encode``).
        row (ManifestRow): a speech row of the toy corpus.

    Returns:
        List[Tuple[int, ...]]: one tuple of tag piece ids per word of ``transcript``.
    """
    words = row.extra["transcript"].split()
    base = tuple(tok.encode(row.extra[k])[0] for k in ("gender", "style") if row.extra.get(k))
    tags = [base] * len(words)
    if row.extra.get("n_speakers") == "2":
        k = second_utterance(json.loads(row.extra["word_samples"]), f"row {row.id}")
        other = (tok.encode(SECOND_SPEAKER_TAG)[0],) + base[1:]  # the first speaker's gender does not hold
        tags = tags[:k] + [other] * (len(words) - k)
    return tags


def text_span(tok, text: str, rng: random.Random, tags: Optional[List[Tuple[int, ...]]] = None) -> Span:
    """``text``'s pieces, each repeated as many times as speech frames would repeat it, with the tags of
    its word at each position.

    Args:
        tok: the toy tokenizer (``encode``).
        text (str): the words.
        rng (random.Random): draws each piece's repeat count from ``SPAN_REPEATS``.
        tags (Optional[List[Tuple[int, ...]]]): one tuple of tag ids per word (``word_tags``), or None.

    Returns:
        Span: (piece ids, tags of each position), of equal length.
    """
    pieces: List[int] = []
    span_tags: List[Tuple[int, ...]] = []
    for i, word in enumerate(text.split()):
        for piece in tok.encode(word):
            k = rng.choice(SPAN_REPEATS)
            pieces += [piece] * k
            span_tags += [tags[i] if tags else ()] * k
    return pieces, span_tags


def lm_sequences(corpus: str, tok, seed: int = 1, n_span: int = 3000) -> List[Span]:
    """Chat-formatted training rows for the LLaMA stand-in: (token ids, tag ids summed into each position).

    Every training row, with its clip in the speech span as text: the spoken words, repeated 1-4 times as
    80 ms speech frames repeat them, each position's embedding plus the embeddings of what is heard
    besides the words (gender, style, a second speaker: ``word_tags``); text-only rows as they are. Plus
    ``n_span`` rows with other *training* sentences of the grammar in the span and an ASR, ST or SQA
    question about them. A real chat LLM can already read, copy, translate and question a text in its
    context; this gives the stand-in those in-context skills (on many distinct sentences, so that it has
    to read the span rather than memorise), and stage 1 then has to map speech into that span: the
    semantic adapter onto the words, the acoustic adapter onto the tags (the projector adds the two, as
    the tags are added here). Test sentences and test voices are never used.

    Args:
        corpus (str): the toy corpus folder.
        tok: the toy tokenizer.
        seed (int): seeds the span repeats and the extra rows.
        n_span (int): how many extra rows with other training sentences.

    Returns:
        List[Span]: (token ids, tag ids of each position) per row.
    """
    with open(os.path.join(corpus, "corpus.json")) as f:
        corpus_seed = json.load(f).get("seed", 1)
    sentences = [(t, parts) for t, parts in all_sentences() if is_train_sentence(corpus_seed, t)]
    rng = random.Random(seed)
    seqs: List[Span] = []
    for name in train_manifests(corpus):
        for r in rows(corpus, name):
            e = encode_example(tok, r.turns or [(r.prompt, r.tgt_text)], with_speech=r.with_speech)
            span = text_span(tok, r.extra["transcript"], rng, word_tags(tok, r)) if r.with_speech else ([], [])
            seqs.append(with_span(e, span))
    for _ in range(n_span):
        text, parts = sentences[rng.randrange(len(sentences))]
        task = rng.choice(("asr", "asr", "st", "sqa"))
        prompt = rng.choice(prompt_pools()[task][0])
        answer = {"asr": text, "st": translate(parts), "sqa": f"The {parts['obj']}."}[task]
        e = encode_example(tok, [(prompt, answer)], with_speech=True)
        seqs.append(with_span(e, text_span(tok, text, rng)))
    return seqs


def with_span(e, span: Span) -> Span:
    """An encoded chat example with ``span`` in its speech span; no tags outside it.

    Args:
        e: ``encode_example``'s result (``pre``, ``post``).
        span (Span): what goes between them.

    Returns:
        Span: the whole sequence's ids and tags.
    """
    pieces, tags = span
    return e.pre + pieces + e.post, [()] * len(e.pre) + tags + [()] * len(e.post)


def answer_loss(model, e, span: Span) -> float:
    """Mean cross entropy of the answer tokens of ``e`` with ``span`` in its speech span.

    Args:
        model (LlamaForCausalLM): the stand-in.
        e: ``encode_example``'s result (``pre``, ``post``, ``post_target_mask``).
        span (Span): the speech span's ids and tags.

    Returns:
        float: the loss in nats per answer token.
    """
    x, ids, mask = embed_with_tags(model, [with_span(e, span)])
    pos = torch.tensor([len(e.pre) + len(span[0]) + i for i, m in enumerate(e.post_target_mask) if m])
    with torch.no_grad():
        logits = model(inputs_embeds=x, attention_mask=mask).logits[0]
    return F.cross_entropy(logits[pos - 1], ids[0, pos]).item()


def embed_with_tags(model, batch: Sequence[Span]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token embeddings with the tags' embeddings added at ``TAG_SCALE``, right-padded.

    Args:
        model (LlamaForCausalLM): whose input embeddings are used.
        batch (Sequence[Span]): B sequences of (ids, tags).

    Returns:
        Tuple[torch.Tensor, torch.Tensor, torch.Tensor]: inputs_embeds (B, T, D), ids (B, T) with -100 on
        padding, attention mask (B, T).
    """
    emb = model.get_input_embeddings()
    T = max(len(ids) for ids, _ in batch)
    K = max([len(t) for _, tags in batch for t in tags] + [1])
    ids = torch.full((len(batch), T), -100, dtype=torch.long)
    tag_ids = torch.zeros(len(batch), T, K, dtype=torch.long)
    tag_on = torch.zeros(len(batch), T, K)
    for b, (seq, tags) in enumerate(batch):
        ids[b, : len(seq)] = torch.tensor(seq)
        for t, tag in enumerate(tags):
            for k, x in enumerate(tag):
                tag_ids[b, t, k], tag_on[b, t, k] = x, 1.0
    mask = (ids >= 0).long()
    x = emb(ids.clamp(min=0)) + TAG_SCALE * (emb(tag_ids) * tag_on[..., None]).sum(2)  # (B, T, D)
    return x, ids, mask


def tag_check(model, tok, corpus: str, n: int = 40) -> Dict[str, float]:
    """Answer loss on held-out style/gender/SV rows with the clip's tags in the span vs the words alone.

    Args:
        model (LlamaForCausalLM): the stand-in.
        tok: the toy tokenizer.
        corpus (str): the toy corpus folder.
        n (int): rows of each validation manifest.

    Returns:
        Dict[str, float]: mean loss under ``tags`` and ``words_only``.
    """
    losses = {"tags": [], "words_only": []}
    for name in ("valid_er", "valid_gender", "valid_sv"):
        for r in rows(corpus, name)[:n]:
            e = encode_example(tok, [(r.prompt, r.tgt_text)], with_speech=True)
            for mode in losses:
                tags = word_tags(tok, r) if mode == "tags" else None
                losses[mode].append(answer_loss(model, e,
                                                text_span(tok, r.extra["transcript"], random.Random(0), tags)))
    return {k: float(np.mean(v)) for k, v in losses.items()}


def copy_check(model, tok, corpus: str, n: int = 30) -> Dict[str, float]:
    """Answer loss on held-out ASR rows with the transcript in the speech span (pieces repeated as in
    training) vs an empty span.

    Args:
        model (LlamaForCausalLM): the stand-in.
        tok: the toy tokenizer.
        corpus (str): the toy corpus folder.
        n (int): rows of ``valid_asr``.

    Returns:
        Dict[str, float]: mean loss under ``with_text`` and ``empty``.
    """
    rng = random.Random(0)
    losses = {"with_text": [], "empty": []}
    for r in rows(corpus, "valid_asr")[:n]:
        e = encode_example(tok, [(r.prompt, r.tgt_text)], with_speech=True)
        for mode in losses:
            losses[mode].append(answer_loss(model, e,
                                            text_span(tok, r.tgt_text, rng) if mode == "with_text" else ([], [])))
    return {k: float(np.mean(v)) for k, v in losses.items()}


def train_llama(corpus: str, out: str, cfg: dict, seed: int, tok) -> Dict[str, float]:
    """Train the LLaMA stand-in on ``lm_sequences`` and save it to ``out/llama``.

    Args:
        corpus (str): the toy corpus folder.
        out (str): stage 0's output folder.
        cfg (dict): sizes and optimisation (``SETTINGS[size]["llama"]``).
        seed (int): seeds initialisation, data and batches.
        tok: the toy tokenizer (saved in ``out/llama`` already).

    Returns:
        Dict[str, float]: held-out checks (perplexity, copy and tag losses) and the parameter count.
    """
    torch.manual_seed(seed)
    seqs = lm_sequences(corpus, tok, seed)
    rng = random.Random(seed)
    rng.shuffle(seqs)
    n_valid = max(8, len(seqs) // 50)
    valid, train = seqs[:n_valid], seqs[n_valid:]
    config = LlamaConfig(hidden_size=cfg["dim"], num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                         num_key_value_heads=cfg["heads"], intermediate_size=cfg["ffn"], vocab_size=len(tok),
                         max_position_embeddings=1024, rms_norm_eps=1e-5, bos_token_id=tok.bos_id,
                         eos_token_id=tok.eos_id, pad_token_id=None, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    # unit-scale token embeddings (RMSNorm makes the LM itself indifferent to the scale): the speech
    # projector then starts at the scale of the tokens it has to imitate, instead of 40x above it
    nn.init.normal_(model.model.embed_tokens.weight, std=1.0)
    next_batch = Batches(rng, len(train), cfg["batch"])

    def batch_loss(items: Sequence[Span]) -> torch.Tensor:
        x, labels, mask = embed_with_tags(model, items)
        return model(inputs_embeds=x, attention_mask=mask, labels=labels).loss

    train_steps("llama", model, model.parameters(), cfg, lambda: batch_loss([train[i] for i in next_batch()]))
    with torch.no_grad():
        vloss = float(np.mean([batch_loss(valid[k: k + 16]).item() for k in range(0, len(valid), 16)]))
    log(f"llama stand-in: held-out perplexity {math.exp(vloss):.2f} on {len(valid)} chat-formatted rows")
    cc = copy_check(model, tok, corpus)
    log(f"llama stand-in: held-out transcript loss {cc['with_text']:.3f} with the text in the speech span, "
        f"{cc['empty']:.3f} without (in-context reading)")
    tc = tag_check(model, tok, corpus)
    log(f"llama stand-in: held-out style/gender/SV answer loss {tc['tags']:.3f} with the clip's tags in the span, "
        f"{tc['words_only']:.3f} with its words only (reading what is heard besides the words)")
    model.save_pretrained(os.path.join(out, "llama"))
    return {"llama_tag_loss_valid": round(tc["tags"], 4), "llama_notag_loss_valid": round(tc["words_only"], 4),
            "llama_valid_ppl": round(math.exp(vloss), 3), "llama_copy_loss_valid": round(cc["with_text"], 4),
            "llama_nocopy_loss_valid": round(cc["empty"], 4),
            "llama_params": sum(p.numel() for p in model.parameters())}
