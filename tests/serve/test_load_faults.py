"""The bounded load and fault run (bench/serve_faults.py) on loopback: 16 clients, 2 x 150 requests with
killed streams and malformed requests among them, on a tiny random stage-2 checkpoint; it stops by itself.
0 server errors, no lost, wrong or duplicated answers, every killed client's row ended, nothing left
decoding, the malformed requests all 4xx; the server's memory does not grow from the first run to the second
by more than a bound."""
import pytest

from wavllm_fairseq.bench.serve_faults import fault_load, workload
from wavllm_fairseq.bench.serve_load import post_json
from wavllm_fairseq.bench.serve_process import ServerProcess, tiny_checkpoint

RSS_GROWTH_MB = 50  # the second run over the first; the figures measured are in RESULTS.md


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["continuous", "batch"])
def test_load_with_killed_clients_and_malformed_requests(tmp_path, scheduler):
    ckpt = tiny_checkpoint(str(tmp_path), stage=2)
    with ServerProcess(ckpt, "--scheduler", scheduler, "--threads", "1", "--loop-guard-ngram", "0",
                       log_path=str(tmp_path / "server.log")) as srv:
        bodies, kill_body = workload()
        expected = [post_json(srv.url + "/v1/chat/completions", b)[1]["choices"][0]["message"]["content"]
                    for b in bodies]
        runs = [fault_load(srv.url, srv.pid, bodies, expected, kill_body, requests=150, clients=16)
                for _ in range(2)]
        log = srv.log()
    for f in runs:
        assert f["ok"] == 1, f
        assert f["killed"] >= 10 and f["malformed"] >= 15 and f["seconds"] < 180
    assert runs[1]["rss_after_mb"] - runs[0]["rss_after_mb"] < RSS_GROWTH_MB, runs
    assert "Traceback" not in log and "ERROR" not in log
