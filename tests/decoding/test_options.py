"""DecodingOptions builds every generator: its defaults are the generator's, fairseq-generate's arguments and the
task's fields map onto it, and ``decode`` on a built prefix is what ``generate`` decodes (nothing per call on self)."""
import inspect

import pytest
from omegaconf import OmegaConf

from wavllm_fairseq.decoding.generator import WavLLMGenerator
from wavllm_fairseq.decoding.options import DecodingOptions, static_for
from wavllm_fairseq.tasks.instruction import WavLLMInstructionConfig

from test_generator import Dict, batch, gen, model_with_lora, tokens


def test_the_options_are_the_generators_keywords_with_the_same_defaults():
    params = inspect.signature(WavLLMGenerator.__init__).parameters
    keywords = {n: p.default for n, p in params.items() if n not in ("self", "models", "tgt_dict")}
    options = DecodingOptions()
    assert keywords == {n: getattr(options, n) for n in DecodingOptions.__dataclass_fields__}


def test_fairseq_args_and_the_task_fields_map_onto_the_options():
    task_cfg = OmegaConf.merge(OmegaConf.structured(WavLLMInstructionConfig),
                               dict(seed=1, update_freq=[1], loop_guard_ngram=2, repetition_penalty=1.3,
                                    max_len_per_task="sv:3,er:5", decode_path="static", compile_decode_step=True))
    args = OmegaConf.create(dict(beam=3, max_len_a=0.5, max_len_b=7, min_len=2, unnormalized=True, lenpen=0.8,
                                 temperature=0.9, sampling=False, sampling_topk=5, sampling_topp=0.7,
                                 no_repeat_ngram_size=2, nbest=2))
    got = DecodingOptions.from_fairseq_args(args, task_cfg)
    assert got == DecodingOptions(beam_size=3, max_len_a=0.5, max_len_b=7, min_len=2, normalize_scores=False,
                                  len_penalty=0.8, temperature=0.9, sampling_topk=5, sampling_topp=0.7,
                                  no_repeat_ngram_size=2, repetition_penalty=1.3, loop_guard_ngram=2,
                                  max_len_per_task={"sv": 3, "er": 5}, nbest=2, static=True, compile_step=True)
    # fairseq's defaults for absent arguments; the task's defaults (loop guard 4, auto path, no caps)
    plain = OmegaConf.merge(OmegaConf.structured(WavLLMInstructionConfig), dict(seed=1, update_freq=[1]))
    assert DecodingOptions.from_fairseq_args(OmegaConf.create({}), plain) == DecodingOptions(loop_guard_ngram=4)


def test_build_gives_a_generator_with_the_options():
    m = model_with_lora()
    g = DecodingOptions(beam_size=2, nbest=2, max_len_b=9, loop_guard_ngram=3, max_len_per_task={"sv": 2},
                        static=False).build(m, Dict())
    assert isinstance(g, WavLLMGenerator) and g.model is m
    assert (g.beam_size, g.nbest, g.max_len_b, g.loop_guard_ngram, g.max_len_per_task, g.static) == (
        2, 2, 9, 3, {"sv": 2}, False)


def test_decode_path_names():
    assert [static_for(n) for n in ("auto", "static", "dynamic")] == [None, True, False]
    with pytest.raises(ValueError, match="decode path"):
        static_for("fast")


@pytest.mark.parametrize("beam", [1, 3])
def test_decode_of_a_built_prefix_equals_generate_and_keeps_nothing_per_call_on_the_generator(beam):
    m, s = model_with_lora(2), batch()
    s["task_names"] = ["asr", "sv", "asr"]
    g = gen(m, beam_size=beam, max_len_per_task={"sv": 2})
    attributes = set(vars(g))
    full = g.generate([m], s)
    assert set(vars(g)) == attributes  # per-call state lives in a DecodeState, not on the generator
    prefix = m.build_generation_prefix(s["net_input"])
    caps, cap_is_task = g._length_caps(s, prefix)
    assert caps == [12, 2, 12] and cap_is_task == [False, True, False]
    assert tokens(g.decode(prefix, caps, cap_is_task=cap_is_task)) == tokens(full)
