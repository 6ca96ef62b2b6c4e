"""The named architectures (models/architectures.py): each is its base with a few sizes changed, and the
tables they resolve to are exactly these (the sizes every test, benchmark and checkpoint was made with)."""
import pytest
from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_NAME_REGISTRY

from wavllm_fairseq.models.architectures import ARCHITECTURES, derive
from wavllm_fairseq.models.config import WavLLMConfig

RESOLVED = {
    "wavllm_7b": dict(
        whisper_d_model=1280, whisper_layers=32, whisper_heads=20, whisper_ffn_dim=5120, whisper_num_mel_bins=80,
        whisper_max_source_positions=1500, wavlm_hidden=768, wavlm_layers=12, wavlm_heads=12, wavlm_ffn_dim=3072,
        wavlm_conv_dim=512, wavlm_conv_pos_kernel=128, wavlm_conv_pos_groups=16, wavlm_num_buckets=320,
        wavlm_max_bucket_distance=800, llama_dim=4096, llama_layers=32, llama_heads=32, llama_kv_heads=32,
        llama_ffn_dim=11008, llama_vocab_size=32000, llama_max_positions=4096, llama_rms_norm_eps=1e-05,
        semantic_conv_mid_dim=1280, semantic_conv_out_dim=1024, acoustic_conv_mid_dim=512, acoustic_conv_out_dim=1024,
        bottleneck_dim=512, adapter_out_dim=2048, lora_rank=32, lora_alpha=32.0, prompt_adapter_dim=1024,
        keep_reference_unused_projector=True,
    ),
    "wavllm_small": dict(
        whisper_d_model=384, whisper_layers=4, whisper_heads=6, whisper_ffn_dim=1536, whisper_num_mel_bins=80,
        whisper_max_source_positions=1500, wavlm_hidden=384, wavlm_layers=4, wavlm_heads=6, wavlm_ffn_dim=1536,
        wavlm_conv_dim=256, wavlm_conv_pos_kernel=64, wavlm_conv_pos_groups=16, wavlm_num_buckets=320,
        wavlm_max_bucket_distance=800, llama_dim=512, llama_layers=8, llama_heads=8, llama_kv_heads=8,
        llama_ffn_dim=1376, llama_vocab_size=32000, llama_max_positions=2048, llama_rms_norm_eps=1e-05,
        semantic_conv_mid_dim=384, semantic_conv_out_dim=256, acoustic_conv_mid_dim=256, acoustic_conv_out_dim=256,
        bottleneck_dim=128, adapter_out_dim=256, lora_rank=16, lora_alpha=16.0, prompt_adapter_dim=256,
        keep_reference_unused_projector=False,
    ),
    "wavllm_tiny": dict(
        whisper_d_model=32, whisper_layers=2, whisper_heads=2, whisper_ffn_dim=64, whisper_num_mel_bins=80,
        whisper_max_source_positions=100, wavlm_hidden=32, wavlm_layers=2, wavlm_heads=2, wavlm_ffn_dim=64,
        wavlm_conv_dim=32, wavlm_conv_pos_kernel=16, wavlm_conv_pos_groups=4, wavlm_num_buckets=32,
        wavlm_max_bucket_distance=64, llama_dim=64, llama_layers=2, llama_heads=4, llama_kv_heads=4,
        llama_ffn_dim=128, llama_vocab_size=-1, llama_max_positions=1024, llama_rms_norm_eps=1e-05,
        semantic_conv_mid_dim=32, semantic_conv_out_dim=32, acoustic_conv_mid_dim=32, acoustic_conv_out_dim=32,
        bottleneck_dim=16, adapter_out_dim=32, lora_rank=4, lora_alpha=8.0, prompt_adapter_dim=32,
        keep_reference_unused_projector=False,
    ),
    "wavllm_small_real": dict(
        whisper_d_model=384, whisper_layers=4, whisper_heads=6, whisper_ffn_dim=1536, whisper_num_mel_bins=80,
        whisper_max_source_positions=1500, wavlm_hidden=144, wavlm_layers=3, wavlm_heads=4, wavlm_ffn_dim=576,
        wavlm_conv_dim=48, wavlm_conv_pos_kernel=32, wavlm_conv_pos_groups=8, wavlm_num_buckets=320,
        wavlm_max_bucket_distance=800, llama_dim=576, llama_layers=30, llama_heads=9, llama_kv_heads=3,
        llama_ffn_dim=1536, llama_vocab_size=49152, llama_max_positions=8192, llama_rms_norm_eps=1e-05,
        semantic_conv_mid_dim=384, semantic_conv_out_dim=256, acoustic_conv_mid_dim=256, acoustic_conv_out_dim=256,
        bottleneck_dim=128, adapter_out_dim=256, lora_rank=8, lora_alpha=16.0, prompt_adapter_dim=128,
        keep_reference_unused_projector=False,
    ),
}


@pytest.mark.parametrize("name", sorted(RESOLVED))
def test_each_architecture_resolves_to_its_sizes(name):
    assert ARCHITECTURES[name] == RESOLVED[name]
    assert list(ARCHITECTURES[name]) == list(RESOLVED[name])
    assert {k: type(v) for k, v in ARCHITECTURES[name].items()} == {k: type(v) for k, v in RESOLVED[name].items()}


def test_wavllm_is_the_papers_7b_and_nothing_else_is_named():
    assert ARCHITECTURES["wavllm"] is ARCHITECTURES["wavllm_7b"]
    assert set(ARCHITECTURES) == set(RESOLVED) | {"wavllm"}


@pytest.mark.parametrize("name", sorted(RESOLVED))
def test_fairseq_knows_every_architecture_and_fills_only_what_the_user_left_empty(name):
    assert ARCH_MODEL_NAME_REGISTRY[name] == "wavllm"
    cfg = WavLLMConfig(lora_rank=3)
    ARCH_CONFIG_REGISTRY[name](cfg)
    assert cfg.lora_rank == 3
    assert {k: getattr(cfg, k) for k in RESOLVED[name] if k != "lora_rank"} == {
        k: v for k, v in RESOLVED[name].items() if k != "lora_rank"}


def test_a_delta_names_only_fields_of_its_base():
    assert derive("wavllm_small", lora_rank=2) == {**RESOLVED["wavllm_small"], "lora_rank": 2}
    with pytest.raises(KeyError, match="lora_rnk"):
        derive("wavllm_small", lora_rnk=2)
