"""examples/wavllm/config/decode.yaml -> fairseq-generate flags: every flag parses in fairseq-generate's
own parser to the yaml's value, and a typo is an error naming the key."""
import os

import pytest
from fairseq import options

from wavllm_fairseq.tools.decode_args import decode_args, load, main
from wavllm_fairseq.errors import WavLLMInputError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DECODE_YAML = os.path.join(REPO, "examples", "wavllm", "config", "decode.yaml")


def parse_generate(flags):
    parser = options.get_generation_parser()
    return options.parse_args_and_arch(parser, input_args=["/data", "--path", "ckpt.pt", *flags])


def test_the_shipped_decode_yaml_parses_in_fairseq_generate_to_its_values():
    config = load(DECODE_YAML)
    args = parse_generate(decode_args(config))
    assert args.task == "wavllm_instruction"
    for group in ("generation", "dataset", "task"):
        for key, value in config[group].items():
            if key != "_name":
                assert getattr(args, key) == value, (group, key)


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
