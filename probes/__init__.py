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


PROBES: list[ProbeSpec] = [
    ProbeSpec("system", "probes.system", False, 30.0, "Python, OS, CPUs, RAM, free disk"),
    ProbeSpec("torch_build", "probes.torch_build", True, 90.0, "torch build: version, CUDA, cuDNN, GPU archs"),
    ProbeSpec("gpu", "probes.gpu", True, 30.0, "NVIDIA GPUs and driver (NVML)"),
    ProbeSpec("diffusers", "probes.diffusers", True, 120.0, "diffusers/transformers and the features we use"),
    ProbeSpec("attention_backends", "probes.attention_backends", True, 180.0,
              "diffusers attention backends that run and match a float64 reference"),
]


def probe_ids(registry: list[ProbeSpec] | None = None) -> list[str]:
    return [spec.id for spec in (PROBES if registry is None else registry)]


def load_probe(module: str) -> Callable:
    """The `probe` function of a probe module (imports the module, which must stay light)."""
    return importlib.import_module(module).probe
