"""attention_backends: which diffusers attention backends actually run here and give the right answer.

Each candidate (probes.backends' table) runs `dispatch_attention_fn` on small random q/k/v ([B, S, H, D],
diffusers' layout) and is compared with a float64 math reference. `measured["working"]` is the tuner's attention
search space. Backends diffusers does not ship (fa4) are registered first through `ctx.attention_registrars`.
"""

from __future__ import annotations

import time
import warnings

from probes.backends import ATTENTION_BACKENDS, BY_NAME, LOSSY_REL_ERR_LIMIT
from probes.context import ProbeContext, exc_line, mark
from probes.finding import Finding
from probes.imports import import_or_block

CANDIDATES = list(ATTENTION_BACKENDS)
# On the CPU only the default and its exact reference are checked: the CPU runs the tiny model, where no other
# kernel is worth a trial (flex would pay for a compile).
CPU_CANDIDATES = ["native", "_native_math"]
B, S, H, D = 1, 256, 4, 64
REL_ERR_LIMIT = {"bfloat16": 2e-2, "float32": 1e-4}


def register_backends(ctx: ProbeContext) -> dict[str, str]:
    """Call each of `ctx.attention_registrars` ("module:function"); backend -> why it is not registered, for those
    whose registration did not happen. A registrar returns False when its package does not import here."""
    why_not: dict[str, str] = {}
    for backend, target in ctx.attention_registrars.items():
        module, _, function = target.partition(":")
        try:
            if not getattr(ctx.import_module(module), function)():
                package = BY_NAME[backend].package if backend in BY_NAME else None
                why_not[backend] = (f"not installed or does not import{f' ({package})' if package else ''}: "
                                    "see the flash_attn probe")
        except Exception as exc:
            why_not[backend] = f"could not be registered: {exc_line(exc)}"
    return why_not


def _rel_err(torch, out, ref) -> float:
    out = out.detach().to("cpu", torch.float64)
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))


def probe(ctx: ProbeContext) -> Finding:
    torch, blocked = import_or_block(ctx, "attention_backends", "torch")
    if blocked is not None:
        return blocked
    mark("attention_backends.torch_imported")
    dispatch, blocked = import_or_block(ctx, "attention_backends", "diffusers.models.attention_dispatch")
    if blocked is not None:
        return blocked
    mark("attention_backends.diffusers_imported")
    names = getattr(dispatch, "AttentionBackendName", None)
    unregistered = register_backends(ctx) if torch.cuda.is_available() else {}
    mark("attention_backends.registered")
    registered = {b.value for b in names} if names is not None else set(CANDIDATES)
    check_requirements = getattr(dispatch, "_check_attention_backend_requirements", None)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        try:  # what flex's compile imports, imported before asking for the GPU (errors come back below)
            ctx.import_module("torch._inductor.compile_fx")
        except Exception:
            pass
        mark("attention_backends.inductor_imported")
        ctx.use_gpu()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    dtype_name = str(dtype).removeprefix("torch.")
    limit = REL_ERR_LIMIT[dtype_name]
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(B, S, H, D, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
    # Reference on the same (rounded) inputs, in float64, [B, S, H, D] -> [B, H, S, D] for SDPA.
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(t.to("cpu", torch.float64).transpose(1, 2) for t in (q, k, v))).transpose(1, 2)

    working, broken, errors, seconds = [], {}, {}, {}
    for name in CANDIDATES:
        started = time.perf_counter()
        if device == "cpu" and name not in CPU_CANDIDATES:
            broken[name] = "needs CUDA"
            continue
        if name in unregistered:
            broken[name] = unregistered[name]
            continue
        if name not in registered:
            broken[name] = "not registered in this diffusers"
            continue
        try:
            backend = names(name) if names is not None else name
            if check_requirements is not None:
                check_requirements(backend)  # "install flash-attn>=..." instead of "'NoneType' is not callable"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = dispatch.dispatch_attention_fn(q, k, v, backend=backend)
            if device == "cuda":
                torch.cuda.synchronize()
            err = _rel_err(torch, out, ref)
        except Exception as exc:
            broken[name] = f"not working: {exc_line(exc)}"
            continue
        finally:
            seconds[name] = round(time.perf_counter() - started, 3)
        errors[name] = float(f"{err:.3g}")
        allowed = LOSSY_REL_ERR_LIMIT if name in BY_NAME and BY_NAME[name].lossy else limit
        if not err <= allowed:  # also catches NaN
            broken[name] = f"wrong result: relative error {err:.2e} > {allowed:.0e}"
        else:
            working.append(name)

    # Seconds per backend: a first call pays for loading its kernels (or compiling them, for flex).
    measured = {"working": working, "broken": broken, "device": device, "errors": errors, "seconds": seconds}
    details = [f"q/k/v [B={B}, S={S}, H={H}, D={D}] {dtype_name} on {device}, "
               f"vs float64 reference, limit {limit:.0e} (8-bit kernels {LOSSY_REL_ERR_LIMIT:.0e})"]
    details += [f"{n}: works (relative error {errors[n]:.1e})" for n in working]
    details += [f"{n}: {why}" for n, why in broken.items()]
    need_cuda = sum(why == "needs CUDA" for why in broken.values())
    failing = len(broken) - need_cuda
    summary = f"working on {device} ({dtype_name}): {', '.join(working) or 'none'}" \
              + (f"; {failing} not working" if failing else "") + (f"; {need_cuda} need CUDA" if need_cuda else "")
    if "native" not in working:
        return Finding(id="attention_backends", status="fail",
                       summary=f"the default backend 'native' does not work: {broken.get('native')}",
                       details=details, measured=measured,
                       fix='reinstall a matching torch and diffusers: pip install --force-reinstall torch '
                           '"diffusers>=0.35", then run `python -m probes._worker attention_backends`')
    return Finding(id="attention_backends", status="ok", summary=summary, details=details, measured=measured)
