"""Chat template, answer-only loss mask, tokenizer/Dictionary id agreement (tiny trained sentencepiece)."""
import pytest
import torch

from wavllm_fairseq.errors import WavLLMInputError
from wavllm_fairseq.data.prompt_template import DEFAULT_SYSTEM_PROMPT, encode_example, render_text
from wavllm_fairseq.data.tokenizer import LlamaDictionary, LlamaTokenizer, SentencePieceDecoder, train_sentencepiece

TEXTS = ["the quick brown fox jumps over the lazy dog", "a cat sat on the mat", "what is said in the audio",
         "[INST] <<SYS>> <</SYS>> <SPEECH> </SPEECH> [/INST]", DEFAULT_SYSTEM_PROMPT, "who speaks", "yes no"] * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_sentencepiece(TEXTS, str(tmp_path_factory.mktemp("tok")), vocab_size=350)


def masked(enc):
    return [t for t, m in zip(enc.post, enc.post_target_mask) if m]


def test_llama_special_ids(tok):
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 0)


# The reference's recipe, re-typed from microsoft/SpeechT5 WavLLM/wavllm/data/speechllm_dataset.py
# (commit 5d66cf5): the strings at lines 227-233, left = encode(left_str, bos=True) at line 323 with
# left_str built at line 422, right = encode(" " + E_SPEECH + " " + prompt + " " + E_INST) at line 324,
# the prompt adapter's input encode('"' + prompt + '"', bos=False) at line 319, the target
# encode(tgt, bos=False, eos=True) at line 303. Its Tokenizer.encode (data/tokenizer.py) is
# sentencepiece's encode plus optional bos/eos.
REF_B_INST, REF_B_SYS, REF_E_SYS, REF_E_INST = "[INST]", "<<SYS>>\n", "\n<</SYS>>\n\n", "[/INST]"
REF_B_SPEECH, REF_E_SPEECH = "<SPEECH>", "</SPEECH>"
REF_SYSTEM = ("As a helpful language and speech assistant, you are able to understand the speech content provided "
              "by the user, and assist the user with a variety of tasks using natural language.")


def ref_left(tok):
    return [tok.bos_id] + list(tok.sp.encode(REF_B_INST + REF_B_SYS + REF_SYSTEM + REF_E_SYS + REF_B_SPEECH))


def ref_right(tok, prompt):
    return list(tok.sp.encode(" " + REF_E_SPEECH + " " + prompt + " " + REF_E_INST))


def ref_adapter(tok, prompt):
    return list(tok.sp.encode('"' + prompt + '"'))


PROMPTS = ["What is said?", "Translate the audio clip into German.", ""]
# this file's tokenizer (sentencepiece, vocab 350, trained on TEXTS): the ids of the reference recipe
PINNED_RIGHT = [267, 328, 281, 304, 321, 306, 90, 312, 263, 306, 269, 264, 307, 287, 66, 293, 328, 305, 342]
PINNED_RIGHT_EMPTY = [267, 328, 281, 304, 321, 293, 328, 305, 342]
PINNED_ADAPTER = [[306, 37, 90, 312, 263, 306, 269, 264, 307, 287, 66, 37],
                  [306, 37, 339, 317, 265, 309, 319, 263, 308, 262, 259, 314, 316, 315, 313, 295, 319, 315, 323, 306,
                   288, 310, 313, 306, 74, 266, 343, 265, 344, 37],
                  [306, 37, 37]]
PINNED_LEFT = [1, 293, 305, 342, 320, 320, 298, 277, 13, 345, 309, 259, 306, 261, 319, 323, 330, 314, 319, 272, 265,
               286, 299, 259, 270, 276, 300, 259, 292, 301, 265, 310, 333, 297, 313, 314, 259, 317, 308, 259, 329, 319,
               308, 260, 313, 268, 270, 266, 309, 310, 265, 316, 262, 276, 300, 295, 313, 290, 308, 290, 306, 323, 291,
               332, 287, 308, 316, 294, 325, 262, 275, 266, 333, 259, 270, 259, 292, 301, 262, 275, 266, 274, 315, 310,
               312, 259, 306, 332, 307, 317, 315, 308, 310, 325, 273, 330, 260, 307, 309, 289, 275, 288, 322, 296, 263,
               314, 317, 307, 319, 272, 265, 286, 299, 344, 13, 320, 320, 328, 298, 277, 13, 13, 320, 281, 304, 321]


def test_system_prompt_is_the_references():
    assert DEFAULT_SYSTEM_PROMPT == REF_SYSTEM


@pytest.mark.parametrize("prompt", PROMPTS)
def test_token_ids_equal_the_reference_recipe(tok, prompt):
    enc = encode_example(tok, [(prompt, "a cat sat")], with_speech=True)
    assert enc.pre == ref_left(tok)
    gen_len = enc.post_target_mask.index(True)
    assert enc.post[:gen_len] == ref_right(tok, prompt)
    assert enc.post[gen_len:] == list(tok.sp.encode("a cat sat")) + [tok.eos_id]
    assert enc.adapter_input == ref_adapter(tok, prompt)  # no <s>; the empty prompt is '""'


def test_pinned_ids_with_the_test_tokenizer(tok):
    # literal ids (this file's tokenizer), so a change of recipe and of tokenizer handling both show
    assert encode_example(tok, [("What is said?", None)], with_speech=True).post == PINNED_RIGHT
    assert [encode_example(tok, [(p, None)], with_speech=True).adapter_input for p in PROMPTS] == PINNED_ADAPTER
    assert encode_example(tok, [("", None)], with_speech=True).post == PINNED_RIGHT_EMPTY
    assert encode_example(tok, [("x", None)], with_speech=True).pre == PINNED_LEFT


def test_speech_row_layout_and_mask(tok):
    enc = encode_example(tok, [("What is said?", "a cat sat")], with_speech=True)
    assert enc.pre[0] == tok.bos_id
    assert tok.decode(enc.pre) == "[INST]<<SYS>>\n" + DEFAULT_SYSTEM_PROMPT + "\n<</SYS>>\n\n<SPEECH>"
    # the mask covers exactly the answer and its </s>
    assert masked(enc) == tok.encode("a cat sat") + [tok.eos_id]
    assert enc.post_target_mask[-1] and enc.post[-1] == tok.eos_id
    first = enc.post_target_mask.index(True)
    assert not any(enc.post_target_mask[:first]) and all(enc.post_target_mask[first:])
    assert tok.decode(enc.post[:first]).strip() == "</SPEECH> What is said? [/INST]"
    assert enc.instruction == tok.encode("What is said?")
    assert enc.num_target_tokens == len(tok.encode("a cat sat")) + 1


def test_text_only_row_keeps_the_references_strings(tok):
    # the reference builds left/right the same way for every row; only the speech span is empty
    enc = encode_example(tok, [("who speaks", "yes")], with_speech=False)
    speech = encode_example(tok, [("who speaks", "yes")], with_speech=True)
    assert (enc.pre, enc.post) == (speech.pre, speech.post) and not enc.has_speech
    assert masked(enc) == tok.encode("yes") + [tok.eos_id]
    assert render_text([("who speaks", "yes")], False) == (
        "<s>[INST]<<SYS>>\n" + DEFAULT_SYSTEM_PROMPT + "\n<</SYS>>\n\n<SPEECH> </SPEECH> who speaks [/INST]yes</s>")
    assert render_text([("who speaks", "yes")], True, speech="{S}").count("<SPEECH>{S} </SPEECH> who speaks") == 1


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
    assert enc.post[: enc.turn_starts[0]] == ref_right(tok, "") and enc.instruction == []
    assert enc.adapter_input == ref_adapter(tok, "") != []


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
