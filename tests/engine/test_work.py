"""The fair queue for model work (kvviz/engine/work.py): FIFO, bounded, exclusive, interruptible."""

from __future__ import annotations

import threading
import time

import pytest

from kvviz.engine.work import FairQueue, QueueFull, model_queue


def wait_until(cond, timeout: float = 10.0) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("timed out")
        time.sleep(0.005)


class Tracker:
    """Records who runs when, and the most that ever ran at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0
        self.order: list[str] = []

    def work(self, name: str, seconds: float) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
            self.order.append(name)
        time.sleep(seconds)
        with self.lock:
            self.now -= 1


def start_in_line(q: FairQueue, tracker: Tracker, names: list[str], seconds: float = 0.05, exclusive=()) -> list:
    """Start one thread per name, each joining the line only after the previous one is in it (a known order)."""
    threads = []
    for name in names:
        def run(name: str = name) -> None:
            with q.slot(exclusive=name in exclusive):
                tracker.work(name, seconds)

        before = q.waiting + q.running
        th = threading.Thread(target=run)
        th.start()
        wait_until(lambda before=before: q.waiting + q.running > before)
        threads.append(th)
    return threads


def test_first_come_first_served_and_never_more_than_the_workers():
    q, tracker = FairQueue(workers=2, poll_seconds=0.01), Tracker()
    for th in start_in_line(q, tracker, [f"v{i}" for i in range(8)]):
        th.join()
    assert tracker.most == 2
    assert tracker.order == [f"v{i}" for i in range(8)]
    assert q.idle()


def test_an_exclusive_holder_runs_alone_in_its_turn():
    """A timing run waits for its turn and for running work to end, then nobody starts beside it."""
    q, tracker = FairQueue(workers=3, poll_seconds=0.01), Tracker()
    seen_during: list[int] = []

    def watcher() -> None:
        wait_until(lambda: "timing" in tracker.order)
        seen_during.append(tracker.now)

    w = threading.Thread(target=watcher)
    w.start()
    threads = start_in_line(q, tracker, ["a", "b", "timing", "c", "d"], seconds=0.1, exclusive={"timing"})
    for th in threads:
        th.join()
    w.join()
    assert tracker.order == ["a", "b", "timing", "c", "d"]
    assert seen_during == [1]  # only the timing run itself


def test_waiters_hear_their_place_and_leaving_the_line_frees_it():
    q = FairQueue(workers=1, poll_seconds=0.01)
    heard: list[tuple[int, int]] = []
    release = threading.Event()

    def holder() -> None:
        with q.slot():
            release.wait(10)

    class Left(Exception):
        pass

    def impatient() -> None:
        def on_wait(ahead: int, running: int, waited: float) -> None:
            heard.append((ahead, running))
            if len(heard) >= 3:
                raise Left  # what Streamlit's stop/rerun request does from inside the page's update

        with pytest.raises(Left), q.slot(on_wait=on_wait):
            pass

    h = threading.Thread(target=holder)
    h.start()
    wait_until(lambda: q.running == 1)
    t = threading.Thread(target=impatient)
    t.start()
    t.join(10)
    assert heard[:3] == [(0, 1)] * 3  # next in line, one run in progress
    assert q.waiting == 0  # the ticket left with the visitor
    release.set()
    h.join()
    with q.slot():  # and the queue still works
        pass
    assert q.idle()


def test_a_full_queue_says_so():
    q = FairQueue(workers=1, max_waiting=1, poll_seconds=0.01)
    release = threading.Event()

    def hold() -> None:
        with q.slot():
            release.wait(10)

    def wait_in_line() -> None:
        with q.slot():
            pass

    threads = [threading.Thread(target=hold), threading.Thread(target=wait_in_line)]
    threads[0].start()
    wait_until(lambda: q.running == 1)
    threads[1].start()
    wait_until(lambda: q.waiting == 1)
    with pytest.raises(QueueFull, match="the server is busy: 1 visitors are waiting"), q.slot():
        pass
    release.set()
    for th in threads:
        th.join(10)
    assert q.idle()


def test_nested_work_does_not_wait_for_itself():
    q = FairQueue(workers=1)
    with q.slot():
        with q.slot(exclusive=True):  # the same thread: it runs inside the slot it holds
            assert q.running == 1
    assert q.idle()


def test_the_process_queue_follows_the_settings_when_idle(monkeypatch):
    monkeypatch.setenv("KVVIZ_MODEL_WORKERS", "3")
    monkeypatch.setenv("KVVIZ_QUEUE_SIZE", "7")
    q = model_queue()
    assert (q.workers, q.max_waiting) == (3, 7)
    assert model_queue() is q
