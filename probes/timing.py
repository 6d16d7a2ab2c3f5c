"""Clocks for GPU work, shared by the probes and qwendoctor's runner and bench. GPU work is asynchronous: a host
clock read without a device sync times the launch, not the work, so every clock here syncs or uses CUDA events.

Two kinds: host clocks around whole pipeline steps (`StepClock`, `synchronize`, peak memory), and CUDA-event
timing of one kernel call (`time_ms`, `event_samples`), where the probes' microbenchmarks need the L2 cache
flushed and the clocks settled. Functions that time kernels take the `torch` module as an argument, so tests can
hand them a fake.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

# --- whole steps, host clock after a device sync -----------------------------------------------------------


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


class StepClock:
    """A `callback_on_step_end` that stamps the end of every denoising step (after a device sync)."""

    def __init__(self, device: str):
        self.device = device
        self.stamps: list[float] = []

    def start(self) -> None:
        synchronize(self.device)
        self.stamps = [time.perf_counter()]

    def __call__(self, pipe, step, timestep, callback_kwargs):
        synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return {}

    @property
    def step_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: str) -> float | None:
    """Peak device memory since the last reset; None on the CPU, where no allocator tracks it per run."""
    if device != "cuda":
        return None
    import torch

    return torch.cuda.max_memory_allocated() / 2**30


# --- one kernel call, CUDA events ----------------------------------------------------------------------------

L2_FLUSH_BYTES = 256 * 2**20  # larger than any current GPU's L2 (H100: 50 MB, B200: 126 MB)


def event_samples(torch, fn: Callable[[], Any], reps: int, flush: Any = None,
                  during: Callable[[], None] | None = None) -> list[float]:
    """ms of each of `reps` calls between CUDA events. `flush`, a buffer larger than the L2 cache, is
    overwritten before each call (outside the timed region) so inputs come from device memory, as inside a
    model; `during` runs on the CPU while the calls execute."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        if flush is not None:
            flush.zero_()
        start.record()
        fn()
        end.record()
    if during is not None:
        during()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def l2_flush_buffer(torch):
    return torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")


def keep_busy(torch, fn: Callable[[], Any], seconds: float) -> None:
    """Back-to-back calls for `seconds`: a power-limited card boosts for a moment under heavy work, then
    settles at the clock a long run actually gets."""
    torch.cuda.synchronize()
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        for _ in range(8):
            fn()
        torch.cuda.synchronize()


def time_ms(torch, fn: Callable[[], Any], warmup: int, reps: int, during: Callable[[], None] | None = None,
            flush_l2: bool = False, settle_s: float = 0.0) -> float:
    """Median ms of `reps` calls between CUDA events, after `warmup` calls and `settle_s` seconds of load."""
    for _ in range(warmup):
        fn()
    if settle_s > 0:
        keep_busy(torch, fn, settle_s)
    flush = l2_flush_buffer(torch) if flush_l2 else None
    torch.cuda.synchronize()
    return statistics.median(event_samples(torch, fn, reps, flush, during))
