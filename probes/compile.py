"""compile: can torch.compile work here? triton (on CUDA), a tiny compile that must match eager, and a
writable inductor cache (compiled kernels are reused from it across runs; without it every run recompiles)."""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path

from probes.context import ProbeContext, exc_line, mark
from probes.finding import Finding
from probes.imports import import_or_block

DISABLE_VARS = ("TORCH_COMPILE_DISABLE", "TORCHDYNAMO_DISABLE")  # torch reads both as == "1"
COMPILER_HINT = re.compile(r"CppCompileError|InvalidCxxCompiler|C\+\+ compiler|C compiler|\bg\+\+|\bgcc\b|"
                           r"\bcc\b.*not found|Python\.h", re.IGNORECASE)


def tiny_compile(torch, device: str) -> tuple[float, float]:
    """(seconds for the first compiled call, max abs difference from eager) for a (64, 64) gelu*2+1."""
    x = torch.randn(64, 64, device=device)

    def fn(t):
        return torch.nn.functional.gelu(t) * 2 + 1

    compiled = torch.compile(fn)
    start = time.perf_counter()
    out = compiled(x)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return seconds, float((out - fn(x)).abs().max())


def cache_writable(path: Path) -> tuple[bool, str | None]:
    """Create the directory if missing, then write and delete a temp file in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".qwendoctor-", dir=path)
        os.write(fd, b"ok")
        os.close(fd)
        os.unlink(name)
        return True, None
    except OSError as exc:
        return False, exc_line(exc)


def fx_graph_cache(ctx: ProbeContext) -> str | None:
    """'hit' | 'miss' | 'bypass' for the tiny compile, from inductor's counters; None where unknown."""
    try:
        counters = ctx.import_module("torch._dynamo.utils").counters["inductor"]
    except Exception:
        return None
    for outcome in ("hit", "miss", "bypass"):
        if counters.get(f"fxgraph_cache_{outcome}"):
            return outcome
    return None


def _error_lines(exc: BaseException) -> list[str]:
    """The lines of a (long, multi-line) inductor error that say what went wrong."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    keep = [ln for ln in lines[1:] if re.search(r"error|exception|not found|no such file|cannot|compiler|failed", ln, re.IGNORECASE)]
    return [ln[:300] for ln in keep[:3]]


def probe(ctx: ProbeContext) -> Finding:
    torch, blocked = import_or_block(ctx, "compile", "torch")
    if blocked is not None:
        return blocked
    try:
        # One tiny graph does not need inductor's pool of compile workers, whose start-up would dominate
        # the probe's time.
        ctx.import_module("torch._inductor.config").compile_threads = 1
        # Inductor's compiler is imported by the first compile anyway; imported now, before the probe asks
        # for the GPU, so its seconds overlap the timing probes instead of following them. An error here
        # comes back from the compile below, where it is classified.
        ctx.import_module("torch._inductor.compile_fx")
    except Exception:
        pass
    mark("compile.inductor_imported")
    cuda = bool(torch.cuda.is_available())
    device = "cuda" if cuda else "cpu"
    cache_dir = Path(ctx.disk_paths.get("inductor_cache") or ctx.env.get("TORCHINDUCTOR_CACHE_DIR")
                     or Path(tempfile.gettempdir()) / "torchinductor")
    measured: dict = {"triton": None, "compile_s": None, "cache_dir": str(cache_dir), "cache_writable": None,
                      "device": device, "disabled_by": [], "fx_graph_cache": None}
    details: list[str] = []

    if cuda:
        try:
            triton = ctx.import_module("triton")
            measured["triton"] = str(getattr(triton, "__version__", "?"))
            details.append(f"triton {measured['triton']} (inductor's GPU code generator)")
        except Exception as exc:
            details.append(f"triton does not import: {exc_line(exc)}")
    else:
        details.append("no CUDA GPU: triton is not needed (inductor generates C++ for the CPU)")

    disabled = [v for v in DISABLE_VARS if ctx.env.get(v) == "1"]
    measured["disabled_by"] = disabled

    compile_error = None
    if cuda:
        ctx.use_gpu()  # the compiled kernel runs on the GPU
    try:
        seconds, diff = tiny_compile(torch, device)
        measured["compile_s"] = round(seconds, 2)
        if not diff <= 1e-4:  # also NaN
            raise AssertionError(f"compiled result differs from eager by {diff:.2e}")
        details.append(f"torch.compile of gelu(x)*2+1 on a (64, 64) float32 tensor on {device}: first call "
                       f"{seconds:.1f} s here (compile), matches eager (max diff {diff:.1e})")
        cache = fx_graph_cache(ctx)
        measured["fx_graph_cache"] = cache
        if cache:
            details.append(f"inductor FX graph cache: {cache} (a hit reuses the compiled graph from an earlier run)")
    except Exception as exc:
        compile_error = exc
        details.append(f"torch.compile failed on {device}: {exc_line(exc)}")
        details += [f"  {ln}" for ln in _error_lines(exc)]

    ok, why = cache_writable(cache_dir)
    measured["cache_writable"] = ok
    details.append(f"inductor cache {cache_dir}: " + ("writable" if ok else f"not writable ({why})"))

    def finding(status, summary, fix=None):
        return Finding(id="compile", status=status, summary=summary, details=details, fix=fix, measured=measured)

    if compile_error is not None:
        text = f"{compile_error!r} {compile_error}"
        if cuda and measured["triton"] is None:
            fix = "pip install --force-reinstall torch (with the index it came from: it pins the triton it needs)"
        elif COMPILER_HINT.search(text) or not cuda:
            fix = ("install a C/C++ compiler, which inductor (and triton's launcher) build with: "
                   "apt-get install -y g++ (or set CXX to one)")
        else:
            fix = "run `python -m probes._worker compile` for the full error; tune leaves compile out meanwhile"
        why = exc_line(compile_error)
        extra = _error_lines(compile_error)
        if why.endswith(":") and extra:  # "BackendCompilerFailed: backend='inductor' raised:" says little alone
            why = f"{why} {extra[0]}"
        return finding("fail", f"torch.compile fails on {device}: {why}", fix)
    if disabled:
        details.append("with compile disabled torch.compile runs the function eagerly, so the check above "
                       "proves nothing about compiling")
        return finding("warn", f"{' and '.join(f'{v}=1' for v in disabled)} is set: torch.compile silently "
                               "does nothing (no speedup from the compile levers)", f"unset {' '.join(disabled)}")
    if not ok:
        return finding("warn", f"inductor cache {cache_dir} is not writable: every run recompiles",
                       "export TORCHINDUCTOR_CACHE_DIR=$HOME/.cache/torchinductor")
    triton = f", triton {measured['triton']}" if measured["triton"] else ""
    return finding("ok", f"torch.compile works on {device}{triton} (tiny compile {seconds:.1f} s here), "
                         f"inductor cache writable")
