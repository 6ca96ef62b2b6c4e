"""Instruction augmentation: what it varies, what it keeps, and its wiring into the training split."""
import ast
import hashlib
import os
import random
from types import SimpleNamespace

import pytest

from helpers import make_corpus
from wavllm_fairseq.data.prompt_augment import PromptAugmenter, augmentable, prompt_pools
from wavllm_fairseq.data.text_norm import words as prompt_words
from wavllm_fairseq.toy import corpus as toy
from wavllm_fairseq.tasks.instruction import WavLLMInstructionConfig, WavLLMInstructionTask

POOLS = {"asr": ["Transcribe the audio.", "What does the speaker say?"],
         "st": ["Translate the audio into German.", "Say what the speaker says in German."],
         "er": ["What emotion does the speaker express?", "Which emotion is in the audio?"]}


def test_task_words_and_shared_words_come_from_the_pools():
    aug = PromptAugmenter(POOLS)
    assert {"transcribe", "german", "translate", "emotion", "express"} <= aug.specific
    assert not {"speaker", "the", "does"} & aug.specific  # "does": asr and er
    assert aug.neutral == ["audio", "speaker", "the", "what"]  # in the prompts of all three tasks


def test_a_task_word_always_stays_and_only_shared_words_are_inserted():
    aug = PromptAugmenter(POOLS, drop=0.9, insert=1.0)
    vocab = {w for ps in POOLS.values() for p in ps for w in prompt_words(p)}
    for seed in range(200):
        out = aug("Translate the audio into German.", random.Random(seed))
        words = prompt_words(out)
        assert out.endswith(".") and words
        assert {"translate", "into", "german"} & set(words), out  # words only st prompts have
        assert set(words) <= vocab
    assert aug("Transcribe the audio.", random.Random(5)) == aug("Transcribe the audio.", random.Random(5))
    assert PromptAugmenter(POOLS, drop=0.0, insert=0.0)("What does the speaker say?", random.Random(1)) == \
        "What does the speaker say?"


def test_only_single_turn_speech_rows_of_single_tasks_are_pooled():
    def row(prompt, task, speech=True, turns=None):
        return SimpleNamespace(prompt=prompt, task=task, with_speech=speech, turns=turns or [(prompt, "x")])

    rows = [row("Transcribe.", "asr"), row("Transcribe.", "asr"), row("Say it in German.", "st"),
            row("Transcribe. Then translate.", "asr+st"), row("Spell cat.", "it", speech=False),
            row("Hi.", "chat", turns=[("Hi.", "a"), ("More.", "b")])]
    assert [augmentable(r) for r in rows] == [True, True, True, False, False, False]
    assert prompt_pools(rows) == {"asr": ["Transcribe."], "st": ["Say it in German."]}


def test_toy_pools_are_the_seen_prompts_only():
    seen = {w for task in toy.PROMPTS for p in toy.PROMPTS[task][0] for w in prompt_words(p)}
    aug = PromptAugmenter({task: seen_pool for task, (seen_pool, _) in toy.PROMPTS.items()})
    assert aug.specific | set(aug.neutral) <= seen


# (prompt, seed, variant) made by the augmenter of the toy's seen prompts, recorded from the code as it stood
# when the normaliser lived in scoring.py: the same seeds must give the same training prompts
RECORDED = [("Transcribe the audio.", 0, "Transcribe the audio speech say."),
            ("Transcribe the audio.", 1, "Transcribe does the audio spoken."),
            ("Translate the audio into German.", 2, "Translate the German."),
            ("Is the speaker male or female?", 3, "the me speaker what male or?"),
            ("What is the speaking style of the speaker?", 4, "the style is of the speaker does?"),
            ("Which object is mentioned in the audio?", 5, "Which object is mentioned in audio the?"),
            ("Is there only one speaker in the audio clip?", 6, "Is there only in the audio clip?"),
            ("Which sentence is spoken in the recording?", 7, "is in the?")]
# every toy prompt (seen and unseen) x seeds 0..19 x (drop, insert) in (0.35, 0.5), (0.9, 1.0), (0.0, 1.0), one per line
RECORDED_SWEEP = (5880, "fa544356a58a80c7b85707f7a439342f73c8cdf96576050d1d836607e9716f58")


def test_the_same_seeds_give_the_recorded_prompts():
    pools = {task: seen for task, (seen, _) in toy.PROMPTS.items()}
    aug = PromptAugmenter(pools)
    assert (len(aug.tasks), len(aug.specific), len(aug.neutral)) == (6, 71, 19)
    assert aug.neutral == ["a", "audio", "clip", "does", "in", "is", "me", "of", "recording", "say", "speaker",
                           "speech", "spoken", "tell", "the", "this", "voice", "what", "which"]
    for prompt, seed, variant in RECORDED:
        assert aug(prompt, random.Random(seed)) == variant
    out = []
    for drop, insert in ((0.35, 0.5), (0.9, 1.0), (0.0, 1.0)):
        aug = PromptAugmenter(pools, drop=drop, insert=insert)
        for task in sorted(toy.PROMPTS):
            for prompt in toy.PROMPTS[task][0] + toy.PROMPTS[task][1]:
                out += [aug(prompt, random.Random(seed)) for seed in range(20)]
    assert (len(out), hashlib.sha256("\n".join(out).encode()).hexdigest()) == RECORDED_SWEEP


def test_the_augmenter_does_not_import_the_scorer():
    import wavllm_fairseq.data.prompt_augment as augment

    imported = set()
    for node in ast.walk(ast.parse(open(augment.__file__).read())):
        if isinstance(node, ast.ImportFrom):
            imported |= {f"{node.module or ''}.{a.name}".strip(".") for a in node.names}
        elif isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
    assert "text_norm" in imported and not any("scoring" in name for name in imported), imported


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(str(tmp_path_factory.mktemp("corpus")))


def test_training_split_gets_varied_prompts_with_the_same_answers(corpus):
    cfg = WavLLMInstructionConfig(data=os.path.dirname(corpus["train_asr"]), tokenizer_dir=corpus["tok"],
                                  train_manifests="train_asr,train_it", prompt_augment=True)
    task = WavLLMInstructionTask.setup_task(cfg)
    train = task.load_dataset("train")
    asr, it = train.corpora
    assert asr.augment is not None and it.augment is asr.augment
    # the tiny corpus has one speech task: give the augmenter other tasks so words can be dropped
    asr.set_augment(PromptAugmenter({"asr": ["What is said?"], "st": ["Translate it."], "er": ["Name the emotion."]},
                                    drop=0.5), seed=3)
    tok = task.tokenizer
    variants = set()
    for epoch in (1, 2, 3, 4):
        train.set_epoch(epoch)
        for i in range(len(asr)):
            item = asr[i]
            enc, row = item["enc"], asr.rows[i]
            assert asr[i]["enc"] == enc  # repeatable for (seed, epoch, row)
            prompt = tok.decode(enc.instruction[1:])
            assert prompt_words(prompt) and set(prompt_words(prompt)) <= {"what", "is", "said"}
            variants.add(prompt)
            answer = [t for t, m in zip(enc.post, enc.post_target_mask) if m]
            assert answer == tok.encode(row.tgt_text) + [tok.eos_id]  # loss stays on the answer only
    assert len(variants) > 2
    for i in range(len(it)):  # text-only rows are left as they are
        assert it[i]["enc"] is it.encoded[i][0]
    off = WavLLMInstructionTask.setup_task(WavLLMInstructionConfig(
        data=cfg.data, tokenizer_dir=cfg.tokenizer_dir, train_manifests=cfg.train_manifests))
    assert all(c.augment is None for c in off.load_dataset("train").corpora)


def test_a_varied_prompt_that_would_not_fit_the_context_falls_back_to_the_row_s_own(corpus):
    task = WavLLMInstructionTask.setup_task(WavLLMInstructionConfig(
        data=os.path.dirname(corpus["train_asr"]), tokenizer_dir=corpus["tok"]))
    asr = task.load_corpus("train_asr")
    grow = PromptAugmenter({"asr": ["What is said?"], "st": ["What is it?"], "er": ["What is that?"]},
                           drop=0.0, insert=1.0)  # only inserts shared words: every variant is longer
    asr.set_augment(grow, seed=1)
    enc, _ = asr.encoded[0]
    assert asr[0]["enc"] != enc  # room enough: varied
    asr.max_positions = len(enc.pre) + asr.speech_frames(asr.rows[0].n_frames) + len(enc.post)
    assert asr[0]["enc"] is enc  # exactly the row's own length: kept as it is


def test_words_of_any_alphabet_stay_whole():
    assert prompt_words("Übersetze das Audio, bitte!") == ["übersetze", "das", "audio", "bitte"]
    assert prompt_words("Is this a man's voice?") == ["is", "this", "a", "man's", "voice"]
    aug = PromptAugmenter({"st": ["Übersetze das Audio."], "asr": ["Schreibe das Audio."]})
    assert "übersetze" in aug.specific and "schreibe" in aug.specific
