"""attention_truth: attention at the workload's real shape. TFLOP/s per backend, which kernel the default SDPA
really runs, and what attention is worth in a step.

Two layers: `measure(ctx)` times kernels on the GPU (CUDA events, warm-up 3, median of 15 calls) and profiles
one default SDPA call; `summarize(...)` is pure arithmetic on those numbers and builds the Finding (tests feed
it H100 figures like those in benchmarks/check/check_h100.json).
"""

from __future__ import annotations

import statistics
import warnings
from typing import Any, Callable, Mapping, Sequence

from probes import qwen_shapes as qs
from probes.backends import BACKENDS, BY_KERNEL
from probes.context import ProbeContext, cuda_torch, exc_line, mark
from probes.finding import Finding
from probes.timing import event_samples, keep_busy, l2_flush_buffer

WARMUP, REPS, ROUNDS = 3, 50, 5
# Seconds of back-to-back calls before timing: a card at its power limit boosts for a moment, then runs slower for
# the rest of a generation (an H100 at 700 W: 790 bf16 GEMM TFLOP/s in bursts, 718 sustained, in
# benchmarks/check/check_h100.json); the probe reports that steady rate.
SETTLE_S = 1.0
MATH_MAX_S = 4096  # the math backend materialises S x S scores per head: slow, and big beyond this
GAIN_THRESHOLD = 0.05  # warn when another backend saves more than 5% of attention time
REL_ERR_LIMIT = 2e-2  # bf16 output vs the default SDPA's
CALLS_PER_STEP = qs.PASSES_PER_STEP * qs.BLOCKS  # 120 attention calls per denoising step

# SDPA's kernels in the order classify_kernels prefers them (cuDNN's kernel names contain "flash" too).
SDPA_KERNELS = tuple(b.kernel for b in BACKENDS if b.sdpa_backend)


# --- kernel names --------------------------------------------------------------------------------------

def classify_kernel(name: str) -> str | None:
    """Which SDPA backend a CUDA kernel (or aten op) name belongs to: cudnn | flash | efficient | math | None.

    cuDNN's names contain "flash" too (`cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_...`), so
    "cudnn" wins; torch's FA2 is `pytorch_flash::flash_fwd_kernel<...>`; mem-efficient is CUTLASS
    `fmha_cutlassF_...` (`PyTorchMemEffAttention::AttentionKernel`)."""
    n = name.lower()
    if "cudnn" in n:
        return "cudnn"
    if "flash" in n:
        return "flash"
    if "fmha" in n or "efficient" in n or "mem_eff" in n or "memeff" in n:
        return "efficient"
    if "attention_math" in n or "softmax" in n:
        return "math"
    return None


def classify_kernels(kernel_names: Sequence[str], op_names: Sequence[str] = ()) -> tuple[str, str]:
    """(picks, the name that decided it) from one SDPA call's CUDA kernels; the aten op names
    (`aten::_scaled_dot_product_cudnn_attention`, ...) break the tie when no kernel name is recognised."""
    for names in (kernel_names, op_names):
        found = {}
        for name in names:
            kind = classify_kernel(name)
            if kind is not None:
                found.setdefault(kind, name)
        for kind in SDPA_KERNELS:
            if kind in found:
                return kind, found[kind]
    return "unknown", (kernel_names[0] if kernel_names else "")


# --- the pure part -------------------------------------------------------------------------------------

def summarize(shape: Mapping[str, int], ms: Mapping[str, float], failed: Mapping[str, str], picks: str,
              kernel: str, gemm_ms: float | None, errors: Mapping[str, float] | None = None) -> Finding:
    """The Finding from measured times. `ms`: backend -> median ms of one attention call at `shape`
    (B, H, S, D); `failed`: backend -> why it did not run; `gemm_ms`: one (S x 3072) @ (3072 x 12288) matmul."""
    errors = dict(errors or {})
    b, h, s, d = shape["B"], shape["H"], shape["S"], shape["D"]
    flops = qs.attention_flops_one_call(s, h, d) * b
    tflops = {k: round(flops / (v * 1e-3) / 1e12, 1) for k, v in ms.items()}
    details = [f"timed here: q/k/v B={b} H={h} S={s} D={d} bf16 (diffusers' layout: [B, S, H, D] storage, SDPA "
               f"sees the [B, H, S, D] view); {WARMUP} warm-up calls, then {SETTLE_S} s of load so clocks settle, "
               f"then median of {REPS} calls per backend in {ROUNDS} round-robin rounds, CUDA events, L2 flushed "
               "before each call"]
    for k in sorted(ms, key=ms.get):
        extra = f", max rel. error vs native {errors[k]:.1e}" if k in errors else ""
        if _lossy(k):
            extra += ", 8-bit (lossy: tune judges it against the quality floor, never this finding)"
        details.append(f"{k}: {ms[k]:.3f} ms, {tflops[k]:.0f} TFLOP/s here{extra}")
    details += [f"{k}: {why}" for k, why in failed.items()]
    measured: dict[str, Any] = {"shape": dict(shape), "tflops": tflops, "ms": {k: round(v, 4) for k, v in ms.items()},
                                "native_kernel": kernel, "native_picks": picks, "best": None,
                                "attention_ms_per_step": None, "linear_ms_per_step": None, "attention_share": None,
                                "gain_ms_per_step": None, "gemm_tflops": None, "failed": dict(failed),
                                "errors": errors}
    if "native" not in ms:
        return Finding(id="attention_truth", status="fail",
                       summary=f"default SDPA does not run at S={s}: {failed.get('native', 'no timing')}",
                       details=details, measured=measured,
                       fix="reinstall a torch build for this GPU and driver, then run "
                           "`python -m probes._worker attention_truth`")

    # The finding recommends lossless kernels only: an 8-bit one changes the image, which only a render can judge.
    correct = {k: v for k, v in ms.items()
               if k == "native" or (not _lossy(k) and errors.get(k, 0.0) <= REL_ERR_LIMIT)}
    best = min(correct, key=correct.get)
    if correct[best] >= ms["native"]:
        best = "native"
    t_native, t_best = ms["native"], ms[best]
    attn_step = CALLS_PER_STEP * t_native
    linear_step = None
    if gemm_ms:
        gemm_rate = 2.0 * s * qs.HIDDEN * qs.MLP / (gemm_ms * 1e-3)
        linear_step = qs.PASSES_PER_STEP * qs.linear_flops_per_pass(s) / gemm_rate * 1e3
        measured["gemm_tflops"] = round(gemm_rate / 1e12, 1)
    est_step = attn_step + (linear_step or 0.0)
    gain = CALLS_PER_STEP * (t_native - t_best)
    saving = (t_native - t_best) / t_native
    measured.update(best=best, attention_ms_per_step=round(attn_step, 1),
                    linear_ms_per_step=round(linear_step, 1) if linear_step else None,
                    attention_share=round(attn_step / est_step, 3) if linear_step else None,
                    gain_ms_per_step=round(gain, 1))
    details.append(f"native SDPA runs {picks}: {kernel or '(no kernel name recorded)'}")
    if linear_step:
        details.append(
            f"step model from the timings here (2 passes x {qs.BLOCKS} blocks): attention {attn_step:.0f} ms + "
            f"linear {linear_step:.0f} ms (GEMM {measured['gemm_tflops']:.0f} TFLOP/s at {s}x{qs.HIDDEN} @ "
            f"{qs.HIDDEN}x{qs.MLP}) = {est_step:.0f} ms; attention is {attn_step / est_step:.0%} of it. Elementwise "
            "ops (norms, RoPE, modulation, activations) are not counted, so a real eager step is longer")
    else:
        details.append(f"attention here: {attn_step:.0f} ms per step (2 passes x {qs.BLOCKS} blocks); "
                       f"no GEMM timing, so no share")

    head = (f"S={s}, timed here: native SDPA ({picks}) {tflops['native']:.0f} TFLOP/s, "
            f"{attn_step:.0f} ms/step" + (f" = {attn_step / est_step:.0%} of matmul+attention" if linear_step else ""))
    if best == "native" or saving <= GAIN_THRESHOLD:
        runner_up = min((k for k in correct if k != "native"), key=correct.get, default=None)
        tail = (f"; best other: {runner_up} {tflops[runner_up]:.0f} TFLOP/s" if runner_up else "")
        return Finding(id="attention_truth", status="ok", summary=f"{head}: already within 5% of the fastest{tail}",
                       details=details, measured=measured)
    pct_step = f", {gain / est_step:.0%} of the estimated step" if est_step else ""
    backend = BY_KERNEL.get(best)
    if backend is not None:
        fix = (f"`qwendoctor tune` searches it, or set it yourself: "
               f'pipe.transformer.set_attention_backend("{backend.name}")  # {backend.description}')
    else:
        fix = f"use {best}"
    return Finding(id="attention_truth", status="warn",
                   summary=f"{head}; {best} runs {tflops[best]:.0f} TFLOP/s: saves {gain:.0f} ms/step{pct_step}",
                   details=details, fix=fix, measured=measured)


def _lossy(kernel: str) -> bool:
    return kernel in BY_KERNEL and BY_KERNEL[kernel].lossy


# --- the measuring part --------------------------------------------------------------------------------

def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _candidates(ctx: ProbeContext, torch, q, k, v, s: int) -> tuple[dict[str, Callable], dict[str, str]]:
    """backend -> a zero-argument call; plus backends that cannot even be set up, with why."""
    F = torch.nn.functional
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, S, D] views, as diffusers' native backend
    calls: dict[str, Callable] = {"native": lambda: F.scaled_dot_product_attention(qt, kt, vt)}
    skipped: dict[str, str] = {}
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except Exception as exc:
        skipped["cudnn"] = skipped["flash"] = skipped["efficient"] = f"no torch.nn.attention: {exc_line(exc)}"
    else:
        def restricted(backend):
            def call():
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(qt, kt, vt)
            return call

        for name, attr in ((b.kernel, b.sdpa_backend) for b in BACKENDS if b.sdpa_backend):
            if name == "math" and s > MATH_MAX_S:
                skipped[name] = f"not timed: S={s} > {MATH_MAX_S} (it materialises the scores)"
            elif hasattr(SDPBackend, attr):
                calls[name] = restricted(getattr(SDPBackend, attr))
            else:
                skipped[name] = f"SDPBackend.{attr} missing in torch {torch.__version__}"
    if not ctx.bench:
        # flex_attention only runs compiled, and compiling it costs more than the quick tier's whole budget.
        skipped["flex"] = ("not timed in the quick tier (flex_attention runs only compiled, a compile the quick tier "
                           "does not pay for): run `qwendoctor check --bench`")
    else:
        try:
            flex = ctx.import_module("torch.nn.attention.flex_attention").flex_attention
            compiled = torch.compile(flex, dynamic=False)
            calls["flex"] = lambda: compiled(qt, kt, vt)
        except Exception as exc:
            skipped["flex"] = f"not available: {exc_line(exc)}"
    for backend in (b for b in BACKENDS if b.module):
        try:
            fn = getattr(ctx.import_module(backend.module), backend.function)
        except Exception as exc:  # ImportError, or an ABI error (OSError, undefined symbol)
            skipped[backend.kernel] = f"not importable ({backend.module}): {exc_line(exc)}"
            continue
        kwargs = dict(backend.kwargs)
        # [B, S, H, D] in and out
        calls[backend.kernel] = (lambda fn=fn, kwargs=kwargs: _first(fn(q, k, v, **kwargs)).transpose(1, 2))
    return calls, skipped


def _profile_native(torch, call) -> tuple[list[str], list[str]]:
    """CUDA kernel names and aten op names of one default SDPA call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    kernels, ops = [], []
    for event in prof.events():
        device = str(getattr(event, "device_type", "")).upper()
        (kernels if "CUDA" in device else ops).append(event.name)
    return kernels, [o for o in ops if o.startswith("aten::")]


def measure(ctx: ProbeContext, torch) -> dict[str, Any]:
    s = qs.seq_len(ctx.workload.width, ctx.workload.height, ctx.text_tokens)
    shape = {"B": 1, "H": qs.HEADS, "S": s, "D": qs.HEAD_DIM}
    torch.manual_seed(0)
    dev, bf16 = "cuda", torch.bfloat16
    q, k, v = (torch.randn(1, s, qs.HEADS, qs.HEAD_DIM, device=dev, dtype=bf16) for _ in range(3))
    calls, failed = _candidates(ctx, torch, q, k, v, s)
    mark("attention_truth.candidates", backends=sorted(calls))
    ms, errors = {}, {}
    ref = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SDPA warns at length about why a restricted backend cannot run
        working = {}
        for name, call in calls.items():
            try:
                out = call()
                torch.cuda.synchronize()
                if name == "native":
                    ref = out.float()
                elif ref is not None:
                    errors[name] = float(f"{float((out.float() - ref).abs().max() / ref.abs().max()):.3g}")
                for _ in range(WARMUP):
                    call()
                torch.cuda.synchronize()
                working[name] = call
            except Exception as exc:
                failed[name] = f"does not run: {exc_line(exc)}"
                try:
                    torch.cuda.synchronize()
                except Exception:
                    pass
        mark("attention_truth.first_calls")
        gemm = None
        try:
            x = torch.randn(s, qs.HIDDEN, device=dev, dtype=bf16)
            w = torch.randn(qs.HIDDEN, qs.MLP, device=dev, dtype=bf16)
            gemm = lambda: x @ w  # noqa: E731
            gemm()
        except Exception as exc:
            failed["gemm"] = f"bf16 GEMM did not run: {exc_line(exc)}"
        # Rounds over all backends, after one settling load: the card's clock drifts as it heats under its
        # power limit, and round-robin spreads that drift over every backend instead of the last ones timed.
        timed = {**working, **({"gemm": gemm} if gemm is not None else {})}
        samples = {name: [] for name in timed}
        if timed:
            keep_busy(torch, next(iter(timed.values())), SETTLE_S)
            mark("attention_truth.settled")
            flush = l2_flush_buffer(torch)
            for _ in range(ROUNDS):
                for name, call in timed.items():
                    samples[name] += event_samples(torch, call, REPS // ROUNDS, flush)
            mark("attention_truth.timed")
        ms = {name: statistics.median(values) for name, values in samples.items() if name != "gemm"}
        gemm_ms = statistics.median(samples["gemm"]) if "gemm" in samples else None
        kernels, ops, picks, kernel = [], [], "unknown", ""
        if "native" in calls:
            try:
                kernels, ops = _profile_native(torch, calls["native"])
                picks, kernel = classify_kernels(kernels, ops)
                mark("attention_truth.profiled")
            except Exception as exc:
                kernel = f"profiler failed: {exc_line(exc)}"
    return {"shape": shape, "ms": ms, "failed": failed, "picks": picks, "kernel": kernel, "gemm_ms": gemm_ms,
            "errors": errors}


def probe(ctx: ProbeContext) -> Finding:
    torch, skipped = cuda_torch(ctx, "attention_truth", "no CUDA device: attention kernels are timed on the GPU only")
    if skipped is not None:
        return skipped
    m = measure(ctx, torch)
    finding = summarize(m["shape"], m["ms"], m["failed"], m["picks"], m["kernel"], m["gemm_ms"], m["errors"])
    finding.details.insert(0, f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
                              f"cuDNN {torch.backends.cudnn.version()}")
    return finding
