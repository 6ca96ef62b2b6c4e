"""Decoding for WavLLM: greedy, sampling and beam search over a key/value-cached speech+prompt prefix.

The model builds the prefix (``WavLLMModel.build_generation_prefix``): the embeddings of
``[<s> ... <SPEECH>][speech][</SPEECH> instruction [/INST]]`` per utterance, LEFT-padded to one
length with an attention mask, plus the stage-2 LoRA scale ``r``. Left padding puts every prefix's
last token in the last column, so each step appends one column for the whole batch; positions are
counted from each row's first real token (``cumsum(mask) - 1``), which makes a padded row compute
exactly what it computes alone.

The prefix is run once (prefill) and its keys/values cached; each step then feeds only the new
tokens. Rows that finish are dropped from the batch (and the cache), so a batch costs what its
unfinished rows cost. ``use_cache=False`` recomputes the whole sequence every step (the reference
for the "cached equals uncached" test and the benchmark).

fairseq-generate protocol: ``generate(models, sample, **kw)`` returns, per sentence, an n-best list
of ``{"tokens", "score", "positional_scores", "alignment"}`` with ``tokens`` ending in ``</s>``.
Safety: a hypothesis whose tail repeats an n-gram 3 times (``loop_guard_ngram``) or that reaches its
task's length cap (``max_len_per_task``) is stopped and logged as ``guard id=<idx> reason=<why>``
(fairseq-generate writes the log into its output file, where ``wavllm-score`` counts the lines).
"""
import logging
import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..models.wavllm import GenerationPrefix
from .kv_cache import GrowingCache, GrowingLayer
from .static_decode import decoder_for, supported

logger = logging.getLogger(__name__)

LOOP_REPEATS = 3  # an n-gram repeated this many times back to back at the tail is a loop
PREFILL_PAD_WASTE = 0.1  # prefill rows one by one when padding would be more than this share of the work


def loop_length(tokens: Sequence[int], max_n: int, repeats: int = LOOP_REPEATS) -> int:
    """n if the tail of ``tokens`` is one n-gram (n <= max_n) repeated ``repeats`` times, else 0."""
    for n in range(1, max_n + 1):
        if len(tokens) < n * repeats:
            break
        tail = tokens[-n:]
        if all(list(tokens[-(k + 1) * n: len(tokens) - k * n]) == list(tail) for k in range(1, repeats)):
            return n
    return 0


# a decode-path option -> WavLLMGenerator(static=...): auto (None: static on a GPU, dynamic on a CPU)
_STATIC_FOR = {"auto": None, "static": True, "dynamic": False}
DECODE_PATHS = tuple(_STATIC_FOR)


def static_for(decode_path) -> Optional[bool]:
    """``WavLLMGenerator(static=...)`` for a ``decode_path`` option (one of :data:`DECODE_PATHS`)."""
    name = str(decode_path)
    if name not in _STATIC_FOR:
        raise ValueError(f"decode path must be one of {DECODE_PATHS}, got {name!r}")
    return _STATIC_FOR[name]


class WavLLMGenerator:
    """A fairseq-generate generator for decoder-only WavLLM (one model; no ensembles)."""

    def __init__(self, models, tgt_dict, beam_size: int = 1, max_len_a: float = 0.0, max_len_b: int = 200,
                 min_len: int = 1, normalize_scores: bool = True, len_penalty: float = 1.0, temperature: float = 1.0,
                 sampling: bool = False, sampling_topk: int = -1, sampling_topp: float = -1.0,
                 no_repeat_ngram_size: int = 0, repetition_penalty: float = 1.0, loop_guard_ngram: int = 0,
                 max_len_per_task: Optional[Dict[str, int]] = None, nbest: int = 1, use_cache: bool = True,
                 static: Optional[bool] = None, cuda_graphs: Optional[bool] = None, compile_step: bool = False,
                 ban_unk: bool = True):
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
        self._told_compile = False  # warned once that compile_step has nothing to compile on the dynamic path
        self._decoder = None
        # the reference bans <unk> at every step (a dictionary whose unk is its eos has none to ban)
        unk = tgt_dict.unk() if (ban_unk and tgt_dict is not None and hasattr(tgt_dict, "unk")) else None
        self.banned = [unk] if unk is not None and unk != self.eos else []
        self.guard_counts: Dict[str, int] = {}
        if self.sampling and self.beam_size > 1:
            raise ValueError("sampling with beam > 1 is not supported: use --beam 1 with --sampling")

    # ------------------------------------------------------------------ fairseq entry point
    def cuda(self):
        return self

    @torch.no_grad()
    def generate(self, models, sample, prefix_tokens=None, constraints=None, bos_token=None, on_step=None, **kwargs):
        """Decode ``sample`` (the collater's batch). Besides fairseq's keys, ``sample["max_len"]`` (a list,
        one int per row) caps rows individually (a server's per-request ``max_tokens``).

        ``on_step(rows, tokens)`` (greedy and sampling only) is called after every step with the
        original batch indices of the live rows and the token each just chose (streaming); it may return
        batch indices to end now (a client that left): those rows close with ``</s>`` after this token.
        """
        if constraints is not None:
            raise NotImplementedError("lexical constraints are not supported by the WavLLM generator")
        if prefix_tokens is not None:
            raise NotImplementedError("--prefix-size is not supported: the prefix is the speech + instruction")
        model = self.model
        was_training = model.training
        model.eval()
        try:
            prefix = model.build_generation_prefix(sample["net_input"])
            B = prefix.embeds.shape[0]
            caps = self._length_caps(sample, prefix, B)
            ids = sample["id"].tolist() if "id" in sample else list(range(B))
            if self.beam_size == 1:
                return self._greedy(prefix, caps, ids, on_step)
            if on_step is not None:
                raise ValueError("on_step (streaming) works with greedy decoding and sampling, not with beam search")
            return self._beam(prefix, caps, ids, self.beam_size)
        finally:
            model.train(was_training)

    def _length_caps(self, sample, prefix, B) -> List[int]:
        lens = prefix.attention_mask.sum(1).tolist()
        caps = [max(1, int(self.max_len_a * n + self.max_len_b)) for n in lens]
        tasks = sample.get("task_names") or [None] * B
        self._cap_is_task = [False] * B
        for i, t in enumerate(tasks):
            if t in self.max_len_per_task and self.max_len_per_task[t] < caps[i]:
                caps[i] = self.max_len_per_task[t]
                self._cap_is_task[i] = True
        if sample.get("max_len") is not None:
            caps = [max(1, min(c, int(m))) for c, m in zip(caps, sample["max_len"])]
        context = getattr(self.model, "context_length", None)
        if context:
            caps = [max(1, min(c, int(context) - int(n))) for c, n in zip(caps, lens)]
        return caps

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
        forward costs its kernel launches whatever the padding: 32 row-by-row prefills were half of a
        batch-32 decode on an H200), the batch is prefilled at once.
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

    def _state(self, prefix: GenerationPrefix, cache, mask, caps: List[int]) -> dict:
        """The decoding state after prefill: the dynamic cache, or a static decoder that took it over."""
        state = {"mask": mask, "cache": cache, "r": prefix.lora_scale, "static": None,
                 "embeds": None if cache is not None else prefix.embeds}
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
                      capacity=mask.shape[1] + max(caps) + 1)
            state.update(static=dec, cache=None, mask=None)
        return state

    def _num_layers(self) -> int:
        return self.model.llm.config.num_hidden_layers

    def _step(self, state, new_tokens: torch.Tensor):
        """Append ``new_tokens`` (B,) to every row; returns next-token logits (B, V)."""
        if state["static"] is not None:
            return state["static"].step(new_tokens)
        emb = self._embed(new_tokens[:, None])  # (B, 1, D)
        state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(state["mask"].shape[0], 1)], 1)
        if state["cache"] is not None:
            pos = state["mask"].sum(1, keepdim=True) - 1  # (B, 1)
            return self._logits(emb, state["mask"], state["cache"], state["r"], pos)
        state["embeds"] = torch.cat([state["embeds"], emb], 1)
        positions = (state["mask"].cumsum(1) - 1).clamp(min=0)
        return self._logits(state["embeds"], state["mask"], None, state["r"], positions)

    def _select(self, state, index: torch.Tensor):
        """Keep / reorder batch rows (finished rows dropped, beams reordered)."""
        if state["static"] is not None:
            state["static"].select(index)
            return
        state["mask"] = state["mask"].index_select(0, index)
        if state["r"] is not None:
            state["r"] = state["r"].index_select(0, index)
        if state["cache"] is not None:
            state["cache"].reorder_cache(index)
        else:
            state["embeds"] = state["embeds"].index_select(0, index)

    # ------------------------------------------------------------------ logit processing
    def _process(self, lprobs: torch.Tensor, histories: List[List[int]], step: int) -> torch.Tensor:
        """Repetition penalty, n-gram blocking and the minimum length, on (N, V) log-probs or logits."""
        if self.repetition_penalty != 1.0:
            for i, hist in enumerate(histories):
                if hist:
                    idx = torch.tensor(sorted(set(hist)), device=lprobs.device)
                    v = lprobs[i, idx]
                    lprobs[i, idx] = torch.where(v > 0, v / self.repetition_penalty, v * self.repetition_penalty)
        n = self.no_repeat_ngram_size
        if n > 0:
            for i, hist in enumerate(histories):
                if len(hist) >= n - 1:
                    key = tuple(hist[len(hist) - n + 1:]) if n > 1 else ()
                    banned = {hist[j + n - 1] for j in range(len(hist) - n + 1) if tuple(hist[j: j + n - 1]) == key}
                    if banned:
                        lprobs[i, list(banned)] = -math.inf
        if step < self.min_len:
            lprobs[:, self.eos] = -math.inf
        if self.banned:
            lprobs[:, self.banned] = -math.inf
        return lprobs

    def _guard(self, idx: int, reason: str, detail: str = "") -> None:
        self.guard_counts[reason] = self.guard_counts.get(reason, 0) + 1
        logger.info(f"guard id={idx} reason={reason}" + (f" {detail}" if detail else ""))

    # ------------------------------------------------------------------ greedy / sampling
    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.sampling:
            return logits.argmax(-1)
        logits = logits / self.temperature
        if self.topk > 0:
            kth = logits.topk(min(self.topk, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if 0 < self.topp < 1:
            sorted_logits, order = logits.sort(-1, descending=True)
            probs = sorted_logits.softmax(-1)
            drop = probs.cumsum(-1) - probs > self.topp  # keep the smallest set whose mass reaches topp
            sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
            logits = torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)
        return torch.multinomial(logits.softmax(-1), 1).squeeze(-1)

    def _greedy(self, prefix: GenerationPrefix, caps: List[int], ids: List[int], on_step=None):
        B = prefix.embeds.shape[0]
        logits, cache, mask = self._start(prefix)
        state = self._state(prefix, cache, mask, caps)
        active = list(range(B))  # original row of each current batch row
        tokens: List[List[int]] = [[] for _ in range(B)]
        scores: List[List[float]] = [[] for _ in range(B)]
        step = 0
        while active:
            hist = [tokens[b] for b in active]
            logits = self._process(logits, hist, step)
            lprobs = F.log_softmax(logits / self.temperature, dim=-1)  # the scores reported, as the reference
            nxt = self._choose(logits)
            chosen = lprobs.gather(1, nxt[:, None]).squeeze(1).tolist()
            nxt_list = nxt.tolist()
            stop = set(on_step(list(active), nxt_list) or ()) if on_step is not None else ()
            keep = []
            for j, b in enumerate(active):
                tokens[b].append(nxt_list[j])
                scores[b].append(chosen[j])
                if nxt_list[j] == self.eos:
                    continue
                if b in stop:
                    self._close(tokens[b], scores[b])
                    continue
                if len(tokens[b]) >= caps[b]:
                    if self._cap_is_task[b]:
                        self._guard(ids[b], "task_max_len", f"len={caps[b]}")
                    self._close(tokens[b], scores[b])
                    continue
                if self.loop_guard_ngram and loop_length(tokens[b], self.loop_guard_ngram):
                    self._guard(ids[b], "loop", f"ngram={loop_length(tokens[b], self.loop_guard_ngram)}")
                    self._close(tokens[b], scores[b])
                    continue
                keep.append(j)
            if not keep:
                break
            if len(keep) < len(active):
                index = torch.tensor(keep, device=nxt.device)
                self._select(state, index)
                nxt = nxt.index_select(0, index)
                active = [active[j] for j in keep]
            step += 1
            logits = self._step(state, nxt)
        return [[self._hypo(tokens[b], scores[b])] for b in range(B)]

    def _close(self, toks: List[int], sc: List[float]) -> None:
        toks.append(self.eos)
        sc.append(0.0)

    def _hypo(self, toks: List[int], sc: List[float], score: Optional[float] = None) -> dict:
        pos = torch.tensor(sc, dtype=torch.float32)
        if score is None:
            score = float(pos.sum()) / (len(sc) ** self.len_penalty if self.normalize_scores else 1.0)
        return {"tokens": torch.tensor(toks, dtype=torch.long), "score": float(score), "positional_scores": pos,
                "alignment": None}

    # ------------------------------------------------------------------ beam search
    def _beam(self, prefix: GenerationPrefix, caps: List[int], ids: List[int], K: int):
        """Standard beam search; beams share the prefix cache (expanded K times after prefill)."""
        B = prefix.embeds.shape[0]
        logits, cache, mask = self._start(prefix)
        expand = torch.arange(B, device=logits.device).repeat_interleave(K)
        state = self._state(prefix, cache, mask, caps)
        self._select(state, expand)
        logits = logits.index_select(0, expand)
        V = logits.shape[-1]
        beams = [[([], [], 0.0)] * K for _ in range(B)]  # per sentence: (tokens, positional scores, sum)
        finished: List[List[dict]] = [[] for _ in range(B)]
        active = list(range(B))
        step = 0

        def norm(total, length):
            return total / (length ** self.len_penalty) if self.normalize_scores else total

        while active:
            hist = [beams[b][k][0] for b in active for k in range(K)]
            lprobs = F.log_softmax(self._process(logits, hist, step).float() / self.temperature, dim=-1)  # (A*K, V)
            A = len(active)
            base = torch.tensor([beams[b][k][2] for b in active for k in range(K)], device=lprobs.device)
            if step == 0:  # all K beams are the same prefix: expand only the first
                base = base.view(A, K)
                base[:, 1:] = -math.inf
                base = base.view(-1)
            cand = (lprobs + base[:, None]).view(A, K * V)
            top_scores, top_idx = cand.topk(min(2 * K, K * V), dim=-1)
            top_scores, top_idx = top_scores.tolist(), top_idx.tolist()
            lp = lprobs.view(A, K, V)
            next_rows, next_tokens, new_active = [], [], []
            for a, b in enumerate(active):
                new_beams = []
                for s, flat in zip(top_scores[a], top_idx[a]):
                    if s == -math.inf:
                        continue
                    k, tok = divmod(flat, V)
                    toks, pos, _ = beams[b][k]
                    tok_lp = float(lp[a, k, tok])
                    if tok == self.eos:
                        if len(finished[b]) < K:
                            finished[b].append(self._hypo(toks + [tok], pos + [tok_lp], norm(s, len(toks) + 1)))
                        continue
                    new_toks, new_pos = toks + [tok], pos + [tok_lp]
                    if len(new_toks) >= caps[b] or (self.loop_guard_ngram and
                                                    loop_length(new_toks, self.loop_guard_ngram)):
                        if len(finished[b]) < K:
                            reason = "loop" if len(new_toks) < caps[b] else (
                                "task_max_len" if self._cap_is_task[b] else None)
                            if reason:
                                self._guard(ids[b], reason)
                            finished[b].append(self._hypo(new_toks + [self.eos], new_pos + [0.0],
                                                          norm(s, len(new_toks) + 1)))
                        continue
                    new_beams.append((new_toks, new_pos, s, a * K + k, tok))
                    if len(new_beams) == K:
                        break
                if len(finished[b]) >= K or not new_beams:
                    continue
                # early stop: no live beam can beat the worst kept finished hypothesis
                if len(finished[b]) >= self.nbest and self._done(finished[b], new_beams, caps[b], norm):
                    continue
                while len(new_beams) < K:  # pad with a dead copy so the batch stays rectangular
                    t, p, _, row, tok = new_beams[0]
                    new_beams.append((t, p, -math.inf, row, tok))
                beams[b] = [(t, p, s) for t, p, s, _, _ in new_beams]
                next_rows += [row for _, _, _, row, _ in new_beams]
                next_tokens += [tok for _, _, _, _, tok in new_beams]
                new_active.append(b)
            if not new_active:
                break
            index = torch.tensor(next_rows, device=lprobs.device)
            self._select(state, index)
            active = new_active
            step += 1
            logits = self._step(state, torch.tensor(next_tokens, device=lprobs.device))
        out = []
        for b in range(B):
            hyps = finished[b]
            if not hyps:  # nothing ended (caps of 0): return the best live beam closed with eos
                t, p, s = beams[b][0]
                hyps = [self._hypo(t + [self.eos], p + [0.0], norm(s, len(t) + 1))]
            out.append(sorted(hyps, key=lambda h: -h["score"])[: self.nbest])
        return out

    def _done(self, finished, live, cap, norm) -> bool:
        """True when the best live beam, even with no further loss, cannot beat the finished ones."""
        worst_kept = sorted(h["score"] for h in finished)[-self.nbest]
        best_live = max(s for _, _, s, _, _ in live)
        if self.normalize_scores and self.len_penalty > 0:
            # log-probs only decrease; with length normalisation a longer hypothesis can still win,
            # bounded by dividing by the longest possible length
            bound = best_live / (cap ** self.len_penalty) if best_live < 0 else best_live
        else:
            bound = best_live
        return bound < worst_kept
