"""Small fixes to fairseq-fixed 0.12.3.1 that training on CPUs needs (installed on plugin import).

* ``distributed_utils.all_gather_list`` allocates a ``torch.cuda.ByteTensor`` and fails on a machine
  without CUDA. The trainer calls it to gather logging outputs whenever a criterion's outputs cannot be
  summed as tensors (ours: the per-task loss keys differ between workers). On CPU-only machines the
  gather goes through ``torch.distributed.all_gather_object`` instead (gloo); with CUDA nothing changes.
"""
import torch


def _cpu_all_gather_list(original):
    def all_gather_list(data, group=None, max_size=16384):
        if torch.cuda.is_available():
            return original(data, group=group, max_size=max_size)
        import torch.distributed as dist
        from fairseq import utils
        from fairseq.distributed import utils as du

        if group is None:
            group = du.get_global_group()
        gathered = [None] * du.get_world_size(group=group)
        dist.all_gather_object(gathered, utils.move_to_cpu(data), group=group)
        return gathered

    all_gather_list._wavllm_cpu = True
    return all_gather_list


def install_fairseq_cpu_fixes() -> None:
    """Idempotent."""
    from fairseq.distributed import utils as du

    if not getattr(du.all_gather_list, "_wavllm_cpu", False):
        du.all_gather_list = _cpu_all_gather_list(du.all_gather_list)
