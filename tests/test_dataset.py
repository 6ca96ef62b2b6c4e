"""Dataset, collater and task on a tiny corpus: batch layout, answer-only mask, speech + text-only rows."""
import os

import pytest
import torch

from helpers import make_corpus, write_manifest
from wavllm_fairseq.criterion import WavLLMCrossEntropy
from wavllm_fairseq.dataset import TEXT_TOKEN_COST, InstructionDataset, collate, expected_speech_frames
from wavllm_fairseq.errors import AudioError, ManifestError
from wavllm_fairseq.manifest import read_manifest
from wavllm_fairseq.model import WavLLMModel
from wavllm_fairseq.task import WavLLMInstructionConfig, WavLLMInstructionTask


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(str(tmp_path_factory.mktemp("corpus")))


@pytest.fixture(scope="module")
def task(corpus):
    return WavLLMInstructionTask.setup_task(WavLLMInstructionConfig(data=os.path.dirname(corpus["train_asr"]),
                                                                   tokenizer_dir=corpus["tok"]))


def mixed_batch(task):
    asr = task.load_corpus("train_asr", shuffle=False)
    it = task.load_corpus("train_it", shuffle=False)
    return collate([asr[0], it[1], asr[2]], task.tokenizer.pad_id), asr, it


def test_batch_layout_with_speech_and_text_only_rows(task):
    batch, asr, it = mixed_batch(task)
    tok = task.tokenizer
    net = batch["net_input"]
    assert net["audio"].shape[0] == 3 and net["audio"].dtype == torch.float32
    assert net["audio_lengths"][1] == 0 and bool((net["audio"][1] == 0).all())
    assert net["audio_lengths"][0] == asr.rows[0].n_frames
    for b, (row, ds) in enumerate([(asr.rows[0], asr), (it.rows[1], it), (asr.rows[2], asr)]):
        post = net["post_tokens"][b, : net["post_lengths"][b]].tolist()
        mask = net["post_target_mask"][b, : net["post_lengths"][b]].tolist()
        # only the answer and its </s> are loss positions
        assert [t for t, m in zip(post, mask) if m] == tok.encode(row.tgt_text) + [tok.eos_id]
        assert not net["post_target_mask"][b, net["post_lengths"][b]:].any()  # padding never counts
        gen = int(net["prompt_post_lengths"][b])
        assert not any(mask[:gen]) and all(mask[gen:])
        tgt = batch["target"][b, : batch["target_lengths"][b]].tolist()
        assert tgt == post[gen:] and tgt[-1] == tok.eos_id
        pre = tok.decode(net["pre_tokens"][b, : net["pre_lengths"][b]])
        assert pre.endswith("<SPEECH>") == row.with_speech
        ins = net["instruction_tokens"][b, : net["instruction_lengths"][b]].tolist()
        assert ins == [tok.bos_id] + tok.encode(row.prompt)
    assert batch["ntokens"] == int(net["post_target_mask"].sum())
    assert batch["task_names"] == ["asr", "it", "asr"]
    # duration cost: audio samples, or 1280 samples per token on text-only rows
    assert it.num_tokens(1) == TEXT_TOKEN_COST * (len(it.encoded[1][0].pre) + len(it.encoded[1][0].post))


def test_model_and_criterion_on_a_real_batch(task):
    batch, _, _ = mixed_batch(task)
    torch.manual_seed(0)
    model = WavLLMModel.from_arch("wavllm_tiny", vocab_size=len(task.target_dictionary))
    loss, sample_size, log = WavLLMCrossEntropy(task)(model, batch)
    assert torch.isfinite(loss) and sample_size == batch["ntokens"] == log["ntokens"]
    assert set(k for k in log if k.startswith("task_ntok:")) == {"task_ntok:asr", "task_ntok:it"}
    assert log["task_ntok:asr"] + log["task_ntok:it"] == batch["ntokens"]
    # per-task losses add up to the total nll
    assert abs(log["task_loss:asr"] + log["task_loss:it"] - log["nll_loss"]) < 1e-3


@pytest.mark.parametrize("n", [400, 1600, 3199, 16000, 16001, 48000, 160000])
def test_expected_speech_frames_matches_the_model(n):
    torch.manual_seed(0)
    model = WavLLMModel.from_arch("wavllm_tiny", vocab_size=64)
    assert expected_speech_frames(n) == int(model.speech_frames(torch.tensor([n]))[0])
    assert expected_speech_frames(n, use_wavlm=False) >= expected_speech_frames(n)


def test_too_long_row_is_an_error_naming_file_and_row_or_a_counted_skip(corpus, task):
    path = corpus["train_asr"]
    rows, _ = read_manifest(path)
    with pytest.raises(ManifestError, match=r"train_asr.tsv:2: id=tr0: .* context is 60"):
        InstructionDataset(rows, path, task.tokenizer, corpus="asr", max_positions=60)
    ds = InstructionDataset(rows, path, task.tokenizer, corpus="asr", max_positions=60, skip_bad=True)
    assert len(ds) == 0 and ds.skipped == {"too_long_text": len(rows)}


def test_unreadable_audio_at_load_time_names_the_file_or_is_skipped(corpus, task, tmp_path):
    root = os.path.dirname(corpus["train_asr"])
    rows, _ = read_manifest(corpus["train_asr"])
    bad = os.path.join(root, "broken_at_runtime.tsv")
    lines = open(corpus["train_asr"]).read().splitlines()
    with open(bad, "w") as f:
        f.write("\n".join(lines[:3]) + "\n")
    rows, _ = read_manifest(bad)
    os.rename(os.path.join(root, "wav/tr1.wav"), os.path.join(root, "wav/tr1.moved"))
    try:
        ds = InstructionDataset(rows, bad, task.tokenizer, corpus="asr")
        with pytest.raises(AudioError, match="broken_at_runtime.tsv:3"):
            ds[1]
        ds = InstructionDataset(rows, bad, task.tokenizer, corpus="asr", skip_bad=True)
        batch = collate([ds[0], ds[1]], task.tokenizer.pad_id)
        assert batch["nsentences"] == 1 and sum(ds.skipped.values()) == 1
    finally:
        os.rename(os.path.join(root, "wav/tr1.moved"), os.path.join(root, "wav/tr1.wav"))
