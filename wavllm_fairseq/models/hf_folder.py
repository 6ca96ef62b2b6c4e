"""Local Hugging Face folders of the backbones: checked before loading, loaded with the errors named.

Backbones load from a *local* directory in the Hugging Face format through ``transformers``' own
``from_pretrained(local_files_only=True)``, so every layout it reads loads here too: safetensors (one
file or shards with ``model.safetensors.index.json``), pickle ``pytorch_model*.bin`` (read
weights-only), WavLM's legacy weight-norm names (``weight_g`` / ``weight_v``), the rotary ``inv_freq``
buffers old LLaMA shards carry. Nothing is downloaded.

Loading creates the module on the meta device and fills it from the files in the requested dtype
(``model.backbone_dtype``), so no random full-size model is materialised first. What
``transformers`` would only warn about is an error here, named with the folder: a missing folder,
config.json or weight file, a corrupt shard, a tensor whose shape differs from the config, and a
weight the folder lacks (transformers would initialise it randomly: a silent wrong result).
"""
import glob
import json
import logging
import os
import re
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn
from safetensors.torch import load_file

from ..errors import CheckpointError

logger = logging.getLogger(__name__)

LEGACY_WEIGHT_NORM = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}


def _weight_files(path: str) -> List[str]:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        files = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    return files


def read_hf_state_dict(path: str, prefixes: Iterable[str] = ("",)) -> Dict[str, torch.Tensor]:
    """All tensors of a local HF checkpoint whose key starts with one of ``prefixes`` (prefix removed).

    The stored tensors, for comparing a folder with another checkpoint (tools/convert_reference.py);
    models are loaded with :func:`from_pretrained_checked`. The one renaming: torch's legacy
    weight-norm names (``weight_g`` / ``weight_v``, as wavlm-base stores its positional conv) become
    today's module names (``parametrizations.weight.original0`` / ``original1``), so the keys are the
    modules' keys. The first prefix that matches any key wins, so a directory holding a full
    ``WhisperForConditionalGeneration`` (``model.encoder.*``) and one holding a bare encoder
    (``encoder.*`` or no prefix) both work.

    Args:
        path (str): the local Hugging Face folder.
        prefixes (Iterable[str]): key prefixes to try, in order.

    Returns:
        Dict[str, torch.Tensor]: the tensors under the first prefix that matches, by key without it.
    """
    check_backbone_dir(path)
    files = _weight_files(path)
    tensors: Dict[str, torch.Tensor] = {}
    for f in files:
        try:
            if f.endswith(".safetensors"):
                tensors.update(load_file(f))
            else:
                tensors.update(torch.load(f, map_location="cpu", weights_only=True))
        except Exception as e:  # truncated or corrupt shard
            raise CheckpointError(f"cannot read weight file: {e}", file=f, reason="corrupt") from e
    tensors = {re.sub(r"\.(weight_[gv])$", lambda m: "." + LEGACY_WEIGHT_NORM[m.group(1)], k): v
               for k, v in tensors.items()}
    for prefix in prefixes:
        picked = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if picked:
            return picked
    raise CheckpointError(f"no tensor key starts with any of {list(prefixes)} in {path}", file=path,
                          reason="mismatch")


def check_backbone_dir(path: str) -> None:
    """A clear error for a missing folder, config.json, weight file or shard (before transformers runs).

    Args:
        path (str): the local Hugging Face folder.

    Raises:
        CheckpointError: naming the folder or file and what is missing or unreadable.
    """
    if not path or not os.path.isdir(path):
        raise CheckpointError(f"backbone directory does not exist: {path!r} (a local Hugging Face folder: "
                              "config.json + weights)", file=path, reason="missing")
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise CheckpointError(f"missing config.json in backbone directory {path}", file=cfg_file, reason="missing")
    if not _weight_files(path):
        raise CheckpointError(
            f"no weights in {path}: expected *.safetensors or pytorch_model*.bin (a Hugging Face "
            "save_pretrained directory)", file=path, reason="missing")
    for index in glob.glob(os.path.join(path, "*.index.json")):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"unreadable shard index: {e}", file=index, reason="corrupt") from e
        absent = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
        if absent:
            raise CheckpointError(f"shards listed in the index are missing: {absent}", file=index, reason="missing")


def load_config(cls, path: str):
    """The folder's config.json as ``cls`` (e.g. ``LlamaConfig``), after :func:`check_backbone_dir`.

    Args:
        cls: a ``transformers`` ``PretrainedConfig`` class.
        path (str): the local Hugging Face folder.

    Returns:
        PretrainedConfig: ``cls.from_pretrained(path, local_files_only=True)``.
    """
    check_backbone_dir(path)
    return cls.from_pretrained(path, local_files_only=True)


def _dtype_kwargs(dtype: Optional[torch.dtype]) -> dict:
    """``from_pretrained``'s dtype arguments (transformers >= 5.24, setup.py's floor: it always loads through
    the meta device). Hub kernels are off: transformers 5 defaults to them on accelerators, and they are
    fetched at run time (nothing may be) and need the ``kernels`` package."""
    return {"dtype": dtype or torch.float32, "use_kernels": False}


def from_pretrained_checked(cls, path: str, what: str, dtype: Optional[torch.dtype] = None,
                            key_mapping: Optional[Dict[str, str]] = None, may_miss: Sequence[str] = (),
                            expected_extra: Sequence[str] = ()) -> nn.Module:
    """``cls.from_pretrained(path, local_files_only=True)`` with the errors named.

    Any missing weight not in ``may_miss``, and any shape mismatch, is an error; other unused weights
    than ``expected_extra`` are logged.

    Args:
        cls: a ``transformers`` model class (``WhisperEncoder``, ``WavLMModel``, ``AutoModelForCausalLM``).
        path (str): the local Hugging Face folder.
        what (str): the backbone's name in error messages ("LLM", "WavLM", ...).
        dtype (Optional[torch.dtype]): the dtype to load in (default float32).
        key_mapping (Optional[Dict[str, str]]): regex -> replacement for stored keys (transformers').
        may_miss (Sequence[str]): regexes of weights the folder may lack (training-only tensors).
        expected_extra (Sequence[str]): regexes of stored weights this module does not use (a Whisper
            decoder, a WavLM CTC head), not reported.

    Returns:
        nn.Module: the loaded model, in eval mode.
    """
    check_backbone_dir(path)
    kwargs = dict(local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True,
                  **_dtype_kwargs(dtype))
    if key_mapping:
        kwargs["key_mapping"] = key_mapping
    try:
        model, info = cls.from_pretrained(path, **kwargs)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors' SafetensorError, pickle/EOF errors, OSError from a truncated shard
        raise CheckpointError(f"cannot load the {what} weights ({type(e).__name__}: {e}); a shard is corrupt or "
                              "truncated: copy the folder again", file=path, reason="corrupt") from e
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        shown = [f"{k}: file {tuple(a)} vs config {tuple(b)}" for k, a, b in mismatched[:10]]
        raise CheckpointError(f"{len(mismatched)} {what} weights do not match the sizes in config.json: {shown}; "
                              "the config and the weights come from different models", file=path, reason="mismatch")
    missing = sorted(k for k in info.get("missing_keys") or [] if not any(re.search(p, k) for p in may_miss))
    if missing:
        raise CheckpointError(f"{len(missing)} {what} weights are not in the folder (they would be random): "
                              f"{missing[:10]}", file=path, reason="mismatch")
    extra = sorted(k for k in info.get("unexpected_keys") or [] if not any(re.search(p, k) for p in expected_extra))
    if extra:
        logger.warning(f"{path}: {len(extra)} stored tensors are not used by the {what}: {extra[:10]}")
    model.eval()
    return model
