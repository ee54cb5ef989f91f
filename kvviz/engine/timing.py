"""Wall-clock timing that waits for the device: accelerators run asynchronously, so a timer read
without draining the queue measures how fast kernels were *launched*, not how long they took."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def sync(device: torch.device) -> None:
    """Wait until everything queued on `device` has run (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fn: Callable[[], T], device: torch.device) -> tuple[float, T]:
    """(milliseconds, result) of one call, the device drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3, out


__all__ = ["sync", "timed"]
