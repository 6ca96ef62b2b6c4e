"""The reference's length rule (``max_len_counts_prompt``): its generator forces the prompt after the speech
span (all but its first token, which <s> replaces) as a prefix inside ``--max-len-b``, so a row's new tokens
at most are ``max_len_b`` less those; off (the default), ``--max-len-b`` is the answer's own budget."""
import pytest
import torch
from omegaconf import OmegaConf

from wavllm_fairseq.decoding.options import DecodingOptions
from wavllm_fairseq.tasks.instruction import WavLLMInstructionConfig

from test_generator import Dict, batch, model_with_lora

POST = (6, 3, 9)  # post-speech prompt tokens of the three rows


def new_tokens(hypos):
    """Tokens each row generated before the </s> that ends it."""
    return [len(h[0]["tokens"]) - 1 for h in hypos]


@pytest.mark.parametrize("beam", [1, 2])
def test_new_tokens_at_most_are_max_len_b_less_the_forced_prompt(beam):
    m = model_with_lora()
    s = batch(post=POST)
    s["net_input"]["prompt_post_lengths"] = torch.tensor(POST)
    # </s> banned for longer than any cap: every row runs to its cap
    plain = DecodingOptions(beam_size=beam, max_len_b=20, min_len=100).build(m, Dict())
    counted = DecodingOptions(beam_size=beam, max_len_b=20, min_len=100, max_len_counts_prompt=True).build(m, Dict())
    assert new_tokens(plain.generate([m], s)) == [20, 20, 20]
    assert new_tokens(counted.generate([m], s)) == [20 - (p - 1) for p in POST] == [15, 18, 12]
    # a prompt longer than the budget still decodes one token, as with any cap
    short = DecodingOptions(beam_size=beam, max_len_b=4, min_len=100, max_len_counts_prompt=True).build(m, Dict())
    assert new_tokens(short.generate([m], s)) == [1, 2, 1]


def test_the_rule_changes_only_the_caps():
    m = model_with_lora()
    s = batch(post=POST)
    s["net_input"]["prompt_post_lengths"] = torch.tensor(POST)
    long = DecodingOptions(max_len_b=40).build(m, Dict()).generate([m], s)
    counted = DecodingOptions(max_len_b=30, max_len_counts_prompt=True).build(m, Dict()).generate([m], s)
    for a, b, p in zip(long, counted, POST):
        cap = 30 - (p - 1)
        got, ref = b[0]["tokens"].tolist(), a[0]["tokens"].tolist()
        assert got[:-1] == ref[: len(got) - 1] and len(got) - 1 <= cap


def test_fairseq_generate_reads_it_from_the_task():
    cfg = OmegaConf.merge(OmegaConf.structured(WavLLMInstructionConfig),
                          dict(seed=1, update_freq=[1], max_len_counts_prompt=True))
    assert DecodingOptions.from_fairseq_args(OmegaConf.create({}), cfg).max_len_counts_prompt is True
    plain = OmegaConf.merge(OmegaConf.structured(WavLLMInstructionConfig), dict(seed=1, update_freq=[1]))
    assert DecodingOptions.from_fairseq_args(OmegaConf.create({}), plain).max_len_counts_prompt is False
