"""Every change this plugin makes to fairseq's own code, in one place.

fairseq is used as released in ``fairseq-fixed`` 0.12.3.1 (the ``fairseq`` import name; upstream
``fairseq==0.12.2`` does not import on Python 3.11). Three of its functions are replaced at run time.
Nothing is patched when the package is imported: ``apply()`` runs when the ``wavllm_instruction`` task is
set up (``WavLLMInstructionTask.setup_task``), which both ``fairseq-hydra-train`` (every distributed worker
too) and ``fairseq-generate`` do before they read or write a checkpoint or gather logging outputs. The
Python API (``WavLLM.from_checkpoint``) reads checkpoints itself (checkpoint_io.py) and needs none of them.

* ``atomic_checkpoints`` replaces ``checkpoint_utils.PathManager.copy``, with which
  ``checkpoint_utils.save_checkpoint`` writes ``checkpoint_last.pt`` / ``checkpoint_best.pt`` by copying
  the new checkpoint in place: a job killed mid-copy leaves a truncated file that the next run resumes
  from. Now: copy to a temporary file, fsync, rename.
* ``named_load_errors`` wraps ``checkpoint_utils.load_checkpoint_to_cpu``: a truncated or corrupt
  checkpoint failed deep inside ``torch.load`` ("PytorchStreamReader failed ..."). Now: a
  ``CheckpointError`` naming the file and the other checkpoints of its folder to resume from.
* ``cpu_all_gather_list`` replaces ``distributed.utils.all_gather_list``, which allocates a
  ``torch.cuda.ByteTensor``: training with several CPU processes (gloo) failed whenever the trainer
  gathered logging outputs that cannot be summed as tensors (ours: per-task loss keys differ between
  workers). Now: without CUDA the gather goes through ``torch.distributed.all_gather_object``; with
  CUDA it is fairseq's own function.

Turn them off with the environment variable ``WAVLLM_FAIRSEQ_FIXES``: ``0`` (none) or a comma-separated
list of the fixes to apply (e.g. ``atomic_checkpoints,named_load_errors``). ``applied()`` says what is
in effect; ``apply()`` is idempotent and returns the names it applied.
"""
import os
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from fairseq import checkpoint_utils
from fairseq import utils as fairseq_utils
from fairseq.distributed import utils as distributed_utils

from ..errors import CheckpointError
from ..models.checkpoint_io import atomic_copy, previous_checkpoints_hint

ENV = "WAVLLM_FAIRSEQ_FIXES"
_MARK = "_wavllm_fix"  # attribute set on every replacement, naming its fix


class _AtomicCopyPathManager:
    """fairseq's PathManager, except that copies of local files are atomic (write temp, fsync, rename)."""

    def __init__(self, inner):
        self._inner = inner

    def copy(self, src_path, dst_path, overwrite=False, **kwargs):
        if "://" in src_path or "://" in dst_path:
            return self._inner.copy(src_path, dst_path, overwrite=overwrite, **kwargs)
        if os.path.exists(dst_path) and not overwrite:
            return False
        atomic_copy(src_path, dst_path)
        return True

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _fix_atomic_checkpoints() -> None:
    if not isinstance(checkpoint_utils.PathManager, _AtomicCopyPathManager):
        checkpoint_utils.PathManager = _AtomicCopyPathManager(checkpoint_utils.PathManager)


def _fix_named_load_errors() -> None:
    original = checkpoint_utils.load_checkpoint_to_cpu
    if getattr(original, _MARK, None):
        return

    def load_checkpoint_to_cpu(path, arg_overrides=None, load_on_all_ranks=False):
        try:
            return original(path, arg_overrides, load_on_all_ranks)
        except FileNotFoundError:
            raise
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read checkpoint ({type(e).__name__}: {str(e)[:200]}): the file is "
                                  "truncated or corrupt" + previous_checkpoints_hint(path), file=path,
                                  reason="corrupt") from e

    load_checkpoint_to_cpu.__wrapped__ = original
    setattr(load_checkpoint_to_cpu, _MARK, "named_load_errors")
    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu


def _fix_cpu_all_gather_list() -> None:
    original = distributed_utils.all_gather_list
    if getattr(original, _MARK, None):
        return

    def all_gather_list(data, group=None, max_size=16384):
        if torch.cuda.is_available():
            return original(data, group=group, max_size=max_size)
        if group is None:
            group = distributed_utils.get_global_group()
        gathered = [None] * distributed_utils.get_world_size(group=group)
        dist.all_gather_object(gathered, fairseq_utils.move_to_cpu(data), group=group)
        return gathered

    all_gather_list.__wrapped__ = original
    setattr(all_gather_list, _MARK, "cpu_all_gather_list")
    distributed_utils.all_gather_list = all_gather_list


FIXES: Dict[str, Callable[[], None]] = {
    "atomic_checkpoints": _fix_atomic_checkpoints,
    "named_load_errors": _fix_named_load_errors,
    "cpu_all_gather_list": _fix_cpu_all_gather_list,
}


def enabled(env: Optional[str] = None) -> List[str]:
    """The fixes ``WAVLLM_FAIRSEQ_FIXES`` asks for (all when unset).

    Args:
        env (Optional[str]): the variable's value (default: read from the environment).

    Returns:
        List[str]: names of ``FIXES``.

    Raises:
        ValueError: for an unknown fix name.
    """
    value = os.environ.get(ENV) if env is None else env
    if value is None or value.strip() in ("", "1", "all"):
        return list(FIXES)
    if value.strip() == "0":
        return []
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in FIXES]
    if unknown:
        raise ValueError(f"{ENV}={value!r}: unknown fix {unknown}; the fixes are {sorted(FIXES)} (0 = none)")
    return names


def apply(names: Optional[Sequence[str]] = None) -> List[str]:
    """Apply fixes to fairseq's functions; idempotent.

    Args:
        names (Optional[Sequence[str]]): names of ``FIXES`` (default: those ``WAVLLM_FAIRSEQ_FIXES`` enables).

    Returns:
        List[str]: the names applied.
    """
    names = enabled() if names is None else list(names)
    for name in names:
        FIXES[name]()
    return names


def applied() -> List[str]:
    """The fixes in effect in this process.

    Returns:
        List[str]: their names.
    """
    out = []
    if isinstance(checkpoint_utils.PathManager, _AtomicCopyPathManager):
        out.append("atomic_checkpoints")
    for fn in (checkpoint_utils.load_checkpoint_to_cpu, distributed_utils.all_gather_list):
        if getattr(fn, _MARK, None):
            out.append(getattr(fn, _MARK))
    return out
