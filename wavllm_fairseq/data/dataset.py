"""Instruction corpora as fairseq datasets, and the collater that builds WavLLM batches.

The batch dict (what ``collate`` returns and ``WavLLMModel.forward`` / the generator consume)::

    id                   LongTensor (B,)        dataset indices of the rows (fairseq-generate's <idx>)
    utt_ids              List[str]  (B)         manifest ids
    task_names           List[str]  (B)         task of each row (per-task loss, per-task length caps)
    nsentences           int                    B
    ntokens              int                    number of target tokens (loss normaliser)
    net_input:
      audio              FloatTensor (B, T)     16 kHz mono waveform, RIGHT-padded with 0; T=0 if no speech
      audio_lengths      LongTensor (B,)        valid samples; 0 on text-only rows
      pre_tokens         LongTensor (B, P)      template tokens before the speech span (bos ... "<SPEECH>"),
                                                RIGHT-padded with pad
      pre_lengths        LongTensor (B,)
      post_tokens        LongTensor (B, Q)      tokens after the speech span: " </SPEECH> {instruction} [/INST]"
                                                + answer + eos (+ later turns), RIGHT-padded with pad
      post_lengths       LongTensor (B,)
      post_target_mask   BoolTensor (B, Q)      True on answer tokens and their eos (the only loss positions)
      prompt_post_lengths LongTensor (B,)       post tokens before the LAST answer (the generation prefix)
      instruction_tokens LongTensor (B, M)      prompt-aware adapter input: '"' + first instruction + '"'
                                                without bos (the reference's), RIGHT-padded with pad
      instruction_lengths LongTensor (B,)
    target               LongTensor (B, S)      the last answer + eos, RIGHT-padded with pad (what
                                                fairseq-generate prints as T- and scores)
    target_lengths       LongTensor (B,)

Padding side: everything is right-padded here; the model left-pads when it builds a generation
prefix (model.build_generation_prefix). Cost of an item (for duration batching, ``num_tokens``):
its number of audio samples, or ``TEXT_TOKEN_COST`` samples per token for text-only rows (one LLM
position of speech is 80 ms = 1280 samples).
"""
import bisect
import dataclasses
import logging
import random
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from fairseq.data import FairseqDataset

from ..errors import AudioError, ManifestError, WavLLMInputError
from .audio import load_audio
from .manifest import audio_base
from .prompt_augment import augmentable
from .prompt_template import DEFAULT_SYSTEM_PROMPT, encode_example

logger = logging.getLogger(__name__)

TEXT_TOKEN_COST = 1280  # samples of audio that one LLM position stands for (80 ms)


class InstructionDataset(FairseqDataset):
    """One instruction manifest (one corpus): tokenized at load, audio read in ``__getitem__``.

    Args:
        rows (Iterable[ManifestRow]): the manifest's rows (``read_manifest``).
        manifest_path (str): its file (audio paths are relative to its folder unless ``audio_root`` is given;
            errors name it).
        tokenizer (LlamaTokenizer or HFTokenizer): the LLM's tokenizer.
        corpus (str): the corpus name in logs.
        speech_frames (Callable[[int], int]): speech positions for a number of samples
            (``models.speech.expected_speech_frames``).
        max_positions (Optional[int]): the LLM context a row must fit (prompt + speech + answer).
        max_audio_seconds (Optional[float]): longer clips are errors.
        skip_bad (bool): skip (and count) bad rows and unreadable audio instead of raising.
        system_prompt (str): the chat template's system prompt.
        shuffle (bool): shuffle within length order (training) or keep the file order.
        encode (Callable[..., EncodedPrompt]): the chat template (``chat_template.prompt_encoder``).
        audio_root (Optional[str]): the folder relative audio paths start from (``task.audio_root``; None: the
            manifest's folder).
    """

    def __init__(self, rows, manifest_path: str, tokenizer, *, corpus: str, speech_frames: Callable[[int], int],
                 max_positions: Optional[int] = None, max_audio_seconds: Optional[float] = None,
                 skip_bad: bool = False, system_prompt: str = DEFAULT_SYSTEM_PROMPT, shuffle: bool = True,
                 encode=encode_example, audio_root: Optional[str] = None):
        self.manifest_path = manifest_path
        self.root = audio_base(manifest_path, audio_root)
        self.tokenizer = tokenizer
        self.corpus = corpus
        self.max_audio_seconds = max_audio_seconds
        self.skip_bad = skip_bad
        self.shuffle = shuffle
        self.pad = tokenizer.pad_id
        self.system_prompt = system_prompt
        self.encode = encode  # the chat template: chat_template.prompt_encoder(task.chat_template)
        self.max_positions = max_positions
        self.speech_frames = speech_frames
        self.augment = None  # a prompt_augment.PromptAugmenter: the training split's prompts get varied
        self.augment_seed = 0
        self.augment_rows: frozenset = frozenset()  # indices of the rows it varies
        self.epoch = 1
        self.rows, self.encoded, sizes = [], [], []
        self.skipped: Dict[str, int] = {}
        for row in rows:
            try:
                enc, gen_len = self._encode(row, system_prompt)
                n_speech, total = self._positions(row, enc)
                if max_positions is not None and total > max_positions:
                    raise ManifestError(
                        f"id={row.id}: prompt + speech + answer need {total} positions (speech {n_speech}, "
                        f"text {len(enc.pre) + len(enc.post)}) but the model's context is {max_positions}; "
                        "shorten the row or skip it with task.skip_bad_rows=true", file=manifest_path, row=row.line,
                        reason="too_long_text")
            except WavLLMInputError as e:
                if not skip_bad:
                    raise
                self._count_skip(e)
                continue
            self.rows.append(row)
            self.encoded.append((enc, gen_len))
            sizes.append(row.n_frames if row.with_speech else TEXT_TOKEN_COST * (len(enc.pre) + len(enc.post)))
        self.sizes = np.asarray(sizes, dtype=np.int64)
        if skip_bad and self.skipped:
            logger.warning(f"{manifest_path}: skipped {sum(self.skipped.values())} bad rows {self.skipped}")

    def _positions(self, row, enc) -> Tuple[int, int]:
        """(speech positions, all positions) of ``row`` encoded as ``enc``."""
        n_speech = self.speech_frames(row.n_frames) if row.with_speech else 0
        return n_speech, len(enc.pre) + n_speech + len(enc.post)

    def _count_skip(self, err: WavLLMInputError) -> None:
        self.skipped[err.reason] = self.skipped.get(err.reason, 0) + 1
        logger.warning(f"skipping: {err}")

    def _encode(self, row, system_prompt):
        turns = list(row.turns)
        enc = self.encode(self.tokenizer, turns, row.with_speech, system=system_prompt)
        gen = self.encode(self.tokenizer, turns[:-1] + [(turns[-1][0], None)], row.with_speech, system=system_prompt)
        if enc.post[: len(gen.post)] != gen.post or enc.pre != gen.pre:
            raise ManifestError(f"id={row.id}: the generation prefix is not a prefix of the training sequence",
                                file=self.manifest_path, row=row.line)
        return enc, len(gen.post)

    def __len__(self):
        return len(self.rows)

    def set_epoch(self, epoch):
        """Remember the epoch (the augmented prompts depend on it)."""
        self.epoch = epoch

    def set_augment(self, augment, seed: int = 0) -> None:
        """Vary the prompts of augmentable rows of ``augment.tasks`` (``prompt_augment``) with
        ``augment(prompt, rng)``; a row's variant depends on (seed, epoch, row): repeatable and resumable.

        Args:
            augment (Optional[PromptAugmenter]): the augmenter, or None to stop varying prompts.
            seed (int): the run's seed.
        """
        self.augment, self.augment_seed = augment, seed
        self.augment_rows = frozenset(i for i, r in enumerate(self.rows)
                                      if augment is not None and r.task in augment.tasks and augmentable(r))

    def _augmented(self, index: int, row):
        if index not in self.augment_rows:
            return None
        rng = random.Random((int(self.augment_seed) * 1_000_003 + int(self.epoch)) * 10_000_019 + int(index))
        prompt = self.augment(row.prompt, rng)
        if prompt == row.prompt:
            return None
        enc, gen_len = self._encode(dataclasses.replace(row, prompt=prompt, turns=[(prompt, row.tgt_text)]),
                                    self.system_prompt)
        if self.max_positions is not None and self._positions(row, enc)[1] > self.max_positions:
            return None  # the row fitted with its own prompt: keep that one
        return enc, gen_len

    def __getitem__(self, index):
        row = self.rows[index]
        enc, gen_len = self._augmented(index, row) or self.encoded[index]
        audio = None
        if row.with_speech:
            try:
                audio = load_audio(row.audio, self.root, max_seconds=self.max_audio_seconds,
                                   where=(self.manifest_path, row.line), segment=row.segment)
            except AudioError as e:
                if not self.skip_bad:
                    raise
                self._count_skip(e)
                return None
        return {"id": index, "row": row, "audio": audio, "enc": enc, "gen_len": gen_len, "task": row.task}

    def num_tokens(self, index):
        """An item's batching cost: its audio samples, or ``TEXT_TOKEN_COST`` per token without speech."""
        return int(self.sizes[index])

    def size(self, index):
        """The same as :meth:`num_tokens`."""
        return int(self.sizes[index])

    def ordered_indices(self):
        """Indices by increasing cost (ties in random order with ``shuffle``, else in file order)."""
        order = np.random.permutation(len(self)) if self.shuffle else np.arange(len(self))
        return order[np.argsort(self.sizes[order], kind="mergesort")]

    @property
    def supports_prefetch(self):
        """False: audio is read in ``__getitem__``."""
        return False

    def collater(self, samples):
        """:func:`collate` with this corpus's padding id."""
        return collate(samples, self.pad)


class MultiCorpusDataset(FairseqDataset):
    """Several corpora in one index space (corpus k occupies ``[offsets[k], offsets[k] + len_k)``).

    Args:
        corpora (Dict[str, InstructionDataset]): name -> corpus, in index order.
    """

    def __init__(self, corpora: Dict[str, InstructionDataset]):
        self.names = list(corpora)
        self.corpora = [corpora[n] for n in self.names]
        self.offsets = np.cumsum([0] + [len(c) for c in self.corpora])
        self.sizes = np.concatenate([c.sizes for c in self.corpora]) if self.corpora else np.zeros(0, np.int64)
        self.pad = self.corpora[0].pad

    def __len__(self):
        return int(self.offsets[-1])

    def locate(self, index):
        """(corpus number, index within it) of a global index."""
        k = bisect.bisect_right(self.offsets, index) - 1
        return k, index - int(self.offsets[k])

    def __getitem__(self, index):
        k, i = self.locate(index)
        item = self.corpora[k][i]
        if item is not None:
            item["id"] = index
        return item

    def num_tokens(self, index):
        """An item's batching cost (``InstructionDataset.num_tokens``)."""
        return int(self.sizes[index])

    def size(self, index):
        """The same as :meth:`num_tokens`."""
        return int(self.sizes[index])

    def ordered_indices(self):
        """Indices by increasing cost (the curriculum's sampler makes the training batches)."""
        return np.argsort(self.sizes, kind="mergesort")

    def set_epoch(self, epoch):
        """Pass the epoch on to every corpus."""
        for c in self.corpora:
            c.set_epoch(epoch)

    def costs_by_corpus(self) -> Dict[str, np.ndarray]:
        """Each corpus's item costs, for ``CurriculumBatchSampler``."""
        return {n: c.sizes for n, c in zip(self.names, self.corpora)}

    def offsets_by_corpus(self) -> Dict[str, int]:
        """Each corpus's first global index, for ``CurriculumBatchSampler``."""
        return {n: int(o) for n, o in zip(self.names, self.offsets[:-1])}

    @property
    def skipped(self) -> Dict[str, int]:
        """Bad rows skipped in all corpora, by reason."""
        out: Dict[str, int] = {}
        for c in self.corpora:
            for k, v in c.skipped.items():
                out[k] = out.get(k, 0) + v
        return out

    def collater(self, samples):
        """:func:`collate` with the corpora's padding id."""
        return collate(samples, self.pad)


def pad_2d(seqs: Sequence[Sequence[int]], pad: int, dtype=torch.long) -> torch.Tensor:
    """Right-pad sequences of ids into one tensor.

    Args:
        seqs (Sequence[Sequence[int]]): B sequences.
        pad (int): the padding value.
        dtype (torch.dtype): the tensor's dtype.

    Returns:
        torch.Tensor: shape (B, max length) (0 columns when every sequence is empty).
    """
    out = torch.full((len(seqs), max([len(s) for s in seqs] + [0])), pad, dtype=dtype)
    for i, s in enumerate(seqs):
        if len(s):
            out[i, : len(s)] = torch.as_tensor(s, dtype=dtype)
    return out


def inference_item(index: int, audio: Optional[np.ndarray], enc, task: Optional[str] = None,
                   utt_id: Optional[str] = None) -> dict:
    """An item for :func:`collate` from an encoded question instead of a manifest row (the Python API, a server).

    Args:
        index (int): the item's ``id`` in the batch
        audio (Optional[np.ndarray]): waveform with shape (T,), float32 16 kHz mono; None for a text-only question
        enc (EncodedPrompt): the question encoded without an answer (``post`` ends with ``[/INST]``)
        task (Optional[str]): its task name (per-task length caps), or None
        utt_id (Optional[str]): what the batch's ``utt_ids`` says for it (default: ``str(index)``)

    Returns:
        dict: the item ``InstructionDataset`` would give (``row`` carries only its ``id``)
    """
    row = SimpleNamespace(id=str(index) if utt_id is None else utt_id)
    return {"id": index, "row": row, "audio": audio, "enc": enc, "gen_len": len(enc.post), "task": task}


def collate(samples: List[Optional[dict]], pad: int) -> dict:
    """Items -> the batch dict documented in the module docstring.

    Args:
        samples (List[Optional[dict]]): items of ``InstructionDataset.__getitem__`` (None: a skipped row,
            dropped).
        pad (int): the tokenizer's padding id.

    Returns:
        dict: the batch (``{}`` when every item was skipped).
    """
    samples = [s for s in samples if s is not None]
    if not samples:
        return {}
    B = len(samples)
    audio_lengths = torch.tensor([0 if s["audio"] is None else len(s["audio"]) for s in samples], dtype=torch.long)
    audio = torch.zeros(B, int(audio_lengths.max()), dtype=torch.float32)
    for i, s in enumerate(samples):
        if s["audio"] is not None:
            audio[i, : len(s["audio"])] = torch.from_numpy(np.asarray(s["audio"], dtype=np.float32))
    encs = [s["enc"] for s in samples]
    post = pad_2d([e.post for e in encs], pad)
    tmask = pad_2d([e.post_target_mask for e in encs], 0, dtype=torch.bool)
    instr = [list(e.adapter_input) for e in encs]
    targets = [e.post[g:] for e, g in zip(encs, (s["gen_len"] for s in samples))]
    ntokens = int(tmask.sum())
    return {
        "id": torch.tensor([s["id"] for s in samples], dtype=torch.long),
        "utt_ids": [s["row"].id for s in samples],
        "task_names": [s["task"] for s in samples],
        "nsentences": B,
        "ntokens": ntokens,
        "net_input": {
            "audio": audio,
            "audio_lengths": audio_lengths,
            "pre_tokens": pad_2d([e.pre for e in encs], pad),
            "pre_lengths": torch.tensor([len(e.pre) for e in encs], dtype=torch.long),
            "post_tokens": post,
            "post_lengths": torch.tensor([len(e.post) for e in encs], dtype=torch.long),
            "post_target_mask": tmask,
            "prompt_post_lengths": torch.tensor([s["gen_len"] for s in samples], dtype=torch.long),
            "instruction_tokens": pad_2d(instr, pad),
            "instruction_lengths": torch.tensor([len(i) for i in instr], dtype=torch.long),
        },
        "target": pad_2d(targets, pad),
        "target_lengths": torch.tensor([len(t) for t in targets], dtype=torch.long),
    }
