"""``WavLLMConfig``: the model's options (``model.*`` in the yaml configs).

Free-string choices are fairseq ``ChoiceEnum`` fields, so Hydra rejects a typo when the config is
composed; ``check_choices`` does the same for a config built in Python (``WavLLMConfig(...)``) or read
back from a checkpoint. Sizes left ``None`` come from the named architecture (architectures.py).
"""
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass

from ..errors import WavLLMInputError
from .adapters import NORM_PLACEMENTS
from .lora import A_INITS

# the dtypes backbones, decoding and converters take, by name
DTYPES: Dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = tuple(DTYPES)

CHOICES: Dict[str, tuple] = {
    "backbone_dtype": DTYPE_NAMES,
    "bottleneck_norm": NORM_PLACEMENTS,
    "lora_a_init": A_INITS,
    "lora_scale_layout": ("hf", "meta"),
    "prompt_adapter_init": ("stage1_scale", "random"),
    "prompt_adapter_input": ("last_layer", "final_norm"),
    "speech_shrink": ("off", "ctc", "ctc_tokens"),
}
DTYPE_CHOICES = ChoiceEnum(CHOICES["backbone_dtype"])
BOTTLENECK_NORM_CHOICES = ChoiceEnum(CHOICES["bottleneck_norm"])
LORA_A_INIT_CHOICES = ChoiceEnum(CHOICES["lora_a_init"])
LORA_SCALE_LAYOUT_CHOICES = ChoiceEnum(CHOICES["lora_scale_layout"])
PROMPT_ADAPTER_INIT_CHOICES = ChoiceEnum(CHOICES["prompt_adapter_init"])
PROMPT_ADAPTER_INPUT_CHOICES = ChoiceEnum(CHOICES["prompt_adapter_input"])
SPEECH_SHRINK_CHOICES = ChoiceEnum(CHOICES["speech_shrink"])


@dataclass
class WavLLMConfig(FairseqDataclass):
    """The ``model.*`` options of ``@register_model("wavllm")``: backbone folders, sizes (None = the
    architecture's), adapters, LoRA, the prompt-aware adapter and training switches."""

    # ---- local backbone directories (Hugging Face format); empty = random init from the arch sizes
    whisper_path: str = field(
        default="",
        metadata={"help": "local dir of a Whisper model (e.g. whisper-large-v2); its encoder is used"})
    wavlm_path: str = field(default="", metadata={"help": "local dir of a WavLM model (e.g. wavlm-base)"})
    llama_path: str = field(
        default="",
        metadata={"help": "local dir of a LLaMA causal LM (e.g. Llama-2-7b-chat-hf), also holding tokenizer.model"})
    backbone_dtype: DTYPE_CHOICES = field(
        default="float32",
        metadata={"help": "dtype the frozen backbones are loaded in: float32, bfloat16 or float16"})
    use_wavlm: bool = field(
        default=True,
        metadata={"help": "use the WavLM acoustic branch (False: Whisper only, through the 2048->D projection)"})
    keep_reference_unused_projector: Optional[bool] = field(
        default=None,
        metadata={"help": "hold the reference's Linear(adapter_out -> D) that is unused when WavLM is on (checkpoint "
                          "compatibility; counts in the paper's 76.6M)"})
    # ---- sizes (None = taken from the named architecture; a loaded backbone's config wins for its own sizes)
    whisper_d_model: Optional[int] = field(default=None, metadata={"help": "Whisper encoder width"})
    whisper_layers: Optional[int] = field(default=None, metadata={"help": "Whisper encoder layers"})
    whisper_heads: Optional[int] = field(default=None, metadata={"help": "Whisper encoder attention heads"})
    whisper_ffn_dim: Optional[int] = field(default=None, metadata={"help": "Whisper encoder FFN width"})
    whisper_num_mel_bins: Optional[int] = field(default=None, metadata={"help": "log-mel bins"})
    whisper_max_source_positions: Optional[int] = field(
        default=None,
        metadata={"help": "Whisper window in 20 ms frames (1500 = 30 s)"})
    wavlm_hidden: Optional[int] = field(default=None, metadata={"help": "WavLM width"})
    wavlm_layers: Optional[int] = field(default=None, metadata={"help": "WavLM transformer layers"})
    wavlm_heads: Optional[int] = field(default=None, metadata={"help": "WavLM attention heads"})
    wavlm_ffn_dim: Optional[int] = field(default=None, metadata={"help": "WavLM FFN width"})
    wavlm_conv_dim: Optional[int] = field(
        default=None,
        metadata={"help": "channels of WavLM's 7 conv feature-extractor layers"})
    wavlm_conv_pos_kernel: Optional[int] = field(default=None, metadata={"help": "WavLM positional conv kernel"})
    wavlm_conv_pos_groups: Optional[int] = field(default=None, metadata={"help": "WavLM positional conv groups"})
    wavlm_num_buckets: Optional[int] = field(default=None, metadata={"help": "WavLM relative position buckets"})
    wavlm_max_bucket_distance: Optional[int] = field(default=None, metadata={"help": "WavLM max bucket distance"})
    llama_dim: Optional[int] = field(default=None, metadata={"help": "LLM width"})
    llama_layers: Optional[int] = field(default=None, metadata={"help": "LLM layers"})
    llama_heads: Optional[int] = field(default=None, metadata={"help": "LLM attention heads"})
    llama_kv_heads: Optional[int] = field(default=None, metadata={"help": "LLM key/value heads"})
    llama_ffn_dim: Optional[int] = field(default=None, metadata={"help": "LLM FFN width"})
    llama_vocab_size: Optional[int] = field(
        default=None,
        metadata={"help": "LLM vocabulary (-1: the task's dictionary size)"})
    llama_max_positions: Optional[int] = field(default=None, metadata={"help": "LLM context length"})
    llama_rms_norm_eps: Optional[float] = field(
        default=None,
        metadata={"help": "LLM RMSNorm epsilon (random init; a loaded LLM keeps its config's)"})
    llama_rms_norm_eps_override: float = field(
        default=0.0,
        metadata={"help": "> 0: the LLM's RMSNorm epsilon, also for a loaded LLM (the reference's LLaMA code runs with "
                          "1e-6 where Llama-2's config.json says 1e-5; wavllm-convert-reference-checkpoint sets 1e-6)"})
    semantic_conv_mid_dim: Optional[int] = field(
        default=None,
        metadata={"help": "semantic adapter conv 1 channels (before GLU)"})
    semantic_conv_out_dim: Optional[int] = field(
        default=None,
        metadata={"help": "semantic adapter conv output (after GLU)"})
    acoustic_conv_mid_dim: Optional[int] = field(
        default=None,
        metadata={"help": "acoustic adapter conv 1 channels (before GLU)"})
    acoustic_conv_out_dim: Optional[int] = field(
        default=None,
        metadata={"help": "acoustic adapter conv output (after GLU)"})
    bottleneck_dim: Optional[int] = field(default=None, metadata={"help": "bottleneck width of both adapters"})
    bottleneck_norm: BOTTLENECK_NORM_CHOICES = field(
        default="post",
        metadata={"help": "LayerNorm placement in the bottleneck adapters: post (x + LN(up(gelu(down(x)))), the "
                          "reference's) or pre (x + up(gelu(down(LN(x)))))"})
    adapter_out_dim: Optional[int] = field(
        default=None,
        metadata={"help": "each adapter's output width (2048 in the paper)"})
    # ---- LoRA and the prompt-aware adapter
    lora_rank: Optional[int] = field(default=None, metadata={"help": "LoRA rank R"})
    lora_alpha: Optional[float] = field(default=None, metadata={"help": "LoRA alpha (stage-1 scale alpha/R)"})
    lora_dropout: float = field(default=0.1, metadata={"help": "dropout on the LoRA input (the reference's 0.1)"})
    lora_a_init: LORA_A_INIT_CHOICES = field(
        default="reference",
        metadata={"help": "LoRA A init: reference (uniform +-1/sqrt(R), kaiming-uniform with fan-in R as the reference "
                          "stores A) or fan_in_features (kaiming-uniform with fan-in = input width, PEFT's; about "
                          "sqrt(in/R) smaller)"})
    prompt_adapter: bool = field(
        default=False,
        metadata={"help": "stage 2: build and train the prompt-aware LoRA weight adapter"})
    prompt_adapter_dim: Optional[int] = field(default=None, metadata={"help": "prompt adapter bottleneck K"})
    lora_scale_layout: LORA_SCALE_LAYOUT_CHOICES = field(
        default="hf",
        metadata={"help": "feature order of the stage-2 scale r for q/k LoRA: hf (this plugin) or meta (checkpoints "
                          "converted from the reference, whose r follows Meta's rotary layout)"})
    prompt_adapter_init: PROMPT_ADAPTER_INIT_CHOICES = field(
        default="stage1_scale",
        metadata={"help": "stage1_scale: P_u starts at weight 0, bias alpha/R, so r = alpha/R for every prompt and "
                          "stage 2 starts where stage 1 ended; random: PyTorch's default Linear init"})
    decode_bos_after_speech: bool = field(
        default=False,
        metadata={"help": "decoding only: feed <s> in place of the first token after the speech span (the lone space "
                          "piece that ' </SPEECH>' starts with), as the reference's generator does (its token buffer "
                          "starts with <s> and the forced prompt continues from the second token); on in checkpoints "
                          "made by wavllm-convert-reference-checkpoint so a converted release decodes as the reference "
                          "decodes it"})
    prompt_adapter_clamp: float = field(
        default=3.0,
        metadata={"help": "r = clamp(relu(r), max=this) as the reference does; <= 0 disables"})
    prompt_adapter_input: PROMPT_ADAPTER_INPUT_CHOICES = field(
        default="last_layer",
        metadata={"help": "what the prompt adapter reads: last_layer (the last decoder layer's output before the "
                          "final norm, the reference's) or final_norm (after the LLM's final RMSNorm: every position "
                          "at the norm's scale; SmolLM2's pre-norm states have norms of 600-5600, which leave P_u "
                          "untrainable at stage-2 learning rates)"})
    speech_shrink: SPEECH_SHRINK_CHOICES = field(
        default="off",
        metadata={"help": "off (the paper's: every 80 ms frame reaches the LLM) or ctc (not the paper's; "
                          "models/shrink.py): the LLM reads only the frames whose CTC score (stage 1a's, against "
                          "its token embeddings) is a token, one position per run of the same token; the model "
                          "then holds the blank that criterion wavllm_ctc_align trains; ctc_tokens: the same "
                          "positions, each the expected token embedding under its frames' CTC scores (softmax "
                          "over the vocabulary, the blank left out), so the LLM reads vectors of its own "
                          "embedding space (LegoSLM's input, arXiv 2505.11352); this drops what the frames carry "
                          "beyond the words (speaker, style)"})
    # ---- training
    activation_checkpointing: bool = field(
        default=False,
        metadata={"help": "recompute the frozen LLM layers' activations in backward (saves memory)"})
    freeze_lora: bool = field(
        default=False,
        metadata={"help": "keep LoRA frozen (e.g. train only the prompt adapter in stage 2)"})


def check_choices(cfg) -> None:
    """A clear error for a choice field outside its choices (Hydra checks composed configs itself).

    Args:
        cfg (WavLLMConfig or DictConfig): the model config.

    Raises:
        WavLLMInputError: naming the field, its choices and the value given.
    """
    for name, allowed in CHOICES.items():
        value = getattr(cfg, name, None)
        if value is not None and str(value) not in allowed:
            raise WavLLMInputError(f"model.{name} must be one of {', '.join(allowed)}; got {str(value)!r}")


def torch_dtype(name) -> torch.dtype:
    """The torch dtype of a ``DTYPE_NAMES`` name.

    Args:
        name (str): ``float32``, ``bfloat16`` or ``float16``.

    Returns:
        torch.dtype: the dtype.
    """
    try:
        return DTYPES[str(name)]
    except KeyError:
        raise WavLLMInputError(f"model.backbone_dtype must be float32, bfloat16 or float16, got {name!r}")
