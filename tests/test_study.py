"""qwendoctor.study on its own: which trials count, how they read, and what is queued, on an in-memory study."""

import math

import optuna
import pytest

from qwendoctor import study as coordination

DISTRIBUTIONS = {"x": optuna.distributions.IntDistribution(0, 9)}


@pytest.fixture
def optuna_study():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(direction="minimize")


def _finish(optuna_study, state, value=None, constraints=(), **attrs):
    trial = optuna_study.ask(DISTRIBUTIONS)
    for key, item in attrs.items():
        trial.set_user_attr(key, item)
    for name, violation in constraints:
        trial.set_constraint(name, violation)
    optuna_study.tell(trial, value if state == optuna.trial.TrialState.COMPLETE else None, state=state)
    return trial.number


def test_finished_counts_what_was_measured_and_not_what_a_stopped_worker_left(optuna_study):
    states = optuna.trial.TrialState
    complete = _finish(optuna_study, states.COMPLETE, 1.0)
    slower = _finish(optuna_study, states.PRUNED, skipped="slower than the best so far")
    failed = _finish(optuna_study, states.FAIL, failure="out of memory: CUDA out of memory")
    _finish(optuna_study, states.FAIL, failure=coordination.INTERRUPTED)  # queued again, counts then
    _finish(optuna_study, states.FAIL)  # failed by a heartbeat check: its worker died
    _finish(optuna_study, states.PRUNED)  # the study already had its trials
    assert [t.number for t in coordination.finished(optuna_study)] == [complete, slower, failed]


def test_rows_name_each_state_and_the_best_ignores_infeasible_trials(optuna_study):
    states = optuna.trial.TrialState
    _finish(optuna_study, states.COMPLETE, 0.5, constraints=[("psnr", 3.0)], describe="steps=2")
    _finish(optuna_study, states.COMPLETE, 2.0, constraints=[("psnr", -1.0)], describe="attn=native",
            latency_median_s=2.0)
    _finish(optuna_study, states.PRUNED, skipped="slower", describe="cfg-batch", estimate_s=3.0)
    _finish(optuna_study, states.FAIL, failure="compile failed: x", describe="compile=regional")
    rows = [coordination.row(t) for t in optuna_study.trials]
    assert [r["state"] for r in rows] == ["infeasible", "complete", "slower", "failed"]
    assert rows[1]["latency_median_s"] == 2.0 and rows[2]["estimate_s"] == 3.0 and "worker" not in rows[0]
    assert rows[3]["failure"] == "compile failed: x" and rows[3]["profile"] == "compile=regional"
    assert coordination.best_feasible_s(optuna_study) == 2.0
    assert math.isinf(coordination.best_feasible_s(optuna.create_study()))


def test_a_queued_trial_is_told_from_a_sampled_one(optuna_study):
    optuna_study.enqueue_trial({"x": 3})
    queued = optuna_study.ask(DISTRIBUTIONS)
    sampled = optuna_study.ask(DISTRIBUTIONS)
    assert coordination.is_queued(optuna_study, queued) and not coordination.is_queued(optuna_study, sampled)


def test_a_finished_measurement_of_the_same_profile_is_found(optuna_study):
    states = optuna.trial.TrialState
    profile = {"attention_backend": "native", "steps": 3}
    measured = _finish(optuna_study, states.COMPLETE, 1.0, profile=profile)
    _finish(optuna_study, states.FAIL, failure="x", profile=profile)  # a failure is not a result to reuse
    assert coordination.same_profile_trial(optuna_study, profile, current_number=99).number == measured
    assert coordination.same_profile_trial(optuna_study, profile, current_number=measured) is None
    assert coordination.same_profile_trial(optuna_study, {"steps": 2}, current_number=99) is None


def test_a_requeued_trial_carries_its_parameters_and_where_it_came_from(optuna_study):
    coordination.requeue(optuna_study, 7, {"x": 4})
    coordination.requeue(optuna_study, 8, {})  # a trial stopped before it drew anything: nothing to queue
    [waiting] = optuna_study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert waiting.user_attrs == {"retry_of": 7} and waiting.system_attrs["fixed_params"] == {"x": 4}
