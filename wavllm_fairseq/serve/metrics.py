"""``GET /metrics``: the server's figures in Prometheus' text format, through ``prometheus-client``.

    wavllm_queue_depth                      requests waiting to decode (gauge)
    wavllm_running_batch_size               rows decoding now (gauge)
    wavllm_generated_tokens_total           answer tokens generated (counter; its rate is tokens/s)
    wavllm_time_to_first_token_seconds      arrival -> first answer token (histogram)
    wavllm_request_latency_seconds          arrival -> answer, requests answered (histogram)
    wavllm_requests_total{endpoint,status}  HTTP requests by route and status code (counter)
    wavllm_requests_finished_total{reason}  decoded requests by finish reason: stop, length, cancelled (counter)

Each app has its own registry (several servers in one process, as tests run them, do not share figures).
"""
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# seconds: a tiny model on a CPU answers in milliseconds, a 7B one in seconds
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServeMetrics:
    """The figures of one server; the engine reports to it (``engine.observer``), the HTTP layer counts statuses.

    Args:
        engine (Engine): the engine whose queue and running batch the gauges read
        routes (Iterable[str]): the paths counted by name (any other path counts as "other")
    """

    def __init__(self, engine, routes=()):
        self.registry = CollectorRegistry()
        self.routes = set(routes)
        Gauge("wavllm_queue_depth", "Requests waiting to decode", registry=self.registry).set_function(
            engine.waiting)
        Gauge("wavllm_running_batch_size", "Rows decoding now", registry=self.registry).set_function(engine.running)
        self._tokens = Counter("wavllm_generated_tokens", "Answer tokens generated", registry=self.registry)
        self._ttft = Histogram("wavllm_time_to_first_token_seconds", "Arrival to the first answer token",
                               buckets=BUCKETS, registry=self.registry)
        self._latency = Histogram("wavllm_request_latency_seconds", "Arrival to the answer (requests answered)",
                                  buckets=BUCKETS, registry=self.registry)
        self._requests = Counter("wavllm_requests", "HTTP requests by route and status", ["endpoint", "status"],
                                 registry=self.registry)
        self._finished = Counter("wavllm_requests_finished", "Decoded requests by finish reason", ["reason"],
                                 registry=self.registry)
        engine.observer = self

    # ------------------------------------------------------------------ the engine's reports (worker thread)
    def tokens(self, n: int) -> None:
        """Args: n (int): answer tokens just generated."""
        self._tokens.inc(n)

    def first_token(self, seconds: float) -> None:
        """Args: seconds (float): a request's arrival to its first token."""
        self._ttft.observe(seconds)

    def finished(self, answer, seconds: float) -> None:
        """A request decoded to its end.

        Args:
            answer (Answer): its answer (``finish_reason`` is counted)
            seconds (float): its arrival to its answer
        """
        self._finished.labels(answer.finish_reason).inc()
        if answer.finish_reason != "cancelled":
            self._latency.observe(seconds)

    # ------------------------------------------------------------------ the HTTP layer
    def request(self, path: str, status: int) -> None:
        """Count an HTTP response.

        Args:
            path (str): the request's path
            status (int): the response's status code
        """
        self._requests.labels(path if path in self.routes else "other", str(status)).inc()

    def exposition(self) -> bytes:
        """Returns: bytes: every figure in Prometheus' text format (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)
