"""The curriculum loader: several corpora mixed by weights or temperature, phases that switch the mix
at given update numbers, duration-based batches bucketed by length; deterministic and resumable.

A curriculum YAML (``task.curriculum``)::

    corpora:                      # name -> manifest (relative to task.data, or absolute)
      asr: train_asr
      st: train_st.tsv
      it: train_it
    phases:
      - {start_update: 0, weights: {asr: 3, st: 1}}      # corpora left out get weight 0
      - {start_update: 5000, temperature: 2.0}           # p_k ∝ n_k^(1/T) over corpus sizes

or, for one phase, ``task.train_manifests=train_asr,train_st`` + ``task.train_weights=3,1`` (empty
weights: temperature sampling with ``task.sampling_temperature``).

How batches are made (:class:`CurriculumBatchSampler`). A virtual epoch holds
``updates_per_epoch * update_freq * num_shards`` batches (every shard gets ``updates_per_epoch *
update_freq`` of them after fairseq's round-robin sharding). Each batch comes from ONE corpus, drawn
with the probabilities of the phase active at that batch's update. Within a corpus, items are read
as a reshuffled stream (small corpora are cycled), taken in pools of ``pool_size``, sorted by cost
(audio samples) and cut into batches whose padded cost (``len(batch) * max cost``) stays within
``max_tokens`` and size within ``max_sentences``; the batches of a pool come out in random order.
Everything is a function of ``(seed, epoch)``, so fairseq's iterator state (epoch and position in it)
is enough to resume mid-epoch with the same order.
"""
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import yaml
from fairseq.data import iterators

from ..errors import WavLLMInputError

logger = logging.getLogger(__name__)


@dataclass
class Phase:
    """One phase of the mix: from ``start_update`` on, corpora are drawn by ``weights`` or, without
    weights, by ``temperature`` over their sizes (p_k ∝ n_k^(1/T))."""

    start_update: int = 0
    weights: Optional[Dict[str, float]] = None
    temperature: Optional[float] = None

    def probabilities(self, names: Sequence[str], sizes: Sequence[int]) -> np.ndarray:
        """The phase's sampling probabilities.

        Args:
            names (Sequence[str]): the corpora, in order.
            sizes (Sequence[int]): their numbers of rows.

        Returns:
            np.ndarray: one probability per corpus, summing to 1.

        Raises:
            WavLLMInputError: when every corpus gets weight 0.
        """
        if self.weights is not None:
            w = np.array([float(self.weights.get(n, 0.0)) for n in names])
        else:
            t = float(self.temperature or 1.0)
            w = np.array([float(s) for s in sizes]) ** (1.0 / t)
            w[np.asarray(sizes) == 0] = 0.0
        if w.sum() <= 0:
            raise WavLLMInputError(f"phase starting at update {self.start_update}: every corpus has weight 0")
        return w / w.sum()


@dataclass
class CurriculumConfig:
    """A curriculum: corpus name -> manifest, and its phases (the module docstring's YAML)."""

    corpora: Dict[str, str] = field(default_factory=dict)
    phases: List[Phase] = field(default_factory=lambda: [Phase()])


def _check(cfg: CurriculumConfig, where: str) -> CurriculumConfig:
    if not cfg.corpora:
        raise WavLLMInputError("the curriculum names no corpora", file=where)
    if not cfg.phases:
        cfg.phases = [Phase(temperature=1.0)]
    starts = [p.start_update for p in cfg.phases]
    if starts[0] != 0:
        raise WavLLMInputError(f"the first phase must start at update 0 (got {starts[0]})", file=where)
    if starts != sorted(starts) or len(set(starts)) != len(starts):
        raise WavLLMInputError(f"phase start_update values must increase strictly (got {starts})", file=where)
    for p in cfg.phases:
        if (p.weights is None) == (p.temperature is None):
            raise WavLLMInputError(f"phase at update {p.start_update}: give either weights or temperature", file=where)
        if p.weights is not None:
            unknown = sorted(set(p.weights) - set(cfg.corpora))
            if unknown:
                raise WavLLMInputError(f"phase at update {p.start_update}: weights for unknown corpora {unknown} "
                                       f"(corpora: {sorted(cfg.corpora)})", file=where)
            bad = {k: v for k, v in p.weights.items() if not float(v) >= 0}
            if bad or sum(float(v) for v in p.weights.values()) <= 0:
                raise WavLLMInputError(f"phase at update {p.start_update}: weights must be >= 0 with a positive "
                                       f"sum (got {p.weights})", file=where)
        elif not float(p.temperature) > 0:
            raise WavLLMInputError(f"phase at update {p.start_update}: temperature must be > 0", file=where)
    return cfg


def load_curriculum(path: str, root: str = "") -> CurriculumConfig:
    """Read and check a curriculum YAML.

    Args:
        path (str): the YAML file.
        root (str): not read (manifests resolve against ``task.data`` when loaded).

    Returns:
        CurriculumConfig: the corpora and phases.

    Raises:
        WavLLMInputError: naming the file, for an unreadable or inconsistent curriculum.
    """
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise WavLLMInputError(f"cannot read the curriculum ({e})", file=path, reason="missing") from e
    except yaml.YAMLError as e:
        raise WavLLMInputError(f"not valid YAML ({e})", file=path) from e
    if not isinstance(data.get("corpora"), dict):
        raise WavLLMInputError("expected a 'corpora' mapping of name -> manifest", file=path)
    corpora = {str(k): str(v) for k, v in data["corpora"].items()}
    phases = []
    for i, p in enumerate(data.get("phases") or []):
        if not isinstance(p, dict) or set(p) - {"start_update", "weights", "temperature"}:
            raise WavLLMInputError(f"phase {i + 1}: expected keys start_update and weights or temperature, got {p}",
                                   file=path)
        phases.append(Phase(int(p.get("start_update", 0)), p.get("weights"), p.get("temperature")))
    return _check(CurriculumConfig(corpora, phases), path)


def curriculum_from_subsets(manifests: str, weights: str = "", temperature: float = 1.0,
                            root: str = "") -> CurriculumConfig:
    """The one-phase curriculum of ``task.train_manifests`` + ``task.train_weights``.

    Args:
        manifests (str): comma-separated manifest names (``.tsv`` optional); each corpus is named by its stem.
        weights (str): comma-separated weights, one per manifest; empty: temperature sampling.
        temperature (float): the sampling temperature without weights.
        root (str): not read (manifests resolve against ``task.data`` when loaded).

    Returns:
        CurriculumConfig: the corpora and their phase.
    """
    names = [m.strip() for m in manifests.split(",") if m.strip()]
    corpora = {os.path.basename(n)[:-4] if n.endswith(".tsv") else os.path.basename(n): n for n in names}
    if len(corpora) != len(names):
        raise WavLLMInputError(f"task.train_manifests names a corpus twice: {manifests}")
    if weights.strip():
        w = [float(x) for x in weights.split(",")]
        if len(w) != len(names):
            raise WavLLMInputError(f"task.train_weights has {len(w)} values for {len(names)} train_manifests")
        phase = Phase(0, weights=dict(zip(corpora, w)))
    else:
        phase = Phase(0, temperature=temperature)
    return _check(CurriculumConfig(corpora, [phase]), "task.train_manifests")


def make_batches(order: np.ndarray, costs: np.ndarray, max_tokens: Optional[int],
                 max_sentences: Optional[int]) -> List[np.ndarray]:
    """Cut consecutive items into batches within the padded budget (``len(batch) * max cost``).

    Args:
        order (np.ndarray): item indices, sorted by cost.
        costs (np.ndarray): each item's cost (audio samples), indexed by item.
        max_tokens (Optional[int]): the padded budget of a batch (an item over it forms a batch alone).
        max_sentences (Optional[int]): the most items in a batch.

    Returns:
        List[np.ndarray]: the batches, in order.
    """
    batches, cur, cur_max = [], [], 0
    for i in order:
        c = int(costs[i])
        new_max = max(cur_max, c)
        over_tokens = max_tokens is not None and new_max * (len(cur) + 1) > max_tokens
        over_sents = max_sentences is not None and len(cur) + 1 > max_sentences
        if cur and (over_tokens or over_sents):
            batches.append(np.array(cur, dtype=np.int64))
            cur, new_max = [], c
        cur.append(int(i))
        cur_max = new_max
    if cur:
        batches.append(np.array(cur, dtype=np.int64))
    return batches


class _CorpusStream:
    """Endless, seeded stream of length-bucketed batches (local indices) from one corpus."""

    def __init__(self, costs: np.ndarray, rng: np.random.Generator, max_tokens, max_sentences, pool_size: int):
        self.costs, self.rng = costs, rng
        self.max_tokens, self.max_sentences, self.pool_size = max_tokens, max_sentences, pool_size
        self.items: List[int] = []
        self.ready: List[np.ndarray] = []

    def _refill(self) -> None:
        while len(self.items) < self.pool_size:
            self.items.extend(self.rng.permutation(len(self.costs)).tolist())
            if len(self.costs) == 0:
                raise WavLLMInputError("a corpus of the curriculum has no usable rows")
        pool = np.array(self.items[: self.pool_size])
        self.items = self.items[self.pool_size:]
        pool = pool[np.argsort(self.costs[pool], kind="stable")]
        batches = make_batches(pool, self.costs, self.max_tokens, self.max_sentences)
        self.ready = [batches[i] for i in self.rng.permutation(len(batches))]

    def next(self) -> np.ndarray:
        if not self.ready:
            self._refill()
        return self.ready.pop()


class CurriculumBatchSampler:
    """fairseq ``batch_sampler`` callable: ``(dataset, epoch) -> list of batches of global indices``.

    Args:
        costs (Dict[str, np.ndarray]): each corpus's item costs (audio samples).
        offsets (Dict[str, int]): each corpus's first global index (MultiCorpusDataset).
        phases (Sequence[Phase]): the curriculum's phases.
        max_tokens (Optional[int]): padded budget of a batch.
        max_sentences (Optional[int]): most items in a batch.
        seed (int): with the epoch, what every draw depends on.
        updates_per_epoch (int): updates in a virtual epoch.
        num_shards (int): data-parallel workers.
        update_freq (int): batches per update on each worker.
        pool_size (int): items sorted together before they are cut into batches.
    """

    def __init__(self, costs: Dict[str, np.ndarray], offsets: Dict[str, int], phases: Sequence[Phase],
                 max_tokens: Optional[int], max_sentences: Optional[int], seed: int, updates_per_epoch: int,
                 num_shards: int = 1, update_freq: int = 1, pool_size: int = 512):
        self.names = list(costs)
        self.costs = {n: np.asarray(costs[n], dtype=np.int64) for n in self.names}
        self.offsets = offsets
        self.phases = sorted(phases, key=lambda p: p.start_update)
        self.max_tokens, self.max_sentences = max_tokens, max_sentences
        self.seed, self.updates_per_epoch = int(seed), int(updates_per_epoch)
        self.num_shards, self.update_freq, self.pool_size = int(num_shards), int(update_freq), int(pool_size)
        sizes = [len(self.costs[n]) for n in self.names]
        self.probs = [p.probabilities(self.names, sizes) for p in self.phases]
        for p, pr in zip(self.phases, self.probs):
            mix = ", ".join(f"{n}={x:.3f}" for n, x in zip(self.names, pr))
            logger.info(f"curriculum phase from update {p.start_update}: {mix} "
                        f"(corpus sizes {dict(zip(self.names, sizes))})")
        if max_tokens is not None:
            too_big = sum(int((c > max_tokens).sum()) for c in self.costs.values())
            if too_big:
                logger.warning(f"{too_big} items cost more than max_tokens={max_tokens} on their own; "
                               "each of them forms a batch alone")

    def phase_index(self, update: int) -> int:
        """The phase in effect at an update.

        Args:
            update (int): the update number.

        Returns:
            int: its index in ``phases``.
        """
        k = 0
        for i, p in enumerate(self.phases):
            if update >= p.start_update:
                k = i
        return k

    @property
    def batches_per_epoch(self) -> int:
        """``updates_per_epoch * update_freq * num_shards``."""
        return self.updates_per_epoch * self.update_freq * self.num_shards

    def __call__(self, dataset=None, epoch: int = 1) -> List[np.ndarray]:
        """The batches of an epoch (module docstring).

        Args:
            dataset: fairseq's argument, not read.
            epoch (int): the epoch (1-based).

        Returns:
            List[np.ndarray]: ``batches_per_epoch`` batches of global indices.
        """
        rng = np.random.default_rng([self.seed, int(epoch)])
        streams = {n: _CorpusStream(self.costs[n], np.random.default_rng([self.seed, int(epoch), 1 + k]),
                                    self.max_tokens, self.max_sentences, self.pool_size)
                   for k, n in enumerate(self.names)}
        per_update = self.update_freq * self.num_shards
        batches = []
        for j in range(self.batches_per_epoch):
            update = (int(epoch) - 1) * self.updates_per_epoch + j // per_update
            name = self.names[rng.choice(len(self.names), p=self.probs[self.phase_index(update)])]
            batches.append(streams[name].next() + int(self.offsets[name]))
        return batches

    def corpus_of(self, batch: np.ndarray) -> str:
        """The corpus a batch was drawn from.

        Args:
            batch (np.ndarray): global indices.

        Returns:
            str: the corpus name.
        """
        best = None
        for n in self.names:
            if int(batch[0]) >= self.offsets[n]:
                best = n if best is None or self.offsets[n] >= self.offsets[best] else best
        return best


class CurriculumEpochBatchIterator(iterators.EpochBatchIterator):
    """fairseq's EpochBatchIterator, except that the batch order of an epoch is the curriculum's own.

    fairseq shuffles the batches of an epoch; the curriculum already draws them at random and relies
    on their position (a phase switches the mix at an update number), so they are kept in order.
    """

    def ordered_batches(self, epoch, fix_batches_to_gpus, shuffle):
        """fairseq's, never shuffled."""
        return super().ordered_batches(epoch, fix_batches_to_gpus, False)


def mix_of(batches: Sequence[np.ndarray], sampler: CurriculumBatchSampler) -> Dict[str, float]:
    """Share of batches drawn from each corpus (for logs and tests).

    Args:
        batches (Sequence[np.ndarray]): batches of global indices.
        sampler (CurriculumBatchSampler): the sampler that drew them.

    Returns:
        Dict[str, float]: corpus -> share.
    """
    counts = {n: 0 for n in sampler.names}
    for b in batches:
        counts[sampler.corpus_of(b)] += 1
    total = max(1, len(batches))
    return {n: c / total for n, c in counts.items()}


def iterate(sampler: CurriculumBatchSampler, epochs: int) -> Iterator[np.ndarray]:
    """Every batch of epochs 1..``epochs``.

    Args:
        sampler (CurriculumBatchSampler): the sampler.
        epochs (int): how many epochs.

    Yields:
        np.ndarray: batches of global indices.
    """
    for e in range(1, epochs + 1):
        yield from sampler(None, e)
