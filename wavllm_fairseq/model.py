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
import contextlib
import logging
from dataclasses import MISSING, dataclass, field, fields
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from fairseq.dataclass import FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model, register_model_architecture

from . import encoders
from .adapters import ModalityAdapter
from .errors import CheckpointError, WavLLMInputError
from .lora import (checkpoint_context_fn, inject_lora, lora_disabled, lora_parameters, lora_scale_context, merge_lora,
                   rotary_meta_to_hf_rows, unmerge_lora)
from .prompt_adapter import PromptAwareLoRAScale

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Named architectures: every size lives here (or in yaml), never inside the modules.
# --------------------------------------------------------------------------------------------
ARCHITECTURES: Dict[str, Dict[str, object]] = {
    # The paper's model: Whisper-large-v2 encoder, WavLM-base, LLaMA-2-7B(-chat), LoRA R=32.
    "wavllm_7b": dict(
        whisper_d_model=1280, whisper_layers=32, whisper_heads=20, whisper_ffn_dim=5120,
        whisper_num_mel_bins=80, whisper_max_source_positions=1500,
        wavlm_hidden=768, wavlm_layers=12, wavlm_heads=12, wavlm_ffn_dim=3072, wavlm_conv_dim=512,
        wavlm_conv_pos_kernel=128, wavlm_conv_pos_groups=16, wavlm_num_buckets=320, wavlm_max_bucket_distance=800,
        llama_dim=4096, llama_layers=32, llama_heads=32, llama_kv_heads=32, llama_ffn_dim=11008,
        llama_vocab_size=32000, llama_max_positions=4096, llama_rms_norm_eps=1e-5,
        semantic_conv_mid_dim=1280, semantic_conv_out_dim=1024,
        acoustic_conv_mid_dim=512, acoustic_conv_out_dim=1024,
        bottleneck_dim=512, adapter_out_dim=2048,
        lora_rank=32, lora_alpha=32.0, prompt_adapter_dim=1024,
        keep_reference_unused_projector=True,
    ),
    # A few tens of millions of parameters: big enough for meaningful CPU benchmarks.
    "wavllm_small": dict(
        whisper_d_model=384, whisper_layers=4, whisper_heads=6, whisper_ffn_dim=1536,
        whisper_num_mel_bins=80, whisper_max_source_positions=1500,
        wavlm_hidden=384, wavlm_layers=4, wavlm_heads=6, wavlm_ffn_dim=1536, wavlm_conv_dim=256,
        wavlm_conv_pos_kernel=64, wavlm_conv_pos_groups=16, wavlm_num_buckets=320, wavlm_max_bucket_distance=800,
        llama_dim=512, llama_layers=8, llama_heads=8, llama_kv_heads=8, llama_ffn_dim=1376,
        llama_vocab_size=32000, llama_max_positions=2048, llama_rms_norm_eps=1e-5,
        semantic_conv_mid_dim=384, semantic_conv_out_dim=256,
        acoustic_conv_mid_dim=256, acoustic_conv_out_dim=256,
        bottleneck_dim=128, adapter_out_dim=256,
        lora_rank=16, lora_alpha=16.0, prompt_adapter_dim=256,
        keep_reference_unused_projector=False,
    ),
    # Seconds per training step on a CPU: unit and CLI tests.
    "wavllm_tiny": dict(
        whisper_d_model=32, whisper_layers=2, whisper_heads=2, whisper_ffn_dim=64,
        whisper_num_mel_bins=80, whisper_max_source_positions=100,
        wavlm_hidden=32, wavlm_layers=2, wavlm_heads=2, wavlm_ffn_dim=64, wavlm_conv_dim=32,
        wavlm_conv_pos_kernel=16, wavlm_conv_pos_groups=4, wavlm_num_buckets=32, wavlm_max_bucket_distance=64,
        llama_dim=64, llama_layers=2, llama_heads=4, llama_kv_heads=4, llama_ffn_dim=128,
        llama_vocab_size=-1, llama_max_positions=1024, llama_rms_norm_eps=1e-5,
        semantic_conv_mid_dim=32, semantic_conv_out_dim=32,
        acoustic_conv_mid_dim=32, acoustic_conv_out_dim=32,
        bottleneck_dim=16, adapter_out_dim=32,
        lora_rank=4, lora_alpha=8.0, prompt_adapter_dim=32,
        keep_reference_unused_projector=False,
    ),
}
# Real small backbones that pip ships (wavllm-prepare-small-backbones): Whisper tiny.en's encoder,
# SmolLM2-135M-Instruct (LLaMA architecture, tied embeddings, 3 KV heads), a WavLM stand-in (the toy's
# default stage 0; no WavLM ships on pip). Sizes are those backbones' (used when a path is empty).
ARCHITECTURES["wavllm_small_real"] = dict(
    whisper_d_model=384, whisper_layers=4, whisper_heads=6, whisper_ffn_dim=1536,
    whisper_num_mel_bins=80, whisper_max_source_positions=1500,
    wavlm_hidden=144, wavlm_layers=3, wavlm_heads=4, wavlm_ffn_dim=576, wavlm_conv_dim=48,
    wavlm_conv_pos_kernel=32, wavlm_conv_pos_groups=8, wavlm_num_buckets=320, wavlm_max_bucket_distance=800,
    llama_dim=576, llama_layers=30, llama_heads=9, llama_kv_heads=3, llama_ffn_dim=1536,
    llama_vocab_size=49152, llama_max_positions=8192, llama_rms_norm_eps=1e-5,
    semantic_conv_mid_dim=384, semantic_conv_out_dim=256,
    acoustic_conv_mid_dim=256, acoustic_conv_out_dim=256,
    bottleneck_dim=128, adapter_out_dim=256,
    lora_rank=8, lora_alpha=16.0, prompt_adapter_dim=128,
    keep_reference_unused_projector=False,
)
ARCHITECTURES["wavllm"] = ARCHITECTURES["wavllm_7b"]

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MIN_ENCODER_SAMPLES = 400  # shortest waveform the encoders' first convolutions accept (25 ms)


@dataclass
class WavLLMConfig(FairseqDataclass):
    # ---- local backbone directories (Hugging Face format); empty = random init from the arch sizes
    whisper_path: str = field(default="", metadata={"help": "local dir of a Whisper model (e.g. whisper-large-v2); its encoder is used"})
    wavlm_path: str = field(default="", metadata={"help": "local dir of a WavLM model (e.g. wavlm-base)"})
    llama_path: str = field(default="", metadata={"help": "local dir of a LLaMA causal LM (e.g. Llama-2-7b-chat-hf), also holding tokenizer.model"})
    backbone_dtype: str = field(default="float32", metadata={"help": "dtype the frozen backbones are loaded in: float32, bfloat16 or float16"})
    use_wavlm: bool = field(default=True, metadata={"help": "use the WavLM acoustic branch (False: Whisper only, through the 2048->D projection)"})
    keep_reference_unused_projector: Optional[bool] = field(default=None, metadata={"help": "hold the reference's Linear(adapter_out -> D) that is unused when WavLM is on (checkpoint compatibility; counts in the paper's 76.6M)"})
    # ---- sizes (None = taken from the named architecture; a loaded backbone's config wins for its own sizes)
    whisper_d_model: Optional[int] = field(default=None, metadata={"help": "Whisper encoder width"})
    whisper_layers: Optional[int] = field(default=None, metadata={"help": "Whisper encoder layers"})
    whisper_heads: Optional[int] = field(default=None, metadata={"help": "Whisper encoder attention heads"})
    whisper_ffn_dim: Optional[int] = field(default=None, metadata={"help": "Whisper encoder FFN width"})
    whisper_num_mel_bins: Optional[int] = field(default=None, metadata={"help": "log-mel bins"})
    whisper_max_source_positions: Optional[int] = field(default=None, metadata={"help": "Whisper window in 20 ms frames (1500 = 30 s)"})
    wavlm_hidden: Optional[int] = field(default=None, metadata={"help": "WavLM width"})
    wavlm_layers: Optional[int] = field(default=None, metadata={"help": "WavLM transformer layers"})
    wavlm_heads: Optional[int] = field(default=None, metadata={"help": "WavLM attention heads"})
    wavlm_ffn_dim: Optional[int] = field(default=None, metadata={"help": "WavLM FFN width"})
    wavlm_conv_dim: Optional[int] = field(default=None, metadata={"help": "channels of WavLM's 7 conv feature-extractor layers"})
    wavlm_conv_pos_kernel: Optional[int] = field(default=None, metadata={"help": "WavLM positional conv kernel"})
    wavlm_conv_pos_groups: Optional[int] = field(default=None, metadata={"help": "WavLM positional conv groups"})
    wavlm_num_buckets: Optional[int] = field(default=None, metadata={"help": "WavLM relative position buckets"})
    wavlm_max_bucket_distance: Optional[int] = field(default=None, metadata={"help": "WavLM max bucket distance"})
    llama_dim: Optional[int] = field(default=None, metadata={"help": "LLM width"})
    llama_layers: Optional[int] = field(default=None, metadata={"help": "LLM layers"})
    llama_heads: Optional[int] = field(default=None, metadata={"help": "LLM attention heads"})
    llama_kv_heads: Optional[int] = field(default=None, metadata={"help": "LLM key/value heads"})
    llama_ffn_dim: Optional[int] = field(default=None, metadata={"help": "LLM FFN width"})
    llama_vocab_size: Optional[int] = field(default=None, metadata={"help": "LLM vocabulary (-1: the task's dictionary size)"})
    llama_max_positions: Optional[int] = field(default=None, metadata={"help": "LLM context length"})
    llama_rms_norm_eps: Optional[float] = field(default=None, metadata={"help": "LLM RMSNorm epsilon (random init; a loaded LLM keeps its config's)"})
    llama_rms_norm_eps_override: float = field(default=0.0, metadata={"help": "> 0: the LLM's RMSNorm epsilon, also for a loaded LLM (the reference's LLaMA code runs with 1e-6 where Llama-2's config.json says 1e-5; wavllm-convert-reference-checkpoint sets 1e-6)"})
    semantic_conv_mid_dim: Optional[int] = field(default=None, metadata={"help": "semantic adapter conv 1 channels (before GLU)"})
    semantic_conv_out_dim: Optional[int] = field(default=None, metadata={"help": "semantic adapter conv output (after GLU)"})
    acoustic_conv_mid_dim: Optional[int] = field(default=None, metadata={"help": "acoustic adapter conv 1 channels (before GLU)"})
    acoustic_conv_out_dim: Optional[int] = field(default=None, metadata={"help": "acoustic adapter conv output (after GLU)"})
    bottleneck_dim: Optional[int] = field(default=None, metadata={"help": "bottleneck width of both adapters"})
    bottleneck_norm: str = field(default="post", metadata={"help": "LayerNorm placement in the bottleneck adapters: post (x + LN(up(gelu(down(x)))), the reference's) or pre (x + up(gelu(down(LN(x)))))"})
    adapter_out_dim: Optional[int] = field(default=None, metadata={"help": "each adapter's output width (2048 in the paper)"})
    # ---- LoRA and the prompt-aware adapter
    lora_rank: Optional[int] = field(default=None, metadata={"help": "LoRA rank R"})
    lora_alpha: Optional[float] = field(default=None, metadata={"help": "LoRA alpha (stage-1 scale alpha/R)"})
    lora_dropout: float = field(default=0.1, metadata={"help": "dropout on the LoRA input (the reference's 0.1)"})
    lora_a_init: str = field(default="reference", metadata={"help": "LoRA A init: reference (uniform +-1/sqrt(R), kaiming-uniform with fan-in R as the reference stores A) or fan_in_features (kaiming-uniform with fan-in = input width, PEFT's; about sqrt(in/R) smaller)"})
    prompt_adapter: bool = field(default=False, metadata={"help": "stage 2: build and train the prompt-aware LoRA weight adapter"})
    prompt_adapter_dim: Optional[int] = field(default=None, metadata={"help": "prompt adapter bottleneck K"})
    lora_scale_layout: str = field(default="hf", metadata={"help": "feature order of the stage-2 scale r for q/k LoRA: hf (this plugin) or meta (checkpoints converted from the reference, whose r follows Meta's rotary layout)"})
    prompt_adapter_init: str = field(default="stage1_scale", metadata={"help": "stage1_scale: P_u starts at weight 0, bias alpha/R, so r = alpha/R for every prompt and stage 2 starts where stage 1 ended; random: PyTorch's default Linear init"})
    prompt_adapter_input: str = field(default="reference", metadata={"help": "what the prompt adapter reads: reference ('\"' + instruction + '\"' without <s>, every position pooled: the reference's, and the default for training too) or bos_instruction (<s> + instruction: what checkpoints of older versions of this plugin read; <s> pooled per prompt_adapter_pool_bos)"})
    prompt_adapter_pool_bos: bool = field(default=False, metadata={"help": "prompt_adapter_input=bos_instruction only: include the <s> position in the pooling (its state is the same for every prompt; default: pooled only when the instruction is empty)"})
    decode_bos_after_speech: bool = field(default=False, metadata={"help": "decoding only: feed <s> in place of the first token after the speech span (the lone space piece that ' </SPEECH>' starts with), as the reference's generator does (its token buffer starts with <s> and the forced prompt continues from the second token); on in checkpoints made by wavllm-convert-reference-checkpoint so a converted release decodes as the reference decodes it"})
    prompt_adapter_clamp: float = field(default=3.0, metadata={"help": "r = clamp(relu(r), max=this) as the reference does; <= 0 disables"})
    # ---- training
    activation_checkpointing: bool = field(default=False, metadata={"help": "recompute the frozen LLM layers' activations in backward (saves memory)"})
    freeze_lora: bool = field(default=False, metadata={"help": "keep LoRA frozen (e.g. train only the prompt adapter in stage 2)"})


def fill_from_arch(cfg, arch: str) -> None:
    """Fill every size field that is still None from the named architecture (user values win)."""
    preset = ARCHITECTURES[arch]
    for key, value in preset.items():
        if getattr(cfg, key, None) is None:
            setattr(cfg, key, value)


# Fields added after checkpoints were already written, with the behaviour those checkpoints were trained
# with (their code had no choice): a checkpoint whose saved config lacks one of them gets this value,
# and the log says so. Fields not listed take the dataclass default.
LEGACY_WHEN_MISSING = {
    "bottleneck_norm": "pre",  # adapters were pre-norm before the reference's post-norm became the default
    "prompt_adapter_pool_bos": True,  # the prompt adapter pooled <s> too
    "prompt_adapter_input": "bos_instruction",  # it read <s> + instruction, not the reference's quoted prompt
}


def complete_model_cfg(cfg):
    """Add the WavLLMConfig fields a saved config (dict or DictConfig) lacks; returns ``cfg``."""
    from omegaconf import DictConfig, open_dict

    names = [f for f in fields(WavLLMConfig) if f.name not in cfg]
    if not names:
        return cfg
    legacy = {}
    ctx = open_dict(cfg) if isinstance(cfg, DictConfig) else contextlib.nullcontext()
    with ctx:
        for f in names:
            if f.name in LEGACY_WHEN_MISSING:
                value = legacy[f.name] = LEGACY_WHEN_MISSING[f.name]
            else:
                value = f.default if f.default is not MISSING else f.default_factory()
            cfg[f.name] = value
    if legacy:
        logger.warning("checkpoint config written by an older version: " +
                       ", ".join(f"{k}={v}" for k, v in legacy.items()) + " (what that version did)")
    return cfg


def _dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise WavLLMInputError(f"model.backbone_dtype must be float32, bfloat16 or float16, got {name!r}")


def trainable_groups(model: "WavLLMModel") -> Dict[str, List[Tuple[str, nn.Parameter]]]:
    """THE place that decides what trains. Stage 1: adapters (+ WavLM layer weights), projector(s),
    LoRA. Stage 2 (``prompt_adapter=True``): the same plus the prompt adapter. Backbones: frozen.

    The reference's Whisper-only projector (Linear adapter_out -> D) is trainable in the reference and
    counted in the paper's 76.6 M, but with WavLM on it is never used, so it never gets a gradient.
    It goes to the group ``unused:semantic_only_projector`` and is held with ``requires_grad=False``:
    no optimizer state, no weight decay on a zero gradient, no DDP bucket waiting for it; it is saved
    in checkpoints unchanged (converted reference checkpoints round-trip). Counts report it separately
    (``wavllm-count-params``: trainable = optimised + unused, the paper's figure)."""
    named = dict(model.named_parameters())
    groups: Dict[str, List[Tuple[str, nn.Parameter]]] = {
        "semantic_adapter": [], "acoustic_adapter": [], "projector": [], "lora": [], "prompt_adapter": [],
        "unused:semantic_only_projector": [], "frozen:whisper": [], "frozen:wavlm": [], "frozen:llama": [],
    }
    lora_names = set(lora_parameters(model.llm))
    for name, p in named.items():
        if name.startswith("semantic_adapter."):
            groups["semantic_adapter"].append((name, p))
        elif name.startswith("acoustic_adapter."):
            groups["acoustic_adapter"].append((name, p))
        elif name.startswith("projector."):
            groups["projector"].append((name, p))
        elif name.startswith("semantic_only_projector."):
            groups["projector" if model.wavlm is None else "unused:semantic_only_projector"].append((name, p))
        elif name.startswith("prompt_scale."):
            groups["prompt_adapter"].append((name, p))
        elif name.startswith("llm.") and name[len("llm."):] in lora_names:
            groups["frozen:lora" if model.cfg.freeze_lora else "lora"].append((name, p))
        elif name.startswith("whisper."):
            groups["frozen:whisper"].append((name, p))
        elif name.startswith("wavlm."):
            groups["frozen:wavlm"].append((name, p))
        elif name.startswith("llm."):
            groups["frozen:llama"].append((name, p))
        else:
            raise RuntimeError(f"parameter {name} belongs to no trainability group")
    return {k: v for k, v in groups.items() if v}


def set_rms_norm_eps(llm: nn.Module, eps: float) -> int:
    """Set the epsilon of every RMSNorm of ``llm`` (and its config); returns how many were set."""
    norms = [m for m in llm.modules() if hasattr(m, "variance_epsilon")]
    for m in norms:
        m.variance_epsilon = eps
    llm.config.rms_norm_eps = eps
    return len(norms)


def is_optimised(group: str) -> bool:
    """Whether a trainable_groups group gets gradients (``frozen:`` backbones and ``unused:`` do not)."""
    return not group.startswith(("frozen:", "unused:"))


def apply_trainability(model: "WavLLMModel") -> Dict[str, Tuple[int, int]]:
    """Set requires_grad from trainable_groups; return {group: (n_tensors, n_params)} and log it."""
    counts = {}
    for group, params in trainable_groups(model).items():
        for _, p in params:
            p.requires_grad_(is_optimised(group))
        counts[group] = (len(params), sum(p.numel() for _, p in params))
    total = sum(n for _, n in counts.values())
    trainable = sum(n for g, (_, n) in counts.items() if not g.startswith("frozen:"))
    optimised = sum(n for g, (_, n) in counts.items() if is_optimised(g))
    logger.info("trainable parameters by group: " + ", ".join(f"{g}={n:,}" for g, (_, n) in counts.items()))
    logger.info(f"trainable {trainable:,} of {total:,} parameters (the paper's count); optimised {optimised:,}"
                + (" (the reference's unused projector is held frozen: it never gets a gradient)"
                   if optimised != trainable else ""))
    return counts


@register_model("wavllm", dataclass=WavLLMConfig)
class WavLLMModel(BaseFairseqModel):
    """WavLLM: dual speech encoders + adapters + projector feeding a LoRA-tuned frozen LLaMA."""

    def __init__(self, cfg: WavLLMConfig, vocab_size: int, arch: str = "wavllm"):
        super().__init__()
        self.cfg = cfg
        self.arch = arch
        bdtype = _dtype(cfg.backbone_dtype)
        self.backbone_from_path = {"whisper": bool(cfg.whisper_path), "wavlm": bool(cfg.wavlm_path and cfg.use_wavlm),
                                   "llm": bool(cfg.llama_path)}
        # ---- frozen backbones
        if cfg.whisper_path:
            whisper = encoders.load_whisper_encoder(cfg.whisper_path, bdtype)
        else:
            whisper = encoders.whisper_encoder_from_config(dict(
                d_model=cfg.whisper_d_model, encoder_layers=cfg.whisper_layers, encoder_attention_heads=cfg.whisper_heads,
                encoder_ffn_dim=cfg.whisper_ffn_dim, num_mel_bins=cfg.whisper_num_mel_bins,
                max_source_positions=cfg.whisper_max_source_positions, decoder_layers=1, decoder_attention_heads=cfg.whisper_heads,
                vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1))
        self.whisper = encoders.WhisperSemanticEncoder(whisper)
        if cfg.use_wavlm:
            if cfg.wavlm_path:
                wavlm = encoders.load_wavlm(cfg.wavlm_path, bdtype)
            else:
                wavlm = encoders.wavlm_from_config(dict(
                    hidden_size=cfg.wavlm_hidden, num_hidden_layers=cfg.wavlm_layers, num_attention_heads=cfg.wavlm_heads,
                    intermediate_size=cfg.wavlm_ffn_dim, conv_dim=(cfg.wavlm_conv_dim,) * 7,
                    num_conv_pos_embeddings=cfg.wavlm_conv_pos_kernel, num_conv_pos_embedding_groups=cfg.wavlm_conv_pos_groups,
                    num_buckets=cfg.wavlm_num_buckets, max_bucket_distance=cfg.wavlm_max_bucket_distance))
            self.wavlm = encoders.WavLMAcousticEncoder(wavlm)
        else:
            self.wavlm = None
        if cfg.llama_path:
            self.llm = encoders.load_llama(cfg.llama_path, bdtype)
        else:
            self.llm = encoders.llama_from_config(dict(
                hidden_size=cfg.llama_dim, num_hidden_layers=cfg.llama_layers, num_attention_heads=cfg.llama_heads,
                num_key_value_heads=cfg.llama_kv_heads, intermediate_size=cfg.llama_ffn_dim, vocab_size=vocab_size,
                max_position_embeddings=cfg.llama_max_positions, rms_norm_eps=cfg.llama_rms_norm_eps,
                bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False))
        if cfg.llama_rms_norm_eps_override > 0:
            set_rms_norm_eps(self.llm, cfg.llama_rms_norm_eps_override)
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
            self.acoustic_adapter = ModalityAdapter(self.wavlm.dim, cfg.acoustic_conv_mid_dim, cfg.acoustic_conv_out_dim,
                                                    cfg.bottleneck_dim, cfg.adapter_out_dim,
                                                    num_layer_weights=self.wavlm.num_hidden_states,
                                                    bottleneck_norm=cfg.bottleneck_norm)
            self.projector = nn.Linear(2 * cfg.adapter_out_dim, d_llm)
        else:
            self.acoustic_adapter = None
            self.projector = None
        if self.wavlm is None or cfg.keep_reference_unused_projector:
            # Whisper-only projection; the reference holds it (unused) even when WavLM is on
            self.semantic_only_projector = nn.Linear(cfg.adapter_out_dim, d_llm)
        else:
            self.semantic_only_projector = None
        self.lora_modules = inject_lora(self.llm, LORA_TARGETS, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                                        cfg.lora_a_init)
        self.set_activation_checkpointing(cfg.activation_checkpointing)
        if cfg.lora_scale_layout not in ("hf", "meta"):
            raise ValueError(f"lora_scale_layout must be hf or meta, got {cfg.lora_scale_layout!r}")
        if cfg.lora_scale_layout == "meta":
            heads = self.llm.config.num_attention_heads
            kv_heads = getattr(self.llm.config, "num_key_value_heads", None) or heads
            for layer in self.llm.model.layers:
                for proj, h in ((layer.self_attn.q_proj, heads), (layer.self_attn.k_proj, kv_heads)):
                    proj.scale_rows = rotary_meta_to_hf_rows(h, proj.out_features)
        init_scale = None
        if cfg.prompt_adapter_init == "stage1_scale":
            init_scale = cfg.lora_alpha / cfg.lora_rank
            if cfg.prompt_adapter_clamp and cfg.prompt_adapter_clamp > 0:
                init_scale = min(init_scale, cfg.prompt_adapter_clamp)
        elif cfg.prompt_adapter_init != "random":
            raise ValueError(f"prompt_adapter_init must be stage1_scale or random, got {cfg.prompt_adapter_init!r}")
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
        vocab = len(task.target_dictionary) if task is not None and task.target_dictionary is not None else cfg.llama_vocab_size
        if hasattr(task, "model_built"):
            task.model_built(cfg)
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
        n = min(sem.shape[1], ac.shape[1])  # the reference trims both streams to the shorter
        x = torch.cat([sem[:, :n], ac[:, :n]], dim=-1)  # (B, N, 2A)
        lengths = torch.minimum(torch.minimum(sem_len, ac_len), torch.full_like(sem_len, n)).clamp(min=0)
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
                                       "(prompt_adapter_input=bos_instruction): the batch needs legacy_instruction_tokens")
            instruction_tokens, instruction_lengths = batch["legacy_instruction_tokens"], batch["legacy_instruction_lengths"]
        elif self.cfg.prompt_adapter_input != "reference":
            raise ValueError(f"prompt_adapter_input must be reference or bos_instruction, got {self.cfg.prompt_adapter_input!r}")
        mask = torch.arange(instruction_tokens.shape[1], device=instruction_tokens.device)[None] < instruction_lengths[:, None]
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
            rows.append(torch.cat([pre_e[b, : pre_len[b]], speech[b, : speech_len[b]], post_e[b, : post_len[b]]], dim=0))
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
        r = self.prompt_lora_scale(instruction_tokens, instruction_lengths, unused) if self.prompt_scale is not None else None
        with self.lora_scale_context(r):
            h = self.llm.model(inputs_embeds=x, attention_mask=mask, use_cache=False).last_hidden_state  # (B, L, D)
        rows, cols = post_target_mask.nonzero(as_tuple=True)  # target tokens, row-major = target order
        seq_pos = post_start[rows] + cols  # where each target token sits in the sequence
        logits = self.llm.lm_head(h[rows, seq_pos - 1])  # predicted from the previous position: (N, V)
        return logits, post_tokens[rows, cols], rows

    # ------------------------------------------------------------------ generation
    def build_generation_prefix(self, net_input: dict):
        """Left-padded speech+prompt prefix for the generator (generator.py's protocol)."""
        from .generator import GenerationPrefix

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

    def set_num_updates(self, num_updates):
        super().set_num_updates(num_updates)


def count_parameters(arch: str, stage: int = 1, vocab_size: Optional[int] = None) -> "WavLLMModel":
    """Build ``arch`` on the meta device (no memory, no weights) for the given stage."""
    with torch.device("meta"):
        model = WavLLMModel.from_arch(arch, vocab_size=vocab_size, prompt_adapter=(stage == 2))
    return model


# Named architectures for fairseq (sizes filled in WavLLMModel.build_model, user values win).
def _register(arch_name):
    @register_model_architecture("wavllm", arch_name)
    def _arch(cfg):
        fill_from_arch(cfg, arch_name)

    return _arch


for _name in ("wavllm_7b", "wavllm_small", "wavllm_tiny", "wavllm_small_real"):
    _register(_name)
