"""The criterion (criterions/cross_entropy.py) on wavllm_tiny: the loss is summed over answer tokens only, and
its sample size is the answer tokens (default) or, with ``normalize_by=reference``, what the reference divides
by: every token after the speech span but the first (its collater's ``ntokens``: right prompt + answer - 1)."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from fairseq import metrics

from wavllm_fairseq.criterions.cross_entropy import WavLLMCrossEntropy
from wavllm_fairseq.models.wavllm import WavLLMModel

VOCAB = 100
POST, ANSWER = (6, 9, 4), (3, 4, 2)  # post-speech tokens per row, of which the last ones are the answer


def tiny_batch():
    g = torch.Generator().manual_seed(0)
    B, Q = len(POST), max(POST)
    post = torch.zeros(B, Q, dtype=torch.long)
    target_mask = torch.zeros(B, Q, dtype=torch.bool)
    for b in range(B):
        post[b, : POST[b]] = torch.randint(3, VOCAB, (POST[b],), generator=g)
        target_mask[b, POST[b] - ANSWER[b]: POST[b]] = True
    net = dict(audio=0.1 * torch.randn(B, 4000, generator=g), audio_lengths=torch.tensor([4000, 3000, 2000]),
               pre_tokens=torch.randint(3, VOCAB, (B, 5), generator=g), pre_lengths=torch.tensor([5, 5, 5]),
               post_tokens=post, post_lengths=torch.tensor(POST), post_target_mask=target_mask)
    return {"net_input": net, "nsentences": B, "task_names": ["asr", "sv", "asr"]}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return WavLLMModel.from_arch("wavllm_tiny", vocab_size=VOCAB, lora_dropout=0.0).eval()


def test_answer_normalisation_is_the_default_and_the_loss_is_the_answers_only(model):
    sample = tiny_batch()
    crit = WavLLMCrossEntropy(SimpleNamespace())
    assert crit.normalize_by == "answer"
    with torch.no_grad():
        loss, sample_size, log = crit(model, sample)
        logits, target, _ = model(**sample["net_input"])
    assert sample_size == log["ntokens"] == sum(ANSWER)
    torch.testing.assert_close(loss, F.cross_entropy(logits.float(), target, reduction="sum"))


def test_reference_normalisation_divides_by_prompt_and_answer_positions(model):
    """The reference's collater: target = right_prompt + answer (with </s>); ntokens = len(target[1:]); its
    loss is the nll summed over the answer tokens (target_masks), divided by ntokens."""
    sample = tiny_batch()
    answer = WavLLMCrossEntropy(SimpleNamespace())
    reference = WavLLMCrossEntropy(SimpleNamespace(), normalize_by="reference")
    with torch.no_grad():
        loss_a, size_a, _ = answer(model, sample)
        loss_r, size_r, log = reference(model, sample)
    right = [p - a for p, a in zip(POST, ANSWER)]  # " </SPEECH> {instruction} [/INST]" tokens
    assert size_r == sum(len(range(r + a)[1:]) for r, a in zip(right, ANSWER)) == 16 != size_a
    torch.testing.assert_close(loss_r, loss_a)  # the same sum; only what it is divided by differs
    assert log["ntokens"] == sum(ANSWER)
    with metrics.aggregate() as agg:
        WavLLMCrossEntropy.reduce_metrics([log])
    assert agg.get_smoothed_values()["loss"] == pytest.approx(float(loss_r) / 16 / math.log(2), abs=1e-3)
    assert agg.get_smoothed_values()["nll_loss"] == pytest.approx(float(loss_r) / 9 / math.log(2), abs=1e-3)


def test_an_unknown_normalisation_is_an_error():
    with pytest.raises(ValueError, match="normalize_by must be one of"):
        WavLLMCrossEntropy(SimpleNamespace(), normalize_by="tokens")


def test_the_option_reaches_the_criterion_through_fairseqs_registry():
    from fairseq.criterions import build_criterion
    from omegaconf import OmegaConf

    from wavllm_fairseq.criterions.cross_entropy import WavLLMCrossEntropyConfig

    cfg = OmegaConf.merge(OmegaConf.structured(WavLLMCrossEntropyConfig),
                          {"_name": "wavllm_cross_entropy", "normalize_by": "reference"})
    assert build_criterion(cfg, SimpleNamespace()).normalize_by == "reference"
