"""Dataset, collater and task on a tiny corpus: batch layout, answer-only mask, speech + text-only rows."""
import logging
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from helpers import make_corpus, tone
from wavllm_fairseq.criterions.cross_entropy import WavLLMCrossEntropy
from wavllm_fairseq.data.dataset import TEXT_TOKEN_COST, InstructionDataset, collate
from wavllm_fairseq.errors import AudioError, ManifestError, WavLLMInputError
from wavllm_fairseq.data.manifest import read_manifest
from wavllm_fairseq.decoding.generator import WavLLMGenerator
from wavllm_fairseq.models.speech import expected_speech_frames
from wavllm_fairseq.models.wavllm import WavLLMModel
from wavllm_fairseq.tasks.instruction import WavLLMInstructionConfig, WavLLMInstructionTask


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
        assert pre.endswith("<SPEECH>")  # the reference's strings on every row; text rows have no speech
        ins = net["instruction_tokens"][b, : net["instruction_lengths"][b]].tolist()
        assert ins == tok.encode('"' + row.prompt + '"')  # the reference's prompt-adapter input, no <s>
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
        InstructionDataset(rows, path, task.tokenizer, corpus="asr", speech_frames=expected_speech_frames,
                           max_positions=60)
    ds = InstructionDataset(rows, path, task.tokenizer, corpus="asr", speech_frames=expected_speech_frames,
                            max_positions=60, skip_bad=True)
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
        ds = InstructionDataset(rows, bad, task.tokenizer, corpus="asr", speech_frames=expected_speech_frames)
        with pytest.raises(AudioError, match="broken_at_runtime.tsv:3"):
            ds[1]
        ds = InstructionDataset(rows, bad, task.tokenizer, corpus="asr", speech_frames=expected_speech_frames,
                                skip_bad=True)
        batch = collate([ds[0], ds[1]], task.tokenizer.pad_id)
        assert batch["nsentences"] == 1 and sum(ds.skipped.values()) == 1
    finally:
        os.rename(os.path.join(root, "wav/tr1.moved"), os.path.join(root, "wav/tr1.wav"))


def _write(path, wav):
    sf.write(path, wav, 16000, subtype="PCM_16")
    return path


def test_audiobench_style_manifest_decodes_every_row(tmp_path, task, caplog):
    """The shape AudioBench's WavLLM adapter writes (AudioLLMs/AudioBench src/model_src/wavllm_fairseq.py):
    header ``id audio n_frames prompt tgt_text with_speech``, absolute audio paths, n_frames 0 on every
    row, a placeholder target, a first "cold start" row, prompts with newlines replaced by spaces. Clips
    up to 100 s (it truncates longer ones); here also a silent clip and a spoken question (empty prompt).
    Every row must load, batch and decode: none rejected for its length, n_frames or silence."""
    long = np.concatenate([tone(1.0, 220 + 20 * k, k) for k in range(41)])  # 41 s: two 30 s windows
    clips = [_write(str(tmp_path / "cold.wav"), tone(0.5, 300, 0)),
             _write(str(tmp_path / "a1.wav"), tone(1.2, 250, 1)),
             _write(str(tmp_path / "a2.wav"), long),
             _write(str(tmp_path / "a3.wav"), np.zeros(16000, np.float32)),
             _write(str(tmp_path / "a4.wav"), tone(0.8, 400, 2))]
    instruction = "Listen to the clip.\nWhat is said?".replace("\n", " ").strip()
    prompts = ["Please transcribe.", instruction, instruction, "Is anyone speaking?", ""]
    answers = ["Placehoder."] + ["==== No reference Answer ===="] * 4
    path = tmp_path / "wavllm_test.tsv"
    with open(path, "w") as f:
        f.write("id\taudio\tn_frames\tprompt\ttgt_text\twith_speech\n")
        for i, (c, p, a) in enumerate(zip(clips, prompts, answers)):
            f.write(f"{i}\t{c}\t0\t{p}\t{a}\tTrue\n")
    with caplog.at_level(logging.WARNING):
        ds = task.load_corpus(str(path), shuffle=False)
    assert len(ds) == 5 and ds.rows[2].n_frames == len(long)  # n_frames 0: the true length is read
    assert "n_frames is 0" in caplog.text
    torch.manual_seed(0)
    model = WavLLMModel.from_arch("wavllm_tiny", vocab_size=len(task.target_dictionary)).eval()
    gen = WavLLMGenerator([model], task.target_dictionary, beam_size=1, max_len_b=3)
    with caplog.at_level(logging.WARNING):
        batch = collate([ds[i] for i in range(len(ds))], task.tokenizer.pad_id)
    assert "is silent" in caplog.text and "a3.wav" in caplog.text
    assert batch["nsentences"] == 5 and int(batch["net_input"]["audio_lengths"][2]) == len(long)
    hyps = gen.generate([model], batch)
    assert len(hyps) == 5 and all(len(h) >= 1 for h in hyps)


def test_a_row_over_the_llm_context_is_refused_naming_row_and_numbers(tmp_path, task):
    wav = _write(str(tmp_path / "long.wav"), np.concatenate([tone(1.0, 200, k) for k in range(12)]))
    path = tmp_path / "ctx.tsv"
    with open(path, "w") as f:
        f.write("id\taudio\tn_frames\tprompt\ttgt_text\twith_speech\nrow7\t" + wav + "\t0\tWhat?\tx\tTrue\n")
    rows, _ = read_manifest(str(path), check_audio=True)
    ds = InstructionDataset(rows, str(path), task.tokenizer, corpus="c", speech_frames=expected_speech_frames,
                            max_positions=400)  # 12 s: 150 speech
    assert len(ds) == 1
    with pytest.raises(ManifestError, match=r"ctx.tsv:2: id=row7: .*need \d+ positions \(speech 150.*context is 100"):
        InstructionDataset(rows, str(path), task.tokenizer, corpus="c", speech_frames=expected_speech_frames,
                           max_positions=100)


def test_the_segment_not_the_file_reaches_the_encoders(tmp_path, task):
    """A row with the reference's start_frame / end_frame columns: Whisper and WavLM receive the segment's
    samples (and lengths), not the whole file's."""
    wav = np.concatenate([tone(0.5, 200, 0), tone(0.5, 900, 1), tone(0.5, 200, 2)])
    _write(str(tmp_path / "three.wav"), wav)
    path = tmp_path / "seg.tsv"
    path.write_text("id\taudio\tn_frames\tprompt\ttgt_text\twith_speech\tstart_frame\tend_frame\n"
                    "mid\tthree.wav\t111111\tWhat is said?\tthe cat\tTrue\t8000\t16000\n"
                    "all\tthree.wav\t111111\tWhat is said?\tthe cat\tTrue\t\t\n")
    ds = task.load_corpus(str(path), shuffle=False)
    whole = sf.read(str(tmp_path / "three.wav"), dtype="float32")[0]
    batch = collate([ds[0], ds[1]], task.tokenizer.pad_id)
    torch.manual_seed(0)
    model = WavLLMModel.from_arch("wavllm_tiny", vocab_size=len(task.target_dictionary)).eval()
    seen = {}

    def keep(name):
        def hook(module, args, kwargs):
            audio, lengths = args[:2]
            seen[name] = [audio[b, : int(lengths[b])].clone() for b in range(len(lengths))]
        return hook

    handles = [model.whisper.register_forward_pre_hook(keep("whisper"), with_kwargs=True),
               model.wavlm.register_forward_pre_hook(keep("wavlm"), with_kwargs=True)]
    try:
        with torch.no_grad():
            model(**batch["net_input"])
    finally:
        for h in handles:
            h.remove()
    for name in ("whisper", "wavlm"):
        np.testing.assert_array_equal(seen[name][0].numpy(), whole[8000:16000])
        np.testing.assert_array_equal(seen[name][1].numpy(), whole)
    assert ds.rows[0].n_frames == 8000 and int(model.speech_frames(torch.tensor([8000]))[0]) < int(
        model.speech_frames(torch.tensor([len(whole)]))[0])


def test_fairseq_generate_s_default_max_tokens_batches_by_30_s_and_other_limits_say_what_to_pass(task, corpus,
                                                                                                caplog):
    ds = task.load_corpus("test_asr", shuffle=False)
    largest = int(ds.sizes.max())
    assert largest > 12000  # every clip is longer than fairseq-generate's max_tokens=12000 (0.75 s)
    with caplog.at_level(logging.WARNING):
        itr = task.get_batch_iterator(ds, max_tokens=12000, max_sentences=None, disable_iterator_cache=True)
    batches = list(itr.next_epoch_itr(shuffle=False))
    assert sorted(i for b in batches for i in b["id"].tolist()) == list(range(len(ds)))
    assert len(batches) == 1  # 4 short clips fit in 30 s
    assert "max_tokens=12000 (fairseq-generate's value" in caplog.text and "batching by 480000" in caplog.text
    with pytest.raises(WavLLMInputError) as e:
        task.get_batch_iterator(ds, max_tokens=largest - 1, max_sentences=None)
    message = str(e.value)
    assert "test_asr.tsv:" in message and f"--max-tokens {largest} or more" in message and "--batch-size" in message
    itr = task.get_batch_iterator(ds, max_tokens=largest, max_sentences=None, disable_iterator_cache=True)
    assert sum(len(b["id"]) for b in itr.next_epoch_itr(shuffle=False)) == len(ds)
    itr = task.get_batch_iterator(ds, max_tokens=None, max_sentences=3, disable_iterator_cache=True)
    assert [len(b["id"]) for b in itr.next_epoch_itr(shuffle=False)] == [3, 1]
