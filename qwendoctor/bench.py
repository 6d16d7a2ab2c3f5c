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
import time
from typing import Any, Callable

from probes import qwen_shapes, timing
from qwendoctor import files, fingerprint, inputs, levers, models, quality, runner
from qwendoctor.levers import memory
from qwendoctor.capabilities import Capabilities
from qwendoctor.errors import QwendoctorError, UnavailableLever, UsageError
from qwendoctor.bench_report import (  # noqa: F401  (bench.markdown, bench.tiers)
    FP8_PSNR_DB,
    LOSSLESS_PSNR_DB,
    _finite,
    _row_line,
    markdown,
    tiers,
)
from qwendoctor.profile import Profile, Workload, check_runnable
from qwendoctor.step_profile import (  # noqa: F401  (bench.kernel_kind)
    gemm_ceiling,
    kernel_changes,
    kernel_kind,
    removed_ms,
    step_breakdown,
)



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
        from probes import limits

        self.workload.validate()
        if self.timed_steps < 3:
            raise UsageError(f"--timed-steps must be at least 3 (2 warm up the row), got {self.timed_steps}")
        try:
            limits.check("timed_steps", self.timed_steps, label="--timed-steps")
        except limits.RangeError as error:
            raise UsageError(str(error)) from None
        if self.name is not None and (not self.name.strip() or self.name in (".", "..")
                                      or any(c in self.name for c in ("/", "\\", os.sep, "\0"))):
            # The stem names files in --out and in the cache: a path would write outside both.
            raise UsageError(f"--name {self.name!r}: a file stem, without path separators")
        for label, profile in self.given:
            if profile.gpus > 1:
                # Refused now, not after the whole ladder ran: the rows are measured in this one process.
                raise UsageError(f"--profile {label}: bench measures one process on one GPU; gpus={profile.gpus} "
                                 "is for `qwendoctor generate --gpus` or `tune --gpus`")
        return self

    @property
    def render_steps(self) -> int:
        return self.workload.reference_steps if self.full_image else self.timed_steps

    @property
    def stem(self) -> str:
        w = self.workload
        task = "" if w.task == "generate" else f"{w.task}-"
        return self.name or f"bench-{w.model.replace('/', '_')}-{task}{w.width}x{w.height}"


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


def _flops(model: models.LoadedModel, workload: Workload, options: "BenchOptions") -> dict[str, float]:
    """One step's FLOPs for the sequence this workload's transformer passes hold. An edit's are read from the
    pipeline's first call (its input latents, and the vision tokens its prompt holds); text-to-image's and
    image-to-image's image tokens are the output's."""
    passes = 2 if workload.does_cfg else 1
    config = model.pipe.transformer.config
    if workload.task == "edit":
        sequence = runner.transformer_sequence(model, workload, options.prompt, options.seed)
        flops = qwen_shapes.flops_per_step_from_config(config, workload.width, workload.height,
                                                       sequence["text_tokens"], passes,
                                                       image_tokens=sequence["image_tokens"])
        return {**flops, **{key: float(value) for key, value in sequence.items()}}
    return qwen_shapes.flops_per_step_from_config(config, workload.width, workload.height,
                                                  text_tokens(model, options.prompt), passes)


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
        # identity: an edit's input files too (another input of the same size is another bench to resume)
        "workload": workload.identity(),
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
    if workload.task != "generate":
        document["notes"].append(f"task: {inputs.describe(workload)}")
    image_steps = workload.denoised_steps(workload.reference_steps)
    if not options.full_image:
        document["notes"].append(
            f"s/image is estimated: the non-step time of a {options.render_steps}-step render (text, latents, "
            f"VAE decode) plus {image_steps} x the median step")

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
                flops = _flops(model, workload, options)
                document["flops_per_step"] = flops
            rendered = (runner.with_denoised_steps(workload, rung.profile, options.render_steps)
                        if not options.full_image else
                        dataclasses.replace(rung.profile, steps=rung.profile.steps or workload.reference_steps))
            measurement = runner.measure(model, workload, rendered, [options.prompt], [options.seed])
            # The document's figure counts the workload's passes; a row without true CFG (the distilled adapter)
            # does half the work in a step.
            passes_ratio = (1 if levers.runs_true_cfg(workload, rung.profile) or not workload.does_cfg else 0.5)
            row_flops = {key: value * passes_ratio for key, value in flops.items()}
            row.update(_timing(measurement, workload, row_flops, document["gemm_ceiling"], rung.profile))
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
            from qwendoctor.runner import classify_failure

            # A failure after the timing (the comparison, the breakdown) must not leave a half row: the report
            # reads a row with step_ms as a whole one.
            for key in [key for key in row if key not in ("id", "group", "label", "profile", "describe")]:
                del row[key]
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
        earlier = json.loads(files.read_bounded(path_json, "--resume", limit=64 * files.MAX_READ_BYTES))
        with np.load(reference_path) as stored:
            images = [stored[f"image{i}"] for i in range(len(stored.files))]
    except (OSError, ValueError, UsageError):
        return None
    if not _well_formed(earlier):  # a file edited by hand, or another tool's: measured again, not trusted
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


def _well_formed(earlier: Any) -> bool:
    """The structure run_bench reads back from an earlier document: rows of the shape it writes."""
    if not isinstance(earlier, dict) or not isinstance(earlier.get("rows"), list):
        return False
    if not isinstance(earlier.get("fingerprint", {}), dict) or not isinstance(earlier.get("gemm_ceiling", {}), dict):
        return False
    for row in earlier["rows"]:
        if not isinstance(row, dict) or not isinstance(row.get("id"), str) or not isinstance(row.get("profile"), dict):
            return False
        try:
            Profile.from_dict(row["profile"])
        except UsageError:
            return False
        if "step_ms" in row and not all(key in row and (isinstance(row[key], (int, float)) or row[key] is None)
                                        for key in ("step_ms", "s_per_image", "warmup_s", "tflops", "psnr_db",
                                                    "ssim")):
            return False
    return True


def _timing(measurement: runner.Measurement, workload: Workload, flops: dict[str, float],
            ceiling: dict[str, float | None], profile: Profile) -> dict[str, Any]:
    step_ms = 1000 * timing.median(measurement.step_s)
    render_s = measurement.latencies_s[0]
    non_step_s = max(render_s - sum(measurement.step_s), 0.0)
    image_steps = workload.denoised_steps(profile.steps or workload.reference_steps)
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


def _release(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
