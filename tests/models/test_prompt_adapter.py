"""The prompt-aware adapter (prompt_adapter.py, WavLLMModel.prompt_lora_scale): the formula, padding is
ignored, it reads the reference's input, and stage 2 starts where stage 1 ended (also on a GQA LLM)."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tiny_wavllm import VOCAB, make_batch, tiny
from wavllm_fairseq.models.lora import lora_disabled, lora_modules
from wavllm_fairseq.models.prompt_adapter import PromptAwareLoRAScale


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
    instr = torch.randint(3, VOCAB, (1, 5))
    with torch.no_grad():
        expected = model.prompt_scale(_last_layer_states(model, instr), torch.ones(1, 5, dtype=torch.bool))
        got = model.prompt_lora_scale(instr, torch.tensor([5]))
    torch.testing.assert_close(got, expected)


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


def _save_gqa_llama(path, vocab=VOCAB):
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


def test_prompt_scale_can_read_the_states_after_the_final_norm():
    """``prompt_adapter_input=final_norm``: the adapter reads the LLM's output after its final RMSNorm (every
    position at the norm's scale), not the last layer's pre-norm states; the default stays the reference's."""
    torch.manual_seed(2)
    model = tiny(prompt_adapter=True, prompt_adapter_init="random", prompt_adapter_input="final_norm").eval()
    assert tiny(prompt_adapter=True).cfg.prompt_adapter_input == "last_layer"
    instr = torch.randint(3, VOCAB, (2, 5))
    lengths = torch.tensor([5, 3])
    mask = torch.arange(5)[None] < lengths[:, None]
    with torch.no_grad(), lora_disabled(model.llm):
        normed = model.llm.model(input_ids=instr, attention_mask=mask.long()).last_hidden_state
        pre_norm = _last_layer_states(model, instr)
        expected = model.prompt_scale(normed, mask)
        reference_input = model.prompt_scale(pre_norm, mask)
        got = model.prompt_lora_scale(instr, lengths)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(normed[mask], model.llm.model.norm(pre_norm)[mask])  # the same states, normed
    assert not torch.allclose(got, reference_input)
