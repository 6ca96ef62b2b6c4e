#!/usr/bin/env python3
"""Stage 1a's effect on ASR: CTC alignment (small_real_align.yaml), its own greedy CTC WER on test_asr, then a
short ASR-only stage 1 from it, decoded and scored; with ``--no-align`` the same stage 1 from scratch.

    python examples/wavllm/scripts/align_ablation.py ARM [--align-updates 600] [--stage1-updates 150] [--no-align]
        [--align-override criterion.norm_weight=1.0 ...] [--stage1-override KEY=VALUE ...] [--init CKPT]

Reuses a finished main job's folders (work_real: backbones, encoder cache) and manifests/real; writes
work_real_ablation/ARM. Stage 1 as in asr_only_ablation.py (ASR alone, warm-up a tenth, no validation); its test_asr
WER also per sentence source (grammar / open vocabulary). ``--init CKPT``: no stage 1a, stage 1 from CKPT (e.g. the
main job's own work_real/align/checkpoint_last.pt).
"""
import argparse
import json
import os

import torch

from wavllm_fairseq.criterions.ctc_align import WavLLMCTCAlign
from wavllm_fairseq.data.audio import load_audio
from wavllm_fairseq.data.encoder_cache import attach_encoder_cache
from wavllm_fairseq.data.manifest import read_manifest
from wavllm_fairseq.evaluation.scoring import read_hypotheses
from wavllm_fairseq.evaluation.metrics import wer
from wavllm_fairseq.hub import WavLLM
from wavllm_fairseq.models.checkpoint_io import load_checkpoint_file
from wavllm_fairseq.toy import breakdown, steps
from wavllm_fairseq.toy.references import unique_clips

W = os.path.abspath("work_real")  # run from the repository root, after the main job
CORPUS = os.path.abspath(os.path.join("manifests", "real"))


def ctc_greedy_wer(ckpt: str, clips: int = 40) -> dict:
    """Greedy CTC decoding of stage 1a's scores (the criterion's own, from its stored blank) on the first unique
    test_asr clips."""
    m = WavLLM.from_pretrained(ckpt, merge_lora=False, trust_checkpoint=True)
    attach_encoder_cache(m.model, os.path.join(W, "encoder_cache"), "float16")
    m.task.llm_dim = m.model.llm_dim  # what task.build_model sets in training
    crit = WavLLMCTCAlign.from_checkpoint(m.task, load_checkpoint_file(ckpt, trust=True))
    refs, hyps, norms, kept = [], [], [], []
    with torch.no_grad():
        for audio, text in unique_clips(os.path.join(CORPUS, "test_asr.tsv"))[:clips]:
            a = torch.from_numpy(load_audio(audio, ""))[None]
            lengths = torch.tensor([a.shape[1]])
            hyps.append(m.tokenizer.decode(crit.greedy_decode(m.model, {"audio": a, "audio_lengths": lengths})[0]))
            refs.append(text)
            x, k = m.model.encode_speech(a, lengths, shrink=False)
            norms.append(float(x[0, : int(k[0])].float().norm(dim=1).mean()))
            kept.append((int(m.model.encode_speech(a, lengths)[1][0]), int(k[0])))
    table = m.model.llm.get_input_embeddings().weight.float()
    return {"ctc_greedy_wer": round(wer(refs, hyps), 2), "clips": len(refs),
            "speech_norm": round(sum(norms) / len(norms), 2),
            "embedding_norm": round(float(table.norm(dim=1).mean()), 2),
            # the share of 80 ms frames the LLM reads (1.0 without model.speech_shrink=ctc)
            "frames_read": round(sum(a for a, _ in kept) / max(sum(b for _, b in kept), 1), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("arm")
    p.add_argument("--align-updates", type=int, default=600)
    p.add_argument("--stage1-updates", type=int, default=150)
    p.add_argument("--no-align", action="store_true")
    p.add_argument("--align-override", nargs="*", default=[], metavar="KEY=VALUE", help="stage 1a hydra overrides")
    p.add_argument("--stage1-override", nargs="*", default=[], metavar="KEY=VALUE", help="stage 1 hydra overrides "
                   "(e.g. +model.speech_shrink=ctc, with the same in --align-override: the key is not in the yamls)")
    p.add_argument("--init", default=None, help="stage 1 starts from this checkpoint (no stage 1a)")
    args = p.parse_args()
    recipe = steps.Recipe("small_real", {"whisper": f"{W}/real_backbones/whisper-tiny.en",
                                         "wavlm": f"{W}/backbones/wavlm",
                                         "llama": f"{W}/real_backbones/smollm2-135m-instruct"})
    recipe.use_encoder_cache(f"{W}/encoder_cache")
    out = os.path.abspath(os.path.join("work_real_ablation", args.arm))
    result = {}
    init = args.init
    if not args.no_align and not init:
        init = steps.train_stage("align", CORPUS, recipe, f"{out}/align", args.align_updates, None,
                                 ["common.seed=1", *args.align_override], echo=False,
                                 warmup=max(1, args.align_updates // 20))
        result["align"] = ctc_greedy_wer(init)
    ck = steps.train_stage(1, CORPUS, recipe, f"{out}/stage1", args.stage1_updates, init,
                           ["common.seed=1", "task.train_manifests=train_asr", "task.train_weights=1",
                            "dataset.validate_interval_updates=0", "dataset.disable_validation=true",
                            *args.stage1_override],
                           echo=False, warmup=max(1, args.stage1_updates // 10))
    gen = {"test_asr": steps.decode_one(CORPUS, ck, "test_asr", f"{out}/decode", 60, recipe.decode_args)}
    result["stage1"] = steps.score_all(CORPUS, gen, f"{out}/decode")["test_asr"]["asr"]
    rows, _ = read_manifest(os.path.join(CORPUS, "test_asr.tsv"))
    hyps, _ = read_hypotheses(gen["test_asr"], rows)
    result["stage1_by_source"] = breakdown.asr_by_source({"test_asr": (rows, hyps)})["test_asr"]
    print(args.arm, json.dumps(result))


if __name__ == "__main__":
    main()
