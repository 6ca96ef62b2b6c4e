"""The WavLLM model on wavllm_tiny: batch layout and padding, freezing, save/load, backbone folders,
bf16, activation checkpointing, the reference's unused projector."""
import os

import pytest
import torch
from transformers import LlamaForCausalLM, WhisperConfig, WhisperModel

from tiny_wavllm import VOCAB, make_batch, tiny
from wavllm_fairseq.errors import CheckpointError
from wavllm_fairseq.models.llm import set_rms_norm_eps
from wavllm_fairseq.models.lora import lora_disabled, lora_modules
from wavllm_fairseq.models.trainability import trainable_groups
from wavllm_fairseq.tools.count_params import PAPER_STAGE1_TRAINABLE, count


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
    cfg = model.whisper.encoder.config
    full = WhisperModel(WhisperConfig(**{**cfg.to_dict(), "decoder_layers": 1}))
    full.encoder.load_state_dict(model.whisper.encoder.state_dict())
    full.save_pretrained(root / "whisper")
    model.wavlm.wavlm.save_pretrained(root / "wavlm")
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


def test_the_unused_reference_projector_is_held_frozen_but_counted():
    """wavllm_7b holds the reference's Whisper-only projector, unused while WavLM is on: it is counted
    in the paper's trainable 76.6 M, but gets no gradient, so it is not optimised."""
    res = count("wavllm_7b", 1)
    model = res["model"]
    assert res["trainable"] == PAPER_STAGE1_TRAINABLE
    unused = model.semantic_only_projector
    assert res["trainable"] - res["optimised"] == sum(p.numel() for p in unused.parameters())
    assert not any(p.requires_grad for p in unused.parameters())
    assert "semantic_only_projector.weight" in model.state_dict()


def test_rms_norm_eps_override_reaches_every_norm():
    model = tiny(llama_rms_norm_eps_override=1e-6)
    norms = [m for m in model.llm.modules() if hasattr(m, "variance_epsilon")]
    assert len(norms) == 2 * model.llm.config.num_hidden_layers + 1
    assert all(m.variance_epsilon == 1e-6 for m in norms) and model.llm.config.rms_norm_eps == 1e-6
    assert set_rms_norm_eps(tiny().llm, 1e-4) == len(norms)

