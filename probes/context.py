"""ProbeContext: everything a probe reads from the outside world, injectable so tests use fakes."""

from __future__ import annotations

import dataclasses
import getpass
import importlib
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from probes.finding import Finding
from probes.workload import Workload


def run_command(argv: Sequence[str], timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Run a command and capture its output; never raises. A missing program is returncode 127,
    a timeout 124 (the shell's conventions), so probes only look at returncode/stdout/stderr."""
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return subprocess.CompletedProcess(list(argv), 127, "", f"{argv[0]}: command not found")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(list(argv), 124, "", f"{argv[0]}: timed out after {timeout:g} s")
    except OSError as exc:
        return subprocess.CompletedProcess(list(argv), 126, "", f"{argv[0]}: {exc}")


def load_nvml() -> Any:
    """The initialised pynvml module; raises (ImportError, NVMLError) when there is no driver or GPU.
    The caller calls nvmlShutdown()."""
    import pynvml

    pynvml.nvmlInit()
    return pynvml


def _message_line(error: BaseException, limit: int) -> str:
    lines = str(error).strip().splitlines()
    first = lines[0].strip() if lines else ""
    return first if len(first) <= limit else first[:max(limit - 3, 0)] + "..."


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of the error's message, cut at `limit` characters; its type's name when the message is
    empty (`KeyError()`), so a one-line report never ends in a bare colon."""
    return _message_line(error, limit) or type(error).__name__


def exc_line(exc: BaseException) -> str:
    """'<ExceptionType>: <first line of the message>', the one-line form every report uses."""
    first = _message_line(exc, 300)
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def default_disk_paths(env: Mapping[str, str]) -> dict[str, Path]:
    """Where the big downloads and caches land: the HF hub cache and torch inductor's cache."""
    home = Path(env.get("HOME") or Path.home())
    if env.get("HF_HUB_CACHE"):
        hf = Path(env["HF_HUB_CACHE"])
    elif env.get("HF_HOME"):
        hf = Path(env["HF_HOME"]) / "hub"
    else:
        hf = Path(env.get("XDG_CACHE_HOME") or home / ".cache") / "huggingface" / "hub"
    if env.get("TORCHINDUCTOR_CACHE_DIR"):
        inductor = Path(env["TORCHINDUCTOR_CACHE_DIR"])
    else:
        try:
            user = getpass.getuser()
        except Exception:  # no passwd entry in some containers
            user = "unknown"
        inductor = Path(tempfile.gettempdir()) / f"torchinductor_{user}"  # torch's default
    return {"hf_cache": hf.expanduser(), "inductor_cache": inductor.expanduser()}


@dataclasses.dataclass
class ProbeContext:
    env: Mapping[str, str] = dataclasses.field(default_factory=lambda: os.environ)
    run: Callable[[Sequence[str], float], Any] = run_command  # (argv, timeout) -> returncode/stdout/stderr
    import_module: Callable[[str], Any] = importlib.import_module
    nvml: Callable[[], Any] = load_nvml
    # Sizes the probes measure at; its `model` follows `model` below when built from settings.
    workload: Workload = dataclasses.field(default_factory=lambda: Workload(model="Qwen/Qwen-Image"))
    # Text tokens the attention shapes add to the image tokens: the prompt's length after the text encoder,
    # which the workload does not fix (128 covers a typical prompt).
    text_tokens: int = 128
    # label -> path; None derives them from `env` (HF_HUB_CACHE / HF_HOME, TORCHINDUCTOR_CACHE_DIR).
    disk_paths: Mapping[str, Path] | None = None
    model: str = "Qwen/Qwen-Image"  # what the model and memory_plan probes look for
    bench: bool = False  # the --bench tier: probes may spend tens of seconds measuring
    # Attention backends diffusers does not register itself (probes.backends' "fa4"): backend -> "module:function"
    # of a function that registers it with diffusers' dispatcher and returns False when its package does not
    # import here. The application that owns the registration supplies it, so the probes need nothing above them.
    attention_registrars: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # Called by `use_gpu()`. A grouped worker sets it to wait until no timing probe is measuring; None: no-op.
    gpu_gate: Callable[[], None] | None = None

    def __post_init__(self):
        if self.disk_paths is None:
            self.disk_paths = default_disk_paths(self.env)

    def use_gpu(self) -> None:
        """Call before launching GPU kernels (imports and CUDA queries need not): in `qwendoctor check` this
        waits while an exclusive probe times the GPU, so no probe's kernels share the GPU with its timing."""
        if self.gpu_gate is not None:
            self.gpu_gate()

    def settings(self) -> dict[str, Any]:
        """What a probe in a subprocess needs to rebuild this context (SETTINGS_ENV, as JSON)."""
        return {"width": self.workload.width, "height": self.workload.height,
                "text_tokens": self.text_tokens, "model": self.model, "bench": self.bench,
                "attention_registrars": dict(self.attention_registrars)}

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> "ProbeContext":
        model = str(settings.get("model", "Qwen/Qwen-Image"))
        workload = Workload(model=model, width=int(settings.get("width", 1328)),
                            height=int(settings.get("height", 1328)))
        return cls(workload=workload, text_tokens=int(settings.get("text_tokens", 128)), model=model,
                   bench=bool(settings.get("bench", False)),
                   attention_registrars=dict(settings.get("attention_registrars") or {}))


# The doctor passes the context's settings to a probe subprocess through this variable.
SETTINGS_ENV = "QWENDOCTOR_PROBE_SETTINGS"
# `qwendoctor check` with QWENDOCTOR_CHECK_TRACE=file appends a timeline of the run there (JSON lines). The
# runner's start on time.perf_counter's clock comes in TRACE_T0_ENV: that clock (CLOCK_MONOTONIC on Linux) is
# the same in every process, so a worker's marks line up with the runner's events.
TRACE_ENV = "QWENDOCTOR_CHECK_TRACE"
TRACE_T0_ENV = "QWENDOCTOR_CHECK_T0"


def mark(event: str, **fields) -> None:
    """Append one timeline line (a probe's phase: imports done, first kernel, timing done) when tracing."""
    path = os.environ.get(TRACE_ENV)
    if not path:
        return
    t0 = float(os.environ.get(TRACE_T0_ENV) or 0.0)
    try:
        with open(path, "a") as fh:  # O_APPEND: lines of concurrent workers do not interleave
            fh.write(json.dumps({"t": round(time.perf_counter() - t0, 3), "event": event, "pid": os.getpid(),
                                 **fields}) + "\n")
    except OSError:  # a trace that cannot be written must not cost the probe its finding
        pass


def cuda_device_name(torch) -> str | None:
    """torch's name for cuda:0 ("NVIDIA H100 80GB HBM3"), the key of probes/measured.toml; None when unknown."""
    try:
        return str(torch.cuda.get_device_name(0))
    except Exception:  # no CUDA, a broken driver, or a stand-in torch without the call
        return None


def cuda_torch(ctx: "ProbeContext", probe_id: str, without_cuda: str):
    """(torch, None) where CUDA works, else (None, a skip Finding saying why): the prelude of GPU-only probes."""
    from probes.imports import import_or_block  # probes.imports builds on this module

    torch, blocked = import_or_block(ctx, probe_id, "torch")
    if blocked is not None:
        return None, blocked
    if not torch.cuda.is_available():
        return None, Finding(id=probe_id, status="skip", summary=without_cuda,
                             details=[f"torch {torch.__version__}, CUDA {torch.version.cuda}"])
    return torch, None
