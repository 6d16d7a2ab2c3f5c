"""qwendoctor bench: one workload measured on this GPU, the default first, then the ablation ladder.

The ladder (flux-fast's experiments): each lever alone against the default, then a cumulative stack that adds
one lever at a time and keeps it only where it made the step faster, then any profile or lock given. Every
row rebuilds the model (so no lever leaks into the next row), warms up (compilation lands in `warmup_s`, not
in the step time), renders the same prompt and seed, and is compared with the default's image. Results go to
JSON after every row, so a crash or Ctrl-C keeps what was measured.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import re
import time
from typing import Any, Callable

from probes import qwen_shapes, timing
from qwendoctor import files, fingerprint, levers, memory, models, quality, runner
from qwendoctor.capabilities import Capabilities
from qwendoctor.errors import QwendoctorError, UnavailableLever, UsageError
from qwendoctor.profile import Profile, Workload, check_runnable

# Fidelity floors of the two tiers, against the default's image on the same seed.
LOSSLESS_PSNR_DB = 40.0
FP8_PSNR_DB = 30.0


@dataclasses.dataclass(frozen=True)
class Rung:
    id: str
    group: str  # default | alone | stack | given
    label: str
    profile: Profile


@dataclasses.dataclass
class BenchOptions:
    workload: Workload
    timed_steps: int = 8  # denoising steps rendered (and timed) per row
    full_image: bool = False  # render the workload's full step count per row instead of timed_steps
    prompt: str = "a red fox in the snow"
    seed: int = 0
    ladder: bool = True
    rows: tuple[str, ...] = ()  # only these rung ids (default always runs)
    given: tuple[tuple[str, Profile], ...] = ()
    breakdown: bool = True  # a profiler breakdown of one step for the default and the best rows (CUDA)
    out_dir: str = "benchmarks"
    name: str | None = None
    resume: bool = False  # keep the rows of an earlier, interrupted run of the same bench on this setup

    def validate(self) -> "BenchOptions":
        self.workload.validate()
        if self.timed_steps < 3:
            raise UsageError(f"--timed-steps must be at least 3 (2 warm up the row), got {self.timed_steps}")
        return self

    @property
    def render_steps(self) -> int:
        return self.workload.reference_steps if self.full_image else self.timed_steps

    @property
    def stem(self) -> str:
        w = self.workload
        return self.name or f"bench-{w.model.replace('/', '_')}-{w.width}x{w.height}"


def alone_rungs(capabilities: Capabilities, workload: Workload) -> list[Rung]:
    """Each lever by itself, where this machine can run it (the lever table's `bench_alone` rows)."""
    return [Rung(row.id, "alone", row.label, row.profile)
            for lever in levers.LEVERS for row in lever.bench_alone(capabilities, workload)]


# The cumulative stack, in the ladder's order (levers.LadderStep.order).
STACK = tuple(sorted((step for lever in levers.LEVERS for step in lever.ladder), key=lambda step: step.order))


def text_tokens(model: models.LoadedModel, prompt: str) -> int:
    if not model.has_text_encoder:
        return model.synthetic_text_tokens
    import torch

    with torch.inference_mode():
        embeds, _ = model.pipe.encode_prompt(prompt=prompt, device=model.device)
    return int(embeds.shape[1])


def gemm_ceiling(device: str) -> dict[str, float | None]:
    """bf16 (and FP8) GEMM TFLOP/s measured now, on this card, at a size that reaches its ceiling."""
    if device != "cuda":
        return {"bf16_tflops": None, "fp8_tflops": None}
    import torch

    from probes.timing import time_ms

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    flops = 2.0 * n**3
    result: dict[str, float | None] = {"bf16_tflops": flops / time_ms(torch, lambda: a @ b, 50, 30) / 1e9,
                                       "fp8_tflops": None}
    if torch.cuda.get_device_capability() >= (8, 9):
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()
        one = torch.tensor(1.0, device="cuda")
        result["fp8_tflops"] = flops / time_ms(
            torch, lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16), 50, 30) / 1e9
    return result


# ---- one step, by kernel kind ---------------------------------------------------------------------------

KINDS = ("gemm", "attention", "elementwise", "memory", "other")
# Enough for every distinct kernel of a compiled step (about 15 per block, plus the eager ones around the blocks):
# which elementwise kernels a lever left, by name, is what the next lever is chosen on.
TOP_KERNELS = 40


def kernel_kind(name: str) -> str:
    """The kind of a CUDA kernel or a CPU aten op, from its name (attention before GEMM: FA kernels are
    CUTLASS kernels too)."""
    lowered = name.lower()
    if lowered.startswith("triton_"):
        # Inductor names its kernels after the ops they fuse, so a layout copy feeding attention is
        # "triton_poi_fused_..._attention_...": only its templates are matmul or attention.
        if lowered.startswith("triton_tem"):
            return "attention" if "flex" in lowered or "attention" in lowered else "gemm"
        return "elementwise"
    if any(key in lowered for key in ("flash", "fmha", "attention", "sdpa", "attn")):
        return "attention"
    if any(key in lowered for key in ("gemm", "xmma", "cutlass", "nvjet", "matmul", "cublas", "scaled_mm",
                                      "triton_tem", "aten::mm", "aten::addmm", "aten::bmm", "aten::linear")):
        return "gemm"
    if any(key in lowered for key in ("memcpy", "memset", "copy_", "aten::to", "aten::contiguous")):
        return "memory"
    # "quant": activation quantization before an 8-bit kernel (SageAttention's quant_per_block_int8_kernel).
    if any(key in lowered for key in ("elementwise", "vectorized", "reduce", "triton_poi", "triton_red",
                                      "triton_per", "norm", "gelu", "silu", "softmax", "aten::", "unrolled",
                                      "quant")):
        return "elementwise"
    return "other"


def step_breakdown(model: models.LoadedModel, workload: Workload, profile: Profile, prompt: str, seed: int,
                   unprofiled_step_ms: float) -> dict[str, Any]:
    """Where one denoising step's time goes: kernel time by kind, and what is left of the step when the GPU
    is idle (launch gaps, host work). The profiler slows the host, so idle time is taken against the step time
    measured without it."""
    import torch
    from torch.profiler import ProfilerActivity, schedule
    from torch.profiler import profile as torch_profile

    on_cuda = model.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    clock = timing.StepClock(model.device)
    # Step 1 warms the profiler up and step 3 stays outside: the recorded window is exactly step 2.
    with torch_profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=1, repeat=1)) as prof:
        def on_step(pipe, step, timestep, kwargs):
            clock(pipe, step, timestep, kwargs)
            prof.step()
            return {}

        clock.start()
        runner.render(model, workload, dataclasses.replace(profile, steps=3), prompt, seed, clock=on_step)
    by_kind = {kind: 0.0 for kind in KINDS}
    by_name: dict[str, float] = {}
    for event in prof.events():
        if event.name.startswith("ProfilerStep") or getattr(event, "is_user_annotation", False):
            continue  # the step's own marker spans the whole window, on the GPU timeline too
        if on_cuda:
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            duration_us = event.time_range.elapsed_us()
        else:
            parent = event.cpu_parent
            top_level = parent is None or parent.name.startswith("ProfilerStep")
            if not event.name.startswith("aten::") or not top_level:
                continue  # top-level aten ops only: their children's time is inside theirs
            duration_us = event.cpu_time_total
        by_kind[kernel_kind(event.name)] += duration_us / 1000
        by_name[event.name] = by_name.get(event.name, 0.0) + duration_us / 1000
    busy = sum(by_kind.values())
    top = sorted(by_name.items(), key=lambda item: -item[1])[:TOP_KERNELS]
    return {
        "profiled_step_ms": round(1000 * clock.step_seconds[1], 2),
        "kernel_ms": {k: round(v, 2) for k, v in by_kind.items()},
        "busy_ms": round(busy, 2),
        # On the CPU, "busy" is the host's top-level op time; idle is then Python and hook overhead.
        "idle_ms": round(max(unprofiled_step_ms - busy, 0.0), 2),
        "source": "CUDA kernels" if on_cuda else "CPU aten ops",
        "top": [{"name": name[:160], "kind": kernel_kind(name), "ms": round(ms, 2)} for name, ms in top],
    }


def removed_ms(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """What a stack step took out of one step, kind by kind and idle, from two step breakdowns (ms; negative:
    it added time there)."""
    removed = {kind: round(before["kernel_ms"][kind] - after["kernel_ms"][kind], 2) for kind in KINDS}
    removed["idle"] = round(before["idle_ms"] - after["idle_ms"], 2)
    return removed


KERNEL_CHANGES = 5  # per direction and stack step: the heaviest kernels that went and came


def kernel_name_key(name: str) -> str:
    """A kernel's name without Inductor's running number (`triton_poi_fused_gelu_view_13` and `..._11` are one
    kernel in two compiles of the same block)."""
    return re.sub(r"_\d+$", "", name) if name.startswith("triton_") else name


def kernel_changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The kernels a stack step took away ("gone": in the breakdown it was tried on, not in its own) and brought
    ("new"), heaviest first, by name: which GELU or copy kernel a fusion removed is read here, not guessed."""
    def by_key(breakdown):
        found: dict[str, dict[str, Any]] = {}
        for kernel in breakdown.get("top", []):
            entry = found.setdefault(kernel_name_key(kernel["name"]), {**kernel, "ms": 0.0})
            entry["ms"] = round(entry["ms"] + kernel["ms"], 2)
        return found

    old, new = by_key(before), by_key(after)
    return {"gone": sorted((old[k] for k in old.keys() - new.keys()), key=lambda k: -k["ms"])[:KERNEL_CHANGES],
            "new": sorted((new[k] for k in new.keys() - old.keys()), key=lambda k: -k["ms"])[:KERNEL_CHANGES]}


# ---- running the ladder ---------------------------------------------------------------------------------

@dataclasses.dataclass
class BenchResult:
    path_json: str
    path_md: str
    document: dict[str, Any]


def run_bench(options: BenchOptions, capabilities: Capabilities,
              log: Callable[[str], None] = lambda message: None, command: str | None = None) -> BenchResult:
    import torch

    options.validate()
    workload = options.workload
    os.makedirs(options.out_dir, exist_ok=True)
    path_json = os.path.join(options.out_dir, options.stem + ".json")
    path_md = os.path.join(options.out_dir, options.stem + ".md")
    document: dict[str, Any] = {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "workload": workload.to_dict(),
        "render_steps": options.render_steps,
        "prompt": options.prompt,
        "seed": options.seed,
        "fingerprint": fingerprint.machine_fingerprint(workload.model, None),
        "host": platform.node(),
        "notes": [],
        "rows": [],
    }
    # Where the components go for this card or --memory-limit (probes.memory_plan), before anything loads: every
    # row runs in it, the default too.
    placement = memory.placement_for(workload, capabilities.device)
    if placement:
        document["placement"] = placement
        document["notes"].append(f"memory plan: {memory.describe_placement(workload, placement)}")
    if workload.model == "synthetic":
        document["notes"].append("synthetic (random) weights: PSNR/SSIM speak for numerical fidelity only")
    if not options.full_image:
        document["notes"].append(
            f"s/image is estimated: the non-step time of a {options.render_steps}-step render (text, latents, "
            f"VAE decode) plus {workload.reference_steps} x the median step")

    rows: list[dict[str, Any]] = []
    reference_images: list[Any] | None = None
    flops: dict[str, float] | None = None
    reference_path = os.path.join(files.cache_dir(), options.stem + "-reference.npz")
    earlier_rows: list[dict[str, Any]] = []
    if options.resume:
        earlier = _resumable(path_json, document, reference_path)
        if earlier is not None:
            earlier_rows, reference_images = earlier["rows"], earlier["reference_images"]
            document["gemm_ceiling"], flops = earlier["gemm_ceiling"], earlier.get("flops_per_step")
            document["flops_per_step"] = flops
            document["resumed_from"] = earlier["date"]
            document["notes"].append(f"resumed: rows measured at {earlier['date']} by the interrupted run were kept")
            log(f"resuming {path_json}: {len(earlier_rows)} row(s) kept")
    if "gemm_ceiling" not in document:
        log("GEMM ceiling: measuring")
        document["gemm_ceiling"] = gemm_ceiling(capabilities.device)

    def save() -> None:
        document["rows"] = rows
        files.write_text_atomic(path_json, json.dumps(_finite(document), indent=2, default=str))
        files.write_text_atomic(path_md, markdown(document))

    def run(rung: Rung) -> dict[str, Any]:
        nonlocal reference_images, flops
        if placement:
            try:
                rung = dataclasses.replace(rung, profile=Profile.from_dict({**rung.profile.to_dict(), **placement}))
            except UsageError as error:
                rows.append({"id": rung.id, "group": rung.group, "label": rung.label,
                             "profile": rung.profile.to_dict(), "describe": rung.profile.describe(),
                             "skipped": f"not with the memory plan's placement: {error}"})
                save()
                return rows[-1]
        log(f"{rung.id}: {rung.profile.describe()}")
        row: dict[str, Any] = {"id": rung.id, "group": rung.group, "label": rung.label,
                               "profile": rung.profile.to_dict(), "describe": rung.profile.describe()}
        kept = next((r for r in earlier_rows if r["id"] == rung.id and r["profile"] == row["profile"]), None)
        if kept is not None:
            rows.append({**kept, "resumed": True})
            save()
            return rows[-1]
        earlier = next((r for r in rows if r["profile"] == row["profile"] and "step_ms" in r), None)
        if earlier is not None:  # the stack reached a profile measured alone: its numbers, not a second build
            row.update({k: v for k, v in earlier.items()
                        if k not in row and k not in ("kept", "stack_base", "removed_ms", "kernel_changes")},
                       same_as=earlier["id"])
            rows.append(row)
            save()
            return row
        model = None
        try:
            check_runnable(rung.profile, workload, capabilities)
            if capabilities.device == "cuda":
                torch._dynamo.reset()  # a compiled graph from the previous row must not serve this one
            started = time.perf_counter()
            model = runner.build(workload, rung.profile, capabilities)
            row["build_s"] = time.perf_counter() - started
            if flops is None:
                passes = 2 if workload.does_cfg else 1
                flops = qwen_shapes.flops_per_step_from_config(model.pipe.transformer.config, workload.width,
                                                               workload.height,
                                       text_tokens(model, options.prompt), passes)
                document["flops_per_step"] = flops
            rendered = dataclasses.replace(rung.profile, steps=options.render_steps if not options.full_image
                                           else rung.profile.steps or workload.reference_steps)
            measurement = runner.measure(model, workload, rendered, [options.prompt], [options.seed])
            row.update(_timing(measurement, workload, flops, document["gemm_ceiling"], rung.profile))
            if reference_images is None:
                reference_images = measurement.images
                _save_reference(reference_path, reference_images)
            row.update(quality.compare(measurement.images, reference_images))
            if options.breakdown:  # three more steps on the built, warm model: cheap next to the build
                row["breakdown"] = step_breakdown(model, workload, rendered, options.prompt, options.seed,
                                                  row["step_ms"])
        except UnavailableLever as error:
            row["skipped"] = str(error)
        except (KeyboardInterrupt, QwendoctorError):
            raise
        except Exception as error:  # an OOM or a compile failure is a result of this row, not of the bench
            from qwendoctor.tune import classify_failure

            row["failed"] = classify_failure(error)
        finally:
            del model
            _release(capabilities.device)
        rows.append(row)
        save()
        log(f"{rung.id}: {_row_line(row)}")
        return row

    default = run(Rung("default", "default", "default (diffusers, eager)", Profile()))
    if "step_ms" not in default:
        raise QwendoctorError(f"the default profile did not run: {default.get('failed') or default.get('skipped')}")

    wanted = set(options.rows)

    def selected(rung_id: str) -> bool:
        return not wanted or rung_id in wanted

    if options.ladder:
        alone = [run(r) for r in alone_rungs(capabilities, workload) if selected(r.id)]
        # The stack starts from the fastest attention kernel measured alone (the default's if none beat it).
        # An exact kernel only: 8-bit attention waits for the FP8 tier, at the ladder's end.
        attention_rows = [r for r in alone if r["id"].startswith("attn:") and "step_ms" in r
                          and r["psnr_db"] >= LOSSLESS_PSNR_DB
                          and not levers.is_lossy(Profile.from_dict(r["profile"]),
                                                  Profile.from_dict(default["profile"]))]
        current, current_ms, current_row = Profile(), default["step_ms"], default
        for row in attention_rows:
            if row["step_ms"] < current_ms:
                current, current_ms, current_row = Profile.from_dict(row["profile"]), row["step_ms"], row
        document["stack_start"] = current.to_dict()
        for step in STACK:
            candidate = step.change(current)
            if not selected(step.id) or not step.applies(capabilities, workload) or candidate == current:
                continue
            row = run(Rung(step.id, "stack", step.label, candidate))
            row["stack_base"] = current_row["id"]
            if "breakdown" in row and "breakdown" in current_row:
                row["removed_ms"] = removed_ms(current_row["breakdown"], row["breakdown"])
                row["kernel_changes"] = kernel_changes(current_row["breakdown"], row["breakdown"])
            # Against the default's profile: a memory plan's placement (FP8 storage, tiled decode) is in both.
            lossy = levers.is_lossy(candidate, Profile.from_dict(default["profile"]))
            floor = FP8_PSNR_DB if lossy else LOSSLESS_PSNR_DB
            kept = "step_ms" in row and row["step_ms"] < current_ms and row["psnr_db"] >= floor
            row["kept"] = kept
            if kept:
                current, current_ms, current_row = candidate, row["step_ms"], row
            save()
    for label, profile in options.given:
        run(Rung(f"given:{label}", "given", label, profile))

    document["tiers"] = tiers(rows)
    save()
    return BenchResult(path_json=path_json, path_md=path_md, document=document)


def _save_reference(path: str, images: list[Any]) -> None:
    """The default's images, kept outside benchmarks/ (tens of MB at 1328) for a resumed run's fidelity."""
    import numpy as np

    with files.atomic_write(path, "wb") as handle:
        np.savez_compressed(handle, **{f"image{i}": image for i, image in enumerate(images)})


RESUME_KEYS = ("workload", "render_steps", "prompt", "seed")


def _resumable(path_json: str, document: dict[str, Any], reference_path: str) -> dict[str, Any] | None:
    """The earlier run's document and the default's images, if both exist and were made for this same bench
    on this same setup; None otherwise (then everything is measured again)."""
    import numpy as np

    try:
        with open(path_json, encoding="utf-8") as handle:
            earlier = json.load(handle)
        with np.load(reference_path) as stored:
            images = [stored[f"image{i}"] for i in range(len(stored.files))]
    except (OSError, ValueError):
        return None
    if any(earlier.get(key) != _finite(document[key]) for key in RESUME_KEYS):
        return None
    if fingerprint.differences(earlier.get("fingerprint", {}), document["fingerprint"]):
        return None
    rows = earlier.get("rows", [])
    if not rows or rows[0]["id"] != "default" or "gemm_ceiling" not in earlier:
        return None
    for row in rows:  # JSON wrote the default's exact match as null
        if row.get("psnr_db", 0) is None:
            row["psnr_db"] = math.inf
    return {**earlier, "rows": rows, "reference_images": images}


def _timing(measurement: runner.Measurement, workload: Workload, flops: dict[str, float],
            ceiling: dict[str, float | None], profile: Profile) -> dict[str, Any]:
    step_ms = 1000 * timing.median(measurement.step_s)
    render_s = measurement.latencies_s[0]
    non_step_s = max(render_s - sum(measurement.step_s), 0.0)
    image_steps = profile.steps or workload.reference_steps
    result: dict[str, Any] = {
        "step_ms": step_ms,
        "step_ms_spread": [1000 * min(measurement.step_s), 1000 * max(measurement.step_s)],
        "timed_steps": len(measurement.step_s),
        "warmup_s": measurement.warmup_s,
        "image_steps": image_steps,
        "s_per_image": (render_s if len(measurement.step_s) == image_steps
                        else non_step_s + image_steps * step_ms / 1000),
        "tflops": flops["total"] / (step_ms / 1000) / 1e12,
    }
    if measurement.peak_memory_gib is not None:
        result["peak_memory_gib"] = measurement.peak_memory_gib
    if ceiling.get("bf16_tflops"):
        result["pct_of_bf16_gemm"] = 100 * result["tflops"] / ceiling["bf16_tflops"]
    if profile.quantization != "none" and ceiling.get("fp8_tflops"):
        result["pct_of_fp8_gemm"] = 100 * result["tflops"] / ceiling["fp8_tflops"]
    return result


def tiers(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any] | None]:
    """The fastest row of each tier: lossless (no lossy lever beyond the default's, PSNR >= 40 dB against the
    default) and FP8 (PSNR >= 30 dB)."""
    default = next(r for r in rows if r["id"] == "default")

    def best(condition) -> dict[str, Any] | None:
        candidates = [r for r in rows if "step_ms" in r and condition(r)]
        if not candidates:
            return None
        row = min(candidates, key=lambda r: r["step_ms"])
        return {"id": row["id"], "describe": row["describe"], "step_ms": row["step_ms"],
                "speedup": default["step_ms"] / row["step_ms"], "psnr_db": row["psnr_db"],
                "s_per_image": row["s_per_image"]}

    reference = Profile.from_dict(default["profile"])  # the placement's default under a memory plan

    def lossless(row) -> bool:
        return (not levers.is_lossy(Profile.from_dict(row["profile"]), reference)
                and row["psnr_db"] >= LOSSLESS_PSNR_DB)

    def fp8(row) -> bool:
        return row["profile"].get("quantization", "none").startswith("fp8") and row["psnr_db"] >= FP8_PSNR_DB

    return {"lossless": best(lossless), "fp8": best(fp8)}


def _row_line(row: dict[str, Any]) -> str:
    if "skipped" in row:
        return f"skipped ({row['skipped']})"
    if "failed" in row:
        return f"failed ({row['failed']})"
    return (f"{row['step_ms']:.1f} ms/step, {row['s_per_image']:.2f} s/image, warm-up {row['warmup_s']:.1f} s, "
            f"PSNR {_db(row['psnr_db'])}")


def _db(value: float) -> str:
    # quality.compare counts an identical image at PSNR_CEILING_DB (older results: infinity)
    return "exact" if value >= quality.PSNR_CEILING_DB else f"{value:.1f} dB"


def markdown(document: dict[str, Any]) -> str:
    w = document["workload"]
    rows = document["rows"]
    default = next((r for r in rows if r["id"] == "default" and "step_ms" in r), None)
    ceiling = document.get("gemm_ceiling") or {}
    lines = [
        f"# qwendoctor bench: {w['model']} {w['width']}x{w['height']}, {w['reference_steps']} steps, "
        f"true CFG {w['true_cfg_scale']:g}",
        "",
        f"Command: `{document.get('command')}`  ",
        f"Device: {document['fingerprint'].get('gpu_name') or 'CPU'}; torch {document['fingerprint'].get('torch')}, "
        f"diffusers {document['fingerprint'].get('diffusers')}; {document['date']}  ",
        f"Rendered {document['render_steps']} steps per row; bf16 GEMM ceiling measured in this run: "
        + (f"{ceiling['bf16_tflops']:.0f} TFLOP/s" if ceiling.get("bf16_tflops") else "not measured (no CUDA)")
        + (f", FP8 {ceiling['fp8_tflops']:.0f} TFLOP/s" if ceiling.get("fp8_tflops") else ""),
        "",
        "| row | profile | ms / step | vs default | s / image | warm-up s | TFLOP/s | % bf16 GEMM | peak GiB "
        "| PSNR dB | SSIM |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "step_ms" not in row:
            reason = row.get("skipped") or row.get("failed")
            lines.append(f"| {row['label']} | {row['describe']} | {'skipped' if 'skipped' in row else 'failed'}: "
                         f"{reason} | | | | | | | | |")
            continue
        label = row["label"] + ("" if row.get("kept", True) else " (not kept)")
        speedup = f"{default['step_ms'] / row['step_ms']:.2f}x" if default else ""
        lines.append(
            f"| {label} | {row['describe']} | {row['step_ms']:.1f} | {speedup} | {row['s_per_image']:.2f} "
            f"| {row['warmup_s']:.1f} | {row['tflops']:.3g} | {_pct(row.get('pct_of_bf16_gemm'))} "
            f"| {_num(row.get('peak_memory_gib'))} | {_db(row['psnr_db'])} | {row['ssim']:.4f} |")
    tier_rows = document.get("tiers") or {}
    if tier_rows:
        lines += ["", "| tier | fastest row | ms / step | vs default | s / image | PSNR dB |",
                  "|---|---|---|---|---|---|"]
        for name, tier in tier_rows.items():
            if tier is None:
                lines.append(f"| {name} | none measured | | | | |")
            else:
                lines.append(f"| {name} | {tier['describe']} | {tier['step_ms']:.1f} | {tier['speedup']:.2f}x "
                             f"| {tier['s_per_image']:.2f} | {_db(tier['psnr_db'])} |")
    broken_down = [r for r in rows if "breakdown" in r]
    if broken_down:
        lines += ["", "One step by kernel kind (torch.profiler, ms):", "",
                  "| row | step | " + " | ".join(KINDS) + " | idle |", "|---|---|" + "---|" * (len(KINDS) + 1)]
        for row in broken_down:
            b = row["breakdown"]
            lines.append(f"| {row['label']} | {row['step_ms']:.1f} | "
                         + " | ".join(f"{b['kernel_ms'][k]:.1f}" for k in KINDS) + f" | {b['idle_ms']:.1f} |")
    stepped = [r for r in rows if "removed_ms" in r]
    if stepped:
        lines += ["", "What each stack step removed from one step, against the stack it was tried on (ms; negative: "
                      "it added time there):", "",
                  "| step | tried on | " + " | ".join(KINDS) + " | idle | kept |",
                  "|---|---|" + "---|" * (len(KINDS) + 2)]
        labels = {r["id"]: r["label"] for r in rows}
        for row in stepped:
            removed = row["removed_ms"]
            lines.append(f"| {row['label']} | {labels.get(row['stack_base'], row['stack_base'])} | "
                         + " | ".join(f"{removed[k]:.1f}" for k in (*KINDS, "idle"))
                         + f" | {'yes' if row.get('kept') else 'no'} |")
    changed = [r for r in stepped if r.get("kernel_changes", {}).get("gone") or r.get("kernel_changes", {}).get("new")]
    if changed:
        lines += ["", f"Kernels each stack step took away and brought, by name (the {KERNEL_CHANGES} heaviest each way "
                      f"among the {TOP_KERNELS} heaviest of a step; ms per step):", "",
                  "| step | gone | new |", "|---|---|---|"]
        for row in changed:
            cells = [", ".join(f"`{k['name'][:60]}` {k['ms']:.1f}" for k in row["kernel_changes"][way]) or "none"
                     for way in ("gone", "new")]
            lines.append(f"| {row['label']} | {cells[0]} | {cells[1]} |")
    if document.get("flops_per_step"):
        f = document["flops_per_step"]
        lines += ["", f"FLOPs per step: {f['total'] / 1e12:.4g} T (linear {f['linear'] / 1e12:.4g}, attention "
                      f"{f['attention'] / 1e12:.4g})."]
    lines += [f"Note: {note}." for note in document.get("notes", [])]
    return "\n".join(lines) + "\n"


def _pct(value) -> str:
    return "" if value is None else f"{value:.0f}%"


def _num(value) -> str:
    return "" if value is None else f"{value:.1f}"


def _finite(value):
    """JSON has no infinity: an exact match (PSNR inf) is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _release(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
