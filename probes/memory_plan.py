"""memory_plan: will transformer + text encoder + VAE + activations fit on the GPU at the workload?

Weights from qwen_shapes (bf16: 2 B/param; FP8: 1 B/param for the blocks' linear weights); activations from
qwen_shapes.activation_gib, calibrated on two peaks in probes/measured.toml (quoted with their card and where
they come from). Plans are tried in order, the first that fits with >= 5% headroom of the GPU's total memory wins:
  a. everything resident in bf16
  b. text encoder off the GPU while the transformer runs (pipe.enable_model_cpu_offload(), or
     pipe.text_encoder.to("cpu") after encode_prompt)
  c. FP8 transformer weights (torchao) + b
"""

from __future__ import annotations

from typing import Any, Mapping

from probes import qwen_shapes as qs
from probes.context import ProbeContext, exc_line
from probes.finding import Finding
from probes.workload import Workload

GIB = qs.GIB
HEADROOM = 0.05

PLAN_TEXT = {
    "bf16_resident": "everything resident in bf16",
    "bf16_text_encoder_offload": "bf16, text encoder offloaded to the CPU after encoding",
    "fp8_text_encoder_offload": "FP8 transformer weights, text encoder offloaded to the CPU after encoding",
}
PLAN_FIX = {
    "bf16_text_encoder_offload": "pipe.enable_model_cpu_offload()  (or pipe.text_encoder.to('cpu') after "
                                 "pipe.encode_prompt(...)): keeps the text encoder's ~15 GiB off the GPU while "
                                 "the transformer runs",
    "fp8_text_encoder_offload": "quantize the transformer blocks to FP8 (torchao Float8DynamicActivationFloat8Weight"
                                "Config; `qwendoctor tune` searches it) and pipe.enable_model_cpu_offload()",
}


def plans(workload: Workload) -> list[dict[str, Any]]:
    """Each plan's GPU memory need (GiB) at the workload, in the order they are preferred."""
    act = qs.activation_gib(workload.width, workload.height)
    vae = qs.weight_bytes(qs.VAE_PARAMS) / GIB
    te = qs.weight_bytes(qs.TEXT_ENCODER_PARAMS) / GIB
    bf16, fp8 = qs.transformer_bytes() / GIB, qs.transformer_bytes(fp8=True) / GIB
    # With the text encoder offloaded the peak is the denoise/decode phase, or the encode phase when that is
    # bigger (enable_model_cpu_offload: the text encoder alone, plus ~1 GiB for 128-token activations).
    return [
        {"name": "bf16_resident", "need_gib": round(bf16 + te + vae + act, 1)},
        {"name": "bf16_text_encoder_offload", "need_gib": round(max(bf16 + vae + act, te + 1.0), 1)},
        {"name": "fp8_text_encoder_offload", "need_gib": round(max(fp8 + vae + act, te + 1.0), 1)},
    ]


def calibration_note() -> str:
    """Where the activation estimate's two calibration peaks come from, with their card."""
    fig = qs.memory_calibration()
    (low_size, high_size), (low_gib, high_gib) = fig.data["sizes"], fig.values
    return (f"calibrated on default-pipeline peaks without the text encoder, quoted for {fig.gpu}: {low_gib:g} GiB "
            f"at {low_size}, {high_gib:g} GiB at {high_size} ({fig.cite})")


def visible_nvml_index(env: Mapping[str, str]) -> int:
    """NVML index of torch's cuda:0: the first entry of CUDA_VISIBLE_DEVICES when it is a number, else 0
    (NVML ignores CUDA_VISIBLE_DEVICES)."""
    first = (env.get("CUDA_VISIBLE_DEVICES") or "").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


def summarize(gpu_name: str, total_gib: float, used_gib: float | None, workload: Workload) -> Finding:
    card_gib = total_gib
    if workload.memory_limit_gib is not None:  # --memory-limit: plan for that much of the card
        total_gib = min(total_gib, workload.memory_limit_gib)
    limit = total_gib * (1 - HEADROOM)
    rows = plans(workload)
    for row in rows:
        row["fits"] = row["need_gib"] <= limit
    chosen = next((r["name"] for r in rows if r["fits"]), None)
    measured = {"gpu_memory_gib": round(card_gib, 1), "plans": rows, "chosen": chosen,
                **({"memory_limit_gib": workload.memory_limit_gib} if workload.memory_limit_gib is not None else {})}
    size = f"{workload.width}x{workload.height}"
    capped = f" of the card's {card_gib:.1f} (--memory-limit)" if total_gib < card_gib else ""
    details = [f"{gpu_name}: {total_gib:.1f} GiB{capped}; a plan fits when it needs <= {limit:.1f} GiB "
               f"({HEADROOM:.0%} headroom)"]
    details += [f"{PLAN_TEXT[r['name']]}: {r['need_gib']:.1f} GiB -> {'fits' if r['fits'] else 'does not fit'}"
                for r in rows]
    details.append(
        f"weights: transformer {qs.transformer_bytes() / GIB:.1f} GiB bf16 / {qs.transformer_bytes(True) / GIB:.1f} "
        f"GiB FP8, text encoder {qs.weight_bytes(qs.TEXT_ENCODER_PARAMS) / GIB:.1f} GiB, VAE "
        f"{qs.weight_bytes(qs.VAE_PARAMS) / GIB:.2f} GiB; activations + overhead at {size}: "
        f"{qs.activation_gib(workload.width, workload.height):.1f} GiB ({calibration_note()})")
    if used_gib is not None and used_gib > 1.0:
        details.append(f"{used_gib:.1f} GiB are in use right now by other processes (not subtracted)")
    if chosen == "bf16_resident":
        return Finding(id="memory_plan", status="ok", details=details, measured=measured,
                       summary=f"{size} fits in bf16 with everything resident: "
                               f"{rows[0]['need_gib']:.0f} of {total_gib:.0f} GiB")
    if chosen is not None:
        need = next(r["need_gib"] for r in rows if r["name"] == chosen)
        return Finding(id="memory_plan", status="warn", details=details, measured=measured,
                       summary=f"{size}: all-resident bf16 needs {rows[0]['need_gib']:.0f} GiB > {limit:.0f} GiB "
                               f"usable; {PLAN_TEXT[chosen]} fits ({need:.0f} GiB)",
                       fix=PLAN_FIX[chosen])
    return Finding(id="memory_plan", status="fail", details=details, measured=measured,
                   summary=f"{size} does not fit in {total_gib:.0f} GiB: even FP8 + text encoder offload needs "
                           f"{rows[-1]['need_gib']:.0f} GiB",
                   fix="use a GPU with more memory (by this estimate 80 GB fits bf16 at 1328x1328 with the text "
                       "encoder offloaded), split the "
                       "transformer over several GPUs, or a smaller --width/--height; "
                       "pipe.enable_sequential_cpu_offload() fits but is many times slower")


def probe(ctx: ProbeContext) -> Finding:
    wl = ctx.workload
    try:
        nvml = ctx.nvml()
    except Exception as exc:
        needs = ", ".join(f"{r['name']} {r['need_gib']:.0f} GiB" for r in plans(wl))
        return Finding(id="memory_plan", status="skip", summary="no NVIDIA GPU (NVML not available)",
                       details=[exc_line(exc), f"needs at {wl.width}x{wl.height}: {needs}"],
                       measured={"gpu_memory_gib": None, "plans": plans(wl), "chosen": None})
    try:
        count = int(nvml.nvmlDeviceGetCount())
        if count == 0:
            return Finding(id="memory_plan", status="skip", summary="NVML reports no GPU")
        index = visible_nvml_index(ctx.env)
        handle = nvml.nvmlDeviceGetHandleByIndex(index if index < count else 0)
        name = nvml.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else str(name)
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
        total, used = info.total / GIB, getattr(info, "used", None)
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass
    finding = summarize(name, total, used / GIB if used is not None else None, wl)
    if count > 1:
        finding.details.append(f"{count} GPUs: the plan is for one (NVML index {index}); a multi-GPU split "
                               "(context parallel) divides activations, not weights")
    return finding
