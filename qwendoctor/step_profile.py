"""Where one denoising step's time goes: the GEMM ceiling measured now on this card, and one step under
torch.profiler grouped by kernel kind (GEMM, attention, elementwise, memory, other), with its heaviest kernels by
name. `qwendoctor bench` records it for every row, and its stack steps record which kernels each lever took away
and brought; this module is that measurement alone, apart from the ladder that runs it.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from typing import Any, Iterator

from probes import timing
from qwendoctor import models, runner
from qwendoctor.profile import Profile, Workload


def gemm_ceiling(device: str) -> dict[str, float | None]:
    """bf16 (and FP8) GEMM TFLOP/s measured now, on this card, at a size that reaches its ceiling."""
    if device != "cuda":
        return {"bf16_tflops": None, "fp8_tflops": None}
    import torch

    from probes.timing import time_ms

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    flops = 2.0 * n**3
    result: dict[str, float | None] = {"bf16_tflops": flops / time_ms(torch, lambda: a @ b, 50, 30) / 1e9,
                                       "fp8_tflops": None}
    if torch.cuda.get_device_capability() >= (8, 9):
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()
        one = torch.tensor(1.0, device="cuda")
        result["fp8_tflops"] = flops / time_ms(
            torch, lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16), 50, 30) / 1e9
    return result


# ---- one step, by kernel kind ---------------------------------------------------------------------------

KINDS = ("gemm", "attention", "elementwise", "memory", "other")
# Enough for every distinct kernel of a compiled step (about 15 per block, plus the eager ones around the blocks):
# which elementwise kernels a lever left, by name, is what the next lever is chosen on.
TOP_KERNELS = 40


def kernel_kind(name: str) -> str:
    """The kind of a CUDA kernel or a CPU aten op, from its name (attention before GEMM: FA kernels are
    CUTLASS kernels too)."""
    lowered = name.lower()
    if lowered.startswith("triton_"):
        # Inductor names its kernels after the ops they fuse, so a layout copy feeding attention is
        # "triton_poi_fused_..._attention_...": only its templates are matmul or attention.
        if lowered.startswith("triton_tem"):
            return "attention" if "flex" in lowered or "attention" in lowered else "gemm"
        return "elementwise"
    if any(key in lowered for key in ("flash", "fmha", "attention", "sdpa", "attn")):
        return "attention"
    if any(key in lowered for key in ("gemm", "xmma", "cutlass", "nvjet", "matmul", "cublas", "scaled_mm",
                                      "triton_tem", "aten::mm", "aten::addmm", "aten::bmm", "aten::linear")):
        return "gemm"
    if any(key in lowered for key in ("memcpy", "memset", "copy_", "aten::to", "aten::contiguous")):
        return "memory"
    # "quant": activation quantization before an 8-bit kernel (SageAttention's quant_per_block_int8_kernel).
    if any(key in lowered for key in ("elementwise", "vectorized", "reduce", "triton_poi", "triton_red",
                                      "triton_per", "norm", "gelu", "silu", "softmax", "aten::", "unrolled",
                                      "quant")):
        return "elementwise"
    return "other"


# Kineto's own progress lines, written by native code straight to file descriptor 2 (no variable turns them off):
# `USDT:2026-12-07 19:49:33 9374:9374 SyncActivityProfilerHandler.cpp:52] profiler_start`.
PROFILER_CHATTER = re.compile(r"^[A-Z]+:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+:\d+ \w+\.cpp:\d+\] ")


@contextlib.contextmanager
def _without_profiler_chatter() -> Iterator[None]:
    """Hold back what is written to stderr (fd 2) meanwhile, and pass on all of it but the profiler's chatter."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (a test capturing it): nothing native can reach the user
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            for line in held.read().decode("utf-8", "replace").splitlines(keepends=True):
                if not PROFILER_CHATTER.match(line):
                    sys.stderr.write(line)
            sys.stderr.flush()


def step_breakdown(model: models.LoadedModel, workload: Workload, profile: Profile, prompt: str, seed: int,
                   unprofiled_step_ms: float) -> dict[str, Any]:
    """Where one denoising step's time goes: kernel time by kind, and what is left of the step when the GPU
    is idle (launch gaps, host work). The profiler slows the host, so idle time is taken against the step time
    measured without it."""
    import torch
    from torch.profiler import ProfilerActivity, schedule
    from torch.profiler import profile as torch_profile

    on_cuda = model.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    clock = timing.StepClock(model.device)
    # Step 1 warms the profiler up and step 3 stays outside: the recorded window is exactly step 2.
    with _without_profiler_chatter(), torch_profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=1, repeat=1)) as prof:
        def on_step(pipe, step, timestep, kwargs):
            clock(pipe, step, timestep, kwargs)
            prof.step()
            return {}

        clock.start()
        # Three steps run, whatever share of the schedule image-to-image skips.
        runner.render(model, workload, runner.with_denoised_steps(workload, profile, 3), prompt, seed, clock=on_step)
    by_kind = {kind: 0.0 for kind in KINDS}
    by_name: dict[str, float] = {}
    for event in prof.events():
        if event.name.startswith("ProfilerStep") or getattr(event, "is_user_annotation", False):
            continue  # the step's own marker spans the whole window, on the GPU timeline too
        if on_cuda:
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            duration_us = event.time_range.elapsed_us()
        else:
            parent = event.cpu_parent
            top_level = parent is None or parent.name.startswith("ProfilerStep")
            if not event.name.startswith("aten::") or not top_level:
                continue  # top-level aten ops only: their children's time is inside theirs
            duration_us = event.cpu_time_total
        by_kind[kernel_kind(event.name)] += duration_us / 1000
        by_name[event.name] = by_name.get(event.name, 0.0) + duration_us / 1000
    busy = sum(by_kind.values())
    top = sorted(by_name.items(), key=lambda item: -item[1])[:TOP_KERNELS]
    return {
        "profiled_step_ms": round(1000 * clock.step_seconds[1], 2),
        "kernel_ms": {k: round(v, 2) for k, v in by_kind.items()},
        "busy_ms": round(busy, 2),
        # On the CPU, "busy" is the host's top-level op time; idle is then Python and hook overhead.
        "idle_ms": round(max(unprofiled_step_ms - busy, 0.0), 2),
        "source": "CUDA kernels" if on_cuda else "CPU aten ops",
        "top": [{"name": name[:160], "kind": kernel_kind(name), "ms": round(ms, 2)} for name, ms in top],
    }


def removed_ms(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """What a stack step took out of one step, kind by kind and idle, from two step breakdowns (ms; negative:
    it added time there)."""
    removed = {kind: round(before["kernel_ms"][kind] - after["kernel_ms"][kind], 2) for kind in KINDS}
    removed["idle"] = round(before["idle_ms"] - after["idle_ms"], 2)
    return removed


KERNEL_CHANGES = 5  # per direction and stack step: the heaviest kernels that went and came


def kernel_name_key(name: str) -> str:
    """A kernel's name without Inductor's running number (`triton_poi_fused_gelu_view_13` and `..._11` are one
    kernel in two compiles of the same block)."""
    return re.sub(r"_\d+$", "", name) if name.startswith("triton_") else name


def kernel_changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The kernels a stack step took away ("gone": in the breakdown it was tried on, not in its own) and brought
    ("new"), heaviest first, by name: which GELU or copy kernel a fusion removed is read here, not guessed."""
    def by_key(breakdown):
        found: dict[str, dict[str, Any]] = {}
        for kernel in breakdown.get("top", []):
            entry = found.setdefault(kernel_name_key(kernel["name"]), {**kernel, "ms": 0.0})
            entry["ms"] = round(entry["ms"] + kernel["ms"], 2)
        return found

    old, new = by_key(before), by_key(after)
    return {"gone": sorted((old[k] for k in old.keys() - new.keys()), key=lambda k: -k["ms"])[:KERNEL_CHANGES],
            "new": sorted((new[k] for k in new.keys() - old.keys()), key=lambda k: -k["ms"])[:KERNEL_CHANGES]}
