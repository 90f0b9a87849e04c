"""The engine's event loop: thread-safe entry points, blocking calls with deadlines, bounded stop."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from dbtunneld.engine.engine_loop import EngineLoop, LoopClosedError


def test_run_submit_and_call_reach_the_loop_thread():
    with EngineLoop(name="t-engine") as engine:
        async def where():
            return threading.current_thread().name
        assert engine.run(where(), timeout=5) == "t-engine"
        seen = threading.Event()
        engine.call(lambda: seen.set() if engine.on_loop() else None)
        assert seen.wait(5)


def test_run_blocking_keeps_the_loop_answering_and_honours_its_deadline():
    release = threading.Event()
    with EngineLoop() as engine:
        async def hung():
            await engine.run_blocking(release.wait, 30, timeout=0.2)
        async def quick():
            return 42
        hung_future = engine.submit(hung())
        assert engine.run(quick(), timeout=1) == 42          # the loop is not blocked by the hung call
        with pytest.raises(asyncio.TimeoutError):
            hung_future.result(5)
        release.set()


def test_stop_cancels_tasks_ends_the_thread_and_refuses_new_work():
    engine = EngineLoop().start()
    cancelled = threading.Event()

    async def forever():
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
    engine.submit(forever())
    engine.stop(timeout=2)
    assert cancelled.is_set()
    assert not any(t.name == engine.name for t in threading.enumerate())
    coro = asyncio.sleep(0)
    with pytest.raises(LoopClosedError):
        engine.submit(coro)
    engine.stop()            # idempotent


def test_the_worker_pool_is_bounded_uses_daemon_threads_and_reuses_idle_ones():
    from dbtunneld.engine.workers import DaemonThreadPool

    pool = DaemonThreadPool(max_workers=2, thread_name_prefix="t-pool")
    gate = threading.Event()
    blocked = [pool.submit(gate.wait, 10) for _ in range(3)]          # 2 run, 1 waits for a worker
    names = lambda: [t for t in threading.enumerate() if t.name.startswith("t-pool")]   # noqa: E731
    assert len(names()) == 2 and all(t.daemon for t in names())
    assert not blocked[2].running()
    gate.set()
    assert all(f.result(5) for f in blocked)
    assert pool.submit(lambda: 7).result(5) == 7 and pool.started == 2   # idle workers took it
    pool.shutdown(wait=False)
    deadline = time.monotonic() + 5
    while names() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not names()
