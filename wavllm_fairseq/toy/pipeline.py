"""The embedded default, end to end: corpus -> backbones -> encoder cache -> [stage 1a: CTC alignment] -> stage 1
-> stage 2 -> decode -> score.

    python -m wavllm_fairseq.toy.pipeline [--recipe small_real|toy] [--work DIR] [--corpus DIR]
        [--size default|small] [--seed 1] [--train-seed N] [--stage1-updates N] [--stage2-updates N]
        [--align on|off] [--align-updates N] [--override KEY=VALUE ...]
        [--skip-train]   # --skip-train reuses the checkpoints found in --work

``--recipe small_real`` (the default; ``config/small_real``, architecture ``wavllm_small_real``): real
Whisper tiny.en and SmolLM2-135M-Instruct converted from the pip packages by ``wavllm-prepare-small-backbones``
(under ``--work``/real_backbones), a WavLM stand-in trained by stage 0 on the corpus for the acoustic branch
(no WavLM ships on pip), SmolLM2's own chat template, a corpus spoken by flite voices the real Whisper
hears (``wavllm-make-toy-corpus --voices flite``: every task of the paper, SQQA and CoT included), the
frozen encoders' outputs cached once (``wavllm-cache-encoders``), then stage 1a (``small_real_align.yaml``,
criterion ``wavllm_ctc_align``): the adapters and the projector trained with CTC against SmolLM2's own token
embeddings, without the LLM, so that stage 1 starts from a speech span the LLM can read. It also measures
what the backbones do alone: Whisper tiny.en's own WER on the ASR test clips and the LLM's accuracy on the
SQQA questions as text (references.py). ``--recipe toy``: every backbone a stand-in trained from scratch by
stage 0, on the espeak-ng corpus (the fast tests' recipe).

Every step is the real tool a user runs: ``wavllm-make-toy-corpus``, ``wavllm-toy-pretrain``,
``fairseq-hydra-train`` (the yamls of ``config/toy``, package data of ``wavllm_fairseq.toy``),
``fairseq-generate`` on every test manifest and ``wavllm-score``. Results: one table of per-task held-out
scores for stage 1 and stage 2 (seen and unseen prompts) with the wall time of each step,
``results.json``, ``results.md`` and PNG plots of the loss curves and of the scores, all under ``--work``.
``--work`` and ``--corpus`` are relative to the current directory (defaults: ``work_real`` / ``manifests/real``
for small_real, ``work_toy`` / ``manifests/toy`` for toy).
"""
import argparse
import json
import os
import sys
import time
from typing import Dict, Optional, Sequence, Tuple

from ..tools import small_backbones
from . import corpus as toy_corpus
from . import references, stage0
from .breakdown import breakdown, format_breakdown
from .report import write_report
from .steps import (REAL_SYSTEM_PROMPT, Recipe, decode_all, decode_one, log, run, score_all,  # noqa: F401
                    test_manifests, train_stage)


# settings of the two toy sizes: (stage-1 updates, stage-2 updates)
SIZES = {"default": dict(align_updates=None, stage1_updates=None, stage2_updates=None),
         "small": dict(align_updates=20, stage1_updates=30, stage2_updates=20)}
RECIPES = ("small_real", "toy")
DEFAULTS = {"small_real": dict(work="work_real", corpus=os.path.join("manifests", "real"), voices="flite"),
            "toy": dict(work="work_toy", corpus=os.path.join("manifests", "toy"), voices="espeak")}
# test sets the stage-1 model of small_real is decoded on (instruction following and ASR before stage 2)
REAL_STAGE1_TESTS = ("test_asr", "test_multi")


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """The command line, checked; ``train_seed`` filled in, ``decode_stages`` as a sorted list of ints."""
    p = argparse.ArgumentParser(prog="python -m wavllm_fairseq.toy.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=RECIPES, default="small_real",
                   help="small_real: real Whisper tiny.en + SmolLM2-135M-Instruct on the flite corpus (default); "
                        "toy: every backbone a stand-in from stage 0, on the espeak-ng corpus")
    p.add_argument("--work", default=None,
                   help="where backbones, checkpoints, outputs go (default: work_real, or work_toy for --recipe toy)")
    p.add_argument("--corpus", default=None,
                   help="corpus folder (default: manifests/real, or manifests/toy for --recipe toy)")
    p.add_argument("--size", choices=sorted(SIZES), default="default")
    p.add_argument("--encoder-cache", default=None, choices=["on", "off"],
                   help="cache the frozen encoders' outputs (default: on for small_real, off for toy)")
    p.add_argument("--baseline", default=None, choices=["on", "off"],
                   help="decode test_asr with the untrained stage-1 model too (default: on for toy, off for "
                        "small_real)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--jobs", type=int, default=2, help="parallel fairseq-generate processes")
    p.add_argument("--max-len-b", type=int, default=60)
    p.add_argument("--skip-train", action="store_true", help="reuse existing checkpoints in --work")
    p.add_argument("--decode-stages", default="1,2",
                   help="which stages' checkpoints decode every test set (comma list)")
    p.add_argument("--train-seed", type=int, default=None,
                   help="common.seed of stages 1 and 2 (default: --seed); the corpus and stage 0 keep --seed, so "
                        "runs differing only here measure the run-to-run spread of training")
    for stage in (1, 2):
        p.add_argument(f"--stage{stage}-updates", type=int, default=None, metavar="N",
                       help=f"stage-{stage} updates (default: the toy config's, or the --size preset); "
                            "warm-up 10%% of N")
    p.add_argument("--align", default="on", choices=["on", "off"],
                   help="stage 1a, the CTC alignment warm-up before stage 1, where the recipe has one (small_real)")
    p.add_argument("--align-updates", type=int, default=None, metavar="N",
                   help="stage-1a updates (default: the config's, or the --size preset); warm-up 10%% of N")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra hydra override for stages 1 and 2 (not stage 1a), e.g. task.prompt_augment=true "
                        "(repeatable)")
    args = p.parse_args(argv)
    defaults = DEFAULTS[args.recipe]
    args.work = args.work or defaults["work"]
    args.corpus = args.corpus or defaults["corpus"]
    args.encoder_cache = (args.encoder_cache or ("on" if args.recipe == "small_real" else "off")) == "on"
    args.baseline = (args.baseline or ("on" if args.recipe == "toy" else "off")) == "on"
    args.train_seed = args.seed if args.train_seed is None else args.train_seed
    args.align = args.align == "on"
    args.decode_stages = sorted({int(s) for s in args.decode_stages.split(",") if s.strip()})
    if not args.decode_stages or any(s not in (1, 2) for s in args.decode_stages):
        p.error("--decode-stages takes 1, 2 or 1,2")
    if any("=" not in o for o in args.override):
        p.error("--override takes KEY=VALUE")
    if any(n is not None and n < 1 for n in (args.align_updates, args.stage1_updates, args.stage2_updates)):
        p.error("--align-updates / --stage1-updates / --stage2-updates take a positive number of updates")
    return args


def _backbones(args: argparse.Namespace, work: str, corpus: str,
               times: Dict[str, float]) -> Tuple[Recipe, dict, dict]:
    """The corpus, stage 0 and, for ``small_real``, the converted real backbones and what they score alone;
    the recipe, stage 0's result (its held-out checks) and the references (small_real)."""
    t = time.time()
    voices = DEFAULTS[args.recipe]["voices"]
    log(f"corpus ({voices}) -> {corpus}")
    if toy_corpus.main(["--out", corpus, "--seed", str(args.seed), "--size", args.size,
                        "--voices", voices]) not in (0, None):
        raise SystemExit("corpus generation failed")
    times["corpus"] = time.time() - t

    t = time.time()
    backbones = os.path.join(work, "backbones")
    only = ("wavlm",) if args.recipe == "small_real" else stage0.BACKBONES
    log(f"stage 0 ({', '.join(only)} stand-in{'s' if len(only) > 1 else ''}, cached) -> {backbones}")
    standins = stage0.pretrain(corpus, backbones, args.size, args.seed, only=only)
    times["stage0"] = time.time() - t

    recipe = Recipe("toy", {k: os.path.join(backbones, k) for k in ("whisper", "wavlm", "llama")})
    refs: dict = {}
    if args.recipe == "small_real":
        t = time.time()
        recipe, refs = _small_real_recipe(work, corpus, os.path.join(backbones, "wavlm"))
        times["real backbones + references"] = time.time() - t
    if args.encoder_cache:
        recipe.use_encoder_cache(os.path.join(work, "encoder_cache"))
        t = time.time()
        _fill_encoder_cache(corpus, recipe, args.train_seed, os.path.join(work, "encoder_cache.log"))
        times["encoder cache"] = time.time() - t
    return recipe, standins, refs


def _small_real_recipe(work: str, corpus: str, wavlm: str) -> Tuple[Recipe, dict]:
    """Convert the real small backbones into ``work/real_backbones``; Whisper's own WER on test_asr and the
    LLM's accuracy on the test_sqqa questions as text; ``train_sqqa_llm.tsv``, the SQQA training rows with
    the LLM's own answers for targets."""
    small_backbones.require_packages()
    log(f"real small backbones -> {os.path.join(work, 'real_backbones')}")
    whisper_dir, llm_dir = small_backbones.prepare(os.path.join(work, "real_backbones"))
    refs = {"whisper_wer": references.whisper_ceiling(whisper_dir, os.path.join(corpus, "test_asr.tsv"))}
    log(f"Whisper tiny.en alone: WER {refs['whisper_wer']['wer']:.2f} on the {refs['whisper_wer']['clips']} "
        "test_asr clips")
    sqqa = os.path.join(corpus, "test_sqqa.tsv")
    if os.path.isfile(sqqa):
        refs["llm_text_sqqa"] = references.llm_text_accuracy(llm_dir, sqqa, REAL_SYSTEM_PROMPT)
        log(f"SmolLM2 alone, questions as text: accuracy {refs['llm_text_sqqa']['accuracy']:.3f} on the "
            f"{refs['llm_text_sqqa']['questions']} test_sqqa questions")
    train_sqqa = os.path.join(corpus, "train_sqqa.tsv")
    if os.path.isfile(train_sqqa):  # the yamls train SQQA on the LLM's own answers (references.py)
        info = references.self_answer_manifest(llm_dir, train_sqqa, os.path.join(corpus, "train_sqqa_llm.tsv"),
                                               REAL_SYSTEM_PROMPT)
        log(f"SQQA training targets: SmolLM2's own answers to the {info['questions']} questions as text -> "
            f"{info['out']}")
    return Recipe("small_real", {"whisper": whisper_dir, "wavlm": wavlm, "llama": llm_dir}), refs


def _fill_encoder_cache(corpus: str, recipe: Recipe, seed: int, log_path: str) -> None:
    """``wavllm-cache-encoders`` over every manifest with the stage-1 yaml and the recipe's overrides."""
    log(f"encoder cache -> {recipe.encoder_cache} (every clip of every manifest, once)")
    argv = ["--config-dir", recipe.config_dir, "--config-name", recipe.config_name(1), f"task.data={corpus}",
            f"common.seed={seed}", *recipe.overrides()]
    run([sys.executable, "-m", "wavllm_fairseq.tools.cache_encoders", *argv], log_path)


def _train(args: argparse.Namespace, work: str, corpus: str, recipe: Recipe, times: Dict[str, float]) -> dict:
    """Stage 1a where the recipe has one (``<recipe>_align.yaml``, unless ``--align off``), then stages 1 and 2,
    each starting from the checkpoint of the one before (or the checkpoints in ``work`` with ``--skip-train``);
    stage ("align", 1, 2) -> checkpoint."""
    size = SIZES[args.size]
    stages = (["align"] if args.align and recipe.has_align else []) + [1, 2]
    ckpts: dict = {}
    init: Optional[str] = None
    for stage in stages:
        name = "align" if stage == "align" else f"stage{stage}"  # its folder, --<name>-updates, SIZES key
        t = time.time()
        out = os.path.join(work, name)
        ckpt = os.path.join(out, "checkpoint_last.pt")
        if not (args.skip_train and os.path.isfile(ckpt)):
            what = "stage 1a (CTC alignment to the LLM's token embeddings)" if stage == "align" else f"stage {stage}"
            log(f"{what} training -> {out}")
            # --<name>-updates keeps the configs' warm-up of 10% of max_update; the --size preset does not touch it
            asked = getattr(args, f"{name}_updates")
            extra = [f"common.seed={args.train_seed}"] + ([] if stage == "align" else args.override)
            ckpt = train_stage(stage, corpus, recipe, out, asked or size[f"{name}_updates"], init, extra,
                               warmup=max(1, round(asked / 10)) if asked else None)
        ckpts[stage] = init = ckpt
        times["stage1a (CTC alignment)" if stage == "align" else name] = time.time() - t
    return ckpts


def _evaluate(args: argparse.Namespace, work: str, corpus: str, recipe: Recipe, ckpts: dict,
              times: Dict[str, float]) -> dict:
    """The untrained baseline on test_asr (``--baseline``), then the test sets decoded and scored with each
    decoded stage (small_real's stage 1: ``REAL_STAGE1_TESTS``)."""
    results = {}
    if args.baseline:
        results["untrained"] = _baseline(args, work, corpus, recipe, times)
    for stage in args.decode_stages:
        t = time.time()
        only_some = recipe.name == "small_real" and stage == 1 and 2 in args.decode_stages
        subsets = REAL_STAGE1_TESTS if only_some else None
        log(f"decoding {'every test manifest' if subsets is None else ', '.join(subsets)} with the stage-{stage} model")
        generated = decode_all(corpus, ckpts[stage], os.path.join(work, "decode", f"stage{stage}"), args.max_len_b,
                               args.jobs, recipe.decode_args, subsets)
        results[f"stage{stage}"] = score_all(corpus, generated, os.path.join(work, "decode", f"stage{stage}"))
        times[f"decode+score stage{stage}"] = time.time() - t
    return results


def _baseline(args: argparse.Namespace, work: str, corpus: str, recipe: Recipe, times: Dict[str, float]) -> dict:
    """test_asr scored with the stage-1 model before any update."""
    t = time.time()
    log("baseline: the stage-1 model before any update (random adapters/LoRA B = 0) on test_asr")
    base_dir = os.path.join(work, "untrained")
    base = train_stage(1, corpus, recipe, base_dir, 1, None,
                       [f"common.seed={args.train_seed}", "optimization.lr=[1e-12]", "lr_scheduler.warmup_updates=0",
                        "dataset.validate_interval_updates=0", "dataset.disable_validation=true"], echo=False)
    gen = {"test_asr": decode_one(corpus, base, "test_asr", os.path.join(work, "decode", "untrained"), args.max_len_b,
                                  recipe.decode_args)}
    times["baseline (untrained) on test_asr"] = time.time() - t
    return score_all(corpus, gen, os.path.join(work, "decode", "untrained"))


def _prompt_tsne(work: str, corpus: str, ckpt: str, times: Dict[str, float]) -> None:
    """``wavllm-plot-prompt-tsne`` of the stage-2 model on every test set -> ``work/prompt_tsne.png``."""
    t = time.time()
    manifests = [os.path.join(corpus, s + ".tsv") for s in test_manifests(corpus)]
    log_path = os.path.join(work, "tsne.log")
    try:
        run([sys.executable, "-m", "wavllm_fairseq.evaluation.tsne", "--checkpoint", ckpt, "--manifests", *manifests,
             "--out", os.path.join(work, "prompt_tsne.png")], log_path, echo=False)
        log(f"wrote {os.path.join(work, 'prompt_tsne.png')} (prompt adapter outputs r by task, paper figure 2)")
    except SystemExit:  # a plot that cannot be drawn (e.g. the same r for every prompt) is reported, not fatal
        with open(log_path) as f:
            last = [line for line in f.read().splitlines() if line.strip()][-1:]
        log(f"no t-SNE plot: {last[0] if last else 'see ' + log_path}")
    times["t-SNE of prompt adapter outputs"] = time.time() - t


def _write_results(work: str, corpus: str, results: dict, times: Dict[str, float], standins: dict,
                   decode_stages: Sequence[int], refs: Optional[dict] = None, recipe: str = "toy") -> None:
    """Each decoded stage's error breakdown, the report (results.md, results.json, plots), and the table."""
    where = {}
    every = set(test_manifests(corpus))
    for stage in decode_stages:  # where each stage's answers go: right, wrong, another task's, neither
        if set(results.get(f"stage{stage}", {})) != every:
            continue  # decoded on some test sets only (small_real's stage 1): "another task's" needs them all
        out = os.path.join(work, "decode", f"stage{stage}")
        counts = breakdown(corpus, out)
        with open(os.path.join(out, "breakdown.json"), "w") as f:
            json.dump(counts, f, indent=1)
        where[stage] = format_breakdown(counts)
        with open(os.path.join(out, "breakdown.md"), "w") as f:
            f.write(where[stage] + "\n")
    table = write_report(work, results, times, standins, refs, recipe)
    if not where:
        print(table)
        return
    last = max(where)
    where_title = (f"Where the stage-{last} answers go (python -m wavllm_fairseq.toy.breakdown; each decoded stage: "
                   "decode/stage<N>/breakdown.md)")
    with open(os.path.join(work, "results.md"), "a") as f:
        f.write(f"\n{where_title}\n\n{where[last]}\n")
    print(f"{table}\n\n{where_title}\n\n{where[last]}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m wavllm_fairseq.toy.pipeline`` (every step, then the report) on ``argv`` (default:
    ``sys.argv[1:]``); returns the exit status."""
    args = _parse_args(argv)
    work, corpus = os.path.abspath(args.work), os.path.abspath(args.corpus)
    os.makedirs(work, exist_ok=True)
    times: Dict[str, float] = {}
    t_all = time.time()
    recipe, standins, refs = _backbones(args, work, corpus, times)
    ckpts = _train(args, work, corpus, recipe, times)
    results = _evaluate(args, work, corpus, recipe, ckpts, times)
    _prompt_tsne(work, corpus, ckpts[2], times)
    times["total"] = time.time() - t_all
    _write_results(work, corpus, results, times, standins, args.decode_stages, refs, recipe.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
