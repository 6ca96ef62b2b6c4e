"""fairseq-hydra-train as two "nodes" of one process each, joined over a ``tcp://`` rendezvous on loopback (gloo,
CPU): the commands the README gives for several machines, with node-local save folders."""
import socket
import subprocess
import sys

import pytest
import torch

from helpers import make_corpus
from test_train_cli import ENV, ROOT, TOY_CONFIGS, tiny_overrides, train_losses
from test_training_robustness import run, trainable_state

pytestmark = pytest.mark.slow

# fairseq saves checkpoints on rank 0 only; to compare what rank 1 holds, this launcher lets every rank save into
# its own checkpoint.save_dir (each node its own disk) and then runs fairseq-hydra-train's own entry point
NODE = ("import sys; from fairseq.trainer import Trainer; "
        "Trainer.should_save_checkpoint_on_current_rank = property(lambda self: True); "
        "from fairseq_cli.hydra_train import cli_main; sys.argv[0] = 'fairseq-hydra-train'; cli_main()")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_command(overrides, rank: int, port: int, world: int = 2):
    return [sys.executable, "-c", NODE, "--config-dir", TOY_CONFIGS, "--config-name", "toy_stage1", *overrides,
            f"distributed_training.distributed_world_size={world}", f"distributed_training.distributed_rank={rank}",
            f"distributed_training.distributed_init_method=tcp://127.0.0.1:{port}",
            "distributed_training.distributed_backend=gloo", "distributed_training.ddp_backend=legacy_ddp",
            "distributed_training.distributed_no_spawn=true"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(str(tmp_path_factory.mktemp("corpus")), n_train=6)


def test_two_nodes_over_tcp_hold_equal_weights_equal_to_one_process_with_the_same_global_batch(corpus, tmp_path):
    """Node r takes every second batch of the global order (fairseq shards batches by rank) and the gradients are
    summed over both before every update; one process with update_freq 2 takes the same two batches one after
    the other and sums their gradients: fairseq's arithmetic makes the updates the same, so after 8 updates
    both ranks hold bit-identical weights, equal to the one process's up to float summation order."""
    common = ["dataset.batch_size=4", "checkpoint.save_interval_updates=100", "dataset.validate_interval_updates=100"]
    rc, log1 = run(["fairseq-hydra-train", "--config-dir", TOY_CONFIGS, "--config-name", "toy_stage1",
                    *tiny_overrides(corpus, tmp_path / "one", 8, [*common, "optimization.update_freq=[2]"])])
    assert rc == 0, log1[-4000:]
    port = free_port()
    procs = [subprocess.Popen(node_command(tiny_overrides(corpus, tmp_path / f"node{r}", 8, common), r, port),
                              cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    logs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=600)
        finally:
            if p.poll() is None:
                p.kill()
        logs.append(out)
        assert p.returncode == 0, out[-4000:]
    assert "distributed init (rank 0)" in logs[0] and f"tcp://127.0.0.1:{port}" in logs[0], logs[0][-3000:]
    assert "'distributed_world_size': 2" in logs[0]
    l1, l2 = train_losses(log1), train_losses(logs[0])  # rank 1 logs warnings only (fairseq's rule)
    assert [u for u, _ in l1] == [u for u, _ in l2] and len(l1) == 8
    for (_, a), (_, b) in zip(l1, l2):
        assert abs(a - b) < 1e-3 * max(1.0, abs(a)), (l1, l2)
    rank0, rank1 = (trainable_state(tmp_path / f"node{r}" / "checkpoint_last.pt") for r in (0, 1))
    one = trainable_state(tmp_path / "one" / "checkpoint_last.pt")
    assert rank0.keys() == rank1.keys() == one.keys()
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k  # the same all-reduced gradient on both ranks
        torch.testing.assert_close(rank0[k], one[k], atol=2e-5, rtol=1e-4, msg=k)
