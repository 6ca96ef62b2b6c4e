"""Checkpoint files: safe reading, safetensors export, atomic writes and clear errors on truncation.

* Safe reading (``load_checkpoint_file``): ``.safetensors`` exports (tensors + a JSON config, no code
  execution possible) always; fairseq ``.pt`` files with ``torch.load(weights_only=True)`` and an
  allow-list of the omegaconf/fairseq container types a checkpoint holds. Full unpickling (which can
  run code from the file) only with ``trust=True``.
* ``export_safetensors`` turns a fairseq checkpoint into ``<name>.safetensors`` + ``<name>.json``.
* ``torch_load`` / ``atomic_copy`` / ``previous_checkpoints_hint``: the pieces fairseq_fixes.py uses
  to make fairseq's own checkpoint copies atomic and its load errors name the file.
"""
import argparse
import collections
import glob
import json
import logging
import os
import shutil
import typing
from typing import Any, Dict

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.base import ContainerMetadata, Metadata
from omegaconf.nodes import AnyNode, BooleanNode, FloatNode, IntegerNode, StringNode
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError

logger = logging.getLogger(__name__)


def _omegaconf_safe_globals():
    return [DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode, BooleanNode, FloatNode, IntegerNode,
            StringNode, typing.Any, collections.OrderedDict, collections.defaultdict, dict, list, int, float, str]


def torch_load(path: str, trust: bool) -> Dict[str, Any]:
    """``torch.load`` of a fairseq checkpoint: weights-only with the allow-list unless ``trust``.

    Args:
        path (str): the checkpoint file.
        trust (bool): allow full unpickling (which can run code from the file).

    Returns:
        Dict[str, Any]: the loaded object.

    Raises:
        CheckpointError: naming the file, for a missing, unsafe, truncated or corrupt one.
    """
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(_omegaconf_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError("checkpoint file not found", file=path, reason="missing")
    except Exception as e:
        msg = str(e)
        if "weights_only" in msg or "Unsupported global" in msg or "WeightsUnpickler" in msg:
            raise CheckpointError(
                f"this checkpoint holds objects that weights-only loading refuses ({msg.splitlines()[0][:200]}); "
                "if you trust the file pass trust_checkpoint=True, or export it once with "
                "`python -m wavllm_fairseq.models.checkpoint_io export CKPT` and load the .safetensors",
                file=path, reason="unsafe") from e
        raise CheckpointError(
            f"cannot read checkpoint ({type(e).__name__}: {msg[:200]}): the file is truncated or corrupt"
            + previous_checkpoints_hint(path), file=path, reason="corrupt") from e


def previous_checkpoints_hint(path: str) -> str:
    """The other checkpoints of ``path``'s folder to resume from, as a clause for an error message.

    Args:
        path (str): a checkpoint file.

    Returns:
        str: "; other checkpoints in that folder: ..." (newest first), or "" when there are none.
    """
    others = sorted((p for p in glob.glob(os.path.join(os.path.dirname(path) or ".", "checkpoint*.pt"))
                     if os.path.abspath(p) != os.path.abspath(path)), key=os.path.getmtime, reverse=True)
    if not others:
        return ""
    return ("; other checkpoints in that folder: " + ", ".join(os.path.basename(p) for p in others[:5])
            + " (resume from one with checkpoint.restore_file=<name>)")


def load_checkpoint_file(path: str, trust: bool = False) -> Dict[str, Any]:
    """A checkpoint from a fairseq ``.pt`` or a ``.safetensors`` export (with its ``.json``), read safely.

    Args:
        path (str): the file.
        trust (bool): allow full unpickling of a ``.pt`` (see :func:`torch_load`).

    Returns:
        Dict[str, Any]: {"model": state dict, "cfg": {"model": ..., "task": ...}}.

    Raises:
        CheckpointError: naming the file, for a missing, unreadable or non-fairseq one.
    """
    if path.endswith(".safetensors"):
        meta_path = path[: -len(".safetensors")] + ".json"
        if not os.path.isfile(meta_path):
            raise CheckpointError(f"missing the config file {meta_path} that goes with the export", file=path,
                                  reason="missing")
        try:
            tensors = load_file(path)
        except Exception as e:
            raise CheckpointError(f"cannot read safetensors file ({e})", file=path, reason="corrupt") from e
        with open(meta_path) as f:
            return {"model": tensors, "cfg": json.load(f)}
    state = torch_load(path, trust)
    if "model" not in state or ("cfg" not in state and "args" not in state):
        raise CheckpointError("not a fairseq checkpoint (no 'model' and 'cfg' entries)", file=path, reason="mismatch")
    if state.get("cfg") is None:
        raise CheckpointError("argparse-era checkpoint without 'cfg' is not supported", file=path, reason="mismatch")
    return state


def export_safetensors(checkpoint: str, out_prefix: str = "", trust: bool = False) -> str:
    """Write ``<prefix>.safetensors`` (model tensors) + ``<prefix>.json`` (model and task config).

    Args:
        checkpoint (str): a fairseq ``.pt`` checkpoint.
        out_prefix (str): the output path without extension (default: the checkpoint's without ``.pt``).
        trust (bool): allow full unpickling of the source (see :func:`torch_load`).

    Returns:
        str: the ``.safetensors`` path.
    """
    state = load_checkpoint_file(checkpoint, trust=trust)
    prefix = out_prefix or os.path.splitext(checkpoint)[0]
    cfg = state["cfg"]
    meta = {k: OmegaConf.to_container(cfg[k], resolve=False) if OmegaConf.is_config(cfg[k]) else cfg[k]
            for k in ("model", "task") if k in cfg}
    tensors = {k: v.contiguous() for k, v in state["model"].items()}
    save_file(tensors, prefix + ".safetensors.tmp")
    os.replace(prefix + ".safetensors.tmp", prefix + ".safetensors")
    with open(prefix + ".json.tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(prefix + ".json.tmp", prefix + ".json")
    return prefix + ".safetensors"


def atomic_copy(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst`` through a temporary file, fsync'ed, then renamed over ``dst``.

    Args:
        src (str): the file to copy.
        dst (str): the destination (replaced whole or not at all).
    """
    tmp = dst + ".tmp"
    shutil.copyfile(src, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)


def main(argv=None) -> int:
    """``python -m wavllm_fairseq.models.checkpoint_io export CKPT``.

    Args:
        argv (Optional[Sequence[str]]): the command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        int: the exit status, 0.
    """
    p = argparse.ArgumentParser(prog="python -m wavllm_fairseq.models.checkpoint_io",
                                description="Export a fairseq checkpoint to safetensors + JSON "
                                            "(safe to share and load).")
    p.add_argument("command", choices=["export"])
    p.add_argument("checkpoint")
    p.add_argument("--out", default="", help="output prefix (default: the checkpoint path without .pt)")
    p.add_argument("--trust", action="store_true",
                   help="allow full unpickling of the source (only for files you trust)")
    args = p.parse_args(argv)
    print(export_safetensors(args.checkpoint, args.out, trust=args.trust))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
