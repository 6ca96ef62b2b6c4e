"""examples/wavllm/config/decode.yaml and decode_reference.yaml -> fairseq-generate flags: every flag parses in
fairseq-generate's own parser to the yaml's value, decode_reference.yaml builds the reference's decoding, and a
typo is an error naming the key."""
import os

import pytest
from fairseq import options

from wavllm_fairseq.tools.decode_args import decode_args, load, main
from wavllm_fairseq.errors import WavLLMInputError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DECODE_YAML = os.path.join(REPO, "examples", "wavllm", "config", "decode.yaml")
REFERENCE_YAML = os.path.join(REPO, "examples", "wavllm", "config", "decode_reference.yaml")


def parse_generate(flags):
    parser = options.get_generation_parser()
    return options.parse_args_and_arch(parser, input_args=["/data", "--path", "ckpt.pt", *flags])


@pytest.mark.parametrize("path", [DECODE_YAML, REFERENCE_YAML], ids=os.path.basename)
def test_the_shipped_decode_yaml_parses_in_fairseq_generate_to_its_values(path):
    config = load(path)
    args = parse_generate(decode_args(config))
    assert args.task == "wavllm_instruction"
    for group in ("generation", "dataset", "task"):
        for key, value in config[group].items():
            if key != "_name":
                assert getattr(args, key) == value, (group, key)


def test_decode_reference_yaml_decodes_as_the_reference():
    """inference_sft.sh: --sampling --beam 1 --nbest 1 --temperature 0.5 --max-len-a 0 --max-len-b 512 (counting the
    right prompt its generate.py forces), max_sentences=1, no loop guard; sampling seeded by fairseq's --seed."""
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from wavllm_fairseq.decoding.options import DecodingOptions

    args = parse_generate(decode_args(load(REFERENCE_YAML)) + ["--seed", "7"])
    assert args.batch_size == 1 and args.seed == 7
    cfg = convert_namespace_to_omegaconf(args)
    got = DecodingOptions.from_fairseq_args(cfg.generation, cfg.task)
    assert got == DecodingOptions(sampling=True, temperature=0.5, sampling_topk=-1, sampling_topp=-1.0, beam_size=1,
                                  nbest=1, max_len_a=0, max_len_b=512, min_len=1, loop_guard_ngram=0,
                                  repetition_penalty=1.0, max_len_counts_prompt=True)
    plain = convert_namespace_to_omegaconf(parse_generate(decode_args(load(DECODE_YAML))))
    assert not DecodingOptions.from_fairseq_args(plain.generation, plain.task).sampling


def test_later_flags_win_and_bools_are_flags():
    args = parse_generate(decode_args({"generation": {"beam": 4, "sampling": True, "temperature": 0.7}})
                          + ["--beam", "2"])
    assert args.beam == 2 and args.sampling is True and args.temperature == 0.7


@pytest.mark.parametrize("config, message", [
    ({"generation": {"beams": 4}}, "generation.beams"),
    ({"decoding": {"beam": 4}}, "unknown group 'decoding'"),
    ({"task": {"_name": "translation"}}, "wavllm_instruction"),
])
def test_typos_are_errors_naming_the_key(config, message):
    with pytest.raises(WavLLMInputError, match=message):
        decode_args(config)


def test_cli_prints_flags_and_fails_cleanly(tmp_path, capsys):
    assert main([DECODE_YAML]) == 0
    assert "--task wavllm_instruction" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("generation:\n  max_len: 20\n")
    assert main([str(bad)]) == 2
    assert "generation.max_len" in capsys.readouterr().err
