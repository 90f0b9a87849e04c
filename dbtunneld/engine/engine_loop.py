"""The engine's one event loop: an asyncio loop on one thread that owns the control plane.

The supervisor, the credential keepers, the tunnel keepers, the control server, the event bus
and the status publisher run on it (issue 16). Code on the loop never blocks: a blocking call
(hvac, boto3, keyring, a socket connect) goes through ``run_blocking``, which runs it on a
bounded worker pool with a deadline. Other threads (the data path, the tray's UI thread, signal
handlers) reach the loop only through ``call`` / ``submit`` / ``run``, which are thread-safe.
Periodic work on the loop goes through ``timers`` (``coalesced_timers``), so it shares wake-ups.

``EngineLoop`` is a context manager; ``stop`` cancels what is still running, waits for it within
a bound and ends the thread (no worker outlives it by more than its current call).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

from .coalesced_timers import CoalescedTimers
from .workers import DaemonThreadPool

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_WORKERS = 8


class LoopClosedError(RuntimeError):
    """The engine loop was stopped (or never started): nothing more runs on it."""


class EngineLoop:
    """One asyncio loop on its own thread, and the worker pool its blocking calls use."""

    def __init__(self, name: str = "dbtunneld-engine", workers: int = DEFAULT_WORKERS) -> None:
        self.name = name
        self._loop = asyncio.new_event_loop()
        self._pool = DaemonThreadPool(max_workers=workers, thread_name_prefix=f"{name}-io")   # never holds the exit
        self._loop.set_default_executor(self._pool)
        self.timers = CoalescedTimers(self._loop)     # shared wake-ups (loop thread only)
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._closed = False

    # lifecycle
    def start(self) -> "EngineLoop":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
            self._ready.wait()
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._ready.set)
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel every task still on the loop (each gets ``timeout`` to finish its clean-up),
        end the loop's thread and the worker pool. Idempotent."""
        if self._closed:
            return
        self._closed = True
        thread = self._thread
        if thread is None:
            self._loop.close()
            self._pool.shutdown(wait=False, cancel_futures=True)
            return
        if thread is not threading.current_thread():
            try:
                asyncio.run_coroutine_threadsafe(self._cancel_all(timeout), self._loop).result(timeout + 1.0)
            except (concurrent.futures.TimeoutError, RuntimeError):
                log.warning("engine loop: tasks still running after %.1f s; stopping anyway", timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if thread is not threading.current_thread():
            thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _cancel_all(self, timeout: float) -> None:
        me = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not me]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    def __enter__(self) -> "EngineLoop":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # reaching the loop from any thread
    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def on_loop(self) -> bool:
        """Is the caller the loop's own thread?"""
        return threading.current_thread() is self._thread

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop soon (thread-safe; dropped once the loop stopped)."""
        if self._closed:
            return
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:          # closed between the check and the call
            pass

    def submit(self, coro: Coroutine[Any, Any, T]) -> "concurrent.futures.Future[T]":
        """Schedule ``coro`` on the loop from another thread; a Future for its result."""
        if self._closed:
            coro.close()
            raise LoopClosedError(f"{self.name} is stopped")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result (from another thread only)."""
        if self.on_loop():
            coro.close()
            raise RuntimeError("EngineLoop.run called on the loop's own thread (await the coroutine instead)")
        return self.submit(coro).result(timeout)

    # blocking calls, from the loop
    async def run_blocking(self, fn: Callable[..., T], *args: Any, timeout: float | None = None) -> T:
        """Run a blocking ``fn(*args)`` on the worker pool; ``asyncio.TimeoutError`` after ``timeout``
        (the worker finishes its call in the background; its result is dropped)."""
        future: Awaitable[T] = self._loop.run_in_executor(self._pool, fn, *args)
        if timeout is None:
            return await future
        return await asyncio.wait_for(future, timeout)
