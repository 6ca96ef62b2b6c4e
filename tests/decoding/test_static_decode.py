"""The static-cache decoding step (static_decode.py) against the dynamic path, on wavllm_tiny on the CPU
(the same step a CUDA graph captures on a GPU runs eagerly here): same tokens and scores for greedy,
beam and seeded sampling, with rows finishing at different steps (slot map, then compaction to
smaller power-of-two slot counts) and the stage-2 per-utterance LoRA scale."""
import pytest
import torch

from wavllm_fairseq.decoding.static_decode import StaticDecoder, _buckets, supported

from test_generator import batch, gen, model_with_lora, row, tokens

LENGTHS = (8000, 3200, 0, 4800, 1600, 6400)
CAPS = {"a": 3, "b": 5, "c": 9, "d": 14}


def mixed(seed=0):
    """Six rows whose answers are capped at 3..14 tokens: rows leave the batch at four different steps."""
    s = batch(LENGTHS, pre=(5, 7, 4, 6, 3, 5), post=(6, 3, 9, 4, 5, 7), seed=seed)
    s["task_names"] = ["a", "b", "c", "d", "a", "c"]
    return s


def both(m, s, **kw):
    kw.setdefault("max_len_per_task", CAPS)
    kw.setdefault("max_len_b", 20)
    dyn = gen(m, static=False, **kw).generate([m], s)
    sta = gen(m, static=True, **kw).generate([m], s)
    return dyn, sta


def same(dyn, sta):
    assert tokens(dyn) == tokens(sta)
    for a, b in zip(dyn, sta):
        for ha, hb in zip(a, b):
            torch.testing.assert_close(ha["positional_scores"], hb["positional_scores"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("stage", [1, 2])
def test_static_greedy_equals_dynamic(stage):
    m = model_with_lora(stage)
    dyn, sta = both(m, mixed())
    same(dyn, sta)
    assert len({len(t) for t in tokens(sta)}) >= 4  # rows left the batch at four or more different steps


def test_static_beam_equals_dynamic():
    m = model_with_lora(2)
    dyn, sta = both(m, mixed(1), beam_size=3, nbest=2)
    same(dyn, sta)


def test_static_sampling_equals_dynamic_with_the_same_seed():
    m = model_with_lora(1)
    torch.manual_seed(11)
    dyn = gen(m, static=False, sampling=True, temperature=0.5, max_len_per_task=CAPS).generate([m], mixed())
    torch.manual_seed(11)
    sta = gen(m, static=True, sampling=True, temperature=0.5, max_len_per_task=CAPS).generate([m], mixed())
    same(dyn, sta)


def test_static_batch_equals_rows_alone():
    m = model_with_lora(2)
    s = mixed()
    together = tokens(gen(m, static=True, max_len_per_task=CAPS).generate([m], s))
    for b in range(len(LENGTHS)):
        one = row(s, b)
        one["task_names"] = s["task_names"][b: b + 1]
        assert tokens(gen(m, static=True, max_len_per_task=CAPS).generate([m], one))[0] == together[b]


def _decoder(m, s, capacity_extra=10):
    g = gen(m, static=True)
    prefix = m.build_generation_prefix(s["net_input"])
    logits, cache, mask = g._start(prefix)
    dec = StaticDecoder(m.llm, m.lora_scale_context)
    dec.start([(layer.keys, layer.values) for layer in cache.layers], mask, prefix.lora_scale,
              capacity=mask.shape[1] + capacity_extra)
    return dec, logits.argmax(-1)


def test_slots_are_compacted_to_powers_of_two_and_map_rows():
    m = model_with_lora(2)
    full, tok = _decoder(m, mixed())
    dec, _ = _decoder(m, mixed())
    assert dec.slots == 6
    dec.select(torch.tensor([0, 2, 3, 5]))  # 4 of 6 live: slots kept, rows mapped
    assert dec.slots == 6 and dec.rows.tolist() == [0, 2, 3, 5]
    dec.select(torch.tensor([1, 3]))  # 2 of 6 live (old rows 2 and 5): gathered into 2 slots
    assert dec.slots == 2 and dec.rows.tolist() == [0, 1]
    dec.select(torch.tensor([1, 1, 0]))  # beams: repeats and growth past the slot count -> 4 slots
    assert dec.slots == 4 and dec.rows.tolist() == [0, 1, 2]
    out = dec.step(tok[[5, 5, 2]])
    ref = full.step(tok)[[5, 5, 2]]  # the same rows, decoded in the full batch
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert [_buckets(n) for n in (1, 2, 3, 5, 9)] == [1, 2, 4, 8, 16]


def test_unsupported_llms_say_why():
    m = model_with_lora(1)
    assert supported(m.llm) is None
    m.llm.config.model_type = "gemma"
    assert "gemma" in supported(m.llm)
    with pytest.raises(ValueError, match="does not support"):
        StaticDecoder(m.llm, m.lora_scale_context)


def test_one_generator_reuses_its_buffers_across_batches():
    """Buffers (and on a GPU the captured graphs) are kept per slot count and reused by the next batch:
    nothing of a previous batch may leak into the next one."""
    m = model_with_lora(2)
    g = gen(m, static=True, max_len_per_task=CAPS)
    first = tokens(g.generate([m], mixed(0)))
    decoder = g._decoder
    second = tokens(g.generate([m], mixed(3)))
    again = tokens(g.generate([m], mixed(0)))
    assert g._decoder is decoder and len(decoder.sets) > 1  # reused, with compacted slot counts
    assert again == first
    assert second == tokens(gen(m, static=False, max_len_per_task=CAPS).generate([m], mixed(3)))


def test_the_model_holds_one_decoder_for_every_generator_and_merging_lora_resets_it():
    from wavllm_fairseq.decoding.static_decode import release_decoders

    m = model_with_lora(1)
    a = gen(m, static=True, max_len_per_task=CAPS)
    a.generate([m], mixed(0))
    b = gen(m, static=True, max_len_per_task=CAPS)
    b.generate([m], mixed(0))
    assert a._decoder is b._decoder  # buffers (and on a GPU graphs) shared through the model
    sets = a._decoder.sets
    m.merge_lora()  # a captured step that still ran the LoRA branch would now add it twice
    merged = tokens(gen(m, static=True, max_len_per_task=CAPS).generate([m], mixed(0)))
    assert a._decoder.sets is not sets
    assert merged == tokens(gen(m, static=False, max_len_per_task=CAPS).generate([m], mixed(0)))
    release_decoders(m)
    assert "_static_decoders" not in m.__dict__


@pytest.mark.parametrize("stage", [1, 2])
def test_compiled_static_step_equals_dynamic_and_compiles_once_for_all_layers(stage):
    """The torch.compile'd step (what a GPU captures with ``compile_step=True``) gives the dynamic path's
    tokens and scores, through four slot counts (a static then a symbolic slot count) and a second
    batch whose per-utterance LoRA scales differ (nothing of the first batch is baked in). The layer step
    is compiled once for all six layers, per shape: the first slot count, then a symbolic slot count, then
    one slot (dynamo specializes sizes 0 and 1): three graphs, not three per layer; no graph breaks."""
    from torch._dynamo.utils import counters

    from wavllm_fairseq.models.wavllm import WavLLMModel

    torch._dynamo.reset()  # dynamo keeps its compilations per code object, across tests
    counters.clear()
    m = model_with_lora(stage)
    torch.manual_seed(1)
    deep = WavLLMModel.from_arch("wavllm_tiny", vocab_size=m.llm.config.vocab_size, prompt_adapter=stage == 2,
                                 llama_layers=6)
    with torch.no_grad():
        for n, p in deep.named_parameters():
            if "lora_B" in n or "prompt_scale" in n:
                p.normal_(0, 0.3)
    deep.eval()
    assert len(deep.llm.model.layers) == 6
    g = gen(deep, static=True, compile_step=True, max_len_per_task=CAPS, max_len_b=20)
    for seed in (0, 3):
        dyn = gen(deep, static=False, max_len_per_task=CAPS, max_len_b=20).generate([deep], mixed(seed))
        same(dyn, g.generate([deep], mixed(seed)))
    assert g._decoder.compiled and len(g._decoder.sets) >= 3
    assert 1 <= counters["stats"]["unique_graphs"] <= 3, dict(counters["stats"])  # ran compiled, not per layer
    assert not counters["graph_break"], dict(counters["graph_break"])  # one graph per layer step


def test_task_and_python_api_pass_the_compile_option_to_the_generator(tmp_path, monkeypatch):
    """``task.decode_path`` / ``task.compile_decode_step`` (fairseq-generate ``--decode-path``,
    ``--compile-decode-step``) and ``WavLLM.generate(compile_step=)`` reach the generator; the API follows
    the task's settings unless told otherwise."""
    import os

    from omegaconf import OmegaConf

    from helpers import make_corpus
    from wavllm_fairseq import hub
    from wavllm_fairseq.decoding import options
    from wavllm_fairseq.tasks.instruction import WavLLMInstructionConfig, WavLLMInstructionTask

    corpus = make_corpus(str(tmp_path / "corpus"), n_train=2, n_test=2)
    built = {}
    m = model_with_lora(1)
    for path, flag in (("auto", False), ("static", True), ("dynamic", False)):
        cfg = OmegaConf.merge(OmegaConf.structured(WavLLMInstructionConfig),
                              dict(data=os.path.dirname(corpus["test_asr"]), seed=1, update_freq=[1],
                                   decode_path=path, compile_decode_step=flag))
        task = WavLLMInstructionTask.setup_task(cfg)
        g = task.build_generator([m], OmegaConf.create(dict(beam=1, max_len_b=5)))
        built[path] = (g.static, g.compile_step)
    assert built == {"auto": (None, False), "static": (True, True), "dynamic": (False, False)}

    seen = []

    class Recorder(options.WavLLMGenerator):  # every generator is built by DecodingOptions.build
        def __init__(self, *a, **kw):
            seen.append((kw.get("static"), kw.get("compile_step")))
            super().__init__(*a, **kw)

    monkeypatch.setattr(options, "WavLLMGenerator", Recorder)
    api = hub.WavLLM(m, task)  # the last task: decode_path=dynamic, compile_decode_step=False
    for arg, want in ((None, (False, False)), (True, (False, True))):
        api.generate([], [], compile_step=arg)
        assert seen[-1] == want
