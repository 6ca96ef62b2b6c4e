"""The fixes to fairseq's own code (fairseq_fixes.py), each on its own: what fairseq does without it, what
it does with it, that importing the plugin applies nothing and that the environment switch works."""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from fairseq import checkpoint_utils
from fairseq.distributed import utils as distributed_utils

from wavllm_fairseq.tasks import fairseq_fixes
from wavllm_fairseq.errors import CheckpointError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_importing_the_plugin_patches_nothing_and_task_setup_applies_the_fixes():
    code = ("import wavllm_fairseq; from wavllm_fairseq.tasks import fairseq_fixes as f; print('import', f.applied());"
            "from wavllm_fairseq.tasks.instruction import WavLLMInstructionConfig, WavLLMInstructionTask;"
            "WavLLMInstructionTask.setup_task(WavLLMInstructionConfig()); print('setup', f.applied())")
    env = {k: v for k, v in os.environ.items() if k != fairseq_fixes.ENV}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "import []" in out.stdout
    assert "setup ['atomic_checkpoints', 'named_load_errors', 'cpu_all_gather_list']" in out.stdout


def test_the_environment_switch():
    assert fairseq_fixes.enabled("") == list(fairseq_fixes.FIXES)
    assert fairseq_fixes.enabled("0") == []
    assert fairseq_fixes.enabled("named_load_errors, atomic_checkpoints") == ["named_load_errors", "atomic_checkpoints"]
    with pytest.raises(ValueError, match="unknown fix"):
        fairseq_fixes.enabled("atomic_checkpoint")
    code = ("from wavllm_fairseq.tasks import fairseq_fixes as f; "
            "from wavllm_fairseq.tasks.instruction import WavLLMInstructionConfig, WavLLMInstructionTask; "
            "WavLLMInstructionTask.setup_task(WavLLMInstructionConfig()); print(f.applied())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, fairseq_fixes.ENV: "0"})
    assert out.returncode == 0 and out.stdout.strip().endswith("[]"), out.stderr[-2000:]


def test_apply_is_idempotent():
    fairseq_fixes.apply()
    fns = (checkpoint_utils.PathManager, checkpoint_utils.load_checkpoint_to_cpu, distributed_utils.all_gather_list)
    fairseq_fixes.apply()
    assert (checkpoint_utils.PathManager, checkpoint_utils.load_checkpoint_to_cpu,
            distributed_utils.all_gather_list) == fns
    assert not isinstance(checkpoint_utils.PathManager._inner, fairseq_fixes._AtomicCopyPathManager)


def test_atomic_checkpoints_leave_the_old_file_when_a_copy_dies(tmp_path, monkeypatch):
    fairseq_fixes.apply(["atomic_checkpoints"])
    src, dst = tmp_path / "checkpoint_1_6.pt", tmp_path / "checkpoint_last.pt"
    dst.write_bytes(b"old, complete")
    src.write_bytes(b"new" * 1000)
    real_copy = fairseq_fixes.atomic_copy.__globals__["shutil"].copyfile

    def dies_half_way(a, b):
        with open(b, "wb") as f:
            f.write(open(a, "rb").read()[:100])
        raise OSError("killed")

    monkeypatch.setattr(fairseq_fixes.atomic_copy.__globals__["shutil"], "copyfile", dies_half_way)
    with pytest.raises(OSError):
        checkpoint_utils.PathManager.copy(str(src), str(dst), overwrite=True)
    assert dst.read_bytes() == b"old, complete"  # fairseq's copy would have left 100 bytes here
    monkeypatch.setattr(fairseq_fixes.atomic_copy.__globals__["shutil"], "copyfile", real_copy)
    assert checkpoint_utils.PathManager.copy(str(src), str(dst), overwrite=True)
    assert dst.read_bytes() == src.read_bytes()
    assert not checkpoint_utils.PathManager.copy(str(src), str(dst), overwrite=False)


def test_named_load_errors_name_the_file_and_the_usable_checkpoints(tmp_path):
    fairseq_fixes.apply(["named_load_errors"])
    good = tmp_path / "checkpoint_1_6.pt"
    torch.save({"model": {}, "cfg": None}, good)
    bad = tmp_path / "checkpoint_last.pt"
    bad.write_bytes(good.read_bytes()[:40])
    with pytest.raises(Exception) as raw:  # fairseq's own function: torch's message, no file name
        checkpoint_utils.load_checkpoint_to_cpu.__wrapped__(str(bad))
    assert not isinstance(raw.value, CheckpointError)
    with pytest.raises(CheckpointError) as named:
        checkpoint_utils.load_checkpoint_to_cpu(str(bad))
    assert "checkpoint_last.pt" in str(named.value) and "truncated or corrupt" in str(named.value)
    assert "checkpoint_1_6.pt" in str(named.value) and "checkpoint.restore_file=" in str(named.value)
    with pytest.raises(FileNotFoundError):
        checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "missing.pt"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fix only changes machines without CUDA")
def test_cpu_all_gather_list_gathers_on_a_cpu_process_group(tmp_path):
    fairseq_fixes.apply(["cpu_all_gather_list"])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        data = {"loss_asr": 1.5, "nsentences": 3}
        with pytest.raises(Exception):  # fairseq's: torch.cuda.ByteTensor on a CPU-only machine
            distributed_utils.all_gather_list.__wrapped__(data, group=distributed_utils.get_global_group())
        assert distributed_utils.all_gather_list(data) == [data]
    finally:
        dist.destroy_process_group()
