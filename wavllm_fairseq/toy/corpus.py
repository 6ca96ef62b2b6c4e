"""The embedded toy corpus: synthetic multi-task speech made with espeak-ng (SPEC section 8).

    wavllm-make-toy-corpus --out manifests/toy [--seed 1] [--size small|default] [--jobs 2] [--force]

Speech: sentences of a small grammar (``the big red cat follows the dog near the river``) spoken by
espeak-ng voices = accent x variant (8 English accents x 26 male/female variants), with per-clip
pitch, speed and loudness jitter and one of four speaking styles (neutral / happy / sad / angry, each
moving pitch, speed and amplitude by more than the jitter). Test voices (4 variants held out in every
accent) and test sentences (a seeded 15% of the grammar) never occur in training.

Tasks (manifest ``<split>_<task>.tsv``; the same clip serves several tasks with different prompts,
so the model must read the instruction): ``asr``; ``st`` (toy English->German by a deterministic word
and phrase mapping); ``sv`` (two utterances in one clip, same or different voice: "Is there only one
speaker in the audio clip?"); ``er`` (speaking style, 4 classes); ``gender``; ``sqa`` (which object is
mentioned); ``it`` (text-only instructions about words); ``multi`` (stage 2: 2-3 of the above joined
with "To begin,", "Then,", "Lastly,", answered in order, each answer starting with a marker that repeats
the key part of its prompt). Every task has >= 10 training (seen) prompts and a disjoint unseen pool
of 5 used only by ``test_<task>_unseen.tsv`` (same clips as ``test_<task>.tsv``, other prompts).

Synthesis runs espeak-ng's C library (``espeak.py``; the same samples as the ``espeak-ng`` command),
which also reports where each word starts. Every speech row records its clip: ``transcript`` (the
spoken words; two sentences in an SV clip), ``word_samples`` (JSON [start, end) 16 kHz sample span of
each of those words: the alignment stage 0 trains the Whisper stand-in with), ``style`` and
``n_speakers`` (1, or 2 in an SV clip with two voices).

Data: the grammar's words and their German (``data/lexicon.json``), the voices and styles
(``data/voices.json``), the answer markers, multi-task combinations and text-only instruction templates
(``data/tasks.json``) and the prompt pools of the speech tasks (``manifests/prompts/<task>.{seen,unseen}.txt``
of the repository checkout, one prompt per line as ``wavllm-convert-s2t-manifest --prompts`` reads them).

Also written: ``prompts/<task>.{seen,unseen}.txt``, ``lm_text.txt`` (all training text, for the toy
tokenizer and LM of stage 0) and ``corpus.json`` (seed, size, counts, voice split). Deterministic for a
seed (same manifests byte for byte); a second run with the same seed, size and format is skipped.
"""
import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import soundfile as sf

from ..data.audio import resample_to_16k
from ..data.manifest import escape_cell
from . import tables
from .espeak import synthesize
from .tables import (  # noqa: F401  (the tables' names, as other modules and tests import them from here)
    ACCENTS, ADJS, CONNECTORS, DE, DE_PLACES, DETS, FEMALE, IT_TEMPLATES_SEEN, IT_TEMPLATES_UNSEEN, IT_WORDS, MALE,
    MARKERS, MULTI, NOUNS, OBJECTS, PLACES, STYLES, TEST_VARIANTS, VERBS, _h, all_sentences, is_train_sentence,
    pool_prompts, prompt_pools, translate, voices)


def __getattr__(name: str):  # ``PROMPTS`` (tables.PROMPTS), read on first use
    if name == "PROMPTS":
        return tables.PROMPTS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


SIZES = {"small": dict(train=160, test=24, valid=12, sv_train=40, multi_train=80, multi_test=16, it_train=60),
         "default": dict(train=1500, test=100, valid=40, sv_train=800, multi_train=900, multi_test=60,
                         it_train=500)}

FORMAT = 3  # 3: word alignments and what the clip holds (word_samples, transcript, style, n_speakers); a cached
# corpus of another format is rebuilt
HEADER = ["id", "audio", "n_frames", "prompt", "tgt_text", "with_speech", "task", "speaker", "gender", "label",
          "prompt_pool", "subtasks", "sub_markers", "sub_targets", "word_samples", "transcript", "style", "n_speakers"]


def log(msg: str) -> None:
    print(f"[corpus] {msg}", flush=True)


# ------------------------------------------------------------------ synthesis
def synth_clip(job) -> Tuple[str, int, List[List[int]]]:
    """One clip: espeak-ng -> 16 kHz mono PCM16 (two utterances joined by silence for SV), and the
    [start, end) sample span of every word in the written clip (the alignment stage 0 trains on)."""
    out_path, parts = job
    pieces, spans, offset = [], [], 0
    for k, (text, accent, variant, pitch, speed, amp) in enumerate(parts):
        raw, sr, starts = synthesize(text, f"{accent}+{variant}", pitch, speed, amp)
        wav = resample_to_16k(raw.astype(np.float32) / 32768.0, sr)
        starts16 = [int(round(s * 16000 / sr)) for s in starts]
        nz = np.flatnonzero(np.abs(wav) > 1e-3)  # trim espeak's leading/trailing silence
        lo, hi = (max(0, nz[0] - 800), nz[-1] + 800) if len(nz) else (0, len(wav))
        last = nz[-1] if len(nz) else hi  # the last word ends with the last sound
        wav = wav[lo:hi]
        bounds = [min(max(0, s - lo), len(wav)) for s in starts16 + [last]]
        if k == 1:  # 0.3 s of silence between the two utterances of an SV clip
            pieces.append(np.zeros(4800, dtype=np.float32))
            offset += 4800
        spans += [[int(offset + bounds[i]), int(offset + max(bounds[i], bounds[i + 1]))] for i in range(len(starts16))]
        pieces.append(wav)
        offset += len(wav)
    wav = np.clip(np.concatenate(pieces).astype(np.float32), -1, 1)
    sf.write(out_path, wav, 16000, subtype="PCM_16")
    return out_path, len(wav), spans


def voice_params(rng: np.random.Generator, style: str) -> Tuple[int, int, int]:
    dp, fs, amp = STYLES[style]
    pitch = int(np.clip(50 + dp + rng.integers(-5, 6), 5, 99))
    speed = int(165 * fs * rng.uniform(0.95, 1.05))
    return pitch, speed, int(min(200, amp * rng.uniform(0.9, 1.1)))


# ------------------------------------------------------------------ rows
def _row(**kw) -> dict:
    r = {k: "" for k in HEADER}
    r.update({k: v for k, v in kw.items() if v is not None})
    return r


def _write(path: str, rows: List[dict]) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write("\t".join(HEADER) + "\n")
        for r in rows:
            f.write("\t".join(escape_cell(str(r[c])) for c in HEADER) + "\n")
    os.replace(path + ".tmp", path)


def answer(task: str, clip: dict) -> Tuple[str, Optional[str]]:
    """(target text, label) of a single-task question about a clip."""
    if task == "asr":
        return clip["text"], None
    if task == "st":
        return clip["de"], None
    if task == "er":
        return f"The speaker sounds {clip['style']}.", clip["style"]
    if task == "gender":
        return f"The speaker is {clip['gender']}.", clip["gender"]
    if task == "sqa":
        return f"The {clip['obj']}.", clip["obj"]
    if task == "sv":
        return ("Yes, there is only one speaker." if clip["same"] else "No, there are two speakers."), (
            "yes" if clip["same"] else "no")
    raise ValueError(task)


def sub_answer(task: str, clip: Optional[dict], it_item: Optional[Tuple[str, str]]) -> str:
    if task == "it":
        return it_item[1]
    if task in ("er", "gender"):
        return clip["style" if task == "er" else "gender"]
    if task == "sv":
        return "yes" if clip["same"] else "no"
    if task == "sqa":
        return clip["obj"]
    return answer(task, clip)[0]


def clip_columns(clip: dict) -> dict:
    """What a speech row records about its clip: the spoken words and their sample spans, the speaking
    style and how many speakers it holds (SV clips: 1 or 2)."""
    return dict(word_samples=clip["word_samples"], transcript=clip["text"], style=clip["style"],
                n_speakers=1 if clip.get("same", True) else 2)


def single_rows(task: str, clips: List[dict], pool: str, rng: np.random.Generator) -> List[dict]:
    prompts = pool_prompts(task, pool)
    rows = []
    for c in clips:
        tgt, label = answer(task, c)
        rows.append(_row(id=f"{task}_{c['id']}" + ("_unseen" if pool == "unseen" else ""), audio=c["audio"],
                         n_frames=c["n_frames"], prompt=prompts[int(rng.integers(len(prompts)))], tgt_text=tgt,
                         with_speech="True", task=task,
                         speaker=c["speaker"], gender=c["gender"], label=label or "", prompt_pool=pool,
                         **clip_columns(c)))
    return rows


def it_items(words: Sequence[str], pool: str, n: int, rng) -> List[Tuple[str, str]]:
    templates = IT_TEMPLATES_SEEN if pool == "seen" else IT_TEMPLATES_UNSEEN
    out = []
    for _ in range(n):
        t, fn = templates[int(rng.integers(len(templates)))]
        w = words[int(rng.integers(len(words)))]
        out.append((t.format(w=w), fn(w)))
    return out


def multi_rows(clips: List[dict], sv_clips: List[dict], n: int, pool: str, rng, words) -> List[dict]:
    rows = []
    for i in range(n):
        combo = MULTI[i % len(MULTI)]
        c = sv_clips[int(rng.integers(len(sv_clips)))] if "sv" in combo else clips[int(rng.integers(len(clips)))]
        it = it_items(words, pool, 1, rng)[0] if "it" in combo else None
        conns = CONNECTORS[len(combo)]
        prompts, answers, subs = [], [], []
        for k, t in enumerate(combo):
            p = it[0] if t == "it" else pool_prompts(t, pool)[int(rng.integers(5 if pool == "unseen" else 10))]
            prompts.append(f"{conns[k]} {p[0].lower()}{p[1:]}")
            sub = sub_answer(t, c, it)
            subs.append(sub)
            answers.append(f"{MARKERS[t]} {sub}")
        rows.append(_row(id=f"multi_{pool}{i}_{c['id']}", audio=c["audio"], n_frames=c["n_frames"],
                         prompt=" ".join(prompts), tgt_text=" ".join(answers), with_speech="True",
                         task="+".join(combo), speaker=c["speaker"],
                         gender=c["gender"], prompt_pool=pool, subtasks=json.dumps(list(combo)), **clip_columns(c),
                         sub_markers=json.dumps([MARKERS[t] for t in combo]), sub_targets=json.dumps(subs)))
    return rows


def it_rows(words, pool, n, rng, prefix) -> List[dict]:
    return [_row(id=f"{prefix}{i}", audio="", n_frames=0, prompt=q, tgt_text=a, with_speech="False", task="it",
                 prompt_pool=pool) for i, (q, a) in enumerate(it_items(words, pool, n, rng))]


# ------------------------------------------------------------------ main
def build(out: str, seed: int, size: str, jobs: int) -> dict:
    t0 = time.time()
    sz = SIZES[size]
    rng = np.random.default_rng(seed)
    sentences = all_sentences()
    train_s = [s for s in sentences if is_train_sentence(seed, s[0])]
    test_s = [s for s in sentences if not is_train_sentence(seed, s[0])]
    wav_dir = os.path.join(out, "wav")
    os.makedirs(wav_dir, exist_ok=True)

    def make_clips(split: str, n: int, sents) -> List[dict]:
        vs = voices("test" if split in ("test", "valid") else "train")
        clips = []
        for i in range(n):
            text, parts = sents[int(rng.integers(len(sents)))]
            acc, var, gender = vs[int(rng.integers(len(vs)))]
            style = list(STYLES)[int(rng.integers(4))]
            pitch, speed, amp = voice_params(rng, style)
            clips.append(dict(id=f"{split}{i:05d}", audio=f"wav/{split}{i:05d}.wav", text=text, de=translate(parts),
                              obj=parts["obj"], style=style, gender=gender, speaker=f"{acc}+{var}",
                              synth=[(text, acc, var, pitch, speed, amp)]))
        return clips

    def make_sv(split: str, n: int, sents) -> List[dict]:
        vs = voices("test" if split in ("test", "valid") else "train")
        clips = []
        for i in range(n):
            same = i % 2 == 0
            a = vs[int(rng.integers(len(vs)))]
            b = a if same else vs[int(rng.integers(len(vs)))]
            while not same and b[1] == a[1]:  # a different speaker: another variant
                b = vs[int(rng.integers(len(vs)))]
            (t1, p1), (t2, p2) = (sents[int(rng.integers(len(sents)))] for _ in range(2))
            pa, sa, aa = voice_params(rng, "neutral")
            pb, sb, ab = (pa, sa, aa) if same else voice_params(rng, "neutral")
            clips.append(dict(id=f"{split}sv{i:05d}", audio=f"wav/{split}sv{i:05d}.wav", text=f"{t1} {t2}", same=same,
                              obj=p1["obj"], style="neutral", gender=a[2], speaker=f"{a[0]}+{a[1]}",
                              synth=[(t1, a[0], a[1], pa, sa, aa), (t2, b[0], b[1], pb, sb, ab)]))
        return clips

    train = make_clips("train", sz["train"], train_s)
    test = make_clips("test", sz["test"], test_s)
    valid = make_clips("valid", sz["valid"], test_s)
    sv_train = make_sv("train", sz["sv_train"], train_s)
    sv_test = make_sv("test", sz["test"], test_s)
    sv_valid = make_sv("valid", sz["valid"], test_s)
    every = train + test + valid + sv_train + sv_test + sv_valid
    log(f"synthesizing {len(every)} clips with espeak-ng on {jobs} processes")
    work = [(os.path.join(out, c["audio"]), c["synth"]) for c in every]
    lengths, spans = {}, {}
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        for k, (path, n, words) in enumerate(pool.map(synth_clip, work, chunksize=16)):
            lengths[path], spans[path] = n, words
            if (k + 1) % 500 == 0 or k + 1 == len(work):
                log(f"progress {k + 1}/{len(work)} clips ({time.time() - t0:.0f} s)")
    for c in every:
        c["n_frames"] = lengths[os.path.join(out, c["audio"])]
        c["word_samples"] = json.dumps(spans[os.path.join(out, c["audio"])], separators=(",", ":"))

    manifests: Dict[str, List[dict]] = {}
    words = IT_WORDS
    # training: ASR on every train clip; the other tasks on shares of them
    manifests["train_asr"] = single_rows("asr", train, "seen", rng)
    manifests["train_st"] = single_rows("st", train[: len(train) * 2 // 3], "seen", rng)
    manifests["train_er"] = single_rows("er", train[len(train) // 3:], "seen", rng)
    manifests["train_gender"] = single_rows("gender", train[: len(train) // 2], "seen", rng)
    manifests["train_sqa"] = single_rows("sqa", train[len(train) // 2:], "seen", rng)
    manifests["train_sv"] = single_rows("sv", sv_train, "seen", rng)
    manifests["train_it"] = it_rows(words, "seen", sz["it_train"], rng, "it_train")
    manifests["train_multi"] = multi_rows(train, sv_train, sz["multi_train"], "seen", rng, words)
    # validation: seen prompts; test: every clip twice, with a seen and with an unseen prompt (column
    # prompt_pool), so one decode per task gives the seen vs unseen comparison on the same audio
    for task in ("asr", "st", "er", "gender", "sqa"):
        manifests[f"valid_{task}"] = single_rows(task, valid, "seen", rng)
        manifests[f"test_{task}"] = single_rows(task, test, "seen", rng) + single_rows(task, test, "unseen", rng)
    manifests["valid_sv"] = single_rows("sv", sv_valid, "seen", rng)
    manifests["test_sv"] = single_rows("sv", sv_test, "seen", rng) + single_rows("sv", sv_test, "unseen", rng)
    manifests["valid_it"] = it_rows(words, "seen", len(valid), rng, "it_valid")
    manifests["test_it"] = (it_rows(words, "seen", len(test), rng, "it_test")
                            + it_rows(words, "unseen", len(test), rng, "it_test_unseen"))
    manifests["valid_multi"] = multi_rows(valid, sv_valid, len(valid), "seen", rng, words)
    manifests["test_multi"] = (multi_rows(test, sv_test, sz["multi_test"], "seen", rng, words)
                               + multi_rows(test, sv_test, sz["multi_test"], "unseen", rng, words))
    for name, rows in manifests.items():
        _write(os.path.join(out, name + ".tsv"), rows)

    os.makedirs(os.path.join(out, "prompts"), exist_ok=True)
    it_pools = ([t for t, _ in IT_TEMPLATES_SEEN], [t for t, _ in IT_TEMPLATES_UNSEEN])
    for task, (seen, unseen) in list(prompt_pools().items()) + [("it", it_pools)]:
        for pool, items in (("seen", seen), ("unseen", unseen)):
            with open(os.path.join(out, "prompts", f"{task}.{pool}.txt"), "w", encoding="utf-8") as f:
                f.write("\n".join(escape_cell(p) for p in items) + "\n")
    lm = []
    for name, rows in manifests.items():
        if name.startswith("train_"):
            for r in rows:
                lm += [r["prompt"], r["tgt_text"]]
    with open(os.path.join(out, "lm_text.txt"), "w") as f:
        f.write("\n".join(lm) + "\n")
    return dict(counts={k: len(v) for k, v in manifests.items()},
                train_voices=[f"{a}+{v}" for a, v, _ in voices("train")],
                test_voices=[f"{a}+{v}" for a, v, _ in voices("test")],
                train_sentences=len(train_s), test_sentences=len(test_s),
                hours_train_asr=round(sum(c["n_frames"] for c in train) / 16000 / 3600, 3))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="wavllm-make-toy-corpus", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--size", choices=sorted(SIZES), default="default")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--force", action="store_true", help="rebuild even when a corpus with this seed and size exists")
    args = p.parse_args(argv)
    if shutil.which("espeak-ng") is None:
        print("espeak-ng not found: install it (Debian: apt-get install espeak-ng) or run "
              "examples/wavllm/scripts/install.sh", file=sys.stderr)
        return 2
    out = os.path.abspath(args.out)
    meta_path = os.path.join(out, "corpus.json")
    if not args.force and os.path.isfile(meta_path):
        meta = json.load(open(meta_path))
        if meta.get("seed") == args.seed and meta.get("size") == args.size and meta.get("format") == FORMAT and all(
                os.path.isfile(os.path.join(out, n + ".tsv")) for n in meta.get("counts", {})):
            log(f"cached: {out} (seed {args.seed}, size {args.size}); --force rebuilds")
            return 0
    if os.path.isdir(out):
        for name in os.listdir(out):
            if name.endswith(".tsv") or name in ("wav", "prompts", "corpus.json", "lm_text.txt"):
                path = os.path.join(out, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    meta = build(out, args.seed, args.size, args.jobs)
    meta.update(seed=args.seed, size=args.size, format=FORMAT, seconds=round(time.time() - t0, 1))
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    log(f"done in {meta['seconds']} s: " + ", ".join(f"{k}={v}" for k, v in meta["counts"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
