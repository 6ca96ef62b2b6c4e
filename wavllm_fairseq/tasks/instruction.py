"""``@register_task("wavllm_instruction")``: instruction manifests -> WavLLM batches, training and decoding.

Splits: every split name is a manifest ``<data>/<split>.tsv`` (``valid_asr``, ``test_st_unseen``, ...),
except the training split (``dataset.train_subset``, default ``train``), which is the curriculum: several
manifests mixed by weights / temperature with phases that switch the mix at given update numbers
(``task.curriculum`` YAML, or ``task.train_manifests`` + ``task.train_weights``). See curriculum.py.
A manifest may also be a fairseq wav2vec/HuBERT manifest or speech_to_text TSV, or be read as the reference
reads its files (``task.manifest_format``, data/manifest_formats.py); ``task.audio_root`` moves where relative
audio paths start. The options and their help: tasks/config.py.

Batching is by duration: ``dataset.max_tokens`` counts 16 kHz audio samples (480000 = 30 s, the
paper's per-GPU batch); text-only rows cost 1280 samples per token. fairseq-generate's own limit when given
neither ``--batch-size`` nor ``--max-tokens`` (12000) becomes 30 s (:func:`batch_max_tokens`).
"""
import logging
import os
from typing import Optional

import numpy as np
import torch
from fairseq.tasks import FairseqTask, register_task

from ..data.chat_template import prompt_encoder
from ..data.curriculum import (CurriculumBatchSampler, CurriculumConfig, CurriculumEpochBatchIterator,
                              curriculum_from_subsets, load_curriculum)
from ..data.dataset import TEXT_TOKEN_COST, InstructionDataset, MultiCorpusDataset
from ..data.encoder_cache import attach_encoder_cache
from ..data.manifest import read_manifest
from ..data.prompt_augment import PromptAugmenter, prompt_pools
from ..data.tokenizer import LlamaDictionary, LlamaTokenizer, SentencePieceDecoder, config_vocab_size
from ..decoding.options import DecodingOptions, parse_task_lengths  # noqa: F401  (parse_task_lengths: importable here)
from ..errors import WavLLMInputError
from ..models.speech import expected_speech_frames
from . import fairseq_fixes
from .config import WavLLMInstructionConfig

logger = logging.getLogger(__name__)


class _PendingDictionary:
    """The target dictionary before the tokenizer is known (it comes with the model's ``llama_path``).

    ``pad/eos/unk/bos`` answer the LLaMA convention (unk = pad = 0, bos = 1, eos = 2) that this plugin's
    dictionary always follows; everything else is taken from the real dictionary once the model is
    loaded, and is a clear error before that.
    """

    _SPECIALS = {"pad": 0, "unk": 0, "bos": 1, "eos": 2}

    def __init__(self, task):
        self._task = task

    def _resolve(self):
        if self._task.tokenizer is None:
            raise WavLLMInputError("the tokenizer is not known yet: pass --tokenizer-dir (task.tokenizer_dir), the "
                                   "folder with the LLaMA tokenizer.model, or load a model whose llama_path holds it")
        return self._task.target_dictionary

    def __getattr__(self, name):
        if name in self._SPECIALS and self._task.tokenizer is None:
            return lambda: self._SPECIALS[name]
        return getattr(self._resolve(), name)

    def __len__(self):
        return len(self._resolve())


@register_task("wavllm_instruction", dataclass=WavLLMInstructionConfig)
class WavLLMInstructionTask(FairseqTask):
    """Speech/text instruction following with the WavLLM chat template.

    Args:
        cfg (WavLLMInstructionConfig): the task config.
        tokenizer (Optional[LlamaTokenizer or HFTokenizer]): the LLM's tokenizer; None until a model
            whose ``llama_path`` holds it is built.
    """

    cfg: WavLLMInstructionConfig

    def __init__(self, cfg: WavLLMInstructionConfig, tokenizer=None):
        super().__init__(cfg)
        self.tokenizer = tokenizer
        self._dictionary = None
        self._context_length: Optional[int] = None
        self._use_wavlm = True

    @classmethod
    def setup_task(cls, cfg: WavLLMInstructionConfig, **kwargs):
        """fairseq's task builder; also applies fairseq_fixes.py.

        Args:
            cfg (WavLLMInstructionConfig): the task config.
            **kwargs: fairseq's, not read.

        Returns:
            WavLLMInstructionTask: the task (with the tokenizer of ``task.tokenizer_dir`` when set).
        """
        fairseq_fixes.apply()  # what and why: fairseq_fixes.py
        parse_task_lengths(cfg.max_len_per_task)  # a malformed value fails here, not at the first batch
        tokenizer = None
        if cfg.tokenizer_dir:
            tokenizer = LlamaTokenizer.from_dir(cfg.tokenizer_dir)
        return cls(cfg, tokenizer)

    # ------------------------------------------------------------------ vocabulary
    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise WavLLMInputError("no tokenizer: set task.tokenizer_dir or model.llama_path "
                                   "(the folder with tokenizer.model)")
        return self.tokenizer

    @property
    def target_dictionary(self):
        """The tokenizer's ids as a fairseq Dictionary (a stand-in that resolves later while the
        tokenizer is not known yet)."""
        if self._dictionary is None and self.tokenizer is not None:
            self._dictionary = LlamaDictionary.from_tokenizer(self.tokenizer)
        if self._dictionary is None:
            # fairseq-generate asks for the dictionary before it loads the checkpoint, whose
            # model.llama_path holds the tokenizer: hand out a stand-in that resolves once it is known
            return _PendingDictionary(self)
        return self._dictionary

    @property
    def source_dictionary(self):
        """None: the source is audio."""
        return None

    def build_model(self, cfg, from_checkpoint=False):
        """Build the model, taking the tokenizer from ``model.llama_path`` when the task has none.

        Args:
            cfg (WavLLMConfig or DictConfig): the model config.
            from_checkpoint (bool): fairseq's flag.

        Returns:
            WavLLMModel: the model (its context length and WavLM use then set the dataset checks).
        """
        if self.tokenizer is None and getattr(cfg, "llama_path", ""):
            self.tokenizer = LlamaTokenizer.from_dir(cfg.llama_path)
        self._require_tokenizer()
        if getattr(cfg, "llama_path", "") and not getattr(self.tokenizer, "model_vocab_size", 0):
            # a tokenizer_dir without the LLM's config.json: the dictionary is padded to the LLM's rows
            self.tokenizer.model_vocab_size = config_vocab_size(cfg.llama_path)
            self._dictionary = None
        model = super().build_model(cfg, from_checkpoint)
        if self.cfg.encoder_cache:
            attach_encoder_cache(model, self.cfg.encoder_cache, str(self.cfg.encoder_cache_dtype))
        self._context_length = model.context_length
        self._use_wavlm = model.wavlm is not None
        self.llm_dim = model.llm_dim  # what a criterion with parameters at the LLM's width reads
        return model

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        """``FairseqTask.train_step``, then zero gradients for the trainable parameters the batch did not reach."""
        loss, sample_size, logging_output = super().train_step(sample, model, criterion, optimizer, update_num,
                                                               ignore_grad)
        # A text-only batch leaves the speech adapters and projector without a gradient. fairseq's
        # distributed all-reduce fills such gradients with zeros (so Adam's moments keep decaying and
        # its momentum keeps moving those weights), a single process would skip them: fill them here so
        # one process and N processes with the same global batch train the same weights.
        for p in model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        return loss, sample_size, logging_output

    def max_positions(self):
        """None: no fairseq-side length filter."""
        return None  # lengths are checked by the dataset against the LLM context (see dataset.py)

    # ------------------------------------------------------------------ data
    def manifest_path(self, name: str) -> str:
        """The manifest file of a split or corpus name.

        Args:
            name (str): ``valid_asr``, ``train_st.tsv`` or an absolute path.

        Returns:
            str: the ``.tsv`` path (relative names under ``task.data``).
        """
        name = name if name.endswith(".tsv") else name + ".tsv"
        return name if os.path.isabs(name) else os.path.join(self.cfg.data, name)

    def load_corpus(self, name_or_path: str, corpus: Optional[str] = None,
                    shuffle: bool = True) -> InstructionDataset:
        """Read, check and tokenize one manifest.

        Args:
            name_or_path (str): see :meth:`manifest_path`.
            corpus (Optional[str]): the corpus name in logs (default: the file stem).
            shuffle (bool): shuffle within length buckets (training) or keep the file order.

        Returns:
            InstructionDataset: the corpus.
        """
        path = self.manifest_path(name_or_path)
        if not os.path.isfile(path):
            raise WavLLMInputError(f"manifest not found: {path} (task.data={self.cfg.data!r})", file=path,
                                   reason="missing")
        max_seconds = (self.cfg.max_audio_seconds if self.cfg.max_audio_seconds and self.cfg.max_audio_seconds > 0
                       else None)
        audio_root = self.cfg.audio_root or None
        rows, report = read_manifest(path, check_audio=self.cfg.check_audio_on_load, skip_bad=self.cfg.skip_bad_rows,
                                     max_audio_seconds=max_seconds, fmt=str(self.cfg.manifest_format),
                                     audio_root=audio_root, prompt_pool=self.cfg.prompt_pool, logger=logger)
        context = self.cfg.max_text_positions or self._context_length
        use_wavlm = self._use_wavlm
        ds = InstructionDataset(rows, path, self._require_tokenizer(), corpus=corpus or os.path.basename(path)[:-4],
                                max_positions=context, max_audio_seconds=max_seconds,
                                skip_bad=self.cfg.skip_bad_rows, system_prompt=self.cfg.system_prompt, shuffle=shuffle,
                                speech_frames=lambda n: expected_speech_frames(n, use_wavlm),
                                encode=prompt_encoder(self.cfg.chat_template), audio_root=audio_root)
        skipped = report.skipped + sum(ds.skipped.values())
        read_as = "" if report.format == "instruction manifest" else f" (read as a {report.format})"
        logger.info(f"{path}: {len(ds)} rows" + (f", {skipped} bad rows skipped" if skipped else "") + read_as)
        return ds

    def train_curriculum(self) -> CurriculumConfig:
        """The training mix: ``task.curriculum`` (YAML) or ``task.train_manifests`` + ``task.train_weights``.

        Returns:
            CurriculumConfig: corpora and phases.
        """
        if self.cfg.curriculum:
            path = (self.cfg.curriculum if os.path.isabs(self.cfg.curriculum)
                    else os.path.join(self.cfg.data, self.cfg.curriculum))
            if not os.path.isfile(path) and os.path.isfile(self.cfg.curriculum):
                path = self.cfg.curriculum
            return load_curriculum(path, self.cfg.data)
        if not self.cfg.train_manifests:
            raise WavLLMInputError("the training split needs task.curriculum (YAML) "
                                   "or task.train_manifests (comma list)")
        return curriculum_from_subsets(self.cfg.train_manifests, self.cfg.train_weights,
                                       self.cfg.sampling_temperature, self.cfg.data)

    def load_dataset(self, split: str, epoch=1, combine=False, task_cfg=None, **kwargs):
        """``FairseqTask.load_dataset``: the curriculum (a MultiCorpusDataset) for the training split, else the
        manifest ``<split>.tsv`` (an InstructionDataset)."""
        if split == "train" and (self.cfg.curriculum or self.cfg.train_manifests):
            cur = self.train_curriculum()
            corpora = {name: self.load_corpus(path, corpus=name) for name, path in cur.corpora.items()}
            if self.cfg.prompt_augment:
                augment = PromptAugmenter(prompt_pools(r for ds in corpora.values() for r in ds.rows))
                logger.info(f"instruction augmentation on the training split: {augment}")
                for ds in corpora.values():
                    ds.set_augment(augment, seed=self.cfg.seed)
            self.datasets[split] = MultiCorpusDataset(corpora)
            self.curriculum = cur
        else:
            self.datasets[split] = self.load_corpus(split, shuffle=False)
        return self.datasets[split]

    def get_batch_iterator(self, dataset, max_tokens=None, max_sentences=None, max_positions=None,
                           ignore_invalid_inputs=False, required_batch_size_multiple=1, seed=1, num_shards=1,
                           shard_id=0, num_workers=0, epoch=1, data_buffer_size=0, disable_iterator_cache=False,
                           skip_remainder_batch=False, grouped_shuffling=False, update_epoch_batch_itr=False):
        """``FairseqTask.get_batch_iterator`` (``max_tokens`` counts audio samples), dropping no row; for the
        curriculum, its own batch sampler and iterator (curriculum.py)."""
        if required_batch_size_multiple != 1:
            # fairseq would silently drop a last partial batch (and decode nothing for tiny test sets)
            logger.info(f"required_batch_size_multiple={required_batch_size_multiple} -> 1 (no rows are dropped)")
            required_batch_size_multiple = 1
        if not isinstance(dataset, MultiCorpusDataset):
            return super().get_batch_iterator(
                dataset, max_tokens=batch_max_tokens(dataset, max_tokens, max_sentences), max_sentences=max_sentences,
                max_positions=None,
                ignore_invalid_inputs=ignore_invalid_inputs, required_batch_size_multiple=1, seed=seed,
                num_shards=num_shards, shard_id=shard_id, num_workers=num_workers, epoch=epoch,
                data_buffer_size=data_buffer_size, disable_iterator_cache=disable_iterator_cache,
                skip_remainder_batch=False, grouped_shuffling=grouped_shuffling,
                update_epoch_batch_itr=update_epoch_batch_itr)
        if max_tokens is None and max_sentences is None:
            raise WavLLMInputError("set dataset.max_tokens (audio samples per batch, 480000 = 30 s) "
                                   "or dataset.batch_size")
        update_freq = self.cfg.update_freq
        update_freq = int(update_freq[0] if isinstance(update_freq, (list, tuple)) or hasattr(update_freq, "__len__")
                          else update_freq)
        sampler = CurriculumBatchSampler(
            costs=dataset.costs_by_corpus(), offsets=dataset.offsets_by_corpus(), phases=self.curriculum.phases,
            max_tokens=max_tokens, max_sentences=max_sentences, seed=seed,
            updates_per_epoch=self.cfg.updates_per_epoch, num_shards=num_shards, update_freq=update_freq)
        dataset.set_epoch(epoch)
        return CurriculumEpochBatchIterator(
            dataset=dataset, collate_fn=dataset.collater, batch_sampler=sampler, seed=seed, num_shards=num_shards,
            shard_id=shard_id, num_workers=num_workers, epoch=epoch, buffer_size=data_buffer_size,
            skip_remainder_batch=False, grouped_shuffling=False, reuse_dataloader=True,
            persistent_workers=num_workers > 0)

    # ------------------------------------------------------------------ decoding
    def build_generator(self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None, prefix_allowed_tokens_fn=None):
        """fairseq-generate's generator: its generation arguments and this task's decoding fields (options.py)."""
        return DecodingOptions.from_fairseq_args(args, self.cfg).build(models, self.target_dictionary)

    def build_bpe(self, args):
        """``FairseqTask.build_bpe``, fairseq-generate's detokeniser: pieces -> text (a SentencePieceDecoder)
        unless ``--bpe`` is given."""
        if args is not None and getattr(args, "_name", None):
            return super().build_bpe(args)
        return SentencePieceDecoder(self._require_tokenizer())

    def build_tokenizer(self, args):
        """``FairseqTask.build_tokenizer``: none, unless ``--tokenizer`` is given."""
        if args is not None and getattr(args, "_name", None):
            return super().build_tokenizer(args)
        return None


FAIRSEQ_GENERATE_MAX_TOKENS = 12000  # what fairseq-generate sets when given neither --batch-size nor --max-tokens
DEFAULT_MAX_TOKENS = 480000  # 30 s of 16 kHz audio per batch, the paper's


def batch_max_tokens(dataset: InstructionDataset, max_tokens: Optional[int],
                     max_sentences: Optional[int]) -> Optional[int]:
    """The ``max_tokens`` to batch a manifest by: ``max_tokens`` when its costliest row fits; for fairseq-generate's
    own 12000 (neither ``--batch-size`` nor ``--max-tokens`` given: 0.75 s of audio) :data:`DEFAULT_MAX_TOKENS`, or
    the costliest row's cost, with a warning; any other limit a row exceeds is an error saying what to pass.

    Args:
        dataset (InstructionDataset): the manifest (``sizes``: each row's cost in 16 kHz samples).
        max_tokens (Optional[int]): ``dataset.max_tokens``.
        max_sentences (Optional[int]): ``dataset.batch_size``.

    Returns:
        Optional[int]: the limit to batch by.

    Raises:
        WavLLMInputError: naming the costliest row, when a limit the user set is below its cost.
    """
    if max_tokens is None or not len(dataset) or int(dataset.sizes.max()) <= max_tokens:
        return max_tokens
    i = int(np.argmax(dataset.sizes))
    cost, row = int(dataset.sizes[i]), dataset.rows[i]
    if max_sentences is None and max_tokens == FAIRSEQ_GENERATE_MAX_TOKENS:
        chosen = max(DEFAULT_MAX_TOKENS, cost)
        logger.warning(f"{dataset.manifest_path}: max_tokens={max_tokens} (fairseq-generate's value when neither "
                       f"--batch-size nor --max-tokens is given) is below row {row.id}'s {cost} samples: batching by "
                       f"{chosen} samples of 16 kHz audio instead; pass --max-tokens or --batch-size to choose")
        return chosen
    raise WavLLMInputError(f"id={row.id}: the row costs {cost} samples (16 kHz audio, or {TEXT_TOKEN_COST} per token "
                           f"of a text-only row) but dataset.max_tokens is {max_tokens}, so no batch can hold it: "
                           f"pass --max-tokens {cost} or more (dataset.max_tokens; {DEFAULT_MAX_TOKENS} = 30 s) or "
                           "--batch-size N (dataset.batch_size) without --max-tokens", file=dataset.manifest_path,
                           row=row.line, reason="too_long")
