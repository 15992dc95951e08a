"""EngineLoop: the one thread that owns the llama context; requests reach it through a queue."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from kvfork.config import ServerConfig
from kvfork.errors import KvforkError
from kvfork.server.dispatch import Dispatcher
from kvfork.server.errors import APIError
from kvfork.server.job import Job
from kvfork.server.metrics import ServerMetrics

if TYPE_CHECKING:
    from kvfork.runtime import Engine

__all__ = ["EngineLoop"]

log = logging.getLogger(__name__)

Command = Callable[[], None]


class EngineLoop:
    """Drives `engine.scheduler.step()` in a background thread; every request joins one continuous batch.

    Thread-safe API: `submit`, `cancel` and `call` may be used from any thread (HTTP handlers);
    everything else runs in the loop thread, which is the only one touching the engine afterwards.
    Each iteration takes new commands, plans new jobs (prefix sharing, see Dispatcher),
    makes room in the cache if the next waiting sequence does not fit, runs one decode and sends
    every job its new text.
    """

    def __init__(self, engine: Engine, config: ServerConfig, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.dispatcher = Dispatcher(engine, config, metrics)
        self._inbox: queue.SimpleQueue[Job | Command | None] = queue.SimpleQueue()
        self._accepted = 0  # jobs accepted and not finished, under _count_lock (the queue cap)
        self._count_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="kvfork-engine-loop", daemon=True)
        self._stopping = False

    # -- any thread ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the current step, fail what is left, and join the thread."""
        self._stopping = True
        self._inbox.put(None)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, job: Job) -> None:
        """Queue a job; raises APIError(429) when max_queued requests are already in flight."""
        with self._count_lock:
            if self._accepted >= self.config.max_queued:
                raise APIError(429, f"the server has {self._accepted} requests in flight; retry shortly",
                               code="queue_full")
            self._accepted += 1
        self.metrics.queue_length.inc()
        job.on_end = self._job_ended
        self._inbox.put(job)

    def cancel(self, job: Job) -> None:
        """The client went away: free the job's branches at once (in the loop thread)."""
        # NOTE: a prefill the job waits on goes on: it is a live prefix for others afterwards.
        self._inbox.put(lambda: self.dispatcher.choices.cancel(job))

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run `fn` in the loop thread; the future resolves with its result (or error)."""
        future: Future[Any] = Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)

        self._inbox.put(run)
        return future

    def _job_ended(self, job: Job) -> None:
        with self._count_lock:
            self._accepted -= 1

    # -- the loop thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        sched = self.engine.scheduler
        while not self._stopping:
            try:
                jobs = self._drain(block=not sched.has_work)
                if self._stopping:
                    break
                # NOTE: the engine lock serializes the loop against any direct Engine use in this process.
                with self.engine.lock:
                    if jobs:
                        self.dispatcher.plan(jobs)
                    self.dispatcher.reuse.retry()
                    if sched.has_work:
                        self.dispatcher.make_room()
                        self.dispatcher.after_step(sched.step())
                        self.metrics.kv_cells.labels("reserved").set(sched.table.cells_reserved())
            except Exception as exc:  # noqa: BLE001 - one bad step must not stop the server
                log.exception("engine step failed")
                self.dispatcher.fail_all(exc if isinstance(exc, KvforkError) else KvforkError(str(exc)))
        self.dispatcher.fail_all(APIError(503, "the server is shutting down", code="shutting_down"))

    def _drain(self, block: bool) -> list[Job]:
        """Run waiting commands; collect new jobs, waiting up to coalesce_s after the first one arrived."""
        jobs: list[Job] = []
        deadline: float | None = None
        wait = 0.5 if block else 0.0  # NOTE: wake up now and then so a stop request is never missed
        while True:
            try:
                item = self._inbox.get(timeout=wait) if wait > 0 else self._inbox.get_nowait()
            except queue.Empty:
                return jobs
            if item is None:
                self._stopping = True
                return jobs
            if isinstance(item, Job):
                jobs.append(item)
                if deadline is None:
                    # NOTE: agents started together arrive a few ms apart; wait a moment so one plan sees
                    # them all (later ones would fork the first's prompt in flight too, but its first chunk
                    # would not stop where they part). Counted from arrival: no extra wait for jobs that queued.
                    deadline = item.t_arrival + self.config.coalesce_s
            else:
                with self.engine.lock:
                    item()
            wait = 0.0 if deadline is None else deadline - time.perf_counter()
