"""The named WavLLM architectures: every size lives here (or in a yaml), never inside the modules.

``--arch wavllm_7b`` (the paper's model, = ``wavllm``) is the base; the others state only what
differs from the one they derive from, as fairseq's ``register_model_architecture`` functions do:
``wavllm_small`` (CPU benchmarks) from ``wavllm_7b``, ``wavllm_tiny`` (unit and CLI tests) and
``wavllm_small_real`` (the backbones pip ships) from ``wavllm_small``. A size field the user sets wins
over the table; a loaded backbone's own config wins for that backbone's sizes.
"""
from typing import Dict

from fairseq.models import register_model_architecture

ARCHITECTURES: Dict[str, Dict[str, object]] = {}


def derive(base: str, **changes) -> Dict[str, object]:
    """The table of architecture ``base`` with ``changes`` applied.

    Args:
        base (str): a name in ``ARCHITECTURES``.
        **changes: new values of fields of ``base``'s table.

    Returns:
        Dict[str, object]: a new table, in ``base``'s key order.

    Raises:
        KeyError: for a change that names no field of ``base`` (a typo would add a size nothing reads).
    """
    table = ARCHITECTURES[base]
    unknown = sorted(set(changes) - set(table))
    if unknown:
        raise KeyError(f"not fields of architecture {base}: {unknown}")
    return {**table, **changes}


# The paper's model: Whisper-large-v2 encoder, WavLM-base, LLaMA-2-7B(-chat), LoRA R=32.
ARCHITECTURES["wavllm_7b"] = dict(
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
)
# A few tens of millions of parameters: big enough for meaningful CPU benchmarks.
ARCHITECTURES["wavllm_small"] = derive(
    "wavllm_7b",
    whisper_d_model=384, whisper_layers=4, whisper_heads=6, whisper_ffn_dim=1536,
    wavlm_hidden=384, wavlm_layers=4, wavlm_heads=6, wavlm_ffn_dim=1536, wavlm_conv_dim=256, wavlm_conv_pos_kernel=64,
    llama_dim=512, llama_layers=8, llama_heads=8, llama_kv_heads=8, llama_ffn_dim=1376, llama_max_positions=2048,
    semantic_conv_mid_dim=384, semantic_conv_out_dim=256,
    acoustic_conv_mid_dim=256, acoustic_conv_out_dim=256,
    bottleneck_dim=128, adapter_out_dim=256,
    lora_rank=16, lora_alpha=16.0, prompt_adapter_dim=256,
    keep_reference_unused_projector=False,
)
# Seconds per training step on a CPU: unit and CLI tests. The vocabulary is the tokenizer's.
ARCHITECTURES["wavllm_tiny"] = derive(
    "wavllm_small",
    whisper_d_model=32, whisper_layers=2, whisper_heads=2, whisper_ffn_dim=64, whisper_max_source_positions=100,
    wavlm_hidden=32, wavlm_layers=2, wavlm_heads=2, wavlm_ffn_dim=64, wavlm_conv_dim=32,
    wavlm_conv_pos_kernel=16, wavlm_conv_pos_groups=4, wavlm_num_buckets=32, wavlm_max_bucket_distance=64,
    llama_dim=64, llama_layers=2, llama_heads=4, llama_kv_heads=4, llama_ffn_dim=128,
    llama_vocab_size=-1, llama_max_positions=1024,
    semantic_conv_mid_dim=32, semantic_conv_out_dim=32,
    acoustic_conv_mid_dim=32, acoustic_conv_out_dim=32,
    bottleneck_dim=16, adapter_out_dim=32,
    lora_rank=4, lora_alpha=8.0, prompt_adapter_dim=32,
)
# Real small backbones that pip ships (wavllm-prepare-small-backbones): Whisper tiny.en's encoder (the
# small sizes), SmolLM2-135M-Instruct (LLaMA architecture, tied embeddings, 3 KV heads), a WavLM stand-in
# (the toy's default stage 0; no WavLM ships on pip). Sizes are those backbones' (used when a path is empty).
ARCHITECTURES["wavllm_small_real"] = derive(
    "wavllm_small",
    wavlm_hidden=144, wavlm_layers=3, wavlm_heads=4, wavlm_ffn_dim=576, wavlm_conv_dim=48,
    wavlm_conv_pos_kernel=32, wavlm_conv_pos_groups=8,
    llama_dim=576, llama_layers=30, llama_heads=9, llama_kv_heads=3, llama_ffn_dim=1536,
    llama_vocab_size=49152, llama_max_positions=8192,
    lora_rank=8, prompt_adapter_dim=128,
)
ARCHITECTURES["wavllm"] = ARCHITECTURES["wavllm_7b"]


def fill_from_arch(cfg, arch: str) -> None:
    """Fill every size field of ``cfg`` that is still None from the named architecture (user values win).

    Args:
        cfg (WavLLMConfig or DictConfig): the model config, changed in place.
        arch (str): a name in ``ARCHITECTURES``.
    """
    preset = ARCHITECTURES[arch]
    for key, value in preset.items():
        if getattr(cfg, key, None) is None:
            setattr(cfg, key, value)


def register_architectures(model_name: str = "wavllm") -> None:
    """Register every named architecture with fairseq for ``model_name`` (after the model itself).

    Args:
        model_name (str): the ``@register_model`` name; its own architecture is fairseq's already.
    """
    for arch in ARCHITECTURES:
        if arch == model_name:
            continue

        def fill(cfg, arch=arch):
            fill_from_arch(cfg, arch)

        register_model_architecture(model_name, arch)(fill)
