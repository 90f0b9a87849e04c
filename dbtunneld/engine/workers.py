"""The engine loop's worker pool: a bounded set of daemon threads that run blocking calls.

``concurrent.futures.ThreadPoolExecutor`` joins its workers when the interpreter exits, so one
call stuck past its deadline (a wedged transport's ``stop``, a Vault request with no answer)
would keep the daemon's process alive after it stopped. The engine never waits for such a call
(``EngineLoop.run_blocking`` gives up at its deadline), so its worker must not hold the exit
either: these workers are daemon threads, started on demand up to ``max_workers``, and they end
after ``shutdown``. It is a ``ThreadPoolExecutor`` for asyncio (``set_default_executor``), with
its own ``submit``/``shutdown``; the base class never starts a thread here.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from typing import Any, Callable, TypeVar

T = TypeVar("T")

_Job = tuple["concurrent.futures.Future[Any]", Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class DaemonThreadPool(concurrent.futures.ThreadPoolExecutor):
    """Runs submitted calls on up to ``max_workers`` daemon threads."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "worker") -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self._limit = max_workers
        self._prefix = thread_name_prefix
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._state = threading.Lock()
        self._workers = 0
        self._idle = 0                       # workers waiting for a job
        self._pending = 0                    # jobs no worker took yet
        self._closed = False
        self.started = 0                     # threads started so far (for tests and counters)

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> "concurrent.futures.Future[T]":
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._state:
            if self._closed:
                raise RuntimeError("cannot schedule new calls after shutdown")
            self._jobs.put((future, fn, args, kwargs))
            self._pending += 1
            if self._pending > self._idle and self._workers < self._limit:
                self._workers += 1
                self.started += 1
                threading.Thread(target=self._work, name=f"{self._prefix}_{self.started}", daemon=True).start()
        return future

    def _work(self) -> None:
        while True:
            with self._state:
                self._idle += 1
            job = self._jobs.get()
            with self._state:
                self._idle -= 1
                if job is None:
                    self._workers -= 1
                    return
                self._pending -= 1
            future, fn, args, kwargs = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:     # handed to whoever awaits the future
                    future.set_exception(exc)
            del job, future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new calls; idle workers end, busy ones after their call (``wait``: wait for them)."""
        with self._state:
            if self._closed:
                return
            self._closed = True
            workers = self._workers
        if cancel_futures:
            self._cancel_queued()
        for _ in range(workers):
            self._jobs.put(None)

    def _cancel_queued(self) -> None:
        kept: list[_Job | None] = []
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                kept.append(job)
            else:
                job[0].cancel()      # a worker that takes it skips it (set_running_or_notify_cancel)
        for job in kept:
            self._jobs.put(job)
