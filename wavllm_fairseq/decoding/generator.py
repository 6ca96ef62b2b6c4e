"""Decoding for WavLLM: greedy, sampling and beam search over a key/value-cached speech+prompt prefix.

The model builds the prefix (``WavLLMModel.build_generation_prefix``): the embeddings of
``[<s> ... <SPEECH>][speech][</SPEECH> instruction [/INST]]`` per utterance, LEFT-padded to one
length with an attention mask, plus the stage-2 LoRA scale ``r``. Left padding puts every prefix's
last token in the last column, so each step appends one column for the whole batch; positions are
counted from each row's first real token (``cumsum(mask) - 1``), which makes a padded row compute
exactly what it computes alone.

The prefix is run once (prefill) and its keys/values cached; each step then feeds only the new
tokens. Rows that finish are dropped from the batch (and the cache), so a batch costs what its
unfinished rows cost. Greedy decoding and sampling run a ``RunningBatch`` (running.py), which rows may
also join between steps (``join``: continuous batching in a server). ``use_cache=False`` recomputes the
whole sequence every step (the reference for the "cached equals uncached" test and the benchmark). What
one call decodes with (the per-row caps, the mask, the cache or the static decoder) is a ``DecodeState``
(state.py), made per call.

fairseq-generate protocol: ``generate(models, sample, **kw)`` returns, per sentence, an n-best list
of ``{"tokens", "score", "positional_scores", "alignment"}`` with ``tokens`` ending in ``</s>``.
Safety: a hypothesis whose tail repeats an n-gram 3 times (``loop_guard_ngram``) or that reaches its
task's length cap (``max_len_per_task``) is stopped and logged as ``guard id=<idx> reason=<why>``
(fairseq-generate writes the log into its output file, where ``wavllm-score`` counts the lines).
Options and their defaults: options.py (``DecodingOptions``), which builds every generator.
"""
import logging
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..models.wavllm import GenerationPrefix
from .beam import BeamSearch
from .kv_cache import GrowingCache, GrowingLayer
from .processing import block_repeated_ngrams, penalize_repetitions, sample_next
from .running import decode_rows
from .state import DecodeState
from .static_decode import decoder_for, supported

logger = logging.getLogger(__name__)

PREFILL_PAD_WASTE = 0.1  # prefill rows one by one when padding would be more than this share of the work


class WavLLMGenerator:
    """A fairseq-generate generator for decoder-only WavLLM (one model; no ensembles).

    Args:
        models: the WavLLMModel, or fairseq's list of one
        tgt_dict: the target dictionary (``eos()``, ``pad()``, ``unk()`` if it has one); None: the LLM's eos
        **options: :class:`~wavllm_fairseq.decoding.options.DecodingOptions`' fields (documented there), which
            builds the generator
    """

    def __init__(self, models, tgt_dict, beam_size: int = 1, max_len_a: float = 0.0, max_len_b: int = 200,
                 min_len: int = 1, normalize_scores: bool = True, len_penalty: float = 1.0, temperature: float = 1.0,
                 sampling: bool = False, sampling_topk: int = -1, sampling_topp: float = -1.0,
                 no_repeat_ngram_size: int = 0, repetition_penalty: float = 1.0, loop_guard_ngram: int = 0,
                 max_len_per_task: Optional[Dict[str, int]] = None, nbest: int = 1, use_cache: bool = True,
                 static: Optional[bool] = None, cuda_graphs: Optional[bool] = None, compile_step: bool = False,
                 ban_unk: bool = True, max_len_counts_prompt: bool = False):
        models = list(models) if isinstance(models, (list, tuple)) else [models]
        if len(models) != 1:
            raise ValueError("WavLLM decoding supports a single model (no ensembles)")
        self.model = models[0]
        self.tgt_dict = tgt_dict
        self.eos = tgt_dict.eos() if tgt_dict is not None else self.model.llm.config.eos_token_id
        self.pad = tgt_dict.pad() if tgt_dict is not None else 0
        self.symbols_to_strip_from_output = {self.eos}
        self.beam_size = max(1, int(beam_size))
        self.max_len_a, self.max_len_b, self.min_len = float(max_len_a), int(max_len_b), int(min_len)
        self.max_len_counts_prompt = bool(max_len_counts_prompt)
        self.normalize_scores, self.len_penalty = normalize_scores, float(len_penalty)
        self.temperature = float(temperature)
        if self.temperature <= 0:
            raise ValueError("--temperature must be > 0")
        self.sampling, self.topk, self.topp = bool(sampling), int(sampling_topk), float(sampling_topp)
        self.no_repeat_ngram_size = int(no_repeat_ngram_size)
        self.repetition_penalty = float(repetition_penalty)
        self.loop_guard_ngram = int(loop_guard_ngram)
        self.max_len_per_task = dict(max_len_per_task or {})
        self.nbest = max(1, int(nbest))
        self.use_cache = use_cache
        # static cache + CUDA graphs (static_decode.py): None = on when the model is on a CUDA device and
        # its LLM is supported; the dynamic path (below) is kept on CPUs, where it is the faster one
        self.static, self.cuda_graphs = static, cuda_graphs
        # torch.compile the static step (fused element-wise kernels; see static_decode's module docstring)
        self.compile_step = bool(compile_step)
        # kept across calls (nothing of one call is kept here: that is its DecodeState): the warned-once flag,
        # the static decoder (the model's, cached), and the guard counts, a running total that callers read
        self._told_compile = False  # warned once that compile_step has nothing to compile on the dynamic path
        self._decoder = None
        self.guard_counts: Dict[str, int] = {}
        # the reference bans <unk> at every step (a dictionary whose unk is its eos has none to ban)
        unk = tgt_dict.unk() if (ban_unk and tgt_dict is not None and hasattr(tgt_dict, "unk")) else None
        self.banned = [unk] if unk is not None and unk != self.eos else []
        if self.sampling and self.beam_size > 1:
            raise ValueError("sampling with beam > 1 is not supported: use --beam 1 with --sampling")

    # ------------------------------------------------------------------ entry points
    def cuda(self):
        """fairseq-generate moves its generator to the GPU: the model is already there. Returns: self."""
        return self

    @torch.no_grad()
    def generate(self, models, sample, prefix_tokens=None, constraints=None, bos_token=None, on_step=None, **kwargs):
        """Decode ``sample``, the collater's batch (data/dataset.py).

        Args:
            models: ignored (the generator's own model decodes; fairseq passes its list)
            sample (dict): the batch; besides fairseq's keys, ``sample["max_len"]`` (a list, one int per row)
                caps rows individually (a server's per-request ``max_tokens``)
            on_step (Optional[Callable]): greedy and sampling only: ``on_step(rows, tokens)`` is called after
                every step with the original batch indices of the live rows and the token each just chose
                (streaming); it may return batch indices to end now (a client that left): those rows close
                with ``</s>`` after this token

        Returns:
            List[List[dict]]: per row, its n-best ``{"tokens" (T,), "score", "positional_scores" (T,),
            "alignment"}``, best first, ``tokens`` ending in ``</s>``
        """
        if constraints is not None:
            raise NotImplementedError("lexical constraints are not supported by the WavLLM generator")
        if prefix_tokens is not None:
            raise NotImplementedError("--prefix-size is not supported: the prefix is the speech + instruction")
        model = self.model
        was_training = model.training
        model.eval()
        try:
            prefix, caps, cap_is_task = self.build_prefix(sample)
            ids = sample["id"].tolist() if "id" in sample else None
            return self.decode(prefix, caps, ids, cap_is_task=cap_is_task, on_step=on_step)
        finally:
            model.train(was_training)

    def build_prefix(self, sample) -> Tuple[GenerationPrefix, List[int], List[bool]]:
        """The model's prefix of ``sample`` (its encoders run here) and the rows' length caps.

        Args:
            sample (dict): the collater's batch, as :meth:`generate` takes it (the model in eval mode)

        Returns:
            Tuple[GenerationPrefix, List[int], List[bool]]: the prefix (embeds (B, L, D), mask (B, L), lora_scale
            (B, D)), new tokens at most per row (B) and whether each row's cap is its task's
        """
        prefix = self.model.build_generation_prefix(sample["net_input"])
        caps, cap_is_task = self._length_caps(sample, prefix)
        return prefix, caps, cap_is_task

    @torch.no_grad()
    def decode(self, prefix: GenerationPrefix, caps: Sequence[int], ids: Optional[Sequence[int]] = None, *,
               cap_is_task: Optional[Sequence[bool]] = None, on_step=None) -> List[List[dict]]:
        """Decode an already built prefix (the model is used as it is; ``generate`` puts it in eval mode).

        Args:
            prefix (GenerationPrefix): embeds (B, L, D) left-padded, attention_mask (B, L), lora_scale (B, D)
            caps (Sequence[int]): new tokens at most per row (B); a row that reaches its cap ends with ``</s>``
            ids (Optional[Sequence[int]]): the rows' ids in the guard log lines (default: 0 .. B-1)
            cap_is_task (Optional[Sequence[bool]]): per row, whether its cap is its task's (a guard; default: no)
            on_step (Optional[Callable]): the streaming hook of :meth:`generate`

        Returns:
            List[List[dict]]: per row, its n-best hypotheses, as :meth:`generate` returns them
        """
        B = prefix.embeds.shape[0]
        state = DecodeState(caps=list(caps), cap_is_task=list(cap_is_task) if cap_is_task is not None else [False] * B)
        ids = list(ids) if ids is not None else list(range(B))
        if self.beam_size == 1:
            return decode_rows(self, prefix, state.caps, ids, state.cap_is_task, on_step)
        if on_step is not None:
            raise ValueError("on_step (streaming) works with greedy decoding and sampling, not with beam search")
        return self._beam(prefix, state, ids, self.beam_size)

    def _length_caps(self, sample, prefix) -> Tuple[List[int], List[bool]]:
        """(new tokens at most per row, whether each row's cap is its task's)."""
        B = prefix.embeds.shape[0]
        lens = prefix.attention_mask.sum(1).tolist()
        caps = [max(1, int(self.max_len_a * n + self.max_len_b)) for n in lens]
        post = sample.get("net_input", {}).get("prompt_post_lengths")
        if self.max_len_counts_prompt and post is not None:  # the post-speech prompt less its first token
            caps = [max(1, c - max(0, int(p) - 1)) for c, p in zip(caps, post.tolist())]
        tasks = sample.get("task_names") or [None] * B
        cap_is_task = [False] * B
        for i, t in enumerate(tasks):
            if t in self.max_len_per_task and self.max_len_per_task[t] < caps[i]:
                caps[i] = self.max_len_per_task[t]
                cap_is_task[i] = True
        if sample.get("max_len") is not None:
            caps = [max(1, min(c, int(m))) for c, m in zip(caps, sample["max_len"])]
        context = getattr(self.model, "context_length", None)
        if context:
            caps = [max(1, min(c, int(context) - int(n))) for c, n in zip(caps, lens)]
        return caps, cap_is_task

    # ------------------------------------------------------------------ the LLM step
    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.llm.get_input_embeddings()(tokens)

    def _logits(self, embeds, mask, cache, r, positions):
        """Run the LLM on ``embeds`` (B, T, D) -> last-position log-probs (B, V) in float32."""
        llm = self.model.llm
        with self.model.lora_scale_context(r):
            out = llm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache,
                            use_cache=cache is not None)
        h = out.last_hidden_state[:, -1]
        return llm.lm_head(h).float()

    def _start(self, prefix: GenerationPrefix, reserve: int = 64):
        """Prefill: run the prefix, return next-token logits (B, V), the cache and the mask.

        On a CPU, when left padding would waste more than ``PREFILL_PAD_WASTE`` of the batched
        prefill, each row is prefilled alone (no padding computed) and its keys/values are placed,
        left-padded, into one preallocated cache; otherwise, and always on an accelerator (where a
        forward costs its kernel launches whatever the padding), the batch is prefilled at once.
        """
        mask = prefix.attention_mask.long()
        B, L = mask.shape
        if not self.use_cache:
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            return self._logits(prefix.embeds, mask, None, prefix.lora_scale, positions), None, mask
        lengths = mask.sum(1).tolist()
        if (B > 1 and mask.device.type == "cpu" and 1 - sum(lengths) / (B * L) > PREFILL_PAD_WASTE
                and bool((mask[:, -1] == 1).all())):
            logits, layers = [], None
            for b, n in enumerate(lengths):
                cache = GrowingCache(self._num_layers(), 1)
                r = prefix.lora_scale[b: b + 1] if prefix.lora_scale is not None else None
                logits.append(self._logits(prefix.embeds[b: b + 1, L - n:], mask[b: b + 1, L - n:], cache, r,
                                           torch.arange(n, device=mask.device)[None]))
                if layers is None:
                    layers = [GrowingLayer(reserve) for _ in cache.layers]
                for big, small in zip(layers, cache.layers):
                    big.place(b, B, L, small.keys, small.values)
            return torch.cat(logits, 0), GrowingCache(layers=layers), mask
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        cache = GrowingCache(self._num_layers(), reserve)
        return self._logits(prefix.embeds, mask, cache, prefix.lora_scale, positions), cache, mask

    def _use_static(self, device: torch.device) -> bool:
        if not self.use_cache:
            return False
        if self.static is not None:
            return self.static
        return device.type == "cuda" and supported(self.model.llm) is None

    def prefill(self, prefix: GenerationPrefix, state: DecodeState) -> torch.Tensor:
        """Prefill, and fill ``state``: the dynamic cache, or a static decoder that took it over.

        Args:
            prefix (GenerationPrefix): embeds (B, L, D) left-padded, attention_mask (B, L), lora_scale (B, D)
            state (DecodeState): a fresh state (its ``caps`` set)

        Returns:
            torch.Tensor: the next-token logits (B, V)
        """
        logits, cache, mask = self._start(prefix)
        state.mask, state.cache, state.r = mask, cache, prefix.lora_scale
        state.embeds = None if cache is not None else prefix.embeds
        use_static = cache is not None and self._use_static(mask.device)
        if self.compile_step and not use_static and not self._told_compile:
            self._told_compile = True
            logger.warning("compile_step is set but decoding takes the dynamic path (a CPU, no key/value cache, "
                           "or an LLM static decoding does not support): nothing is compiled; pass static=True "
                           "to compile on a CPU")
        if use_static:
            graphs = self.cuda_graphs if self.cuda_graphs is not None else mask.device.type == "cuda"
            dec = self._decoder = decoder_for(self.model, graphs, self.compile_step)
            dec.start([(layer.keys, layer.values) for layer in cache.layers], mask, prefix.lora_scale,
                      capacity=mask.shape[1] + max(state.caps) + 1)
            state.static, state.cache, state.mask = dec, None, None
        return logits

    def join(self, prefix: GenerationPrefix, state: DecodeState, room: int) -> torch.Tensor:
        """Prefill ``prefix``'s rows and add them after the rows ``state`` decodes (continuous batching).

        Args:
            prefix (GenerationPrefix): the newcomers: embeds (M, L', D) left-padded, attention_mask (M, L'),
                lora_scale (M, D)
            state (DecodeState): the running rows' state (filled by :meth:`prefill`, on either path)
            room (int): the most tokens any row, running or new, may still add

        Returns:
            torch.Tensor: the newcomers' next-token logits (M, V)
        """
        if not self.use_cache:
            raise ValueError("rows join a running batch through its key/value cache; decode with use_cache=True")
        logits, cache, mask = self._start(prefix)
        state.join(cache, mask, prefix.lora_scale, room)
        return logits

    def _num_layers(self) -> int:
        return self.model.llm.config.num_hidden_layers

    def step(self, state: DecodeState, new_tokens: torch.Tensor) -> torch.Tensor:
        """One LLM step: append a token to every live row.

        Args:
            state (DecodeState): the live rows' state
            new_tokens (torch.Tensor): one token per live row, shape (N,)

        Returns:
            torch.Tensor: next-token logits (N, V)
        """
        if state.static is not None:
            return state.static.step(new_tokens)
        emb = self._embed(new_tokens[:, None])  # (N, 1, D)
        state.mask = torch.cat([state.mask, state.mask.new_ones(state.mask.shape[0], 1)], 1)
        if state.cache is not None:
            pos = state.mask.sum(1, keepdim=True) - 1  # (N, 1)
            return self._logits(emb, state.mask, state.cache, state.r, pos)
        state.embeds = torch.cat([state.embeds, emb], 1)
        positions = (state.mask.cumsum(1) - 1).clamp(min=0)
        return self._logits(state.embeds, state.mask, None, state.r, positions)

    # ------------------------------------------------------------------ logit processing (processing.py)
    def _process(self, lprobs: torch.Tensor, histories: List[List[int]], step) -> torch.Tensor:
        """Repetition penalty, n-gram blocking and the minimum length, on (N, V) log-probs or logits; ``step``
        is the tokens generated so far, one int for every row or a list of N (rows that joined at other steps)."""
        if self.repetition_penalty != 1.0:
            penalize_repetitions(lprobs, histories, self.repetition_penalty)
        if self.no_repeat_ngram_size > 0:
            block_repeated_ngrams(lprobs, histories, self.no_repeat_ngram_size)
        if isinstance(step, int):
            if step < self.min_len:
                lprobs[:, self.eos] = -math.inf
        else:
            short = [i for i, n in enumerate(step) if n < self.min_len]
            if short:
                lprobs[short, self.eos] = -math.inf
        if self.banned:
            lprobs[:, self.banned] = -math.inf
        return lprobs

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.sampling:
            return logits.argmax(-1)
        return sample_next(logits, self.temperature, self.topk, self.topp)

    def pick(self, logits: torch.Tensor, histories: List[List[int]]) -> Tuple[torch.Tensor, List[float]]:
        """Greedy or sampled choice of each live row's next token, after the logit processors.

        Args:
            logits (torch.Tensor): next-token logits with shape (N, V), changed in place by the processors
            histories (List[List[int]]): each row's tokens so far (N); their lengths are the rows' steps

        Returns:
            Tuple[torch.Tensor, List[float]]: the tokens (N,) and their log-probs at the temperature (N), the
            scores reported, as the reference reports them
        """
        logits = self._process(logits, histories, [len(h) for h in histories])
        lprobs = F.log_softmax(logits / self.temperature, dim=-1)
        nxt = self._choose(logits)
        return nxt, lprobs.gather(1, nxt[:, None]).squeeze(1).tolist()

    def guard(self, idx: int, reason: str, detail: str = "") -> None:
        """Count and log a guard that stopped a hypothesis (``guard id=<idx> reason=<why>``).

        Args:
            idx (int): the row's id
            reason (str): why (``loop``, ``task_max_len``)
            detail (str): more, e.g. ``ngram=2``
        """
        self.guard_counts[reason] = self.guard_counts.get(reason, 0) + 1
        logger.info(f"guard id={idx} reason={reason}" + (f" {detail}" if detail else ""))

    # ------------------------------------------------------------------ beam search (beam.py)
    def _beam(self, prefix: GenerationPrefix, state: DecodeState, ids: List[int], K: int):
        """Standard beam search; beams share the prefix cache (expanded K times after prefill)."""
        B = prefix.embeds.shape[0]
        logits = self.prefill(prefix, state)
        expand = torch.arange(B, device=logits.device).repeat_interleave(K)
        state.select(expand)
        logits = logits.index_select(0, expand)
        search = BeamSearch(K, state.caps, state.cap_is_task, ids, eos=self.eos, nbest=self.nbest,
                            normalize_scores=self.normalize_scores, len_penalty=self.len_penalty,
                            loop_guard_ngram=self.loop_guard_ngram, guard=self.guard)
        step = 0
        while search.active:
            lprobs = F.log_softmax(self._process(logits, search.histories(), step).float() / self.temperature,
                                   dim=-1)  # (A*K, V)
            chosen = search.advance(lprobs, step)
            if chosen is None:
                break
            rows, tokens = chosen
            state.select(torch.tensor(rows, device=lprobs.device))
            step += 1
            logits = self.step(state, torch.tensor(tokens, device=lprobs.device))
        return search.results()
