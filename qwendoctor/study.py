"""The study's coordination over Optuna: the only module that touches Optuna's trials and storage directly.

Several workers (processes, GPUs, hosts) can share one study (qwendoctor.storage has the URLs and heartbeats).
Here: which trials count towards --trials (`finished`), how a stopped trial is queued again (`requeue`,
`recover`), how two workers never measure the same profile at once (`claim`), how the study finishes with every
trial accounted for (`drain`), and how a trial is recorded (`skip`, `row`). qwendoctor.tune runs the study.
"""

from __future__ import annotations

import math
import os
import socket
import time
import warnings
from typing import Any, Callable

from qwendoctor import files

INTERRUPTED = "interrupted: the worker stopped during this trial"
# How often a worker looks at the shared study while it waits for another worker (a rival's claim, the last trials).
POLL_S = 0.5
# A running trial gets its first heartbeat within milliseconds of being created (storage._HeartbeatFromTheStart):
# one still without any after this long has lost its worker.
ORPHAN_AFTER_S = 1.0
# Test-only fault injection (tests/test_distributed_tune.py): a worker started with this variable set to a path
# writes the number of the first trial it is about to measure there and hangs, so the test can kill it mid-trial.
STALL_ENV = "QWENDOCTOR_TEST_STALL_FILE"
# A trial's claim on the profile it sampled (user attr "claim"; see `claim`).
DECIDING, MEASURE, WAIT = "deciding", "measure", "wait"
# A trial's results, kept as user attrs.
RESULT_ATTRS = ("latency_median_s", "latency_p90_s", "step_ms", "warmup_s", "peak_memory_gib",
                "psnr_db", "psnr_db_min", "ssim", "ssim_min", "lpips", "lpips_max", "cached_fraction", "estimate_s", "skipped", "time_s", "model", "compile")


class TrialFailed(Exception):
    """Raised from the objective so Optuna records the trial as FAIL; the reason is in user_attrs."""


def _states():
    import optuna

    return optuna.trial.TrialState


def finished(study) -> list:
    """Trials that count towards --trials: complete, skipped as slower than the best, or failed with a reason.
    A trial whose worker stopped does not count (Ctrl-C: INTERRUPTED; killed: failed by a heartbeat check, with
    no reason): it is queued again. Nor does a proposal of a profile the study had already measured: it reused
    that measurement (`duplicate_of`), so it cost nothing and measured nothing new."""
    states = _states()
    return [t for t in study.get_trials(deepcopy=False, states=(states.COMPLETE, states.FAIL, states.PRUNED))
            if "duplicate_of" not in t.user_attrs and (
                t.state == states.COMPLETE or t.user_attrs.get("skipped")
                or (t.state == states.FAIL and t.user_attrs.get("failure") not in (None, INTERRUPTED)))]


def duplicates(study) -> int:
    """Proposals of a profile the study had already measured."""
    return sum("duplicate_of" in t.user_attrs for t in study.get_trials(deepcopy=False))


def is_queued(study, trial) -> bool:
    """A trial Optuna took from the queue (the default profile, or a retry of a stopped trial), not one its sampler
    proposed."""
    queued = study._storage.get_trial(trial._trial_id).system_attrs
    return "fixed_params" in queued or "failed_trial" in queued


def requeue(study, number: int, params: dict[str, Any]) -> None:
    """Queue a stopped trial's parameters again. Only the worker that stopped it, or that won the race to mark it
    failed, does this, so it happens once."""
    if params:
        study.enqueue_trial(params, user_attrs={"retry_of": number})


def fail_stale(study) -> None:
    """Optuna's heartbeat check: trials of dead workers are failed and queued again (storage.RetryDeadWorkerTrial).
    study.optimize runs it before each trial; waits run it too, so a dead rival cannot hold a worker up for ever."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def recover(study, storage, one_host: bool = False) -> int:
    """Fail the trials that lost their worker and queue them again; leave live workers' trials alone.

    A dead worker's trial has a heartbeat older than the grace period (Optuna's check), or none at all: its worker
    died between creating it and its first beat, or was a qwendoctor without heartbeats. On a storage only this
    host uses (`one_host`: SQLite), a trial whose worker process is gone is dead at once: a rerun after `kill -9`
    queues it before counting what is left to run, instead of finding it stale after the study's other trials and
    running one trial more than it announced. Returns how many trials wait in the queue as retries.
    """
    import optuna

    states = _states()
    fail_stale(study)
    study_id = storage.get_study_id_from_name(study.study_name)
    orphans = storage.trials_without_heartbeat(study_id)
    if orphans:
        time.sleep(ORPHAN_AFTER_S)
        orphans = sorted(set(orphans) & set(storage.trials_without_heartbeat(study_id)))
    if one_host:
        running = study.get_trials(deepcopy=False, states=(states.RUNNING,))
        orphans = sorted(set(orphans) | {t._trial_id for t in running if worker_is_gone(t)})
    for trial_id in orphans:
        trial = study._storage.get_trial(trial_id)
        try:
            study._storage.set_trial_user_attr(trial_id, "failure", INTERRUPTED)
            study._storage.set_trial_state_values(trial_id, state=states.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker failed it first, and queued it
        requeue(study, trial.number, trial.params)
    return sum("failed_trial" in t.system_attrs or "retry_of" in t.user_attrs
               for t in study.get_trials(deepcopy=False, states=(states.WAITING,)))


def worker_is_gone(trial) -> bool:
    """Whether the trial's worker ("host:pid", set once its profile is drawn) was a process of this host that
    no longer runs. A pid taken since by a process started after the trial is not its worker."""
    import psutil

    host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        started = psutil.Process(int(pid)).create_time()
    except psutil.NoSuchProcess:
        return True
    return trial.datetime_start is not None and started > trial.datetime_start.timestamp() + 1


def same_profile_trial(study, profile_dict: dict[str, Any], current_number: int):
    """A finished trial of the same profile whose result stands: complete, or skipped as slower than the best
    (the best only gets faster)."""
    states = _states()
    for trial in study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED)):
        if (trial.number != current_number and trial.user_attrs.get("profile") == profile_dict
                and (trial.state == states.COMPLETE or trial.user_attrs.get("skipped"))):
            return trial
    return None


def _rivals(study, key: dict[str, Any], number: int) -> list:
    """Other running trials that sampled the same profile."""
    return [t for t in study.get_trials(deepcopy=False, states=(_states().RUNNING,))
            if t.number != number and t.user_attrs.get("profile") == key]


def _pause(study) -> None:
    fail_stale(study)
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
        decision = _decision_of(study, rival)
        if decision is None:
            return None
        if decision == MEASURE:
            return WAIT
    return MEASURE


def claim(study, trial, profile_dict: dict[str, Any]):
    """Measure this trial's profile, or reuse another trial's measurement of it: two live workers never measure
    the same profile at once (TPE proposes the same profile to workers asking at the same moment).

    Each trial publishes its profile, then its decision. A trial that sees a lower-numbered rival waits. The lowest
    waits for the higher rivals' decisions and measures unless one of them already does (it looked before the
    lower one had published its profile). A decision only waits for higher-numbered trials' decisions, so none
    waits for ever. A waiting trial reuses the measurement once it is complete, or decides again if the measuring
    trial failed or its worker died. Returns the complete trial to reuse, or None to measure.
    """
    while True:
        done = same_profile_trial(study, profile_dict, trial.number)
        if done is not None:
            return done
        rivals = sorted(_rivals(study, profile_dict, trial.number), key=lambda t: t.number)
        decision = WAIT if any(r.number < trial.number for r in rivals) else _lowest_decides(study, rivals)
        if decision is None:
            continue  # a rival finished while this trial waited for its decision: its result may be reusable
        trial.set_user_attr("claim", decision)
        if decision == MEASURE:
            return None
        while any(r.user_attrs.get("claim") != WAIT for r in _rivals(study, profile_dict, trial.number)):
            _pause(study)
        trial.set_user_attr("claim", DECIDING)


def stall_for_tests(number: int) -> None:
    """The STALL_ENV fault injection; nothing unless a test sets the variable."""
    path = os.environ.get(STALL_ENV)
    if not path or os.path.exists(path):
        return
    files.write_text_atomic(path, str(number))
    while True:
        time.sleep(3600)


def drain(study, storage, run_queued: Callable[[], None], deadline: float | None,
          log: Callable[[str], None], one_host: bool = False) -> None:
    """Once the study has its trials: run what is queued (retries of trials whose worker died) and wait for the
    other workers' running trials to finish or be found dead, so that every worker writes the lock of the
    finished study and no trial is left behind."""
    states = _states()
    told = False
    while deadline is None or time.monotonic() < deadline:
        recover(study, storage, one_host)
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


def best_feasible_s(study) -> float:
    best = best_feasible(study)
    return math.inf if best is None else best.value


def best_feasible(study, where: Callable[[Any], bool] = lambda trial: True):
    """The fastest complete trial within the floor for which `where` holds; None if there is none."""
    feasible = [t for t in study.get_trials(deepcopy=False, states=(_states().COMPLETE,))
                if all(v <= 0 for v in t.constraints.values()) and t.value is not None and where(t)]
    return min(feasible, key=lambda t: t.value, default=None)


def skip(trial, results: dict[str, Any]):
    """Record a trial that could not win as pruned: TPE ranks it by its estimate, after the measured ones."""
    import optuna

    for key, value in results.items():
        trial.set_user_attr(key, value)
    trial.report(results["estimate_s"], 0)
    raise optuna.TrialPruned(results["skipped"])


OUT_OF_MEMORY = "out of memory"  # the start of runner.classify_failure's reason for torch.OutOfMemoryError


def row(trial) -> dict[str, Any]:
    """One finished trial as the report and the plot show it."""
    states = _states()
    attrs = trial.user_attrs
    if trial.state == states.FAIL and str(trial.user_attrs.get("failure", "")).startswith(OUT_OF_MEMORY):
        state = "infeasible"  # it ran, and needs more memory than the process may use: a measured verdict
    elif trial.state == states.FAIL:
        state = "failed"
    elif trial.state == states.PRUNED:
        state = "slower"
    elif trial.constraints and any(v > 0 for v in trial.constraints.values()):
        state = "infeasible"
    else:
        state = "complete"
    return {"number": trial.number, "state": state, "profile": attrs.get("describe", ""),
            "failure": attrs.get("failure"), **{k: attrs[k] for k in RESULT_ATTRS if k in attrs}}
