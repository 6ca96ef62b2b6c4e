#!/usr/bin/env python3
"""Where listening is lost, measured on a finished main job's checkpoints (no training):

    python examples/wavllm/scripts/listening_probes.py ctc CKPT [--manifest test_asr] [--clips 40]
    python examples/wavllm/scripts/listening_probes.py oracle CKPT [--span tokens|scaled|stretched] [--clips 20]

``ctc``: what the adapters alone hear after stage 1a: greedy CTC decoding of the stage-1a checkpoint's frame
scores (``WavLLMCTCAlign.greedy_decode``), WER per sentence source (grammar / open vocabulary) on the unique clips
of a manifest. ``oracle``: what the LLM does with a speech span it could read: the span of a stage-1 or stage-2
checkpoint replaced by the transcript's own token embeddings (``tokens``), those times the frames' norm ratio
(``scaled``, the 12x that CTC grows the frames to) or each token three times (``stretched``, as a frame rate
would), asked "Transcribe the audio." on the open-vocabulary clips of test_asr. Run from the repository root after
the main job (``--work work_real``, ``--corpus manifests/real``); prints one JSON line.
"""
import argparse
import json
import os
from typing import Dict, List, Tuple

import torch

from wavllm_fairseq.criterions.ctc_align import WavLLMCTCAlign
from wavllm_fairseq.data.audio import load_audio
from wavllm_fairseq.data.encoder_cache import attach_encoder_cache
from wavllm_fairseq.evaluation.metrics import wer
from wavllm_fairseq.hub import WavLLM
from wavllm_fairseq.models.checkpoint_io import load_checkpoint_file
from wavllm_fairseq.toy.breakdown import wer_by_source
from wavllm_fairseq.toy.references import unique_clips
from wavllm_fairseq.toy.tables import sentence_source


def ctc(args) -> dict:
    m = WavLLM.from_pretrained(args.ckpt, merge_lora=False, trust_checkpoint=True)
    attach_encoder_cache(m.model, os.path.join(args.work, "encoder_cache"), "float16")
    m.task.llm_dim = m.model.llm_dim  # what task.build_model sets in training
    crit = WavLLMCTCAlign.from_checkpoint(m.task, load_checkpoint_file(args.ckpt, trust=True))
    by_source: Dict[str, List[Tuple[str, str]]] = {}
    for audio, text in unique_clips(os.path.join(args.corpus, args.manifest + ".tsv")):
        by_source.setdefault(sentence_source(text), []).append((audio, text))
    refs, hyps = [], []
    for clips in by_source.values():
        for audio, text in clips[: args.clips]:
            a = torch.from_numpy(load_audio(audio, ""))[None]
            ids = crit.greedy_decode(m.model, {"audio": a, "audio_lengths": torch.tensor([a.shape[1]])})[0]
            refs.append(text)
            hyps.append(m.tokenizer.decode(ids))
    return {"probe": "ctc", "manifest": args.manifest,
            "wer": {src: {"wer": w, "clips": n} for src, (w, n) in wer_by_source(refs, hyps).items()},
            "examples": [[r, h] for r, h in list(zip(refs, hyps))[-3:]]}


def oracle(args) -> dict:
    m = WavLLM.from_pretrained(args.ckpt, merge_lora=False, trust_checkpoint=True)
    emb = m.model.llm.get_input_embeddings()
    current = {}

    def transcript_span(audio, lengths):  # replaces encode_speech: the span is the transcript's embeddings
        ids = torch.tensor(m.tokenizer.encode(" " + current["text"]))
        if args.span == "stretched":
            ids = ids.repeat_interleave(3)
        x = emb(ids)[None].detach() * (args.scale if args.span == "scaled" else 1.0)
        return x, torch.tensor([x.shape[1]])

    m.model.encode_speech = transcript_span
    refs, hyps = [], []
    clips = [(audio, text) for audio, text in unique_clips(os.path.join(args.corpus, "test_asr.tsv"))
             if sentence_source(text) != "grammar"]
    for audio, text in clips[: args.clips]:
        current["text"] = text
        hyps.append(m.generate([audio], ["Transcribe the audio."], beam=1, max_len_b=60)[0])
        refs.append(text)
    return {"probe": "oracle", "span": args.span, "wer": round(wer(refs, hyps), 2), "clips": len(refs),
            "examples": [[r, h] for r, h in list(zip(refs, hyps))[:3]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("probe", choices=["ctc", "oracle"])
    p.add_argument("ckpt")
    p.add_argument("--work", default="work_real")
    p.add_argument("--corpus", default=os.path.join("manifests", "real"))
    p.add_argument("--manifest", default="test_asr", help="ctc: the manifest whose unique clips are decoded")
    p.add_argument("--clips", type=int, default=None, help="clips per sentence source (ctc: 40) or in all (oracle: 20)")
    p.add_argument("--span", default="tokens", choices=["tokens", "scaled", "stretched"])
    p.add_argument("--scale", type=float, default=12.0, help="oracle --span scaled: the factor")
    args = p.parse_args()
    args.clips = args.clips or (40 if args.probe == "ctc" else 20)
    print(json.dumps(ctc(args) if args.probe == "ctc" else oracle(args)))


if __name__ == "__main__":
    main()
