"""gpu: the NVIDIA GPUs NVML sees: compute capability, SMs, memory, driver, power limit, clocks and throttle
reasons, ECC, MIG mode, and SXM vs PCIe where it can be told. A power-capped, throttling or MIG-sliced card runs
Qwen-Image slower than its name promises, silently."""

from __future__ import annotations

from probes.context import ProbeContext, exc_line
from probes.finding import Finding

GIB = 1024**3
# Qwen-Image's transformer has 20.4B parameters: bf16 weights alone are 20.4e9 * 2 B = 38 GiB.
BF16_TRANSFORMER_GIB = 20.4e9 * 2 / GIB


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# NVML clock-event (throttle) reason bits that mean the card is slowed by something other than being idle.
# Values from nvml.h (nvmlClocksEventReason*): SW power cap 0x4, HW slowdown 0x8, sync boost 0x10,
# SW thermal 0x20, HW thermal 0x40, HW power brake 0x80.
SLOWDOWN_REASONS = {0x4: "power cap", 0x8: "hardware slowdown", 0x20: "software thermal slowdown",
                    0x40: "hardware thermal slowdown", 0x80: "hardware power brake"}


def _optional(nvml, names: str, *args):
    """The first of `names` (space-separated: newer NVML renamed some queries) that this NVML has and supports
    on this GPU; None where none does (NVMLError_NotSupported on some boards and drivers)."""
    for name in names.split():
        call = getattr(nvml, name, None)
        if call is None:
            continue
        try:
            return call(*args)
        except Exception:
            return None
    return None


def _form_factor(name: str, max_power_w: float | None) -> str:
    if "PCIe" in name or " NVL" in name:
        return "PCIe"
    if "SXM" in name or (max_power_w is not None and max_power_w >= 500):
        return "SXM"  # PCIe and NVL boards stay at or below 400 W; SXM H100/H200 run at 700 W
    return "unknown"


def _extras(nvml, handle, name: str) -> dict:
    """Per-GPU facts beyond the basics; each is None where NVML does not support the query."""
    milliwatts = _optional(nvml, "nvmlDeviceGetPowerManagementLimit", handle)
    default_mw = _optional(nvml, "nvmlDeviceGetPowerManagementDefaultLimit", handle)
    constraints = _optional(nvml, "nvmlDeviceGetPowerManagementLimitConstraints", handle)
    max_mw = constraints[1] if constraints else None
    sm_clock = _optional(nvml, "nvmlDeviceGetClockInfo", handle, 1)  # NVML_CLOCK_SM
    sm_clock_max = _optional(nvml, "nvmlDeviceGetMaxClockInfo", handle, 1)
    reasons = _optional(nvml, "nvmlDeviceGetCurrentClocksEventReasons nvmlDeviceGetCurrentClocksThrottleReasons",
                        handle)
    ecc = _optional(nvml, "nvmlDeviceGetEccMode", handle)
    mig = _optional(nvml, "nvmlDeviceGetMigMode", handle)
    attributes = _optional(nvml, "nvmlDeviceGetAttributes_v2 nvmlDeviceGetAttributes", handle)
    return {
        "sm_count": getattr(attributes, "multiprocessorCount", None),
        "power_limit_w": milliwatts / 1000 if milliwatts else None,
        "default_power_limit_w": default_mw / 1000 if default_mw else None,
        "form_factor": _form_factor(name, max_mw / 1000 if max_mw else None),
        "sm_clock_mhz": sm_clock,
        "sm_clock_max_mhz": sm_clock_max,
        "slowdowns": [label for bit, label in SLOWDOWN_REASONS.items() if reasons and reasons & bit],
        "ecc": bool(ecc[0]) if ecc else None,
        "mig": bool(mig[0]) if mig else None,
    }


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
            name = _text(nvml.nvmlDeviceGetName(handle))
            gpus.append({"name": name, "cc": f"{major}.{minor}",
                         "memory_gib": round(nvml.nvmlDeviceGetMemoryInfo(handle).total / GIB, 1),
                         **{k: v for k, v in _extras(nvml, handle, name).items() if v not in (None, [])}})
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass

    measured = {"gpus": gpus, "driver": driver, "driver_cuda": driver_cuda}
    if not gpus:
        return Finding(id="gpu", status="skip", summary=f"NVML loads (driver {driver}) but reports no GPU",
                       measured=measured)

    details, slow, degraded = [], [], []
    for i, g in enumerate(gpus):
        cc = tuple(int(x) for x in g["cc"].split("."))
        notes = ["bf16 fast path" if cc >= (8, 0) else "no bf16 tensor cores",
                 "FP8 possible" if cc >= (8, 9) else "no FP8 (needs compute capability >= 8.9)"]
        if g["memory_gib"] < BF16_TRANSFORMER_GIB + 4:
            notes.append(f"bf16 transformer (~{BF16_TRANSFORMER_GIB:.0f} GiB) does not fit: needs FP8 or offload")
        details.append(f"GPU {i}: {g['name']}, compute capability {g['cc']}, {g['memory_gib']} GiB: "
                       + "; ".join(notes))
        facts = [f"{g['sm_count']} SMs" if "sm_count" in g else None,
                 f"{g['form_factor']}" if g.get("form_factor", "unknown") != "unknown" else None,
                 f"power limit {g['power_limit_w']:.0f} W" if "power_limit_w" in g else None,
                 f"SM clock {g['sm_clock_mhz']}/{g['sm_clock_max_mhz']} MHz" if "sm_clock_max_mhz" in g else None,
                 f"ECC {'on' if g['ecc'] else 'off'}" if "ecc" in g else None,
                 f"MIG {'on' if g['mig'] else 'off'}" if "mig" in g else None]
        details.append(f"GPU {i}: " + ", ".join(f for f in facts if f))
        if cc < (8, 0):
            slow.append(f"GPU {i} ({g['name']}, cc {g['cc']})")
        default_w = g.get("default_power_limit_w")
        if default_w and g.get("power_limit_w") and g["power_limit_w"] < 0.95 * default_w:
            degraded.append(f"GPU {i} is power-capped at {g['power_limit_w']:.0f} W (default {default_w:.0f} W)")
        slowdowns = [r for r in g.get("slowdowns", []) if r != "power cap" or "power_limit_w" not in g]
        if slowdowns:
            degraded.append(f"GPU {i} is slowed now: {', '.join(slowdowns)}")
        if g.get("mig"):
            degraded.append(f"GPU {i} is in MIG mode: a slice has a fraction of the SMs and memory")
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
    if degraded:
        return Finding(id="gpu", status="warn", summary=f"{summary}: {'; '.join(degraded)}", details=details,
                       measured=measured,
                       fix="ask the machine's administrator: `nvidia-smi -q -d PERFORMANCE,POWER` shows why "
                           "(qwendoctor never changes clocks, power or MIG); timings on this card will be lower")
    return Finding(id="gpu", status="ok", summary=summary, details=details, measured=measured)
