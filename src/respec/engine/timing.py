"""Timing parts of a decode step without waiting for the device.

On the CPU the work is done when the call returns, so a mark is the wall clock. On a GPU a mark is a
CUDA event recorded on the stream: the intervals are read once the step's own device-to-host copy has
waited for the stream anyway, so timing the drafter adds no synchronization. The events are kept and
reused from step to step (``Marks`` holds at most ``SLOTS`` of them), one set per device and thread.
"""

from __future__ import annotations

import threading
import time
from itertools import pairwise

import torch

SLOTS = 3  # before the catch-up, between it and the proposal, after the proposal

# Per (device, thread), reused by every step: engines in one thread never step at the same time.
_EVENTS: dict[tuple[torch.device, int], list] = {}


class Marks:
    """Points in one step's work; ``intervals`` gives the seconds between consecutive marks (zeros
    when disabled). On a GPU, call ``intervals`` only after a sync that covers the last mark."""

    def __init__(self, device: torch.device, enabled: bool = True) -> None:
        self.enabled, self.cuda = enabled, enabled and device.type == "cuda"
        self.count = 0
        self.points: list = [0.0] * SLOTS
        if self.cuda:
            key = (device, threading.get_ident())
            if key not in _EVENTS:
                _EVENTS[key] = [torch.cuda.Event(enable_timing=True) for _ in range(SLOTS)]
            self.points, self.stream = _EVENTS[key], torch.cuda.current_stream(device)

    def mark(self) -> None:
        if not self.enabled:
            return
        if self.count >= SLOTS:
            raise ValueError(f"marks: at most {SLOTS} per step")
        if self.cuda:
            self.points[self.count].record(self.stream)  # the device's stream, not the current device's
        else:
            self.points[self.count] = time.perf_counter()
        self.count += 1

    def intervals(self) -> list[float]:
        if not self.enabled:
            return [0.0] * (SLOTS - 1)
        points = self.points[: self.count]
        if self.cuda:
            return [a.elapsed_time(b) / 1000 for a, b in pairwise(points)]
        return [b - a for a, b in pairwise(points)]
