"""fp8: can this machine run the FP8 lever (torchao Float8DynamicActivationFloat8WeightConfig)?
Compute capability >= 8.9, torchao importable with the config, and a torch._scaled_mm smoke test. What FP8 gains
is quoted from probes/measured.toml, labelled with the card it was measured on."""

from __future__ import annotations

import logging

from probes import measured
from probes.context import ProbeContext, cuda_device_name, exc_line, mark
from probes.finding import Finding
from probes.imports import import_or_block

MIN_CC = (8, 9)  # Ada (sm_89) and Hopper (sm_90) have FP8 tensor cores
REL_ERR_LIMIT = 0.1  # e4m3 keeps 3 mantissa bits: ~4% relative error on a random 256^3 product
M = 256
FP8_MAX = 448.0  # largest float8_e4m3fn


def speed_note(gpu_name: str | None) -> str:
    """What FP8 did to a step where it was measured: on this GPU model, or on another card, labelled."""
    eager = measured.nearest(gpu_name, "fp8_eager_vs_bf16")
    compiled = measured.nearest(gpu_name, "fp8_compiled_vs_bf16")
    if eager is None or compiled is None:
        return (f"FP8 speed not measured on {gpu_name or 'this machine'} nor on any GPU in "
                f"{measured.DATA_LABEL}")
    head = (f"FP8 speed measured on {eager.gpu}" if eager.here else
            f"FP8 speed not measured on {gpu_name or 'this machine (no GPU)'}; on {eager.gpu}")
    fp8_ms, bf16_ms = eager.values
    compiled_fp8_ms, compiled_bf16_ms = compiled.values
    on = "" if compiled.gpu == eager.gpu else f" on {compiled.gpu}"
    note = (f"{head}: eager FP8 {fp8_ms:g} vs {bf16_ms:g} ms/step bf16, its dynamic activation quantization "
            f"not fused ({eager.cite}); compiled{on} {compiled_bf16_ms / compiled_fp8_ms:.2f}x faster than bf16, "
            f"{compiled_fp8_ms:g} vs {compiled_bf16_ms:g} ms/step ({compiled.cite})")
    warmup = measured.nearest(gpu_name, "compile_warmup_s")
    if warmup is not None:
        low, high = warmup.values
        on = "" if warmup.gpu == eager.gpu else f" on {warmup.gpu}"
        note += f"; a regional compile's warm-up took {low:g}-{high:g} s{on} ({warmup.cite})"
    return note


def scaled_mm_rel_err(torch, device: str) -> float:
    """bf16 A, B (256x256) -> float8_e4m3fn with per-tensor scales -> torch._scaled_mm, vs the bf16 matmul."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(M, M, generator=gen).to(device=device, dtype=torch.bfloat16)
    b = torch.randn(M, M, generator=gen).to(device=device, dtype=torch.bfloat16)
    scale_a = (a.abs().max().float() / FP8_MAX).reshape(())
    scale_b = (b.abs().max().float() / FP8_MAX).reshape(())
    a8 = (a.float() / scale_a).to(torch.float8_e4m3fn)  # row-major
    b8 = (b.float().t() / scale_b).to(torch.float8_e4m3fn).contiguous().t()  # column-major, as _scaled_mm wants
    out = torch._scaled_mm(a8, b8, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)
    if isinstance(out, tuple):  # torch < 2.5 returned (out, amax)
        out = out[0]
    ref = (a @ b).float()
    return float(torch.linalg.vector_norm(out.float() - ref) / torch.linalg.vector_norm(ref))


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage().splitlines()[0][:200])


def _torchao(ctx: ProbeContext):
    """(state, version, error, log_lines): state is 'ok' | 'missing' | 'broken'."""
    log = logging.getLogger("torchao")
    handler = _Collect()
    log.addHandler(handler)
    try:
        try:
            torchao = ctx.import_module("torchao")
        except ModuleNotFoundError as exc:
            if (getattr(exc, "name", None) or "torchao").split(".")[0] == "torchao":
                return "missing", None, exc_line(exc), handler.lines
            return "broken", None, exc_line(exc), handler.lines
        except Exception as exc:
            return "broken", None, exc_line(exc), handler.lines
        version = str(getattr(torchao, "__version__", "?"))
        try:
            quant = ctx.import_module("torchao.quantization")
            if not hasattr(quant, "Float8DynamicActivationFloat8WeightConfig"):
                raise ImportError("torchao.quantization has no Float8DynamicActivationFloat8WeightConfig "
                                  "(torchao too old)")
        except Exception as exc:
            return "broken", version, exc_line(exc), handler.lines
        return "ok", version, None, handler.lines
    finally:
        log.removeHandler(handler)


def _torchao_installed(ctx: ProbeContext):
    """Without a GPU the verdict is skip whatever torchao does, so its import (seconds) is not paid:
    (state, version, None, []) from package metadata, state 'not_imported' | 'missing'."""
    try:
        version = str(ctx.import_module("importlib.metadata").version("torchao"))
    except Exception:
        version = None
    if version is None and ctx.import_module("importlib.util").find_spec("torchao") is None:
        return "missing", None, None, []
    return "not_imported", version, None, []


def probe(ctx: ProbeContext) -> Finding:
    torch, blocked = import_or_block(ctx, "fp8", "torch")
    if blocked is not None:
        return blocked
    torch_version = str(torch.__version__)
    cuda = bool(torch.cuda.is_available())
    state, ao_version, ao_error, ao_log = _torchao(ctx) if cuda else _torchao_installed(ctx)
    mark("fp8.torchao_imported")
    measured: dict = {"torch": torch_version, "cuda_available": cuda, "torchao": ao_version, "torchao_state": state,
                      "torchao_error": ao_error, "cc": None, "scaled_mm_rel_err": None}
    ao_line = {"ok": f"torchao {ao_version} imports, with Float8DynamicActivationFloat8WeightConfig",
               "not_imported": f"torchao {ao_version or '(version unknown)'} is installed; not imported without "
                               "a CUDA GPU",
               "missing": "torchao is not installed",
               "broken": f"torchao {ao_version or ''} does not import with torch {torch_version}: {ao_error}"
               .replace("  ", " ")}[state]
    details = [ao_line] + [f"torchao log: {line}" for line in ao_log[:3]]
    details.append(speed_note(cuda_device_name(torch) if cuda else None))

    def finding(status, summary, fix=None):
        return Finding(id="fp8", status=status, summary=summary, details=details, fix=fix, measured=measured)

    if not cuda:
        return finding("skip", "no CUDA GPU: FP8 needs an Ada/Hopper GPU (compute capability >= 8.9)")
    cc = tuple(int(x) for x in torch.cuda.get_device_capability(0))
    measured["cc"] = f"{cc[0]}.{cc[1]}"
    details.insert(0, f"compute capability {cc[0]}.{cc[1]} (FP8 needs >= {MIN_CC[0]}.{MIN_CC[1]})")
    if cc < MIN_CC:
        return finding("warn", f"FP8 needs Ada/Hopper (compute capability >= 8.9), this GPU is {cc[0]}.{cc[1]}: "
                               "FP8 levers will be left out of tune",
                       "none needed: bf16 is the precision on this GPU (an Ada/Hopper GPU enables FP8)")
    if state == "missing":
        return finding("warn", "torchao is not installed: FP8 levers will be left out of tune", "pip install torchao")
    if state == "broken":
        return finding("fail", f"torchao does not import with torch {torch_version}: {ao_error}",
                       f"install the torchao release built for torch {torch_version.split('+')[0]}: "
                       "pip install --force-reinstall --no-deps torchao "
                       "(see the torch/torchao compatibility table in pytorch/ao's README)")
    ctx.use_gpu()
    try:
        err = scaled_mm_rel_err(torch, "cuda")
    except Exception as exc:
        details.append(f"torch._scaled_mm failed: {exc_line(exc)}")
        return finding("fail", f"torch._scaled_mm (FP8 GEMM) fails: {exc_line(exc)}",
                       f"reinstall a CUDA build of torch with FP8 support: pip install --force-reinstall "
                       f"torch=={torch_version.split('+')[0]} --index-url https://download.pytorch.org/whl/"
                       f"cu{str(torch.version.cuda or '12.8').replace('.', '')}")
    measured["scaled_mm_rel_err"] = float(f"{err:.3g}")
    details.append(f"torch._scaled_mm {M}x{M}x{M} e4m3 per-tensor scales vs bf16: relative error {err:.2e} "
                   f"(limit {REL_ERR_LIMIT})")
    if not err < REL_ERR_LIMIT:
        return finding("fail", f"torch._scaled_mm gives wrong numbers: relative error {err:.2e} > {REL_ERR_LIMIT}",
                       f"pip install --force-reinstall torch=={torch_version.split('+')[0]} (then rerun "
                       "`python -m probes._worker fp8`)")
    return finding("ok", f"FP8 ready: compute capability {cc[0]}.{cc[1]}, torchao {ao_version}, _scaled_mm OK; "
                         "use it compiled: eager FP8 leaves its activation quantization unfused")
