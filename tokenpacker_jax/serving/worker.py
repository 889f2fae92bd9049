"""The engine's thread: it steps the engine while there is work and hands each request's
events to the asyncio loop that waits for them.

Requests arrive from any thread (``submit``); at most ``max_waiting`` may wait for a row
(``Overloaded`` beyond). ``stop`` lets the requests in flight finish, then ends the thread.
"""

from __future__ import annotations

import asyncio
import threading

from tokenpacker_jax.serving.engine import Engine, Event, Request


class Overloaded(Exception):
    pass


class EngineWorker:
    def __init__(self, engine: Engine, max_waiting: int):
        self.engine = engine
        self.max_waiting = max_waiting
        # request id -> (request, the loop its handler runs in, the queue it reads, whether
        # it wants every token or only the last event)
        self._listeners: dict[int, tuple[Request, asyncio.AbstractEventLoop, asyncio.Queue,
                                         bool]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue,
               every_token: bool = True) -> None:
        """Queues ``request``; its events are put on ``queue`` in ``loop`` (without
        ``every_token``, only the last: the tokens are in ``request.tokens``). Raises
        Overloaded when ``max_waiting`` requests wait already, ValueError when it does not
        fit the engine."""
        with self._lock:
            if self._stopping or self.error is not None:
                raise Overloaded("the server is shutting down")
            if self.engine.waiting >= self.max_waiting:
                raise Overloaded(f"{self.engine.waiting} requests are waiting already")
            self._listeners[request.id] = (request, loop, queue, every_token)
            try:
                self.engine.submit(request)
            except ValueError:
                del self._listeners[request.id]
                raise
        self._wake.set()

    def _loop(self) -> None:
        try:
            while True:
                if not self.engine.busy:
                    with self._lock:
                        if self._stopping and not self.engine.busy:
                            return
                    self._wake.wait()
                    self._wake.clear()
                    continue
                self._deliver(self.engine.step())
        except BaseException as err:  # the server reports it (health) and stops taking work
            self.error = err
            with self._lock:
                pending = [Event(listener[0], None, "error")
                           for listener in self._listeners.values()]
            self._deliver(pending)
            raise

    def _deliver(self, events: list[Event]) -> None:
        """One call into each waiting loop per step (not one per token)."""
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for event in events:
                listener = self._listeners.get(event.request.id)
                if listener is None:
                    continue
                _, loop, queue, every_token = listener
                if event.finish_reason is not None:
                    del self._listeners[event.request.id]
                elif not every_token:
                    continue
                batches.setdefault(loop, []).append((queue, event))
        for loop, batch in batches.items():
            loop.call_soon_threadsafe(_put_all, batch)

    def stop(self, timeout: float | None = None) -> None:
        """Finishes what is in flight, then ends the thread."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet answered in full. Takes no lock (the length of a
        dict is read at once), so a signal handler may ask while its thread holds one."""
        return len(self._listeners)


def _put_all(batch: list[tuple[asyncio.Queue, Event]]) -> None:
    for queue, event in batch:
        queue.put_nowait(event)
