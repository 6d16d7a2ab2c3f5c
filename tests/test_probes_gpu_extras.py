"""The gpu probe's power, clock, throttle, ECC, MIG and form-factor facts, from a fake NVML."""

from types import SimpleNamespace

from probes import gpu
from probes.context import ProbeContext

GIB = 1024**3


class RichNVML:
    def __init__(self, name="NVIDIA H100 80GB HBM3", power_w=700, default_w=700, max_w=700, reasons=0x1, mig=0,
                 unsupported=()):
        self.name, self.power_w, self.default_w, self.max_w = name, power_w, default_w, max_w
        self.reasons, self.mig, self.unsupported = reasons, mig, unsupported

    def __getattr__(self, attribute):
        raise AttributeError(attribute)  # an NVML without the query: the probe must cope

    def _maybe(self, name, value):
        if name in self.unsupported:
            raise RuntimeError("NVMLError_NotSupported")
        return value

    def nvmlSystemGetDriverVersion(self):
        return "580.159.04"

    def nvmlSystemGetCudaDriverVersion(self):
        return 13000

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return self.name

    def nvmlDeviceGetCudaComputeCapability(self, h):
        return (9, 0)

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(total=79.6 * GIB)

    def nvmlDeviceGetPowerManagementLimit(self, h):
        return self._maybe("power", self.power_w * 1000)

    def nvmlDeviceGetPowerManagementDefaultLimit(self, h):
        return self.default_w * 1000

    def nvmlDeviceGetPowerManagementLimitConstraints(self, h):
        return (200_000, self.max_w * 1000)

    def nvmlDeviceGetClockInfo(self, h, clock):
        return 1980

    def nvmlDeviceGetMaxClockInfo(self, h, clock):
        return 1980

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return self.reasons

    def nvmlDeviceGetEccMode(self, h):
        return self._maybe("ecc", (1, 1))

    def nvmlDeviceGetMigMode(self, h):
        return self._maybe("mig", (self.mig, self.mig))

    def nvmlDeviceGetAttributes_v2(self, h):
        return self._maybe("attributes", SimpleNamespace(multiprocessorCount=132))

    def nvmlShutdown(self):
        pass


def run(nvml):
    return gpu.probe(ProbeContext(nvml=lambda: nvml))


def test_healthy_sxm_h100_reports_every_fact():
    f = run(RichNVML())
    assert f.status == "ok"
    facts = f.measured["gpus"][0]
    assert facts["sm_count"] == 132 and facts["form_factor"] == "SXM" and facts["power_limit_w"] == 700
    assert facts["ecc"] is True and facts["mig"] is False and facts["sm_clock_max_mhz"] == 1980
    assert any("132 SMs, SXM, power limit 700 W, SM clock 1980/1980 MHz, ECC on, MIG off" in d for d in f.details)


def test_power_capped_card_warns_and_never_offers_to_change_it():
    f = run(RichNVML(power_w=400))
    assert f.status == "warn" and "power-capped at 400 W (default 700 W)" in f.summary
    assert "never changes clocks" in f.fix


def test_thermal_slowdown_warns():
    f = run(RichNVML(reasons=0x40 | 0x1))
    assert f.status == "warn" and "hardware thermal slowdown" in f.summary


def test_mig_mode_warns():
    f = run(RichNVML(mig=1))
    assert f.status == "warn" and "MIG mode" in f.summary


def test_pcie_card_is_named_as_such():
    f = run(RichNVML(name="NVIDIA H100 PCIe", power_w=350, default_w=350, max_w=350))
    assert f.status == "ok" and f.measured["gpus"][0]["form_factor"] == "PCIe"


def test_unsupported_queries_are_left_out_not_crashed():
    f = run(RichNVML(unsupported=("power", "ecc", "mig", "attributes")))
    assert f.status == "ok"
    facts = f.measured["gpus"][0]
    assert "power_limit_w" not in facts and "ecc" not in facts and "sm_count" not in facts
