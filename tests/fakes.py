"""Fakes shared by the probe tests."""

import importlib
import time


def fake_import(**modules):
    """import_module that serves fakes by dotted name (`diffusers__hooks` for diffusers.hooks); an
    Exception value is raised; everything else is the real import."""
    table = {name.replace("__", "."): mod for name, mod in modules.items()}

    def import_module(name):
        if name in table:
            if isinstance(table[name], BaseException):
                raise table[name]
            return table[name]
        return importlib.import_module(name)

    return import_module


class FakeEvent:
    """torch.cuda.Event on the host clock: elapsed_time in ms between two records."""

    def __init__(self, enable_timing=False):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


def _canonical(name):
    import re

    return re.sub(r"[-_.]+", "-", str(name)).lower()


class FakeMetadata:
    """importlib.metadata over a table {dist: (version, [Requires-Dist lines], [top-level modules])}."""

    def __init__(self, dists):
        self.dists = {_canonical(name): (name, *entry) for name, entry in dists.items()}

    def _entry(self, name):
        import importlib.metadata

        if _canonical(name) not in self.dists:
            raise importlib.metadata.PackageNotFoundError(name)
        return self.dists[_canonical(name)]

    def version(self, name):
        return self._entry(name)[1]

    def requires(self, name):
        return list(self._entry(name)[2])

    def packages_distributions(self):
        table = {}
        for name, _, _, modules in self.dists.values():
            for module in modules:
                table.setdefault(module, []).append(name)
        return table

    def distributions(self):
        from types import SimpleNamespace

        return [SimpleNamespace(metadata={"Name": name}) for name, *_ in self.dists.values()]


def write_package(root, dist, version, requires=(), files=None):
    """A package as pip leaves it under `root` (a sys.path entry): its source files {relative path: text} and a
    dist-info with METADATA (Requires-Dist) and top_level.txt, which importlib.metadata reads."""
    from pathlib import Path

    root = Path(root)
    files = dict(files or {})
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    lines = ["Metadata-Version: 2.1", f"Name: {dist}", f"Version: {version}"]
    lines += [f"Requires-Dist: {req}" for req in requires]
    (info / "METADATA").write_text("\n".join(lines) + "\n")
    tops = sorted({Path(relative).parts[0].removesuffix(".py") for relative in files})
    (info / "top_level.txt").write_text("".join(f"{top}\n" for top in tops))
    return root


_GIB = 1024**3
_MIB = 1024**2


class CudaOnCpuTorch:
    """Real torch on the CPU, with a `cuda` namespace that says a GPU is there (`name`, compute capability `cc`):
    device= is dropped where tensors are made, events time on the host clock."""

    def __init__(self, name="NVIDIA H100 80GB HBM3", cc=(9, 0)):
        from types import SimpleNamespace

        self.cuda = SimpleNamespace(
            is_available=lambda: True, synchronize=lambda: None, Event=FakeEvent,
            get_device_name=lambda i=0: name, get_device_capability=lambda i=0: cc,
            get_device_properties=lambda i=0: SimpleNamespace(uuid="1234-abcd"),
            mem_get_info=lambda i=0: (70 * _GIB, 80 * _GIB), empty_cache=lambda: None, device_count=lambda: 1)

    def __getattr__(self, name):
        import torch

        return getattr(torch, name)

    @staticmethod
    def _cpu(fn):
        def call(*args, device=None, **kwargs):
            return fn(*args, **kwargs)
        return call

    def randn(self, *a, **k):
        import torch

        return self._cpu(torch.randn)(*a, **k)

    def randint(self, *a, **k):
        import torch

        return self._cpu(torch.randint)(*a, **k)

    def tensor(self, *a, **k):
        import torch

        return self._cpu(torch.tensor)(*a, **k)

    def empty(self, *a, **k):
        import torch

        return self._cpu(torch.empty)(*a, **k)


class FakeNvml:
    """pynvml for one GPU model (`count` of them): what the gpu, memory_plan, roofline and topology probes ask."""

    def __init__(self, name="NVIDIA H100 80GB HBM3", total=81559 * _MIB, used=600 * _MIB, count=1,
                 limit_mw=700_000, default_mw=700_000, max_mw=700_000, throttle=0x0, cc=(9, 0)):
        self.name, self.total, self.used, self.count, self.cc = name, total, used, count, cc
        self.limit_mw, self.default_mw, self.max_mw, self.throttle = limit_mw, default_mw, max_mw, throttle
        self.shutdowns = 0
        self.NVML_CLOCK_SM = 1

    def __call__(self):  # ctx.nvml
        return self

    def nvmlSystemGetDriverVersion(self):
        return "580.159.04"

    def nvmlSystemGetCudaDriverVersion(self):
        return 13000

    def nvmlDeviceGetCount(self):
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("h", i)

    def nvmlDeviceGetHandleByUUID(self, uuid):
        assert uuid == "GPU-1234-abcd"
        return ("h", 0)

    def nvmlDeviceGetIndex(self, handle):
        return handle[1]

    def nvmlDeviceGetName(self, handle):
        return self.name.encode()

    def nvmlDeviceGetCudaComputeCapability(self, handle):
        return self.cc

    def nvmlDeviceGetMemoryInfo(self, handle):
        from types import SimpleNamespace

        return SimpleNamespace(total=self.total, used=self.used, free=self.total - self.used)

    def nvmlDeviceGetPowerManagementLimit(self, handle):
        return self.limit_mw

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle):
        return self.default_mw

    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle):
        return (200_000, self.max_mw)

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle):
        return self.throttle

    def nvmlDeviceGetClockInfo(self, handle, kind):
        return 1755

    def nvmlDeviceGetMaxClockInfo(self, handle, kind):
        return 1980

    def nvmlShutdown(self):
        self.shutdowns += 1
