"""system: Python version, OS, CPUs, RAM and free disk where the weights and compile caches go."""

from __future__ import annotations

from pathlib import Path

from probes.context import ProbeContext
from probes.finding import Finding

MIN_PYTHON = (3, 11)
# Qwen-Image's weights (transformer + text encoder + VAE) are about 57 GB on disk.
WEIGHTS_GB = 57
MIN_HF_FREE_GIB = 60.0
GIB = 1024**3


def _existing(path: Path) -> Path:
    """The path itself or its nearest existing parent: a cache that does not exist yet lands there."""
    path = Path(path)
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def probe(ctx: ProbeContext) -> Finding:
    sys_mod = ctx.import_module("sys")
    platform = ctx.import_module("platform")
    shutil = ctx.import_module("shutil")
    psutil = ctx.import_module("psutil")

    major, minor, micro = tuple(sys_mod.version_info[:3])
    python = f"{major}.{minor}.{micro}"
    os_name = f"{platform.system()} {platform.release()} ({platform.machine()})"
    cpus = psutil.cpu_count(logical=True)
    ram_gib = round(psutil.virtual_memory().total / GIB, 1)

    disk_free: dict[str, float] = {}
    details = [f"Python {python} at {sys_mod.executable}", f"OS: {os_name}", f"{cpus} CPUs, {ram_gib} GiB RAM"]
    for label, path in (ctx.disk_paths or {}).items():
        free = shutil.disk_usage(str(_existing(path))).free / GIB
        disk_free[label] = round(free, 1)
        details.append(f"{label}: {path} ({free:.1f} GiB free)")

    status, problems, fixes = "ok", [], []
    if (major, minor) < MIN_PYTHON:
        status = "fail"
        problems.append(f"Python {python} is older than {MIN_PYTHON[0]}.{MIN_PYTHON[1]}")
        fixes.append("use Python 3.11 or 3.12: e.g. `uv venv --python 3.12 .venv` and reinstall qwendoctor there")

    hf_path = (ctx.disk_paths or {}).get("hf_cache")
    hf_free = disk_free.get("hf_cache")
    if hf_path is not None and hf_free is not None and hf_free < MIN_HF_FREE_GIB:
        cached = (Path(hf_path) / "models--Qwen--Qwen-Image").exists()
        if cached:
            details.append("Qwen/Qwen-Image is already in the HF cache, so the low free space only limits other models")
        else:
            problems.append(f"only {hf_free:.1f} GiB free for the HF cache; Qwen-Image needs ~{WEIGHTS_GB} GB")
            status = "fail" if status == "fail" else "warn"
            fixes.append(f"free disk space at {hf_path}, or point the cache at a disk with "
                         f"{MIN_HF_FREE_GIB:.0f}+ GiB free: export HF_HOME=/path/on/big/disk/huggingface")

    summary = f"Python {python}, {platform.system()}, {cpus} CPUs, {ram_gib} GiB RAM"
    if hf_free is not None:
        summary += f", {hf_free:.1f} GiB free for the HF cache"
    if problems:
        summary += ": " + "; ".join(problems)
    return Finding(
        id="system", status=status, summary=summary, details=details, fix="; ".join(fixes) or None,
        measured={"python": python, "os": os_name, "cpus": cpus, "ram_gib": ram_gib, "disk_free_gib": disk_free},
    )
