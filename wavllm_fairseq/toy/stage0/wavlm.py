"""The WavLM stand-in: a ``WavLMModel`` (per-frame LayerNorm feature extractor) trained to classify the
speaker, gender and speaking style of training clips, and same/different speaker and the frames of a
second speaker in two-utterance training clips; its frames then carry who speaks, whether the speaker
changes, and how, as WavLM's do."""
import json
import os
import random
from typing import Dict, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import WavLMConfig, WavLMModel

from .data import audio, batch_wav, rows, second_utterance
from .loop import log, train_steps


def wavlm_config(cfg: dict) -> WavLMConfig:
    """WavLM with a per-frame LayerNorm feature extractor and conv biases (WavLM-large's layout): unlike
    WavLM-base's group norm over time, it keeps the loudness a speaking style is partly made of, and it
    runs padded batches with an attention mask.

    Args:
        cfg (dict): ``hidden``, ``layers``, ``heads``, ``ffn``, ``conv_dim`` (``SETTINGS[size]["wavlm"]``).

    Returns:
        WavLMConfig: the stand-in's config.
    """
    return WavLMConfig(hidden_size=cfg["hidden"], num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                       intermediate_size=cfg["ffn"], conv_dim=(cfg["conv_dim"],) * 7, feat_extract_norm="layer",
                       conv_bias=True, num_conv_pos_embeddings=32, num_conv_pos_embedding_groups=8, mask_time_prob=0.0,
                       hidden_dropout=0.05, attention_dropout=0.05, activation_dropout=0.0, feat_proj_dropout=0.0,
                       layerdrop=0.0)


def speaker_change_labels(row, n_frames: int, frame_samples: int) -> torch.Tensor:
    """Per WavLM frame of a two-utterance SV clip: 1 on the frames of the second utterance when it has
    another speaker, else 0. The second utterance starts after the widest pause between words
    (``word_samples``).

    Args:
        row (ManifestRow): a two-utterance SV row (``label``, ``word_samples``).
        n_frames (int): WavLM frames of the clip.
        frame_samples (int): samples per WavLM frame.

    Returns:
        torch.Tensor: (n_frames,) long labels.
    """
    labels = torch.zeros(n_frames, dtype=torch.long)
    if row.extra.get("label") == "no":
        spans = json.loads(row.extra.get("word_samples") or "[]")
        labels[spans[second_utterance(spans, f"row {row.id}")][0] // frame_samples:] = 1
    return labels


def _frames(model: WavLMModel, layer_w: nn.Parameter,
            items: Sequence[np.ndarray]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax(``layer_w``)-weighted hidden states of a padded batch of waveforms, and which frames are real."""
    wav, lengths = batch_wav(items)
    mask = (torch.arange(wav.shape[1])[None] < lengths[:, None]).long()
    hs = torch.stack(model(wav, attention_mask=mask, output_hidden_states=True).hidden_states, 0)  # (L+1, B, T, C)
    mixed = (F.softmax(layer_w, 0)[:, None, None, None] * hs).sum(0)  # (B, T, C)
    valid = torch.arange(mixed.shape[1])[None] < model._get_feat_extract_output_lengths(lengths)[:, None]
    return mixed, valid  # (B, T, C), (B, T)


def _pool(mixed: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over the real frames: (B, T, C), (B, T) -> (B, C)."""
    v = valid.float()
    return (mixed * v[..., None]).sum(1) / v.sum(1, keepdim=True)  # (B, C)


def train_wavlm(corpus: str, out: str, cfg: dict, seed: int) -> Dict[str, float]:
    """Speaker, gender and style classification of whole training clips, plus, on the two-utterance SV
    training clips, same/different speaker of the clip and a per-frame speaker change (frames of a
    second speaker), from softmax-weighted hidden states. WavLM's own pre-training (masked prediction on
    mixed, overlapping utterances) is what makes its frames carry speaker identity and speaker changes;
    these objectives stand in for it. Training voices only. Saves the model to ``out/wavlm``.

    Args:
        corpus (str): the toy corpus folder.
        out (str): stage 0's output folder.
        cfg (dict): sizes and optimisation (``SETTINGS[size]["wavlm"]``).
        seed (int): seeds initialisation and batches.

    Returns:
        Dict[str, float]: held-out style, gender and same/different speaker accuracies and the parameter count.
    """
    torch.manual_seed(seed)
    train = rows(corpus, "train_asr")
    speakers = sorted({r.extra["speaker"] for r in train})
    styles = sorted({r.extra["label"] for r in rows(corpus, "train_er")})
    # the ER manifest names the style of its clips (a share of the ASR clips, which carry speaker/gender)
    style_of = {r.audio: r.extra["label"] for r in rows(corpus, "train_er")}
    model = WavLMModel(wavlm_config(cfg))
    frame_samples = int(np.prod(model.config.conv_stride))
    layer_w = nn.Parameter(torch.zeros(cfg["layers"] + 1))
    heads = nn.ModuleDict({"speaker": nn.Linear(cfg["hidden"], len(speakers)), "gender": nn.Linear(cfg["hidden"], 2),
                           "style": nn.Linear(cfg["hidden"], len(styles)), "sv": nn.Linear(cfg["hidden"], 2),
                           "change": nn.Linear(cfg["hidden"], 2)})
    er_rows = [r for r in train if r.audio in style_of]
    wavs = audio(corpus, er_rows)
    labels = [(speakers.index(r.extra["speaker"]), int(r.extra["gender"] == "male"), styles.index(style_of[r.audio]))
              for r in er_rows]
    sv_rows = rows(corpus, "train_sv")
    sv_wavs = audio(corpus, sv_rows)
    sv_labels = [int(r.extra["label"] == "yes") for r in sv_rows]
    rng = random.Random(seed)

    def batch_loss() -> torch.Tensor:
        idx = [rng.randrange(len(wavs)) for _ in range(cfg["batch"])]
        h = _pool(*_frames(model, layer_w, [wavs[i] for i in idx]))
        y = torch.tensor([labels[i] for i in idx])
        loss = (F.cross_entropy(heads["speaker"](h), y[:, 0]) + F.cross_entropy(heads["gender"](h), y[:, 1])
                + F.cross_entropy(heads["style"](h), y[:, 2]))
        sv_idx = [rng.randrange(len(sv_wavs)) for _ in range(cfg["sv_batch"])]
        mixed, valid = _frames(model, layer_w, [sv_wavs[i] for i in sv_idx])
        change = torch.full(valid.shape, -100, dtype=torch.long)
        for b, i in enumerate(sv_idx):
            n = int(valid[b].sum())
            change[b, :n] = speaker_change_labels(sv_rows[i], n, frame_samples)
        return (loss + F.cross_entropy(heads["sv"](_pool(mixed, valid)), torch.tensor([sv_labels[i] for i in sv_idx]))
                + F.cross_entropy(heads["change"](mixed).reshape(-1, 2), change.reshape(-1), ignore_index=-100))

    train_steps("wavlm", model, list(model.parameters()) + list(heads.parameters()) + [layer_w], cfg, batch_loss)
    scores = _held_out(corpus, model, layer_w, heads, styles)
    log(f"wavlm stand-in: held-out style accuracy {scores['wavlm_style_acc_valid']:.3f}, gender "
        f"{scores['wavlm_gender_acc_valid']:.3f} (valid_er), same/different speaker {scores['wavlm_sv_acc_valid']:.3f} "
        f"(clip head) / {scores['wavlm_change_acc_valid']:.3f} (frame change head) (valid_sv; unseen voices)")
    model.save_pretrained(os.path.join(out, "wavlm"))
    return {**scores, "wavlm_params": sum(p.numel() for p in model.parameters())}


def _held_out(corpus: str, model: WavLMModel, layer_w: nn.Parameter, heads: nn.ModuleDict,
              styles: Sequence[str]) -> Dict[str, float]:
    """Style and gender accuracy of the clip heads on valid_er; same/different speaker accuracy on valid_sv
    of the clip head and of the frame change head."""
    with torch.no_grad():
        valid = rows(corpus, "valid_er")
        vw = audio(corpus, valid)
        hits = {"style": 0, "gender": 0}
        for k in range(0, len(valid), 16):
            h = _pool(*_frames(model, layer_w, vw[k: k + 16]))
            for j, r in enumerate(valid[k: k + 16]):
                hits["style"] += int(styles[int(heads["style"](h[j]).argmax())] == r.extra["label"])
                hits["gender"] += int(int(heads["gender"](h[j]).argmax()) == int(r.extra["gender"] == "male"))
        scores = {f"wavlm_{k}_acc_valid": round(v / max(1, len(valid)), 4) for k, v in hits.items()}
        vsv = rows(corpus, "valid_sv")
        vsw = audio(corpus, vsv)
        sv_hits = change_hits = 0
        for k in range(0, len(vsv), 16):
            mixed, frame_ok = _frames(model, layer_w, vsw[k: k + 16])
            pred = heads["sv"](_pool(mixed, frame_ok)).argmax(-1)
            # a change is heard when >= 15% of the clip's frames are taken for a second speaker
            changed = (((heads["change"](mixed).argmax(-1) == 1) & frame_ok).float().sum(1)
                       / frame_ok.float().sum(1) >= 0.15)
            for j, r in enumerate(vsv[k: k + 16]):
                same = r.extra["label"] == "yes"
                sv_hits += int(int(pred[j]) == int(same))
                change_hits += int(bool(changed[j]) != same)
        scores["wavlm_sv_acc_valid"] = round(sv_hits / max(1, len(vsv)), 4)
        scores["wavlm_change_acc_valid"] = round(change_hits / max(1, len(vsv)), 4)
    return scores
