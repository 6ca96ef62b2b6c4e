"""Backbone folders in the layouts the real checkpoints are released in load through transformers' own
``from_pretrained`` and give the outputs of the model they were written from; broken folders fail with
named errors (hf_folder.py, encoders.py, llm.py)."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file
from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, WavLMConfig, WavLMForCTC,
                          WavLMModel, WhisperConfig, WhisperForConditionalGeneration)

from wavllm_fairseq.errors import CheckpointError
from wavllm_fairseq.models import encoders, llm
from wavllm_fairseq.models.hf_folder import read_hf_state_dict
from wavllm_fairseq.models.wavllm import WavLLMModel


def _wavlm():
    torch.manual_seed(0)
    cfg = WavLMConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                      num_buckets=32, max_bucket_distance=64)
    return WavLMModel(cfg).eval()


def _llama(vocab=300, tie=False):
    torch.manual_seed(1)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=vocab, max_position_embeddings=256,
                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def _whisper():
    torch.manual_seed(2)
    cfg = WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80,
                        max_source_positions=100, max_target_positions=64, vocab_size=100, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    return WhisperForConditionalGeneration(cfg).eval()


def test_wavlm_base_layout_weight_norm_names_in_a_pickle_bin(tmp_path):
    """microsoft/wavlm-base's pytorch_model.bin stores the positional conv's weight norm as weight_g /
    weight_v (torch's old weight_norm), which today's module names parametrizations.weight.original0/1."""
    src = _wavlm()
    state = {k.replace("parametrizations.weight.original0", "weight_g")
              .replace("parametrizations.weight.original1", "weight_v"): v
             for k, v in src.state_dict().items()}
    assert "encoder.pos_conv_embed.conv.weight_g" in state and "encoder.pos_conv_embed.conv.weight_v" in state
    src.config.save_pretrained(tmp_path)
    torch.save(state, tmp_path / "pytorch_model.bin")
    loaded = encoders.load_wavlm(str(tmp_path))
    wav = torch.randn(2, 4000)
    assert torch.equal(src(wav).last_hidden_state, loaded(wav).last_hidden_state)
    # the raw reader (checkpoint conversion's backbone check) names the tensors as the module does
    raw = read_hf_state_dict(str(tmp_path))
    assert set(raw) == set(src.state_dict()) and all(torch.equal(raw[k], v) for k, v in src.state_dict().items())


def test_wavlm_reads_the_waveform_as_its_folders_feature_extractor_says(tmp_path):
    """do_normalize in preprocessor_config.json: each clip is normalised before WavLM, as the reference's
    AutoFeatureExtractor does; a folder without the file (save_pretrained alone, the toy's stand-in) or with
    do_normalize false feeds the raw waveform, as before. The setting is part of the encoder cache's key."""
    from types import SimpleNamespace

    from transformers import Wav2Vec2FeatureExtractor

    src = _wavlm()
    src.save_pretrained(tmp_path)
    assert not (tmp_path / "preprocessor_config.json").exists()
    cfg = SimpleNamespace(use_wavlm=True, wavlm_path=str(tmp_path))
    g = torch.Generator().manual_seed(3)
    wav = 0.2 + 0.1 * torch.randn(2, 6000, generator=g)
    wav[1, 4000:] = 0
    lengths = torch.tensor([6000, 4000])
    raw = encoders.build_wavlm(cfg)
    assert raw.normalize is False
    with torch.no_grad():
        hidden, _ = raw(wav, lengths)
        assert torch.equal(hidden[:, 0], torch.stack(src(wav[:1], output_hidden_states=True).hidden_states)[:, 0])
    Wav2Vec2FeatureExtractor(do_normalize=False).save_pretrained(tmp_path)
    assert encoders.build_wavlm(cfg).normalize is False
    Wav2Vec2FeatureExtractor(do_normalize=True).save_pretrained(tmp_path)
    normed = encoders.build_wavlm(cfg)
    assert normed.normalize is True
    extractor = Wav2Vec2FeatureExtractor.from_pretrained(str(tmp_path))
    with torch.no_grad():
        hidden, _ = normed(wav, lengths)
        for b, n in enumerate(lengths.tolist()):
            x = torch.from_numpy(extractor(wav[b, :n].numpy(), sampling_rate=16000,
                                           return_tensors="np")["input_values"])
            ref = torch.stack(src(x, output_hidden_states=True).hidden_states)[:, 0]
            m = ref.shape[1]
            torch.testing.assert_close(hidden[:, b, :m], ref, atol=1e-4, rtol=1e-4)
    whisper = encoders.WhisperSemanticEncoder(_whisper().model.encoder)
    assert encoders.encoder_fingerprint(whisper, normed)[0] != encoders.encoder_fingerprint(whisper, raw)[0]


def test_wavlm_from_a_head_folder_takes_the_body(tmp_path):
    src = _wavlm()
    src.config.vocab_size = 10
    head = WavLMForCTC(src.config).eval()
    head.wavlm.load_state_dict(src.state_dict())
    head.save_pretrained(tmp_path)
    loaded = encoders.load_wavlm(str(tmp_path))
    wav = torch.randn(1, 4000)
    assert torch.equal(src(wav).last_hidden_state, loaded(wav).last_hidden_state)


def test_llama2_era_bin_shards_with_inv_freq_buffers_and_index(tmp_path):
    """Llama-2-7b-chat-hf's pytorch_model-0000k-of-0000n.bin shards carry rotary_emb.inv_freq buffers."""
    src = _llama()
    src.config.save_pretrained(tmp_path)
    state = src.state_dict()
    keys = list(state)
    head_dim = src.config.hidden_size // src.config.num_attention_heads
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        shard = {k: state[k].clone() for k in part}
        if i == 0:
            for layer in range(src.config.num_hidden_layers):
                shard[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = inv_freq
        torch.save(shard, tmp_path / name)
        weight_map.update({k: name for k in shard})
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    loaded = llm.load_llama(str(tmp_path))
    ids = torch.randint(0, 300, (2, 12))
    assert torch.equal(src(ids).logits, loaded(ids).logits)


def test_sharded_safetensors_with_index_and_the_dtype_option(tmp_path):
    src = _llama(tie=True)
    src.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    ids = torch.randint(0, 300, (2, 12))
    loaded = llm.load_llama(str(tmp_path))
    assert torch.equal(src(ids).logits, loaded(ids).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    bf16 = llm.load_llama(str(tmp_path), torch.bfloat16)
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(bf16.model.layers[0].mlp.up_proj.weight, src.model.layers[0].mlp.up_proj.weight.bfloat16())


@pytest.mark.parametrize("layout", ["for_conditional_generation", "whisper_model", "bare_encoder"])
def test_whisper_encoder_from_a_full_whisper_folder(tmp_path, layout):
    """openai/whisper-* folders hold a WhisperForConditionalGeneration (model.encoder.*, decoder, proj_out)."""
    src = _whisper()
    {"for_conditional_generation": src, "whisper_model": src.model,
     "bare_encoder": src.model.encoder}[layout].save_pretrained(tmp_path)
    enc = encoders.load_whisper_encoder(str(tmp_path))
    mel = torch.randn(2, 80, 200)
    assert torch.equal(src.model.encoder(mel).last_hidden_state, enc(mel).last_hidden_state)
    assert not any("decoder" in k for k in enc.state_dict())


def test_errors_name_the_folder_and_the_problem(tmp_path):
    src = _llama()
    good = tmp_path / "good"
    src.save_pretrained(good, max_shard_size="40KB")
    with pytest.raises(CheckpointError, match="does not exist"):
        llm.load_llama(str(tmp_path / "nowhere"))
    # missing config.json
    no_cfg = tmp_path / "no_cfg"
    no_cfg.mkdir()
    for f in good.iterdir():
        if f.name != "config.json":
            (no_cfg / f.name).write_bytes(f.read_bytes())
    with pytest.raises(CheckpointError, match="missing config.json"):
        llm.load_llama(str(no_cfg))
    # a corrupt (truncated) shard
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in good.iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    shard = sorted(corrupt.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt") as err:
        llm.load_llama(str(corrupt))
    assert str(corrupt) in str(err.value)
    # a shard the index lists but the folder lacks
    os.remove(shard)
    with pytest.raises(CheckpointError, match="missing"):
        llm.load_llama(str(corrupt))
    # sizes in config.json that are not the weights'
    cfg = json.loads((good / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (good / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"do not match the sizes in config.json.*mlp"):
        llm.load_llama(str(good))


def test_a_weight_the_folder_lacks_is_an_error_not_a_random_init(tmp_path):
    src = _llama()
    src.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in src.state_dict().items() if k != "model.layers.1.mlp.down_proj.weight"}
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"not in the folder.*down_proj"):
        llm.load_llama(str(tmp_path))


def test_a_qwen2_style_llm_with_attention_biases_takes_lora(tmp_path):
    """Qwen2's layout (q/k/v biases, grouped KV heads) is LLaMA's plus biases: it loads as itself and gets
    LoRA on q/k/v/o; with LoRA's B at zero the WavLLM's LLM gives the source model's logits."""
    torch.manual_seed(3)
    src = Qwen2ForCausalLM(Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=128, vocab_size=320,
                                       max_position_embeddings=256, tie_word_embeddings=True)).eval()
    assert src.model.layers[0].self_attn.q_proj.bias is not None
    src.save_pretrained(tmp_path)
    model = WavLLMModel.from_arch("wavllm_tiny", vocab_size=320, llama_path=str(tmp_path)).eval()
    assert type(model.llm).__name__ == "Qwen2ForCausalLM"
    assert sum(1 for n, _ in model.llm.named_modules() if n.endswith("q_proj.lora_A")) == 2
    for m in model.llm.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.zeros_(m.lora_B.weight)
    ids = torch.randint(0, 320, (2, 10))
    assert torch.allclose(src(ids).logits, model.llm(ids).logits, atol=1e-5)
    assert not any(k.startswith("llm.") and ".base." in k for k in model.state_dict())  # reloaded from the folder
