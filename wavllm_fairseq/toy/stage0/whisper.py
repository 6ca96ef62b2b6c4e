"""The Whisper stand-in: a ``WhisperEncoder`` trained with CTC on the transcripts (word units), over the
plugin's log-mel input and windowing (``encoders.WhisperSemanticEncoder``), plus frame-level cross entropy
on the synthesizer's word alignment (manifest column ``word_samples``)."""
import json
import os
import random
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from ...evaluation.metrics import wer
from ...models.encoders import WhisperSemanticEncoder
from .data import audio, batch_wav, rows
from .loop import Batches, log, train_steps


def _words(text: str) -> List[str]:
    return text.lower().split()


def word_frame_labels(row, word_ids: List[int], frame_samples: int) -> torch.Tensor:
    """Per encoder frame (``frame_samples`` long): the id of the word spoken there (from the manifest's
    ``word_samples`` alignment, written by the corpus generator), 0 (blank) outside every word.

    Args:
        row (ManifestRow): a toy ASR row (``n_frames``, ``word_samples``).
        word_ids (List[int]): the unit id of each of its words.
        frame_samples (int): samples per encoder frame.

    Returns:
        torch.Tensor: (ceil(n_frames / frame_samples),) long labels.
    """
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
    """Train the Whisper stand-in (CTC plus the alignment's frame labels) and save it to ``out/whisper``.

    Args:
        corpus (str): the toy corpus folder.
        out (str): stage 0's output folder.
        cfg (dict): sizes and optimisation (``SETTINGS[size]["whisper"]``); ``unit``: CTC over words or
            characters; ``align_weight``: the weight of the frame labels (0: CTC alone).
        seed (int): seeds initialisation and batches.

    Returns:
        Dict[str, float]: the held-out CTC greedy WER (valid_asr) and the parameter count.
    """
    torch.manual_seed(seed)
    train = rows(corpus, "train_asr")
    valid = rows(corpus, "valid_asr")
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
    wavs, vwavs = audio(corpus, train), audio(corpus, valid)
    targets = [[index[u] for u in units(r.tgt_text)] for r in train]
    frame_targets = [word_frame_labels(r, [index[u] for u in _words(r.tgt_text)], encoder.hop_length * 2)
                     if cfg.get("align_weight") and cfg.get("unit", "char") == "word" else None for r in train]
    next_batch = Batches(random.Random(seed), len(wavs), cfg["batch"])

    def batch_loss() -> torch.Tensor:
        idx = next_batch()
        wav, lengths = batch_wav([wavs[i] for i in idx])
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
        return loss

    train_steps("whisper", encoder, list(encoder.parameters()) + list(head.parameters()), cfg, batch_loss, "ctc")
    hyps = []
    with torch.no_grad():
        for k in range(0, len(vwavs), 16):
            wav, lengths = batch_wav(vwavs[k: k + 16])
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
