#!/usr/bin/env python3
"""The share of answers that ignore the audio: rows answered with exactly the text given to a row whose target
differs (another clip), per test set of the stage-2 decode of a main-job run, and how often SV says "yes".

    python examples/wavllm/scripts/same_answer_check.py work_real [work_real_b ...]

Reads manifests/real/<test set>.tsv and <work>/decode/stage2/generate-<test set>.txt.
"""
import collections
import re
import sys

from wavllm_fairseq.data.manifest import read_manifest


def hyps(path):
    """row index -> detokenized hypothesis of a fairseq-generate output."""
    out = {}
    for line in open(path):
        if line.startswith("D-"):
            k, _, h = line.rstrip("\n").split("\t", 2)
            out[int(k[2:])] = h
    return out


for work in sys.argv[1:]:
    for subset in ("test_asr", "test_sqqa", "test_st"):
        rows, _ = read_manifest(f"manifests/real/{subset}.tsv")
        h = hyps(f"{work}/decode/stage2/generate-{subset}.txt")
        by_h = collections.defaultdict(set)
        for i, r in enumerate(rows):
            by_h[h[i]].add(r.tgt_text)
        shared = sum(1 for i, r in enumerate(rows) if len(by_h[h[i]]) > 1)
        print(f"{work} {subset}: {len(rows)} rows, {len(by_h)} distinct answers, {shared} rows "
              f"({100*shared/len(rows):.0f}%) answered with the same text as a row of another target")
    rows, _ = read_manifest("manifests/real/test_sv.tsv")
    h = hyps(f"{work}/decode/stage2/generate-test_sv.txt")
    yes = sum(1 for i in range(len(rows)) if re.search(r"\byes\b", h[i].lower()))
    print(f"{work} test_sv: 'yes' in {yes} of {len(rows)} answers (half the pairs are the same speaker)")
