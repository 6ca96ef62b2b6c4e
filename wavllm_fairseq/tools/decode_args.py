"""fairseq-generate arguments from a decoding yaml (``examples/wavllm/config/decode.yaml``).

``fairseq-generate`` reads argparse flags, not Hydra configs. A decoding yaml is written in fairseq's
config groups (``generation``, ``dataset``, ``common_eval``, ``task``) like the training yamls; this
turns it into those flags, checking every key against fairseq's dataclasses and the task's, so a typo
fails here instead of being ignored::

    fairseq-generate /data/wavllm --path stage2/checkpoint_best.pt --gen-subset test_asr \\
        $(wavllm-decode-args examples/wavllm/config/decode.yaml) --results-path decode

``--user-dir`` (this package) and ``--task wavllm_instruction`` come first; flags given after the
``$(...)`` win, as argparse keeps the last value.
"""
import argparse
import dataclasses
import os
import shlex
import sys
from typing import Dict, List, Optional, Sequence

import yaml
from fairseq.dataclass.configs import CommonEvalConfig, DatasetConfig, GenerationConfig

from ..errors import WavLLMInputError
from ..tasks.instruction import WavLLMInstructionConfig

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the plugin (--user-dir)
GROUPS = {"generation": GenerationConfig, "dataset": DatasetConfig, "common_eval": CommonEvalConfig,
          "task": WavLLMInstructionConfig}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def decode_args(config: Dict[str, Dict[str, object]], source: str = "the decoding config") -> List[str]:
    """The fairseq-generate flags of a decoding config, every key checked against its group's dataclass.

    Args:
        config (Dict[str, Dict[str, object]]): {group: {key: value}} (``generation``, ``dataset``,
            ``common_eval``, ``task``).
        source (str): names the config in errors.

    Returns:
        List[str]: the flags, ``--user-dir`` and ``--task`` first.
    """
    args = ["--user-dir", PACKAGE_DIR, "--task", "wavllm_instruction"]
    for group, values in (config or {}).items():
        if group not in GROUPS:
            raise WavLLMInputError(f"{source}: unknown group {group!r}; the groups are {', '.join(GROUPS)}")
        fields = {f.name: f for f in dataclasses.fields(GROUPS[group])}
        for key, value in (values or {}).items():
            if key == "_name" and group == "task":
                if value != "wavllm_instruction":
                    raise WavLLMInputError(f"{source}: task._name must be wavllm_instruction, got {value!r}")
                continue
            if key not in fields:
                raise WavLLMInputError(f"{source}: {group}.{key} is not a fairseq-generate option of that group")
            if isinstance(value, bool):
                if value:
                    args.append(_flag(key))
                elif fields[key].default is True:
                    raise WavLLMInputError(f"{source}: {group}.{key}=false cannot be passed as a flag")
            elif value is not None:
                args += [_flag(key), str(value)]
    return args


def load(path: str) -> Dict[str, Dict[str, object]]:
    """Read a decoding yaml.

    Args:
        path (str): the yaml.

    Returns:
        Dict[str, Dict[str, object]]: its groups of keys.
    """
    if not os.path.isfile(path):
        raise WavLLMInputError(f"decoding config not found: {path}", file=path, reason="missing")
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise WavLLMInputError(f"{path}: expected groups of keys (generation: ..., dataset: ...)", file=path)
    return config


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``wavllm-decode-args`` (prints the flags, shell-quoted) on ``argv`` (default: ``sys.argv[1:]``);
    returns the exit status (2 on a bad config)."""
    p = argparse.ArgumentParser(prog="wavllm-decode-args", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="decoding yaml (e.g. examples/wavllm/config/decode.yaml)")
    args = p.parse_args(argv)
    try:
        print(" ".join(shlex.quote(a) for a in decode_args(load(args.config), args.config)))
    except WavLLMInputError as e:
        print(f"wavllm-decode-args: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
