"""wavllm-score on hand-made hypotheses: every number below is computed by hand in the comments."""
import json
import os
import subprocess
import sys

import pytest

from helpers import require_installed, write_manifest
from wavllm_fairseq.data import text_norm
from wavllm_fairseq.evaluation import metrics, scoring
from wavllm_fairseq.errors import WavLLMInputError


def row(i, prompt, tgt, task, **extra):
    return {"id": f"u{i}", "audio": "a.wav", "n_frames": "16000", "prompt": prompt, "tgt_text": tgt,
            "with_speech": "True", "task": task, **extra}


def generate_output(hyps, guards=()):
    """What fairseq-generate writes: S/T/H/D/P lines in completion order plus log lines."""
    lines = ["2026-11-25 10:00:00 | INFO | fairseq_cli.generate | loading model"]
    for i, h in reversed(list(enumerate(hyps))):
        lines += [f"T-{i}\tref", f"H-{i}\t-0.5\t{h.lower()}", f"D-{i}\t-0.5\t{h}", f"P-{i}\t-0.1 -0.2"]
    lines += [f"2026-11-25 10:00:01 | INFO | wavllm_fairseq.decoding.generator | guard id={i} reason={r}"
              for i, r in guards]
    lines.append("Generate test with beam=1: WER: 12.5")
    return "\n".join(lines) + "\n"


@pytest.fixture
def files(tmp_path):
    def make(rows, hyps, guards=(), extra=()):
        m = write_manifest(str(tmp_path / "test.tsv"), rows, extra=list(extra))
        h = tmp_path / "gen.txt"
        h.write_text(generate_output(hyps, guards))
        return m, str(h)
    return make


# outputs of the normaliser as it stood in scoring.py before it moved to text_norm (recorded from that code)
NORMALISED = [("Hello, World!  It's  \"fine\"...", "hello world it's fine"),
              ("'quoted' don't", "quoted don't"),
              ("\u2018Smart\u2019 \u201cquotes\u201d \u2014 dash \u2013 en", "smart quotes dash en"),
              ("\u00bfQu\u00e9 tal?\u00a1Bien!", "qu\u00e9 tal bien"),
              ("\u00dcbersetze das Audio, bitte!", "\u00fcbersetze das audio bitte"),
              ("c-a-t 3.5 x_y rock'n'roll 'tis 90's", "c a t 3 5 x y rock'n'roll tis 90's"),
              ("Tab\tand\nnewline", "tab and newline"),
              ("\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440! \u4f60\u597d\u3002",
               "\u043f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440 \u4f60\u597d\u3002"),
              ("A/B (test) [x] {y} <z> #1 @me $5 %", "a b test x y z 1 me 5")]


@pytest.mark.parametrize("text, normalised", NORMALISED)
def test_normaliser_is_the_shared_one_and_unchanged(text, normalised):
    assert scoring.normalise is text_norm.normalise  # the scorer applies the one the augmenter uses
    assert text_norm.normalise(text) == normalised
    assert text_norm.words(text) == normalised.split()


def test_asr_wer_on_normalised_text_and_seen_unseen_split(files):
    rows = [row(0, "p", "The cat sat.", "asr", prompt_pool="seen"),
            row(1, "p", "a dog ran home", "asr", prompt_pool="unseen")]
    # row 0: "the cat sat" vs "the cat sat" -> 0 errors / 3; row 1: "a dog ran home" vs "a dog home now":
    # delete "ran", insert "now" -> 2 errors / 4.  Total 2 / 7 = 28.57 %; seen 0 %, unseen 50 %.
    m, h = files(rows, ["the Cat, sat", "A dog home now"], extra=["task", "prompt_pool"])
    s = scoring.score_files(m, h)
    assert s["asr wer"] == 28.57 and s["asr wer_seen"] == 0.0 and s["asr wer_unseen"] == 50.0
    assert s["asr n"] == 2


def test_bleu_equals_sacrebleu_and_perfect_is_100(files):
    import sacrebleu

    refs = ["der grosse hund sieht den ball", "ein kleiner vogel findet das buch im park"]
    hyps = ["der grosse hund sieht den ball", "ein kleiner vogel findet buch im park"]
    m, h = files([row(i, "p", r, "st") for i, r in enumerate(refs)], hyps, extra=["task"])
    assert scoring.score_files(m, h)["st bleu"] == round(sacrebleu.corpus_bleu(hyps, [refs]).score, 2)
    m, h = files([row(i, "p", r, "st") for i, r in enumerate(refs)], refs, extra=["task"])
    assert scoring.score_files(m, h)["st bleu"] == 100.0


def test_label_accuracy_uses_the_first_label_named(files):
    rows = [row(0, "p", "The speaker sounds happy.", "er", label="happy"),
            row(1, "p", "The speaker sounds sad.", "er", label="sad"),
            row(2, "p", "The speaker sounds angry.", "er", label="angry"),
            row(3, "p", "The speaker sounds neutral.", "er", label="neutral")]
    # 0 right; 1 names "happy" before "sad" -> wrong; 2 right; 3 names nothing -> wrong: 2/4
    hyps = ["Happy!", "happy, not sad", "The speaker sounds angry.", "I cannot tell"]
    m, h = files(rows, hyps, extra=["task", "label"])
    assert scoring.score_files(m, h)["er accuracy"] == 0.5


def test_sv_yes_no_and_guard_counts(files):
    rows = [row(0, "p", "Yes, there is only one speaker.", "sv", label="yes"),
            row(1, "p", "No, there are two speakers.", "sv", label="no"),
            row(2, "p", "No, there are two speakers.", "sv", label="no")]
    hyps = ["Yes, there is only one speaker.", "No, there are two speakers.", "yes yes yes yes"]
    m, h = files(rows, hyps, guards=[(2, "loop"), (1, "task_max_len")], extra=["task", "label"])
    s = scoring.score_files(m, h)
    assert s["sv accuracy"] == round(2 / 3, 4)
    assert s["sv guard_loop"] == 1 and s["sv guard_task_max_len"] == 1


def test_sqa_containment_without_labels_and_it_exact_match(files):
    rows = [row(0, "Which object?", "the ball", "sqa"), row(1, "Which object?", "the tree", "sqa"),
            {**row(2, "Spell cat.", "c-a-t", "it"), "audio": "", "n_frames": "0", "with_speech": "False"},
            {**row(3, "Say dog twice.", "dog dog", "it"), "audio": "", "n_frames": "0", "with_speech": "False"}]
    hyps = ["It is the ball.", "a box", "C-A-T", "dog dog dog"]
    m, h = files(rows, hyps, extra=["task"])
    s = scoring.score_files(m, h)
    assert s["sqa accuracy"] == 0.5
    # "c a t" == "c a t" (dashes are punctuation); "dog dog dog" != "dog dog" but contains it
    assert s["it accuracy"] == 0.5 and s["it containment"] == 1.0


def test_sqqa_answers_are_right_when_they_name_the_answer_or_one_of_its_variants(files):
    rows = [{**row(0, "Answer the question.", "The answer is eight.", "sqqa"), "label": "eight|8"},
            {**row(1, "Answer the question.", "The answer is Paris.", "sqqa"), "label": "paris"},
            {**row(2, "Answer the question.", "The answer is Paris.", "sqqa"), "label": "paris"},
            row(3, "", "Canberra", "sqqa")]  # no label: the target is the answer (the reference's rows)
    hyps = ["A spider has 8 legs.", "The capital of France is Paris.", "It is Berlin.", "canberra"]
    m, h = files(rows, hyps, extra=["task", "label"])
    assert scoring.score_files(m, h)["sqqa accuracy"] == 0.75


def test_multi_task_ifr_and_accuracy(files):
    markers = json.dumps(["The transcription is:", "The German translation is:"])
    subs = json.dumps(["asr", "st"])
    rows = [row(i, "To begin, transcribe. Then, translate.", "x", "asr+st", subtasks=subs, sub_markers=markers,
                sub_targets=json.dumps(["the big dog sees the ball", "der grosse hund sieht den ball"]))
            for i in range(4)]
    hyps = [
        # followed, both right -> ifr 1, acc 1
        "The transcription is: the big dog sees the ball The German translation is: der grosse hund sieht den ball",
        # followed, translation 4 errors of 6 words (> 50 %) -> ifr 1, acc 0
        "The transcription is: the big dog sees the ball The German translation is: der hund",
        # wrong order -> ifr 0
        "The German translation is: der grosse hund sieht den ball The transcription is: the big dog sees the ball",
        # second part missing -> ifr 0
        "The transcription is: the big dog sees the ball",
    ]
    m, h = files(rows, hyps, extra=["task", "subtasks", "sub_markers", "sub_targets"])
    s = scoring.score_files(m, h)
    assert s["multi ifr"] == 0.5 and s["multi accuracy"] == 0.25


def test_rouge_by_hand():
    # ref "a b c d", hyp "a b d": R1 overlap 3, P 3/3, R 3/4 -> F 6/7; R2 ref {ab,bc,cd} hyp {ab,bd}: 1 -> P 1/2,
    # R 1/3 -> F 0.4; LCS "a b d" = 3 -> F 6/7
    r = scoring.rouge("a b c d", "a b d")
    assert r == pytest.approx({"rouge1": 6 / 7, "rouge2": 0.4, "rougeL": 6 / 7})


def test_rouge_stems_words_as_rouge_score_does():
    # Porter stems of the words over 3 letters: ref "the cat were run home", hyp "the cat run home".
    # R1: 4 shared, P 4/4, R 4/5 -> F 8/9; R2: ref {the cat, cat were, were run, run home}, hyp {the cat,
    # cat run, run home}: 2 shared, P 2/3, R 2/4 -> F 4/7; LCS "the cat run home" = 4 -> F 8/9.
    # Without stemming only "the" and "home" would match (R1 F 4/9).
    r = scoring.rouge("The cats were running home.", "the cat runs home")
    assert r == pytest.approx({"rouge1": 8 / 9, "rouge2": 4 / 7, "rougeL": 8 / 9})
    assert scoring.rouge("a b", "") == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_cot_rows_get_rouge_in_percent(files):
    rows = [row(0, "p", "The cats were running home.", "cot"), row(1, "p", "a b c d", "cot")]
    m, h = files(rows, ["the cat runs home", "a b d"], extra=["task"])
    s = scoring.score_files(m, h)
    # means of the two rows above: R1 (8/9 + 6/7) / 2, R2 (4/7 + 0.4) / 2, RL as R1
    assert s["cot rouge1"] == round(100 * (8 / 9 + 6 / 7) / 2, 2) == s["cot rougeL"]
    assert s["cot rouge2"] == round(100 * (4 / 7 + 0.4) / 2, 2) and "cot bertscore" not in s


# ------------------------------------------------------------------------------------- BERTScore
WORDS = "the a cat dog sat ran on mat home big small sees ball".split()


def tiny_bert(path, layers=2):
    """A random 2-layer BERT and a word-level tokenizer built from a vocabulary file, saved to ``path``."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    os.makedirs(path, exist_ok=True)
    vocab = os.path.join(path, "vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(WORDS) + 5, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(path)
    BertTokenizer(vocab, model_max_length=64).save_pretrained(path)
    return path


def bertscore_by_definition(path, refs, hyps, layer):
    """BERTScore F1 (Zhang et al. 2020) as bert-score computes it without idf: each token of one side is
    matched to its most similar token of the other side, [CLS]/[SEP] included as matches but not averaged."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()

    def embed(text):
        with torch.no_grad():
            hs = model(**tok(text, return_tensors="pt"), output_hidden_states=True).hidden_states[layer][0]
        return torch.nn.functional.normalize(hs, dim=-1)

    f1 = []
    for r, h in zip(refs, hyps):
        if not h:
            f1.append(0.0)
            continue
        sim = embed(h) @ embed(r).T
        p, rec = sim.max(1).values[1:-1].mean().item(), sim.max(0).values[1:-1].mean().item()
        f1.append(2 * p * rec / (p + rec))
    return 100 * sum(f1) / len(f1)


def test_bertscore_is_bert_score_s_on_a_local_model_directory(tmp_path):
    require_installed("bert_score")
    path = tiny_bert(str(tmp_path / "tiny_bert"))
    refs = ["the cat sat on the mat", "a dog ran home", "the big ball", "a small dog"]
    hyps = ["the cat sat on mat", "a small dog ran", "ball", ""]
    for layer in (-1, 1):
        assert scoring.bertscore(refs, hyps, path, layer=layer) == pytest.approx(
            bertscore_by_definition(path, refs, hyps, layer), abs=1e-4)
    assert scoring.bertscore(refs, hyps, path, layer=-1) != pytest.approx(scoring.bertscore(refs, hyps, path, layer=1))
    assert scoring.bertscore(["the cat"], ["the cat"], path) == pytest.approx(100.0, abs=1e-3)
    with pytest.raises(WavLLMInputError, match="layer 3"):
        scoring.bertscore(refs, hyps, path, layer=3)


def test_bertscore_through_the_scorer(files, tmp_path):
    require_installed("bert_score")
    path = tiny_bert(str(tmp_path / "tiny_bert"))
    m, h = files([row(0, "p", "the cat sat on the mat", "cot"), row(1, "p", "a dog ran home", "cot")],
                 ["the cat sat on mat", "a small dog ran"], extra=["task"])
    s = scoring.score_files(m, h, bertscore_model=path)
    assert s["cot bertscore"] == round(bertscore_by_definition(
        path, ["the cat sat on the mat", "a dog ran home"], ["the cat sat on mat", "a small dog ran"], -1), 2)


def test_bertscore_takes_only_a_local_directory_and_names_the_missing_package(tmp_path, monkeypatch):
    with pytest.raises(WavLLMInputError, match="never a hub id"):
        scoring.bertscore(["a"], ["a"], "roberta-large")
    path = str(tmp_path / "model")
    os.makedirs(path)
    monkeypatch.setitem(sys.modules, "bert_score", None)  # as if bert-score were not installed
    with pytest.raises(WavLLMInputError, match=r"pip install wavllm_fairseq\[bertscore\]"):
        scoring.bertscore(["a"], ["a"], path)


def test_bertscore_refuses_what_bert_score_would_misread(tmp_path):
    require_installed("bert_score")
    from transformers import BertTokenizer

    path = tiny_bert(str(tmp_path / "my_t5_copy"), layers=1)
    with pytest.raises(WavLLMInputError, match="'t5'"):  # bert-score would load it as a T5 encoder
        scoring.bertscore(["the cat"], ["the cat"], path)
    path = tiny_bert(str(tmp_path / "no_max_length"), layers=1)
    BertTokenizer(os.path.join(path, "vocab.txt")).save_pretrained(path)  # no model_max_length to truncate to
    with pytest.raises(WavLLMInputError, match="model_max_length"):
        scoring.bertscore(["the cat"], ["the cat"], path)


def test_plain_id_tab_text_hypotheses_and_mismatches(tmp_path):
    m = write_manifest(str(tmp_path / "test_asr.tsv"), [row(0, "p", "one two", "asr"), row(1, "p", "three", "asr")],
                       extra=["task"])
    h = tmp_path / "api.txt"
    h.write_text("u1\tthree\nu0\tone\n")
    assert scoring.score_files(m, str(h))["asr wer"] == round(100 / 3, 2)
    h.write_text("u9\tthree\n")
    with pytest.raises(WavLLMInputError, match="u9"):
        scoring.score_files(m, str(h))
    h.write_text("D-5\t-1\tx\n")
    with pytest.raises(WavLLMInputError, match="exceed"):
        scoring.score_files(m, str(h))


def test_cli_ends_with_task_metric_value_lines(files, tmp_path):
    m, h = files([row(0, "p", "a b", "asr"), row(1, "p", "c", "asr")], ["a b", "d"], extra=["task"])
    out = subprocess.run([sys.executable, "-m", "wavllm_fairseq.evaluation.scoring", "--manifest", m, "--hypotheses", h,
                          "--json", str(tmp_path / "s.json")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert "normaliser" in lines[0] and "lower-case" in lines[0]
    assert "asr wer 33.33" in lines
    assert all(len(line.split()) == 3 for line in lines[1:])
    assert json.load(open(tmp_path / "s.json"))["asr wer"] == 33.33
    bad = subprocess.run([sys.executable, "-m", "wavllm_fairseq.evaluation.scoring", "--manifest", m, "--hypotheses",
                          str(tmp_path / "none.txt")], capture_output=True, text=True)
    assert bad.returncode != 0


# ------------------------------------------------------------------------------------------ comparable WERs
COMPARABLE = [row(0, "p", "The colour is grey.", "asr"), row(1, "p", "He has twenty one cats.", "asr")]
COMPARABLE_HYPS = ["the color is gray", "he has 21 cats"]


def test_asr_gets_whisper_normalised_and_fairseq_wers_beside_its_own(files, tmp_path):
    m, h = files(COMPARABLE, COMPARABLE_HYPS, extra=["task"])
    s = scoring.score_files(m, h)
    # this project's normaliser: colour/color, grey/gray -> 2 of 4; twenty one -> 21: 1 sub + 1 del of 5 -> 4/9
    assert s["asr wer"] == 44.44
    # Whisper's EnglishTextNormalizer: "twenty one" -> "21" (row 1: 0 of 4); without the spelling map colour and
    # grey stay British (row 0: 2 of 4) -> 2/8
    assert s["asr wer_whisper"] == 25.0
    # fairseq's wer scorer, defaults (case and punctuation kept): The/the, colour, grey. -> 3 of 4;
    # He/he, twenty/21, one deleted, cats./cats -> 4 of 5 -> 7/9
    assert s["asr wer_fairseq"] == 77.78
    spelling = tmp_path / "whisper-tiny.en"
    spelling.mkdir()
    (spelling / "normalizer.json").write_text(json.dumps({"colour": "color", "grey": "gray"}))
    norm, doc = metrics.whisper_normaliser(str(spelling))  # a Whisper folder, or the file itself
    assert str(spelling / "normalizer.json") in doc
    assert scoring.score_files(m, h, whisper=norm)["asr wer_whisper"] == 0.0
    assert metrics.whisper_normaliser(str(spelling / "normalizer.json"))[0]("The colour") == "the color"
    with pytest.raises(WavLLMInputError, match="spelling map"):
        metrics.whisper_normaliser(str(tmp_path / "nowhere.json"))


def test_fairseq_wer_is_fairseq_s_own_scorer():
    from fairseq.scoring.wer import WerScorer, WerScorerConfig

    refs, hyps = ["A b, c.", "d e"], ["a b c", "d"]
    scorer = WerScorer(WerScorerConfig())
    for r, h in zip(refs, hyps):
        scorer.add_string(r, h)
    assert metrics.comparable_wers(refs, hyps, metrics.whisper_normaliser()[0])["wer_fairseq"] == scorer.score()


def test_cli_names_each_wer_s_normaliser_and_the_missing_spelling_map(files, tmp_path):
    m, h = files(COMPARABLE, COMPARABLE_HYPS, extra=["task"])
    out = subprocess.run([sys.executable, "-m", "wavllm_fairseq.evaluation.scoring", "--manifest", m,
                          "--hypotheses", h], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert "normaliser for WER and matching: lower-case" in lines[0]
    assert "wer_whisper: Whisper's EnglishTextNormalizer (transformers) WITHOUT its spelling map" in lines[0]
    assert "wer_fairseq: fairseq's wer scorer" in lines[0]
    assert {"asr wer 44.44", "asr wer_whisper 25.0", "asr wer_fairseq 77.78"} <= set(lines)
    assert all(len(line.split()) == 3 for line in lines[1:])


def test_reference_file_names_pick_the_metric(tmp_path):
    """The reference's en2de.tsv (its column order, no task column) is scored as ST: BLEU."""
    m = tmp_path / "en2de.tsv"
    m.write_text("id\taudio\tn_frames\ttgt_text\tprompt\twith_speech\n"
                 "0\taudio/st.flac\t34560\tdie katze schlaeft im haus\tTranslate the audio clip into German.\tTrue\n")
    h = tmp_path / "gen.txt"
    h.write_text(generate_output(["die katze schlaeft im haus"]))
    assert scoring.score_files(str(m), str(h)) == {"st bleu": 100.0, "st n": 1}


def test_fairseq_manifests_are_scored_as_the_task_read_them(tmp_path):
    """A speech_to_text TSV without tgt_lang (MuST-C's layout) decoded with task.prompt_pool=st.seen is ST; the
    same pool tells the scorer. A wav2vec manifest scores its .wrd transcripts as ASR."""
    s2t = tmp_path / "tst-COMMON.tsv"
    s2t.write_text("id\taudio\tn_frames\ttgt_text\tspeaker\nu0\ta.wav\t16000\tdie katze schlaeft im haus\tspk\n")
    h = tmp_path / "gen.txt"
    h.write_text(generate_output(["die katze schlaeft im haus"]))
    assert scoring.score_files(str(s2t), str(h))["asr wer"] == 0.0  # no tgt_lang, no pool: ASR
    assert scoring.score_files(str(s2t), str(h), prompt_pool="st.seen") == {"st bleu": 100.0, "st n": 1}
    w2v = tmp_path / "test_clean.tsv"
    w2v.write_text(f"{tmp_path}\ntest-clean/1089/134686/1089-134686-0000.flac\t16000\n")
    (tmp_path / "test_clean.wrd").write_text("HE HOPED THERE WOULD BE STEW\n")
    h.write_text(generate_output(["he hoped there would be stew"]))
    s = scoring.score_files(str(w2v), str(h))
    assert s["asr wer"] == 0.0 and s["asr wer_whisper"] == 0.0 and s["asr wer_fairseq"] == 100.0  # case counts
