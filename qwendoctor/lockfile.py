"""qwendoctor.lock: TOML, schema-versioned, validated on read, written atomically.

Layout (every table required unless marked optional):

    schema_version = 1
    created = "2026-11-27T15:00:00+00:00"
    qwendoctor_version = "0.1.0"
    [fingerprint]   machine, software and model the profile was tuned on (fingerprint.machine_fingerprint)
    [workload]      Workload: model, width, height, true_cfg_scale, negative_prompt, reference_steps, dtype, loras
                    (each a table: path, scale, sha256 and rank of a LoRA file; generate refuses a changed file);
                    for an edit, image-to-image or inpainting (left out for text-to-image): task, input_sizes (each
                    input's [width, height]: generate refuses an input of another size) and, for img2img and
                    inpaint, strength; never the input files themselves, which are each run's own
    [profile]       Profile: the chosen configuration
    [measured]      the chosen profile: latency_median_s, latency_p90_s, step_ms, warmup_s, peak_memory_gib,
                    psnr_db, psnr_db_min, ssim, ssim_min, lpips and lpips_max (where LPIPS could be measured),
                    cached_fraction (a cache profile: the share of steps, over all the study's images, whose blocks
                    were reused), speedup (the confirmed figure where there was a confirmation), study_speedup
                    (the study's: the default and the profile timed apart); confirmed_speedup and confirmed_spread
                    (the default and the profile re-timed in alternating rounds after the study,
                    study.confirm_rounds of them; spread: half the rounds' ratio range over their median);
                    psnr_db of an image identical to the default's is quality.PSNR_CEILING_DB, never infinite
    [baseline]      (optional) the same measurements for the default profile, timed in the study's last run
    [study]         (optional) the study it came from: name, storage, trials, completed, failed, infeasible,
                    slower (timed, not rendered: they could not win), duplicates (proposals of a profile already
                    measured: reused, not counted in trials), best_trial, floor, floor_psnr_db, floor_ssim, floor_lpips;
                    quality (how far the speed-up keeps the image: QUALITY_CLASSES), lossless_speedup and
                    lossless_trial (the fastest profile that changes nothing beyond rounding); for a lossy
                    profile on a model that draws, the held-out check: held_out_images, held_out_psnr_db,
                    held_out_ssim, held_out_lpips, held_out_rejected (faster trials that missed the floor there;
                    held_out_images 0: no built-in prompt was left to hold out); confirm_rejected (faster profiles
                    the confirmation measured slower than the default, not locked);
                    on a model with random weights fixed_cache_50_speedup and fixed_cache_70_speedup (the locked
                    profile with half and 70% of its steps reusing cached blocks: speed only, unverified);
                    with several GPUs strategies_tried and one_gpu_latency_s (the best one-GPU profile's)
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import tomllib
from typing import Any

import tomli_w

from probes.workload import WorkloadError
from qwendoctor import __version__, files
from qwendoctor.errors import LockfileError, UsageError
from qwendoctor.profile import Profile, Workload

SCHEMA_VERSION = 1
MEASURED_FIELDS = {
    "latency_median_s", "latency_p90_s", "step_ms", "warmup_s", "peak_memory_gib",
    "psnr_db", "psnr_db_min", "ssim", "ssim_min", "lpips", "lpips_max", "cached_fraction", "speedup",
    "confirmed_speedup", "confirmed_spread",
    "study_speedup",  # the study's figure (this run's default against the trial, timed apart); speedup: confirmed
}
REQUIRED_MEASURED = ("latency_median_s", "step_ms")
STUDY_FIELDS = {
    "name": str, "storage": str, "trials": int, "completed": int, "failed": int, "infeasible": int, "slower": int,
    "duplicates": int, "quality": str, "lossless_speedup": float, "lossless_trial": int,
    "strategies_tried": int, "one_gpu_latency_s": float,
    "best_trial": int, "floor": str, "floor_psnr_db": float, "floor_ssim": float, "floor_lpips": float,
    # a lossy profile re-rendered on prompts and a seed the study never used (qwendoctor.tune.check_held_out)
    "held_out_images": int, "held_out_psnr_db": float, "held_out_ssim": float, "held_out_lpips": float,
    "held_out_rejected": int,
    # a model that does not draw: the locked profile with a cache on a fixed schedule, speed only (unverified)
    "fixed_cache_50_speedup": float, "fixed_cache_70_speedup": float,
    "confirm_rounds": int,  # alternating rounds of the default and the locked profile (confirmed_speedup)
    "confirm_rejected": int,  # faster profiles the confirmation measured slower than the default: not locked
}
REQUIRED_FINGERPRINT = ("device", "torch", "model_id")
# lossless: rounding only, measured against the reference; verified: lossy (FP8, a cache, fewer steps), judged on
# a model that draws; unverified: lossy, on random weights whose images are noise.
QUALITY_CLASSES = ("lossless", "verified", "unverified")


@dataclasses.dataclass
class Lock:
    fingerprint: dict[str, Any]
    workload: Workload
    profile: Profile
    measured: dict[str, float]
    baseline: dict[str, float] = dataclasses.field(default_factory=dict)
    study: dict[str, Any] = dataclasses.field(default_factory=dict)
    created: str = dataclasses.field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    qwendoctor_version: str = __version__
    schema_version: int = SCHEMA_VERSION

    def to_toml(self) -> str:
        document = {
            "schema_version": self.schema_version,
            "created": self.created,
            "qwendoctor_version": self.qwendoctor_version,
            "fingerprint": self.fingerprint,
            "workload": self.workload.to_dict(),
            "profile": self.profile.to_dict(),
            "measured": self.measured,
        }
        if self.baseline:
            document["baseline"] = self.baseline
        if self.study:
            document["study"] = self.study
        return tomli_w.dumps(document)


def write_lock(path: str | os.PathLike, lock: Lock) -> None:
    """Write atomically: a crash leaves the old lock or the new one, never half of one."""
    text = lock.to_toml()
    parse_lock(text, str(path))  # never write what we would refuse to read
    files.write_text_atomic(path, text, durable=True)


def read_lock(path: str | os.PathLike) -> Lock:
    path = str(path)
    if not os.path.exists(path):
        raise LockfileError(f"{path}: no such lock file; run `qwendoctor tune` to create one")
    try:
        text = files.read_bounded(path, "--lock")
    except UsageError as error:
        raise LockfileError(str(error)) from None
    except (OSError, UnicodeDecodeError) as error:
        raise LockfileError(f"{path}: cannot read: {error}") from None
    return parse_lock(text, path)


def parse_lock(text: str, path: str = "<lock>") -> Lock:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise LockfileError(f"{path}: not valid TOML ({error})") from None

    def fail(field: str, problem: str):
        raise LockfileError(f"{path}: {field}: {problem}")

    version = data.get("schema_version")
    if version is None:
        fail("schema_version", "missing")
    if version != SCHEMA_VERSION:
        fail("schema_version", f"{version!r} is not supported (this qwendoctor reads {SCHEMA_VERSION})")
    for field in ("created", "qwendoctor_version"):
        if not isinstance(data.get(field), str):
            fail(field, "missing or not a string")
    for table in ("fingerprint", "workload", "profile", "measured"):
        if not isinstance(data.get(table), dict):
            fail(table, "missing table")
    for table in ("baseline", "study"):
        if table in data and not isinstance(data[table], dict):
            fail(table, "not a table")
    unknown = sorted(set(data) - {"schema_version", "created", "qwendoctor_version", "fingerprint", "workload",
                                  "profile", "measured", "baseline", "study"})
    if unknown:
        fail(unknown[0], "unknown field")

    fingerprint = data["fingerprint"]
    for field in REQUIRED_FINGERPRINT:
        if not isinstance(fingerprint.get(field), str):
            fail(f"fingerprint.{field}", "missing or not a string")

    try:
        workload = Workload.from_dict(data["workload"])
        profile = Profile.from_dict(data["profile"])
    except (UsageError, WorkloadError) as error:  # WorkloadError: a number out of probes.limits' range
        message = str(error)
        section = "workload" if "workload" in message or not message.startswith("profile") else "profile"
        raise LockfileError(f"{path}: {message if message.startswith(section) else section + '.' + message}") \
            from None

    for table in ("measured", "baseline"):
        values = data.get(table, {})
        for field, value in values.items():
            if field not in MEASURED_FIELDS:
                fail(f"{table}.{field}", "unknown field")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value) or value < 0:
                fail(f"{table}.{field}", f"must be a non-negative number, got {value!r}")
    for field in REQUIRED_MEASURED:
        if field not in data["measured"]:
            fail(f"measured.{field}", "missing")

    study = data.get("study", {})
    for field, value in study.items():
        expected = STUDY_FIELDS.get(field)
        if expected is None:
            fail(f"study.{field}", "unknown field")
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if expected is float else (
            isinstance(value, expected) and not isinstance(value, bool))
        if not ok:
            fail(f"study.{field}", f"expected {expected.__name__}, got {value!r}")
    if "quality" in study and study["quality"] not in QUALITY_CLASSES:
        fail("study.quality", f"{study['quality']!r} is not one of {', '.join(QUALITY_CLASSES)}")

    return Lock(fingerprint=fingerprint, workload=workload, profile=profile, measured=dict(data["measured"]),
                baseline=dict(data.get("baseline", {})), study=dict(study), created=data["created"],
                qwendoctor_version=data["qwendoctor_version"], schema_version=version)
