"""The WavLLM model (``@register_model("wavllm")``); its named architectures are architectures.py.

Data flow for a batch of B utterances (paper section 3.1)::

    wav (B, T) 16 kHz ──> Whisper encoder ─> (B, T/320, Dw)  ─> semantic adapter ─> (B, N, A)
                    └──> WavLM, all L+1 hidden states ─> (L+1, B, T/320, Dl)
                             ─> acoustic adapter (softmax layer weights) ─> (B, N, A)
    frames of both branches trimmed to the shorter (N at 80 ms), concat ─> (B, N, 2A)
    projector Linear(2A -> D) ─> speech embeddings (B, N, D)
    LLM input per utterance: [pre tokens][speech N][post tokens]   (see data/prompt_template.py)
    LLaMA (frozen) with LoRA on q, k, v, o; stage 2: LoRA scaled per utterance by the
    prompt-aware adapter's r (prompt_adapter.py).

The loss (criterions/cross_entropy.py) is computed only on target tokens: the model returns logits at exactly the
positions that predict a target token, which also saves the (N, vocab) projection elsewhere.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from fairseq.models import BaseFairseqModel, register_model

from ..errors import WavLLMInputError
from . import encoders
from .adapters import ModalityAdapter, Projector
from .architectures import ARCHITECTURES, fill_from_arch, register_architectures
from .checkpoint_state import CheckpointState
from .config import WavLLMConfig, check_choices, torch_dtype
from .llm import LORA_TARGETS, build_llm
from .lora import (checkpoint_context_fn, inject_lora, lora_disabled, lora_scale_context, merge_lora,
                   rotary_meta_to_hf_rows, unmerge_lora)
from .prompt_adapter import PromptAwareLoRAScale
from .shrink import CTCShrink
from .speech import SpeechBranch
from .trainability import apply_trainability

@dataclass
class GenerationPrefix:
    """What ``WavLLMModel.build_generation_prefix`` hands the generator (decoding/generator.py)."""

    embeds: torch.Tensor  # (B, L, D) left-padded
    attention_mask: torch.Tensor  # (B, L) long, 0 on padding
    lora_scale: Optional[torch.Tensor] = None  # (B, D) stage-2 prompt-aware LoRA scale, or None


@register_model("wavllm", dataclass=WavLLMConfig)
class WavLLMModel(SpeechBranch, CheckpointState, BaseFairseqModel):
    """WavLLM: dual speech encoders + adapters + projector feeding a LoRA-tuned frozen LLaMA.

    The speech methods (``speech_frames``, ``encode_speech``) are speech.py's, ``state_dict`` /
    ``load_state_dict`` checkpoint_state.py's.

    Args:
        cfg (WavLLMConfig): the model config, sizes filled (``fill_from_arch``).
        vocab_size (int): the tokenizer's vocabulary (the LLM must have as many rows).
        arch (str): the architecture name (``self.arch``).
    """

    def __init__(self, cfg: WavLLMConfig, vocab_size: int, arch: str = "wavllm"):
        super().__init__()
        self.cfg = cfg
        self.arch = arch
        check_choices(cfg)
        bdtype = torch_dtype(cfg.backbone_dtype)
        self.backbone_from_path = {"whisper": bool(cfg.whisper_path), "wavlm": bool(cfg.wavlm_path and cfg.use_wavlm),
                                   "llm": bool(cfg.llama_path)}
        # ---- frozen backbones
        self.whisper = encoders.build_whisper(cfg, bdtype)
        self.wavlm = encoders.build_wavlm(cfg, bdtype)
        self.llm = build_llm(cfg, vocab_size, bdtype)
        if self.llm.config.vocab_size != vocab_size:
            raise WavLLMInputError(
                f"the LLM has {self.llm.config.vocab_size} tokens but the tokenizer has {vocab_size}: "
                f"use the tokenizer.model of the same LLaMA directory ({cfg.llama_path or 'random init'})")
        d_llm = self.llm.config.hidden_size
        # ---- trainable parts
        self.semantic_adapter = ModalityAdapter(self.whisper.dim, cfg.semantic_conv_mid_dim, cfg.semantic_conv_out_dim,
                                                cfg.bottleneck_dim, cfg.adapter_out_dim,
                                                bottleneck_norm=cfg.bottleneck_norm)
        if self.wavlm is not None:
            self.acoustic_adapter = ModalityAdapter(self.wavlm.dim, cfg.acoustic_conv_mid_dim,
                                                    cfg.acoustic_conv_out_dim, cfg.bottleneck_dim, cfg.adapter_out_dim,
                                                    num_layer_weights=self.wavlm.num_hidden_states,
                                                    bottleneck_norm=cfg.bottleneck_norm)
            self.projector = Projector(2 * cfg.adapter_out_dim, d_llm)
        else:
            self.acoustic_adapter = None
            self.projector = None
        if self.wavlm is None or cfg.keep_reference_unused_projector:
            # Whisper-only projection; the reference holds it (unused) even when WavLM is on
            self.semantic_only_projector = Projector(cfg.adapter_out_dim, d_llm)
        else:
            self.semantic_only_projector = None
        self.lora_modules = inject_lora(self.llm, LORA_TARGETS, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                                        cfg.lora_a_init)
        self.set_activation_checkpointing(cfg.activation_checkpointing)
        self._lay_out_lora_scale(cfg.lora_scale_layout)
        self.prompt_scale = _prompt_scale(cfg, d_llm) if cfg.prompt_adapter else None
        self.speech_shrink = (CTCShrink(d_llm, tokens=cfg.speech_shrink == "ctc_tokens")
                              if cfg.speech_shrink != "off" else None)
        self.trainable_counts = apply_trainability(self)
        self.train()

    def _lay_out_lora_scale(self, layout: str) -> None:
        """Tell each LoRA layer how it reads the stage-2 scale r (B, D): a grouped-query k/v projection
        averages r over each query group; ``layout="meta"`` reorders q/k's features (converted checkpoints)."""
        d_llm = self.llm.config.hidden_size
        heads = self.llm.config.num_attention_heads
        kv_heads = getattr(self.llm.config, "num_key_value_heads", None) or heads
        if kv_heads != heads:  # grouped-query attention: k/v read r averaged over each query group
            head_dim = getattr(self.llm.config, "head_dim", None) or d_llm // heads
            for layer in self.llm.model.layers:
                for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.share_scale_over_query_groups(heads // kv_heads, head_dim)
        if layout == "meta":
            for layer in self.llm.model.layers:
                for proj, h in ((layer.self_attn.q_proj, heads), (layer.self_attn.k_proj, kv_heads)):
                    proj.scale_rows = rotary_meta_to_hf_rows(h, proj.out_features)

    # ------------------------------------------------------------------ construction
    @classmethod
    def build_model(cls, cfg, task):
        """fairseq's builder: sizes from the architecture ``cfg._name``, vocabulary from the task.

        Args:
            cfg (WavLLMConfig or DictConfig): the model config (``_name`` = the architecture).
            task (Optional[FairseqTask]): whose target dictionary sets the vocabulary (None: the config's).

        Returns:
            WavLLMModel: the model.
        """
        arch = getattr(cfg, "_name", None) or "wavllm"
        fill_from_arch(cfg, arch if arch in ARCHITECTURES else "wavllm")
        vocab = (len(task.target_dictionary) if task is not None and task.target_dictionary is not None
                 else cfg.llama_vocab_size)
        return cls(cfg, vocab, arch)

    @classmethod
    def from_arch(cls, arch: str, vocab_size: Optional[int] = None, **overrides) -> "WavLLMModel":
        """A model of a named architecture with random weights (tests, benchmarks, counting on meta).

        Args:
            arch (str): a name in ``ARCHITECTURES``.
            vocab_size (Optional[int]): the vocabulary (default: the architecture's, if it has one).
            **overrides: ``WavLLMConfig`` fields.

        Returns:
            WavLLMModel: the model, in train mode.
        """
        cfg = WavLLMConfig(**overrides)
        fill_from_arch(cfg, arch)
        vocab = vocab_size if vocab_size is not None else cfg.llama_vocab_size
        if vocab is None or vocab <= 0:
            raise ValueError(f"{arch} takes its vocabulary from the tokenizer: pass vocab_size")
        return cls(cfg, vocab, arch)

    def set_activation_checkpointing(self, on: bool) -> None:
        """Recompute the LLM layers' activations in backward (or stop doing so).

        Args:
            on (bool): whether to recompute.
        """
        if on:
            # the recomputation in backward must see the LoRA scale of the forward (set by a context that
            # has exited by then): checkpoint_context_fn reinstalls it
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
                "use_reentrant": False, "context_fn": checkpoint_context_fn(self.llm)})
        elif self.llm.is_gradient_checkpointing:
            self.llm.gradient_checkpointing_disable()

    def train(self, mode: bool = True):
        """``nn.Module.train``, except that the frozen encoders always stay in eval mode.

        Args:
            mode (bool): train (True) or eval (False).

        Returns:
            WavLLMModel: self.
        """
        super().train(mode)
        # frozen encoders never run dropout / layer drop; the LLM has no dropout of its own, but stays
        # in train mode so LoRA dropout and activation checkpointing work
        self.whisper.eval()
        if self.wavlm is not None:
            self.wavlm.eval()
        return self

    @property
    def llm_dim(self) -> int:
        """The LLM width D."""
        return self.llm.config.hidden_size

    @property
    def context_length(self) -> int:
        """The LLM's context (``max_position_embeddings``)."""
        return self.llm.config.max_position_embeddings

    def max_positions(self):
        """None: no fairseq-side length filter (see the comment)."""
        # fairseq compares this with dataset sizes (audio samples here) to filter rows; the dataset
        # itself checks prompt + speech + answer against context_length with a clear error instead
        return None

    # ------------------------------------------------------------------ prompt-aware LoRA scale
    def prompt_lora_scale(self, instruction_tokens: torch.Tensor,
                          instruction_lengths: torch.Tensor) -> Optional[torch.Tensor]:
        """Stage 2: the LoRA scale r from the instruction's frozen-LLM (no LoRA) last-layer states.

        The instruction tokens are the reference's adapter input ('"' + instruction + '"', no <s>),
        pooled over every position (prompt_adapter.py). ``model.prompt_adapter_input``: the last decoder
        layer's output before the final norm (``last_layer``, the reference's) or after it (``final_norm``).

        Args:
            instruction_tokens (torch.Tensor): token ids with shape (B, M), right-padded.
            instruction_lengths (torch.Tensor): valid tokens, shape (B,), each >= 1.

        Returns:
            Optional[torch.Tensor]: r with shape (B, D); None in stage 1 (no prompt adapter).
        """
        if self.prompt_scale is None:
            return None
        mask = (torch.arange(instruction_tokens.shape[1], device=instruction_tokens.device)[None]
                < instruction_lengths[:, None])
        after_norm = self.cfg.prompt_adapter_input == "final_norm"
        captured = {}
        hook = None if after_norm else self.llm.model.layers[-1].register_forward_hook(
            lambda m, i, o: captured.__setitem__("h", o[0] if isinstance(o, tuple) else o))
        try:
            with torch.no_grad(), lora_disabled(self.llm):
                out = self.llm.model(input_ids=instruction_tokens, attention_mask=mask.long(), use_cache=False)
        finally:
            if hook is not None:
                hook.remove()
        return self.prompt_scale(out.last_hidden_state if after_norm else captured["h"], mask)  # (B, D)

    def lora_scale_context(self, r: Optional[torch.Tensor]):
        """Within the block every LoRA layer of the LLM is scaled by r (see lora.lora_scale_context).

        Args:
            r (Optional[torch.Tensor]): the per-utterance scale with shape (B, D), or None for alpha / R.

        Returns:
            contextlib.AbstractContextManager: the context.
        """
        return lora_scale_context(self.llm, r)

    # ------------------------------------------------------------------ sequence assembly
    def assemble(self, net_input: dict, left_pad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Build the LLM input [pre][speech][post] per utterance.

        Args:
            net_input (dict): the batch's ``net_input`` (data/dataset.py): ``audio``, ``audio_lengths``,
                ``pre_tokens``, ``pre_lengths``, ``post_tokens``, ``post_lengths``.
            left_pad (bool): pad on the left (generation prefix) or on the right (teacher forcing).

        Returns:
            Tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ``inputs_embeds`` with shape (B, L, D),
            ``attention_mask`` (B, L) long, and ``post_start`` (B,): the sequence index of each
            utterance's first post token (after padding is applied).
        """
        pre, pre_len = net_input["pre_tokens"], net_input["pre_lengths"]
        post, post_len = net_input["post_tokens"], net_input["post_lengths"]
        audio, audio_len = net_input["audio"], net_input["audio_lengths"]
        emb = self.llm.get_input_embeddings()
        pre_e, post_e = emb(pre), emb(post)  # (B, P, D), (B, Q, D)
        B = pre.shape[0]
        if audio is not None and audio.numel() > 0 and bool((audio_len > 0).any()):
            speech, speech_len = self.encode_speech(audio, audio_len)  # (B, N, D)
            speech_len = torch.where(audio_len > 0, speech_len, torch.zeros_like(speech_len))
            speech = speech.to(pre_e.dtype)
        else:
            speech, speech_len = pre_e.new_zeros(B, 0, pre_e.shape[-1]), torch.zeros_like(pre_len)
        rows = []
        for b in range(B):
            rows.append(torch.cat([pre_e[b, : pre_len[b]], speech[b, : speech_len[b]], post_e[b, : post_len[b]]],
                                  dim=0))
        lengths = pre_len + speech_len + post_len
        L = int(lengths.max())
        x = pre_e.new_zeros(B, L, pre_e.shape[-1])
        mask = torch.zeros(B, L, dtype=torch.long, device=pre.device)
        offsets = (L - lengths) if left_pad else torch.zeros_like(lengths)
        for b, row in enumerate(rows):
            o = int(offsets[b])
            x[b, o: o + row.shape[0]] = row
            mask[b, o: o + row.shape[0]] = 1
        return x, mask, offsets + pre_len + speech_len

    def forward(self, audio: torch.Tensor, audio_lengths: torch.Tensor, pre_tokens: torch.Tensor,
                pre_lengths: torch.Tensor, post_tokens: torch.Tensor, post_lengths: torch.Tensor,
                post_target_mask: torch.Tensor, instruction_tokens: Optional[torch.Tensor] = None,
                instruction_lengths: Optional[torch.Tensor] = None,
                prompt_post_lengths: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher-forced pass over the collater's ``net_input`` (data/dataset.py documents every key).

        Args:
            audio (torch.Tensor): 16 kHz waveforms with shape (B, T), right-padded; T = 0 without speech.
            audio_lengths (torch.Tensor): valid samples, shape (B,); 0 on text-only rows.
            pre_tokens (torch.Tensor): tokens before the speech span with shape (B, P), right-padded.
            pre_lengths (torch.Tensor): shape (B,).
            post_tokens (torch.Tensor): tokens after the speech span with shape (B, Q), right-padded.
            post_lengths (torch.Tensor): shape (B,).
            post_target_mask (torch.Tensor): bool with shape (B, Q), True on the N target tokens.
            instruction_tokens (Optional[torch.Tensor]): the prompt adapter's input with shape (B, M)
                (stage 2 only).
            instruction_lengths (Optional[torch.Tensor]): shape (B,) (stage 2 only).
            prompt_post_lengths (Optional[torch.Tensor]): shape (B,); the generation prefix's length,
                not read here (build_generation_prefix reads it).

        Returns:
            Tuple[torch.Tensor, torch.Tensor, torch.Tensor]: logits with shape (N, V) at the positions
            that predict the N target tokens, those targets (N,), and the row of each (N,), in
            row-major target order.
        """
        net_input = dict(audio=audio, audio_lengths=audio_lengths, pre_tokens=pre_tokens, pre_lengths=pre_lengths,
                         post_tokens=post_tokens, post_lengths=post_lengths)
        x, mask, post_start = self.assemble(net_input, left_pad=False)  # right padding: positions 0..L-1
        r = self.prompt_lora_scale(instruction_tokens, instruction_lengths) if self.prompt_scale is not None else None
        with self.lora_scale_context(r):
            h = self.llm.model(inputs_embeds=x, attention_mask=mask, use_cache=False).last_hidden_state  # (B, L, D)
        rows, cols = post_target_mask.nonzero(as_tuple=True)  # target tokens, row-major = target order
        seq_pos = post_start[rows] + cols  # where each target token sits in the sequence
        logits = self.llm.lm_head(h[rows, seq_pos - 1])  # predicted from the previous position: (N, V)
        return logits, post_tokens[rows, cols], rows

    # ------------------------------------------------------------------ generation
    def build_generation_prefix(self, net_input: dict) -> GenerationPrefix:
        """Left-padded speech+prompt prefix for the generator (decoding/generator.py's protocol).

        Args:
            net_input (dict): the batch's ``net_input``; ``prompt_post_lengths`` (when present) cuts
                ``post_tokens`` before the last answer.

        Returns:
            GenerationPrefix: embeddings (B, L, D), attention mask (B, L) and the stage-2 scale (B, D).
        """
        net_input = dict(net_input)
        if "prompt_post_lengths" in net_input:  # drop the last answer: the generator writes it
            net_input["post_lengths"] = net_input["prompt_post_lengths"]
        if self.cfg.decode_bos_after_speech:  # the reference's generator: <s> where " </SPEECH>" starts
            post = net_input["post_tokens"].clone()
            post[:, 0] = self.llm.config.bos_token_id
            net_input["post_tokens"] = post
        x, mask, _ = self.assemble(net_input, left_pad=True)
        r = None
        if self.prompt_scale is not None:
            r = self.prompt_lora_scale(net_input["instruction_tokens"], net_input["instruction_lengths"])
        return GenerationPrefix(embeds=x, attention_mask=mask, lora_scale=r)

    def merge_lora(self) -> int:
        """Fold plain (stage-1) LoRA into the LLM's base weights for faster decoding.

        Returns:
            int: how many LoRA layers were merged.

        Raises:
            RuntimeError: in stage 2, whose LoRA is scaled per utterance.
        """
        if self.prompt_scale is not None:
            raise RuntimeError("stage-2 LoRA is scaled per utterance and cannot be merged")
        return merge_lora(self.llm)

    def unmerge_lora(self) -> int:
        """Undo :meth:`merge_lora`.

        Returns:
            int: how many LoRA layers there are.
        """
        return unmerge_lora(self.llm)


def _prompt_scale(cfg: WavLLMConfig, d_llm: int) -> PromptAwareLoRAScale:
    """The stage-2 prompt adapter; with ``prompt_adapter_init=stage1_scale`` it starts at r = alpha / R."""
    init_scale = None
    if cfg.prompt_adapter_init == "stage1_scale":
        init_scale = cfg.lora_alpha / cfg.lora_rank
        if cfg.prompt_adapter_clamp and cfg.prompt_adapter_clamp > 0:
            init_scale = min(init_scale, cfg.prompt_adapter_clamp)
    return PromptAwareLoRAScale(d_llm, cfg.prompt_adapter_dim, cfg.prompt_adapter_clamp, init_scale)


def build_on_meta(arch: str, stage: int = 1, vocab_size: Optional[int] = None) -> WavLLMModel:
    """Build ``arch`` on the meta device (no memory, no weights): shapes and parameter counts only.

    Args:
        arch (str): a name in ``ARCHITECTURES``.
        stage (int): 1, or 2 with the prompt adapter.
        vocab_size (Optional[int]): the vocabulary (default: the architecture's).

    Returns:
        WavLLMModel: the model, every tensor on the meta device.
    """
    with torch.device("meta"):
        return WavLLMModel.from_arch(arch, vocab_size=vocab_size, prompt_adapter=(stage == 2))


register_architectures("wavllm")
