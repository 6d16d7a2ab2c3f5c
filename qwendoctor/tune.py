"""qwendoctor tune: an Optuna study over the levers, a quality floor as constraint, the best profile to a lock.

Flow: search space from the probes (qwendoctor.space) -> the reference (qwendoctor.reference: the default
profile's images, cached on disk, and its latency, timed in every run) -> trials (the one pipeline of
qwendoctor.pool prepared for the profile, a warm-up, a few timed steps; full renders and the comparison only for a
trial whose estimate could beat the best) -> the fastest feasible profile -> its checks (qwendoctor.verify: held
out prompts, the side-by-side confirmation, inert settings dropped) -> with several GPUs, that profile under each
multi-GPU strategy (qwendoctor.strategies) -> qwendoctor.lock. The study lives in an Optuna storage
(qwendoctor.storage), so an interrupted run resumes where it stopped, and several workers (processes, GPUs, hosts)
can share it: qwendoctor.study coordinates them. The prompts come from qwendoctor.prompts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import socket
import time
import warnings
from typing import Any, Callable

from probes import timing
from probes.context import first_line
from qwendoctor import compile_stats, fingerprint, levers, lockfile, models, quality, runner, space, study
from qwendoctor.capabilities import Capabilities, probe_capabilities
from qwendoctor.errors import QwendoctorError, UsageError
from qwendoctor.pool import ModelPool
from qwendoctor.profile import Profile, Workload
from qwendoctor.prompts import default_prompts, held_out_set, read_prompts  # noqa: F401  (tune.read_prompts)
from qwendoctor.reference import reference, time_baseline  # noqa: F401
from qwendoctor.runner import classify_failure, release_memory
from qwendoctor.verify import (  # noqa: F401  (the post-study checks, by their old names too)
    CONFIRM_MAX_ROUNDS,
    CONFIRM_ROUNDS,
    UNSTABLE_SPREAD,
    _confirmed_choice,
    _spread,
    check_held_out,
    confirm_speedup,
    contradicts,
    drop_inert,
    measure_fixed_caches,
    uneven_timings,
)

DEFAULT_HEARTBEAT_S = 10  # seconds between a running trial's heartbeats (qwendoctor.storage)
# A trial renders full images only if its estimated seconds per image could beat the best feasible trial's
# measured ones. The estimate comes from a few timed steps, which vary by about 1% run to run on an H100: a
# profile within this margin of the best is rendered, so noise does not discard a winner.
CANDIDATE_MARGIN = 0.03
# A cache skips steps depending on how the whole image develops, so a few timed steps (run without skips) only
# bound it: it is rendered unless even this speed-up over its uncached steps would not win. diffusers' and
# cache-dit's published FirstBlockCache results on FLUX and Qwen-Image stay within 2-2.5x at usable quality.
MAX_CACHE_SPEEDUP = 3.0
# A sampler that proposes only profiles the study has measured has run out of new ones (a small space, or one
# TPE has converged on): after this many in a row the run ends with what it has.
DUPLICATE_STREAK_LIMIT = 10
# Where the study's time goes (a trial's user attr "time_s"), in the order the report lists them.
TIME_PARTS = ("build", "warmup", "speed", "render", "quality")


@dataclasses.dataclass
class TuneOptions:
    workload: Workload
    prompts: list[str]
    seeds: list[int]
    floor: quality.Floor
    lock_path: str
    storage: str
    trials: int = 20
    timeout_s: float | None = None
    cache_dir: str | None = None  # reference renders; default ~/.cache/qwendoctor
    heartbeat_s: int = DEFAULT_HEARTBEAT_S  # a trial silent for twice this long is retried by another worker
    timed_steps: int = 5  # denoising steps timed per trial, after a 2-step warm-up
    exhaustive: bool = False  # keep the choices measured to lose on this GPU model (qwendoctor.space)
    gpus: int = 1  # more than 1: measure the best profile under each multi-GPU strategy (qwendoctor.strategies)
    # The memory plan's levers (probes.memory_plan), set by run_tune: every trial, the reference and the
    # confirmation run with them; {} when everything is resident.
    placement: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def baseline(self) -> Profile:
        """The default profile in this study's placement: the reference every trial is measured against."""
        return Profile(**self.placement)

    def validate(self) -> "TuneOptions":
        self.workload.validate()
        if self.trials < 1:
            raise UsageError(f"--trials must be at least 1, got {self.trials}")
        if isinstance(self.timed_steps, bool) or not isinstance(self.timed_steps, int) or self.timed_steps < 2:
            raise UsageError(f"--timed-steps must be a whole number, at least 2, got {self.timed_steps}")
        if isinstance(self.heartbeat_s, bool) or not isinstance(self.heartbeat_s, int) or self.heartbeat_s < 1:
            raise UsageError(f"--heartbeat must be a whole number of seconds, at least 1, got {self.heartbeat_s}")
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or self.gpus < 1:
            raise UsageError(f"--gpus must be at least 1, got {self.gpus}")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise UsageError(f"--timeout must be positive, got {self.timeout_s}")
        if not self.prompts:
            raise UsageError("the prompt set is empty")
        return self


@dataclasses.dataclass
class TuneResult:
    lock: lockfile.Lock
    trials: list[dict[str, Any]]  # one row per finished trial, for the report
    counts: dict[str, int]
    time_spent_s: dict[str, float]  # this run's wall clock: probing, the reference renders, the trials
    plot_path: str | None = None  # latency vs PSNR of every trial, beside the lock
    trial_time_s: dict[str, float] = dataclasses.field(default_factory=dict)  # the study's trials, by TIME_PARTS
    strategy_rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # the multi-GPU stage
    notes: list[str] = dataclasses.field(default_factory=list)  # what the report must not leave out (timings)


def study_name(options: TuneOptions, here: dict[str, Any]) -> str:
    """Same workload, prompts, floor and setup -> same study, so rerunning the command resumes it."""
    key = {
        # identity: other input images are another study (they draw other references)
        "workload": options.workload.identity(),
        "prompts": options.prompts,
        "seeds": options.seeds,
        "floor": dataclasses.asdict(options.floor),
        "setup": {k: here.get(k) for k in fingerprint.MATCHED_FIELDS},
    }
    if here.get("cache_dit"):  # it adds the dbcache lever to the search space: another study
        key["cache_dit"] = here["cache_dit"]
    if options.exhaustive:  # another search space: another study
        key["exhaustive"] = True
    if options.placement:  # another reference: the default in the memory plan's placement
        key["placement"] = options.placement
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return f"qwendoctor-{options.workload.model.replace('/', '_')}-{digest}"


def quality_class(profile: Profile, model_id: str, reference: Profile | None = None) -> str:
    """How far a profile's speed-up can be trusted to keep the image: `lossless` (rounding only, measured against
    the reference, whose profile is `reference`), `verified` (lossy, judged on a model that draws), or `unverified`
    (lossy, and the model's random weights draw noise: its PSNR/SSIM speak for numerical fidelity only)."""
    if not levers.is_lossy(profile, reference):
        return "lossless"
    return "verified" if models.draws(model_id) else "unverified"


def _is_candidate(profile: Profile, estimate_s: float, best_s: float) -> bool:
    bound = estimate_s / MAX_CACHE_SPEEDUP if profile.cache != "none" else estimate_s
    return bound <= best_s * (1 + CANDIDATE_MARGIN)


class _QuietOptunaLog(logging.Filter):
    """Optuna logs a failed trial (TrialFailed, whose reason the progress line and the report already give) and a
    trial stopped by Ctrl-C or SIGTERM (queued again; the CLI says so in one line) with a traceback, then again as
    "failed with value None". Those records are noise to a user; from an interrupt on, all of Optuna's are."""

    def __init__(self):
        super().__init__()
        self.interrupted = False

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, KeyboardInterrupt):
            self.interrupted = True
        if isinstance(error, study.TrialFailed) or "failed with value None" in record.getMessage():
            return False
        return not self.interrupted


class _Trials:
    """One run's objective over the shared study: the pool, the references and the search space it measures
    trials with. Optuna calls `objective` per trial and `after_trial` when one ends."""

    def __init__(self, options: TuneOptions, optuna_study, pool: ModelPool, search: space.SearchSpace,
                 references: tuple[list, dict[str, Any]], log: Callable[[str], None],
                 on_trial: Callable[[dict[str, Any], int, int], None] | None):
        self.options, self.study, self.pool, self.space, self.log, self.on_trial = (
            options, optuna_study, pool, search, log, on_trial)
        self.reference_images, self.baseline_summary = references
        reference_steps = options.workload.denoised_steps(options.workload.reference_steps)
        # What an image costs besides its denoising steps (latents, VAE decode, text encoding): the default's
        # seconds per image, timed in this run, less its steps. A trial's estimate is its timed step times its
        # steps plus this.
        self.overhead_s = max(0.0, self.baseline_summary["latency_median_s"]
                              - reference_steps * self.baseline_summary["step_ms"] / 1000)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.duplicate_streak = 0  # proposals in a row of profiles already measured
        # The default profile's own images: LPIPS 0 where LPIPS is measured at all.
        self.exact_lpips = {"lpips": 0.0, "lpips_max": 0.0} if quality.lpips_unavailable() is None else {}

    def objective(self, trial) -> float:
        try:
            return self.measure(trial)
        except KeyboardInterrupt:
            # Queued again now, so that another worker (or the next run) picks it up.
            trial.set_user_attr("failure", study.INTERRUPTED)
            study.requeue(self.study, trial.number, trial.params)
            raise

    def measure(self, trial) -> float:
        import optuna

        if not study.is_queued(self.study, trial) and len(study.finished(self.study)) >= self.options.trials:
            # Other workers finished the study while this one asked for a trial; a queued retry still runs.
            self.study.stop()
            raise optuna.TrialPruned("the study already has its trials")
        profile = space.sample_profile(trial, self.space)
        trial.set_user_attr("worker", self.worker)
        # Undecided before the profile is published: a rival that sees the profile waits for this trial's decision.
        trial.set_user_attr("claim", study.DECIDING)
        trial.set_user_attr("profile", profile.to_dict())
        trial.set_user_attr("describe", profile.describe())
        if profile == self.options.baseline:
            duplicate = study.same_profile_trial(self.study, profile.to_dict(), trial.number)
        else:
            duplicate = study.claim(self.study, trial, profile.to_dict())
        if duplicate is not None:
            results = self.reuse(trial, duplicate)
        elif profile == self.options.baseline:
            self.duplicate_streak = 0
            results = {**self.baseline_summary, "psnr_db": quality.PSNR_CEILING_DB,
                       "psnr_db_min": quality.PSNR_CEILING_DB, "ssim": 1.0,
                       "ssim_min": 1.0, **self.exact_lpips}
        else:
            self.duplicate_streak = 0
            study.stall_for_tests(trial.number)
            results = self.evaluate(trial, profile)
        for key, value in results.items():
            trial.set_user_attr(key, value)
        for key, value in self.options.floor.violations(results).items():
            trial.set_constraint(key, value)
        return results["latency_median_s"]

    def reuse(self, trial, duplicate) -> dict[str, Any]:
        """TPE proposed a profile the study already measured: its measurement, instead of paying again. The
        sampler learns nothing new from it, and it does not count towards --trials (study.finished)."""
        import optuna

        results = {k: duplicate.user_attrs[k] for k in study.RESULT_ATTRS if k in duplicate.user_attrs}
        trial.set_user_attr("duplicate_of", duplicate.number)
        results.pop("time_s", None)  # nothing was spent on this one
        results.pop("compile", None)
        self.duplicate_streak += 1
        if self.duplicate_streak >= DUPLICATE_STREAK_LIMIT:
            self.log(f"{DUPLICATE_STREAK_LIMIT} proposals in a row were profiles already measured: no new profile "
                     "left to try; ending with what the study has")
            self.study.stop()
        if duplicate.state == optuna.trial.TrialState.PRUNED:
            return study.skip(trial, results)
        return results

    def evaluate(self, trial, profile: Profile) -> dict[str, Any]:
        """Time a few steps; if the estimate could win, render the full images and compare them."""
        import optuna

        options, times = self.options, {}
        compiled_before = compile_stats.snapshot()
        device = self.pool.capabilities.device
        timing.reset_peak_memory(device)  # an out-of-memory trial records the peak it reached
        try:
            prepared = self.pool.prepare(profile)
            times["build"] = prepared.seconds
            model = prepared.model
            speed = runner.time_steps(model, options.workload, profile, options.prompts[0], options.seeds[0],
                                      options.timed_steps)
            times["warmup"] = speed.warmup_s
            times["speed"] = sum(speed.step_s)
            step_s = speed.step_median_s
            estimate_s = step_s * options.workload.denoised_steps(profile.steps or options.workload.reference_steps) \
                + self.overhead_s
            results = {"step_ms": 1000 * step_s, "warmup_s": speed.warmup_s, "estimate_s": estimate_s,
                       "model": prepared.how, "time_s": times}
            compiled = compile_stats.since(compiled_before)
            if compiled:
                # Why a warm-up took minutes: one graph per block would mean every block recompiled.
                results["compile"] = compiled
                self.log(f"trial #{trial.number}: {compile_stats.describe(compiled)}")
            if speed.peak_memory_gib is not None:
                results["peak_memory_gib"] = speed.peak_memory_gib
            best_s = study.best_feasible_s(self.study)
            if not _is_candidate(profile, estimate_s, best_s):
                results["skipped"] = (f"slower than the best so far: estimated {estimate_s:.3g} s per image "
                                      f"against {best_s:.3g} s; not rendered")
                return study.skip(trial, results)
            started = time.perf_counter()
            measurement = runner.measure(model, options.workload, profile, options.prompts, options.seeds,
                                         warmup=0)
            times["render"] = time.perf_counter() - started
            cached = [count for count in measurement.cached_steps if count is not None]
            if cached:  # over all its images: a cache that fires on one prompt and not another is still a cache
                results["cached_fraction"] = sum(cached) / (
                    len(cached) * options.workload.denoised_steps(profile.steps or options.workload.reference_steps))
            started = time.perf_counter()
            # An image with NaN or infinite pixels raises here: a failed trial with its reason, never a figure.
            fidelity = quality.compare(measurement.images, self.reference_images)
            times["quality"] = time.perf_counter() - started
        except optuna.TrialPruned:
            raise
        except Exception as error:
            import torch

            if isinstance(error, torch.OutOfMemoryError) and timing.peak_memory_gib(device) is not None:
                trial.set_user_attr("peak_memory_gib", timing.peak_memory_gib(device))
            # The pipeline may hold half-applied levers or half-allocated buffers: the next trial loads afresh.
            self.pool.forget()
            release_memory()
            reason = classify_failure(error)
            trial.set_user_attr("failure", reason)
            trial.set_user_attr("time_s", times)
            raise study.TrialFailed(reason) from error
        # The full renders replace the estimate: the lock records measured seconds per image.
        return {**results, **measurement.summary(), "warmup_s": speed.warmup_s, **fidelity}

    def after_trial(self, optuna_study, frozen) -> None:
        import optuna

        states = optuna.trial.TrialState
        if frozen.state not in (states.COMPLETE, states.FAIL, states.PRUNED) or (
                frozen.state == states.PRUNED and not frozen.user_attrs.get("skipped")):
            return
        if "duplicate_of" in frozen.user_attrs:
            self.log(f"trial #{frozen.number}: the profile of #{frozen.user_attrs['duplicate_of']} again, its "
                     "measurement reused (not counted)")
            return
        done = len(study.finished(optuna_study))
        if self.on_trial is not None:
            self.on_trial(study.row(frozen), done, self.options.trials)
        if done >= self.options.trials:
            optuna_study.stop()  # other workers finished trials meanwhile: the study is complete

    def run(self, n_trials: int, timeout: float | None) -> None:
        # On Optuna's handlers: its modules log through child loggers, whose records a filter on the "optuna"
        # logger itself would never see.
        handlers = logging.getLogger("optuna").handlers
        quiet = _QuietOptunaLog()
        for handler in handlers:
            handler.addFilter(quiet)
        try:
            self.study.optimize(self.objective, n_trials=n_trials, timeout=timeout, catch=(study.TrialFailed,),
                                callbacks=[self.after_trial], gc_after_trial=False, show_progress_bar=False)
        finally:
            for handler in handlers:
                handler.removeFilter(quiet)

    def run_until(self, trials: int, deadline: float | None) -> None:
        """Trials until the study has `trials` that count: a proposal of a profile already measured is not one,
        so another round asks for what is still missing."""
        while True:
            missing = trials - len(study.finished(self.study))
            left_s = None if deadline is None else deadline - time.monotonic()
            if missing <= 0 or (left_s is not None and left_s <= 0) \
                    or self.duplicate_streak >= DUPLICATE_STREAK_LIMIT:
                return
            self.run(missing, left_s)


SPACE_ATTR = "qwendoctor:space"


def space_signature(search: space.SearchSpace) -> str:
    """What a study's trials were drawn from: each lever's offered values and the facts its sampling reads."""
    offered = {name: {"values": {field: str(values) if isinstance(values, levers.IntRange) else list(values)
                                 for field, values in offer.values.items()},
                      "options": offer.options}
               for name, offer in search.offers.items()}
    if search.placement:
        offered["placement"] = search.placement
    return hashlib.sha256(json.dumps(offered, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _open_study(options: TuneOptions, storage, name: str, shown: str, signature: str):
    """The study `name`, made or resumed. One found under that name that qwendoctor did not make for this search
    space (another direction, no recorded space, another space) is refused before a trial is written into it."""
    import optuna

    # Workers sharing a study must not share a seed, or they propose the same profiles in lockstep; the constant
    # liar steers TPE away from the profiles other workers are running.
    from qwendoctor import storage as storages

    shared = storages.is_shared(options.storage)
    sampler = optuna.samplers.TPESampler(seed=None if shared else 0, constant_liar=shared, n_startup_trials=5,
                                         multivariate=True, group=True)
    try:
        made = optuna.create_study(study_name=name, storage=storage, direction="minimize", sampler=sampler,
                                   load_if_exists=True)
        _check_foreign(made, name, shown, signature)
        return made
    except UsageError:
        raise
    except Exception as error:  # the database went away, or holds something else
        raise UsageError(f"--storage {shown}: {first_line(error)}") from None


def _check_foreign(made, name: str, shown: str, signature: str) -> None:
    import optuna

    remedy = (f"use another --storage, or delete it (optuna delete-study --study-name {name} "
              f"--storage <URL>)")
    if made.directions != [optuna.study.StudyDirection.MINIMIZE]:
        raise UsageError(f"--storage {shown}: study {name} exists there to "
                         f"{'/'.join(d.name.lower() for d in made.directions)}, not to minimize seconds per image; "
                         f"{remedy}")
    recorded = made.user_attrs.get(SPACE_ATTR)
    if recorded is None:
        if made.get_trials(deepcopy=False):
            raise UsageError(f"--storage {shown}: study {name} exists there with trials qwendoctor did not "
                             f"record; {remedy}")
        made.set_user_attr(SPACE_ATTR, signature)
    elif recorded != signature:
        raise UsageError(f"--storage {shown}: study {name} exists there with another search space ({recorded}, "
                         f"here {signature}); {remedy}")


def run_tune(options: TuneOptions, capabilities: Capabilities | None = None,
             log: Callable[[str], None] = lambda message: None,
             on_trial: Callable[[dict[str, Any], int, int], None] | None = None) -> TuneResult:
    """Run (or resume, or join) the study, write the lock, and return the rows for the report."""
    import optuna

    from qwendoctor import storage as storages

    options.validate()
    from qwendoctor.levers import memory

    memory.apply(options.workload.memory_limit_gib)  # before the reference loads the model
    # Where the components go, chosen (or no placement fitting refused) before anything is probed or loaded.
    options = dataclasses.replace(options, placement=memory.placement_for(
        options.workload, capabilities.device if capabilities is not None else models.default_device()))
    if options.placement:
        log(f"memory plan: {memory.describe_placement(options.workload, options.placement)}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # First, so that a bad URL or an unreachable database fails before minutes of probing and rendering.
    storage = storages.open_storage(options.storage, options.heartbeat_s)
    shown = storages.describe(options.storage)
    if options.gpus > 1 and storages.is_shared(options.storage):
        # Every worker that finishes writes the lock; each would launch ranks on this host's GPUs at once.
        raise UsageError("--gpus > 1 measures the multi-GPU strategies in one process: run it with a sqlite "
                         "storage (after the workers finish, the same command resumes the finished study)")
    spent = {"probe": 0.0, "reference": 0.0, "trials": 0.0}
    if capabilities is None:
        started = time.perf_counter()
        capabilities = probe_capabilities(log, options.workload)
        spent["probe"] = time.perf_counter() - started
    lpips_missing = quality.lpips_unavailable()
    if lpips_missing:
        log(lpips_missing)
    search = space.build_search_space(capabilities, options.workload, options.exhaustive, placement=options.placement)
    for line in search.describe():
        log(f"search space: {line}")
    pool = ModelPool(options.workload, capabilities)
    if options.workload.task != "generate":
        from qwendoctor import inputs

        log(f"task: {inputs.describe(options.workload)}; every reference and trial renders from the same input")

    # The study key leaves the model revision out: it is only known once the model is built.
    setup_name = study_name(options, fingerprint.machine_fingerprint(options.workload.model, None))
    started = time.perf_counter()
    reference_images, _, revision = reference(options, pool, setup_name, log)
    spent["reference"] = time.perf_counter() - started
    started = time.perf_counter()
    baseline_summary = time_baseline(options, pool, log)
    spent["baseline"] = time.perf_counter() - started

    # Its search space in its name too: probes that offer other choices here (an attention kernel timed slower
    # this time) make another study, since Optuna cannot draw one parameter from two sets of choices.
    signature = space_signature(search)
    name = f"{setup_name}-{signature}"
    optuna_study = _open_study(options, storage, name, shown, signature)
    one_host = not storages.is_shared(options.storage)
    recovered = study.recover(optuna_study, storage, one_host)
    if recovered:
        log(f"resuming: {recovered} trial(s) of stopped workers queued again")
    if not optuna_study.trials:
        optuna_study.enqueue_trial(space.default_params(search), skip_if_exists=True)
        for params in space.distilled_params(search):
            optuna_study.enqueue_trial(params, skip_if_exists=True)
    done = len(study.finished(optuna_study))
    remaining = options.trials - done
    log(f"study {name} in {shown}: {done} trial(s) done, {max(remaining, 0)} to run")
    trials = _Trials(options, optuna_study, pool, search, (reference_images, baseline_summary), log, on_trial)

    started = time.perf_counter()
    deadline = None if options.timeout_s is None else time.monotonic() + options.timeout_s
    if remaining > 0:
        trials.run_until(options.trials, deadline)
    if len(study.finished(optuna_study)) >= options.trials:
        study.drain(optuna_study, storage, lambda: trials.run(1, None), deadline, log, one_host)
    spent["trials"] = time.perf_counter() - started

    rows = [study.row(t) for t in study.finished(optuna_study)]
    notes = uneven_timings(study.finished(optuna_study))
    for note in notes:
        log(note)
    if options.placement:
        # diffusers' own default does not fit here: every "default" figure is the default in the placement.
        notes.append("the default here is diffusers' default in the memory plan's placement ("
                     + options.baseline.describe() + "); speed-ups and quality are against it")
    counts = {
        "trials": len(rows),
        "completed": sum(r["state"] == "complete" for r in rows),
        "failed": sum(r["state"] == "failed" for r in rows),
        "infeasible": sum(r["state"] == "infeasible" for r in rows),
        "out_of_memory": sum(r["state"] == "infeasible" and bool(r.get("failure")) for r in rows),
        "slower": sum(r["state"] == "slower" for r in rows),
        # Proposals of a profile already measured: reused, not counted in "trials".
        "duplicates": study.duplicates(optuna_study),
    }
    # What the study's trials (of every run and worker) spent their time on; `spent` above is this run's wall.
    study_time = {part: sum((r.get("time_s") or {}).get(part, 0.0) for r in rows) for part in TIME_PARTS}
    try:
        best = optuna_study.best_trial
    except ValueError:
        if deadline is not None and time.monotonic() >= deadline and not counts["completed"]:
            # The clock, not the floor, stopped it: blaming --floor would send the user the wrong way.
            raise QwendoctorError(f"--timeout {options.timeout_s:g}: the time ran out before any trial finished "
                                  f"({counts['trials']} ended, none complete); raise --timeout") from None
        raise QwendoctorError(f"no trial met the quality floor {options.floor.name} "
                              f"({options.floor.describe()}) "
                              f"in {counts['trials']} trials; lower --floor or raise --trials") from None

    held_out = {}
    if models.draws(options.workload.model) and levers.is_lossy(Profile.from_dict(best.user_attrs["profile"]),
                                                                options.baseline):
        started = time.perf_counter()
        best, held_out = check_held_out(options, pool, optuna_study, best, log)
        spent["held-out check"] = time.perf_counter() - started
    baseline = {k: baseline_summary[k] for k in study.RESULT_ATTRS if k in baseline_summary}
    best, profile, confirmed, rounds, contradicted = _confirmed_choice(options, pool, optuna_study, best, spent, log)
    measured = {k: best.user_attrs[k] for k in study.RESULT_ATTRS
                if k in best.user_attrs and k in lockfile.MEASURED_FIELDS}
    if profile.cache == "none":
        measured.pop("cached_fraction", None)  # an inert cache dropped (drop_inert): nothing of it is locked
    # The study's figure: this run's default against the trial's images, timed minutes apart. The headline is the
    # confirmed one, the two timed side by side; the default against itself is 1 by definition.
    measured["study_speedup"] = baseline["latency_median_s"] / measured["latency_median_s"]
    measured["speedup"] = (confirmed["confirmed_speedup"] if confirmed
                           else 1.0 if profile == options.baseline else measured["study_speedup"])
    measured.update(confirmed)
    if not levers.is_lossy(profile, options.baseline):
        for key in ("held_out_psnr_db", "held_out_ssim", "held_out_lpips"):  # they judged a profile not locked
            held_out.pop(key, None)
    # The default profile (in the placement) is trial 0 and lossless against itself, so a lossless figure always
    # exists; FP8 weight storage, which a placement may impose on every trial, is in the reference's images too.
    lossless = study.best_feasible(optuna_study, lambda trial: not levers.is_lossy(
        Profile.from_dict(trial.user_attrs["profile"]), options.baseline))
    lossless_figure = (baseline["latency_median_s"] / lossless.value, lossless.number)
    if not levers.is_lossy(profile, options.baseline):
        # The locked profile is lossless itself (a lossless trial, or a lossy one whose idle cache was dropped):
        # its confirmed figure is the lossless one, not another trial's timed apart.
        lossless_figure = (measured["speedup"], best.number)
    lock = lockfile.Lock(
        fingerprint=fingerprint.machine_fingerprint(options.workload.model, revision),
        workload=options.workload,
        profile=profile,
        measured=measured,
        baseline=baseline,
        study={"name": name, "storage": shown, "trials": counts["trials"],
               "quality": quality_class(profile, options.workload.model, options.baseline),
               "lossless_speedup": lossless_figure[0], "lossless_trial": lossless_figure[1],
               "completed": counts["completed"], "failed": counts["failed"], "infeasible": counts["infeasible"],
               "slower": counts["slower"], "duplicates": counts["duplicates"],
               "best_trial": best.number, "floor": options.floor.name, "floor_psnr_db": options.floor.psnr_db,
               "floor_ssim": options.floor.ssim,
               **({"floor_lpips": options.floor.lpips} if options.floor.lpips is not None else {}), **held_out},
    )
    if rounds:
        lock.study["confirm_rounds"] = rounds
    if contradicted:
        lock.study["confirm_rejected"] = contradicted
    # The lock is written once the choice is confirmed: what follows only adds figures, and a crash or a kill
    # there (a cache reloads a 20B transformer per schedule under a memory plan) must not cost the tune.
    lockfile.write_lock(options.lock_path, lock)
    if not models.draws(options.workload.model) and capabilities.has_cache_dit:
        if deadline is not None and time.monotonic() > deadline:
            log("fixed-schedule caches not measured: --timeout has passed")
        else:
            started = time.perf_counter()
            lock.study.update(measure_fixed_caches(options, pool, profile, baseline["latency_median_s"], log))
            spent["fixed-schedule caches"] = time.perf_counter() - started
    strategy_rows = []
    if options.gpus > 1:
        started = time.perf_counter()
        strategy_rows = _multi_gpu_stage(options, lock, pool, reference_images[0], log)
        spent["multi-GPU"] = time.perf_counter() - started
    # Every worker writes the lock of the finished study (the same content); the write is atomic.
    lockfile.write_lock(options.lock_path, lock)
    plot = None
    try:
        from qwendoctor.plot import plot_path, write_tune_plot

        plot = write_tune_plot(rows, baseline["latency_median_s"], best.number, options.floor,
                               plot_path(options.lock_path),
                               f"{options.workload.model} {options.workload.width}x{options.workload.height}, "
                               f"{counts['trials']} trials")
    except ImportError as error:  # matplotlib is a dependency, but a lock must not depend on a plot
        log(f"plot not written: {error}")
    except OSError as error:  # a full disk or a quota, after the lock was written: the run did its job
        log(f"plot not written: {plot_path(options.lock_path)}: {error.strerror or error}")
    return TuneResult(lock=lock, trials=rows, counts=counts, time_spent_s=spent, plot_path=plot,
                      trial_time_s=study_time, strategy_rows=strategy_rows, notes=notes)


def _multi_gpu_stage(options: TuneOptions, lock: lockfile.Lock, pool: ModelPool, reference_image,
                     log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Measure the chosen profile under each strategy for --gpus; put the fastest that wins into `lock`."""
    from qwendoctor import strategies

    pool.close()  # its ranks build their own pipelines, one of them on this process's GPU
    one_gpu_s = lock.measured["latency_median_s"]
    rows = strategies.measure_strategies(lock.profile, options.workload, options.gpus, options.prompts[0],
                                         options.seeds[0], reference_image, options.timed_steps, log)
    lock.study["strategies_tried"] = len(rows)
    winner = strategies.fastest(rows, options.floor, one_gpu_s)
    if winner is None:
        log(f"multi-GPU: no strategy on {options.gpus} GPUs beat one GPU within the floor; the lock keeps one GPU")
    else:
        lock.study["one_gpu_latency_s"] = one_gpu_s
        lock.profile = winner.profile
        measured = {k: v for k, v in winner.results.items() if k in lockfile.MEASURED_FIELDS}
        # One image (the first prompt and seed) rendered in full: its figures stand for the median and worst.
        measured.update(latency_p90_s=measured["latency_median_s"], psnr_db_min=measured["psnr_db"],
                        ssim_min=measured["ssim"])
        measured["speedup"] = measured["study_speedup"] = (lock.baseline["latency_median_s"]
                                                           / measured["latency_median_s"])
        lock.measured = measured
        # The one-GPU confirmation was of another profile: its rounds must not stand beside these figures.
        lock.study.pop("confirm_rounds", None)
    return [row.to_dict() for row in rows]
