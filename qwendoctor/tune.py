"""qwendoctor tune: an Optuna study over the levers, a quality floor as constraint, the best profile to a lock.

Flow: search space from the probes -> reference renders (default profile, cached on disk) -> trials (the one
pipeline of qwendoctor.pool prepared for the profile, a warm-up, a few timed steps; full renders and the
comparison only for a trial whose estimate could beat the best) -> the fastest feasible profile -> with several
GPUs, that profile under each multi-GPU strategy (qwendoctor.strategies) -> qwendoctor.lock. The study lives in
an Optuna storage, so an interrupted run resumes where it stopped, and several workers (processes, GPUs, hosts)
can share it: see qwendoctor.storage for the URLs and heartbeats, `_claim` for how two workers never measure the
same profile at once, and `_drain` for how the study finishes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gc
import hashlib
import json
import math
import os
import socket
import tempfile
import time
import warnings
from typing import Any, Callable

from qwendoctor import compile_stats, fingerprint, lockfile, quality, runner
from qwendoctor.errors import QwendoctorError, UnavailableLever, UsageError
from qwendoctor.pool import ModelPool
from qwendoctor.profile import MIN_STEPS, Capabilities, Profile, Workload

INTERRUPTED = "interrupted: the worker stopped during this trial"
DEFAULT_HEARTBEAT_S = 10  # seconds between a running trial's heartbeats (qwendoctor.storage)
# How often a worker looks at the shared study while it waits for another worker (a rival's claim, the last trials).
POLL_S = 0.5
# A running trial gets its first heartbeat within milliseconds of being created (storage._HeartbeatFromTheStart):
# one still without any after this long has lost its worker.
ORPHAN_AFTER_S = 1.0
# Test-only fault injection (tests/test_distributed_tune.py): a worker started with this variable set to a path
# writes the number of the first trial it is about to measure there and hangs, so the test can kill it mid-trial.
STALL_ENV = "QWENDOCTOR_TEST_STALL_FILE"
# On a GPU, math attention only serves as a numerical reference: it is never the fast choice.
SLOW_REFERENCE_BACKENDS = ("_native_math",)
CACHE_THRESHOLD_RANGE = (0.05, 0.3)


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    attention_backends: tuple[str, ...]
    compile: tuple[str, ...]
    compile_modes: tuple[str, ...]
    quantizations: tuple[str, ...]
    caches: tuple[str, ...]
    tf32: tuple[bool, ...]
    cfg_batching: tuple[bool, ...]
    real_rope: tuple[bool, ...]
    steps: tuple[int, int, int]  # low, high, step
    quantize_eager: bool = True  # False: quantization is only searched together with compile
    left_out: tuple[str, ...] = ()  # what the default space leaves out and why (`--exhaustive` keeps it)

    def describe(self) -> list[str]:
        return [
            f"attention: {', '.join(self.attention_backends)}",
            f"compile: {', '.join(self.compile)}" + (f" (modes: {', '.join(self.compile_modes)})"
                                                     if len(self.compile) > 1 else ""),
            f"quantization: {', '.join(self.quantizations)}",
            f"cache: {', '.join(self.caches)}",
            f"tf32: {', '.join(map(str, self.tf32))}",
            f"cfg batching: {', '.join(map(str, self.cfg_batching))}",
            f"real RoPE: {', '.join(map(str, self.real_rope))}",
            f"steps: {self.steps[0]}..{self.steps[1]} by {self.steps[2]}",
            *(f"left out: {reason}" for reason in self.left_out),
        ]


# What a default study leaves out on a GPU, and the measurement that says why (benchmarks/bench, H100, W1).
# `--exhaustive` searches them too.
DOMINATED = {
    "full": "full-model compile (regional compile compiles one of the 60 identical blocks instead of all, for "
            "the same kernels in each)",
    "max-autotune": "max-autotune-no-cudagraphs (473 vs 470.5 ms/step with the default mode on an H100, for "
                    "minutes more compile per profile)",
    "coordinate-descent": "coordinate-descent kernel tuning (2.4% faster FP8 steps on an H100, 395.1 vs 404.6 "
                          "ms, for 106 s of warm-up per compiled graph instead of seconds)",
    "eager-fp8": "FP8 without compile (its activation quantization is not fused: 1794 vs 637 ms/step bf16 on "
                 "an H100)",
    "tf32": "TF32 in a bf16 pipeline (its matmuls are bf16: the flag changes nothing they run)",
    "complex-rope": "complex RoPE under compile (real RoPE is as fast or faster at the same PSNR: 479.2 vs 483.1 "
                    "ms/step bf16, 370.5 vs 378.9 FP8 on an H100), so compiled profiles always use real RoPE",
}
# An attention backend measured (attention_truth, at this workload's shapes) this much slower than the fastest is
# left out: attention is about a third of a W1 step, so 15% slower attention costs about 5% of a step.
ATTENTION_SLACK = 0.15
# attention_truth's names for the kernels it times -> the dispatcher backends that run them.
# attention_truth's name for the kernel SDPA picked in `native` -> the backend that forces that kernel.
NATIVE_PICKS = {"cudnn": "_native_cudnn", "flash": "_native_flash", "efficient": "_native_efficient",
                "math": "_native_math"}
TRUTH_TO_BACKEND = {"native": "native", "cudnn": "_native_cudnn", "flash": "_native_flash",
                    "efficient": "_native_efficient", "flex": "flex", "fa2": "flash", "fa3": "_flash_3",
                    "fa4": "fa4"}


def build_search_space(capabilities: Capabilities, workload: Workload, exhaustive: bool = False) -> SearchSpace:
    """Only what this machine passed: backends the probe ran, FP8 where its probe passed, compile on CUDA where
    its probe passed. Unless `exhaustive`, choices measured to lose on this model (DOMINATED) are left out, so
    that a study's trials go to profiles that can win."""
    working = capabilities.working_attention_backends or ("native",)
    attention = tuple(b for b in working if not (capabilities.device == "cuda" and b in SLOW_REFERENCE_BACKENDS))
    slow_attention = () if exhaustive else _dominated_attention(attention, dict(capabilities.attention_ms or ()))
    # `native` already runs this backend's kernel (SDPA's own choice): forcing it is the same kernel again.
    same_as_native = capabilities.native_attention if (
        not exhaustive and capabilities.native_attention in attention and "native" in attention) else None
    attention = tuple(b for b in attention if b not in slow_attention and b != same_as_native)
    on_gpu = capabilities.device == "cuda"
    can_compile = on_gpu and capabilities.compile_works is not False
    reference = workload.reference_steps
    stride = max(1, reference // 10)
    low = reference - stride * ((reference - max(MIN_STEPS, math.ceil(reference / 2))) // stride)
    full_compile = exhaustive  # every model here is a QwenImageTransformer2DModel, which regional compile serves
    tf32 = on_gpu and (exhaustive or workload.dtype == "float32")
    left_out = [DOMINATED[key] for key, out in (("full", can_compile and not full_compile),
                                                ("max-autotune", can_compile and not exhaustive),
                                                ("coordinate-descent", can_compile and not exhaustive),
                                                ("eager-fp8", capabilities.has_fp8 and can_compile and not exhaustive),
                                                ("tf32", on_gpu and not tf32),
                                                ("complex-rope", can_compile and not exhaustive)) if out]
    if same_as_native:
        left_out.append(f"attention {same_as_native} (the kernel `native` already runs here, measured by "
                        "attention_truth)")
    if slow_attention:
        timed = dict(capabilities.attention_ms or ())
        fastest = min(timed, key=timed.get)
        left_out.append(f"attention {', '.join(f'{b} ({timed[b] / timed[fastest]:.2f}x)' for b in slow_attention)}"
                        f" (more than {ATTENTION_SLACK:.0%} slower than {fastest} at this workload's shapes, "
                        "measured by attention_truth)")
    return SearchSpace(
        attention_backends=attention or ("native",),
        # Inductor on the CPU compiles the tiny model for longer than a whole CPU tune takes, and CPU speed is
        # not what this tool tunes for: compile is searched where it pays, on CUDA.
        compile=(("none", "regional", "full") if full_compile else ("none", "regional")) if can_compile
        else ("none",),
        compile_modes=("default", "max-autotune-no-cudagraphs", "coordinate-descent") if can_compile and exhaustive
        else ("default",),
        quantizations=("none", "fp8_rowwise", "fp8_tensorwise", "fp8_weight_only") if capabilities.has_fp8
        else ("none",),
        quantize_eager=exhaustive or not (capabilities.has_fp8 and can_compile),
        left_out=tuple(left_out),
        caches=("none", "first_block"),
        tf32=(False, True) if tf32 else (False,),
        cfg_batching=(False, True) if workload.does_cfg else (False,),
        # Real RoPE only pays under compile (it lets inductor fuse the rotation); eager it is the same math.
        real_rope=((False, True) if exhaustive else (True,)) if can_compile else (False,),
        steps=(low, reference, stride),
    )


def _dominated_attention(backends: tuple[str, ...], timed_ms: dict[str, float]) -> tuple[str, ...]:
    """The backends measured more than ATTENTION_SLACK slower than the fastest; untimed ones stay."""
    if not timed_ms:
        return ()
    fastest = min(timed_ms.values())
    return tuple(b for b in backends if b != "native" and b in timed_ms
                 and timed_ms[b] > (1 + ATTENTION_SLACK) * fastest)


def default_params(space: SearchSpace) -> dict[str, Any]:
    return {"attention_backend": "native", "compile": "none", "quantization": "none", "cache": "none",
            "tf32": False, "cfg_batching": False, "real_rope": False,
            "steps": space.steps[1]}


def sample_profile(trial, space: SearchSpace, reference_steps: int) -> Profile:
    attention = trial.suggest_categorical("attention_backend", space.attention_backends)
    compile_ = trial.suggest_categorical("compile", space.compile)
    compile_mode = "default"
    if compile_ != "none" and len(space.compile_modes) > 1:
        compile_mode = trial.suggest_categorical("compile_mode", space.compile_modes)
    quantization = "none"
    if compile_ != "none" or space.quantize_eager:
        quantization = trial.suggest_categorical("quantization", space.quantizations)
    # Cache hooks and compile do not mix (Profile.validate): the cache is only sampled for eager profiles.
    cache = trial.suggest_categorical("cache", space.caches) if compile_ == "none" else "none"
    threshold = trial.suggest_float("cache_threshold", *CACHE_THRESHOLD_RANGE) if cache != "none" else None
    tf32 = trial.suggest_categorical("tf32", space.tf32)
    cfg_batching = trial.suggest_categorical("cfg_batching", space.cfg_batching)
    real_rope = False
    if compile_ != "none":
        real_rope = (trial.suggest_categorical("real_rope", space.real_rope) if len(space.real_rope) > 1
                     else space.real_rope[0])
    low, high, stride = space.steps
    steps = trial.suggest_int("steps", low, high, step=stride)
    return Profile(attention_backend=attention, compile=compile_, compile_mode=compile_mode,
                   quantization=quantization, cache=cache, cache_threshold=threshold, tf32=tf32,
                   cfg_batching=cfg_batching, real_rope=real_rope,
                   steps=None if steps == reference_steps else steps).validate()


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
    exhaustive: bool = False  # search the choices measured to lose too (DOMINATED)
    gpus: int = 1  # more than 1: measure the best profile under each multi-GPU strategy (qwendoctor.strategies)

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


def read_prompts(path: str | None, count: int) -> list[str]:
    if path is None:
        from importlib import resources

        text = resources.files("qwendoctor").joinpath("prompts.txt").read_text()
    else:
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as error:
            raise UsageError(f"--prompts {path}: {error.strerror or error}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not prompts:
        raise UsageError(f"--prompts {path}: no prompts in the file")
    return prompts[:count] if path is None else prompts


def study_name(options: TuneOptions, here: dict[str, Any]) -> str:
    """Same workload, prompts, floor and setup -> same study, so rerunning the command resumes it."""
    key = {
        "workload": options.workload.to_dict(),
        "prompts": options.prompts,
        "seeds": options.seeds,
        "floor": dataclasses.asdict(options.floor),
        "setup": {k: here.get(k) for k in fingerprint.MATCHED_FIELDS},
    }
    if options.exhaustive:  # another search space: another study
        key["exhaustive"] = True
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return f"qwendoctor-{options.workload.model.replace('/', '_')}-{digest}"


def _cache_dir(options: TuneOptions) -> str:
    return options.cache_dir or os.environ.get("QWENDOCTOR_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "qwendoctor")


@contextlib.contextmanager
def _exclusive(path: str, log: Callable[[str], None], waiting: str):
    """An flock on `path`: workers on one host take turns. (Across hosts each has its own cache.)"""
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(waiting)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def reference(options: TuneOptions, pool: ModelPool, name: str, log: Callable[[str], None]):
    """The default profile's images, timing and model revision, rendered once per study and kept on disk.

    Workers starting together on one host render it once: the others wait on the lock, then read the cache."""
    import numpy as np

    path = os.path.join(_cache_dir(options), f"reference-{name}.npz")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with _exclusive(path + ".lock", log, "reference renders: waiting for another worker rendering them"):
        if os.path.exists(path):
            with np.load(path) as stored:
                summary = json.loads(str(stored["summary"]))
                log(f"reference renders: {path} (cached)")
                revision = str(stored["revision"]) or None
                return [stored[f"image{i}"] for i in range(int(stored["count"]))], summary, revision
        log(f"reference renders: {len(options.prompts) * len(options.seeds)} images with the default profile")
        model = pool.prepare(Profile()).model
        measurement = runner.measure(model, options.workload, Profile(), options.prompts, options.seeds)
        summary, revision = measurement.summary(), model.revision
        # A unique temporary name: a host sharing this cache directory over NFS may be writing it too.
        descriptor, temporary = tempfile.mkstemp(prefix=".reference-", suffix=".npz", dir=os.path.dirname(path))
        try:
            with os.fdopen(descriptor, "wb") as handle:
                np.savez_compressed(handle, count=len(measurement.images), summary=json.dumps(summary),
                                    revision=revision or "",
                                    **{f"image{i}": image for i, image in enumerate(measurement.images)})
            os.replace(temporary, path)
        except BaseException:
            if os.path.exists(temporary):
                os.unlink(temporary)
            raise
        return measurement.images, summary, revision


def _release_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def classify_failure(error: BaseException) -> str:
    """A one-line reason recorded on a failed trial."""
    import torch

    first_line = (str(error).strip().splitlines() or [""])[0][:300]
    if isinstance(error, torch.OutOfMemoryError):
        return f"out of memory: {first_line}"
    if isinstance(error, UnavailableLever):
        return f"unavailable: {first_line}"
    module = type(error).__module__ or ""
    if "_dynamo" in module or "_inductor" in module:
        return f"compile failed: {type(error).__name__}: {first_line}"
    return f"{type(error).__name__}: {first_line}"


class TrialFailed(Exception):
    """Raised from the objective so Optuna records the trial as FAIL; the reason is in user_attrs."""


# A trial's claim on the profile it sampled (user attr "claim"; see _claim).
DECIDING, MEASURE, WAIT = "deciding", "measure", "wait"


def _states():
    import optuna

    return optuna.trial.TrialState


def _finished(study) -> list:
    """Trials that count towards --trials: complete, skipped as slower than the best, or failed with a reason.
    A trial whose worker stopped does
    not count (Ctrl-C: INTERRUPTED; killed: failed by a heartbeat check, with no reason): it is queued again."""
    states = _states()
    return [t for t in study.get_trials(deepcopy=False, states=(states.COMPLETE, states.FAIL, states.PRUNED))
            if t.state == states.COMPLETE or t.user_attrs.get("skipped")
            or (t.state == states.FAIL and t.user_attrs.get("failure") not in (None, INTERRUPTED))]


def _requeue(study, number: int, params: dict[str, Any]) -> None:
    """Queue a stopped trial's parameters again. Only the worker that stopped it, or that won the race to mark it
    failed, does this, so it happens once."""
    if params:
        study.enqueue_trial(params, user_attrs={"retry_of": number})


def _fail_stale(study) -> None:
    """Optuna's heartbeat check: trials of dead workers are failed and queued again (storage.RetryDeadWorkerTrial).
    study.optimize runs it before each trial; waits run it too, so a dead rival cannot hold a worker up for ever."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _recover(study, storage) -> int:
    """Fail the trials that lost their worker and queue them again; leave live workers' trials alone.

    A dead worker's trial has a heartbeat older than the grace period (Optuna's check), or none at all: its worker
    died between creating it and its first beat, or was a qwendoctor without heartbeats. Returns how many trials
    wait in the queue as retries.
    """
    import optuna

    states = _states()
    _fail_stale(study)
    study_id = storage.get_study_id_from_name(study.study_name)
    orphans = storage.trials_without_heartbeat(study_id)
    if orphans:
        time.sleep(ORPHAN_AFTER_S)
        orphans = sorted(set(orphans) & set(storage.trials_without_heartbeat(study_id)))
    for trial_id in orphans:
        trial = study._storage.get_trial(trial_id)
        try:
            study._storage.set_trial_user_attr(trial_id, "failure", INTERRUPTED)
            study._storage.set_trial_state_values(trial_id, state=states.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker failed it first, and queued it
        _requeue(study, trial.number, trial.params)
    return sum("failed_trial" in t.system_attrs or "retry_of" in t.user_attrs
               for t in study.get_trials(deepcopy=False, states=(states.WAITING,)))


def _same_profile_trial(study, profile: Profile, current_number: int):
    """A finished trial of the same profile whose result stands: complete, or skipped as slower than the best
    (the best only gets faster)."""
    states = _states()
    for trial in study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED)):
        if (trial.number != current_number and trial.user_attrs.get("profile") == profile.to_dict()
                and (trial.state == states.COMPLETE or trial.user_attrs.get("skipped"))):
            return trial
    return None


def _rivals(study, key: dict[str, Any], number: int) -> list:
    """Other running trials that sampled the same profile."""
    return [t for t in study.get_trials(deepcopy=False, states=(_states().RUNNING,))
            if t.number != number and t.user_attrs.get("profile") == key]


def _pause(study) -> None:
    _fail_stale(study)
    time.sleep(POLL_S)


def _decision_of(study, rival) -> str | None:
    """A rival's claim once it has decided; None if it stopped running first."""
    while True:
        current = study._storage.get_trial(rival._trial_id)
        if current.state != _states().RUNNING:
            return None
        if current.user_attrs.get("claim") in (MEASURE, WAIT):
            return current.user_attrs["claim"]
        _pause(study)


def _lowest_decides(study, higher_rivals) -> str | None:
    """The decision of the lowest-numbered trial of a profile: wait if a higher one already measures, else
    measure; None if a rival stopped running meanwhile."""
    for rival in higher_rivals:
        claim = _decision_of(study, rival)
        if claim is None:
            return None
        if claim == MEASURE:
            return WAIT
    return MEASURE


def _claim(study, trial, profile: Profile):
    """Measure this trial's profile, or reuse another trial's measurement of it: two live workers never measure
    the same profile at once (TPE proposes the same profile to workers asking at the same moment).

    Each trial publishes its profile, then its decision. A trial that sees a lower-numbered rival waits. The lowest
    waits for the higher rivals' decisions and measures unless one of them already does (it looked before the
    lower one had published its profile). A decision only waits for higher-numbered trials' decisions, so none
    waits for ever. A waiting trial reuses the measurement once it is complete, or decides again if the measuring
    trial failed or its worker died. Returns the complete trial to reuse, or None to measure.
    """
    key = profile.to_dict()
    while True:
        done = _same_profile_trial(study, profile, trial.number)
        if done is not None:
            return done
        rivals = sorted(_rivals(study, key, trial.number), key=lambda t: t.number)
        decision = WAIT if any(r.number < trial.number for r in rivals) else _lowest_decides(study, rivals)
        if decision is None:
            continue  # a rival finished while this trial waited for its decision: its result may be reusable
        trial.set_user_attr("claim", decision)
        if decision == MEASURE:
            return None
        while any(r.user_attrs.get("claim") != WAIT for r in _rivals(study, key, trial.number)):
            _pause(study)
        trial.set_user_attr("claim", DECIDING)


def _stall_for_tests(number: int) -> None:
    """The STALL_ENV fault injection; nothing unless a test sets the variable."""
    path = os.environ.get(STALL_ENV)
    if not path or os.path.exists(path):
        return
    with open(path + ".tmp", "w") as handle:
        handle.write(str(number))
    os.replace(path + ".tmp", path)
    while True:
        time.sleep(3600)


def _drain(study, storage, run_queued: Callable[[], None], deadline: float | None,
           log: Callable[[str], None]) -> None:
    """Once the study has its trials: run what is queued (retries of trials whose worker died) and wait for the
    other workers' running trials to finish or be found dead, so that every worker writes the lock of the
    finished study and no trial is left behind."""
    states = _states()
    told = False
    while deadline is None or time.monotonic() < deadline:
        _recover(study, storage)
        if study.get_trials(deepcopy=False, states=(states.WAITING,)):
            run_queued()
            continue
        running = study.get_trials(deepcopy=False, states=(states.RUNNING,))
        if not running:
            return
        if not told:
            log(f"waiting for {len(running)} trial(s) of other workers: {', '.join(f'#{t.number}' for t in running)}")
            told = True
        time.sleep(POLL_S)


RESULT_ATTRS = ("latency_median_s", "latency_p90_s", "step_ms", "warmup_s", "peak_memory_gib",
                "psnr_db", "psnr_db_min", "ssim", "ssim_min", "estimate_s", "skipped", "time_s", "model", "compile")
# A trial renders full images only if its estimated seconds per image could beat the best feasible trial's
# measured ones. The estimate comes from a few timed steps, which vary by about 1% run to run on an H100: a
# profile within this margin of the best is rendered, so noise does not discard a winner.
CANDIDATE_MARGIN = 0.03
# Where the study's time goes (a trial's user attr "time_s"), in the order the report lists them.
TIME_PARTS = ("build", "warmup", "speed", "render", "quality")


def _best_feasible_s(study) -> float:
    best = math.inf
    for trial in study.get_trials(deepcopy=False, states=(_states().COMPLETE,)):
        if all(v <= 0 for v in trial.constraints.values()) and trial.value is not None:
            best = min(best, trial.value)
    return best


# A cache skips steps depending on how the whole image develops, so a few timed steps (run without skips) only
# bound it: it is rendered unless even this speed-up over its uncached steps would not win. diffusers' and
# cache-dit's published FirstBlockCache results on FLUX and Qwen-Image stay within 2-2.5x at usable quality.
MAX_CACHE_SPEEDUP = 3.0


def _is_candidate(profile: Profile, estimate_s: float, best_s: float) -> bool:
    bound = estimate_s / MAX_CACHE_SPEEDUP if profile.cache != "none" else estimate_s
    return bound <= best_s * (1 + CANDIDATE_MARGIN)


def run_tune(options: TuneOptions, capabilities: Capabilities | None = None,
             log: Callable[[str], None] = lambda message: None,
             on_trial: Callable[[dict[str, Any], int, int], None] | None = None) -> TuneResult:
    """Run (or resume, or join) the study, write the lock, and return the rows for the report."""
    import optuna

    from qwendoctor import storage as storages

    options.validate()
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
    space = build_search_space(capabilities, options.workload, options.exhaustive)
    for line in space.describe():
        log(f"search space: {line}")
    pool = ModelPool(options.workload, capabilities)

    # The study key leaves the model revision out: it is only known once the model is built.
    name = study_name(options, fingerprint.machine_fingerprint(options.workload.model, None))

    started = time.perf_counter()
    reference_images, reference_summary, revision = reference(options, pool, name, log)
    spent["reference"] = time.perf_counter() - started
    reference_steps = options.workload.reference_steps
    # What an image costs besides its denoising steps (latents, VAE decode, text encoding): the reference's
    # measured seconds per image less its steps. A trial's estimate is its timed step times its steps plus this.
    overhead_s = max(0.0, reference_summary["latency_median_s"]
                     - reference_steps * reference_summary["step_ms"] / 1000)

    # Workers sharing a study must not share a seed, or they propose the same profiles in lockstep; the constant
    # liar steers TPE away from the profiles other workers are running.
    shared = storages.is_shared(options.storage)
    sampler = optuna.samplers.TPESampler(seed=None if shared else 0, constant_liar=shared, n_startup_trials=5,
                                         multivariate=True, group=True)
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="minimize",
                                    sampler=sampler, load_if_exists=True)
    except Exception as error:  # the database went away, or holds something else
        raise UsageError(f"--storage {shown}: {(str(error).splitlines() or [type(error).__name__])[0]}") from None
    recovered = _recover(study, storage)
    if recovered:
        log(f"resuming: {recovered} trial(s) of stopped workers queued again")
    if not study.trials:
        study.enqueue_trial(default_params(space), skip_if_exists=True)
    done = len(_finished(study))
    remaining = options.trials - done
    log(f"study {name} in {shown}: {done} trial(s) done, {max(remaining, 0)} to run")
    worker = f"{socket.gethostname()}:{os.getpid()}"

    def measure(trial) -> float:
        queued = study._storage.get_trial(trial._trial_id).system_attrs
        if "fixed_params" not in queued and "failed_trial" not in queued and len(_finished(study)) >= options.trials:
            # Other workers finished the study while this one asked for a trial; a queued retry still runs.
            study.stop()
            raise optuna.TrialPruned("the study already has its trials")
        profile = sample_profile(trial, space, options.workload.reference_steps)
        trial.set_user_attr("worker", worker)
        # Undecided before the profile is published: a rival that sees the profile waits for this trial's decision.
        trial.set_user_attr("claim", DECIDING)
        trial.set_user_attr("profile", profile.to_dict())
        trial.set_user_attr("describe", profile.describe())
        if profile == Profile():
            duplicate = _same_profile_trial(study, profile, trial.number)
        else:
            duplicate = _claim(study, trial, profile)
        if duplicate is not None:
            # TPE proposes a profile it already measured: reuse the measurement instead of paying again.
            results = {k: duplicate.user_attrs[k] for k in RESULT_ATTRS if k in duplicate.user_attrs}
            trial.set_user_attr("duplicate_of", duplicate.number)
            results.pop("time_s", None)  # nothing was spent on this one
            results.pop("compile", None)
            if duplicate.state == optuna.trial.TrialState.PRUNED:
                return _skip(trial, results)
        elif profile == Profile():
            results = {**reference_summary, "psnr_db": math.inf, "psnr_db_min": math.inf, "ssim": 1.0,
                       "ssim_min": 1.0}
        else:
            _stall_for_tests(trial.number)
            results = evaluate(trial, profile)
        for key, value in results.items():
            trial.set_user_attr(key, value)
        for key, value in zip(("psnr", "ssim"), options.floor.violations(results["psnr_db"], results["ssim"])):
            trial.set_constraint(key, value)
        return results["latency_median_s"]

    def evaluate(trial, profile: Profile) -> dict[str, Any]:
        """Time a few steps; if the estimate could win, render the full images and compare them."""
        times = {}
        compiled_before = compile_stats.snapshot()
        try:
            prepared = pool.prepare(profile)
            times["build"] = prepared.seconds
            model = prepared.model
            speed = runner.time_steps(model, options.workload, profile, options.prompts[0], options.seeds[0],
                                      options.timed_steps)
            times["warmup"] = speed.warmup_s
            times["speed"] = sum(speed.step_s)
            step_s = speed.step_median_s
            estimate_s = step_s * (profile.steps or reference_steps) + overhead_s
            results = {"step_ms": 1000 * step_s, "warmup_s": speed.warmup_s, "estimate_s": estimate_s,
                       "model": prepared.how, "time_s": times}
            compiled = compile_stats.since(compiled_before)
            if compiled:
                # Why a warm-up took minutes: one graph per block would mean every block recompiled.
                results["compile"] = compiled
                log(f"trial #{trial.number}: {compile_stats.describe(compiled)}")
            if speed.peak_memory_gib is not None:
                results["peak_memory_gib"] = speed.peak_memory_gib
            best_s = _best_feasible_s(study)
            if not _is_candidate(profile, estimate_s, best_s):
                results["skipped"] = (f"slower than the best so far: estimated {estimate_s:.3g} s per image "
                                      f"against {best_s:.3g} s; not rendered")
                return _skip(trial, results)
            started = time.perf_counter()
            measurement = runner.measure(model, options.workload, profile, options.prompts, options.seeds,
                                         warmup=0)
            times["render"] = time.perf_counter() - started
        except optuna.TrialPruned:
            raise
        except Exception as error:
            pool.forget()
            _release_memory()
            reason = classify_failure(error)
            trial.set_user_attr("failure", reason)
            trial.set_user_attr("time_s", times)
            raise TrialFailed(reason) from error
        started = time.perf_counter()
        fidelity = quality.compare(measurement.images, reference_images)
        times["quality"] = time.perf_counter() - started
        # The full renders replace the estimate: the lock records measured seconds per image.
        return {**results, **measurement.summary(), "warmup_s": speed.warmup_s, **fidelity}

    def objective(trial) -> float:
        try:
            return measure(trial)
        except KeyboardInterrupt:
            # Queued again now, so that another worker (or the next run) picks it up.
            trial.set_user_attr("failure", INTERRUPTED)
            _requeue(study, trial.number, trial.params)
            raise

    def after_trial(study, frozen) -> None:
        states = optuna.trial.TrialState
        if frozen.state not in (states.COMPLETE, states.FAIL, states.PRUNED) or (
                frozen.state == states.PRUNED and not frozen.user_attrs.get("skipped")):
            return
        done = len(_finished(study))
        if on_trial is not None:
            on_trial(_row(frozen), done, options.trials)
        if done >= options.trials:
            study.stop()  # other workers finished trials meanwhile: the study is complete

    def optimize(n_trials: int, timeout: float | None) -> None:
        study.optimize(objective, n_trials=n_trials, timeout=timeout, catch=(TrialFailed,),
                       callbacks=[after_trial], gc_after_trial=False, show_progress_bar=False)

    started = time.perf_counter()
    deadline = None if options.timeout_s is None else time.monotonic() + options.timeout_s
    if remaining > 0:
        optimize(remaining, options.timeout_s)
    if len(_finished(study)) >= options.trials:
        _drain(study, storage, lambda: optimize(1, None), deadline, log)
    spent["trials"] = time.perf_counter() - started

    rows = [_row(t) for t in _finished(study)]
    counts = {
        "trials": len(rows),
        "completed": sum(r["state"] == "complete" for r in rows),
        "failed": sum(r["state"] == "failed" for r in rows),
        "infeasible": sum(r["state"] == "infeasible" for r in rows),
        "slower": sum(r["state"] == "slower" for r in rows),
    }
    # What the study's trials (of every run and worker) spent their time on; `spent` above is this run's wall.
    study_time = {part: sum((r.get("time_s") or {}).get(part, 0.0) for r in rows) for part in TIME_PARTS}
    try:
        best = study.best_trial
    except ValueError:
        raise QwendoctorError(f"no trial met the quality floor {options.floor.name} "
                              f"(PSNR >= {options.floor.psnr_db:g} dB, SSIM >= {options.floor.ssim:g}) "
                              f"in {counts['trials']} trials; lower --floor or raise --trials") from None

    measured = {k: best.user_attrs[k] for k in RESULT_ATTRS if k in best.user_attrs and k in lockfile.MEASURED_FIELDS}
    baseline = {k: reference_summary[k] for k in RESULT_ATTRS if k in reference_summary}
    measured["speedup"] = baseline["latency_median_s"] / measured["latency_median_s"]
    lock = lockfile.Lock(
        fingerprint=fingerprint.machine_fingerprint(options.workload.model, revision),
        workload=options.workload,
        profile=Profile.from_dict(best.user_attrs["profile"]),
        measured=measured,
        baseline=baseline,
        study={"name": name, "storage": shown, "trials": counts["trials"],
               "completed": counts["completed"], "failed": counts["failed"], "infeasible": counts["infeasible"],
               "slower": counts["slower"],
               "best_trial": best.number, "floor": options.floor.name, "floor_psnr_db": options.floor.psnr_db,
               "floor_ssim": options.floor.ssim},
    )
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
    return TuneResult(lock=lock, trials=rows, counts=counts, time_spent_s=spent, plot_path=plot,
                      trial_time_s=study_time, strategy_rows=strategy_rows)


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
        measured["speedup"] = lock.baseline["latency_median_s"] / measured["latency_median_s"]
        lock.measured = measured
    return [row.to_dict() for row in rows]


def _skip(trial, results: dict[str, Any]):
    """Record a trial that could not win as pruned: TPE ranks it by its estimate, after the measured ones."""
    import optuna

    for key, value in results.items():
        trial.set_user_attr(key, value)
    trial.report(results["estimate_s"], 0)
    raise optuna.TrialPruned(results["skipped"])


def _row(trial) -> dict[str, Any]:
    import optuna

    attrs = trial.user_attrs
    if trial.state == optuna.trial.TrialState.FAIL:
        state = "failed"
    elif trial.state == optuna.trial.TrialState.PRUNED:
        state = "slower"
    elif trial.constraints and any(v > 0 for v in trial.constraints.values()):
        state = "infeasible"
    else:
        state = "complete"
    return {"number": trial.number, "state": state, "profile": attrs.get("describe", ""),
            "failure": attrs.get("failure"), **{k: attrs[k] for k in RESULT_ATTRS if k in attrs}}


PROBED_FOR_THE_SPACE = ("attention_backends", "fp8", "compile", "attention_truth")


def probe_capabilities(log: Callable[[str], None] = lambda message: None, workload: Workload | None = None,
                       run_probes: Callable | None = None) -> Capabilities:
    """What this machine can run, from the doctor's probes: the search space is built from their findings.

    attention_truth runs as in `check --bench`, at the workload's image size: only then does it time flex
    attention (a compile of ~10 s), and an untimed backend cannot be left out. A study that searched flex
    untimed spent trials on it at 6.3 s a step eager and 11% slower than native compiled (H100, W1)."""
    from probes.context import ProbeContext
    from probes.context import Workload as ProbeWorkload

    if run_probes is None:
        from qwendoctor.doctor import run_probes

    device = runner.detect_capabilities()
    ids = PROBED_FOR_THE_SPACE if device.device == "cuda" else PROBED_FOR_THE_SPACE[:1]  # the rest need a GPU
    shapes = ProbeWorkload() if workload is None else ProbeWorkload(width=workload.width, height=workload.height)
    return capabilities_from_findings(device, run_probes(list(ids), ctx=ProbeContext(workload=shapes, bench=True)),
                                      log)


def capabilities_from_findings(device: Capabilities, findings, log: Callable[[str], None] = lambda m: None
                               ) -> Capabilities:
    """Narrow what the device could run to what the probes saw work: a lever whose probe failed or crashed
    would only fill the study with failed trials."""
    by_id = {finding.id: finding for finding in findings}
    working = None
    backends = by_id.get("attention_backends")
    if backends is not None:
        if backends.status in ("ok", "warn") and backends.measured.get("working"):
            working = tuple(backends.measured["working"])
        else:
            log(f"search space: attention probe {backends.status} ({backends.summary}); searching native only")
            working = ("native",)
    has_fp8, compile_works = device.has_torchao, device.compile_works
    fp8 = by_id.get("fp8")
    if fp8 is not None:
        has_fp8 = device.has_torchao and fp8.status == "ok"
        if device.has_fp8 and not has_fp8:
            log(f"search space: FP8 left out: fp8 probe {fp8.status}: {fp8.summary}")
    compile_probe = by_id.get("compile")
    if compile_probe is not None:
        compile_works = compile_probe.status in ("ok", "warn")
        if not compile_works:
            log(f"search space: compile left out: compile probe {compile_probe.status}: {compile_probe.summary}")
    attention_ms, native_attention = device.attention_ms, device.native_attention
    truth = by_id.get("attention_truth")
    if truth is not None and truth.status in ("ok", "warn") and truth.measured.get("ms"):
        attention_ms = tuple(sorted((TRUTH_TO_BACKEND[k], float(v)) for k, v in truth.measured["ms"].items()
                                    if k in TRUTH_TO_BACKEND))
        native_attention = NATIVE_PICKS.get(truth.measured.get("native_picks"))
    return dataclasses.replace(device, has_torchao=has_fp8, working_attention_backends=working,
                               compile_works=compile_works, attention_ms=attention_ms,
                               native_attention=native_attention)
