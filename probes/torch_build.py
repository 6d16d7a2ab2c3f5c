"""torch_build: which torch is installed, what CUDA/cuDNN it was built against, and whether it can use
this machine's GPU. The classic failure: a CPU-only wheel on a GPU machine (pip's default index on some
platforms), which runs, slowly, without a word."""

from __future__ import annotations

import re

from probes.context import ProbeContext
from probes.finding import Finding

MIN_TORCH = (2, 5)  # SDPA backends and regional compile
INDEX = "https://download.pytorch.org/whl/"


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text.split("+")[0])[:3])


def _driver_cuda(ctx: ProbeContext) -> tuple[bool, str | None]:
    """(an NVIDIA GPU answers nvidia-smi, the highest CUDA version the driver supports)."""
    res = ctx.run(["nvidia-smi"], 20.0)
    if res.returncode != 0:
        return False, None
    m = re.search(r"CUDA Version:\s*([\d.]+)", res.stdout or "")
    return True, (m.group(1) if m else None)


def _wheel_tag(driver_cuda: str | None) -> str:
    """The newest PyTorch CUDA wheel index this driver can run (minor-version compatibility within 12.x)."""
    v = _version_tuple(driver_cuda) if driver_cuda else (12, 8)
    if v >= (13, 0):
        return "cu130"
    if v >= (12, 8):
        return "cu128"
    return "cu126"


def _pip_fix(driver_cuda: str | None) -> str:
    if driver_cuda and _version_tuple(driver_cuda) < (12, 0):
        return (f"the driver only supports CUDA {driver_cuda}: update the NVIDIA driver (>= 560), then "
                f"pip install --force-reinstall torch --index-url {INDEX}cu126")
    return f"pip install --force-reinstall torch --index-url {INDEX}{_wheel_tag(driver_cuda)}"


def _arch_supported(arch_list: list[str], cc: tuple[int, int]) -> bool:
    """A cubin sm_XY runs on the same major with minor >= Y; PTX compute_XY JITs for any newer cc."""
    for arch in arch_list:
        m = re.fullmatch(r"(sm|compute)_(\d+?)(\d)a?", arch)
        if not m:
            continue
        kind, major, minor = m.group(1), int(m.group(2)), int(m.group(3))
        if kind == "sm" and major == cc[0] and minor <= cc[1] and not arch.endswith("a"):
            return True
        if kind == "sm" and arch.endswith("a") and (major, minor) == cc:
            return True
        if kind == "compute" and (major, minor) <= cc:
            return True
    return False


def _cudnn_text(version: int | None) -> str | None:
    """torch reports cuDNN as an int: 91900 is 9.19.0 (cuDNN 9), 8902 is 8.9.2 (cuDNN 8)."""
    if not version:
        return None
    if version >= 90000:
        return f"{version // 10000}.{version // 100 % 100}.{version % 100}"
    return f"{version // 1000}.{version // 100 % 10}.{version % 100}"


def _distribution_version(ctx: ProbeContext, *names: str) -> str | None:
    metadata = ctx.import_module("importlib.metadata")
    for name in names:
        try:
            return metadata.version(name)
        except Exception:
            continue
    return None


def _shadowing_cudnn(ctx: ProbeContext, loaded: str | None, bundled: str | None) -> str | None:
    """A cuDNN other than the wheel's, loaded through LD_LIBRARY_PATH: the usual cause of slow or failing
    cuDNN attention after a system CUDA install."""
    if not loaded or not bundled or loaded.split(".")[:2] == bundled.split(".")[:2]:
        return None
    paths = [p for p in (ctx.env.get("LD_LIBRARY_PATH") or "").split(":") if p]
    return (f"cuDNN {loaded} is loaded but torch's wheel bundles {bundled}"
            + (f"; LD_LIBRARY_PATH puts {', '.join(paths[:3])} first" if paths else ""))


def probe(ctx: ProbeContext) -> Finding:
    try:
        torch = ctx.import_module("torch")
    except Exception as exc:
        from probes.context import exc_line

        return Finding(id="torch_build", status="fail", summary=f"torch does not import: {exc_line(exc)}",
                       fix=_pip_fix(_driver_cuda(ctx)[1]), measured={"torch": None})

    version = str(torch.__version__)
    cuda = getattr(torch.version, "cuda", None)
    cudnn = torch.backends.cudnn.version() if cuda else None
    cuda_available = bool(torch.cuda.is_available()) if cuda else False
    arch_list = list(torch.cuda.get_arch_list()) if cuda_available else []
    nccl = None
    if cuda_available:
        try:
            nccl = ".".join(str(part) for part in torch.cuda.nccl.version())
        except Exception:  # a build without NCCL (Windows, some source builds)
            nccl = None
    triton = _distribution_version(ctx, "triton", "pytorch-triton")
    bundled_cudnn = _distribution_version(ctx, "nvidia-cudnn-cu13", "nvidia-cudnn-cu12") if cuda else None
    measured = {"torch": version, "cuda": cuda, "cudnn": cudnn, "cuda_available": cuda_available,
                "arch_list": arch_list, "nccl": nccl, "triton": triton, "cudnn_bundled": bundled_cudnn}
    has_gpu, driver_cuda = _driver_cuda(ctx)
    details = [f"torch {version}", f"built for CUDA {cuda}" if cuda else "CPU-only build (torch.version.cuda is None)",
               f"cuDNN {cudnn}" if cudnn else "no cuDNN",
               f"nvidia-smi: {'GPU present, driver supports CUDA ' + str(driver_cuda) if has_gpu else 'no GPU answers'}"]
    if arch_list:
        details.append("compiled for: " + " ".join(arch_list))
    details.append(f"NCCL {nccl}" if nccl else "NCCL: not available (multi-GPU generation needs it)")
    details.append(f"triton {triton}" if triton else "triton: not installed (torch.compile on GPU needs it)")

    def finding(status, summary, fix=None):
        return Finding(id="torch_build", status=status, summary=summary, details=details, fix=fix, measured=measured)

    if cuda is None and has_gpu:
        return finding("fail", f"torch {version} is a CPU-only build, but this machine has an NVIDIA GPU "
                               f"(driver supports CUDA {driver_cuda or '?'})", _pip_fix(driver_cuda))
    if cuda and has_gpu and not cuda_available:
        return finding("fail", f"torch {version} is built for CUDA {cuda} but cannot use the GPU "
                               f"(driver supports CUDA {driver_cuda or '?'})",
                       f"update the NVIDIA driver, or install the wheel this driver runs: {_pip_fix(driver_cuda)}")
    if cuda_available:
        cc = tuple(torch.cuda.get_device_capability(0))
        measured["device_cc"] = f"{cc[0]}.{cc[1]}"
        if arch_list and not _arch_supported(arch_list, cc):
            return finding("fail", f"torch {version} (CUDA {cuda}) has no kernels for this GPU's sm_{cc[0]}{cc[1]}",
                           _pip_fix(driver_cuda))

    shadowed = _shadowing_cudnn(ctx, _cudnn_text(cudnn), bundled_cudnn) if cuda_available else None
    if shadowed:
        return finding("warn", f"torch {version}, CUDA {cuda}: {shadowed}",
                       "unset LD_LIBRARY_PATH (or drop the system CUDA/cuDNN directories from it) so torch loads "
                       "the cuDNN its wheel ships")
    if cuda_available and triton is None:
        return finding("warn", f"torch {version}, CUDA {cuda}, GPU usable, but triton is missing: torch.compile "
                               "cannot generate GPU kernels", "pip install triton")
    if cuda_available:
        summary = f"torch {version}, CUDA {cuda}, cuDNN {_cudnn_text(cudnn)}, GPU usable"
    elif cuda:
        summary = f"torch {version}, CUDA {cuda} build, no GPU on this machine: CPU only"
    else:
        summary = f"torch {version}, CPU-only build, no GPU on this machine: CPU only"
    if _version_tuple(version) < MIN_TORCH:
        tag = _wheel_tag(driver_cuda) if (cuda or has_gpu) else "cpu"
        return finding("warn", f"{summary}; torch older than {MIN_TORCH[0]}.{MIN_TORCH[1]} lacks the SDPA "
                               "backends and regional compile qwendoctor tunes",
                       f'pip install -U "torch>=2.5" --index-url {INDEX}{tag}')
    return finding("ok", summary)
