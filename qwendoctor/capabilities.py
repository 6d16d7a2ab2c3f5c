"""Capabilities: what this machine can run, from torch's view of the device and from the doctor's probes.

Levers refuse what the capabilities rule out before anything loads (qwendoctor.levers, `runnable`), and the
tuner's search space offers only what they allow (`offer`). `probe_capabilities` runs the probes that decide
it; `capabilities_from_findings` narrows the device's view to what the probes saw work.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from probes.backends import BACKEND_BY_KERNEL, BACKEND_BY_NATIVE_PICK

FP8_MIN_COMPUTE_CAPABILITY = (8, 9)
# The probes whose findings shape the search space; without CUDA only the first runs (the rest need a GPU).
PROBED_FOR_THE_SPACE = ("attention_backends", "fp8", "compile", "attention_truth")


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What this machine can run, from probes; used to refuse levers it cannot run before anything loads."""

    device: str = "cpu"  # "cuda" or "cpu"
    compute_capability: tuple[int, int] | None = None
    has_torchao: bool = False  # torchao imports and FP8 GEMMs run (the fp8 probe passed, where it ran)
    working_attention_backends: tuple[str, ...] | None = None  # None: not probed
    compile_works: bool | None = None  # the compile probe's verdict; None: not probed
    # ms of one attention call at the workload's shapes per dispatcher backend (attention_truth); None: not timed
    attention_ms: tuple[tuple[str, float], ...] | None = None
    native_attention: str | None = None  # the dispatcher backend whose kernel `native` runs here (attention_truth)
    gpu_count: int | None = None  # visible CUDA devices; None on the CPU, where gloo runs any number of ranks
    # The GPU model as torch names it: what was measured on this model elsewhere (probes/measured.toml) applies.
    gpu_name: str | None = None
    has_cache_dit: bool = False  # cache-dit is installed: the dbcache lever can run

    @property
    def has_fp8(self) -> bool:
        return (self.device == "cuda" and self.compute_capability is not None
                and tuple(self.compute_capability) >= FP8_MIN_COMPUTE_CAPABILITY and self.has_torchao)


def detect_capabilities(working_attention_backends: tuple[str, ...] | None = None) -> Capabilities:
    """What torch sees, without running a probe."""
    import importlib.util

    import torch

    has_cache_dit = importlib.util.find_spec("cache_dit") is not None
    if torch.cuda.is_available():
        return Capabilities(device="cuda", compute_capability=tuple(torch.cuda.get_device_capability()),
                            has_torchao=importlib.util.find_spec("torchao") is not None,
                            working_attention_backends=working_attention_backends,
                            gpu_count=torch.cuda.device_count(), gpu_name=torch.cuda.get_device_name(0),
                            has_cache_dit=has_cache_dit)
    return Capabilities(device="cpu", working_attention_backends=working_attention_backends,
                        has_cache_dit=has_cache_dit)


def probe_capabilities(log: Callable[[str], None] = lambda message: None, workload=None,
                       run_probes: Callable | None = None) -> Capabilities:
    """What this machine can run, from the doctor's probes: the search space is built from their findings.

    attention_truth runs as in `check --bench`, at the workload's image size: only then does it time flex
    attention (a compile of ~10 s), and an untimed backend cannot be left out. A study that searched flex
    untimed spent trials on it at 6.3 s a step eager and 11% slower than native compiled (H100, W1)."""
    from probes.context import ProbeContext

    if run_probes is None:
        from qwendoctor.doctor import run_probes

    device = detect_capabilities()
    ids = PROBED_FOR_THE_SPACE if device.device == "cuda" else PROBED_FOR_THE_SPACE[:1]
    context = ProbeContext(bench=True) if workload is None else ProbeContext(workload=workload, model=workload.model,
                                                                            bench=True)
    return capabilities_from_findings(device, run_probes(list(ids), ctx=context), log)


def capabilities_from_findings(device: Capabilities, findings, log: Callable[[str], None] = lambda m: None
                               ) -> Capabilities:
    """Narrow what the device could run to what the probes saw work: a lever whose probe failed or crashed
    would only fill the study with failed trials."""
    by_id = {finding.id: finding for finding in findings}
    working = None
    backends = by_id.get("attention_backends")
    if backends is not None:
        if backends.status in ("ok", "warn") and backends.measured.get("working"):
            working = tuple(backends.measured["working"])
        else:
            log(f"search space: attention probe {backends.status} ({backends.summary}); searching native only")
            working = ("native",)
    has_fp8, compile_works = device.has_torchao, device.compile_works
    fp8 = by_id.get("fp8")
    if fp8 is not None:
        has_fp8 = device.has_torchao and fp8.status == "ok"
        if device.has_fp8 and not has_fp8:
            log(f"search space: FP8 left out: fp8 probe {fp8.status}: {fp8.summary}")
    compile_probe = by_id.get("compile")
    if compile_probe is not None:
        compile_works = compile_probe.status in ("ok", "warn")
        if not compile_works:
            log(f"search space: compile left out: compile probe {compile_probe.status}: {compile_probe.summary}")
    attention_ms, native_attention = device.attention_ms, device.native_attention
    truth = by_id.get("attention_truth")
    if truth is not None and truth.status in ("ok", "warn") and truth.measured.get("ms"):
        attention_ms = tuple(sorted((BACKEND_BY_KERNEL[k], float(v)) for k, v in truth.measured["ms"].items()
                                    if k in BACKEND_BY_KERNEL))
        native_attention = BACKEND_BY_NATIVE_PICK.get(truth.measured.get("native_picks"))
    return dataclasses.replace(device, has_torchao=has_fp8, working_attention_backends=working,
                               compile_works=compile_works, attention_ms=attention_ms,
                               native_attention=native_attention)
