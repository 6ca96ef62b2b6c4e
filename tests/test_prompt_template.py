"""Chat template, answer-only loss mask, tokenizer/Dictionary id agreement (tiny trained sentencepiece)."""
import pytest
import torch

from wavllm_fairseq.errors import WavLLMInputError
from wavllm_fairseq.prompt_template import DEFAULT_SYSTEM_PROMPT, encode_example, render_text
from wavllm_fairseq.tokenizer import LlamaDictionary, LlamaTokenizer, SentencePieceDecoder, train_sentencepiece

TEXTS = ["the quick brown fox jumps over the lazy dog", "a cat sat on the mat", "what is said in the audio",
         "[INST] <<SYS>> <</SYS>> <SPEECH> </SPEECH> [/INST]", DEFAULT_SYSTEM_PROMPT, "who speaks", "yes no"] * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_sentencepiece(TEXTS, str(tmp_path_factory.mktemp("tok")), vocab_size=350)


def masked(enc):
    return [t for t, m in zip(enc.post, enc.post_target_mask) if m]


def test_llama_special_ids(tok):
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 0)


def test_speech_row_layout_and_mask(tok):
    enc = encode_example(tok, [("What is said?", "a cat sat")], with_speech=True)
    assert enc.pre[0] == tok.bos_id and tok.decode(enc.pre).endswith(" <SPEECH>")
    assert tok.decode(enc.pre).startswith("[INST]<<SYS>>\n " + DEFAULT_SYSTEM_PROMPT + " \n<</SYS>>\n\n")
    # the mask covers exactly the answer and its </s>
    assert masked(enc) == tok.encode("a cat sat") + [tok.eos_id]
    assert enc.post_target_mask[-1] and enc.post[-1] == tok.eos_id
    first = enc.post_target_mask.index(True)
    assert not any(enc.post_target_mask[:first]) and all(enc.post_target_mask[first:])
    assert tok.decode(enc.post[:first]) == "</SPEECH>What is said? [/INST]"
    assert enc.instruction == tok.encode("What is said?")
    assert enc.num_target_tokens == len(tok.encode("a cat sat")) + 1


def test_text_only_row_has_no_speech_tags(tok):
    enc = encode_example(tok, [("who speaks", "yes")], with_speech=False)
    text = tok.decode(enc.pre + enc.post)
    assert "<SPEECH>" not in text and "</SPEECH>" not in text
    assert masked(enc) == tok.encode("yes") + [tok.eos_id]
    # same words as the rendered template (segments are tokenized separately: spacing may differ)
    assert text.split() == render_text([("who speaks", "yes")], False)[3:].replace("</s>", "").replace("[/INST]", "[/INST] ").split()


def test_multi_round_masks_every_answer(tok):
    turns = [("what is said", "a cat"), ("who speaks", "the dog")]
    enc = encode_example(tok, turns, with_speech=True)
    assert masked(enc) == tok.encode("a cat") + [tok.eos_id] + tok.encode("the dog") + [tok.eos_id]
    # the second turn starts a new <s>[INST] ... [/INST] block, unmasked
    second = enc.turn_starts[1]
    block = enc.post[second - len(tok.encode("[INST] who speaks [/INST]")) - 1: second]
    assert block[0] == tok.bos_id and not any(enc.post_target_mask[second - len(block): second])


def test_generation_prefix_is_a_prefix_of_training_sequence(tok):
    turns = [("what is said", "a cat"), ("who speaks", "the dog")]
    full = encode_example(tok, turns, with_speech=True)
    gen = encode_example(tok, turns[:-1] + [("who speaks", None)], with_speech=True)
    assert full.pre == gen.pre and full.post[: len(gen.post)] == gen.post
    assert not any(gen.post_target_mask[enc_start:] for enc_start in [gen.turn_starts[-1]])
    assert len(gen.post) == full.turn_starts[-1]


def test_empty_spoken_question_allowed_with_speech(tok):
    enc = encode_example(tok, [("", "yes")], with_speech=True)
    assert tok.decode(enc.post).startswith("</SPEECH> [/INST]") and enc.instruction == []


def test_open_turn_only_last(tok):
    with pytest.raises(ValueError):
        encode_example(tok, [("a", None), ("b", "c")], with_speech=False)


def test_dictionary_ids_equal_tokenizer_ids_and_decoder_roundtrip(tok):
    d = LlamaDictionary.from_tokenizer(tok)
    assert len(d) == len(tok)
    assert (d.bos(), d.eos(), d.unk(), d.pad()) == (1, 2, 0, 0)
    ids = tok.encode("the quick brown fox")
    for i in ids:
        assert d.index(tok.piece(i)) == i and d[i] == tok.piece(i)
    pieces = d.string(torch.tensor(ids + [tok.eos_id]))
    assert SentencePieceDecoder(tok).decode(pieces) == "the quick brown fox"


def test_missing_tokenizer_names_the_file(tmp_path):
    with pytest.raises(WavLLMInputError, match="tokenizer.model"):
        LlamaTokenizer.from_dir(str(tmp_path))
    (tmp_path / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(WavLLMInputError, match="cannot read"):
        LlamaTokenizer.from_dir(str(tmp_path))
