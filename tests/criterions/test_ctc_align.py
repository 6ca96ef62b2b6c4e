"""The CTC alignment warm-up (criterions/ctc_align.py) on wavllm_tiny: its targets are the text tokens of the ASR
answers only, its loss is CTC over (blank + the LLM's embedding table) plus the norm penalty, only the adapters,
the projector and its own blank/scale receive gradients (the LLM, LoRA included, is not run), and a few Adam steps
lower it."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from wavllm_fairseq.criterions.ctc_align import WavLLMCTCAlign
from wavllm_fairseq.models.wavllm import WavLLMModel

VOCAB = 60
SPECIAL, NEWLINE = 2, 5  # decode to "" (an end-of-turn token) and to whitespace only


class FakeTokenizer:
    def decode(self, ids):
        return "".join("" if i == SPECIAL else ("\n" if i == NEWLINE else f"w{i} ") for i in ids)


def make_task(model):
    return SimpleNamespace(tokenizer=FakeTokenizer(), llm_dim=model.llm_dim)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    answers = [[10, 11, 12, NEWLINE, SPECIAL], [20, 21, SPECIAL], [30, 31, 32, 33, SPECIAL]]
    B = len(answers)
    target = torch.zeros(B, 5, dtype=torch.long)
    for b, a in enumerate(answers):
        target[b, : len(a)] = torch.tensor(a)
    lengths = torch.tensor([16000, 12000, 14000])
    net = dict(audio=0.1 * torch.randn(B, 16000, generator=g), audio_lengths=lengths,
               pre_tokens=torch.randint(3, VOCAB, (B, 4), generator=g), pre_lengths=torch.tensor([4, 4, 4]),
               post_tokens=target.clone(), post_lengths=torch.tensor([len(a) for a in answers]),
               post_target_mask=target > 0)
    return {"net_input": net, "nsentences": B, "task_names": ["asr", "sv", "asr"], "target": target,
            "target_lengths": torch.tensor([len(a) for a in answers])}


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return WavLLMModel.from_arch("wavllm_tiny", vocab_size=VOCAB, lora_dropout=0.0).train()


def test_targets_are_the_text_tokens_of_the_aligned_tasks_only(model):
    crit = WavLLMCTCAlign(make_task(model))
    assert crit.ctc_targets(batch()) == [[10, 11, 12], [], [30, 31, 32, 33]]
    both = WavLLMCTCAlign(make_task(model), tasks="asr,sv")
    assert both.ctc_targets(batch())[1] == [20, 21]


def test_loss_is_ctc_over_blank_and_the_embedding_table_plus_the_norm_penalty(model):
    crit = WavLLMCTCAlign(make_task(model), norm_weight=0.5)
    with torch.no_grad():
        crit.blank.normal_()
        crit.log_scale.fill_(0.3)
    sample = batch()
    model.eval()  # the same speech embeddings in both passes
    loss, sample_size, log = crit(model, sample)
    assert sample_size == log["ntokens"] == 7 and log["nsentences"] == 2

    keep = torch.tensor([0, 2])
    speech, n = model.encode_speech(sample["net_input"]["audio"][keep], sample["net_input"]["audio_lengths"][keep])
    table = model.llm.get_input_embeddings().weight.float()
    e = table.norm(dim=1).mean()
    x = speech.float() * (e / speech.float().norm(dim=-1, keepdim=True)) * torch.tensor(0.3).exp()
    logits = torch.cat([(x @ crit.blank + crit.blank_bias)[..., None], x @ table.t()], -1)
    lp = F.log_softmax(logits, -1).transpose(0, 1)
    ctc = F.ctc_loss(lp, torch.tensor([11, 12, 13, 31, 32, 33, 34]), n, torch.tensor([3, 4]), reduction="sum",
                     zero_infinity=True)
    valid = torch.arange(speech.shape[1])[None] < n[:, None]
    penalty = ((speech.float().norm(dim=-1) / e - 1) ** 2 * valid).sum()
    torch.testing.assert_close(loss, ctc + 0.5 * penalty)
    torch.testing.assert_close(torch.tensor(log["ctc_loss"]), ctc.detach(), rtol=1e-5, atol=1e-4)


def test_default_scores_are_the_plain_dot_products_and_add_no_penalty(model):
    crit = WavLLMCTCAlign(make_task(model))
    model.eval()
    sample = batch()
    loss, _, log = crit(model, sample)
    keep = torch.tensor([0, 2])
    speech, n = model.encode_speech(sample["net_input"]["audio"][keep], sample["net_input"]["audio_lengths"][keep])
    x = speech.float()
    table = model.llm.get_input_embeddings().weight.float()
    lp = F.log_softmax(torch.cat([(x @ crit.blank + crit.blank_bias)[..., None], x @ table.t()], -1), -1)
    ctc = F.ctc_loss(lp.transpose(0, 1), torch.tensor([11, 12, 13, 31, 32, 33, 34]), n, torch.tensor([3, 4]),
                     reduction="sum", zero_infinity=True)
    torch.testing.assert_close(loss, ctc)


def test_rows_of_other_tasks_do_not_change_the_loss(model):
    crit = WavLLMCTCAlign(make_task(model))
    a, b = batch(), batch()
    b["net_input"]["audio"][1] = torch.randn(16000)  # the sv row's audio
    with torch.no_grad():
        la, _, _ = crit(model.eval(), a)
        lb, _, _ = crit(model, b)
    torch.testing.assert_close(la, lb)


def test_only_the_adapters_projector_and_blank_get_gradients(model):
    crit = WavLLMCTCAlign(make_task(model))
    loss, _, _ = crit(model, batch())
    loss.backward()
    for name, p in model.named_parameters():
        touched = p.grad is not None and bool(p.grad.abs().sum() > 0)
        if name.startswith(("semantic_adapter.", "acoustic_adapter.", "projector.")):
            assert touched, name
        else:
            assert not touched, name  # frozen encoders, the LLM and its LoRA: not run, or frozen
    assert crit.blank.grad is not None and crit.blank_bias.grad is not None


def test_a_few_adam_steps_lower_the_loss(model):
    crit = WavLLMCTCAlign(make_task(model))
    params = [p for p in list(model.parameters()) + list(crit.parameters()) if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-3)
    sample = batch()
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss, n, _ = crit(model, sample)
        (loss / n).backward()
        opt.step()
        losses.append(float(loss.detach()) / n)
    assert losses[-1] < 0.7 * losses[0], losses


def test_a_batch_without_aligned_rows_is_a_zero_loss(model):
    crit = WavLLMCTCAlign(make_task(model))
    sample = batch()
    sample["task_names"] = ["sv", "sv", "er"]
    loss, sample_size, log = crit(model, sample)
    assert float(loss) == 0.0 and sample_size == 0 and log["ntokens"] == 0
    loss.backward()  # still a graph: fairseq's backward must not fail


def test_it_needs_the_model_built_first():
    with pytest.raises(ValueError, match="build_model"):
        WavLLMCTCAlign(SimpleNamespace(tokenizer=FakeTokenizer()))


def test_greedy_decode_merges_repeats_drops_blanks_and_stops_at_each_rows_frames(model, monkeypatch):
    crit = WavLLMCTCAlign(make_task(model))
    # frame-wise best indices (0 = blank, i + 1 = token i); row 1 has 4 valid frames of 6
    best = torch.tensor([[0, 11, 11, 0, 11, 13], [21, 0, 0, 22, 23, 23]])
    lprobs = F.one_hot(best, VOCAB + 1).float().log_softmax(-1).transpose(0, 1)  # (N, B, V + 1)
    monkeypatch.setattr(crit, "frame_log_probs", lambda m, net: (lprobs, torch.tensor([6, 4]), torch.zeros(())))
    assert crit.greedy_decode(model, {}) == [[10, 10, 12], [20, 21]]


def test_from_checkpoint_restores_the_options_and_the_learned_blank(model):
    crit = WavLLMCTCAlign(make_task(model), tasks="asr,sv", norm_weight=0.5)
    with torch.no_grad():
        crit.blank.normal_()
        crit.blank_bias.fill_(0.7)
        crit.log_scale.fill_(0.3)
    state = {"cfg": {"criterion": {"_name": "wavllm_ctc_align", "tasks": "asr,sv", "norm_weight": 0.5}},
             "criterion": crit.state_dict()}
    back = WavLLMCTCAlign.from_checkpoint(make_task(model), state)
    assert back.tasks == {"asr", "sv"} and back.norm_weight == 0.5
    for key, value in crit.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)


# the auxiliary CTC of wavllm_cross_entropy (criterion.ctc_weight)

def shrink_model():
    torch.manual_seed(0)
    return WavLLMModel.from_arch("wavllm_tiny", vocab_size=VOCAB, lora_dropout=0.0, speech_shrink="ctc").train()


def test_the_auxiliary_ctc_adds_its_per_token_mean_with_its_weight(model):
    from wavllm_fairseq.criterions.cross_entropy import WavLLMCrossEntropy
    sample = batch()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))  # LoRA's zero init would hide the LLM's part
    plain, size, plain_log = WavLLMCrossEntropy(make_task(model))(model, sample)
    aux = WavLLMCrossEntropy(make_task(model), ctc_weight=0.5)
    with torch.no_grad():
        aux.ctc.blank.normal_()
    loss, size2, log = aux(model, sample)
    ctc, n, _ = aux.ctc(model, sample)
    assert size2 == size and n == 7  # the two ASR rows' text tokens
    torch.testing.assert_close(loss, plain + 0.5 * ctc * size / n)
    assert log["nll_loss"] == pytest.approx(plain_log["nll_loss"]) and log["ctc_ntokens"] == 7
    assert log["ctc_loss"] == pytest.approx(float(ctc))
    assert "ctc_loss" not in plain_log
    loss.backward()
    assert aux.ctc.blank.grad is not None  # the model has no blank: the criterion's own trains
    with pytest.raises(ValueError, match="ctc_weight"):
        WavLLMCrossEntropy(make_task(model), ctc_weight=-1.0)


def test_with_the_shrink_the_auxiliary_ctc_trains_the_models_blank():
    from wavllm_fairseq.criterions.cross_entropy import WavLLMCrossEntropy
    m = shrink_model()
    loss, _, _ = WavLLMCrossEntropy(make_task(m), ctc_weight=1.0)(m, batch())
    loss.backward()
    assert m.speech_shrink.blank.grad is not None and m.speech_shrink.blank.grad.abs().sum() > 0


def test_the_auxiliary_ctc_loads_a_stage_1a_criterion_its_own_state_or_none(model):
    from wavllm_fairseq.criterions.cross_entropy import WavLLMCrossEntropy
    align = WavLLMCTCAlign(make_task(model))
    with torch.no_grad():
        align.blank.normal_()
        align.blank_bias.fill_(0.7)
    aux = WavLLMCrossEntropy(make_task(model), ctc_weight=1.0)
    aux.load_state_dict(align.state_dict())  # a stage-1a checkpoint's criterion entry
    assert torch.equal(aux.ctc.blank, align.blank) and float(aux.ctc.blank_bias) == pytest.approx(0.7)
    again = WavLLMCrossEntropy(make_task(model), ctc_weight=1.0)
    again.load_state_dict(aux.state_dict())  # its own (a stage-1 checkpoint trained with it)
    assert torch.equal(again.ctc.blank, align.blank)
    fresh = WavLLMCrossEntropy(make_task(model), ctc_weight=1.0)
    fresh.load_state_dict({})  # a checkpoint trained without it
    assert float(fresh.ctc.blank.abs().sum()) == 0.0
    with pytest.raises(RuntimeError):
        fresh.load_state_dict({"ctc.blank": align.blank, "ctc.other": align.blank})
