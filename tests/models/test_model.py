"""The WavLLM model on wavllm_tiny: strides, LoRA identities, prompt adapter masking, freezing, save/load."""
import os

import pytest
import torch

from wavllm_fairseq.models.adapters import ModalityAdapter, conv_out_len
from wavllm_fairseq.errors import CheckpointError
from wavllm_fairseq.models.lora import LoRALinear, lora_disabled, lora_modules
from wavllm_fairseq.models.wavllm import WavLLMModel
from wavllm_fairseq.models.prompt_adapter import PromptAwareLoRAScale

VOCAB = 100


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return WavLLMModel.from_arch("wavllm_tiny", vocab_size=VOCAB, **kw)


def make_batch(audio_lengths, pre=(5, 5, 5), post=(6, 9, 4), n_target=(3, 4, 2), seed=0):
    """A right-padded batch dict as the collater makes it (see dataset.py)."""
    g = torch.Generator().manual_seed(seed)
    B = len(audio_lengths)
    T = max(max(audio_lengths), 1)
    audio = torch.zeros(B, T)
    for b, n in enumerate(audio_lengths):
        audio[b, :n] = 0.1 * torch.randn(n, generator=g)
    P, Q = max(pre[:B]), max(post[:B])
    pre_t = torch.zeros(B, P, dtype=torch.long)
    post_t = torch.zeros(B, Q, dtype=torch.long)
    tmask = torch.zeros(B, Q, dtype=torch.bool)
    for b in range(B):
        pre_t[b, : pre[b]] = torch.randint(3, VOCAB, (pre[b],), generator=g)
        post_t[b, : post[b]] = torch.randint(3, VOCAB, (post[b],), generator=g)
        tmask[b, post[b] - n_target[b]: post[b]] = True
    instr = torch.randint(3, VOCAB, (B, 4), generator=g)
    return dict(audio=audio, audio_lengths=torch.tensor(audio_lengths), pre_tokens=pre_t,
                pre_lengths=torch.tensor(pre[:B]), post_tokens=post_t, post_lengths=torch.tensor(post[:B]),
                post_target_mask=tmask, instruction_tokens=instr, instruction_lengths=torch.tensor([4, 3, 2][:B]))


@pytest.mark.parametrize("n_samples", [1, 319, 320, 1600, 16000, 16001, 23457, 48000])
def test_speech_frames_80ms_stride(n_samples):
    model = tiny().eval()
    with torch.no_grad():
        x, lengths = model.encode_speech(0.1 * torch.randn(1, n_samples), torch.tensor([n_samples]))
    predicted = model.speech_frames(torch.tensor([n_samples]))
    assert int(lengths[0]) == int(predicted[0]) == x.shape[1]
    # 80 ms = 1280 samples per frame (both branches at 20 ms, two stride-2 convs)
    assert abs(int(lengths[0]) - n_samples / 1280) <= 1.5
    assert x.shape[2] == model.llm_dim


def test_conv_length_formula_matches_convolution():
    adapter = ModalityAdapter(8, 8, 8, 4, 6)
    for n in [1, 2, 3, 4, 5, 17, 64, 101]:
        y, lengths = adapter(torch.randn(1, n, 8), torch.tensor([n]))
        assert y.shape[1] == int(lengths[0]) == int(conv_out_len(conv_out_len(torch.tensor(n))))


def test_long_audio_is_chunked_not_truncated():
    model = tiny().eval()
    window_samples = model.whisper.window * model.whisper.hop_length  # 2 s for wavllm_tiny
    n = int(2.6 * window_samples)
    with torch.no_grad():
        sem, lengths = model.whisper(0.1 * torch.randn(1, n), torch.tensor([n]))
    assert sem.shape[1] == int(lengths[0]) == (n // 160 + 1) // 2


def test_batch_has_mixed_lengths_and_text_only_rows():
    model = tiny().eval()
    batch = make_batch([16000, 8000, 0])
    logits, target, rows = model(**batch)
    assert logits.shape == (9, VOCAB)
    assert rows.tolist() == [0] * 3 + [1] * 4 + [2] * 2
    assert torch.equal(target, batch["post_tokens"][batch["post_target_mask"]])


def test_target_logits_equal_full_sequence_logits_at_their_positions():
    model = tiny().eval()
    batch = make_batch([16000, 8000, 0])
    logits, _, _ = model(**batch)
    x, mask, post_start = model.assemble(batch, left_pad=False)
    with torch.no_grad():
        full = model.llm(inputs_embeds=x, attention_mask=mask).logits  # (B, L, V)
    # row 1: its targets are the last 4 of 9 post tokens -> predicted from positions start+5-1 .. start+8-1
    s = int(post_start[1])
    assert torch.allclose(logits[3:7], full[1, s + 4: s + 8], atol=1e-5)


def test_right_padding_does_not_change_a_row():
    model = tiny().eval()
    batch = make_batch([16000, 8000, 0])
    logits, _, rows = model(**batch)
    single = {k: (v[1:2] if torch.is_tensor(v) else v) for k, v in batch.items()}
    single["audio"] = single["audio"][:, :8000]
    single["post_tokens"] = single["post_tokens"][:, :9]
    single["post_target_mask"] = single["post_target_mask"][:, :9]
    alone, _, _ = model(**single)
    assert torch.allclose(alone, logits[rows == 1], atol=1e-4)


def test_lora_with_zero_B_is_exactly_the_frozen_model():
    model = tiny().eval()
    x = torch.randn(2, 7, model.llm_dim)
    with torch.no_grad():
        with_lora = model.llm.model(inputs_embeds=x).last_hidden_state
        with lora_disabled(model.llm):
            base = model.llm.model(inputs_embeds=x).last_hidden_state
        with model.lora_scale_context(torch.rand(2, model.llm_dim) * 3):
            scaled = model.llm.model(inputs_embeds=x).last_hidden_state
    assert torch.equal(with_lora, base)
    assert torch.equal(scaled, base)


def test_lora_merge_equals_unmerged_and_unmerge_restores():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(16, 12), rank=4, alpha=8.0).eval()
    torch.nn.init.normal_(layer.lora_B.weight)
    base_w = layer.base.weight.clone()
    x = torch.randn(3, 5, 16)
    unmerged = layer(x)
    layer.merge()
    assert torch.allclose(layer(x), unmerged, atol=1e-5)
    assert not torch.allclose(layer.base.weight, base_w)
    layer.unmerge()
    assert torch.allclose(layer.base.weight, base_w, atol=1e-6)
    # the documented formula, by hand
    expected = x @ base_w.T + layer.base.bias + (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T) * 2.0
    assert torch.allclose(unmerged, expected, atol=1e-5)


def test_model_merge_lora_keeps_logits():
    model = tiny().eval()
    for m in lora_modules(model.llm):
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    batch = make_batch([16000, 8000, 0])
    before, _, _ = model(**batch)
    assert model.merge_lora() == 8
    merged, _, _ = model(**batch)
    model.unmerge_lora()
    after, _, _ = model(**batch)
    assert torch.allclose(before, merged, atol=1e-4)
    assert torch.allclose(before, after, atol=1e-5)


def test_per_utterance_scale_formula():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(8, 8, bias=False), rank=2, alpha=2.0).eval()
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 3, 8)
    r = torch.rand(2, 8)
    layer.scale_vector = r
    got = layer(x)
    delta = x @ layer.lora_A.weight.T @ layer.lora_B.weight.T  # (B, T, 8)
    assert torch.allclose(got, layer.base(x) + delta * r[:, None, :], atol=1e-6)


def test_grouped_query_key_value_projections_read_the_scale_averaged_over_each_query_group():
    """GQA (LLaMA-3, SmolLM2): r is as wide as q/o; a k/v projection with n_kv heads scales head j by the
    mean of r over the query heads that share it; with one query head per group that is r itself."""
    torch.manual_seed(0)
    heads, kv, h = 6, 2, 4
    layer = LoRALinear(torch.nn.Linear(8, kv * h, bias=False), rank=2, alpha=2.0).eval()
    torch.nn.init.normal_(layer.lora_B.weight)
    layer.share_scale_over_query_groups(heads // kv, h)
    x, r = torch.randn(2, 3, 8), torch.rand(2, heads * h)
    layer.scale_vector = r
    got = layer(x)
    delta = x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    # query heads 0-2 share kv head 0, 3-5 kv head 1
    r_kv = torch.stack([r.view(2, heads, h)[:, 3 * j: 3 * j + 3].mean(1) for j in range(kv)], 1).reshape(2, -1)
    assert torch.allclose(got, layer.base(x) + delta * r_kv[:, None, :], atol=1e-6)
    with pytest.raises(ValueError, match=r"LoRA scale must be \(batch=2, 24\)"):
        layer.scale_vector = r[:, : kv * h]  # a k/v-wide scale is the wrong width here
        layer(x)


def _save_gqa_llama(path, vocab=VOCAB):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(11)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=vocab, max_position_embeddings=512, bos_token_id=1,
                      eos_token_id=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def test_stage2_on_a_grouped_query_llm_trains_and_starts_where_stage1_ended(tmp_path):
    """The small real recipe's LLM (SmolLM2: 9 query heads, 3 key/value heads) has k/v projections a third
    as wide as r; stage 2 once stopped there ('LoRA scale must be (batch=4, 192), got (4, 576)'). On a
    GQA LLM stage 2 trains (every trainable tensor gets a gradient, with and without activation
    checkpointing alike) and, with the stage-1 init of the prompt adapter, computes stage 1's logits."""
    llama = _save_gqa_llama(tmp_path / "gqa")
    s1 = tiny(seed=4, llama_path=llama, lora_dropout=0.0).eval()
    for m in lora_modules(s1.llm):
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    assert s1.llm.model.layers[0].self_attn.k_proj.out_features == 32  # 2 kv heads of 16
    s2 = tiny(seed=5, llama_path=llama, prompt_adapter=True, lora_dropout=0.0).eval()
    s2.load_state_dict(s1.state_dict())
    batch = make_batch([16000, 8000, 0])
    with torch.no_grad():
        torch.testing.assert_close(s2(**batch)[0], s1(**batch)[0], atol=1e-5, rtol=1e-5)
    grads = []
    for ckpt in (False, True):
        model = tiny(seed=7, llama_path=llama, prompt_adapter=True, prompt_adapter_init="random",
                     activation_checkpointing=ckpt, lora_dropout=0.0).train()
        for m in lora_modules(model.llm):
            torch.nn.init.normal_(m.lora_B.weight, std=0.02, generator=torch.Generator().manual_seed(1))
        logits, target, _ = model(**batch)
        torch.nn.functional.cross_entropy(logits, target).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for n, g in grads[0].items():
        assert g is not None and g.abs().sum() > 0, n
        torch.testing.assert_close(grads[1][n], g, atol=1e-6, rtol=1e-5, msg=n)


def test_prompt_adapter_ignores_padding():
    torch.manual_seed(0)
    pa = PromptAwareLoRAScale(dim=16, hidden_dim=8, clamp_max=None)
    t = torch.randn(1, 5, 16)
    r1 = pa(t, torch.ones(1, 5, dtype=torch.bool))
    padded = torch.cat([t, 100 * torch.randn(1, 3, 16)], dim=1)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    r2 = pa(padded, mask)
    assert torch.allclose(r1, r2, atol=1e-6)
    # by hand
    o = pa.up(torch.nn.functional.gelu(pa.down(t)))
    a = torch.softmax(pa.attention(o).squeeze(-1), dim=1)
    assert torch.allclose(r1, (a[..., None] * o).sum(1), atol=1e-6)
    clamped = PromptAwareLoRAScale(16, 8, clamp_max=3.0)
    clamped.load_state_dict(pa.state_dict())
    assert torch.allclose(clamped(t, mask[:, :5]), r1.relu().clamp(max=3.0))


def test_prompt_scale_from_model_ignores_instruction_padding():
    model = tiny(prompt_adapter=True, prompt_adapter_init="random").eval()
    instr = torch.randint(3, VOCAB, (1, 4))
    r1 = model.prompt_lora_scale(instr, torch.tensor([4]))
    r2 = model.prompt_lora_scale(torch.cat([instr, torch.zeros(1, 3, dtype=torch.long)], 1), torch.tensor([4]))
    assert r1.shape == (1, model.llm_dim)
    assert torch.allclose(r1, r2, atol=1e-5)


def _last_layer_states(model, ids):
    from wavllm_fairseq.models.lora import lora_disabled

    with torch.no_grad(), lora_disabled(model.llm):
        cap = {}  # the last decoder layer's output, before the final norm
        hook = model.llm.model.layers[-1].register_forward_hook(
            lambda m, i, o: cap.__setitem__("h", o[0] if isinstance(o, tuple) else o))
        model.llm.model(input_ids=ids)
        hook.remove()
    return cap["h"]


def test_prompt_scale_pools_every_position_of_the_references_input():
    """Default (the reference's, speechllm_model/llama.py forward_generate): the adapter reads
    '"' + instruction + '"' without <s> and pools every position of it."""
    torch.manual_seed(1)
    model = tiny(prompt_adapter=True, prompt_adapter_init="random").eval()
    assert model.cfg.prompt_adapter_input == "reference"
    instr = torch.randint(3, VOCAB, (1, 5))
    with torch.no_grad():
        expected = model.prompt_scale(_last_layer_states(model, instr), torch.ones(1, 5, dtype=torch.bool))
        got = model.prompt_lora_scale(instr, torch.tensor([5]))
    torch.testing.assert_close(got, expected)


def test_prompt_scale_of_older_checkpoints_pools_the_instruction_not_bos():
    """prompt_adapter_input=bos_instruction (checkpoints of older versions): the batch's
    legacy_instruction_tokens (<s> + instruction) are read; r pools the instruction's own positions (all of
    them, <s> included, only for an empty instruction or with prompt_adapter_pool_bos)."""
    torch.manual_seed(1)
    for pool_bos in (False, True):
        model = tiny(prompt_adapter=True, prompt_adapter_init="random", prompt_adapter_pool_bos=pool_bos,
                     prompt_adapter_input="bos_instruction").eval()
        bos = model.llm.config.bos_token_id
        instr = torch.cat([torch.tensor([[bos]]), torch.randint(3, VOCAB, (1, 4))], 1)
        quoted = torch.randint(3, VOCAB, (1, 6))  # the reference form in the same batch is not read
        with torch.no_grad():
            first = 0 if pool_bos else 1
            expected = model.prompt_scale(_last_layer_states(model, instr)[:, first:],
                                          torch.ones(1, 5 - first, dtype=torch.bool))
            got = model.prompt_lora_scale(quoted, torch.tensor([6]), {"legacy_instruction_tokens": instr,
                                                                      "legacy_instruction_lengths": torch.tensor([5])})
            only_bos = model.prompt_lora_scale(quoted, torch.tensor([6]), {
                "legacy_instruction_tokens": instr[:, :1], "legacy_instruction_lengths": torch.tensor([1])})
        torch.testing.assert_close(got, expected)
        assert torch.isfinite(only_bos).all()


def test_stage2_starts_where_stage1_ended():
    """prompt_adapter_init=stage1_scale: r == alpha/R for every prompt, so the stage-2 model computes
    exactly the stage-1 model's logits before its first update."""
    s1 = tiny(seed=4, lora_dropout=0.0).eval()
    for m in lora_modules(s1.llm):
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    s2 = tiny(seed=5, prompt_adapter=True, lora_dropout=0.0).eval()
    s2.load_state_dict(s1.state_dict())  # the prompt adapter stays fresh
    batch = make_batch([16000, 8000, 0])
    with torch.no_grad():
        r = s2.prompt_lora_scale(batch["instruction_tokens"], batch["instruction_lengths"])
        l1, _, _ = s1(**batch)
        l2, _, _ = s2(**batch)
    assert torch.all(r == s1.cfg.lora_alpha / s1.cfg.lora_rank)
    torch.testing.assert_close(l2, l1, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stage", [1, 2])
def test_frozen_parameters_get_no_gradient(stage):
    # random prompt-adapter init: with the default one P_d and W_A get exactly zero gradients until
    # P_u has moved (as LoRA's A does while B = 0)
    model = tiny(prompt_adapter=(stage == 2), prompt_adapter_init="random")
    model.train()
    for m in lora_modules(model.llm):  # make every trainable tensor reachable by the gradient
        torch.nn.init.normal_(m.lora_B.weight, std=0.02)
    logits, target, _ = model(**make_batch([16000, 8000, 0]))
    torch.nn.functional.cross_entropy(logits, target).backward()
    groups = {"whisper.": False, "wavlm.": False, "semantic_adapter.": True, "acoustic_adapter.": True,
              "projector.": True, "prompt_scale.": True}
    seen_trainable = 0
    for name, p in model.named_parameters():
        is_lora = ".lora_A." in name or ".lora_B." in name
        trainable = is_lora or any(name.startswith(k) and v for k, v in groups.items())
        assert p.requires_grad == trainable, name
        if trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            seen_trainable += 1
        else:
            assert p.grad is None, name
    assert seen_trainable == len([1 for p in model.parameters() if p.requires_grad])
    if stage == 2:
        assert any(n.startswith("prompt_scale.") for n, p in model.named_parameters() if p.requires_grad)


def test_freeze_lora_trains_only_the_prompt_adapter_and_adapters():
    """freeze_lora (stage 2 that trains the prompt adapter over a fixed LoRA): LoRA is its own frozen group
    (this raised a KeyError before it had a group) and gets no gradient."""
    from wavllm_fairseq.models.trainability import trainable_groups

    model = tiny(prompt_adapter=True, freeze_lora=True)
    groups = trainable_groups(model)
    assert "lora" not in groups and groups["frozen:lora"]
    assert not any(p.requires_grad for _, p in groups["frozen:lora"])
    assert all(p.requires_grad for _, p in groups["prompt_adapter"])
    logits, target, _ = model.train()(**make_batch([16000, 8000, 0]))
    torch.nn.functional.cross_entropy(logits, target).backward()
    assert all(p.grad is None for _, p in groups["frozen:lora"])


def test_save_and_load_gives_identical_logits(tmp_path):
    model = tiny(seed=1).eval()
    for m in lora_modules(model.llm):
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    batch = make_batch([16000, 8000, 0])
    ref, _, _ = model(**batch)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    other = tiny(seed=2).eval()
    other.load_state_dict(torch.load(tmp_path / "m.pt"))
    out, _, _ = other(**batch)
    assert torch.equal(ref, out)


def _save_tiny_backbones(root, model):
    from transformers import WhisperConfig, WhisperModel

    cfg = model.whisper.encoder.config
    full = WhisperModel(WhisperConfig(**{**cfg.to_dict(), "decoder_layers": 1}))
    full.encoder.load_state_dict(model.whisper.encoder.state_dict())
    full.save_pretrained(root / "whisper")
    model.wavlm.wavlm.save_pretrained(root / "wavlm")
    from transformers import LlamaForCausalLM

    llm = LlamaForCausalLM(model.llm.config)
    with lora_disabled(model.llm):
        state = {k.replace(".base.", "."): v for k, v in model.llm.state_dict().items() if "lora_" not in k}
    llm.load_state_dict(state)
    llm.save_pretrained(root / "llama")


def test_backbones_load_from_save_pretrained_dirs(tmp_path):
    src = tiny(seed=3).eval()
    _save_tiny_backbones(tmp_path, src)
    paths = dict(whisper_path=str(tmp_path / "whisper"), wavlm_path=str(tmp_path / "wavlm"),
                 llama_path=str(tmp_path / "llama"))
    model = tiny(seed=4, **paths).eval()
    for name in ["whisper.encoder.layers.0.fc1.weight", "wavlm.wavlm.encoder.layers.1.feed_forward.output_dense.weight",
                 "llm.model.layers.1.self_attn.q_proj.base.weight", "llm.lm_head.weight"]:
        assert torch.equal(dict(src.named_parameters())[name], dict(model.named_parameters())[name]), name
    # checkpoints hold what cannot be reloaded from the directories: adapters, projector, LoRA
    state = model.state_dict()
    assert not any(k.startswith(("whisper.", "wavlm.")) for k in state)
    assert any(".lora_A." in k for k in state) and not any(".base.weight" in k for k in state)
    model.semantic_adapter.out_proj.bias.data.fill_(0.5)
    again = tiny(seed=5, **paths).eval()
    again.load_state_dict(model.state_dict())
    batch = make_batch([16000, 8000, 0])
    assert torch.equal(model(**batch)[0], again(**batch)[0])


def test_missing_backbone_file_names_it(tmp_path):
    src = tiny(seed=3)
    _save_tiny_backbones(tmp_path, src)
    os.remove(tmp_path / "wavlm" / "model.safetensors")
    with pytest.raises(CheckpointError, match="no weights in .*wavlm"):
        tiny(wavlm_path=str(tmp_path / "wavlm"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="config.json"):
        tiny(llama_path=str(tmp_path / "empty"))


def test_load_reports_mismatches_and_fresh_prompt_adapter(caplog):
    stage1 = tiny(seed=1)
    stage2 = tiny(seed=2, prompt_adapter=True)
    stage2.load_state_dict(stage1.state_dict())  # stage 2 from a stage-1 checkpoint: allowed, reported
    assert "initialised fresh" in caplog.text
    bad = dict(stage1.state_dict())
    bad["projector.weight"] = torch.zeros(3, 3)
    bad["something.else"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="something.else"):
        tiny().load_state_dict(bad)


def test_bf16_autocast_forward_is_close_to_fp32():
    model = tiny(seed=6).eval()
    for m in lora_modules(model.llm):  # a LoRA update of the size training gives (A is ~U(+-1/sqrt(R)))
        torch.nn.init.normal_(m.lora_B.weight, std=0.005)
    batch = make_batch([16000, 8000, 0])
    ref, _, _ = model(**batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _, _ = model(**batch)
    assert low.dtype == torch.bfloat16
    rel = (low.float() - ref).norm() / ref.norm()
    assert rel < 0.05, float(rel)
    assert (low.float().argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("stage", [1, 2])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(stage):
    """Recomputing the LLM layers in backward must see the forward's LoRA state: in stage 2 the
    per-utterance scale r is set by a context that has exited by then (it once recomputed with
    alpha/R: a different graph, and torch raised 'a different number of tensors was saved').
    LoRA dropout is on, so the recomputation must also replay the forward's random mask."""
    results = []
    for ckpt in (False, True):
        model = tiny(seed=7, activation_checkpointing=ckpt, lora_dropout=0.1, prompt_adapter=(stage == 2),
                     prompt_adapter_init="random")
        model.train()
        for m in lora_modules(model.llm):
            torch.nn.init.normal_(m.lora_B.weight, std=0.02, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(3)  # the same dropout masks in both runs
        logits, target, _ = model(**make_batch([16000, 8000, 0]))
        loss = torch.nn.functional.cross_entropy(logits, target)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (loss0, g0), (loss1, g1) = results
    assert torch.equal(loss0, loss1)
    assert g0.keys() == g1.keys()
    if stage == 2:
        assert any(n.startswith("prompt_scale.") for n in g0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-5, msg=n)
        assert g0[n].abs().sum() > 0, n  # every trainable tensor is reached


def test_checkpoint_context_reinstalls_the_forward_lora_state():
    """The recomputation context sets each LoRA layer's (scale, enabled) to what the forward saw and
    puts back what was there after."""
    from wavllm_fairseq.models.lora import checkpoint_context_fn, lora_scale_context

    model = tiny(prompt_adapter=True)
    llm = model.llm
    mods = list(lora_modules(llm))
    fn = checkpoint_context_fn(llm)
    r = torch.rand(2, model.llm_dim)
    with lora_scale_context(llm, r):
        _, recompute = fn()
    assert all(m.scale_vector is None for m in mods)
    with recompute:
        assert all(m.scale_vector is r and m.enabled for m in mods)
    assert all(m.scale_vector is None for m in mods)


def test_the_unused_reference_projector_is_held_frozen_but_counted():
    """wavllm_7b holds the reference's Whisper-only projector, unused while WavLM is on: it is counted
    in the paper's trainable 76.6 M, but gets no gradient, so it is not optimised."""
    from wavllm_fairseq.tools.count_params import PAPER_STAGE1_TRAINABLE, count

    res = count("wavllm_7b", 1)
    model = res["model"]
    assert res["trainable"] == PAPER_STAGE1_TRAINABLE
    unused = model.semantic_only_projector
    assert res["trainable"] - res["optimised"] == sum(p.numel() for p in unused.parameters())
    assert not any(p.requires_grad for p in unused.parameters())
    assert "semantic_only_projector.weight" in model.state_dict()


def test_configs_saved_by_older_versions_get_the_behaviour_they_were_trained_with():
    from omegaconf import OmegaConf

    from wavllm_fairseq.models.config import WavLLMConfig, complete_model_cfg

    old = OmegaConf.create({"_name": "wavllm_tiny", "lora_rank": 4, "lora_alpha": 8.0})
    OmegaConf.set_struct(old, True)  # as fairseq hands it over
    complete_model_cfg(old)
    assert old.bottleneck_norm == "pre" and old.prompt_adapter_pool_bos is True
    assert old.prompt_adapter_input == "bos_instruction" and old.decode_bos_after_speech is False
    assert old.prompt_adapter_init == WavLLMConfig.prompt_adapter_init and old.lora_scale_layout == "hf"
    new = {"bottleneck_norm": "post", "prompt_adapter_pool_bos": False}
    complete_model_cfg(new)
    assert new["bottleneck_norm"] == "post" and new["prompt_adapter_pool_bos"] is False


def test_layer_norm_wavlm_runs_a_padded_batch_as_each_clip_alone():
    """WavLM with a per-frame LayerNorm extractor (the toy stand-in's layout) runs unequal clips as one
    masked batch; each clip's hidden states equal its own run and its padding frames are zero."""
    from transformers import WavLMConfig, WavLMModel

    from wavllm_fairseq.models.encoders import WavLMAcousticEncoder

    torch.manual_seed(0)
    cfg = WavLMConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      conv_dim=(32,) * 7, conv_bias=True, feat_extract_norm="layer", num_conv_pos_embeddings=16,
                      num_conv_pos_embedding_groups=4, num_buckets=32, max_bucket_distance=64)
    enc = WavLMAcousticEncoder(WavLMModel(cfg).eval())
    wav, lengths = torch.randn(3, 16000), torch.tensor([16000, 9000, 5000])
    with torch.no_grad():
        hidden, out_len = enc(wav, lengths)  # (L+1, B, T, C)
        for b in range(3):
            alone, alone_len = enc(wav[b: b + 1, : lengths[b]], lengths[b: b + 1])
            n = alone.shape[2]
            assert int(out_len[b]) == int(alone_len[0]) == n
            assert torch.allclose(hidden[:, b, :n], alone[:, 0], atol=1e-4)
            assert not hidden[:, b, n:].any()


def test_lora_a_init_matches_the_reference_bound():
    """The reference stores A as (in, R) and applies kaiming-uniform(a=sqrt(5)) to it, so its fan-in is R:
    A ~ U(+-1/sqrt(R)) (0.177 at R=32). nn.Linear's (R, in) layout would give U(+-1/sqrt(in))."""
    import math

    from wavllm_fairseq.models.lora import LoRALinear

    torch.manual_seed(0)
    base = torch.nn.Linear(4096, 4096, bias=False)
    ref = LoRALinear(base, rank=32, alpha=32.0)
    a = ref.lora_A.weight
    assert a.abs().max() <= 1 / math.sqrt(32) and a.abs().max() > 0.95 / math.sqrt(32)
    assert torch.count_nonzero(ref.lora_B.weight) == 0
    peft = LoRALinear(base, rank=32, alpha=32.0, a_init="fan_in_features").lora_A.weight
    assert peft.abs().max() <= 1 / math.sqrt(4096)
    with pytest.raises(ValueError, match="A init"):
        LoRALinear(base, rank=32, alpha=32.0, a_init="xavier")


def test_a_clip_longer_than_a_whisper_window_is_adapted_window_by_window():
    """The reference encodes a long clip 30 s window by window, so the semantic adapter's convolutions
    see zeros at each window's edge (wavllm_tiny's window: 100 Whisper frames = 2 s). Lengths are the
    whole clip's; a batch equals each clip alone."""
    model = tiny(seed=2).eval()
    W = model.whisper.encoder.config.max_source_positions
    n = 5 * 16000 + 123  # 3 windows, the last one partial
    audio = 0.1 * torch.randn(2, n, generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([n, 16000])
    with torch.no_grad():
        sem, sem_len = model.whisper(audio, lengths)
        got, got_len = model._semantic_per_window(sem, sem_len)
        assert got_len.tolist() == model.semantic_adapter.output_lengths(sem_len).tolist()
        for k in range(3):  # window k of clip 0, alone
            frames = sem[:1, k * W: (k + 1) * W]
            valid = (sem_len[:1] - k * W).clamp(0, W)
            alone, alone_len = model.semantic_adapter(frames, valid)
            step = model.semantic_adapter.output_lengths(torch.tensor([W]))[0]
            m = int(alone_len)
            torch.testing.assert_close(got[0, k * step: k * step + m], alone[0, :m])
        whole, _ = model.semantic_adapter(sem[:1], sem_len[:1])  # across the join the two differ
        assert not torch.allclose(whole[0, step - 1: step + 1], got[0, step - 1: step + 1])
        short, short_len = model.semantic_adapter(sem[1:2, : int(sem_len[1])], sem_len[1:2])
        torch.testing.assert_close(got[1, : int(short_len)], short[0, : int(short_len)])


def test_rms_norm_eps_override_reaches_every_norm():
    from wavllm_fairseq.models.encoders import set_rms_norm_eps

    model = tiny(llama_rms_norm_eps_override=1e-6)
    norms = [m for m in model.llm.modules() if hasattr(m, "variance_epsilon")]
    assert len(norms) == 2 * model.llm.config.num_hidden_layers + 1
    assert all(m.variance_epsilon == 1e-6 for m in norms) and model.llm.config.rms_norm_eps == 1e-6
    assert set_rms_norm_eps(tiny().llm, 1e-4) == len(norms)
