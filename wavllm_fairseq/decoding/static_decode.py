"""Decoding steps for accelerators: a preallocated key/value cache and the one-token step captured as a
CUDA graph, so a step costs the LLM's weight reads, not thousands of kernel launches from Python.

On a GPU the dynamic path (generator.py: Hugging Face's LLaMA forward over a growing cache) spends a
step launching kernels from Python, whatever the batch, rather than reading the weights. Here, after the
prefill (the same code as the dynamic path), every step runs one fixed sequence of kernels over fixed
buffers::

    tok (S,) -> embed -> 32 x [RMSNorm, q/k/v (+LoRA, scaled by r), RoPE at pos (S,),
                               k/v written at column c of the (S, Hkv, C, hd) cache,
                               attention over all C columns with an additive mask (S, 1, 1, C),
                               o (+LoRA), RMSNorm, MLP] -> RMSNorm -> lm_head -> logits (S, V) float32
    then pos += 1, c += 1          (inside the graph; only tok is written from outside)

``S`` is the number of cache slots (the batch, rounded as below), ``C = L + max_new`` the capacity
(left-padded prefix of ``L`` columns + the longest answer allowed). Left padding puts every row's next
token in the same column ``c``, so one ``index_copy_`` writes the whole batch; column ``c`` of the mask
is opened before the attention reads it; positions are per row (``pos``), counted from each row's
first real token exactly as the dynamic path counts them.

Finished rows: the generator reports the rows it keeps (``select``). Rows that merely finish keep
their slot (a slot map, no copy) until the live rows fit in half the slots; then the live slots are
gathered into the buffers of the next power-of-two slot count, which has its own captured graph
(finished rows stop costing attention and activations; the weight reads, the bulk of a step, do not
shrink). Beam search reorders rows every step: a reordering with repeats gathers the cache in place,
as any beam search over a cache does. Rows that join a running batch (``join``, continuous batching in a
server) are placed with the live rows, left-padded, into one cache over which the step starts again.

Buffers and graphs are kept per slot count and reused by the next batch while its prefix + answer
fit the capacity (rounded up to ``CAPACITY_STEP`` columns), so a graph is captured once per slot
count, not once per batch. The model holds its decoder (:func:`decoder_for`), so every generator
on it (fairseq-generate's, the Python API's, a server's per batch) shares them; they stay allocated
while the model lives (``release_decoders(model)`` frees them):
about ``2 * layers * kv_dim * C * bytes`` per slot, 0.5 MB per column for LLaMA-2-7B in bf16.

The step is written out over the Hugging Face modules' own weights (``q_proj``, ``mlp``, ``rotary_emb``
...), for LLaMA-architecture models (``model_type`` llama, qwen2 or mistral without a sliding window,
rope types other than "dynamic"); :func:`supported` says why not otherwise, and the generator then
keeps the dynamic path. On a CPU the same step runs eagerly (no graph): the tests check it against the
dynamic path token for token (greedy, sampling, beam, finished rows, stage-2 LoRA scale).

A captured graph removes the launch cost but not the kernels: eagerly, one LLaMA layer's step is the
matrix products (the seven weights and four LoRA pairs), the attention, and many small element-wise
kernels (each RMSNorm, RoPE, each LoRA projection's scale and add, residual adds, key/value writes,
SiLU * up). ``compile=True`` (``WavLLMGenerator(compile_step=True)``) runs each layer's step through
``torch.compile`` (:func:`layer_step`, compiled once for all layers: their weights are inputs, so
compiling costs one layer's graph, not the whole model's), and the CUDA graph captures the compiled
step. Inductor keeps the matrix products and fuses the rest (RMSNorm, RoPE, the LoRA scale and residual
adds, the key/value column write, SiLU * up); examples/wavllm/toy/RESULTS.md has the kernel counts and
speeds measured. The first slot count compiles a static step, the next one a step with a symbolic slot count
that serves every further one, and one slot (a size dynamo specializes) its own: three compilations per
model. Dynamo keeps its compilations per code object, so models of different shapes in one process share
its recompile limit (``torch._dynamo.config.recompile_limit``, 8 by default); past it the layers run
eagerly, which is slower, not wrong.
"""
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from ..models.lora import lora_modules
from .kv_cache import join_left_padded

ARCH_TYPES = ("llama", "qwen2", "mistral")


def supported(llm) -> Optional[str]:
    """Whether the static step can run this causal LM.

    Args:
        llm: a Hugging Face causal LM (``LlamaForCausalLM``-like: ``llm.model.layers``, ``llm.config``)

    Returns:
        Optional[str]: None if it can, else the reason it cannot
    """
    cfg = llm.config
    if getattr(cfg, "model_type", None) not in ARCH_TYPES:
        return f"model_type {getattr(cfg, 'model_type', None)!r} is not one of {ARCH_TYPES}"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return "sliding-window attention"
    rope = getattr(cfg, "rope_parameters", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) == "dynamic":
        return "dynamic RoPE scaling (its frequencies depend on the sequence length)"
    layer = llm.model.layers[0]
    attn = layer.self_attn
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim"):
        if not hasattr(attn, name):
            return f"attention without {name}"
    for name in ("q_norm", "k_norm"):
        if getattr(attn, name, None) is not None:
            return f"attention with {name}"
    for name in ("input_layernorm", "post_attention_layernorm", "mlp"):
        if not hasattr(layer, name):
            return f"decoder layer without {name}"
    return None


CAPACITY_STEP = 256  # cache capacity is rounded up to this many columns, so batches reuse the buffers


def _buckets(n: int) -> int:
    """The slot count for ``n`` live rows once compacting: the next power of two."""
    return 1 << max(0, (n - 1).bit_length())


class _Slots:
    """The buffers (dim 0 = slot) of one slot count, and its captured graph."""

    def __init__(self, S: int, n_layers: int, n_kv: int, C: int, head_dim: int, dim_r: Optional[int], like):
        kv = (S, n_kv, C, head_dim)
        self.k = [like.new_zeros(kv) for _ in range(n_layers)]
        self.v = [like.new_zeros(kv) for _ in range(n_layers)]
        self.mask = like.new_full((S, 1, 1, C), torch.finfo(like.dtype).min)
        self.pos = torch.zeros(S, 1, dtype=torch.long, device=like.device)
        self.tok = torch.zeros(S, 1, dtype=torch.long, device=like.device)
        self.r = None if dim_r is None else torch.zeros(S, dim_r, dtype=torch.float32, device=like.device)
        self.logits = None
        self.graph = None

    def tensors(self) -> List[torch.Tensor]:
        return self.k + self.v + [self.mask, self.pos, self.tok] + ([self.r] if self.r is not None else [])


def layer_step(layer, x, cos, sin, k_cache, v_cache, mask, col, groups: int) -> torch.Tensor:
    """One decoder layer for one new token per row, over the Hugging Face layer's own modules and weights
    (LoRA wrappers included), so the same function serves every layer of every model.

    Args:
        layer: a LLaMA-like decoder layer
        x (torch.Tensor): hidden states with shape (S, 1, D)
        cos (torch.Tensor): RoPE cosines at each row's position, (S, 1, hd)
        sin (torch.Tensor): RoPE sines, (S, 1, hd)
        k_cache (torch.Tensor): the layer's keys (S, Hkv, C, hd); column ``col`` is written in place
        v_cache (torch.Tensor): the layer's values (S, Hkv, C, hd); column ``col`` is written in place
        mask (torch.Tensor): additive attention mask (S, 1, 1, C)
        col (torch.Tensor): the cache column written, shape (1,)
        groups (int): query heads per key/value head

    Returns:
        torch.Tensor: the layer's output with shape (S, 1, D)
    """
    S = x.shape[0]
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    q = attn.q_proj(h).view(S, 1, -1, attn.head_dim).transpose(1, 2)  # (S, H, 1, hd)
    k = attn.k_proj(h).view(S, 1, -1, attn.head_dim).transpose(1, 2)  # (S, Hkv, 1, hd)
    v = attn.v_proj(h).view(S, 1, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k_cache.index_copy_(2, col, k)
    v_cache.index_copy_(2, col, v)
    keys, values = repeat_kv(k_cache, groups), repeat_kv(v_cache, groups)
    o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling)
    x = x + attn.o_proj(o.transpose(1, 2).reshape(S, 1, -1))
    return x + layer.mlp(layer.post_attention_layernorm(x))


class StaticDecoder:
    """One-token steps over a static cache for ``llm`` (a LlamaForCausalLM-like model).

    ``start(layers, mask, r, capacity)`` takes over a prefilled left-padded cache; ``step(tokens)``
    returns next-token logits for the live rows (float32); ``select(index)`` keeps / reorders rows.

    Args:
        llm: the causal LM (:func:`supported` must accept it)
        lora_scale_context: ``callable(r)`` -> a context manager that scales the LoRA branches by ``r``
            (``WavLLMModel.lora_scale_context``)
        graphs (bool): capture each slot count's step as a CUDA graph on first use (CUDA only)
        compile (bool): run each layer's step through ``torch.compile`` (Inductor fuses the element-wise work
            between the matrix products); with ``graphs`` the compiled step is what the CUDA graph captures
    """

    def __init__(self, llm, lora_scale_context, graphs: bool = False, compile: bool = False):
        why = supported(llm)
        if why is not None:
            raise ValueError(f"static decoding does not support this LLM: {why}")
        self.llm = llm
        self.scale_context = lora_scale_context  # callable(r) -> context manager (model.lora_scale_context)
        self.graphs = bool(graphs)
        self.compiled = bool(compile)
        # regional compilation: the layer step is compiled once and serves every layer (its weights are
        # inputs, not constants), so compiling costs one layer's graph, not the whole model's; automatic
        # dynamic shapes: the first slot count compiles a static step, the next one a symbolic step that
        # serves every further slot count and capacity (one slot is specialized: a third compilation)
        self._layer_fn = torch.compile(layer_step) if self.compiled else layer_step
        cfg = llm.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self._lora = list(lora_modules(llm))
        self.sets: Dict[int, _Slots] = {}
        self.C = 0
        self.key = None
        self._pool = None

    # ------------------------------------------------------------------ buffers
    def _slots(self, S: int) -> _Slots:
        if S not in self.sets:
            k0 = self._like
            self.sets[S] = _Slots(S, len(self.llm.model.layers), self.n_kv, self.C, k0.shape[-1], self._dim_r, k0)
        return self.sets[S]

    def start(self, layers, mask: torch.Tensor, r: Optional[torch.Tensor], capacity: int,
              slots: Optional[int] = None) -> None:
        """Take over a prefilled cache.

        Args:
            layers: per layer, its (keys, values), each with shape (B, Hkv, L, hd), left-padded
            mask (torch.Tensor): attention mask (B, L), 0 on padding
            r (Optional[torch.Tensor]): stage-2 LoRA scale (B, D), or None
            capacity (int): columns needed: L + the most tokens any row may add
            slots (Optional[int]): the slot count to use (default B); the slots past B repeat row 0
        """
        B, L = mask.shape
        k0 = layers[0][0]
        # anything a captured graph has baked in: layout, and which LoRA layers run merged / disabled
        lora = tuple((m.merged, m.enabled) for m in self._lora)
        key = (k0.device, k0.dtype, k0.shape[-1], None if r is None else r.shape[-1], lora)
        if key != self.key or capacity > self.C:  # new layout or too small: start afresh
            self.sets, self.key = {}, key
            self.C = -(-int(capacity) // CAPACITY_STEP) * CAPACITY_STEP
            self._like, self._dim_r = k0, key[3]
            self.col = torch.zeros(1, dtype=torch.long, device=k0.device)  # the column written next
        S = max(B, slots or B)
        fill = torch.cat([torch.arange(B), torch.zeros(S - B, dtype=torch.long)]).to(k0.device)

        def rows(t: torch.Tensor) -> torch.Tensor:
            return t if S == B else t.index_select(0, fill)

        cur = self.cur = self._slots(S)
        for i, (k, v) in enumerate(layers):
            cur.k[i][:, :, :L].copy_(rows(k))
            cur.v[i][:, :, :L].copy_(rows(v))
        cur.mask.fill_(torch.finfo(cur.mask.dtype).min)  # columns past the prefix stay closed until written
        cur.mask[:, 0, 0, :L].masked_fill_(rows(mask).bool(), 0.0)
        cur.pos.copy_(rows(mask).long().sum(1, keepdim=True))  # the next token's position per row
        if r is not None:
            cur.r.copy_(rows(r))
        self.col.fill_(L)
        self.written = L  # the same, counted on the host (no device sync per step)
        self.rows = torch.arange(B, device=k0.device)  # slot of each live row, in the generator's row order

    def join(self, layers, mask: torch.Tensor, r: Optional[torch.Tensor], room: int) -> None:
        """Rows join the live ones at a step boundary: both caches are placed left-padded into one
        (``join_left_padded``), over which decoding starts again with the next power-of-two slot count (each slot
        count keeps its buffers and graph). The newcomers come after the live rows, in the generator's row order.

        Args:
            layers: the newcomers' prefill, per layer (keys, values) with shape (M, Hkv, L', hd), left-padded
            mask (torch.Tensor): their attention mask (M, L'), 0 on padding
            r (Optional[torch.Tensor]): their stage-2 LoRA scale (M, D), or None
            room (int): the most tokens any row, live or new, may still add
        """
        live, live_mask, live_r = self._live_rows()
        cache, joined = join_left_padded([(live, live_mask), (layers, mask)], reserve=1)
        r = None if r is None else torch.cat([live_r, r.to(live_r.dtype)])
        self.start([(layer.keys, layer.values) for layer in cache.layers], joined, r,
                   capacity=joined.shape[1] + room + 1, slots=_buckets(joined.shape[0]))

    def _live_rows(self):
        """The live rows' cache, as :meth:`start` takes it.

        Returns:
            Tuple[list, torch.Tensor, Optional[torch.Tensor]]: per layer (keys, values) with shape (n, Hkv, W, hd)
            (copies; W the columns written), the attention mask (n, W) long, and the LoRA scale (n, D) or None
        """
        cur, rows, W = self.cur, self.rows, self.written
        layers = [(k.index_select(0, rows)[:, :, :W], v.index_select(0, rows)[:, :, :W]) for k, v in zip(cur.k, cur.v)]
        mask = (cur.mask[:, 0, 0, :W].index_select(0, rows) == 0).long()
        return layers, mask, None if cur.r is None else cur.r.index_select(0, rows)

    @property
    def slots(self) -> int:
        """Returns: int: the slot count of the buffers in use (S)."""
        return self.cur.tok.shape[0]

    # ------------------------------------------------------------------ the step
    def _forward(self) -> torch.Tensor:
        llm, model, cur = self.llm, self.llm.model, self.cur
        x = model.embed_tokens(cur.tok)  # (S, 1, D)
        cur.mask.index_fill_(-1, self.col, 0.0)  # the new column becomes visible to every row
        cos, sin = model.rotary_emb(x, cur.pos)
        groups = self.n_heads // self.n_kv
        for i, layer in enumerate(model.layers):
            x = self._layer_fn(layer, x, cos, sin, cur.k[i], cur.v[i], cur.mask, self.col, groups)
        logits = llm.lm_head(model.norm(x)[:, 0]).float()  # (S, V)
        cur.pos.add_(1)
        self.col.add_(1)
        return logits

    def _run(self) -> torch.Tensor:
        cur = self.cur
        if not self.graphs:
            with self.scale_context(cur.r):
                return self._forward()
        if cur.graph is None:
            self._capture(cur)
        cur.graph.replay()
        return cur.logits

    def _capture(self, cur: _Slots) -> None:
        """Capture the step for ``cur`` (state saved and restored around the warm-up)."""
        state = (cur.mask, cur.pos, self.col)
        saved = [t.clone() for t in state]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), self.scale_context(cur.r):
            for _ in range(2):  # warm-up: lazy inits and kernel selection happen outside the capture
                self._forward()
                for t, s in zip(state, saved):
                    t.copy_(s)
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        cur.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cur.graph, pool=self._pool), self.scale_context(cur.r):
            cur.logits = self._forward()
        for t, s in zip(state, saved):  # capturing records the kernels, it does not run them
            t.copy_(s)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token to each live row.

        Args:
            tokens (torch.Tensor): the new tokens with shape (n,), one per live row

        Returns:
            torch.Tensor: next-token logits with shape (n, V), float32
        """
        if self.written >= self.C:
            raise RuntimeError(f"static cache full ({self.C} columns)")
        self.written += 1
        self.cur.tok.index_copy_(0, self.rows, tokens.view(-1, 1).to(torch.long))
        return self._run().index_select(0, self.rows)

    def select(self, index: torch.Tensor) -> None:
        """Keep / reorder the live rows.

        Args:
            index (torch.Tensor): (n',) new row j is old row ``index[j]`` (repeats allowed: beams)
        """
        slots = self.rows.index_select(0, index.to(self.rows.device))
        n, S = slots.numel(), self.cur.tok.shape[0]
        if n == 0:
            return
        repeats = torch.unique(slots).numel() != n
        # the slot count: unchanged while the live rows fill more than half of it, else the next power of
        # two (smaller once half the rows have finished; larger when beams expand the batch)
        target = S if S // 2 < n <= S else _buckets(n)
        if not repeats and target == S:
            self.rows = slots  # finished rows keep their slots until half of them are free
            return
        fill = slots if n == target else torch.cat([slots, slots[:1].expand(target - n)])
        dst = self._slots(target)  # the same buffers when target == S (an in-place gather)
        for d, t in zip(dst.tensors(), self.cur.tensors()):
            d.copy_(t.index_select(0, fill))
        self.cur = dst
        self.rows = torch.arange(n, device=slots.device)


def decoder_for(model, graphs: bool, compile: bool = False) -> StaticDecoder:
    """The static decoder of ``model``, created on first use and kept on the model.

    Args:
        model (WavLLMModel): the model (its ``llm`` and ``lora_scale_context``)
        graphs (bool): with CUDA graphs
        compile (bool): with a compiled layer step

    Returns:
        StaticDecoder: one per (graphs, compile), shared by every generator on ``model``
    """
    held = model.__dict__.setdefault("_static_decoders", {})
    key = (bool(graphs), bool(compile))
    if key not in held:
        held[key] = StaticDecoder(model.llm, model.lora_scale_context, graphs=graphs, compile=compile)
    return held[key]


def release_decoders(model) -> None:
    """Drop the static decoders' buffers and captured graphs held by a model.

    Args:
        model (WavLLMModel): the model :func:`decoder_for` kept them on
    """
    model.__dict__.pop("_static_decoders", None)
