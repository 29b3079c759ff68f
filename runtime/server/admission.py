"""Admission control: ``max_concurrent`` slots, a FIFO queue of ``max_queue`` waiters, 429 / 503 beyond that."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import Callable

from .protocol import APIError
from .settings import ServerSettings


class Admission:
    """At most ``max_concurrent`` holders and ``max_queue`` FIFO waiters; a released slot is handed straight to
    the oldest waiter. Used from the event loop only. ``reject(reason)`` is told of every refusal."""

    def __init__(self, settings: ServerSettings, reject: Callable[[str], None] = lambda reason: None):
        self.settings, self._reject = settings, reject
        self._free = settings.max_concurrent
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self.in_flight = 0          # slots held
        self.waiting = 0            # requests queued for a slot
        self.draining = False       # shutting down: new requests are refused (503)

    def retry_headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.settings.retry_after_s)}

    def shutting_down(self) -> APIError:
        return APIError(503, "the server is shutting down", "server_error", code="shutting_down",
                        headers=self.retry_headers())

    def _sync_waiting(self) -> None:
        self.waiting = sum(1 for w in self._waiters if not w.done())

    async def acquire(self, deadline: float) -> None:
        """Take a slot, waiting in the queue until ``deadline`` (``time.monotonic()``) at most."""
        if self.draining:
            self._reject("shutting_down")
            raise self.shutting_down()
        if self._free > 0 and not self._waiters:
            self._free -= 1
            self.in_flight += 1
            return
        if len(self._waiters) >= self.settings.max_queue:
            self._reject("queue_full")
            raise APIError(429, f"the server is busy ({self.settings.max_concurrent} requests in flight, "
                                f"{len(self._waiters)} queued); retry later", "rate_limit_error",
                           code="queue_full", headers=self.retry_headers())
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._sync_waiting()
        try:
            await asyncio.wait({fut}, timeout=max(0.0, deadline - time.monotonic()))
        except BaseException:           # cancelled while queued: hand back a slot we may have been given
            if fut.done() and not fut.cancelled():
                self.in_flight += 1
                self.release()
            else:
                self._forget(fut)
            raise
        if fut.done() and not fut.cancelled():
            self.in_flight += 1
            return
        self._forget(fut)
        self._reject("queue_timeout")
        raise APIError(503, f"timed out after {self.settings.request_timeout_s:g}s waiting for a free slot; "
                            f"retry later", "server_error", code="queue_timeout", headers=self.retry_headers())

    def _forget(self, fut: asyncio.Future) -> None:
        fut.cancel()
        with contextlib.suppress(ValueError):
            self._waiters.remove(fut)
        self._sync_waiting()

    def release(self) -> None:
        self.in_flight -= 1
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(True)      # the slot goes straight to the oldest waiter
                self._sync_waiting()
                return
        self._free += 1
        self._sync_waiting()
