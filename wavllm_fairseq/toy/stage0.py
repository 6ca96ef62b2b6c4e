"""Toy stage 0: pretrain tiny stand-ins for Whisper, WavLM and LLaMA on the toy corpus.

    wavllm-toy-pretrain --corpus manifests/toy --out work_toy/backbones [--size default|small] [--seed 1]

The paper starts from pretrained Whisper-large-v2, WavLM-base and LLaMA-2-7B-chat, which cannot be
downloaded here. This step makes small ``transformers`` models that play their roles and saves each with
``save_pretrained`` to ``OUT/{whisper,wavlm,llama}``; stages 1 and 2 load them through the same config
fields as the real weights (``model.whisper_path`` ...) and keep them frozen.

* Whisper stand-in (``WhisperEncoder``): a CTC objective on the transcripts (word units) over the same
  log-mel input and windowing the plugin uses (``encoders.WhisperSemanticEncoder``), plus frame-level
  cross entropy on the word alignment the synthesizer reported (manifest column ``word_samples``), which
  makes it learn several times faster than CTC alone; its frames carry the content, as Whisper's do.
* WavLM stand-in (``WavLMModel``, per-frame LayerNorm feature extractor): speaker, gender and
  speaking-style classification of training clips and same/different speaker of two-utterance training
  clips (its frames then carry who speaks, whether the speaker changes, and how, as WavLM's do).
* LLaMA stand-in (``LlamaForCausalLM``) and its sentencepiece ``tokenizer.model``: a language model on
  the chat-formatted training prompts and answers (text only), standing in for the chat LLM.

The result is cached: ``OUT/stage0.json`` records the corpus and settings; a second run with the same
ones does nothing. Each model reports a held-out check (CTC WER, style/gender/SV accuracy, perplexity, in-context reading).
"""
import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CODE_VERSION = 6  # part of the cache key: bump when a change here changes what stage 0 trains

# fixed settings per size: model sizes and optimisation steps (deterministic for a seed)
SETTINGS = {
    "default": dict(
        vocab=1000,
        whisper=dict(unit="word", d_model=192, layers=3, heads=4, ffn=768, window_positions=200, steps=600, batch=16,
                     lr=3e-3, align_weight=1.0),
        wavlm=dict(hidden=144, layers=3, heads=4, ffn=576, conv_dim=48, steps=400, batch=8, sv_batch=6, lr=1.5e-3),
        llama=dict(dim=256, layers=4, heads=4, ffn=688, steps=700, batch=24, lr=2e-3),
    ),
    "small": dict(
        vocab=600,
        whisper=dict(unit="word", d_model=96, layers=2, heads=2, ffn=256, window_positions=200, steps=60, batch=8, lr=2e-3,
                     align_weight=1.0),
        wavlm=dict(hidden=64, layers=2, heads=2, ffn=128, conv_dim=32, steps=30, batch=8, sv_batch=2, lr=2e-3),
        llama=dict(dim=96, layers=2, heads=2, ffn=192, steps=60, batch=16, lr=3e-3),
    ),
}


def log(msg: str) -> None:
    print(f"[stage0] {msg}", flush=True)


def _rows(corpus: str, name: str):
    from ..manifest import read_manifest

    rows, _ = read_manifest(os.path.join(corpus, name + ".tsv"))
    return rows


def _audio(corpus: str, rows) -> List[np.ndarray]:
    from ..audio import load_audio

    return [load_audio(r.audio, corpus) for r in rows]


def _batch_wav(wavs: Sequence[np.ndarray]):
    lengths = torch.tensor([len(w) for w in wavs])
    out = torch.zeros(len(wavs), int(lengths.max()))
    for i, w in enumerate(wavs):
        out[i, : len(w)] = torch.from_numpy(w)
    return out, lengths


def _schedule(opt, step: int, total: int, peak: float, warmup: int) -> None:
    lr = peak * min(1.0, (step + 1) / warmup) * max(0.05, 1 - step / total)
    for g in opt.param_groups:
        g["lr"] = lr


def _words(text: str) -> List[str]:
    return text.lower().split()


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    import editdistance

    errors = sum(editdistance.eval(_words(r), _words(h)) for r, h in zip(refs, hyps))
    return 100.0 * errors / max(1, sum(len(_words(r)) for r in refs))


# ------------------------------------------------------------------ tokenizer
def tokenizer_texts(corpus: str) -> List[str]:
    from ..prompt_template import DEFAULT_SYSTEM_PROMPT, INST_CLOSE, INST_OPEN, SPEECH_CLOSE, SPEECH_OPEN

    with open(os.path.join(corpus, "lm_text.txt"), encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    special = [DEFAULT_SYSTEM_PROMPT, f"{INST_OPEN}<<SYS>>", "<</SYS>>", SPEECH_OPEN + SPEECH_CLOSE, INST_CLOSE]
    return special * 50 + lines


# ------------------------------------------------------------------ Whisper stand-in
def word_frame_labels(row, word_ids: List[int], frame_samples: int) -> torch.Tensor:
    """Per encoder frame (``frame_samples`` long): the id of the word spoken there (from the manifest's
    ``word_samples`` alignment, written by the corpus generator), 0 (blank) outside every word."""
    spans = json.loads(row.extra.get("word_samples") or "[]")
    if len(spans) != len(word_ids):
        raise ValueError(f"row {row.id}: {len(spans)} word alignments for {len(word_ids)} words; regenerate the "
                         "corpus with wavllm-make-toy-corpus --force")
    n = -(-int(row.n_frames) // frame_samples)
    labels = torch.zeros(n, dtype=torch.long)
    half = frame_samples // 2
    for w, (start, end) in zip(word_ids, spans):
        labels[(start + half) // frame_samples: (end + half) // frame_samples] = w
    return labels


def train_whisper(corpus: str, out: str, cfg: dict, seed: int) -> Dict[str, float]:
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from ..encoders import WhisperSemanticEncoder

    torch.manual_seed(seed)
    train = _rows(corpus, "train_asr")
    valid = _rows(corpus, "valid_asr")
    units = (lambda t: list(" ".join(_words(t)))) if cfg.get("unit", "char") == "char" else _words
    vocab = sorted({u for r in train for u in units(r.tgt_text)})
    index = {u: i + 1 for i, u in enumerate(vocab)}  # 0 = CTC blank
    joiner = "" if cfg.get("unit", "char") == "char" else " "
    config = WhisperConfig(d_model=cfg["d_model"], encoder_layers=cfg["layers"], encoder_attention_heads=cfg["heads"],
                           encoder_ffn_dim=cfg["ffn"], num_mel_bins=80, max_source_positions=cfg["window_positions"],
                           decoder_layers=1, decoder_attention_heads=cfg["heads"], decoder_ffn_dim=cfg["ffn"],
                           vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                           max_target_positions=64, dropout=0.1)
    encoder = WhisperSemanticEncoder(WhisperEncoder(config))
    head = nn.Linear(cfg["d_model"], len(vocab) + 1)
    wavs, vwavs = _audio(corpus, train), _audio(corpus, valid)
    targets = [[index[u] for u in units(r.tgt_text)] for r in train]
    frame_targets = [word_frame_labels(r, [index[u] for u in _words(r.tgt_text)], encoder.hop_length * 2)
                     if cfg.get("align_weight") and cfg.get("unit", "char") == "word" else None for r in train]
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg["lr"], betas=(0.9, 0.98), weight_decay=0.01)
    rng = random.Random(seed)
    order: List[int] = []
    t0 = time.time()
    encoder.train()
    for step in range(cfg["steps"]):
        if len(order) < cfg["batch"]:
            order += rng.sample(range(len(wavs)), len(wavs))
        idx, order = order[: cfg["batch"]], order[cfg["batch"]:]
        wav, lengths = _batch_wav([wavs[i] for i in idx])
        feats, flen = encoder(wav, lengths)
        logp = F.log_softmax(head(feats), -1).transpose(0, 1)  # (T, B, V)
        tgt = torch.cat([torch.tensor(targets[i]) for i in idx])
        tlen = torch.tensor([len(targets[i]) for i in idx])
        loss = F.ctc_loss(logp, tgt, flen, tlen, blank=0, zero_infinity=True)
        if frame_targets[idx[0]] is not None:  # frame-level word labels from the synthesizer's alignment
            logits = logp.transpose(0, 1)  # (B, T, V) log-probabilities
            labels = torch.full(logits.shape[:2], -100, dtype=torch.long)
            for b, i in enumerate(idx):
                n = min(int(flen[b]), len(frame_targets[i]))
                labels[b, :n] = frame_targets[i][:n]
            loss = loss + cfg["align_weight"] * F.nll_loss(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        _schedule(opt, step, cfg["steps"], cfg["lr"], max(1, cfg["steps"] // 10))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == cfg["steps"]:
            log(f"whisper stand-in: step {step + 1}/{cfg['steps']} ctc {loss.item():.3f} ({time.time() - t0:.0f} s)")
    encoder.eval()
    hyps = []
    with torch.no_grad():
        for k in range(0, len(vwavs), 16):
            wav, lengths = _batch_wav(vwavs[k: k + 16])
            feats, flen = encoder(wav, lengths)
            best = head(feats).argmax(-1)
            for b in range(best.shape[0]):
                seq = best[b, : int(flen[b])].tolist()
                out_units = [vocab[s - 1] for j, s in enumerate(seq) if s != 0 and (j == 0 or s != seq[j - 1])]
                hyps.append(joiner.join(out_units))
    score = wer([r.tgt_text for r in valid], hyps)
    log(f"whisper stand-in: held-out CTC greedy WER {score:.1f}% on valid_asr (unseen voices and sentences)")
    encoder.encoder.save_pretrained(os.path.join(out, "whisper"))
    return {"whisper_ctc_wer_valid": round(score, 2), "whisper_params": sum(p.numel() for p in encoder.parameters())}


# ------------------------------------------------------------------ WavLM stand-in
def wavlm_config(cfg: dict):
    """WavLM with a per-frame LayerNorm feature extractor and conv biases (WavLM-large's layout): unlike
    WavLM-base's group norm over time, it keeps the loudness a speaking style is partly made of, and it
    runs padded batches with an attention mask."""
    from transformers import WavLMConfig

    return WavLMConfig(hidden_size=cfg["hidden"], num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                       intermediate_size=cfg["ffn"], conv_dim=(cfg["conv_dim"],) * 7, feat_extract_norm="layer",
                       conv_bias=True, num_conv_pos_embeddings=32, num_conv_pos_embedding_groups=8, mask_time_prob=0.0,
                       hidden_dropout=0.05, attention_dropout=0.05, activation_dropout=0.0, feat_proj_dropout=0.0,
                       layerdrop=0.0)


def second_utterance(spans: Sequence[Sequence[int]], where: str = "a two-utterance clip") -> int:
    """Index of the first word after the widest pause between words (where an SV clip's second
    utterance starts); ``where`` names the clip in the error."""
    if len(spans) < 2:
        raise ValueError(f"{where}: an SV clip needs at least two word alignments (word_samples); "
                         "regenerate the corpus")
    return max(range(1, len(spans)), key=lambda i: spans[i][0] - spans[i - 1][1])


def speaker_change_labels(row, n_frames: int, frame_samples: int) -> torch.Tensor:
    """Per WavLM frame of a two-utterance SV clip: 1 on the frames of the second utterance when it has
    another speaker, else 0. The second utterance starts after the widest pause between words
    (``word_samples``)."""
    labels = torch.zeros(n_frames, dtype=torch.long)
    if row.extra.get("label") == "no":
        spans = json.loads(row.extra.get("word_samples") or "[]")
        labels[spans[second_utterance(spans, f"row {row.id}")][0] // frame_samples:] = 1
    return labels


def train_wavlm(corpus: str, out: str, cfg: dict, seed: int) -> Dict[str, float]:
    """Speaker, gender and style classification of whole training clips, plus, on the two-utterance SV
    training clips, same/different speaker of the clip and a per-frame speaker change (frames of a
    second speaker), from softmax-weighted hidden states. WavLM's own pre-training (masked prediction on
    mixed, overlapping utterances) is what makes its frames carry speaker identity and speaker changes;
    these objectives stand in for it. Training voices only."""
    from transformers import WavLMModel

    torch.manual_seed(seed)
    train = _rows(corpus, "train_asr")
    speakers = sorted({r.extra["speaker"] for r in train})
    styles = sorted({r.extra["label"] for r in _rows(corpus, "train_er")})
    # the ER manifest names the style of its clips (a share of the ASR clips, which carry speaker/gender)
    style_of = {r.audio: r.extra["label"] for r in _rows(corpus, "train_er")}
    model = WavLMModel(wavlm_config(cfg))
    frame_samples = int(np.prod(model.config.conv_stride))
    layer_w = nn.Parameter(torch.zeros(cfg["layers"] + 1))
    heads = nn.ModuleDict({"speaker": nn.Linear(cfg["hidden"], len(speakers)), "gender": nn.Linear(cfg["hidden"], 2),
                           "style": nn.Linear(cfg["hidden"], len(styles)), "sv": nn.Linear(cfg["hidden"], 2),
                           "change": nn.Linear(cfg["hidden"], 2)})
    er_rows = [r for r in train if r.audio in style_of]
    wavs = _audio(corpus, er_rows)
    labels = [(speakers.index(r.extra["speaker"]), int(r.extra["gender"] == "male"), styles.index(style_of[r.audio]))
              for r in er_rows]
    sv_rows = _rows(corpus, "train_sv")
    sv_wavs = _audio(corpus, sv_rows)
    sv_labels = [int(r.extra["label"] == "yes") for r in sv_rows]
    params = list(model.parameters()) + list(heads.parameters()) + [layer_w]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], betas=(0.9, 0.98), weight_decay=0.01)
    rng = random.Random(seed)

    def frames(items: Sequence[np.ndarray]) -> Tuple[torch.Tensor, torch.Tensor]:
        wav, lengths = _batch_wav(items)
        mask = (torch.arange(wav.shape[1])[None] < lengths[:, None]).long()
        hs = torch.stack(model(wav, attention_mask=mask, output_hidden_states=True).hidden_states, 0)  # (L+1, B, T, C)
        mixed = (F.softmax(layer_w, 0)[:, None, None, None] * hs).sum(0)  # (B, T, C)
        valid = torch.arange(mixed.shape[1])[None] < model._get_feat_extract_output_lengths(lengths)[:, None]
        return mixed, valid  # (B, T, C), (B, T)

    def pool(mixed: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        v = valid.float()
        return (mixed * v[..., None]).sum(1) / v.sum(1, keepdim=True)  # (B, C)

    def pooled(items: Sequence[np.ndarray]) -> torch.Tensor:
        return pool(*frames(items))

    t0 = time.time()
    model.train()
    for step in range(cfg["steps"]):
        idx = [rng.randrange(len(wavs)) for _ in range(cfg["batch"])]
        h = pooled([wavs[i] for i in idx])
        y = torch.tensor([labels[i] for i in idx])
        loss = (F.cross_entropy(heads["speaker"](h), y[:, 0]) + F.cross_entropy(heads["gender"](h), y[:, 1])
                + F.cross_entropy(heads["style"](h), y[:, 2]))
        sv_idx = [rng.randrange(len(sv_wavs)) for _ in range(cfg["sv_batch"])]
        mixed, valid = frames([sv_wavs[i] for i in sv_idx])
        change = torch.full(valid.shape, -100, dtype=torch.long)
        for b, i in enumerate(sv_idx):
            n = int(valid[b].sum())
            change[b, :n] = speaker_change_labels(sv_rows[i], n, frame_samples)
        loss = (loss + F.cross_entropy(heads["sv"](pool(mixed, valid)), torch.tensor([sv_labels[i] for i in sv_idx]))
                + F.cross_entropy(heads["change"](mixed).reshape(-1, 2), change.reshape(-1), ignore_index=-100))
        _schedule(opt, step, cfg["steps"], cfg["lr"], max(1, cfg["steps"] // 10))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == cfg["steps"]:
            log(f"wavlm stand-in: step {step + 1}/{cfg['steps']} loss {loss.item():.3f} ({time.time() - t0:.0f} s)")
    model.eval()
    with torch.no_grad():
        valid = _rows(corpus, "valid_er")
        vw = _audio(corpus, valid)
        hits = {"style": 0, "gender": 0}
        for k in range(0, len(valid), 16):
            h = pooled(vw[k: k + 16])
            for j, r in enumerate(valid[k: k + 16]):
                hits["style"] += int(styles[int(heads["style"](h[j]).argmax())] == r.extra["label"])
                hits["gender"] += int(int(heads["gender"](h[j]).argmax()) == int(r.extra["gender"] == "male"))
        scores = {f"wavlm_{k}_acc_valid": round(v / max(1, len(valid)), 4) for k, v in hits.items()}
        vsv = _rows(corpus, "valid_sv")
        vsw = _audio(corpus, vsv)
        sv_hits = change_hits = 0
        for k in range(0, len(vsv), 16):
            mixed, frame_ok = frames(vsw[k: k + 16])
            pred = heads["sv"](pool(mixed, frame_ok)).argmax(-1)
            # a change is heard when >= 15% of the clip's frames are taken for a second speaker
            changed = ((heads["change"](mixed).argmax(-1) == 1) & frame_ok).float().sum(1) / frame_ok.float().sum(1) >= 0.15
            for j, r in enumerate(vsv[k: k + 16]):
                same = r.extra["label"] == "yes"
                sv_hits += int(int(pred[j]) == int(same))
                change_hits += int(bool(changed[j]) != same)
        scores["wavlm_sv_acc_valid"] = round(sv_hits / max(1, len(vsv)), 4)
        scores["wavlm_change_acc_valid"] = round(change_hits / max(1, len(vsv)), 4)
    log(f"wavlm stand-in: held-out style accuracy {scores['wavlm_style_acc_valid']:.3f}, gender "
        f"{scores['wavlm_gender_acc_valid']:.3f} (valid_er), same/different speaker {scores['wavlm_sv_acc_valid']:.3f} "
        f"(clip head) / {scores['wavlm_change_acc_valid']:.3f} (frame change head) (valid_sv; unseen voices)")
    model.save_pretrained(os.path.join(out, "wavlm"))
    return {**scores, "wavlm_params": sum(p.numel() for p in model.parameters())}


# ------------------------------------------------------------------ LLaMA stand-in
SPAN_REPEATS = (1, 2, 2, 3, 3, 4)  # how often a word's piece is repeated in a text span (80 ms frames per word)
SECOND_SPEAKER_TAG = "two"  # tag of the words a second, different speaker says in an SV clip
TAG_SCALE = 0.5  # tags are added at half a token's scale, so the word stays the main part of a position

# A span position holds a word piece id and, summed into its embedding, the ids of the clip's tags.
Span = Tuple[List[int], List[Tuple[int, ...]]]


def word_tags(tok, row) -> List[Tuple[int, ...]]:
    """Per spoken word of a toy clip: the pieces of what is heard besides the words (the speaker's
    gender, the speaking style, and a second speaker's turn in an SV clip), read from the row's columns."""
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
    its word (``tags``: one tuple per word) at each position."""
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
    """
    from ..prompt_template import encode_example
    from . import corpus as toy

    corpus_seed = json.load(open(os.path.join(corpus, "corpus.json"))).get("seed", 1)
    sentences = [(t, parts) for t, parts in toy.all_sentences() if toy._h(corpus_seed, "split", t) % 100 >= 15]
    rng = random.Random(seed)
    seqs: List[Span] = []
    for name in sorted(os.listdir(corpus)):
        if name.startswith("train_") and name.endswith(".tsv"):
            for r in _rows(corpus, name[:-4]):
                e = encode_example(tok, r.turns or [(r.prompt, r.tgt_text)], with_speech=r.with_speech)
                span = text_span(tok, r.extra["transcript"], rng, word_tags(tok, r)) if r.with_speech else ([], [])
                seqs.append(with_span(e, span))
    for _ in range(n_span):
        text, parts = sentences[rng.randrange(len(sentences))]
        task = rng.choice(("asr", "asr", "st", "sqa"))
        prompt = rng.choice(toy.PROMPTS[task][0])
        answer = {"asr": text, "st": toy.translate(parts), "sqa": f"The {parts['obj']}."}[task]
        e = encode_example(tok, [(prompt, answer)], with_speech=True)
        seqs.append(with_span(e, text_span(tok, text, rng)))
    return seqs


def with_span(e, span: Span) -> Span:
    """An encoded chat example (``encode_example``) with ``span`` in its speech span; no tags outside it."""
    pieces, tags = span
    return e.pre + pieces + e.post, [()] * len(e.pre) + tags + [()] * len(e.post)


def answer_loss(model, e, span: Span) -> float:
    """Mean cross entropy of the answer tokens of ``e`` with ``span`` in its speech span."""
    x, ids, mask = embed_with_tags(model, [with_span(e, span)])
    pos = torch.tensor([len(e.pre) + len(span[0]) + i for i, m in enumerate(e.post_target_mask) if m])
    with torch.no_grad():
        logits = model(inputs_embeds=x, attention_mask=mask).logits[0]
    return F.cross_entropy(logits[pos - 1], ids[0, pos]).item()


def embed_with_tags(model, batch: Sequence[Span]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (inputs_embeds (B, T, D), ids (B, T) with -100 on padding, attention mask (B, T))."""
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
    """Answer loss on held-out style/gender/SV rows with the clip's tags in the span vs the words alone."""
    from ..prompt_template import encode_example

    losses = {"tags": [], "words_only": []}
    for name in ("valid_er", "valid_gender", "valid_sv"):
        for r in _rows(corpus, name)[:n]:
            e = encode_example(tok, [(r.prompt, r.tgt_text)], with_speech=True)
            for mode in losses:
                tags = word_tags(tok, r) if mode == "tags" else None
                losses[mode].append(answer_loss(model, e, text_span(tok, r.extra["transcript"], random.Random(0), tags)))
    return {k: float(np.mean(v)) for k, v in losses.items()}


def copy_check(model, tok, corpus: str, n: int = 30) -> Dict[str, float]:
    """Answer loss on held-out ASR rows with the transcript in the speech span (pieces repeated as in
    training) vs an empty span."""
    from ..prompt_template import encode_example

    rng = random.Random(0)
    losses = {"with_text": [], "empty": []}
    for r in _rows(corpus, "valid_asr")[:n]:
        e = encode_example(tok, [(r.prompt, r.tgt_text)], with_speech=True)
        for mode in losses:
            losses[mode].append(answer_loss(model, e, text_span(tok, r.tgt_text, rng) if mode == "with_text" else ([], [])))
    return {k: float(np.mean(v)) for k, v in losses.items()}


def train_llama(corpus: str, out: str, cfg: dict, seed: int, tok) -> Dict[str, float]:
    from transformers import LlamaConfig, LlamaForCausalLM

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
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=(0.9, 0.98), weight_decay=0.01)

    def batch_loss(items: Sequence[Span]) -> torch.Tensor:
        x, labels, mask = embed_with_tags(model, items)
        return model(inputs_embeds=x, attention_mask=mask, labels=labels).loss

    t0 = time.time()
    model.train()
    order: List[int] = []
    for step in range(cfg["steps"]):
        if len(order) < cfg["batch"]:
            order += rng.sample(range(len(train)), len(train))
        idx, order = order[: cfg["batch"]], order[cfg["batch"]:]
        loss = batch_loss([train[i] for i in idx])
        _schedule(opt, step, cfg["steps"], cfg["lr"], max(1, cfg["steps"] // 10))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == cfg["steps"]:
            log(f"llama stand-in: step {step + 1}/{cfg['steps']} loss {loss.item():.3f} ({time.time() - t0:.0f} s)")
    model.eval()
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
            "llama_nocopy_loss_valid": round(cc["empty"], 4), "llama_params": sum(p.numel() for p in model.parameters())}


# ------------------------------------------------------------------ main
def fingerprint(corpus: str, size: str, seed: int) -> str:
    """Hash of what stage 0 reads (every training manifest, the LM text) and of its settings."""
    h = hashlib.sha1(json.dumps([size, seed, SETTINGS[size], CODE_VERSION], sort_keys=True).encode())
    for name in sorted(os.listdir(corpus)):
        if (name.startswith("train_") and name.endswith(".tsv")) or name in ("lm_text.txt", "valid_asr.tsv",
                                                                            "valid_er.tsv", "valid_gender.tsv",
                                                                            "valid_sv.tsv"):
            with open(os.path.join(corpus, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()[:16]


def pretrain(corpus: str, out: str, size: str = "default", seed: int = 1, force: bool = False) -> dict:
    from ..tokenizer import train_sentencepiece

    corpus, out = os.path.abspath(corpus), os.path.abspath(out)
    if not os.path.isfile(os.path.join(corpus, "corpus.json")):
        raise SystemExit(f"{corpus} is not a toy corpus (no corpus.json): run wavllm-make-toy-corpus first")
    fp = fingerprint(corpus, size, seed)
    done_path = os.path.join(out, "stage0.json")
    if not force and os.path.isfile(done_path):
        done = json.load(open(done_path))
        if done.get("fingerprint") == fp and all(os.path.isdir(os.path.join(out, d)) for d in ("whisper", "wavlm", "llama")):
            log(f"cached: {out} (same corpus and settings); --force retrains")
            return done
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(seed)
    cfg = SETTINGS[size]
    t0 = time.time()
    tok = train_sentencepiece(tokenizer_texts(corpus), os.path.join(out, "llama"), vocab_size=cfg["vocab"])
    log(f"tokenizer: {len(tok)} pieces -> {tok.path}")
    result = {"fingerprint": fp, "corpus": corpus, "size": size, "seed": seed, "settings": cfg}
    timings = {}
    for name, fn in (("llama", lambda: train_llama(corpus, out, cfg["llama"], seed, tok)),
                     ("whisper", lambda: train_whisper(corpus, out, cfg["whisper"], seed)),
                     ("wavlm", lambda: train_wavlm(corpus, out, cfg["wavlm"], seed))):
        t = time.time()
        result.update(fn())
        timings[name] = round(time.time() - t, 1)
    result["seconds"] = timings
    result["total_seconds"] = round(time.time() - t0, 1)
    with open(done_path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(done_path + ".tmp", done_path)
    log(f"done in {result['total_seconds']} s -> {out}/{{whisper,wavlm,llama}}")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="wavllm-toy-pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, help="toy corpus folder (wavllm-make-toy-corpus --out)")
    p.add_argument("--out", required=True, help="folder for whisper/, wavlm/ and llama/ (with tokenizer.model)")
    p.add_argument("--size", choices=sorted(SETTINGS), default="default")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--force", action="store_true", help="retrain even when a cached result matches")
    args = p.parse_args(argv)
    pretrain(args.corpus, args.out, args.size, args.seed, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
