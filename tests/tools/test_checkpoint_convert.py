"""Reference-release checkpoint conversion (wavllm_fairseq/tools/convert_reference.py, reference_keys.py).

The tests build a tiny checkpoint in the reference implementation's layout *here*, from their own
description of it (key names, Meta's interleaved rotary layout for wq/wk, LoRA ``x @ A @ B`` with
``A: (in, R)``, ``B: (R, out)``), convert it and check the converted model computes what the reference
computes: adapters against the reference math written out below, LoRA deltas against ``x @ A @ B``,
the rotary layout against Meta's complex-number rotary, and whole-model logits against a model built
directly with the same weights.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from wavllm_fairseq.tools.convert_reference import convert_checkpoint, main
from wavllm_fairseq.tools.reference_keys import convert_state_dict
from wavllm_fairseq.errors import CheckpointError
from wavllm_fairseq.models.wavllm import WavLLMModel

VOCAB = 100
HEADS = 4  # wavllm_tiny: llama_dim 64, 4 heads of 16


# ----------------------------------------------------------------------------- reference layout
def hf_to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF (rotate-halves) q/k rows -> Meta (interleaved pairs) rows: per head, HF rows [0..h/2) are
    Meta's even rows and HF rows [h/2..h) Meta's odd rows."""
    out_f = w.shape[0]
    h = out_f // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, h // 2, *rest).transpose(1, 2).reshape(out_f, *rest)


def to_reference_state(model: WavLLMModel, stage2: bool = False) -> dict:
    """``model``'s weights under the reference implementation's names and layouts."""
    s = {k: v.detach().clone() for k, v in super(WavLLMModel, model).state_dict().items()}
    ref = {}
    for k, v in s.items():
        if k.startswith("whisper.encoder."):
            ref["audio_encoder.model." + k[len("whisper.encoder."):]] = v
        elif k.startswith("wavlm.wavlm."):
            ref["wavlm_encoder.model." + k[len("wavlm.wavlm."):]] = v
    for side, ours in (("audio_encoder", "semantic_adapter"), ("wavlm_encoder", "acoustic_adapter")):
        for i in range(2):
            for p in ("weight", "bias"):
                ref[f"{side}.subsample.conv_layers.{i}.{p}"] = s[f"{ours}.subsampler.conv_layers.{i}.{p}"]
        for theirs, mine in (("down_layer", "down"), ("up_layer", "up"), ("layer_norm", "layer_norm")):
            for p in ("weight", "bias"):
                ref[f"{side}.adapter.{theirs}.{p}"] = s[f"{ours}.bottleneck.{mine}.{p}"]
        for p in ("weight", "bias"):
            ref[f"{side}.projector.{p}"] = s[f"{ours}.out_proj.{p}"]
    ref["wavlm_encoder.output_weights"] = s["acoustic_adapter.layer_weights"]
    for p in ("weight", "bias"):
        ref[f"wavlm_audio_proj.{p}"] = s[f"projector.{p}"]
    L = "gpt_model.model_llama."
    ref[L + "tok_embeddings.weight"] = s["llm.model.embed_tokens.weight"]
    ref[L + "norm.weight"] = s["llm.model.norm.weight"]
    ref[L + "output.weight"] = s["llm.lm_head.weight"]
    n_layers = model.llm.config.num_hidden_layers
    for i in range(n_layers):
        a = f"llm.model.layers.{i}."
        for theirs, mine in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            w = s[a + f"self_attn.{mine}.base.weight"]
            lora_a = s[a + f"self_attn.{mine}.lora_A.weight"].t()  # (in, R)
            lora_b = s[a + f"self_attn.{mine}.lora_B.weight"]  # (out, R)
            if theirs in ("wq", "wk"):
                w, lora_b = hf_to_meta_rows(w, HEADS), hf_to_meta_rows(lora_b, HEADS)
            ref[L + f"layers.{i}.attention.{theirs}.weight"] = w
            ref[L + f"layers.{i}.attention.{theirs}_lora_A"] = lora_a.contiguous()
            ref[L + f"layers.{i}.attention.{theirs}_lora_B"] = lora_b.t().contiguous()  # (R, out)
        for theirs, mine in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
            ref[L + f"layers.{i}.feed_forward.{theirs}.weight"] = s[a + f"mlp.{mine}.weight"]
        ref[L + f"layers.{i}.attention_norm.weight"] = s[a + "input_layernorm.weight"]
        ref[L + f"layers.{i}.ffn_norm.weight"] = s[a + "post_attention_layernorm.weight"]
    if stage2:
        for theirs, mine in (("scale_fc_1", "down"), ("scale_fc_2", "up"), ("scale_weight_attention", "attention")):
            for p in ("weight", "bias"):
                ref[L + f"{theirs}.{p}"] = s[f"prompt_scale.{mine}.{p}"]
    return ref


def tiny_model(seed: int, stage2: bool = False, vocab: int = VOCAB) -> WavLLMModel:
    torch.manual_seed(seed)
    # RMSNorm eps 1e-6: the reference's LLaMA code's, which the converter sets on the converted model
    model = WavLLMModel.from_arch("wavllm_tiny", vocab_size=vocab, prompt_adapter=stage2, lora_dropout=0.0,
                                  llama_rms_norm_eps_override=1e-6)
    with torch.no_grad():  # trained-looking LoRA and non-uniform layer weights
        for n, p in model.named_parameters():
            if ".lora_B." in n or n.endswith("layer_weights"):
                p.normal_(0, 0.3)
    return model.eval()


def legacy_weight_norm(ref: dict) -> dict:
    """A reference state with torch 2.0.1's weight-norm names (``weight_g`` / ``weight_v``), as the release
    (trained and saved under the reference's pinned torch 2.0.1) stores WavLM's positional convolution."""
    out = {k.replace("parametrizations.weight.original0", "weight_g")
            .replace("parametrizations.weight.original1", "weight_v"): v for k, v in ref.items()}
    assert "wavlm_encoder.model.encoder.pos_conv_embed.conv.weight_g" in out
    return out


def save_release(path: str, model: WavLLMModel, stage2: bool = False, lora_alpha=8.0, lora_r=4,
                 legacy: bool = False) -> dict:
    ref = to_reference_state(model, stage2)
    if legacy:
        ref = legacy_weight_norm(ref)
    task = {"_name": "speechllm_task", "lora_r": lora_r}
    if lora_alpha is not None:
        task["lora_alpha"] = lora_alpha
    torch.save({"model": ref, "cfg": {"task": task}, "args": None}, path)
    return ref


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    audio = 0.1 * torch.randn(2, 9000, generator=g)
    audio[1, 7000:] = 0
    return dict(audio=audio, audio_lengths=torch.tensor([9000, 7000]),
                pre_tokens=torch.randint(3, VOCAB, (2, 5), generator=g), pre_lengths=torch.tensor([5, 5]),
                post_tokens=torch.randint(3, VOCAB, (2, 6), generator=g), post_lengths=torch.tensor([6, 4]),
                instruction_tokens=torch.randint(3, VOCAB, (2, 4), generator=g),
                post_target_mask=torch.arange(6)[None, :] < torch.tensor([[6], [4]]),
                instruction_lengths=torch.tensor([4, 3]))


def logits(model, b):
    with torch.no_grad():
        out = model(**b)
    return out[0] if isinstance(out, tuple) else out


def load_converted(path: str) -> WavLLMModel:
    from wavllm_fairseq.models.checkpoint_io import load_checkpoint_file
    from wavllm_fairseq.models.config import WavLLMConfig

    ck = load_checkpoint_file(path)
    cfg = WavLLMConfig(**{k: v for k, v in ck["cfg"]["model"].items() if k != "_name"})
    model = WavLLMModel(cfg, VOCAB, ck["cfg"]["model"]["_name"])
    model.load_state_dict(ck["model"], strict=True)
    return model.eval()


def save_backbones(model: WavLLMModel, root: str) -> dict:
    """The tiny model's frozen backbones as Hugging Face save_pretrained directories."""
    from transformers import LlamaForCausalLM, WavLMModel, WhisperConfig, WhisperModel

    wcfg = WhisperConfig(**{**model.whisper.encoder.config.to_dict(), "decoder_layers": 1})
    whisper = WhisperModel(wcfg)
    whisper.encoder.load_state_dict(model.whisper.encoder.state_dict())
    whisper.save_pretrained(os.path.join(root, "whisper"))
    wavlm = WavLMModel(model.wavlm.wavlm.config)
    wavlm.load_state_dict(model.wavlm.wavlm.state_dict())
    wavlm.save_pretrained(os.path.join(root, "wavlm"))
    llama = LlamaForCausalLM(model.llm.config)
    base = {k.replace(".base.weight", ".weight"): v for k, v in model.llm.state_dict().items()
            if ".lora_" not in k}
    llama.load_state_dict(base)
    llama.save_pretrained(os.path.join(root, "llama"))
    return {k: os.path.join(root, k) for k in ("whisper", "wavlm", "llama")}


# ----------------------------------------------------------------------------- tests
def test_rotary_permutation_matches_meta_interleaved_rotary():
    """Meta rotates pairs (2i, 2i+1) as complex numbers; HF rotates halves. A Meta-layout q/k pair
    permuted by the converter must give the same attention scores under HF's rotary embedding."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from wavllm_fairseq.models.lora import rotary_meta_to_hf_rows

    torch.manual_seed(0)
    n_heads, h, T = 2, 8, 5
    q_meta, k_meta = torch.randn(T, n_heads * h), torch.randn(T, n_heads * h)
    # Meta: view as complex pairs, multiply by e^{i t theta_j}, theta_j = 10000^(-2j/h)
    theta = 10000.0 ** (-torch.arange(0, h, 2).float() / h)  # (h/2,)
    angles = torch.arange(T).float()[:, None] * theta[None, :]  # (T, h/2)
    rot = torch.polar(torch.ones_like(angles), angles)

    def meta_rope(x):
        xc = torch.view_as_complex(x.reshape(T, n_heads, h // 2, 2))
        return torch.view_as_real(xc * rot[:, None, :]).reshape(T, n_heads, h)

    scores_meta = torch.einsum("thd,shd->hts", meta_rope(q_meta), meta_rope(k_meta))
    idx = rotary_meta_to_hf_rows(n_heads, n_heads * h)
    q_hf = q_meta[:, idx].reshape(T, n_heads, h).transpose(0, 1)[None]  # (1, H, T, h)
    k_hf = k_meta[:, idx].reshape(T, n_heads, h).transpose(0, 1)[None]
    rope = LlamaRotaryEmbedding(LlamaConfig(hidden_size=n_heads * h, num_attention_heads=n_heads))
    cos, sin = rope(q_hf, torch.arange(T)[None])
    q_r, k_r = apply_rotary_pos_emb(q_hf, k_hf, cos, sin)
    scores_hf = torch.einsum("htd,hsd->hts", q_r[0], k_r[0])
    torch.testing.assert_close(scores_hf, scores_meta, atol=1e-5, rtol=1e-5)
    # and the test's own hf->meta inverse agrees with the converter's meta->hf order
    w = torch.randn(n_heads * h, 3)
    torch.testing.assert_close(hf_to_meta_rows(w[idx], n_heads), w)


def test_stage1_conversion_reproduces_the_model(tmp_path):
    model = tiny_model(1)
    ref = save_release(str(tmp_path / "release.pt"), model)
    summary = convert_checkpoint(str(tmp_path / "release.pt"), str(tmp_path / "ours.pt"), arch="wavllm_tiny")
    assert summary["stage"] == 1 and summary["lora_rank"] == 4 and summary["lora_alpha"] == 8.0
    assert summary["dropped"] == 0 and summary["mapped"] == len(ref)
    converted = load_converted(str(tmp_path / "ours.pt"))
    b = batch()
    torch.testing.assert_close(logits(converted, b), logits(model, b), atol=1e-5, rtol=1e-5)

    # adapters against the reference's math on its own tensors
    x = torch.randn(1, 24, 32)
    h = x.transpose(1, 2)
    for i in range(2):
        h = F.glu(F.conv1d(h, ref[f"audio_encoder.subsample.conv_layers.{i}.weight"],
                           ref[f"audio_encoder.subsample.conv_layers.{i}.bias"], stride=2, padding=1), dim=1)
    h = h.transpose(1, 2)
    up = F.linear(F.gelu(F.linear(h, ref["audio_encoder.adapter.down_layer.weight"],
                                  ref["audio_encoder.adapter.down_layer.bias"])),
                  ref["audio_encoder.adapter.up_layer.weight"], ref["audio_encoder.adapter.up_layer.bias"])
    h = h + F.layer_norm(up, (up.shape[-1],), ref["audio_encoder.adapter.layer_norm.weight"],
                         ref["audio_encoder.adapter.layer_norm.bias"])
    expected = F.linear(h, ref["audio_encoder.projector.weight"], ref["audio_encoder.projector.bias"])
    with torch.no_grad():
        got, _ = converted.semantic_adapter(x, torch.tensor([24]))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    # LoRA: v (not rotated) delta is x @ A @ B * alpha / R; q's is the same, in HF row order
    L = "gpt_model.model_llama.layers.1.attention."
    x = torch.randn(3, 64)
    attn = converted.llm.model.layers[1].self_attn
    with torch.no_grad():
        dv = attn.v_proj(x) - attn.v_proj.base(x)
        dq = attn.q_proj(x) - attn.q_proj.base(x)
    torch.testing.assert_close(dv, x @ ref[L + "wv_lora_A"] @ ref[L + "wv_lora_B"] * 2.0, atol=1e-5, rtol=1e-5)
    dq_meta = x @ ref[L + "wq_lora_A"] @ ref[L + "wq_lora_B"] * 2.0
    torch.testing.assert_close(hf_to_meta_rows(dq.t(), HEADS).t(), dq_meta, atol=1e-5, rtol=1e-5)


def test_stage2_scale_follows_meta_rows(tmp_path):
    """Stage 2: the reference computes (x @ A @ B) * r on Meta-ordered q outputs; the converted model
    (lora_scale_layout=meta) must give the same delta, in HF row order."""
    model = tiny_model(2, stage2=True)
    ref = save_release(str(tmp_path / "release.pt"), model, stage2=True)
    summary = convert_checkpoint(str(tmp_path / "release.pt"), str(tmp_path / "ours.pt"), arch="wavllm_tiny")
    assert summary["stage"] == 2
    converted = load_converted(str(tmp_path / "ours.pt"))
    assert converted.cfg.lora_scale_layout == "meta" and converted.prompt_scale is not None
    torch.manual_seed(3)
    r = torch.rand(2, 64) * 3  # a per-utterance scale as the prompt adapter makes it
    x = torch.randn(2, 5, 64)
    L = "gpt_model.model_llama.layers.0.attention."
    q = converted.llm.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.scale_vector = r
        dq = q(x) - q.base(x)
        q.scale_vector = None
    dq_meta = (x @ ref[L + "wq_lora_A"] @ ref[L + "wq_lora_B"]) * r[:, None, :]
    got_meta = hf_to_meta_rows(dq.reshape(-1, 64).t(), HEADS).t().reshape(2, 5, 64)
    torch.testing.assert_close(got_meta, dq_meta, atol=1e-5, rtol=1e-5)
    # v is not rotated: r applies feature by feature as stored
    v = converted.llm.model.layers[0].self_attn.v_proj
    with torch.no_grad():
        v.scale_vector = r
        dv = v(x) - v.base(x)
        v.scale_vector = None
    torch.testing.assert_close(dv, (x @ ref[L + "wv_lora_A"] @ ref[L + "wv_lora_B"]) * r[:, None, :],
                               atol=1e-5, rtol=1e-5)
    # the prompt adapter's tensors came over unchanged; the full model runs
    torch.testing.assert_close(converted.prompt_scale.down.weight, ref["gpt_model.model_llama.scale_fc_1.weight"])
    assert torch.isfinite(logits(converted, batch())).all()


def test_backbone_directories_are_dropped_and_checked(tmp_path):
    model = tiny_model(4)
    save_release(str(tmp_path / "release.pt"), model)
    dirs = save_backbones(model, str(tmp_path))
    summary = convert_checkpoint(str(tmp_path / "release.pt"), str(tmp_path / "ours.pt"), arch="wavllm_tiny",
                                 whisper_path=dirs["whisper"], wavlm_path=dirs["wavlm"], llama_path=dirs["llama"])
    assert summary["dropped"] > 0 and set(summary["backbones_checked"]) == {"whisper", "wavlm", "llm"}
    ck = torch.load(str(tmp_path / "ours.pt"), weights_only=False)
    assert not any(k.startswith(("whisper.", "wavlm.")) for k in ck["model"])
    assert not any(k.startswith("llm.") and ".lora_" not in k for k in ck["model"])
    converted = load_converted(str(tmp_path / "ours.pt"))  # backbones reload from the directories
    b = batch()
    torch.testing.assert_close(logits(converted, b), logits(model, b), atol=1e-5, rtol=1e-5)

    # a different LLaMA in the directory: the LoRA would be applied to other weights -> refused
    from transformers import LlamaForCausalLM

    other = LlamaForCausalLM.from_pretrained(dirs["llama"])
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight.add_(0.5)
    other.save_pretrained(dirs["llama"])
    with pytest.raises(CheckpointError, match=r"layers\.0\.mlp\.up_proj\.weight: differs"):
        convert_checkpoint(str(tmp_path / "release.pt"), str(tmp_path / "bad.pt"), arch="wavllm_tiny",
                           whisper_path=dirs["whisper"], wavlm_path=dirs["wavlm"], llama_path=dirs["llama"])
    assert not os.path.exists(tmp_path / "bad.pt")


@pytest.mark.parametrize("legacy", [True, False], ids=["weight_g/weight_v", "parametrizations"])
@pytest.mark.parametrize("with_wavlm_path", [False, True], ids=["wavlm in checkpoint", "--wavlm-path"])
def test_wavlm_weight_norm_names_of_both_torch_eras_convert(tmp_path, legacy, with_wavlm_path):
    """A release saved by torch 2.0.1 (the reference's pin) names WavLM's positional conv weight_g / weight_v,
    a later torch parametrizations.weight.original0/1: both convert with the backbone check on, the result
    loads strictly and computes the original model's logits."""
    model = tiny_model(7)
    ref = save_release(str(tmp_path / "release.pt"), model, legacy=legacy)
    assert any(k.endswith("conv.weight_g") for k in ref) == legacy
    paths = {}
    if with_wavlm_path:
        paths["wavlm_path"] = save_backbones(model, str(tmp_path))["wavlm"]
    summary = convert_checkpoint(str(tmp_path / "release.pt"), str(tmp_path / "ours.pt"), arch="wavllm_tiny",
                                 **paths)
    ck = torch.load(str(tmp_path / "ours.pt"), weights_only=False)
    assert not any(k.endswith(("weight_g", "weight_v")) for k in ck["model"])
    if with_wavlm_path:
        assert summary["backbones_checked"]["wavlm"] > 0 and not any(k.startswith("wavlm.") for k in ck["model"])
        assert any("pos_conv_embed.conv.weight_g" in line for line in summary["report"]["dropped"]) == legacy
    else:
        assert "wavlm.wavlm.encoder.pos_conv_embed.conv.parametrizations.weight.original0" in ck["model"]
    converted = load_converted(str(tmp_path / "ours.pt"))  # strict
    b = batch()
    torch.testing.assert_close(logits(converted, b), logits(model, b), atol=1e-5, rtol=1e-5)


def test_a_wavlm_folder_differing_from_the_legacy_named_release_is_refused(tmp_path):
    """The backbone check compares the legacy-named release tensors with the folder's, under one naming."""
    model = tiny_model(8)
    save_release(str(tmp_path / "release.pt"), model, legacy=True)
    dirs = save_backbones(model, str(tmp_path))
    from transformers import WavLMModel

    other = WavLMModel.from_pretrained(dirs["wavlm"])
    with torch.no_grad():
        other.encoder.pos_conv_embed.conv.parametrizations.weight.original1.add_(0.5)
    other.save_pretrained(dirs["wavlm"])
    with pytest.raises(CheckpointError, match=r"pos_conv_embed\.conv\.parametrizations\.weight\.original1: differs"):
        convert_checkpoint(str(tmp_path / "release.pt"), str(tmp_path / "bad.pt"), arch="wavllm_tiny",
                           wavlm_path=dirs["wavlm"])


def test_recorded_lora_r_is_checked_in_stage_1_only(tmp_path):
    """Stage 1 scales LoRA by alpha / r: a task config whose lora_r is not the tensors' rank is refused. Stage 2
    scales it by the prompt adapter's r only, so the same record converts (and the model is unchanged)."""
    stage1 = tiny_model(9)
    save_release(str(tmp_path / "s1.pt"), stage1, lora_r=8)
    with pytest.raises(CheckpointError, match="lora_r=8 but the LoRA tensors have rank 4"):
        convert_checkpoint(str(tmp_path / "s1.pt"), str(tmp_path / "x.pt"), arch="wavllm_tiny")
    assert not os.path.exists(tmp_path / "x.pt")
    stage2 = tiny_model(10, stage2=True)
    save_release(str(tmp_path / "s2.pt"), stage2, stage2=True, lora_r=8)
    summary = convert_checkpoint(str(tmp_path / "s2.pt"), str(tmp_path / "ours.pt"), arch="wavllm_tiny")
    assert summary["stage"] == 2 and summary["lora_rank"] == 4
    b = batch()
    torch.testing.assert_close(logits(load_converted(str(tmp_path / "ours.pt")), b), logits(stage2, b),
                               atol=1e-5, rtol=1e-5)


def test_unmatched_keys_and_missing_alpha_fail_clearly(tmp_path):
    model = tiny_model(5)
    ref = to_reference_state(model)
    torch.save({"model": {**ref, "gpt_model.model_llama.mystery.weight": torch.zeros(2)}}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=r"1 source keys have no mapping: gpt_model\.model_llama\.mystery"):
        convert_checkpoint(str(tmp_path / "odd.pt"), str(tmp_path / "x.pt"), arch="wavllm_tiny", lora_alpha=8.0)
    save_release(str(tmp_path / "noalpha.pt"), model, lora_alpha=None)
    with pytest.raises(CheckpointError, match="lora_alpha"):
        convert_checkpoint(str(tmp_path / "noalpha.pt"), str(tmp_path / "x.pt"), arch="wavllm_tiny")
    # a missing tensor fails the strict load into the target model
    del ref["wavlm_audio_proj.bias"]
    torch.save({"model": ref}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"projector\.bias"):
        convert_checkpoint(str(tmp_path / "partial.pt"), str(tmp_path / "x.pt"), arch="wavllm_tiny", lora_alpha=8.0)
    assert not os.path.exists(tmp_path / "x.pt")


def test_cli_and_python_api(tmp_path, capsys):
    """The console entry point on a release with local directories, then WavLLM.from_pretrained on its
    output answers exactly as the original model does."""
    import shutil

    from helpers import WORDS

    from wavllm_fairseq import WavLLM
    from wavllm_fairseq.data.prompt_template import DEFAULT_SYSTEM_PROMPT
    from wavllm_fairseq.data.tokenizer import TOKENIZER_FILE, train_sentencepiece

    tok = train_sentencepiece([" ".join(WORDS), "What is said?", DEFAULT_SYSTEM_PROMPT] * 5,
                              str(tmp_path / "tok"), vocab_size=300)
    model = tiny_model(6, vocab=len(tok))
    save_release(str(tmp_path / "release.pt"), model)
    dirs = save_backbones(model, str(tmp_path))
    shutil.copy(tmp_path / "tok" / TOKENIZER_FILE, os.path.join(dirs["llama"], TOKENIZER_FILE))
    rc = main([str(tmp_path / "release.pt"), str(tmp_path / "ours.pt"), "--arch", "wavllm_tiny", "-v",
               "--whisper-path", dirs["whisper"], "--wavlm-path", dirs["wavlm"], "--llama-path", dirs["llama"]])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "stage 1 checkpoint" in out and "backbone tensors equal to the local directories" in out
    assert ("mapped  gpt_model.model_llama.layers.0.attention.wq_lora_A"
            " -> llm.model.layers.0.self_attn.q_proj.lora_A.weight") in out

    api = WavLLM.from_pretrained(str(tmp_path / "ours.pt"))
    direct = WavLLM(model, api.task)
    g = torch.Generator().manual_seed(0)
    audios = [(0.1 * torch.randn(8000, generator=g)).numpy(), (0.1 * torch.randn(12000, generator=g)).numpy()]
    prompts = ["What is said?", "Describe the speaker."]
    assert api.generate(audios, prompts, max_len_b=8) == direct.generate(audios, prompts, max_len_b=8)

    # errors go to stderr with exit code 1, no traceback
    rc = main([str(tmp_path / "missing.pt"), str(tmp_path / "x.pt")])
    assert rc == 1 and "missing.pt" in capsys.readouterr().err


def test_convert_state_dict_strips_wrappers():
    w = torch.randn(8, 8)
    out, report = convert_state_dict({"module.wavlm_audio_proj.weight": w}, n_heads=2)
    assert list(out) == ["projector.weight"] and torch.equal(out["projector.weight"], w)
    assert report["unmatched"] == []


def test_converted_model_gets_the_references_decode_inputs(tmp_path):
    """The reference's generator feeds <s> where ' </SPEECH>' starts (its token buffer starts with <s>,
    wavllm/inference/sequence_generator.py line 323, and the forced prompt continues from the second
    token); its prompt adapter reads '"' + instruction + '"' (speechllm_dataset.py line 319). The
    converted config asks for both; training-time forward is unaffected."""
    model = tiny_model(2, stage2=True)
    save_release(str(tmp_path / "release.pt"), model, stage2=True)
    convert_checkpoint(str(tmp_path / "release.pt"), str(tmp_path / "ours.pt"), arch="wavllm_tiny")
    converted = load_converted(str(tmp_path / "ours.pt"))
    assert converted.cfg.decode_bos_after_speech
    b = dict(batch(), prompt_post_lengths=torch.tensor([3, 2]))
    emb = converted.llm.get_input_embeddings().weight
    bos = converted.llm.config.bos_token_id
    with torch.no_grad():
        prefix = converted.build_generation_prefix(b)
        converted.cfg.decode_bos_after_speech = False
        plain = converted.build_generation_prefix(b)
        off = logits(converted, b)
        converted.cfg.decode_bos_after_speech = True
        on = logits(converted, b)
    L = prefix.embeds.shape[1]
    for row, n_post in enumerate(b["prompt_post_lengths"].tolist()):
        first = L - n_post  # left-padded: the prompt's post tokens end the prefix
        torch.testing.assert_close(prefix.embeds[row, first], emb[bos])
        torch.testing.assert_close(plain.embeds[row, first], emb[b["post_tokens"][row, 0]])
        torch.testing.assert_close(prefix.embeds[row, first + 1:], plain.embeds[row, first + 1:])
    torch.testing.assert_close(on, off)
