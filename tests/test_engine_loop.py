"""The engine's event loop: thread-safe entry points, blocking calls with deadlines, bounded stop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from dbtunneld.engine_loop import EngineLoop, LoopClosedError


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
