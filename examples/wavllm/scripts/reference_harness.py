"""The reference implementation (microsoft/SpeechT5, WavLLM/) run in-process for parity_reference.py.

Imported from ``--reference-dir`` at run time only; this project never contains or imports it otherwise.
Patches applied at run time (the checkout on disk is not modified) because the reference cannot run as is
here:
  1. ``torchaudio`` is not installed (it breaks transformers imports on CPU-only machines): a stub module
     stands in while the reference's dataset module is imported (it only uses it for manifests with
     start/end frame columns), and fairseq's ``get_waveform`` (whose resampling is torchaudio's
     ``sox_effects`` ``rate``) is replaced in that module by a soundfile read (float32, as fairseq reads)
     resampled by the SoX program's ``rate`` effect: the same libsox effect, at its default settings
     (high quality, linear phase, no dither), that ``torchaudio.sox_effects`` runs.
  2. transformers 5 changed ``WhisperEncoder.forward`` (no positional head_mask/output_* arguments) and
     ``WavLMEncoder`` (hidden states are only collected by the top-level model): the reference's
     ``WhisperEncoder.forward`` (HF encoder, then trim to the longest valid length from the feature
     extractor's attention mask) and ``FairseqWavLMEncoder.forward`` (WavLM's feature extractor, mask,
     projection and encoder -- i.e. ``WavLMModel.forward`` with all hidden states -- then the softmax
     layer weights, subsampler, adapter, projector) are replaced by the same computations.
  3. The released ``Attention_LoRA.forward`` only runs stage 2 (with ``pooled_scale_output=None`` it
     leaves xq undefined); stage 1 passes its LoRA scaling ``alpha / R`` as a constant r, the math its
     ``_checkpointed_forward`` (the stage-1 path) uses.
  4. The reference hard-codes hub ids ("openai/whisper-large-v2", "microsoft/wavlm-base") and a 32-layer
     LLaMA in its model constructor: its building blocks (FairseqWhisperEncoder, FairseqWavLMEncoder,
     LLAMA/ModelArgs, the 4096 -> 4096 projector) are built here directly from local configs; its WavLM
     feature extractor is ``AutoFeatureExtractor`` of the local WavLM folder, as its task builds it.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import types

import torch


def install_reference(ref_dir: str):
    """Import the reference package ``wavllm`` from ``ref_dir`` (patches 1-3).

    Args:
        ref_dir (str): the WavLLM/ folder of a SpeechT5 checkout.

    Returns:
        types.SimpleNamespace: its modules (llama, wavlm, whisper, data, tok, gen, model).
    """
    if not os.path.isdir(os.path.join(ref_dir, "wavllm")):
        raise SystemExit(f"--reference-dir must be the WavLLM folder of a SpeechT5 checkout (with wavllm/): {ref_dir}")
    sys.path.insert(0, ref_dir)
    import wavllm.models.llama as ref_llama
    import wavllm.models.wavlm as ref_wavlm
    import wavllm.models.whisper_encoder as ref_whisper
    from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

    def whisper_forward(self, input_features, attention_mask=None, head_mask=None, output_attentions=None,
                        output_hidden_states=None, return_dict=None):  # patch 2
        last = HFWhisperEncoder.forward(self, input_features).last_hidden_state
        out_len = self._get_feat_extract_output_lengths(attention_mask.sum(-1))
        return ref_whisper.WhisperOutput(last_hidden_state=last[:, : out_len.max()], output_lengths=out_len)

    ref_whisper.WhisperEncoder.forward = whisper_forward

    def wavlm_forward(self, src_tokens, attention_mask, prompt_embedding=None):  # patch 2 (WavLM)
        out = self.model(src_tokens, attention_mask=attention_mask, output_hidden_states=True)
        frames = self.model._get_feature_vector_attention_mask(out.last_hidden_state.shape[1], attention_mask)
        weights = torch.nn.functional.softmax(self.output_weights, dim=0)
        x = torch.stack([h * w for h, w in zip(out.hidden_states, weights)]).sum(dim=0)
        x, lengths = self.subsample(x, frames.sum(-1).to(torch.long))
        x = self.projector(self.adapter(x.transpose(0, 1).contiguous()))
        return {"encoder_out": x, "encoder_padding_mask": ref_wavlm.lengths_to_mask(lengths)}

    ref_wavlm.FairseqWavLMEncoder.forward = wavlm_forward
    lora_forward = ref_llama.Attention_LoRA.forward

    def stage1_lora_forward(self, x, start_pos, freqs_cis, mask, index, lora_index, lora_weights,
                            pooled_scale_output, is_prompt=False, incremental_state=None, **kw):  # patch 3
        if pooled_scale_output is None and not is_prompt:
            pooled_scale_output = x.new_full((x.shape[0], x.shape[-1]), self.scaling)
        return lora_forward(self, x, start_pos, freqs_cis, mask, index, lora_index, lora_weights,
                            pooled_scale_output, is_prompt, incremental_state, **kw)

    ref_llama.Attention_LoRA.forward = stage1_lora_forward
    import transformers  # noqa: F401  (imported before the stub below: it probes for torchaudio)
    from transformers import AutoFeatureExtractor, WhisperFeatureExtractor  # noqa: F401

    stub = "torchaudio" not in sys.modules
    if stub:  # patch 1, for the one import below only
        sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    try:
        import wavllm.data.speechllm_dataset as ref_data
    finally:
        if stub:
            del sys.modules["torchaudio"]
    ref_data.get_waveform = get_waveform_sox
    import wavllm.data.tokenizer as ref_tok
    import wavllm.inference.sequence_generator as ref_gen
    import wavllm.models.speechllm_model as ref_model
    return types.SimpleNamespace(llama=ref_llama, wavlm=ref_wavlm, whisper=ref_whisper, data=ref_data,
                                 tok=ref_tok, gen=ref_gen, model=ref_model)


def sox_rate(wav, sr: int, rate: int = 16000):
    """``torchaudio.sox_effects.apply_effects_tensor(wav, sr, [["rate", str(rate)]])`` through the SoX program
    (the same libsox ``rate`` effect; float32 in and out, no dither). Mono (T,) float32 in and out."""
    import numpy as np
    import soundfile as sf

    sox = shutil.which("sox")
    if sox is None:
        raise SystemExit("the reference resamples with SoX's rate effect: install the sox program "
                         "(apt-get install sox) or run with --no-44k")
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.wav"), os.path.join(tmp, "out.wav")
        sf.write(src, wav, sr, subtype="FLOAT")
        subprocess.run([sox, "-D", src, "-e", "floating-point", "-b", "32", dst, "rate", str(rate)], check=True)
        out, out_sr = sf.read(dst, dtype="float32")
    assert out_sr == rate
    return np.ascontiguousarray(out, dtype=np.float32)


def get_waveform_sox(path, always_2d=False, output_sample_rate=None, **kw):  # patch 1
    """fairseq's get_waveform for a mono file: soundfile's float32 read, then SoX ``rate`` to the output rate."""
    import soundfile as sf

    wav, sr = sf.read(path, dtype="float32")
    assert wav.ndim == 1, "the parity clips are mono"
    if output_sample_rate is not None and output_sample_rate != sr:
        wav, sr = sox_rate(wav, sr, output_sample_rate), output_sample_rate
    return (wav[None] if always_2d else wav), sr


def build_reference(R, work: str, stage: int, llm_layers: int, seed: int, wavlm_normalize: bool):
    """A SpeechLLMModel of the reference's classes with random weights (patch 4), eval mode; its WavLM folder
    (``work/wavlm``) holds a preprocessor_config.json with ``do_normalize=wavlm_normalize``."""
    from fairseq.models import BaseFairseqModel
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMModel, WhisperConfig

    torch.manual_seed(seed)
    wdir, vdir = os.path.join(work, "whisper_cfg"), os.path.join(work, "wavlm")
    WhisperConfig(d_model=1280, encoder_layers=1, encoder_attention_heads=20, encoder_ffn_dim=1024, num_mel_bins=80,
                  max_source_positions=1500, decoder_layers=1, decoder_attention_heads=20,
                  vocab_size=64).save_pretrained(wdir)
    WavLMModel(WavLMConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=1024,
                           conv_dim=(512,) * 7)).save_pretrained(vdir)
    # as microsoft/wavlm-base's preprocessor_config.json, do_normalize as asked
    Wav2Vec2FeatureExtractor(do_normalize=wavlm_normalize, return_attention_mask=True).save_pretrained(vdir)
    args = types.SimpleNamespace(whisper_path=wdir, wavlm_path=vdir, wavlm_plus=False, wavlm_plus_weight=False,
                                 wavlm_plus_1layer=False, wavlm_plus_1layer_5=False, wavlm_plus_5layer=False,
                                 wavlm_output_weight=True, wavlm_output_weight_by_prompts=False,
                                 wavlm_first_7_layers=False)
    model = R.model.SpeechLLMModel.__new__(R.model.SpeechLLMModel)
    BaseFairseqModel.__init__(model)
    model.audio_encoder = R.whisper.FairseqWhisperEncoder(args)
    model.wavlm_encoder = R.wavlm.FairseqWavLMEncoder(args)
    model.wavlm_audio_proj = torch.nn.Linear(4096, 4096)
    margs = R.llama.ModelArgs(n_layers=llm_layers, use_lora=True, lora_r=32, lora_alpha=32,
                              second_stage_update_scale=(stage == 2), scale_with_audio=False, scale_0_1=False)
    decoder = torch.nn.Module()
    decoder.model_llama = R.llama.LLAMA(margs)
    decoder.forward_generate = lambda *a, **k: (decoder.model_llama.forward_generate(*a, **k), None)
    decoder.reorder_incremental_state_scripting = decoder.model_llama.reorder_incremental_state_scripting
    model.gpt_model = decoder
    model.audio_proj = torch.nn.Linear(2048, 4096)
    _trained_looking(model, stage, seed)
    return model.eval(), vdir


def _trained_looking(model, stage: int, seed: int) -> None:
    """LoRA B (zeros at init), the big LLM matrices, the WavLM layer weights and (stage 2) r in a useful range."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_lora_B"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            elif "model_llama" in name and p.dim() == 2 and "lora" not in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
        model.wavlm_encoder.output_weights.copy_(torch.randn(13, generator=g))
        if stage == 2:  # relu/clamp(max=3) active but not saturated
            model.gpt_model.model_llama.scale_fc_2.bias.copy_(1.0 + 0.5 * torch.randn(4096, generator=g))


def save_reference_checkpoint(model, path: str, legacy_weight_norm: bool) -> None:
    """The state dict as the release stores it: with ``legacy_weight_norm``, WavLM's positional conv under
    torch 2.0.1's names (``weight_g`` / ``weight_v``: the reference pins torch 2.0.1), else today's."""
    state = dict(model.state_dict())
    if legacy_weight_norm:
        state = {k.replace("parametrizations.weight.original0", "weight_g")
                 .replace("parametrizations.weight.original1", "weight_v"): v for k, v in state.items()}
        assert any(k.endswith("pos_conv_embed.conv.weight_g") for k in state)
    torch.save({"model": state, "cfg": {"task": {"lora_r": 32, "lora_alpha": 32}}}, path)


def reference_batch(R, work: str, split: str, tokenizer_path: str, wavlm_dir: str, indices):
    """The reference's dataset and collater on rows ``indices`` of ``work/split.tsv``."""
    from transformers import AutoFeatureExtractor, WhisperFeatureExtractor

    cfg = types.SimpleNamespace(audio_root="", alpaca_text=True, prompt_bulid=True, shuffle=False,
                                prepend_tgt_lang_tag=False, use_audio_input=True, use_sample_rate=16000,
                                is_whisper=True, use_wavlm=True, whisper_token_len=64)
    ds = R.data.SpeechLLMDataset(cfg, work, split, False, text_tokenizer=R.tok.Tokenizer(tokenizer_path),
                                 audio_processor=WhisperFeatureExtractor(feature_size=80),
                                 wavlm_processor=AutoFeatureExtractor.from_pretrained(wavlm_dir))
    return ds, ds.collater([ds[i] for i in indices])


def reference_speech(model, sample):
    """Speech embeddings (B, N, 4096) as its generator builds them (concate_audio_wavlm)."""
    net = sample["net_input"]
    enc, _ = model.audio_encoder.forward_torchscript(net)
    wav, _ = model.wavlm_encoder.forward_torchscript(net)
    n = min(enc["encoder_out"].size(1), wav["encoder_out"].size(1))
    return model.wavlm_audio_proj(torch.cat([enc["encoder_out"][:, :n], wav["encoder_out"][:, :n]], dim=2))


def reference_logits(model, sample, speech, tokens):
    """The reference LLAMA's forward_generate at start_pos 0 on [left][speech][tokens] -> (B, T, V), r."""
    net = sample["net_input"]
    llama = model.gpt_model.model_llama
    out = llama.forward_generate(0, tokens, 0, None, {"encoder_out": speech}, net["index"], net["orig_prompts"],
                                 left_prompts=net["left_prompts"], incremental_state={})
    return out[:, -tokens.shape[1]:], llama.infer_pooled_prompt_output


class _Dict:
    """What SequenceGenerator reads of the task's dictionary."""

    def __len__(self):
        return 32000

    def pad(self):
        return 0

    def unk(self):
        return 0

    def eos(self):
        return 2


def reference_greedy(R, model, sample, n_new: int):
    """Its own SequenceGenerator, greedy, the right prompt forced as its generate.py does: {id: new tokens}."""
    from fairseq import search

    prefix_size = int(sample["net_input"]["prompt_masks"].sum(-1).max())
    gen = R.gen.SequenceGenerator([model], _Dict(), beam_size=1, max_len_a=0, max_len_b=prefix_size + n_new,
                                  search_strategy=search.BeamSearch(_Dict()), n_words=32000)
    hyps = gen.generate([model], sample, prefix_tokens=sample["target"][:, :prefix_size])
    out = {}
    for i, sid in enumerate(sample["id"].tolist()):
        plen = int(sample["net_input"]["prompt_masks"][i].sum())
        out[sid] = [t for t in hyps[i][0]["tokens"].tolist()[plen:] if t != 2]
    return out


def write_results(path: str, command: str, results, not_compared) -> None:
    with open(path, "w") as f:
        json.dump({"command": command, "results": results, "not_compared": not_compared}, f, indent=1)
