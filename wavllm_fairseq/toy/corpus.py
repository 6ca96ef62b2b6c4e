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

Data (package data, ``tables.py`` reads it): the grammar's words and their German (``data/lexicon.json``),
the voices and styles (``data/voices.json``), the answer markers, multi-task combinations and text-only
instruction templates (``data/tasks.json``) and the prompt pools of the speech tasks
(``wavllm_fairseq/data/prompts/<task>.{seen,unseen}.txt``, one prompt per line as
``wavllm-convert-s2t-manifest --prompts`` reads them). The rows of each task: ``rows.py``.

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
from . import flite, flite_corpus, tables
from .espeak import synthesize
from .rows import real_task_manifests, task_manifests, write_manifest
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
# the flite corpus (--voices flite, the real small recipe): fewer clips, since a real Whisper costs more per
# clip; SQQA questions spoken sqqa_repeats times in training; CoT on the last cot_train training clips; prose_*:
# clips of prose sentences (ASR rows only)
FLITE_SIZES = {"small": dict(train=120, test=24, valid=8, sv_train=40, sv_test=16, multi_train=80, multi_test=16,
                             it_train=60, sqqa_repeats=1, cot_train=40, prose_train=40, prose_test=8, prose_valid=4),
               "default": dict(train=800, test=60, valid=16, sv_train=240, sv_test=40, multi_train=600, multi_test=40,
                               it_train=300, sqqa_repeats=2, cot_train=200, prose_train=400, prose_test=40,
                               prose_valid=8)}
VOICES = ("espeak", "flite")

FORMAT = 4  # 3: word alignments and what the clip holds (word_samples, transcript, style, n_speakers); 4: the flite
# corpus's prose and spoken-question ASR rows; a cached corpus of another format is rebuilt
# what a build writes into --out (and a rebuild removes first), besides the manifests
OUTPUTS = ("wav", "prompts", "corpus.json", "lm_text.txt")


def log(msg: str) -> None:
    """Print ``msg`` as a ``[corpus]`` progress line.

    Args:
        msg (str): the message.
    """
    print(f"[corpus] {msg}", flush=True)


# ------------------------------------------------------------------ synthesis
def synth_clip(job) -> Tuple[str, int, List[List[int]]]:
    """One clip: espeak-ng -> 16 kHz mono PCM16 (two utterances joined by silence for SV), and the
    [start, end) sample span of every word in the written clip (the alignment stage 0 trains on).

    Args:
        job (Tuple[str, list]): (wav path to write, [(text, accent, variant, pitch, speed, amplitude)] of
            each utterance).

    Returns:
        Tuple[str, int, List[List[int]]]: (the path, its samples, the word spans).
    """
    out_path, parts = job
    pieces, spans, offset = [], [], 0
    for k, (text, accent, variant, pitch, speed, amp) in enumerate(parts):
        raw, sr, starts = synthesize(text, f"{accent}+{variant}", pitch, speed, amp)
        wav = resample_to_16k(raw.astype(np.float32) / 32768.0, sr, method="poly")  # the corpus as generated so far
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
    """espeak-ng settings of one utterance: the style's pitch, speed and loudness, jittered.

    Args:
        rng (np.random.Generator): the corpus's generator.
        style (str): a key of ``STYLES``.

    Returns:
        Tuple[int, int, int]: (pitch 5-99, speed in words per minute, amplitude up to 200).
    """
    dp, fs, amp = STYLES[style]
    pitch = int(np.clip(50 + dp + rng.integers(-5, 6), 5, 99))
    speed = int(165 * fs * rng.uniform(0.95, 1.05))
    return pitch, speed, int(min(200, amp * rng.uniform(0.9, 1.1)))


def _split_voices(split: str) -> List[Tuple[str, str, str]]:
    return voices("test" if split in ("test", "valid") else "train")


def draw_clips(split: str, n: int, sents, rng: np.random.Generator) -> List[dict]:
    """Single-utterance clips: a sentence, a voice of the split and a speaking style each (not synthesized yet).

    Args:
        split (str): ``train``, ``test`` or ``valid`` (test and valid use the test voices).
        n (int): how many.
        sents (Sequence[Tuple[str, dict]]): the sentences to draw from (``all_sentences`` entries).
        rng (np.random.Generator): the corpus's generator.

    Returns:
        List[dict]: the clips (``rows.py`` lists their keys), each with ``synth``: what ``synth_clip`` speaks.
    """
    vs = _split_voices(split)
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


def draw_sv_clips(split: str, n: int, sents, rng: np.random.Generator) -> List[dict]:
    """Two-utterance clips, neutral style: alternately one voice twice and two different voices.

    Args:
        split (str): ``train``, ``test`` or ``valid``.
        n (int): how many.
        sents (Sequence[Tuple[str, dict]]): the sentences to draw from.
        rng (np.random.Generator): the corpus's generator.

    Returns:
        List[dict]: the clips, with ``same`` and ``synth`` (two utterances).
    """
    vs = _split_voices(split)
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


def _synthesize(out: str, clips: Sequence[dict], jobs: int, t0: float, engine: str = "espeak") -> None:
    """Synthesize every clip into ``out`` on ``jobs`` processes; set its ``n_frames`` and ``word_samples``
    (word spans for espeak-ng, utterance spans for flite)."""
    log(f"synthesizing {len(clips)} clips with {'espeak-ng' if engine == 'espeak' else 'flite'} on {jobs} processes")
    work = [(os.path.join(out, c["audio"]), c["synth"]) for c in clips]
    lengths, spans = {}, {}
    synth = synth_clip if engine == "espeak" else flite.synth_clip
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        for k, (path, n, words) in enumerate(pool.map(synth, work, chunksize=16)):
            lengths[path], spans[path] = n, words
            if (k + 1) % 500 == 0 or k + 1 == len(work):
                log(f"progress {k + 1}/{len(work)} clips ({time.time() - t0:.0f} s)")
    for c in clips:
        c["n_frames"] = lengths[os.path.join(out, c["audio"])]
        c["word_samples"] = json.dumps(spans[os.path.join(out, c["audio"])], separators=(",", ":"))


def _write_prompts_and_lm_text(out: str, manifests: Dict[str, List[dict]], extra_tasks: Sequence[str] = ()) -> None:
    """``prompts/<task>.{seen,unseen}.txt`` (the speech tasks' pools, ``extra_tasks``' and the IT templates)
    and ``lm_text.txt`` (every training prompt and answer)."""
    os.makedirs(os.path.join(out, "prompts"), exist_ok=True)
    it_pools = ([t for t, _ in IT_TEMPLATES_SEEN], [t for t, _ in IT_TEMPLATES_UNSEEN])
    extra = [(t, (tables.task_pool(t, "seen"), tables.task_pool(t, "unseen"))) for t in extra_tasks]
    for task, (seen, unseen) in list(prompt_pools().items()) + extra + [("it", it_pools)]:
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


# ------------------------------------------------------------------ main
def build(out: str, seed: int, size: str, jobs: int, synth: str = "espeak") -> dict:
    """Draw, synthesize and write the whole corpus into ``out``.

    Args:
        out (str): the corpus folder.
        seed (int): the corpus seed (the same seed and size give the same files, byte for byte).
        size (str): a key of ``SIZES``.
        jobs (int): synthesis processes.
        synth (str): ``espeak`` (the toy's stand-ins) or ``flite`` (the real small recipe, flite_corpus.py).

    Returns:
        dict: what ``corpus.json`` records besides seed, size and format (row counts, voices, sentences, hours).
    """
    t0 = time.time()
    sz = SIZES[size] if synth == "espeak" else FLITE_SIZES[size]
    rng = np.random.default_rng(seed)
    sentences = all_sentences()
    train_s = [s for s in sentences if is_train_sentence(seed, s[0])]
    test_s = [s for s in sentences if not is_train_sentence(seed, s[0])]
    os.makedirs(os.path.join(out, "wav"), exist_ok=True)
    if synth == "flite":
        return _build_flite(out, seed, sz, jobs, train_s, test_s, rng, t0)
    clips = {"train": draw_clips("train", sz["train"], train_s, rng),
             "test": draw_clips("test", sz["test"], test_s, rng),
             "valid": draw_clips("valid", sz["valid"], test_s, rng),
             "sv_train": draw_sv_clips("train", sz["sv_train"], train_s, rng),
             "sv_test": draw_sv_clips("test", sz["test"], test_s, rng),
             "sv_valid": draw_sv_clips("valid", sz["valid"], test_s, rng)}
    _synthesize(out, [c for split in clips.values() for c in split], jobs, t0)
    manifests = task_manifests(clips, sz, rng)
    for name, rows in manifests.items():
        write_manifest(os.path.join(out, name + ".tsv"), rows)
    _write_prompts_and_lm_text(out, manifests)
    return dict(counts={k: len(v) for k, v in manifests.items()},
                train_voices=[f"{a}+{v}" for a, v, _ in voices("train")],
                test_voices=[f"{a}+{v}" for a, v, _ in voices("test")],
                train_sentences=len(train_s), test_sentences=len(test_s),
                hours_train_asr=round(sum(c["n_frames"] for c in clips["train"]) / 16000 / 3600, 3))


def _build_flite(out: str, seed: int, sz: dict, jobs: int, train_s, test_s, rng, t0: float) -> dict:
    """``build`` for ``synth="flite"``: flite_corpus.py's clips, rows.real_task_manifests."""
    clips = flite_corpus.draw_all(seed, sz, train_s, test_s, rng)
    _synthesize(out, [c for split in clips.values() for c in split], jobs, t0, engine="flite")
    manifests = real_task_manifests(clips, sz, rng)
    for name, rows in manifests.items():
        write_manifest(os.path.join(out, name + ".tsv"), rows)
    _write_prompts_and_lm_text(out, manifests, extra_tasks=("sqqa", "cot"))
    return dict(counts={k: len(v) for k, v in manifests.items()}, voices="flite",
                train_voices=[flite.speaker_name(s) for s in flite.speakers("train")],
                test_voices=[flite.speaker_name(s) for s in flite.speakers("test")],
                train_sentences=len(train_s), test_sentences=len(test_s),
                test_questions=[q for q, _, _ in flite_corpus.question_split(seed)["test"]],
                train_prose_sentences=len(flite_corpus.prose_split(seed)["train"]),
                test_prose_sentences=len({c["text"] for c in clips["prose_test"] + clips["prose_valid"]}),
                hours_train_asr=round(sum(c["n_frames"] for c in clips["train"]) / 16000 / 3600, 3))


def _is_cached(out: str, seed: int, size: str, voices: str = "espeak") -> bool:
    """Whether ``out`` holds a complete corpus of this seed, size, voices and format."""
    meta_path = os.path.join(out, "corpus.json")
    if not os.path.isfile(meta_path):
        return False
    meta = json.load(open(meta_path))
    return (meta.get("seed") == seed and meta.get("size") == size and meta.get("format") == FORMAT
            and meta.get("voices", "espeak") == voices
            and all(os.path.isfile(os.path.join(out, n + ".tsv")) for n in meta.get("counts", {})))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``wavllm-make-toy-corpus`` on ``argv`` (default: ``sys.argv[1:]``);
    returns the exit status (2 without espeak-ng)."""
    p = argparse.ArgumentParser(prog="wavllm-make-toy-corpus", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--size", choices=sorted(SIZES), default="default")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--voices", choices=VOICES, default="espeak",
                   help="espeak: the toy's espeak-ng voices; flite: flite speakers the real Whisper hears, with SQQA, "
                        "CoT and ASR on plain English sentences beyond the grammar (the real small recipe)")
    p.add_argument("--force", action="store_true", help="rebuild even when a corpus with this seed and size exists")
    args = p.parse_args(argv)
    if args.voices == "espeak" and shutil.which("espeak-ng") is None:
        print("espeak-ng not found: install it (Debian: apt-get install espeak-ng) or run "
              "examples/wavllm/scripts/install.sh", file=sys.stderr)
        return 2
    if args.voices == "flite" and flite.check_flite():
        print(flite.check_flite(), file=sys.stderr)
        return 2
    out = os.path.abspath(args.out)
    if not args.force and _is_cached(out, args.seed, args.size, args.voices):
        log(f"cached: {out} (seed {args.seed}, size {args.size}); --force rebuilds")
        return 0
    if os.path.isdir(out):
        for name in os.listdir(out):
            if name.endswith(".tsv") or name in OUTPUTS:
                path = os.path.join(out, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    meta = build(out, args.seed, args.size, args.jobs, args.voices)
    meta.update(seed=args.seed, size=args.size, format=FORMAT, seconds=round(time.time() - t0, 1))
    with open(os.path.join(out, "corpus.json"), "w") as f:
        json.dump(meta, f, indent=1)
    log(f"done in {meta['seconds']} s: " + ", ".join(f"{k}={v}" for k, v in meta["counts"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
