"""Device-synchronised clocks: GPU work is asynchronous, so a host clock read without a sync times the launch."""

from __future__ import annotations

import statistics
import time


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
