"""gpu: the NVIDIA GPUs NVML sees, their compute capability and memory, and the driver version."""

from __future__ import annotations

from probes.context import ProbeContext, exc_line
from qwendoctor.findings import Finding

GIB = 1024**3
# Qwen-Image's transformer has 20.4B parameters: bf16 weights alone are 20.4e9 * 2 B = 38 GiB.
BF16_TRANSFORMER_GIB = 20.4e9 * 2 / GIB


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def probe(ctx: ProbeContext) -> Finding:
    try:
        nvml = ctx.nvml()
    except ImportError as exc:
        return Finding(id="gpu", status="warn", summary="cannot read GPU facts: nvidia-ml-py is not installed",
                       details=[exc_line(exc)], fix="pip install nvidia-ml-py")
    except Exception as exc:
        return Finding(id="gpu", status="skip", summary="no NVIDIA GPU (NVML not available)",
                       details=[exc_line(exc)])
    try:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        try:
            v = int(nvml.nvmlSystemGetCudaDriverVersion())
            driver_cuda = f"{v // 1000}.{v % 1000 // 10}"
        except Exception:
            driver_cuda = None
        gpus = []
        for i in range(int(nvml.nvmlDeviceGetCount())):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
            gpus.append({"name": _text(nvml.nvmlDeviceGetName(handle)), "cc": f"{major}.{minor}",
                         "memory_gib": round(nvml.nvmlDeviceGetMemoryInfo(handle).total / GIB, 1)})
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass

    measured = {"gpus": gpus, "driver": driver, "driver_cuda": driver_cuda}
    if not gpus:
        return Finding(id="gpu", status="skip", summary=f"NVML loads (driver {driver}) but reports no GPU",
                       measured=measured)

    details, slow = [], []
    for i, g in enumerate(gpus):
        cc = tuple(int(x) for x in g["cc"].split("."))
        notes = ["bf16 fast path" if cc >= (8, 0) else "no bf16 tensor cores",
                 "FP8 possible" if cc >= (8, 9) else "no FP8 (needs compute capability >= 8.9)"]
        if g["memory_gib"] < BF16_TRANSFORMER_GIB + 4:
            notes.append(f"bf16 transformer (~{BF16_TRANSFORMER_GIB:.0f} GiB) does not fit: needs FP8 or offload")
        details.append(f"GPU {i}: {g['name']}, compute capability {g['cc']}, {g['memory_gib']} GiB: "
                       + "; ".join(notes))
        if cc < (8, 0):
            slow.append(f"GPU {i} ({g['name']}, cc {g['cc']})")
    details.append(f"driver {driver}" + (f", supports CUDA up to {driver_cuda}" if driver_cuda else ""))

    names = sorted({g["name"] for g in gpus})
    first = gpus[0]
    if len(names) == 1:
        summary = f"{len(gpus)}x {first['name']} (cc {first['cc']}, {first['memory_gib']} GiB), driver {driver}"
    else:
        summary = ", ".join(f"{g['name']} (cc {g['cc']}, {g['memory_gib']} GiB)" for g in gpus) + f", driver {driver}"
    if slow:
        return Finding(id="gpu", status="warn",
                       summary=f"{summary}: compute capability below 8.0 has no bf16 fast path",
                       details=details, measured=measured,
                       fix="run Qwen-Image on an Ampere (cc 8.0) or newer GPU; FP8 needs cc >= 8.9 (Ada, Hopper)"
                           + (f"; set CUDA_VISIBLE_DEVICES to leave out {', '.join(slow)}"
                              if len(slow) < len(gpus) else ""))
    return Finding(id="gpu", status="ok", summary=summary, details=details, measured=measured)
