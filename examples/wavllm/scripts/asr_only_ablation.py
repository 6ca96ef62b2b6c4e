#!/usr/bin/env python3
"""A short stage 1 of the main job's recipe on ASR alone, one setting changed, then test_asr decoded and scored.

    python examples/wavllm/scripts/asr_only_ablation.py ARM CLIP_NORM      # e.g. clip1 1.0, noclip 0.0

Reuses a finished main job's folders (work_real: backbones, encoder cache) and manifests/real; writes
work_real_ablation/ARM. 150 updates, warm-up 15, the small_real stage-1 yaml otherwise.
"""
import json
import os
import sys

from wavllm_fairseq.toy import steps
W = os.path.abspath("work_real")  # run from the repository root, after the main job
arm, clip = sys.argv[1], sys.argv[2]
recipe = steps.Recipe("small_real", {"whisper": f"{W}/real_backbones/whisper-tiny.en", "wavlm": f"{W}/backbones/wavlm",
                                     "llama": f"{W}/real_backbones/smollm2-135m-instruct"})
recipe.use_encoder_cache(f"{W}/encoder_cache")
out = os.path.abspath(os.path.join("work_real_ablation", arm))
corpus = os.path.abspath(os.path.join("manifests", "real"))
ck = steps.train_stage(1, corpus, recipe, out, 150, None,
                       ["common.seed=1", "task.train_manifests=train_asr", "task.train_weights=1",
                        f"optimization.clip_norm={clip}", "dataset.validate_interval_updates=0",
                        "dataset.disable_validation=true"], echo=False, warmup=15)
gen = {"test_asr": steps.decode_one(corpus, ck, "test_asr", f"{out}/decode", 60, recipe.decode_args)}
print(arm, json.dumps(steps.score_all(corpus, gen, f"{out}/decode")))
