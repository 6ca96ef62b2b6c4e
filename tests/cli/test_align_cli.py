"""Stage 1a through the real CLI on a tiny model: fairseq-hydra-train with criterion wavllm_ctc_align (CTC of the
speech embeddings against the LLM's token embeddings), then stage 1 with checkpoint.finetune_from_model starting
from its adapters and projector."""
import os

import pytest
import torch

from helpers import make_corpus

from test_train_cli import frozen_and_trainable, tiny_overrides, train, train_losses

pytestmark = pytest.mark.slow

ALIGN = ["criterion._name=wavllm_ctc_align", "task.train_manifests=train_asr",
         "task.train_weights=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("align")
    corpus = make_corpus(str(work / "corpus"), n_train=6)
    a = work / "align"
    log_a = train(1, tiny_overrides(corpus, a, 20, ALIGN), work / "align.log")
    s1 = work / "stage1"
    log1 = train(1, tiny_overrides(corpus, s1, 1, [f"checkpoint.finetune_from_model={a}/checkpoint_last.pt",
                                                   "optimization.lr=[1e-12]"]), work / "stage1.log")
    return dict(a=str(a), s1=str(s1), log_a=log_a, log1=log1)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_the_ctc_loss_falls_and_the_blank_is_stored_with_the_checkpoint(runs):
    losses = [v for _, v in train_losses(runs["log_a"])]
    assert len(losses) >= 10 and all(v == v for v in losses)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    state = load(os.path.join(runs["a"], "checkpoint_last.pt"))
    assert set(state["criterion"]) >= {"blank", "blank_bias"}
    assert float(state["criterion"]["blank"].abs().sum()) > 0  # trained, not the zeros it starts from


def test_only_adapters_and_projector_move_and_stage1_starts_from_them(runs):
    aligned = load(os.path.join(runs["a"], "checkpoint_last.pt"))["model"]
    stage1 = load(os.path.join(runs["s1"], "checkpoint_last.pt"))["model"]
    frozen, trainable = frozen_and_trainable(aligned)
    speech = [k for k in trainable if k.startswith(("semantic_adapter.", "acoustic_adapter.", "projector."))]
    lora = [k for k in trainable if "lora_" in k]
    assert speech and lora
    for k in lora:  # the LLM is not run in stage 1a: LoRA keeps its initialisation (B = 0)
        if "lora_B" in k:
            assert float(aligned[k].abs().sum()) == 0.0, k
    # stage 1 (one update at a vanishing rate) starts from stage 1a's speech weights, not fresh ones
    for k in speech:
        torch.testing.assert_close(stage1[k], aligned[k], rtol=0, atol=1e-6)
    for k in frozen:
        assert torch.equal(stage1[k], aligned[k]), k
