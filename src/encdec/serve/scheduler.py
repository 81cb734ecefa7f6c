"""The one thread that owns the model: it admits waiting requests into the decoding batch between steps
(encoding all arrivals in one pass), runs the steps, and hands each token to its request's event loop.
Embedding requests are encoded between steps too, at most --max-batch inputs a pass (the inputs of
several waiting requests share one), so that a large one does not stall the running generations.

Requests talk to it only through `submit` and `cancel`; the engine itself is touched by this thread alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from encdec.inference.engine import Emitted, Engine, Row
from encdec.inference.sampling import NonFiniteScores
from encdec.serve.metrics import Metrics
from encdec.serve.protocol import APIError

log = logging.getLogger("encdec")
IDLE_WAIT_S = 0.5  # how often an idle scheduler wakes up to look for a stop
# An idle scheduler that sees a first request waits until none has arrived for GATHER_QUIET_S (at most
# GATHER_MAX_S) before encoding: requests sent together reach the queue over a few milliseconds (the event loop
# reads and tokenizes them one by one), and a burst of 16 was encoded as 1, then 15 while the one's pass held
# them up (0.3 s of a 270M's burst). A lone request pays GATHER_QUIET_S; rows decoding make no wait (arrivals
# join at the next step).
GATHER_QUIET_S = 0.01
GATHER_MAX_S = 0.05
# Passes (encoder, step, embedding) failing one after another, with no step or embedding pass succeeding between,
# make /health answer 503 ("failing") until one does: a --max-batch whose caches never fit failed every request
# with a 500 while /health said ok. The thread goes on (a client retrying a request too large for the memory must
# not stop the server); a lost GPU context ends it.
MAX_FAILURES_IN_A_ROW = 3
MEMORY_ERRORS = ("out of memory", "ALLOC_FAILED", "MemoryAllocation")  # a pass too large, the device still sound


class SchedulerBroken(RuntimeError):
    """Raised out of the loop by a failure no later pass can get past (`device_lost`)."""


def device_lost(error: BaseException) -> bool:
    """A GPU error after which the device's context is unusable (a device-side assert, an illegal access), not one
    of memory."""
    text = str(error)
    gpu = isinstance(error, getattr(torch, "AcceleratorError", ())) or "CUDA error" in text
    return gpu and not any(kind in text for kind in MEMORY_ERRORS)


@dataclass(eq=False)
class Job:
    """A request's place in the scheduler: its row, and the queue its tokens (`Emitted`) are delivered to (None
    ends it)."""

    prompt: list[int]
    row: Row
    loop: asyncio.AbstractEventLoop
    tokens: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrived: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    counted: bool = False  # its end is in the finished-generations metric

    def deliver(self, item: Emitted | Exception | None) -> None:
        _on_loop(self.loop, self.tokens.put_nowait, item)


@dataclass(eq=False)
class EmbedJob:
    """An embedding request: its inputs' token ids, and the future that receives their vectors [n, d]."""

    prompts: list[list[int]]
    loop: asyncio.AbstractEventLoop
    result: asyncio.Future = field(init=False)
    done: list[torch.Tensor] = field(default_factory=list)  # vectors of the chunks encoded so far

    def __post_init__(self) -> None:
        self.result = self.loop.create_future()

    @property
    def encoded(self) -> int:
        return sum(len(v) for v in self.done)

    def resolve(self, outcome: torch.Tensor | Exception) -> None:
        def settle() -> None:
            if not self.result.done():  # the client may have gone
                (self.result.set_exception if isinstance(outcome, Exception) else self.result.set_result)(outcome)
        _on_loop(self.loop, settle)


def _on_loop(loop: asyncio.AbstractEventLoop, call: Callable[..., Any], *args: Any) -> None:
    """`call(*args)` on the server's event loop; nothing once that loop has closed (a pass that ended after the
    server's close, which a drain's deadline does not wait for: its clients are gone with the loop)."""
    with contextlib.suppress(RuntimeError):  # "Event loop is closed"
        loop.call_soon_threadsafe(call, *args)


class Scheduler:
    def __init__(self, engine: Engine, max_queue: int, metrics: Metrics, pooling: str = "mean",
                 threads: int | None = None, warm_up: bool = False) -> None:
        self.engine, self.max_queue, self.metrics = engine, max_queue, metrics
        self.threads = threads  # intra-op threads of the scheduler's own thread (`encdec serve`: see cmd_serve)
        self.warm_up = warm_up  # run the engine's throwaway steps before taking requests (a compiled step's programs)
        self.ready = threading.Event()
        self.startup_error: BaseException | None = None
        self.pooling = pooling  # of the embeddings: "mean" or "last"
        self.waiting: deque[Job] = deque()
        self.embedding: deque[EmbedJob] = deque()
        self.cancelled: list[tuple[Job, str]] = []
        self.running: dict[Row, Job] = {}
        self.admitting: list[Job] = []  # taken from `waiting`, in their encoder pass: neither waiting nor running
        self.failed: BaseException | None = None  # what ended the thread, if anything did but a stop
        self.aborting: APIError | None = None  # set by `abort`: every request held ends with it
        self.failures_in_a_row, self.last_failure = 0, None
        self.accepting, self.stopping = True, False
        self.wake = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="encdec-scheduler", daemon=True)

    def start(self) -> None:
        """Start the thread (once; later calls wait for it); return once it takes requests, after the warm-up, which
        runs there: dynamo compiles the step again for another thread count, so a warm-up elsewhere left the first
        requests waiting for it."""
        if self.thread.ident is None:
            self.thread.start()
        self.ready.wait()
        if self.startup_error is not None:
            raise self.startup_error

    def check_size(self, count: int, param: str) -> None:
        """400 for a request of more generations than the server ever holds (its batch slots and its queue): asked
        before its jobs are built (2,048 prompts x n = 64 would be 131,072 of them, built on the event loop).
        `param`: the field that asked."""
        held = self.engine.max_batch + self.max_queue
        if count > held:
            raise APIError(400, f"this request asks for {count} generations (prompts x n); this server holds at "
                           f"most {held} (--max-batch {self.engine.max_batch} + --max-queue {self.max_queue})", param)

    def _queued_with(self, jobs: tuple[Job | EmbedJob, ...]) -> int:
        """The requests that would wait for a batch slot with `jobs` queued (under `wake`): generations beyond the
        slots no request holds (those admitted this cycle counted as holding theirs), and every embedding request.
        --max-queue bounds waiting, not arrivals headed for free slots: a burst larger than it was refused 429
        by an idle server."""
        generations = sum(isinstance(job, Job) for job in jobs)
        free = self.engine.max_batch - len(self.running) - len(self.admitting)
        return max(0, len(self.waiting) + generations - max(free, 0)) + len(self.embedding) + len(jobs) - generations

    def submit(self, *jobs: Job | EmbedJob, param: str = "n") -> None:
        """Queue a request's jobs (all or none); 429 when the queue has no room for them, 503 once the server is
        shutting down or its thread has failed."""
        self.check_size(len(jobs), param)
        with self.wake:
            if self.failed is not None:
                raise APIError(503, f"the server cannot generate: its scheduler failed ({self.failed!r:.200}); "
                               "restart it", kind="server_error")
            if not self.accepting:
                raise APIError(503, "the server is shutting down", kind="server_error")
            if self._queued_with(jobs) > self.max_queue:
                raise APIError(429, f"the queue is full ({self.max_queue} requests waiting, --max-queue); retry later",
                               kind="rate_limit_error")
            for job in jobs:
                (self.embedding if isinstance(job, EmbedJob) else self.waiting).append(job)
            self.metrics.queue.set(len(self.waiting) + len(self.embedding))
            self.wake.notify()

    def cancel(self, job: Job, reason: str = "cancelled") -> None:
        """The request leaves the queue or the batch before the next step: its client went away ("cancelled"), a
        stop string ended its text ("stop"), or another choice of its request failed it ("error")."""
        with self.wake:
            if job in self.waiting:
                self.waiting.remove(job)
                self.metrics.queue.set(len(self.waiting) + len(self.embedding))
                self._finish(job, reason)
            elif job.row.finish_reason is None:
                self.cancelled.append((job, reason))
                self.wake.notify()
            elif reason != "stop":  # it had ended on its own: counted as it ended, if its answer never settled
                self.count(job, job.row.finish_reason)

    def stop_accepting(self) -> None:
        with self.wake:
            self.accepting = False

    def abort(self, error: APIError) -> None:
        """End every queued and running request with `error` before the next step (a SIGTERM's drain that ran past
        --shutdown-timeout): their clients get it, a 503, instead of a connection the process's end cuts."""
        with self.wake:
            self.aborting = error
            self.wake.notify()

    def idle(self) -> bool:
        """Nothing queued, running or being encoded; or nothing ever will be (the thread failed, whatever rows its
        engine was left holding: a drain waiting for them would keep the server up for good)."""
        with self.wake:
            return self.failed is not None or not (self.waiting or self.embedding or self.admitting or self.engine.rows)

    def stop(self, timeout: float) -> None:
        """Finish what is queued and running, then end the thread."""
        with self.wake:
            self.accepting, self.stopping = False, True
            self.wake.notify()
        self.thread.join(timeout)

    def count(self, job: Job, reason: str) -> None:
        """Count the request's end once, as the API reports it: a stop string that completes on the last allowed
        token ends a row the engine ended for its length, and the answer says "stop"."""
        with self.wake:  # the event loop's thread and the scheduler's both count
            if not job.counted:
                job.counted = True
                self.metrics.finished.labels(reason).inc()

    def _finish(self, job: Job, reason: str) -> None:
        job.row.finish_reason = job.row.finish_reason or reason
        if job.row.finish_reason in ("cancelled", "error"):  # a row's own end is counted when its answer settles
            self.count(job, job.row.finish_reason)
        if job.first_token is not None:
            self.metrics.latency.observe(time.perf_counter() - job.arrived)
        job.deliver(None)

    def _fail(self, jobs: list[Job], error: Exception, reason: str = "error") -> None:
        """End `jobs` with `error` (their clients get a 500, or the APIError's status), out of the batch and counted
        under `reason`."""
        for job in jobs:
            self.engine.cancel(job.row, reason)
            job.row.finish_reason = job.row.finish_reason or reason
            self.running.pop(job.row, None)
            self.count(job, reason)
            job.deliver(error)
        self.metrics.running.set(len(self.engine.rows))

    def _run(self) -> None:
        """The warm-up (a failure there is raised by `start`), then the loop; should the loop end by an error of its
        own, every request it holds fails at once (rather than waiting for good), later ones get 503 and /health
        says so."""
        try:
            if self.threads is not None:
                torch.set_num_threads(self.threads)
            if self.warm_up:
                log.info("compiling the decoding step (--compile): 1-2 minutes on a GPU, 1-2.5 on a 2-core CPU, "
                         "before the server listens")
                start = time.perf_counter()
                self.engine.warm_up()
                log.info("compiled the decoding step in %.0f s", time.perf_counter() - start)
        except BaseException as e:  # noqa: BLE001 - raised again by start(), in the thread that started this one
            self.startup_error = e
            return
        finally:
            self.ready.set()
        try:
            self._loop()
        except BaseException as e:
            log.exception("the scheduler failed; the server answers 503 from now on")
            with self.wake:
                self.failed = e
                held = list(dict.fromkeys([*self.waiting, *self.admitting, *self.running.values()]))  # admitted: both
                self.waiting.clear()
                embedding, self.embedding = list(self.embedding), deque()
                self.metrics.queue.set(0)
                self.metrics.running.set(0)
            for job in held:
                job.row.finish_reason = job.row.finish_reason or "error"  # ended: its client's leaving queues nothing
                self.count(job, "error")
                job.deliver(RuntimeError(f"the server's scheduler failed: {e!r:.200}"))
            for job in embedding:
                job.resolve(RuntimeError(f"the server's scheduler failed: {e!r:.200}"))

    def _loop(self) -> None:
        while True:
            self._end_if_aborting()
            with self.wake:
                while not (self.waiting or self.embedding or self.engine.rows or self.cancelled or self.stopping):
                    self.wake.wait(IDLE_WAIT_S)
                if self.stopping and not (self.waiting or self.embedding or self.engine.rows):
                    return
                if self.aborting is not None:  # queued while this thread waited: ended (above), neither encoded nor
                    continue  # decoded further
                if not self.engine.rows and not self.stopping:
                    self._gather()
                    if self.aborting is not None:  # came while it waited for the burst: nothing more is encoded
                        continue
                cancelled, self.cancelled = self.cancelled, []
                arrivals = [self.waiting.popleft() for _ in range(min(self.engine.free, len(self.waiting)))]
                self.admitting = arrivals
                embedding = list(self.embedding)
                self.metrics.queue.set(len(self.waiting) + len(self.embedding))
            if embedding:
                self._embed(embedding)
                with self.wake:
                    if self.aborting is not None:  # came during the embedding pass: the arrivals are not encoded
                        self.waiting.extendleft(reversed(arrivals))  # but ended, with the queue, at the top
                        self.cancelled = cancelled + self.cancelled
                        self.admitting = []
                        continue
            try:
                self._cycle(cancelled, arrivals)
            except SchedulerBroken:  # `_run` fails what the thread holds, the requests still admitting among them
                raise
            except Exception as e:  # a failed step fails its requests, not the server
                log.exception("decoding step failed")
                self._failed_again(e)  # counted before the clients hear of it (and ask /health)
                self._fail([*self.running.values(), *(job for job in arrivals if job.row not in self.running)], e)
            with self.wake:
                self.admitting = []

    def _end_if_aborting(self) -> None:
        """After `abort`: every request queued or decoding ends with its error (between cycles: none is in an
        encoder pass)."""
        with self.wake:
            held = self.waiting or self.embedding or self.running or self.cancelled or self.engine.rows
            if self.aborting is None or not held:
                return
            cancelled, self.cancelled = self.cancelled, []
        self._end_cancelled(cancelled)  # ended already (a client gone, a stop string): counted as they ended
        with self.wake:
            jobs, embedding = [*self.waiting, *self.running.values()], list(self.embedding)
            self.waiting.clear()
            self.embedding.clear()
            self.metrics.queue.set(0)
        self._fail(jobs, self.aborting, "shutdown")
        for row in list(self.engine.rows):  # a row no request holds any more (left by a failed pass): not decoded on
            self.engine.cancel(row, "shutdown")
        for job in embedding:
            job.resolve(self.aborting)

    def _failed_again(self, error: Exception) -> None:
        """Count a failed pass (before its requests hear of it; see MAX_FAILURES_IN_A_ROW); a lost device ends the
        thread: the server then stops (`encdec.serve.app.DrainingServer.on_tick`), for its supervisor to start it
        again."""
        self.failures_in_a_row += 1
        self.last_failure = error
        if device_lost(error):
            raise SchedulerBroken(f"the device was lost: {error!r:.200}")

    def failing(self) -> BaseException | None:
        """The last failure, when MAX_FAILURES_IN_A_ROW passes have failed with none succeeding since."""
        return self.last_failure if self.failures_in_a_row >= MAX_FAILURES_IN_A_ROW else None

    def _gather(self) -> None:
        """With the batch empty, wait (holding `wake`, which the wait releases) while requests keep arriving: see
        GATHER_QUIET_S."""
        deadline = time.perf_counter() + GATHER_MAX_S
        while self.waiting and len(self.waiting) < self.engine.free:
            count, left = len(self.waiting), deadline - time.perf_counter()
            if left <= 0:
                return
            self.wake.wait(min(GATHER_QUIET_S, left))
            if len(self.waiting) <= count:
                return

    def _embed(self, jobs: list[EmbedJob]) -> None:
        """One encoder pass over the next --max-batch inputs of the waiting embedding requests, oldest first
        (many one-text requests share a pass); a request is answered after its last input."""
        budget, parts = self.engine.max_batch, []  # (request, first input, end)
        for job in jobs:
            start = job.encoded
            take = 0 if job.result.done() else min(budget, len(job.prompts) - start)  # done: its client left
            parts.append((job, start, start + take))
            budget -= take
            if budget == 0:
                break
        prompts = [p for job, start, end in parts for p in job.prompts[start:end]]
        try:
            vectors = self.engine.embed(prompts, self.pooling) if prompts else torch.empty(0)
            self.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
        except Exception as e:  # a failed pass fails its requests, not the server
            log.exception("embedding failed")
            self._failed_again(e)
            vectors = e
        else:
            if prompts:  # a pass ran (its clients may all have left)
                self.failures_in_a_row = 0
        finished, offset = [], 0
        for job, start, end in parts:
            share = None if isinstance(vectors, Exception) else vectors[offset : offset + end - start]
            offset += end - start
            if share is None:
                job.resolve(vectors)
            elif not job.result.done():  # (a client that left meanwhile gets nothing)
                job.done.append(share)
                if job.encoded < len(job.prompts):
                    continue
                job.resolve(torch.cat(job.done))
            finished.append(job)
        with self.wake:
            for job in finished:
                self.embedding.remove(job)
            self.metrics.queue.set(len(self.waiting) + len(self.embedding))

    def _end_cancelled(self, cancelled: list[tuple[Job, str]]) -> None:
        for job, reason in cancelled:
            if self.running.pop(job.row, None) is not None:
                self.engine.cancel(job.row, reason)
                self._finish(job, reason)
            elif job.row.finish_reason is not None:  # it ended in the step since
                self.count(job, reason if reason == "stop" else job.row.finish_reason)
            # else: queued again by an abort during its encoder pass (`_run`), it ends with the queue

    def _cycle(self, cancelled: list[tuple[Job, str]], arrivals: list[Job]) -> None:
        self._end_cancelled(cancelled)
        if arrivals:
            try:
                self._admit(arrivals)
            except Exception as e:  # their encoder pass failed (out of memory, say): they fail, the batch decodes on
                log.exception("encoding arriving requests failed")
                self._failed_again(e)
                with self.wake:  # no longer holding slots: counted through the next step, they made requests 429
                    self.admitting = []
                self._fail(arrivals, e)
        self.metrics.running.set(len(self.engine.rows))
        if not self.engine.rows:
            return
        self.metrics.batch.observe(len(self.engine.rows))
        emitted = self.engine.step()
        self.failures_in_a_row = 0
        for row in self.engine.failed:  # its scores were not finite: it fails alone, the batch decodes on
            self._fail([self.running[row]], NonFiniteScores())
        now = time.perf_counter()
        self.metrics.generated.inc(len(emitted))
        for item in emitted:
            job = self.running[item.row]
            if job.first_token is None:
                job.first_token = now
                self.metrics.ttft.observe(now - job.arrived)
            job.deliver(item)
            if item.row.finish_reason is not None:
                del self.running[item.row]
                self._finish(job, item.row.finish_reason)
        self.metrics.running.set(len(self.engine.rows))

    def _admit(self, jobs: list[Job]) -> None:
        """All arrivals in one encoder pass; they take part in the very next step. They move from `admitting` to
        `running` at once: counted in both for the step that followed, they had `_queued_with` refuse (429)
        requests for the slots still free."""
        self.metrics.prompt_tokens.inc(self.engine.join([job.prompt for job in jobs], [job.row for job in jobs]))
        with self.wake:
            for job in jobs:
                self.running[job.row] = job
            self.admitting = []
