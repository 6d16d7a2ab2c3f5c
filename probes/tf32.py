"""tf32: the TF32 flags, and a measurement of what they change (a 4096^3 fp32 matmul, TF32 off vs on).

Honest scope: Qwen-Image runs in bf16, so TF32 only touches the few fp32 ops left in a step; the flag is a
`tune` lever, not a fix, and this probe never warns about it.
"""

from __future__ import annotations

import contextlib
import warnings

from probes.context import ProbeContext, exc_line
from probes.finding import Finding
from probes.imports import import_or_block
from probes.timing import time_ms

N = 4096  # fp32 matmul N x N x N
WARMUP, REPS = 2, 5
BF16_NOTE = ("Qwen-Image runs in bf16, so TF32 only affects the few ops still in fp32; "
             "bf16 matmuls never use it")


def _get(fn):
    try:
        with warnings.catch_warnings():  # torch >= 2.9 warns when the legacy and new APIs are mixed
            warnings.simplefilter("ignore")
            return fn()
    except Exception:
        return None


def read_flags(torch) -> dict:
    """The legacy flags, torch.get_float32_matmul_precision(), and torch >= 2.9's fp32_precision ones."""
    flags = {
        "matmul_allow_tf32": _get(lambda: bool(torch.backends.cuda.matmul.allow_tf32)),
        "cudnn_allow_tf32": _get(lambda: bool(torch.backends.cudnn.allow_tf32)),
        "float32_matmul_precision": _get(lambda: str(torch.get_float32_matmul_precision())),
    }
    new = {"fp32_precision": lambda: torch.backends.fp32_precision,
           "matmul_fp32_precision": lambda: torch.backends.cuda.matmul.fp32_precision,
           "cudnn_fp32_precision": lambda: torch.backends.cudnn.fp32_precision}
    for name, fn in new.items():
        value = _get(fn)
        if value is not None:
            flags[name] = str(value)
    return flags


@contextlib.contextmanager
def tf32_matmul(torch, enabled: bool):
    """Set TF32 for cuBLAS matmuls for the block, through the new API where it exists, and restore it."""
    matmul = torch.backends.cuda.matmul
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if hasattr(matmul, "fp32_precision"):
            old = matmul.fp32_precision
            matmul.fp32_precision = "tf32" if enabled else "ieee"
            try:
                yield
            finally:
                matmul.fp32_precision = old
        else:
            old = matmul.allow_tf32
            matmul.allow_tf32 = enabled
            try:
                yield
            finally:
                matmul.allow_tf32 = old


def matmul_tflops(torch, tf32: bool, n: int = N) -> float:
    """TFLOP/s of an n^3 fp32 matmul on the GPU: warm-up, then the median of REPS event-timed runs."""
    a = torch.randn(n, n, device="cuda")
    b = torch.randn(n, n, device="cuda")
    with tf32_matmul(torch, tf32):
        ms = time_ms(torch, lambda: a @ b, WARMUP, REPS)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def probe(ctx: ProbeContext) -> Finding:
    torch, blocked = import_or_block(ctx, "tf32", "torch")
    if blocked is not None:
        return blocked
    flags = read_flags(torch)
    measured: dict = dict(flags)
    details = [f"{k} = {v}" for k, v in flags.items()]
    override = ctx.env.get("NVIDIA_TF32_OVERRIDE")
    if override is not None:
        measured["NVIDIA_TF32_OVERRIDE"] = override
        if override == "0":
            details.append("NVIDIA_TF32_OVERRIDE=0: the driver libraries ignore the TF32 flags (TF32 off)")
    details.append(BF16_NOTE)
    on = "on" if flags.get("matmul_allow_tf32") or flags.get("matmul_fp32_precision") == "tf32" else "off"

    if not torch.cuda.is_available():
        return Finding(id="tf32", status="skip", summary=f"no CUDA GPU: TF32 is a GPU feature "
                       f"(matmul TF32 {on}); {BF16_NOTE.split(',')[0]}", details=details, measured=measured)
    try:
        fp32 = matmul_tflops(torch, False)
        tf32 = matmul_tflops(torch, True)
    except Exception as exc:
        details.append(f"the fp32 matmul measurement failed: {exc_line(exc)}")
        return Finding(id="tf32", status="warn", summary=f"matmul TF32 {on}; the fp32 matmul measurement failed: "
                       f"{exc_line(exc)}", details=details, measured=measured,
                       fix="run `python -m probes._worker tf32` to see the full output")
    measured["fp32_tflops"] = round(fp32, 1)
    measured["tf32_tflops"] = round(tf32, 1)
    details.append(f"fp32 matmul {N}x{N}x{N}, measured here: {fp32:.1f} TFLOP/s with TF32 off, {tf32:.1f} TFLOP/s "
                   f"with TF32 on ({tf32 / fp32:.1f}x; median of {REPS})")
    return Finding(id="tf32", status="ok",
                   summary=f"matmul TF32 {on}; fp32 matmul {fp32:.0f} -> {tf32:.0f} TFLOP/s with TF32 here, but "
                           "Qwen-Image runs in bf16: TF32 only affects its few fp32 ops",
                   details=details, measured=measured)
