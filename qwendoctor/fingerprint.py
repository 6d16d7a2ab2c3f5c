"""The machine fingerprint a lock records, and how two fingerprints differ."""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from typing import Any

# Fields that change what any tuned profile does or how fast it is. A lock tuned under different values is
# stale: generate refuses it unless told otherwise.
ALWAYS_MATCHED = ("device", "gpu_name", "gpu_compute_capability", "torch", "cuda", "diffusers", "model_id",
                  "model_revision")
# Those that matter only to the profiles that use them (a lever's `packages`): torchao to FP8, say.
MATCHED_FIELDS = ALWAYS_MATCHED[:6] + ("torchao", "attention_packages") + ALWAYS_MATCHED[6:]

ATTENTION_PACKAGES = ("flash-attn", "flash-attn-3", "flash-attn-4", "sageattention", "xformers")


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
            return version.decode() if isinstance(version, bytes) else version
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no GPU, or no NVML: the lock simply records none
        return None


def machine_fingerprint(model_id: str, model_revision: str | None) -> dict[str, Any]:
    import torch

    data: dict[str, Any] = {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "python": platform.python_version(),
        "platform": f"{sys.platform}-{platform.machine()}",
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "torchao": _version("torchao"),
        "cache_dit": _version("cache-dit"),
        "attention_packages": {name: version for name in ATTENTION_PACKAGES if (version := _version(name))},
        "model_id": model_id,
        "model_revision": model_revision,
    }
    if torch.version.cuda:
        data["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        data["gpu_name"] = properties.name
        data["gpu_compute_capability"] = f"{properties.major}.{properties.minor}"
        data["gpu_memory_gib"] = round(properties.total_memory / 2**30, 1)
        data["gpu_count"] = torch.cuda.device_count()
        data["cudnn"] = str(torch.backends.cudnn.version())
        data["driver"] = _driver_version()
    return {key: value for key, value in data.items() if value is not None}


def differences(locked: dict[str, Any], here: dict[str, Any], profile=None) -> list[str]:
    """Human-readable `field: lock X, here Y` for each matched field that differs: every field, or with `profile`
    the ones it depends on (ALWAYS_MATCHED plus its levers' packages)."""
    if profile is None:
        fields = MATCHED_FIELDS
    else:
        from qwendoctor import levers

        fields = ALWAYS_MATCHED + levers.fingerprint_fields(profile)
    result = []
    for field in fields:
        a, b = locked.get(field), here.get(field)
        if a != b:
            result.append(f"{field}: lock {_show(a)}, here {_show(b)}")
    return result


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in sorted(value.items())) or "none"
    return str(value)
