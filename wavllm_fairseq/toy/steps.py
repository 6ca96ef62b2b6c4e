"""The steps of the main job, each the real tool a user runs: fairseq-hydra-train for a stage, fairseq-generate
on a test manifest, wavllm-score; and the recipe (configs, backbone folders, encoder cache) they run with.
pipeline.py runs them in order."""
import concurrent.futures
import glob
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

CONFIG_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config")  # package data: toy/, small_real/
USER_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the plugin (common.user_dir)


# the system prompt the small_real yamls train with (task.system_prompt there); fairseq-generate needs it again
REAL_SYSTEM_PROMPT = "You are a helpful speech assistant."


class Recipe:
    """Which configs train and which backbone folders they load: the toy default, or real small weights."""

    def __init__(self, name: str, backbones: Dict[str, str]):
        self.name, self.backbones, self.encoder_cache = name, backbones, ""
        self.config_dir = os.path.join(CONFIG_ROOT, name)
        # fairseq-generate sets the task up from its own arguments: the template and system prompt the model
        # was trained with (and the encoder cache, use_encoder_cache)
        self.decode_args = (["--chat-template", "tokenizer", "--system-prompt", REAL_SYSTEM_PROMPT]
                            if name == "small_real" else [])

    def use_encoder_cache(self, folder: str) -> None:
        """Train and decode through the encoder cache in ``folder``."""
        self.encoder_cache = folder
        self.decode_args += ["--encoder-cache", folder]

    def overrides(self) -> List[str]:
        """The training overrides every stage gets: the backbone folders and the encoder cache."""
        b = self.backbones
        out = [f"model.whisper_path={b['whisper']}", f"model.wavlm_path={b['wavlm']}", f"model.llama_path={b['llama']}"]
        return out + ([f"task.encoder_cache={self.encoder_cache}"] if self.encoder_cache else [])

    def config_name(self, stage) -> str:
        """The yaml of a stage in ``config_dir``.

        Args:
            stage (int or str): 1 or 2, or ``"align"`` (the CTC alignment warm-up before stage 1).

        Returns:
            str: its name without ``.yaml``.
        """
        return f"{self.name}_align" if stage == "align" else f"{self.name}_stage{stage}"

    @property
    def has_align(self) -> bool:
        """Whether the recipe has a CTC alignment warm-up before stage 1 (``<name>_align.yaml``)."""
        return os.path.isfile(os.path.join(self.config_dir, self.config_name("align") + ".yaml"))


def log(msg: str) -> None:
    """Print ``msg`` as a timed ``[toy]`` progress line.

    Args:
        msg (str): the message.
    """
    print(f"[toy {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: List[str], log_path: str, env: Optional[dict] = None, echo: bool = True) -> None:
    """Run a command, streaming its output to ``log_path`` and its progress lines to the console; a failure
    exits with the log's tail.

    Args:
        cmd (List[str]): the command.
        log_path (str): where its output goes.
        env (Optional[dict]): variables set on top of the environment.
        echo (bool): print the command and its progress lines.
    """
    if echo:
        log("$ " + " ".join(cmd))
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **(env or {})})
        for line in proc.stdout:
            f.write(line)
            if echo and _worth_showing(line):
                sys.stdout.write("    " + line)
                sys.stdout.flush()
        rc = proc.wait()
    if rc != 0:
        tail = open(log_path).read().splitlines()[-30:]
        raise SystemExit(f"command failed ({rc}): {' '.join(cmd)}\n  log: {log_path}\n" + "\n".join(tail))


def _worth_showing(line: str) -> bool:
    keys = ('"train_inner"', "train_inner", "| valid |", "valid on", "Saved checkpoint", "done training", "epoch 0",
            "trainable", "Error", "error", "Traceback", "skipped", "progress", "[corpus", "[stage0")
    return any(k in line for k in keys) or line.startswith("{")


def test_manifests(corpus: str) -> List[str]:
    """The corpus's test sets.

    Args:
        corpus (str): the corpus folder.

    Returns:
        List[str]: the names of its ``test_*.tsv``, sorted, without ``.tsv``.
    """
    names = sorted(os.path.basename(p)[:-4] for p in glob.glob(os.path.join(corpus, "test_*.tsv")))
    if not names:
        raise SystemExit(f"no test_*.tsv manifests in {corpus}")
    return names


def train_stage(stage, corpus: str, recipe: Recipe, out: str, updates: Optional[int], init: Optional[str],
                extra: List[str], echo: bool = True, warmup: Optional[int] = None) -> str:
    """Train one stage with ``fairseq-hydra-train`` on the recipe's yaml.

    Args:
        stage (int or str): 1 or 2, or ``"align"``.
        corpus (str): the corpus folder (``task.data``).
        recipe (Recipe): the configs and backbone folders.
        out (str): the checkpoint folder.
        updates (Optional[int]): ``optimization.max_update``, or None for the yaml's.
        init (Optional[str]): a checkpoint to start from (``checkpoint.finetune_from_model``).
        extra (List[str]): further hydra overrides (they come last and win).
        echo (bool): show the command and its progress.
        warmup (Optional[int]): ``lr_scheduler.warmup_updates``, or None for the yaml's.

    Returns:
        str: the stage's ``checkpoint_last.pt``.
    """
    cmd = ["fairseq-hydra-train", "--config-dir", recipe.config_dir, "--config-name", recipe.config_name(stage),
           f"common.user_dir={USER_DIR}", f"task.data={corpus}", f"checkpoint.save_dir={out}",
           *recipe.overrides(), f"hydra.run.dir={out}/hydra"]
    if updates:
        cmd.append(f"optimization.max_update={updates}")
    if warmup is not None:
        cmd.append(f"lr_scheduler.warmup_updates={warmup}")
    if init:
        cmd.append(f"checkpoint.finetune_from_model={init}")
    run(cmd + extra, os.path.join(out, "train.log"), echo=echo)
    ckpt = os.path.join(out, "checkpoint_last.pt")
    if not os.path.isfile(ckpt):
        raise SystemExit(f"stage {stage} wrote no checkpoint in {out}")
    return ckpt


def decode_one(corpus: str, ckpt: str, subset: str, out: str, max_len_b: int, extra: List[str] = ()) -> str:
    """Decode one test set with ``fairseq-generate`` (greedy).

    Args:
        corpus (str): the corpus folder.
        ckpt (str): the checkpoint.
        subset (str): the test set (``test_asr``).
        out (str): the results folder.
        max_len_b (int): the answer's length limit.
        extra (List[str]): further fairseq-generate arguments.

    Returns:
        str: its ``generate-<subset>.txt``.
    """
    cmd = ["fairseq-generate", corpus, "--user-dir", USER_DIR, "--task", "wavllm_instruction", "--gen-subset", subset,
           "--path", ckpt, "--beam", "1", "--batch-size", "16", "--max-len-b", str(max_len_b),
           "--required-batch-size-multiple", "1", "--results-path", out, "--num-workers", "0", *extra]
    run(cmd, os.path.join(out, f"{subset}.log"), env={"OMP_NUM_THREADS": "1"}, echo=False)
    return os.path.join(out, f"generate-{subset}.txt")


def decode_all(corpus: str, ckpt: str, out: str, max_len_b: int, jobs: int, extra: List[str] = (),
               subsets: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """``decode_one`` on every test set (or ``subsets``), ``jobs`` at a time.

    Args:
        corpus, ckpt, out, max_len_b, extra: as ``decode_one``'s.
        jobs (int): parallel fairseq-generate processes.
        subsets (Optional[Sequence[str]]): the test sets (default: every ``test_*.tsv``).

    Returns:
        Dict[str, str]: test set -> its ``generate-<subset>.txt``.
    """
    subsets = list(subsets) if subsets else test_manifests(corpus)
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {s: pool.submit(decode_one, corpus, ckpt, s, out, max_len_b, extra) for s in subsets}
        done = {}
        for s, fut in futures.items():
            done[s] = fut.result()
            log(f"decoded {s}")
    return done


def score_all(corpus: str, generated: Dict[str, str], out: str) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Score each decoded test set with ``wavllm-score`` (its output kept in ``out``).

    Args:
        corpus (str): the corpus folder.
        generated (Dict[str, str]): test set -> its ``generate-<subset>.txt``.
        out (str): where the scores go.

    Returns:
        Dict[str, Dict[str, Dict[str, float]]]: {subset: {task: {metric: value}}}.
    """
    results: Dict[str, Dict[str, Dict[str, float]]] = {}
    for subset, path in generated.items():
        score_json = os.path.join(out, f"{subset}.scores.json")
        run([sys.executable, "-m", "wavllm_fairseq.evaluation.scoring", "--manifest",
             os.path.join(corpus, subset + ".tsv"), "--hypotheses", path, "--json", score_json],
            os.path.join(out, f"{subset}.score.log"), echo=False)
        nested: Dict[str, Dict[str, float]] = {}
        for key, value in json.load(open(score_json)).items():
            task, metric = key.split(" ", 1)
            nested.setdefault(task, {})[metric] = value
        results[subset] = nested
    return results
