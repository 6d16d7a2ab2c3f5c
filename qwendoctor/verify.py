"""What a study's winner must pass before it is locked: the held-out check (lossy profiles on prompts and seeds
no study image used, distinct profiles only), the side-by-side confirmation against the default (a lock its
confirmation contradicts falls back to the fastest profile it upheld, or the default), the removal of settings
that did nothing, and, on random weights, caches timed on a fixed schedule.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import TYPE_CHECKING, Any, Callable

from probes import timing
from probes.context import first_line
from qwendoctor import levers, quality, runner, study
from qwendoctor.errors import QwendoctorError, UnavailableLever, UsageError
from qwendoctor.pool import ModelPool
from qwendoctor.profile import Profile
from qwendoctor.prompts import default_prompts, held_out_set
from qwendoctor.runner import classify_failure, release_memory

if TYPE_CHECKING:
    from qwendoctor.tune import TuneOptions

# Rounds of (default, locked profile) timed alternately after the study to confirm the lock's speed-up; up to
# the maximum while the rounds' ratios disagree by more than the spread (half their range over their median).
CONFIRM_ROUNDS = 3
CONFIRM_MAX_ROUNDS = 6
UNSTABLE_SPREAD = 0.15
# Two trials of one profile (their step counts aside) whose ms per step differ by more than this: the machine,
# not the profile, set the pace.
UNEVEN_STEP_RATIO = 1.5
# On a model that does not draw, caches are timed on these fixed shares of cached steps instead of searched.
FIXED_CACHE_FRACTIONS = (0.5, 0.7)
# Lossy trials the held-out check tries, fastest first, before it settles for the fastest lossless one.
HELD_OUT_TRIES = 3
# Lossless profiles confirmed after the locked one was measured slower than the default side by side, before the
# lock settles for the default.
CONFIRM_FALLBACKS = 2


def check_held_out(options: TuneOptions, pool: ModelPool, optuna_study, best, log: Callable[[str], None]):
    """Render the chosen lossy profile on prompts and a seed the study never used and hold it to the floor there
    (every image, as in the study); if it misses, the next fastest feasible trial of another profile (copies of a
    rejected profile are not tried again), up to HELD_OUT_TRIES lossy ones, then the fastest lossless one. An
    image with NaN or infinite pixels misses. Returns the trial to lock and the study fields that record the
    check."""
    workload = options.workload
    prompts, seeds = held_out_set(workload.model, options.prompts, options.seeds, workload.task)
    if not prompts:
        built_in = len(default_prompts(workload.model, workload.task))
        log(f"held-out check: not run: the study used all {built_in} built-in prompts, none is left to hold out "
            "(pass fewer --num-prompts, or your own --prompts and keep some back); the lossy profile is judged on "
            "the study's images only")
        return best, {"held_out_images": 0}
    log(f"held-out check: {len(prompts) * len(seeds)} image(s) on prompts and a seed the study never rendered")
    references = runner.measure(pool.prepare(options.baseline).model, options.workload, options.baseline, prompts,
                                seeds, warmup=0).images
    rejected: list[int] = []
    rejected_profiles: list[dict[str, Any]] = []
    candidate = best
    while candidate is not None and len(rejected) < HELD_OUT_TRIES:
        profile = Profile.from_dict(candidate.user_attrs["profile"])
        if not levers.is_lossy(profile, options.baseline):
            break  # rounding only: a new prompt has nothing to reveal
        images = runner.measure(pool.prepare(profile).model, options.workload, profile, prompts, seeds,
                                warmup=0).images
        try:
            fidelity = quality.compare(images, references)
            missed = {metric: value for metric, value in options.floor.violations(fidelity).items() if value > 0}
            said = (f"PSNR {fidelity['psnr_db']:.1f} dB (worst {fidelity['psnr_db_min']:.1f}), "
                    f"SSIM {fidelity['ssim']:.3f}")
        except quality.NonFiniteImage as error:
            missed, said = {"finite": math.inf}, str(error)
        log(f"held-out check: trial #{candidate.number} {profile.describe()}: {said}"
            + (f", misses the floor ({', '.join(missed)})" if missed else ", holds"))
        if not missed:
            return candidate, {
                "held_out_images": len(images), "held_out_psnr_db": fidelity["psnr_db"],
                "held_out_ssim": fidelity["ssim"], "held_out_rejected": len(rejected),
                **({"held_out_lpips": fidelity["lpips"]} if "lpips" in fidelity else {})}
        rejected.append(candidate.number)
        rejected_profiles.append(candidate.user_attrs["profile"])
        candidate = study.best_feasible(optuna_study, lambda trial: trial.number not in rejected
                                        and trial.user_attrs.get("profile") not in rejected_profiles)
    if candidate is None or levers.is_lossy(Profile.from_dict(candidate.user_attrs["profile"]), options.baseline):
        candidate = study.best_feasible(optuna_study, lambda trial: not levers.is_lossy(
            Profile.from_dict(trial.user_attrs["profile"]), options.baseline))
    log(f"held-out check: {len(rejected)} lossy trial(s) missed the floor on new prompts; locking "
        f"trial #{candidate.number}, lossless")
    return candidate, {"held_out_images": len(references), "held_out_rejected": len(rejected)}


def confirm_speedup(options: TuneOptions, pool: ModelPool, profile: Profile,
                    log: Callable[[str], None]) -> tuple[dict[str, float], int]:
    """The default and `profile` re-timed side by side in this process, so both see the same load. Where the pool
    switches between them cheaply (every lever of `profile` undoable), one image each per round, alternating, with
    more rounds while their ratios disagree by more than UNSTABLE_SPREAD, up to CONFIRM_MAX_ROUNDS. Where a switch
    means a new transformer (FP8 weights, a compiled graph), the default's images are bracketed by the profile's
    before and after, two switches in all. Returns the lock's measured fields (confirmed_speedup,
    confirmed_spread: the half-range of the rounds' ratios over their median) and the rounds run."""
    prompt, seed = options.prompts[:1], options.seeds[0]

    def images(target: Profile, count: int) -> list[float]:
        model = pool.prepare(target).model
        # A switch may have replaced the transformer: its compile and first call land in the warm-up.
        return runner.measure(model, options.workload, target, prompt, [seed] * count).latencies_s

    if levers.baked_part(profile) is None:
        default_s, profile_s = [], []
        while len(default_s) < CONFIRM_MAX_ROUNDS:
            default_s += images(options.baseline, 1)
            profile_s += images(profile, 1)
            ratios = [d / p for d, p in zip(default_s, profile_s)]
            if len(ratios) >= CONFIRM_ROUNDS and _spread(ratios) <= UNSTABLE_SPREAD:
                break
        how = "alternating rounds"
    else:
        before, default_s, after = (images(target, CONFIRM_ROUNDS)
                                    for target in (profile, options.baseline, profile))
        profile_s = before + after
        ratios = [d / ((b + a) / 2) for b, d, a in zip(before, default_s, after)]
        how = "rounds, the default's images between the profile's"
    confirmed = {"confirmed_speedup": timing.median(default_s) / timing.median(profile_s),
                 "confirmed_spread": _spread(ratios)}
    if confirmed["confirmed_spread"] > UNSTABLE_SPREAD:
        log(f"speed-up not confirmed: {len(ratios)} {how} gave {min(ratios):.2f}x to {max(ratios):.2f}x; this "
            "machine's timings are too unstable to rank profiles (another process busy on it, or throttling)")
    else:
        log(f"speed-up confirmed: {confirmed['confirmed_speedup']:.2f}x over the default in {len(ratios)} {how} "
            f"(+/-{confirmed['confirmed_spread']:.0%})")
    return confirmed, len(ratios)


def contradicts(confirmed: dict[str, float]) -> bool:
    """Whether a confirmation measured the profile slower than the default beyond its own spread."""
    return confirmed["confirmed_speedup"] * (1 + confirmed["confirmed_spread"]) < 1


def drop_inert(profile: Profile, attrs: dict[str, Any], workload) -> tuple[Profile, str | None]:
    """`profile` less a setting that did nothing in its trial, and why; (profile, None) when all of it acts. A
    cache-dit cache whose warm-up is not below the step count cannot reuse a step, and one that reused none in
    any of the trial's images was bit for bit the profile without it: a lock must not claim it."""
    if profile.cache == "first_block":
        if attrs.get("cached_fraction") != 0:
            return profile, None
        return (dataclasses.replace(profile, cache="none", cache_threshold=None),
                "its FirstBlockCache skipped no step in any of the study's images")
    if profile.cache != "dbcache" or profile.cache_schedule is not None:
        return profile, None
    steps = workload.denoised_steps(profile.steps or workload.reference_steps)
    warmup = levers.DBCACHE_DEFAULTS["cache_warmup"] if profile.cache_warmup is None else profile.cache_warmup
    if warmup >= steps:
        reason = f"its cache warm-up ({warmup} steps) leaves none of its {steps} steps to reuse"
    elif attrs.get("cached_fraction") == 0:
        reason = "its cache reused no step in any of the study's images"
    else:
        return profile, None
    return dataclasses.replace(profile, cache="none", cache_threshold=None,
                               **dict.fromkeys(levers.DBCACHE_FIELDS)), reason


def _confirmed_choice(options: TuneOptions, pool: ModelPool, optuna_study, best, spent: dict[str, float],
                      log: Callable[[str], None]):
    """The trial to lock, its profile (less what did nothing), the confirmation's fields, its rounds and how many
    profiles it contradicted. A profile the side-by-side confirmation measures slower than the default (beyond
    its spread) is not locked: the next fastest lossless profile is confirmed instead, up to CONFIRM_FALLBACKS,
    then the default."""
    contradicted: list[dict[str, Any]] = []
    while True:
        profile, inert = drop_inert(Profile.from_dict(best.user_attrs["profile"]), best.user_attrs,
                                    options.workload)
        if inert:
            log(f"trial #{best.number}: {inert}; the lock leaves the cache out and the confirmation times "
                f"{profile.describe()}")
        if profile == options.baseline:
            return best, profile, {}, 0, len(contradicted)
        started = time.perf_counter()
        confirmed, rounds = confirm_speedup(options, pool, profile, log)
        spent["confirmation"] = spent.get("confirmation", 0.0) + time.perf_counter() - started
        if not contradicts(confirmed):
            return best, profile, confirmed, rounds, len(contradicted)
        contradicted.append(best.user_attrs["profile"])
        fallback = (study.best_feasible(optuna_study, lambda trial: trial.user_attrs.get("profile")
                                        not in contradicted and not levers.is_lossy(
                                            Profile.from_dict(trial.user_attrs["profile"]), options.baseline))
                    if len(contradicted) <= CONFIRM_FALLBACKS else None)
        if fallback is None or Profile.from_dict(fallback.user_attrs["profile"]) == options.baseline:
            fallback = study.best_feasible(optuna_study, lambda trial: Profile.from_dict(
                trial.user_attrs["profile"]) == options.baseline)
        if fallback is None:  # the default's own trial failed: there is nothing confirmed to lock
            raise QwendoctorError(f"the confirmation measured trial #{best.number} slower than the default, and "
                                  "the default has no trial to lock instead; tune again on a quieter machine")
        log(f"not locked: trial #{best.number} {profile.describe()} measured {confirmed['confirmed_speedup']:.2f}x "
            f"(+/-{confirmed['confirmed_spread']:.0%}) against the default side by side, slower than the default; "
            f"trying trial #{fallback.number} {fallback.user_attrs.get('describe', '')}")
        best = fallback


def _spread(ratios: list[float]) -> float:
    return (max(ratios) - min(ratios)) / (2 * timing.median(ratios))


def uneven_timings(trials) -> list[str]:
    """Trials whose profiles differ only in their step count run the same step, so their ms per step should
    agree; where they differ by more than UNEVEN_STEP_RATIO, something else on the machine set the pace. One line
    per such profile (caches left out: their cached steps cost less by design)."""
    groups: dict[str, list[tuple[int, float]]] = {}
    for trial in trials:
        attrs = trial.user_attrs
        if "step_ms" not in attrs or "profile" not in attrs or "duplicate_of" in attrs:
            continue
        profile = Profile.from_dict(attrs["profile"])
        if profile.cache != "none":
            continue
        groups.setdefault(dataclasses.replace(profile, steps=None).describe(), []).append(
            (trial.number, attrs["step_ms"]))
    notes = []
    for described, timed in groups.items():
        fastest, slowest = min(timed, key=lambda item: item[1]), max(timed, key=lambda item: item[1])
        if slowest[1] > UNEVEN_STEP_RATIO * fastest[1]:
            notes.append(f"timings uneven: {described} took {fastest[1]:.3g} ms per step in trial #{fastest[0]} and "
                         f"{slowest[1]:.3g} ms in #{slowest[0]}; close profiles cannot be ranked on this machine's "
                         "timings (another process busy on it?)")
    return notes


def measure_fixed_caches(options: TuneOptions, pool: ModelPool, profile: Profile, default_latency_s: float,
                         log: Callable[[str], None]) -> dict[str, float]:
    """Where quality cannot judge a cache (random weights): the locked profile plus cache-dit on fixed schedules
    of FIXED_CACHE_FRACTIONS cached steps, timed only. The study fields it returns are speed, never quality."""
    base = dataclasses.replace(profile, cache="dbcache", cache_threshold=None,
                               **dict.fromkeys(levers.DBCACHE_FIELDS))
    found = {}
    for fraction in FIXED_CACHE_FRACTIONS:
        cached = dataclasses.replace(base, cache_schedule=fraction)
        try:
            cached.validate()
            model = pool.prepare(cached).model
            measurement = runner.measure(model, options.workload, cached, options.prompts[:1], options.seeds[:1])
        except (UsageError, UnavailableLever) as error:
            log(f"fixed-schedule cache not measured: {first_line(error)}")
            return found
        except Exception as error:  # measured speed is a bonus; a failure here must not cost the lock
            pool.forget()
            release_memory()
            log(f"fixed-schedule cache not measured: {classify_failure(error)}")
            return found
        speedup = default_latency_s / measurement.summary()["latency_median_s"]
        found[f"fixed_cache_{round(fraction * 100)}_speedup"] = speedup
        log(f"fixed-schedule cache (speed only, unverified): {cached.describe()}: {speedup:.2f}x over the default")
    return found
