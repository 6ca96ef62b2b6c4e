"""fairseq-hydra-train under the conditions real runs meet: two CPU processes (DDP over gloo), a crash
and resume mid-epoch, a truncated checkpoint, broken manifest rows, a missing backbone directory."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import make_corpus, write_manifest
from test_train_cli import ENV, ROOT, TOY_CONFIGS, frozen_and_trainable, tiny_overrides, train_losses

pytestmark = pytest.mark.slow


def command(stage, overrides, nproc=1):
    base = ["fairseq-hydra-train", "--config-dir", TOY_CONFIGS, "--config-name", f"toy_stage{stage}", *overrides]
    if nproc == 1:
        return base
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return [torchrun, f"--nproc_per_node={nproc}", "--master_port=29517", "--no-python", *base,
            f"distributed_training.distributed_world_size={nproc}", "distributed_training.distributed_backend=gloo",
            "distributed_training.ddp_backend=legacy_ddp", "distributed_training.distributed_init_method=env://",
            "distributed_training.distributed_no_spawn=true", "distributed_training.distributed_rank=-1"]


def run(cmd, timeout=600):
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=timeout)
    return out.returncode, out.stdout + out.stderr


def trainable_state(path):
    _, trainable = frozen_and_trainable(torch.load(path, map_location="cpu", weights_only=False)["model"])
    return trainable


def num_updates(path):
    ck = torch.load(path, map_location="cpu", weights_only=False)
    return int(ck["optimizer_history"][-1]["num_updates"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(str(tmp_path_factory.mktemp("corpus")), n_train=6)


def test_two_process_ddp_equals_one_process_with_the_same_global_batch(corpus, tmp_path):
    """2 ranks x batch 4 (gradients all-reduced) == 1 rank x batch 4 x update_freq 2: same batches,
    same summed gradient, so the same weights after every update."""
    common = ["dataset.batch_size=4", "checkpoint.save_interval_updates=100", "dataset.validate_interval_updates=100"]
    rc1, log1 = run(command(1, tiny_overrides(corpus, tmp_path / "one", 8, [*common, "optimization.update_freq=[2]"])))
    assert rc1 == 0, log1[-4000:]
    rc2, log2 = run(command(1, tiny_overrides(corpus, tmp_path / "two", 8, common), nproc=2))
    assert rc2 == 0, log2[-4000:]
    assert log2.count("distributed init (rank") == 2 and "'distributed_world_size': 2" in log2, log2[-3000:]
    l1, l2 = train_losses(log1), train_losses(log2)
    assert [u for u, _ in l1] == [u for u, _ in l2] and len(l1) == 8
    for (_, a), (_, b) in zip(l1, l2):
        assert abs(a - b) < 1e-3 * max(1.0, abs(a)), (l1, l2)
    one, two = (trainable_state(tmp_path / "one" / "checkpoint_last.pt"),
                trainable_state(tmp_path / "two" / "checkpoint_last.pt"))
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=2e-5, rtol=1e-4, msg=k)


def test_killed_run_resumes_to_the_same_weights(corpus, tmp_path):
    """SIGKILL after the update-6 checkpoint (mid-epoch: 10 updates per epoch), resume, and end at update
    12 with exactly the weights of an uninterrupted run: optimizer, LR schedule and data order restored."""
    extra = ["checkpoint.save_interval_updates=6", "dataset.validate_interval_updates=100"]
    rc, log = run(command(1, tiny_overrides(corpus, tmp_path / "straight", 12, extra)))
    assert rc == 0, log[-4000:]

    crashed = tmp_path / "crashed"
    proc = subprocess.Popen(command(1, tiny_overrides(corpus, crashed, 12, extra)), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    last = crashed / "checkpoint_last.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if last.exists() and (crashed / "checkpoint_1_6.pt").exists():
            os.killpg(proc.pid, signal.SIGKILL)  # a crash: no chance to clean up
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert num_updates(last) == 6
    assert not (crashed / "checkpoint_1_12.pt").exists()

    rc, log = run(command(1, tiny_overrides(corpus, crashed, 12, extra)))
    assert rc == 0, log[-4000:]
    assert re.search(r"loaded checkpoint .*checkpoint_last.pt \(epoch 1 @ 6 updates\)", log, re.I), log[-3000:]
    resumed = [u for u, _ in train_losses(log)]
    assert resumed[0] == 7 and resumed[-1] == 12, resumed
    a, b = trainable_state(tmp_path / "straight" / "checkpoint_last.pt"), trainable_state(last)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-6, msg=k)


def test_truncated_checkpoint_fails_naming_it_and_the_usable_ones(corpus, tmp_path):
    extra = ["checkpoint.save_interval_updates=3", "dataset.validate_interval_updates=100"]
    save = tmp_path / "run"
    rc, log = run(command(1, tiny_overrides(corpus, save, 6, extra)))
    assert rc == 0, log[-4000:]
    last = save / "checkpoint_last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 3])  # the machine died while this file was written
    rc, log = run(command(1, tiny_overrides(corpus, save, 9, extra)))
    assert rc != 0
    assert "checkpoint_last.pt" in log and "truncated or corrupt" in log, log[-3000:]
    assert "checkpoint_1_6.pt" in log and "checkpoint.restore_file=" in log
    # the hint works: resuming from the named usable checkpoint continues at update 7
    rc, log = run(command(1, tiny_overrides(corpus, save, 9,
                                            [*extra, f"checkpoint.restore_file={save}/checkpoint_1_6.pt"])))
    assert rc == 0, log[-4000:]
    assert [u for u, _ in train_losses(log)][0] == 7


def test_broken_corpus_validates_trains_and_decodes_with_exact_counts(corpus, tmp_path):
    """Missing, empty and truncated audio plus a malformed row: validation lists each, training stops
    at the first naming file and row, and with task.skip_bad_rows training and decoding run and count
    exactly the bad rows."""
    data = tmp_path / "data"
    shutil.copytree(os.path.dirname(corpus["train_asr"]), data)
    (data / "wav" / "empty.wav").write_bytes(b"")
    whole = (data / "wav" / "tr0.wav").read_bytes()
    (data / "wav" / "cut.wav").write_bytes(whole[: len(whole) // 2])
    for name in ("train_asr", "test_asr"):
        with open(data / f"{name}.tsv", encoding="utf-8") as f:
            header, *rows = [line.rstrip("\n").split("\t") for line in f]
        good = [dict(zip(header, r)) for r in rows]
        broken = good + [dict(good[0], id="gone", audio="wav/does_not_exist.wav"),
                         dict(good[1], id="empty", audio="wav/empty.wav"),
                         dict(good[2], id="cut", audio="wav/cut.wav"),
                         dict(good[3], id="short", n_frames="not-a-number")]
        write_manifest(str(data / f"{name}.tsv"), broken, ["task"])
    n_train, n_test = 6, 4  # good rows

    rc, log = run(["wavllm-validate-manifest", str(data / "train_asr.tsv")])
    assert rc != 0 and f"rows {n_train + 4} ok {n_train} bad 4" in log, log
    for row_id in ("gone", "empty", "cut", "short"):
        assert f"id={row_id}" in log, log

    local = dict(corpus, train_asr=str(data / "train_asr.tsv"))
    rc, log = run(command(1, tiny_overrides(local, tmp_path / "strict", 2, [])))
    assert rc != 0
    assert (f"train_asr.tsv:{n_train + 2}: id=gone: audio" in log
            and "does_not_exist.wav: file not found" in log), log[-3000:]

    rc, log = run(command(1, tiny_overrides(local, tmp_path / "skip", 2, ["task.skip_bad_rows=true"])))
    assert rc == 0, log[-4000:]
    assert f"train_asr.tsv: {n_train} rows, 4 bad rows skipped" in log, log[-3000:]
    assert f"train_asr.tsv:{n_train + 5}: id=short: skipping bad row (n_frames)" in log

    rc, log = run(["fairseq-generate", str(data), "--user-dir", os.path.join(ROOT, "wavllm_fairseq"), "--task",
                   "wavllm_instruction", "--tokenizer-dir", corpus["tok"], "--gen-subset", "test_asr", "--path",
                   str(tmp_path / "skip" / "checkpoint_last.pt"), "--batch-size", "3", "--max-len-b", "5",
                   "--beam", "1", "--cpu", "--skip-bad-rows"])
    assert rc == 0, log[-3000:]
    assert f"test_asr.tsv: {n_test} rows, 4 bad rows skipped" in log, log[-3000:]
    assert len(re.findall(r"^H-\d+\t", log, re.M)) == n_test


def test_missing_backbone_directory_is_named(corpus, tmp_path):
    overrides = tiny_overrides(corpus, tmp_path / "run", 2) + [f"model.wavlm_path={tmp_path}/no_wavlm_here"]
    rc, log = run(command(1, overrides))
    assert rc != 0
    assert f"{tmp_path}/no_wavlm_here" in log and "does not exist" in log, log[-3000:]
