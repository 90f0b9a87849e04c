"""Fan-out of daemon events to the control server's subscribers (the trays' event streams).

The bus lives on the engine loop: every subscriber has its own bounded ``asyncio.Queue``, and a
subscriber whose queue overflows (it reads too slowly) is evicted: its queue is emptied, ends with
``None``, and its ``on_evict`` callback drops the connection. ``publish`` may be called from any
thread: the event is encoded in the caller's thread (a snapshot of ``data`` as it is now) and
handed to the loop with ``EngineLoop.call``; ``subscribe`` / ``unsubscribe`` run on the loop.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Callable

from ..engine.engine_loop import EngineLoop
from . import protocol as P

log = logging.getLogger(__name__)

EVENT_QUEUE = 512             # events buffered per subscriber before it is dropped as too slow


@dataclass(eq=False)
class _Subscriber:
    queue: "asyncio.Queue[bytes | None]"
    on_evict: Callable[[], None] | None


class EventBus:
    """Subscribers' bounded queues, fed from any thread through the engine loop."""

    def __init__(self, engine: EngineLoop | None = None) -> None:
        self._engine = engine
        self._subscribers: list[_Subscriber] = []      # touched on the loop only

    @property
    def engine(self) -> EngineLoop | None:
        return self._engine

    def attach(self, engine: EngineLoop) -> None:
        """Deliver on ``engine`` (the control server attaches its loop to a bus made without one)."""
        if self._engine is not None and self._engine is not engine:
            raise RuntimeError("this event bus already delivers on another engine loop")
        self._engine = engine

    def subscribe(self, maxsize: int | None = None,
                  on_evict: Callable[[], None] | None = None) -> "asyncio.Queue[bytes | None]":
        """On the loop: a new queue of encoded event lines (``None`` once evicted)."""
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize or EVENT_QUEUE)
        self._subscribers.append(_Subscriber(queue, on_evict))
        return queue

    def unsubscribe(self, queue: "asyncio.Queue[bytes | None]") -> None:
        """On the loop; idempotent."""
        self._subscribers = [s for s in self._subscribers if s.queue is not queue]

    def publish(self, event: str, data: Any = None) -> None:
        """From any thread: queue ``event`` for every subscriber (dropped when no loop runs)."""
        line = P.encode_event(event, data)
        engine = self._engine
        if engine is None:
            return                      # no loop: nobody can have subscribed
        if engine.on_loop():
            self._deliver(line)
        else:
            engine.call(self._deliver, line)

    def _deliver(self, line: bytes) -> None:
        for sub in list(self._subscribers):
            try:
                sub.queue.put_nowait(line)
            except asyncio.QueueFull:
                self._evict(sub)

    def _evict(self, sub: _Subscriber) -> None:
        self.unsubscribe(sub.queue)
        while not sub.queue.empty():
            sub.queue.get_nowait()
        sub.queue.put_nowait(None)            # tells the writer to stop
        if sub.on_evict is not None:
            sub.on_evict()

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)
