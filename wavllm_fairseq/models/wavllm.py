"""The WavLLM model (``@register_model("wavllm")``) and its named architectures.

Data flow for a batch of B utterances (paper section 3.1)::

    wav (B, T) 16 kHz ──> Whisper encoder ─> (B, T/320, Dw)  ─> semantic adapter ─> (B, N, A)
                    └──> WavLM, all L+1 hidden states ─> (L+1, B, T/320, Dl)
                             ─> acoustic adapter (softmax layer weights) ─> (B, N, A)
    frames of both branches trimmed to the shorter (N at 80 ms), concat ─> (B, N, 2A)
    projector Linear(2A -> D) ─> speech embeddings (B, N, D)
    LLM input per utterance: [pre tokens][speech N][post tokens]   (see prompt_template.py)
    LLaMA (frozen) with LoRA on q, k, v, o; stage 2: LoRA scaled per utterance by the
    prompt-aware adapter's r (prompt_adapter.py).

The loss (criterion.py) is computed only on target tokens: the model returns logits at exactly the
positions that predict a target token, which also saves the (N, vocab) projection elsewhere.
"""
import logging
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from fairseq.models import BaseFairseqModel, register_model

from ..errors import CheckpointError, WavLLMInputError
from . import encoders
from .adapters import ModalityAdapter, Projector, fuse_streams, subsampled_frames
from .architectures import ARCHITECTURES, fill_from_arch, register_architectures
from .config import WavLLMConfig, check_choices, complete_model_cfg, torch_dtype
from .lora import (checkpoint_context_fn, inject_lora, lora_disabled, lora_scale_context, merge_lora,
                   rotary_meta_to_hf_rows, unmerge_lora)
from .prompt_adapter import PromptAwareLoRAScale
from .trainability import apply_trainability

logger = logging.getLogger(__name__)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MIN_ENCODER_SAMPLES = 400  # shortest waveform the encoders' first convolutions accept (25 ms)


def expected_speech_frames(n_samples: int, use_wavlm: bool = True) -> int:
    """Speech embeddings (80 ms) for ``n_samples`` of audio without building a model: the same
    functions the modules' ``output_lengths`` use, with the released front ends' kernels (Whisper's
    10 ms hop and conv2, WavLM's feature extractor, the adapters' two stride-2 convs). The dataset checks
    prompt + speech + answer against the LLM context with it before any model exists (fairseq loads
    the validation sets first); equal to ``WavLLMModel.speech_frames`` (tested)."""
    if n_samples <= 0:
        return 0
    n = subsampled_frames(encoders.whisper_frames(n_samples))
    if use_wavlm:
        n = min(n, subsampled_frames(max(encoders.wavlm_frames(n_samples), 0)))
    return max(n, 0)


@dataclass
class GenerationPrefix:
    """What ``WavLLMModel.build_generation_prefix`` hands the generator (generator.py)."""

    embeds: torch.Tensor  # (B, L, D) left-padded
    attention_mask: torch.Tensor  # (B, L) long, 0 on padding
    lora_scale: Optional[torch.Tensor] = None  # (B, D) stage-2 prompt-aware LoRA scale, or None


@register_model("wavllm", dataclass=WavLLMConfig)
class WavLLMModel(BaseFairseqModel):
    """WavLLM: dual speech encoders + adapters + projector feeding a LoRA-tuned frozen LLaMA."""

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
        self.llm = encoders.build_llm(cfg, vocab_size, bdtype)
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
        heads = self.llm.config.num_attention_heads
        kv_heads = getattr(self.llm.config, "num_key_value_heads", None) or heads
        if kv_heads != heads:  # grouped-query attention: k/v read r averaged over each query group
            head_dim = getattr(self.llm.config, "head_dim", None) or d_llm // heads
            for layer in self.llm.model.layers:
                for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.share_scale_over_query_groups(heads // kv_heads, head_dim)
        if cfg.lora_scale_layout == "meta":
            for layer in self.llm.model.layers:
                for proj, h in ((layer.self_attn.q_proj, heads), (layer.self_attn.k_proj, kv_heads)):
                    proj.scale_rows = rotary_meta_to_hf_rows(h, proj.out_features)
        init_scale = None
        if cfg.prompt_adapter_init == "stage1_scale":
            init_scale = cfg.lora_alpha / cfg.lora_rank
            if cfg.prompt_adapter_clamp and cfg.prompt_adapter_clamp > 0:
                init_scale = min(init_scale, cfg.prompt_adapter_clamp)
        self.prompt_scale = (PromptAwareLoRAScale(d_llm, cfg.prompt_adapter_dim, cfg.prompt_adapter_clamp, init_scale)
                             if cfg.prompt_adapter else None)
        self.trainable_counts = apply_trainability(self)
        self.train()

    # ------------------------------------------------------------------ construction
    @classmethod
    def build_model(cls, cfg, task):
        arch = getattr(cfg, "_name", None) or "wavllm"
        if not isinstance(cfg, WavLLMConfig):  # a config read back from a checkpoint may predate some fields
            complete_model_cfg(cfg)
        fill_from_arch(cfg, arch if arch in ARCHITECTURES else "wavllm")
        vocab = (len(task.target_dictionary) if task is not None and task.target_dictionary is not None
                 else cfg.llama_vocab_size)
        return cls(cfg, vocab, arch)

    @classmethod
    def from_arch(cls, arch: str, vocab_size: Optional[int] = None, **overrides) -> "WavLLMModel":
        """A model of a named architecture with random weights (tests, benchmarks, counting on meta)."""
        cfg = WavLLMConfig(**overrides)
        fill_from_arch(cfg, arch)
        vocab = vocab_size if vocab_size is not None else cfg.llama_vocab_size
        if vocab is None or vocab <= 0:
            raise ValueError(f"{arch} takes its vocabulary from the tokenizer: pass vocab_size")
        return cls(cfg, vocab, arch)

    def set_activation_checkpointing(self, on: bool) -> None:
        """Recompute the LLM layers' activations in backward (or stop doing so)."""
        if on:
            # the recomputation in backward must see the LoRA scale of the forward (set by a context that
            # has exited by then): checkpoint_context_fn reinstalls it
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
                "use_reentrant": False, "context_fn": checkpoint_context_fn(self.llm)})
        elif self.llm.is_gradient_checkpointing:
            self.llm.gradient_checkpointing_disable()

    def train(self, mode: bool = True):
        super().train(mode)
        # frozen encoders never run dropout / layer drop; the LLM has no dropout of its own, but stays
        # in train mode so LoRA dropout and activation checkpointing work
        self.whisper.eval()
        if self.wavlm is not None:
            self.wavlm.eval()
        return self

    @property
    def llm_dim(self) -> int:
        return self.llm.config.hidden_size

    @property
    def context_length(self) -> int:
        return self.llm.config.max_position_embeddings

    def max_positions(self):
        # fairseq compares this with dataset sizes (audio samples here) to filter rows; the dataset
        # itself checks prompt + speech + answer against context_length with a clear error instead
        return None

    # ------------------------------------------------------------------ speech branch
    def speech_frames(self, audio_lengths: torch.Tensor) -> torch.Tensor:
        """Number of speech embeddings (80 ms frames) the model produces for each audio length."""
        n = self.semantic_adapter.output_lengths(self.whisper.output_lengths(audio_lengths))
        if self.wavlm is not None:
            n = torch.minimum(n, self.acoustic_adapter.output_lengths(self.wavlm.output_lengths(audio_lengths)))
        return torch.where(audio_lengths > 0, n, torch.zeros_like(n)).clamp(min=0)

    def encode_speech(self, audio: torch.Tensor, audio_lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, T) waveform -> speech embeddings (B, N, D) and their lengths (B,)."""
        if audio.shape[1] < MIN_ENCODER_SAMPLES:  # WavLM's first conv needs 400 samples; lengths stay true
            audio = nn.functional.pad(audio, (0, MIN_ENCODER_SAMPLES - audio.shape[1]))
        with torch.no_grad():
            sem, sem_len = self.whisper(audio, audio_lengths)  # (B, Tw, Dw) at 20 ms
            if self.wavlm is not None:
                ac, ac_len = self.wavlm(audio, audio_lengths)  # (L+1, B, Tl, Dl) at 20 ms
        dtype = self.semantic_adapter.out_proj.weight.dtype
        sem, sem_len = self._semantic_per_window(sem.to(dtype), sem_len)  # (B, N1, A)
        if self.wavlm is None:
            sem_len = sem_len.clamp(min=0)
            return self.semantic_only_projector(sem)[:, : int(sem_len.max())], sem_len
        ac, ac_len = self.acoustic_adapter(ac.to(dtype), ac_len)  # (B, N2, A)
        x, lengths = fuse_streams(sem, sem_len, ac, ac_len)  # (B, N, 2A), N = the shorter stream
        return self.projector(x)[:, : int(lengths.max())], lengths  # (B, N, D)

    def _semantic_per_window(self, sem: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The semantic adapter over each Whisper window (30 s, ``W`` frames) alone, as the reference
        encodes a long clip window by window: the adapter's convolutions see zeros at a window's edge,
        not the next window's frames. (B, T, Dw) -> (B, N, A); a clip within one window is one window.
        Lengths are those of the whole clip (``W`` is a multiple of the adapter's stride 4)."""
        W = self.whisper.encoder.config.max_source_positions  # Whisper frames per window
        if sem.shape[1] <= W:
            return self.semantic_adapter(sem, lengths)
        B, T, D = sem.shape
        n = -(-T // W)
        sem = nn.functional.pad(sem, (0, 0, 0, n * W - T)).reshape(B * n, W, D)
        starts = torch.arange(n, device=lengths.device) * W
        win_len = (lengths[:, None] - starts[None, :]).clamp(0, W).reshape(-1)  # (B*n,)
        out, _ = self.semantic_adapter(sem, win_len)  # (B*n, W', A)
        out = out.reshape(B, n * out.shape[1], out.shape[2])
        total = self.semantic_adapter.output_lengths(lengths)
        return out[:, : max(1, int(total.max()))], total

    # ------------------------------------------------------------------ prompt-aware LoRA scale
    def prompt_lora_scale(self, instruction_tokens: torch.Tensor, instruction_lengths: torch.Tensor,
                          batch: Optional[dict] = None) -> Optional[torch.Tensor]:
        """Stage 2: r (B, D) from the instruction's frozen-LLM (no LoRA) last-layer states; else None.

        ``instruction_tokens`` is the reference's adapter input ('"' + instruction + '"', no <s>), pooled
        over every position; with ``prompt_adapter_input=bos_instruction`` (older checkpoints) the
        batch's ``legacy_instruction_tokens`` (<s> + instruction) are read instead."""
        if self.prompt_scale is None:
            return None
        if self.cfg.prompt_adapter_input == "bos_instruction":
            if batch is None or "legacy_instruction_tokens" not in batch:
                raise WavLLMInputError("this checkpoint's prompt adapter reads <s> + instruction "
                                       "(prompt_adapter_input=bos_instruction): the batch needs "
                                       "legacy_instruction_tokens")
            instruction_tokens, instruction_lengths = (batch["legacy_instruction_tokens"],
                                                       batch["legacy_instruction_lengths"])
        mask = (torch.arange(instruction_tokens.shape[1], device=instruction_tokens.device)[None]
                < instruction_lengths[:, None])
        captured = {}
        hook = self.llm.model.layers[-1].register_forward_hook(
            lambda m, i, o: captured.__setitem__("h", o[0] if isinstance(o, tuple) else o))
        try:
            with torch.no_grad(), lora_disabled(self.llm):
                self.llm.model(input_ids=instruction_tokens, attention_mask=mask.long(), use_cache=False)
        finally:
            hook.remove()
        pool = mask
        if self.cfg.prompt_adapter_input == "bos_instruction" and not self.cfg.prompt_adapter_pool_bos:
            # the <s> state is identical for every prompt (and an attention sink): pool over the
            # instruction's own tokens, keeping <s> only for an empty instruction (spoken question)
            bos = self.llm.config.bos_token_id
            skip = (instruction_tokens[:, 0] == bos) & (instruction_lengths > 1)
            pool = mask.clone()
            pool[:, 0] &= ~skip
        return self.prompt_scale(captured["h"], pool)  # (B, D)

    def lora_scale_context(self, r: Optional[torch.Tensor]):
        return lora_scale_context(self.llm, r)

    # ------------------------------------------------------------------ sequence assembly
    def assemble(self, net_input: dict, left_pad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Build the LLM input [pre][speech][post] per utterance.

        Returns inputs_embeds (B, L, D), attention_mask (B, L) long, and ``post_start`` (B,) = the
        sequence index of each utterance's first post token (after padding is applied).
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

    def forward(self, audio, audio_lengths, pre_tokens, pre_lengths, post_tokens, post_lengths,
                post_target_mask, instruction_tokens=None, instruction_lengths=None, **unused):
        """Teacher-forced pass. Returns (logits (N, V), target (N,), row (N,)) for the N target tokens."""
        net_input = dict(audio=audio, audio_lengths=audio_lengths, pre_tokens=pre_tokens, pre_lengths=pre_lengths,
                         post_tokens=post_tokens, post_lengths=post_lengths)
        x, mask, post_start = self.assemble(net_input, left_pad=False)  # right padding: positions 0..L-1
        r = (self.prompt_lora_scale(instruction_tokens, instruction_lengths, unused) if self.prompt_scale is not None
             else None)
        with self.lora_scale_context(r):
            h = self.llm.model(inputs_embeds=x, attention_mask=mask, use_cache=False).last_hidden_state  # (B, L, D)
        rows, cols = post_target_mask.nonzero(as_tuple=True)  # target tokens, row-major = target order
        seq_pos = post_start[rows] + cols  # where each target token sits in the sequence
        logits = self.llm.lm_head(h[rows, seq_pos - 1])  # predicted from the previous position: (N, V)
        return logits, post_tokens[rows, cols], rows

    # ------------------------------------------------------------------ generation
    def build_generation_prefix(self, net_input: dict):
        """Left-padded speech+prompt prefix for the generator (generator.py's protocol)."""
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
            r = self.prompt_lora_scale(net_input["instruction_tokens"], net_input["instruction_lengths"], net_input)
        return GenerationPrefix(embeds=x, attention_mask=mask, lora_scale=r)

    def merge_lora(self) -> int:
        if self.prompt_scale is not None:
            raise RuntimeError("stage-2 LoRA is scaled per utterance and cannot be merged")
        return merge_lora(self.llm)

    def unmerge_lora(self) -> int:
        return unmerge_lora(self.llm)

    # ------------------------------------------------------------------ checkpoints
    def _backbone_prefixes_from_paths(self) -> List[str]:
        return [p for p, flag in (("whisper.", self.backbone_from_path["whisper"]),
                                  ("wavlm.", self.backbone_from_path["wavlm"]),
                                  ("llm.", self.backbone_from_path["llm"])) if flag]

    def _is_reloadable_backbone_key(self, key: str) -> bool:
        """A frozen backbone tensor that is reloaded from its local directory (not stored in checkpoints)."""
        if not any(key.startswith(p) for p in self._backbone_prefixes_from_paths()):
            return False
        return not (key.startswith("llm.") and (".lora_A." in key or ".lora_B." in key))

    def state_dict(self, *args, **kwargs):
        """Everything except frozen backbones loaded from local directories (those reload from there)."""
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        for k in list(state.keys()):
            if self._is_reloadable_backbone_key(k[len(prefix):]):
                del state[k]
        return state

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        """Strict load that tolerates exactly two known gaps, and reports them:
        backbone tensors reloaded from their directories, and a fresh stage-2 prompt adapter when the
        checkpoint comes from stage 1. Any other missing/unexpected key or shape mismatch is an error."""
        own = super().state_dict()
        missing = [k for k in own if k not in state_dict and not self._is_reloadable_backbone_key(k)]
        unexpected = [k for k in state_dict if k not in own]
        fresh_prompt = [k for k in missing if k.startswith("prompt_scale.")]
        missing = [k for k in missing if not k.startswith("prompt_scale.")]
        bad_shape = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                     for k, v in state_dict.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
        if strict and (missing or unexpected or bad_shape):
            raise CheckpointError(
                "checkpoint does not match the model: "
                + (f"missing {missing[:20]} ({len(missing)}) " if missing else "")
                + (f"unexpected {unexpected[:20]} ({len(unexpected)}) " if unexpected else "")
                + (f"shape mismatches {bad_shape[:20]}" if bad_shape else ""), reason="mismatch")
        if fresh_prompt:
            logger.warning(f"prompt adapter not in the checkpoint: initialised fresh ({len(fresh_prompt)} tensors: "
                           f"{fresh_prompt}); everything else was loaded")
        result = super(BaseFairseqModel, self).load_state_dict(
            {k: v for k, v in state_dict.items() if k in own}, strict=False)
        return result


def count_parameters(arch: str, stage: int = 1, vocab_size: Optional[int] = None) -> "WavLLMModel":
    """Build ``arch`` on the meta device (no memory, no weights) for the given stage."""
    with torch.device("meta"):
        model = WavLLMModel.from_arch(arch, vocab_size=vocab_size, prompt_adapter=(stage == 2))
    return model


register_architectures("wavllm")
