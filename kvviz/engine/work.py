"""The fair queue for model work: first come, first served, at most N forwards at once.

One process serves a whole class. Without a limit every visitor's step runs at once: on 2 cores,
8 sessions stepping together made each click take 3-6 s and the health check 12 s, and one
visitor's timing run changed the thread count under everyone else's. As Gradio's queue does
(`concurrency_limit`), every piece of model work takes a slot here first:

    with model_queue().slot(on_wait=show_position):   # a page: `with kit.model_work("Stepping"):`
        session.step()

- FIFO: a visitor who clicks again waits behind those who clicked first, so a Play loop (one
  slot per step) takes turns with everyone else instead of starving them;
- `workers` slots (KVVIZ_MODEL_WORKERS, default 1: one forward already uses every core);
- `exclusive=True` waits for its turn and for every running slot to finish, then runs alone:
  for timing runs that change torch's process-wide thread count;
- at most `max_waiting` waiters (KVVIZ_QUEUE_SIZE); one more is told the server is busy;
- re-entrant per thread: work inside work does not wait for itself.

While waiting, `on_wait(ahead, running, waited_s)` is called about twice a second (ahead = waiters
in front of you): the page shows the position, and Streamlit's stop/rerun requests, raised from
that call, take the ticket out of the line.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from kvviz.validate import InputError, settings


class QueueFull(InputError):
    """More visitors wait for the model than the deployment allows."""


class _Ticket:
    __slots__ = ("exclusive",)

    def __init__(self, exclusive: bool) -> None:
        self.exclusive = exclusive


class FairQueue:
    """First come, first served slots for model work (see the module docstring)."""

    def __init__(self, workers: int = 1, max_waiting: int = 64, poll_seconds: float = 0.5) -> None:
        self.workers = workers
        self.max_waiting = max_waiting
        self.poll_seconds = poll_seconds
        self._cond = threading.Condition()
        self._waiting: deque[_Ticket] = deque()
        self._running = 0
        self._exclusive = False  # an exclusive holder is running: nobody else may start
        self._held = threading.local()  # slots this thread holds (re-entrancy)

    # -- what a page may show ----------------------------------------------------------------
    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def idle(self) -> bool:
        with self._cond:
            return not self._running and not self._waiting

    # -- taking a slot -------------------------------------------------------------------------
    def _can_start(self, ticket: _Ticket) -> bool:
        if self._waiting[0] is not ticket or self._exclusive:
            return False
        return self._running == 0 if ticket.exclusive else self._running < self.workers

    @contextmanager
    def slot(self, exclusive: bool = False,
             on_wait: Callable[[int, int, float], None] | None = None) -> Iterator[None]:
        """Hold one slot (or all, with `exclusive`) for the block, after waiting for your turn."""
        depth = getattr(self._held, "depth", 0)
        if depth:  # this thread already holds a slot: its nested work runs inside it
            self._held.depth = depth + 1
            try:
                yield
            finally:
                self._held.depth = depth
            return
        ticket = _Ticket(exclusive)
        with self._cond:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"the server is busy: {len(self._waiting)} visitors are waiting for the model; "
                                "try again in a minute")
            self._waiting.append(ticket)
        self._wait_for_turn(ticket, on_wait)
        self._held.depth = 1
        try:
            yield
        finally:
            self._held.depth = 0
            with self._cond:
                self._running -= 1
                if ticket.exclusive:
                    self._exclusive = False
                self._cond.notify_all()

    def _wait_for_turn(self, ticket: _Ticket, on_wait: Callable[[int, int, float], None] | None) -> None:
        started = time.monotonic()
        try:
            while True:
                with self._cond:
                    if self._can_start(ticket):
                        self._waiting.popleft()
                        self._running += 1
                        self._exclusive = ticket.exclusive
                        self._cond.notify_all()  # the next in line may start too (several workers)
                        return
                    self._cond.wait(self.poll_seconds)
                    if self._can_start(ticket):
                        continue
                    ahead, running = self._waiting.index(ticket), self._running
                if on_wait is not None:  # outside the lock: it may draw, or raise a stop request
                    on_wait(ahead, running, time.monotonic() - started)
        except BaseException:
            with self._cond:
                if ticket in self._waiting:
                    self._waiting.remove(ticket)
                self._cond.notify_all()
            raise


_QUEUE: FairQueue | None = None
_QUEUE_LOCK = threading.Lock()


def model_queue() -> FairQueue:
    """The process-wide queue, sized by the deployment's settings (re-read when it is idle)."""
    global _QUEUE
    s = settings()
    with _QUEUE_LOCK:
        if _QUEUE is None or ((_QUEUE.workers, _QUEUE.max_waiting) != (s.model_workers, s.queue_size) and _QUEUE.idle()):
            _QUEUE = FairQueue(s.model_workers, s.queue_size)
        return _QUEUE
