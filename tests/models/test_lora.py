"""LoRA (lora.py): B = 0 is the frozen model, merge equals unmerged, the per-utterance and grouped-query
scales follow the formula, the recomputation context restores the forward's state, A's init bound."""
import math

import pytest
import torch

from tiny_wavllm import make_batch, tiny
from wavllm_fairseq.models.lora import (LoRALinear, checkpoint_context_fn, lora_disabled, lora_modules,
                                        lora_scale_context)


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


def test_checkpoint_context_reinstalls_the_forward_lora_state():
    """The recomputation context sets each LoRA layer's (scale, enabled) to what the forward saw and
    puts back what was there after."""
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


def test_lora_a_init_matches_the_reference_bound():
    """The reference stores A as (in, R) and applies kaiming-uniform(a=sqrt(5)) to it, so its fan-in is R:
    A ~ U(+-1/sqrt(R)) (0.177 at R=32). nn.Linear's (R, in) layout would give U(+-1/sqrt(in))."""
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

