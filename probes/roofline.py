"""roofline (bench tier): what this GPU really delivers. bf16 and FP8 GEMM TFLOP/s (8192^3), device-memory
GB/s (a 4 GiB copy, read + write), against the datasheet; power cap, throttling and PCIe form factor from NVML.

Measured GEMM ceilings sit well below datasheet peaks: this probe measured 790 of an H100 SXM's 989 bf16 TFLOP/s,
80% (probes/measured.toml, from benchmarks/check/check_h100.json), so only a result below 65% of the datasheet is
flagged. What a card "typically measures" is quoted only from the data file, for that card. Throttle reasons are
sampled while the bf16 GEMM loop is running, not at idle.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

from probes import measured
from probes.context import ProbeContext, cuda_torch, exc_line
from probes.finding import Finding
from probes.memory_plan import visible_nvml_index
from probes.timing import time_ms

N = 8192
COPY_BYTES = 4 * 1024**3
LOW_FRACTION = 0.65
SETTLE_GEMMS = 100  # back-to-back GEMMs before the sustained rate is timed
POWER_CAP_TOLERANCE = 0.98  # a limit 2% under the default is still "the default"

# (name test, label, bf16 dense TFLOP/s, FP8 dense TFLOP/s or None, memory TB/s); first match wins.
DATASHEET: list[tuple[Callable[[str], bool], str, float, float | None, float]] = [
    (lambda n: "h100" in n and "pcie" in n, "H100 PCIe", 756, 1513, 2.0),
    (lambda n: "h100" in n and "nvl" in n, "H100 NVL", 835, 1671, 3.9),
    (lambda n: "h100" in n, "H100 SXM", 989, 1979, 3.35),  # NVML: "NVIDIA H100 80GB HBM3"
    (lambda n: "h200" in n and "nvl" in n, "H200 NVL", 835, 1671, 4.8),
    (lambda n: "h200" in n, "H200", 989, 1979, 4.8),
    (lambda n: "a100" in n and "80gb" in n and "pcie" in n, "A100 PCIe 80GB", 312, None, 1.935),
    (lambda n: "a100" in n and "80gb" in n, "A100 SXM 80GB", 312, None, 2.04),  # "NVIDIA A100-SXM4-80GB"
    (lambda n: "l40s" in n, "L40S", 362, 733, 0.864),
    (lambda n: "4090" in n, "RTX 4090", 165, 330, 1.0),  # bf16 with fp32 accumulation
]

# NVML clocks-event (throttle) reason bits.
THROTTLE_BITS = {0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
                 0x10: "sync_boost", 0x20: "sw_thermal_slowdown", 0x40: "hw_thermal_slowdown",
                 0x80: "hw_power_brake_slowdown", 0x100: "display_clock_setting"}
# Reasons that mean the GPU runs slower than it should. sw_power_cap under a full GEMM is the card working at
# its power limit (normal at full load; a lowered limit is flagged separately), so it is reported, not flagged.
BAD_THROTTLE = {"hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown"}


def datasheet(name: str) -> dict[str, Any] | None:
    n = name.lower()
    for test, label, bf16, fp8, tbs in DATASHEET:
        if test(n):
            return {"gpu": label, "bf16_tflops": bf16, "fp8_tflops": fp8, "memory_tbps": tbs}
    return None


def throttle_names(mask: int) -> list[str]:
    return [name for bit, name in THROTTLE_BITS.items() if mask & bit] + \
        ([f"unknown_0x{mask & ~sum(THROTTLE_BITS):x}"] if mask & ~sum(THROTTLE_BITS) else [])


def typical_rates(name: str, sheet: Mapping[str, Any] | None) -> str:
    """What this GPU model measured before (probes/measured.toml), against its datasheet; never another card's."""
    fig = measured.nearest(name, "roofline")
    flagged = f"only < {LOW_FRACTION:.0%} of the datasheet is flagged"
    if fig is None or not fig.here:
        return f"typical rates not measured on {name} ({measured.DATA_LABEL}); {flagged}"
    rates = fig.values
    share = f" ({rates['bf16_tflops'] / sheet['bf16_tflops']:.0%} of {sheet['bf16_tflops']})" if sheet else ""
    return (f"{fig.where()}: bf16 {rates['bf16_tflops']:.0f} TFLOP/s{share} in bursts, "
            f"{rates['bf16_sustained_tflops']:.0f} sustained, FP8 {rates['fp8_tflops']:.0f} TFLOP/s, copy "
            f"{rates['copy_gbps'] / 1e3:.2f} TB/s; {flagged}")


def summarize(name: str, bf16_tflops: float | None, fp8_tflops: float | None, copy_gbps: float | None,
              nvml_facts: Mapping[str, Any] | None, notes: list[str] | None = None,
              bf16_sustained_tflops: float | None = None) -> Finding:
    """The Finding from measured rates and NVML facts (power_limit_w, default_power_limit_w, max_power_limit_w,
    throttle_mask, sm_clock_mhz, max_sm_clock_mhz, index)."""
    facts = dict(nvml_facts or {})
    sheet = datasheet(name)
    reasons = throttle_names(int(facts["throttle_mask"])) if facts.get("throttle_mask") is not None else None
    fraction = None
    if sheet:
        fraction = {"bf16": round(bf16_tflops / sheet["bf16_tflops"], 3) if bf16_tflops else None,
                    "fp8": round(fp8_tflops / sheet["fp8_tflops"], 3) if fp8_tflops and sheet["fp8_tflops"] else None,
                    "copy": round(copy_gbps / (sheet["memory_tbps"] * 1e3), 3) if copy_gbps else None}
    measured = {"gpu": name, "bf16_tflops": bf16_tflops, "bf16_sustained_tflops": bf16_sustained_tflops,
                "fp8_tflops": fp8_tflops, "copy_gbps": copy_gbps,
                "datasheet": sheet, "fraction_of_datasheet": fraction,
                "power_limit_w": facts.get("power_limit_w"), "default_power_limit_w": facts.get("default_power_limit_w"),
                "throttle_reasons": reasons}

    def vs(value, key, unit, scale=1.0):
        if value is None:
            return "not measured"
        ref = sheet.get(key) if sheet else None
        return f"{value:.0f} {unit}" + (f" ({value / (ref * scale):.0%} of {ref * scale:.0f})" if ref else "")

    details = [f"{name}: datasheet {sheet['gpu']}" if sheet else f"{name}: not in the datasheet table, no comparison",
               f"bf16 GEMM {N}^3 here: {vs(bf16_tflops, 'bf16_tflops', 'TFLOP/s')} in short bursts"
               + (f"; {bf16_sustained_tflops:.0f} TFLOP/s sustained (after {SETTLE_GEMMS} more GEMMs at load, where "
                  f"the power limit sets the clocks, as in a long render)" if bf16_sustained_tflops else ""),
               f"FP8 GEMM {N}^3 here (torch._scaled_mm, e4m3, per-tensor scales, bf16 out): "
               f"{vs(fp8_tflops, 'fp8_tflops', 'TFLOP/s')}",
               f"device copy here (read + write bytes): {vs(copy_gbps, 'memory_tbps', 'GB/s', 1e3)}",
               typical_rates(name, sheet)]
    details += list(notes or [])
    if facts.get("power_limit_w") is not None:
        details.append(f"power limit {facts['power_limit_w']:.0f} W (default {facts.get('default_power_limit_w')} W, "
                       f"max {facts.get('max_power_limit_w')} W)")
    if reasons is not None:
        clock = (f"; SM clock {facts['sm_clock_mhz']} of max {facts.get('max_sm_clock_mhz')} MHz"
                 if facts.get("sm_clock_mhz") else "")
        details.append(f"clock event reasons under load: {', '.join(reasons) or 'none'}{clock}")

    flags, fixes = [], []
    idx = facts.get("index", 0)
    if "pcie" in name.lower():
        flags.append("a PCIe card (lower power limit and clocks than SXM)")
        fixes.append("nothing to fix in software: expect slower steps than the SXM card's figures in "
                     "probes/measured.toml")
    limit, default = facts.get("power_limit_w"), facts.get("default_power_limit_w")
    if limit and default and limit < POWER_CAP_TOLERANCE * default:
        flags.append(f"power-capped at {limit:.0f} W (default {default:.0f} W)")
        fixes.append(f"sudo nvidia-smi -i {idx} -pl {default:.0f}")
    bad = sorted(set(reasons or []) & BAD_THROTTLE)
    if bad:
        flags.append(f"throttled ({', '.join(bad)})")
        fixes.append(f"check cooling and power delivery: nvidia-smi -i {idx} -q -d PERFORMANCE,TEMPERATURE")
    if fraction:
        low = [f"{k} at {v:.0%} of datasheet" for k, v in fraction.items() if k != "fp8" and v and v < LOW_FRACTION]
        if low:
            flags.append(", ".join(low))
            fixes.append(f"look for other processes on the GPU (nvidia-smi), MIG, or low clocks "
                         f"(nvidia-smi -i {idx} -q -d CLOCK,PERFORMANCE)")
    rates = "measured here: " + (", ".join(x for x in (
        f"bf16 {bf16_tflops:.0f} TFLOP/s" if bf16_tflops else "",
        f"FP8 {fp8_tflops:.0f} TFLOP/s" if fp8_tflops else "",
        f"copy {copy_gbps / 1e3:.2f} TB/s" if copy_gbps else "") if x) or "no rate")
    if flags:
        return Finding(id="roofline", status="warn", summary=f"{rates}: {'; '.join(flags)}", details=details,
                       fix="; ".join(fixes), measured=measured)
    frac = f" ({fraction['bf16']:.0%} of the {sheet['gpu']} datasheet's bf16)" if fraction and fraction["bf16"] \
        else ""
    return Finding(id="roofline", status="ok", summary=f"{rates}{frac}", details=details, measured=measured)


# --- the measuring part --------------------------------------------------------------------------------

def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _nvml_handle(ctx: ProbeContext, nvml, torch):
    """NVML handle and index of torch's cuda:0 (by UUID, else by CUDA_VISIBLE_DEVICES)."""
    try:
        uuid = str(torch.cuda.get_device_properties(0).uuid)
        handle = nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        return handle, int(nvml.nvmlDeviceGetIndex(handle))
    except Exception:
        index = visible_nvml_index(ctx.env)
        return nvml.nvmlDeviceGetHandleByIndex(index), index


def read_power(nvml, handle) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    for key, call in (("power_limit_w", lambda: nvml.nvmlDeviceGetPowerManagementLimit(handle)),
                      ("default_power_limit_w", lambda: nvml.nvmlDeviceGetPowerManagementDefaultLimit(handle)),
                      ("max_power_limit_w", lambda: nvml.nvmlDeviceGetPowerManagementLimitConstraints(handle)[1])):
        try:
            facts[key] = round(call() / 1000.0, 1)  # mW
        except Exception:
            facts[key] = None
    return facts


def read_load(nvml, handle) -> dict[str, Any]:
    """Clock event (throttle) reasons and SM clock, read while the GPU is busy."""
    facts: dict[str, Any] = {"throttle_mask": None}
    for fn in ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"):
        if hasattr(nvml, fn):
            try:
                facts["throttle_mask"] = int(getattr(nvml, fn)(handle))
                break
            except Exception:
                continue
    sm = getattr(nvml, "NVML_CLOCK_SM", 1)
    for key, fn in (("sm_clock_mhz", "nvmlDeviceGetClockInfo"), ("max_sm_clock_mhz", "nvmlDeviceGetMaxClockInfo")):
        try:
            facts[key] = int(getattr(nvml, fn)(handle, sm))
        except Exception:
            facts[key] = None
    return facts


def measure(ctx: ProbeContext, torch) -> tuple[dict[str, Any], dict[str, Any] | None, list[str]]:
    notes: list[str] = []
    nvml = handle = None
    facts: dict[str, Any] | None = None
    try:
        nvml = ctx.nvml()
        handle, index = _nvml_handle(ctx, nvml, torch)
        facts = {"index": index, **read_power(nvml, handle)}
    except Exception as exc:
        notes.append(f"NVML not read: {exc_line(exc)}")
    rates: dict[str, Any] = {"bf16": None, "bf16_sustained": None, "fp8": None, "copy": None}
    flops = 2.0 * N**3
    try:
        torch.manual_seed(0)
        a = torch.randn(N, N, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(N, N, device="cuda", dtype=torch.bfloat16)

        def sample():
            if facts is not None:
                time.sleep(0.05)  # let the queued GEMMs run, so clocks and power are at load
                facts.update(read_load(nvml, handle))

        # Burst rate (the datasheet comparison), then sustained: SETTLE_GEMMS more GEMMs (~0.15 s on an H100)
        # bring clocks and power to their steady state; NVML is read while the timed ones run.
        rates["bf16"] = round(flops / time_ms(torch, lambda: a @ b, 5, 20) / 1e9, 1)
        rates["bf16_sustained"] = round(flops / time_ms(torch, lambda: a @ b, SETTLE_GEMMS, 50, sample) / 1e9, 1)
        if tuple(torch.cuda.get_device_capability(0)) >= (8, 9):
            try:
                f8 = torch.float8_e4m3fn
                a8, b8 = a.to(f8), b.to(f8).t()  # _scaled_mm wants the second operand column-major
                one = torch.tensor(1.0, device="cuda", dtype=torch.float32)
                rates["fp8"] = round(flops / time_ms(
                    torch, lambda: _first(torch._scaled_mm(a8, b8, scale_a=one, scale_b=one,
                                                           out_dtype=torch.bfloat16)), 10, 30) / 1e9, 1)
                a8 = b8 = None  # free before the copy test
            except Exception as exc:
                notes.append(f"FP8 GEMM did not run: {exc_line(exc)}")
        else:
            notes.append("FP8 GEMM not timed: needs compute capability >= 8.9")
        a = b = None
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(0)
        n = min(COPY_BYTES, int(free // 3) // 2**20 * 2**20)
        src = torch.randint(0, 256, (n,), device="cuda", dtype=torch.uint8)
        dst = torch.empty_like(src)
        rates["copy"] = round(2 * n / time_ms(torch, lambda: dst.copy_(src), 3, 10) / 1e6, 1)
        if n < COPY_BYTES:
            notes.append(f"copy used {n / 2**30:.1f} GiB (free memory)")
        src = dst = None
        torch.cuda.empty_cache()
    finally:
        if nvml is not None:
            try:
                nvml.nvmlShutdown()
            except Exception:
                pass
    return rates, facts, notes


def probe(ctx: ProbeContext) -> Finding:
    torch, skipped = cuda_torch(ctx, "roofline", "no CUDA device: nothing to measure")
    if skipped is not None:
        return skipped
    rates, facts, notes = measure(ctx, torch)
    return summarize(torch.cuda.get_device_name(0), rates["bf16"], rates["fp8"], rates["copy"], facts, notes,
                     bf16_sustained_tflops=rates["bf16_sustained"])
