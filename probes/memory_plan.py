"""memory_plan: where Qwen-Image's components go so that the pipeline fits the GPU (or `--memory-limit`).

A placement is a set of qwendoctor's memory levers (text encoder placement, VAE decode, transformer weight
storage, offloading). Each placement's peak is estimated phase by phase: prompt encoding, denoising and VAE decode
hold different components on the GPU, and the peak is the largest phase. Weights come from the parameter counts
(probes/qwen_shapes); the three activation terms were fitted on peaks measured on an H200 with the full-size
pipeline (`synthetic`: 20.4B transformer, 8.3B Qwen2.5-VL text encoder, VAE; random bf16 weights; prompt through the
text encoder; true CFG), benchmarks/h200/memory/. Every placement offered here was measured there at 1024x1024 and
1328x1328, and the estimate is within 10% of each of those peaks (tests/test_memory_plan.py reads them).

The plan is the first placement in PLACEMENTS that fits: they are ordered by the speed measured there, fastest
first. Pure Python: no torch, so `check` answers without importing it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

from probes import qwen_shapes as qs
from probes.context import ProbeContext, exc_line
from probes.finding import Finding
from probes.workload import Workload

GIB = qs.GIB
# A plan fits when its estimate is at most this share of the memory, less CONTEXT_GIB: the caching allocator holds
# more than the tensors it hands out, and on a whole card the CUDA context takes its part too.
HEADROOM = 0.05
CONTEXT_GIB = 0.5

TRANSFORMER_GIB = qs.transformer_bytes() / GIB
TRANSFORMER_FP8_GIB = qs.transformer_bytes(fp8=True) / GIB  # blocks' linear weights in FP8, the rest bf16
TEXT_ENCODER_GIB = qs.weight_bytes(qs.TEXT_ENCODER_PARAMS) / GIB
VAE_GIB = qs.weight_bytes(qs.VAE_PARAMS) / GIB
OUTSIDE_BLOCKS_GIB = qs.weight_bytes(qs.TRANSFORMER_PARAMS - qs.BLOCK_LINEAR_PARAMS) / GIB
BLOCK_GIB = (TRANSFORMER_GIB - OUTSIDE_BLOCKS_GIB) / qs.QWEN_IMAGE_TRANSFORMER["num_layers"]

# Fitted on the H200 peaks in benchmarks/h200/memory (their JSON holds every figure):
# - denoising: per image token, what the transformer's activations add over its weights (fp8-storage and
#   text-encoder-on-CPU rows with tiled decode: +0.36 GiB at 4096 tokens, +0.61 GiB at 6889);
ACTIVATION_GIB_PER_TOKEN = 8.9e-5
# - a full VAE decode, per 2^20 output pixels (text encoder on the CPU: +4.14 GiB at 1024x1024, +6.96 at 1328x1328;
#   resident: +4.17, +6.99);
DECODE_GIB_PER_MEGAPIXEL = 4.14
# - a tiled decode: bounded by its 256 px tiles, whatever the image size;
TILED_DECODE_GIB = 0.3
# - prompt encoding, over the text encoder's weights (a prompt and the negative, some 60 tokens each);
ENCODE_GIB = 0.15
# - group offloading: the group computing, the one arriving on the copy stream, and staging; 2.2 groups' weights
#   fit the two peaks measured with one block per group (2.02 and 2.26 GiB).
GROUPS_IN_FLIGHT = 2.2
# - sequential offload: the largest module it streams in (the text encoder's 1 GiB embedding) and its activations.
SEQUENTIAL_GIB = 1.2


@dataclasses.dataclass(frozen=True)
class Placement:
    name: str
    profile: Mapping[str, Any]  # the memory levers' Profile fields (qwendoctor.levers)
    text: str

    def describe(self) -> str:
        return self.text


# Fastest first, by the s/image measured on an H200 at 1024x1024 / 1328x1328, 50 steps (extrapolated from 3-step
# images), default speed levers: resident 17.7 / 30.9 and text encoder on the CPU 18.5 / 32.0 (16 host cores
# encoded the prompt and the negative in about 1 s; benchmarks/h200/memory/calibration.json); tiled decode adds
# about 0.7 s; FP8 weight storage 31.7 / 39.7 (its per-layer cast made a step 55-72% slower at 1024); group
# offloading 82.2 / 83.5 (each step copies the 38 GiB of bf16 blocks twice over PCIe 5.0 at 55 GB/s) (the last
# three: benchmarks/h200/memory/limits-1.json). Left out as dominated there: text encoder group offloading (the
# same peak as resident and about 30 s more per image: calibration.json), model CPU offload (a peak as high as the
# text encoder on the CPU, 59.6 / 77.1 s), and sequential offload (708 s at 1024, and more memory than group
# offloading).
PLACEMENTS = (
    Placement("resident", {}, "everything resident"),
    Placement("text_encoder_cpu", {"text_encoder": "cpu"}, "text encoder on the CPU"),
    Placement("text_encoder_cpu_tiled", {"text_encoder": "cpu", "vae_decode": "tiled"},
              "text encoder on the CPU, tiled VAE decode"),
    Placement("fp8_storage", {"weight_storage": "fp8_storage", "text_encoder": "cpu", "vae_decode": "tiled"},
              "FP8 transformer weights (bf16 compute), text encoder on the CPU, tiled VAE decode"),
    Placement("group_offload", {"offload": "group", "text_encoder": "cpu", "vae_decode": "tiled"},
              "transformer blocks streamed from host memory (group offloading, 1 block per group), text encoder on "
              "the CPU, tiled VAE decode"),
)
# Estimated for the benchmarks' comparisons (what users do by hand), never chosen.
BY_HAND = (
    Placement("model_offload", {"offload": "model"}, "pipe.enable_model_cpu_offload()"),
    Placement("sequential_offload", {"offload": "sequential"}, "pipe.enable_sequential_cpu_offload()"),
    Placement("text_encoder_offload", {"text_encoder": "offload"}, "text encoder group-offloaded"),
)
MEASURED_FILE = Path(__file__).with_name("memory_measured.json")
MEASURED_LABEL = "probes/memory_measured.json"


def phases(placement: Placement, width: int, height: int, input_tokens: int = 0) -> dict[str, float]:
    """GiB on the GPU while encoding the prompt, denoising and decoding. `input_tokens`: the image tokens an edit's
    inputs add to each pass (Workload.input_image_tokens), whose activations grow as the output's do. The edit's
    other costs stay under the decode phase's peak where it was measured: at 1024x1024 an edit (4096 input tokens,
    ~1,380 prompt tokens with the vision tower's) peaked at 58.0 GiB resident, as text-to-image did, on an H100
    (benchmarks/h100/edit)."""
    fields = placement.profile
    offload = fields.get("offload", "none")
    text_encoder = fields.get("text_encoder", "resident")
    activations = ACTIVATION_GIB_PER_TOKEN * (qs.image_tokens(width, height) + input_tokens)
    decode = TILED_DECODE_GIB if fields.get("vae_decode") == "tiled" else (
        DECODE_GIB_PER_MEGAPIXEL * width * height / 2**20)
    if offload == "sequential":
        return {"encode": SEQUENTIAL_GIB, "denoise": SEQUENTIAL_GIB + activations, "decode": VAE_GIB + decode}
    if offload == "model":  # one component on the GPU at a time
        return {"encode": TEXT_ENCODER_GIB + ENCODE_GIB, "denoise": TRANSFORMER_GIB + activations,
                "decode": VAE_GIB + decode}
    if offload == "group":
        transformer = OUTSIDE_BLOCKS_GIB + GROUPS_IN_FLIGHT * BLOCK_GIB * fields.get("offload_blocks_per_group", 1)
    elif fields.get("weight_storage") == "fp8_storage":
        transformer = TRANSFORMER_FP8_GIB
    else:
        transformer = TRANSFORMER_GIB
    resident_encoder = TEXT_ENCODER_GIB if text_encoder == "resident" else 0.0
    encoding_encoder = TEXT_ENCODER_GIB if text_encoder in ("resident", "offload") else 0.0
    outside = OUTSIDE_BLOCKS_GIB if offload == "group" else transformer
    return {"encode": outside + encoding_encoder + VAE_GIB + ENCODE_GIB,
            "denoise": transformer + resident_encoder + VAE_GIB + activations,
            "decode": outside + resident_encoder + VAE_GIB + decode}


def estimate_gib(placement: Placement, width: int, height: int, input_tokens: int = 0) -> float:
    return max(phases(placement, width, height, input_tokens).values())


def need_gib(placement: Placement, workload: Workload) -> float:
    """The placement's estimate for this workload: its output size and, for an edit, its inputs' tokens."""
    return estimate_gib(placement, workload.width, workload.height, workload.input_image_tokens)


def usable_gib(memory_gib: float) -> float:
    return memory_gib * (1 - HEADROOM) - CONTEXT_GIB


def measured_peaks() -> dict[str, Any]:
    """The peaks the estimate was fitted on: {"card", "source", "peaks": {placement: {"1024x1024": GiB}}}."""
    return json.loads(MEASURED_FILE.read_text())


def measured_peak(name: str, width: int, height: int) -> float | None:
    return measured_peaks()["peaks"].get(name, {}).get(f"{width}x{height}")


def workload_peak(name: str, workload: Workload) -> float | None:
    """The measured peak of this placement at this size, where it was measured for this task: the peaks were
    text-to-image's."""
    return measured_peak(name, workload.width, workload.height) if workload.task == "generate" else None


def rows(workload: Workload, memory_gib: float | None) -> list[dict[str, Any]]:
    """Each placement's estimate (and measured peak, where measured at this size), and whether it fits."""
    usable = None if memory_gib is None else usable_gib(memory_gib)
    result = []
    for placement in PLACEMENTS:
        need = need_gib(placement, workload)
        row = {"name": placement.name, "need_gib": round(need, 1), "profile": dict(placement.profile)}
        peak = workload_peak(placement.name, workload)
        if peak is not None:
            row["measured_gib"] = peak
        if usable is not None:
            row["fits"] = need <= usable
        result.append(row)
    return result


def choose(workload: Workload, memory_gib: float) -> Placement | None:
    """The fastest placement that fits `memory_gib`, None when none does."""
    usable = usable_gib(memory_gib)
    return next((p for p in PLACEMENTS if need_gib(p, workload) <= usable), None)


def smallest(workload: Workload) -> tuple[Placement, float]:
    return min(((p, need_gib(p, workload)) for p in PLACEMENTS), key=lambda pair: pair[1])


def applies_to(model: str) -> bool:
    """The plan's figures are Qwen-Image's: `synthetic` and real checkpoints, not the toy `tiny`."""
    return model != "tiny"


def shown(placement: Placement, workload: Workload) -> str:
    """`name: estimate` plus the measured peak where there is one."""
    need = need_gib(placement, workload)
    peak = workload_peak(placement.name, workload)
    figures = f"about {need:.1f} GiB"
    if peak is not None:
        figures += f" (measured {peak:.1f} GiB on {measured_peaks()['card']}, {measured_peaks()['source']})"
    return f"{placement.text}: {figures}"


def summarize(gpu_name: str, total_gib: float, used_gib: float | None, workload: Workload) -> Finding:
    card_gib = total_gib
    if workload.memory_limit_gib is not None:  # --memory-limit: plan for that much of the card
        total_gib = min(total_gib, workload.memory_limit_gib)
    usable = usable_gib(total_gib)
    chosen = choose(workload, total_gib)
    table = rows(workload, total_gib)
    measured = {"gpu_memory_gib": round(card_gib, 1), "plans": table, "chosen": chosen.name if chosen else None,
                **({"memory_limit_gib": workload.memory_limit_gib} if workload.memory_limit_gib is not None else {})}
    size = f"{workload.width}x{workload.height}"
    capped = f" of the card's {card_gib:.1f} (--memory-limit)" if total_gib < card_gib else ""
    details = [f"{gpu_name}: {total_gib:.1f} GiB{capped}; a placement fits when its estimate is at most "
               f"{usable:.1f} GiB ({HEADROOM:.0%} headroom, {CONTEXT_GIB} GiB for the CUDA context)"]
    by_name = {p.name: p for p in PLACEMENTS}
    details += [f"{shown(by_name[r['name']], workload)} -> {'fits' if r['fits'] else 'does not fit'}" for r in table]
    details.append(
        f"weights: transformer {TRANSFORMER_GIB:.1f} GiB bf16 / {TRANSFORMER_FP8_GIB:.1f} GiB FP8, text encoder "
        f"{TEXT_ENCODER_GIB:.1f} GiB, VAE {VAE_GIB:.2f} GiB; placements fastest first (s/image measured on "
        f"{measured_peaks()['card']}, {measured_peaks()['source']})")
    if used_gib is not None and used_gib > 1.0:
        details.append(f"{used_gib:.1f} GiB are in use right now by other processes (not subtracted)")
    if chosen is not None and chosen.name == "resident":
        return Finding(id="memory_plan", status="ok", details=details, measured=measured,
                       summary=f"{size} fits with everything resident: about "
                               f"{need_gib(chosen, workload):.0f} of {total_gib:.0f} GiB")
    if chosen is not None:
        limit = workload.memory_limit_gib
        command = f" --memory-limit {limit:g}" if limit is not None and limit < card_gib else " (on this GPU)"
        return Finding(id="memory_plan", status="warn", details=details, measured=measured,
                       summary=f"{size}: everything resident needs about "
                               f"{need_gib(PLACEMENTS[0], workload):.0f} GiB > "
                               f"{usable:.0f} GiB usable; {chosen.text} fits (about "
                               f"{need_gib(chosen, workload):.0f} GiB)",
                       fix=f"qwendoctor tune{command} places it so (profile: "
                           + ", ".join(f"{k}={v}" for k, v in chosen.profile.items()) + ")")
    placement, need = smallest(workload)
    return Finding(id="memory_plan", status="fail", details=details, measured=measured,
                   summary=f"{size} does not fit in {total_gib:.0f} GiB: the smallest placement, {placement.text}, "
                           f"needs about {need:.1f} GiB",
                   fix="use a GPU with more memory, free what other processes hold, or raise --memory-limit")


def refusal(workload: Workload, memory_gib: float, why: str) -> str | None:
    """The one-line reason no placement fits (None when one does): what `tune` and `generate` say before any
    weights load. `why` names where the memory figure comes from ("--memory-limit 3", "this GPU's 11.6 GiB")."""
    if not applies_to(workload.model) or choose(workload, memory_gib) is not None:
        return None
    placement, need = smallest(workload)
    return (f"{why}: no memory placement of {workload.model} fits at {workload.width}x{workload.height} "
            f"({usable_gib(memory_gib):.1f} GiB usable); the smallest, {placement.text}, needs about {need:.1f} GiB")


def visible_nvml_index(env: Mapping[str, str]) -> int:
    """NVML index of torch's cuda:0: the first entry of CUDA_VISIBLE_DEVICES when it is a number, else 0
    (NVML ignores CUDA_VISIBLE_DEVICES)."""
    first = (env.get("CUDA_VISIBLE_DEVICES") or "").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


def probe(ctx: ProbeContext) -> Finding:
    wl = ctx.workload
    try:
        nvml = ctx.nvml()
    except Exception as exc:
        needs = ", ".join(f"{r['name']} {r['need_gib']:.0f} GiB" for r in rows(wl, None))
        return Finding(id="memory_plan", status="skip", summary="no NVIDIA GPU (NVML not available)",
                       details=[exc_line(exc), f"needs at {wl.width}x{wl.height}: {needs}"],
                       measured={"gpu_memory_gib": None, "plans": rows(wl, None), "chosen": None})
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
