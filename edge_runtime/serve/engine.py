"""One model, one generation at a time, a bounded FIFO queue in front of it.

Requests are Jobs; a single worker thread runs them in arrival order and hands each event (text
piece, then the result) to the job's asyncio queue on the server's event loop. A job whose client has
gone is cancelled between two tokens. Any exception a job raises ends that job alone: it is handed to
the job's queue (EdgeRuntimeError: the request's fault; anything else: the server's) and the worker
goes on with the next job, so no request can stop the worker.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from edge_runtime.errors import EdgeRuntimeError, NumericalError
from edge_runtime.model.generate import GenerationResult, Piece
from edge_runtime.runtime import Runtime


class QueueFull(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__(f"queue full, retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class Stopping(Exception):
    """The engine is shutting down (or has shut down) and takes no new jobs; or a job ended because of it."""


SHUTTING_DOWN = "the server is shutting down"


@dataclass
class Job:
    prompt_ids: list[int]
    params: dict[str, Any]  # keyword arguments of Runtime.stream_events
    loop: asyncio.AbstractEventLoop
    stream: bool = True  # False: only the result is handed over (no per-token wake-ups of the event loop)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    result: GenerationResult | None = None
    ended_by_shutdown: bool = False  # set before cancel when the server stops: the client is told so

    def end_for_shutdown(self) -> None:
        self.ended_by_shutdown = True
        self.cancel.set()

    def _emit(self, item: Piece | GenerationResult | Exception) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is waiting for this job any more
            self.cancel.set()


class Engine:
    def __init__(self, runtime: Runtime, max_queue: int = 8):
        self.runtime = runtime
        self.max_queue = max_queue
        self._jobs: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._running: Job | None = None
        self._stopping = False
        self.completed = 0
        self.cancelled = 0
        self.failed = 0  # jobs that ended in an internal error or a model error (NumericalError): a 500
        self.tokens_generated = 0
        self.last_tokens_per_s = 0.0
        self._worker: threading.Thread | None = None
        self.start()

    def start(self) -> None:
        """Start the worker, or start it again after shutdown() (an ASGI app may see several lifespans)."""
        with self._cv:
            if self._worker is not None and self._worker.is_alive() and not self._stopping:
                return
        if self._worker is not None:
            self._worker.join()
        self._stopping = False
        self._worker = threading.Thread(target=self._run, name="edge-runtime-engine", daemon=True)
        self._worker.start()

    def _count(self, counter: str, n: int = 1) -> None:
        """Counters change from the worker and from interrupt() (a signal's thread): += under the lock."""
        with self._cv:
            setattr(self, counter, getattr(self, counter) + n)

    @property
    def busy(self) -> bool:
        return self._running is not None

    @property
    def worker_alive(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    @property
    def queued(self) -> int:
        return len(self._jobs)

    def submit(self, job: Job) -> Job:
        with self._cv:
            if self._stopping:
                raise Stopping(SHUTTING_DOWN)
            # max_queue counts requests waiting behind the running one; with nothing running, the first job in
            # _jobs is the one about to run (the worker has not taken it yet), not a waiting one
            if len(self._jobs) >= self.max_queue + (self._running is None):
                # a rough wait: everything ahead of the caller at the last measured rate
                rate = self.last_tokens_per_s or 50.0
                ahead = sum(j.params.get("max_new_tokens", 128) for j in self._jobs)
                raise QueueFull(max(1, int(ahead / rate)))
            self._jobs.append(job)
            self._cv.notify()
        return job

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._jobs and not self._stopping:
                    self._cv.wait()
                if self._stopping and not self._jobs:
                    return
                job = self._jobs.popleft()
                self._running = job
            try:
                if job.cancel.is_set():  # its client left, or the server is stopping
                    self._count("cancelled")
                    job._emit(Stopping(SHUTTING_DOWN) if job.ended_by_shutdown
                              else EdgeRuntimeError("request cancelled before it started"))
                    continue
                self._execute(job)
            except Exception as e:  # the job failed, not the worker: hand the error over, run the next job
                if not isinstance(e, EdgeRuntimeError) or isinstance(e, NumericalError):
                    self._count("failed")
                job._emit(e)
            finally:
                self._running = None

    def _execute(self, job: Job) -> None:
        t0 = time.perf_counter()
        events = self.runtime.stream_events(  # a reply sent whole needs its text only at the end
            job.prompt_ids, should_stop=lambda: "cancelled" if job.cancel.is_set() else None,
            text_per_token=job.stream, **job.params)
        try:
            for item in events:
                if isinstance(item, GenerationResult):
                    job.result = item
                    self._count("tokens_generated", len(item.token_ids))
                    self._count("cancelled" if item.finish_reason == "cancelled" else "completed")
                    dt = time.perf_counter() - t0
                    if item.token_ids and dt > 0:
                        self.last_tokens_per_s = len(item.token_ids) / dt
                    if item.finish_reason == "cancelled" and job.ended_by_shutdown:
                        job._emit(Stopping(f"{SHUTTING_DOWN}: the generation was stopped after "
                                           f"{len(item.token_ids)} tokens"))
                        continue
                elif not job.stream:
                    continue
                job._emit(item)
        finally:
            events.close()  # releases the runtime's lock now, even when this loop ended in an exception

    def interrupt(self, grace_s: float) -> threading.Timer | None:
        """SIGTERM or SIGINT: take no new job, end the queued ones now (their clients get a 503), and give the
        running one grace_s to finish before it is stopped at its next token (its client told why). The timer
        that stops it, if one runs."""
        with self._cv:
            self._stopping = True
            for job in self._jobs:  # answered here: the worker would reach them only after the running job
                job.end_for_shutdown()
                job._emit(Stopping(SHUTTING_DOWN))
            self.cancelled += len(self._jobs)
            self._jobs.clear()
            running = self._running
            self._cv.notify()
        if running is None:
            return None
        timer = threading.Timer(grace_s, running.end_for_shutdown)
        timer.daemon = True
        timer.start()
        return timer

    def shutdown(self, timeout: float = 30.0) -> None:
        """Refuse new jobs, cancel queued ones, let the running one finish, stop the worker."""
        with self._cv:
            self._stopping = True
            for job in self._jobs:
                job.end_for_shutdown()
            self._cv.notify()
        self._worker.join(timeout)
