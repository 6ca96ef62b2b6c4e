"""Instruction augmentation: vary the training prompts so that a model keys on the words naming a task.

Opt-in (``task.prompt_augment=true``): off in the paper's recipe and in the toy default (its toy runs:
examples/wavllm/toy/RESULTS.md, "Instruction augmentation"). A model fine-tuned on a dozen fixed paraphrases per task
can memorise them whole; an unheard paraphrase such as "Which sentence is spoken in the recording?"
then triggers whichever task its prompt happens to resemble. ``PromptAugmenter`` is built from the
training prompts alone: words that occur in the prompts of one task only (``transcribe``, ``German``,
``gender``...) are that task's words, and words that occur in the prompts of three or more tasks
(``the``, ``speaker``, ``audio``...) are shared. Each augmented prompt has words dropped, but keeps at
least one of its task's words, and may get one or two shared words inserted: the task's words decide,
the shared ones are noise. Only single-turn speech rows of single tasks are varied; multi-task prompts
(``task`` with ``+``), text-only and multi-round rows are left as they are. The variant of a row
depends on (seed, epoch, row), so runs repeat and resume exactly. Prompts are split into words by
``text_norm.words``, the normaliser the scorer applies too; this module does not import the scorer.
"""
import random
from typing import Dict, Iterable, List, Sequence

from . import text_norm

WORD_DROP = 0.35  # chance that a word of the prompt is dropped
SHARED_INSERT = 0.5  # chance that one or two shared words are inserted


def augmentable(row) -> bool:
    """Whether the prompt of ``row`` may be varied: a single-turn speech row of a single task (not ``a+b``).

    Args:
        row (ManifestRow): a manifest row.

    Returns:
        bool: whether it is augmentable.
    """
    return bool(row.with_speech) and "+" not in row.task and len(row.turns or [None]) == 1 and bool(row.task)


def prompt_pools(rows: Iterable) -> Dict[str, List[str]]:
    """The distinct prompts of each task among the augmentable rows.

    Args:
        rows (Iterable[ManifestRow]): manifest rows.

    Returns:
        Dict[str, List[str]]: ``{task: distinct prompts}``, in first-seen order.
    """
    pools: Dict[str, List[str]] = {}
    for r in rows:
        if augmentable(r) and r.prompt:
            pool = pools.setdefault(r.task, [])
            if r.prompt not in pool:
                pool.append(r.prompt)
    return pools


class PromptAugmenter:
    """Drops words of a prompt (one of its task's words always stays) and inserts shared words.

    Args:
        pools (Dict[str, Sequence[str]]): each task's training prompts (:func:`prompt_pools`).
        drop (float): the chance that a word is dropped.
        insert (float): the chance that one or two shared words are inserted.
    """

    def __init__(self, pools: Dict[str, Sequence[str]], drop: float = WORD_DROP, insert: float = SHARED_INSERT):
        tasks_of: Dict[str, set] = {}
        for task, prompts in pools.items():
            for prompt in prompts:
                for w in text_norm.words(prompt):
                    tasks_of.setdefault(w, set()).add(task)
        self.tasks = set(pools)
        self.specific = {w for w, ts in tasks_of.items() if len(ts) == 1}
        self.neutral = sorted(w for w, ts in tasks_of.items() if len(ts) >= 3)
        self.drop, self.insert = drop, insert

    def __call__(self, prompt: str, rng: random.Random) -> str:
        """A variant of ``prompt``.

        Args:
            prompt (str): a training prompt.
            rng (random.Random): the row's generator (seeded by seed, epoch and row).

        Returns:
            str: the varied prompt (its final ``?``, ``.`` or ``!`` kept).
        """
        words = prompt.rstrip("?.!").split()
        if not words:
            return prompt
        end = prompt[-1] if prompt[-1] in "?.!" else ""
        keep = [rng.random() >= self.drop for _ in words]
        specific = [i for i, w in enumerate(words) if set(text_norm.words(w)) & self.specific]
        if specific and not any(keep[i] for i in specific):
            keep[rng.choice(specific)] = True
        if not any(keep):
            keep[rng.randrange(len(words))] = True
        words = [w for w, k in zip(words, keep) if k]
        if self.neutral and rng.random() < self.insert:
            for _ in range(rng.randint(1, 2)):
                words.insert(rng.randrange(len(words) + 1), rng.choice(self.neutral))
        return " ".join(words) + end

    def __repr__(self) -> str:
        return (f"PromptAugmenter({len(self.tasks)} tasks, {len(self.specific)} task words, "
                f"{len(self.neutral)} shared words, drop={self.drop}, insert={self.insert})")
