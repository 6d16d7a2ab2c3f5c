"""The probe registry, in the fixed order `qwendoctor check` reports it.

Each probe is a module with `probe(ctx: ProbeContext) -> Finding`. Nothing here (or in any probe module)
imports torch, diffusers or pynvml at import time: probes import native code inside `probe()`, and the
runner executes `native` probes in a subprocess so an ABI error, a segfault or a hang becomes a `crash`.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable


@dataclasses.dataclass(frozen=True)
class ProbeSpec:
    id: str
    module: str  # dotted module path holding `probe(ctx) -> Finding`
    native: bool  # True: imports torch/NVML/CUDA code, so the runner runs it in a subprocess
    timeout_s: float  # the runner's limit for a subprocess run
    title: str
    tier: str = "quick"  # "bench": only with `check --bench` (or when named with --only)
    # Times GPU work: no other probe's kernels share the GPU while it runs. Probes launch kernels only after
    # `ctx.use_gpu()`, which waits while a timing probe measures; the timing probes' worker starts at once
    # and each of them begins as soon as no other probe is on the GPU (the others' imports overlap it).
    exclusive: bool = False
    # Native probes of one group run in one worker process, in registry order: one torch import and one CUDA
    # context instead of one each. Groups run concurrently; a probe that kills its worker is reported as a
    # crash and the rest of its group runs alone. Exclusive probes form their own group.
    group: str | None = None


PROBES: list[ProbeSpec] = [
    ProbeSpec("system", "probes.system", False, 30.0, "Python, OS, CPU, RAM, free disk for weights and caches"),
    ProbeSpec("gpu", "probes.gpu", True, 30.0, "NVIDIA GPUs (NVML): arch, memory, driver, clocks, power, MIG",
              group="cuda"),
    ProbeSpec("topology", "probes.topology", True, 30.0,
              "multi-GPU: NVLink links per GPU, PCIe paths, peer access between GPUs", group="cuda"),
    ProbeSpec("torch_build", "probes.torch_build", True, 90.0, "torch build: CUDA, cuDNN, NCCL, triton, GPU archs",
              group="cuda"),
    ProbeSpec("flash_attn", "probes.flash_attn", True, 120.0,
              "flash-attention packages (FA2, FA3, FA4): import, classify errors, check numbers", group="cuda"),
    ProbeSpec("attention_backends", "probes.attention_backends", True, 180.0,
              "diffusers attention backends that run and match a float64 reference", group="attention"),
    ProbeSpec("attention_truth", "probes.attention_truth", True, 240.0,
              "attention at the workload's shapes: TF/s per backend, what native picks, step share",
              exclusive=True),
    ProbeSpec("tf32", "probes.tf32", True, 60.0, "TF32 flags and whether they matter for a bf16 pipeline",
              exclusive=True),
    ProbeSpec("fp8", "probes.fp8", True, 120.0, "FP8: compute capability, torchao, a _scaled_mm smoke test",
              group="cuda"),
    ProbeSpec("compile", "probes.compile", True, 180.0, "torch.compile: triton, a tiny compile, inductor cache",
              group="compile"),
    # Reads package metadata and diffusers' source, imports nothing: in the doctor's process.
    ProbeSpec("diffusers", "probes.diffusers", False, 30.0, "diffusers/transformers and the features we use"),
    # Imports each package in a child interpreter with its own time limit, so it runs in the doctor's process.
    ProbeSpec("imports", "probes.imports", False, 600.0,
              "torch, transformers, diffusers, optuna (torchao, cache-dit) imported in a fresh interpreter"),
    ProbeSpec("model", "probes.model", True, 60.0, "model weights present locally (never downloads)", group="cuda"),
    ProbeSpec("memory_plan", "probes.memory_plan", True, 60.0,
              "will transformer + text encoder + VAE + activations fit at the workload", group="cuda"),
    ProbeSpec("env", "probes.env", False, 10.0, "environment variables that slow or break things"),
    # Last of its worker, so it sees what the group's probes imported (torch, torchao and dynamo with fp8).
    ProbeSpec("bytecode", "probes.bytecode", True, 60.0,
              "cached bytecode (.pyc) for torch and its dependencies: seconds at every process start",
              group="cuda"),
    ProbeSpec("roofline", "probes.roofline", True, 180.0,
              "measured bf16/FP8 GEMM TFLOP/s and memory GB/s against the datasheet", tier="bench",
              exclusive=True),
]


def probe_ids(registry: list[ProbeSpec] | None = None) -> list[str]:
    return [spec.id for spec in (PROBES if registry is None else registry)]


def load_probe(module: str) -> Callable:
    """The `probe` function of a probe module (imports the module, which must stay light)."""
    return importlib.import_module(module).probe
