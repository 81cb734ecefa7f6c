"""The server's Prometheus metrics, in a registry of its own (so that several servers fit in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

# answers of hundreds of tokens on a CPU take minutes: past 120 s they fell into +Inf alone
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two up to the server's --max-batch, and it: a fixed 128 left larger batches in +Inf alone."""
    powers = [2**k for k in range(max_batch.bit_length()) if 2**k < max_batch]
    return (*powers, max_batch)


class Metrics:
    def __init__(self, max_batch: int = 128) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, open fds (Linux)
        self.requests = Counter("encdec_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.finished = Counter("encdec_generations_finished", "Generations ended, by reason (stop, length, "
                                "cancelled: the client went away; error: a failed step; shutdown: unfinished when "
                                "a drain's --shutdown-timeout ran out)", ["reason"], registry=r)
        self.queue = Gauge("encdec_queue_length", "Requests waiting: generations for a slot in the decoding batch, "
                           "embedding requests for the encoder", registry=r)
        self.running = Gauge("encdec_running_requests", "Requests in the decoding batch", registry=r)
        self.batch = Histogram("encdec_batch_size", "Rows per decoding step", buckets=batch_buckets(max_batch),
                               registry=r)
        self.prompt_tokens = Counter("encdec_prompt_tokens", "Prompt tokens encoded", registry=r)
        self.generated = Counter("encdec_generated_tokens", "Tokens generated", registry=r)
        # per generation, as the finished ones are counted: a request of n choices or of several prompts observes each
        self.ttft = Histogram("encdec_time_to_first_token_seconds", "From a request's arrival to a generation's "
                              "first token (one observation per generation: each choice of each prompt of a request)",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("encdec_request_latency_seconds", "From a request's arrival to a generation's last "
                                 "token (one observation per generation: each choice of each prompt of a request; one "
                                 "cancelled or stopped after its first token: to its end)",
                                 buckets=LATENCY_BUCKETS, registry=r)
