"""Many workers, one study: storage URLs, heartbeats, the claim on a profile, and real worker processes on the
tiny model sharing a journal file or a PostgreSQL database, one of them killed mid-trial.

The PostgreSQL test needs QWENDOCTOR_TEST_POSTGRES_URL (`.ci/run` starts a throwaway server and sets it);
without it, it skips.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest

from qwendoctor import cli, lockfile, storage
from qwendoctor import study as coordination
from qwendoctor.errors import UsageError
from qwendoctor.profile import Profile

pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
POSTGRES_URL = os.environ.get("QWENDOCTOR_TEST_POSTGRES_URL")
REPO = Path(__file__).resolve().parents[1]
TRIALS = 8
HEARTBEAT_S = 1  # a killed worker's trial is found dead 2 s after its last beat


# ---- URLs and one-line errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("url, message", [
    ("study.db", "--storage study.db: not a storage URL; use sqlite:///PATH, journal:///PATH or postgresql"),
    ("journal://", "--storage journal://: no file"),
    ("journal:///no/such/dir/study.log", "--storage journal:///no/such/dir/study.log: directory /no/such/dir "
                                         "does not exist"),
    ("nosuchdb://host/db", "--storage nosuchdb://host/db: Can't load plugin"),
])
def test_bad_storage_urls_are_one_line_usage_errors(url, message):
    with pytest.raises(UsageError) as error:
        storage.open_storage(url, HEARTBEAT_S)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_a_journal_path_that_is_a_directory_is_refused(tmp_path):
    with pytest.raises(UsageError, match="is a directory"):
        storage.open_storage(f"journal://{tmp_path}", HEARTBEAT_S)


def test_an_unreachable_database_names_storage_and_hides_the_password():
    url = "postgresql+psycopg2://tuner:s3cret@127.0.0.1:1/study"  # nothing listens on port 1
    with pytest.raises(UsageError) as error:
        storage.open_storage(url, HEARTBEAT_S)
    message = str(error.value)
    assert message.startswith("--storage postgresql+psycopg2://tuner:***@127.0.0.1:1/study: ")
    assert "s3cret" not in message and "\n" not in message
    assert storage.describe(url) == "postgresql+psycopg2://tuner:***@127.0.0.1:1/study"


def test_journal_urls_absolute_and_relative(tmp_path, monkeypatch):
    absolute = storage.open_storage(f"journal://{tmp_path}/a.log", HEARTBEAT_S)
    assert isinstance(absolute, storage.HeartbeatJournalStorage) and (tmp_path / "a.log").exists()
    monkeypatch.chdir(tmp_path)
    storage.open_storage("journal://b.log", HEARTBEAT_S)
    assert (tmp_path / "b.log").exists()
    assert storage.is_shared("journal://b.log") and storage.is_shared("postgresql://h/db")
    assert not storage.is_shared("sqlite:///x.db")


@pytest.mark.parametrize("args, message", [
    (["--storage", "study.db"], "qwendoctor: error: --storage study.db: not a storage URL"),
    (["--heartbeat", "0"], "qwendoctor: error: Invalid value for '--heartbeat'"),
])
def test_cli_bad_storage_or_heartbeat_exits_2_with_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as done:
        cli.main(["tune", "--steps", "4", "--num-prompts", "1", "--lock", str(tmp_path / "l.lock"), *args])
    assert done.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith(message) and error.count("\n") == 1


# ---- heartbeats on the journal file -----------------------------------------------------------------------------

def test_journal_heartbeat_fails_a_silent_trial_and_queues_it_once(tmp_path):
    journal = storage.open_storage(f"journal://{tmp_path}/study.log", HEARTBEAT_S)
    study = optuna.create_study(storage=journal, study_name="s")
    trial = study.ask({"x": optuna.distributions.IntDistribution(0, 9)})
    trial.set_user_attr("claim", coordination.MEASURE)
    study_id = journal.get_study_id_from_name("s")
    # The first beat comes with the trial itself, not when the worker gets round to it.
    assert journal.trials_without_heartbeat(study_id) == []
    assert journal._get_stale_trial_ids(study_id) == []

    journal.set_trial_system_attr(trial._trial_id, storage.HEARTBEAT_KEY, time.time() - 3 * HEARTBEAT_S)
    assert journal._get_stale_trial_ids(study_id) == [trial._trial_id]
    for _ in range(2):  # two workers noticing: one failure, one retry
        coordination.fail_stale(study)
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING]
    retry = study.trials[1]
    assert retry.params == trial.params and retry.system_attrs["failed_trial"] == trial.number
    # The retry carries neither the dead run's claim nor its heartbeat (which would make it look dead at once).
    assert retry.user_attrs == {} and storage.HEARTBEAT_KEY not in retry.system_attrs

    popped = study.ask()
    assert popped.number == retry.number and journal.trials_without_heartbeat(study_id) == []


# ---- two workers, one profile -------------------------------------------------------------------------------------

def test_concurrent_trials_with_one_profile_measure_it_once(tmp_path):
    """Three threads, each a trial that sampled the same profile at the same moment, for several rounds: each round
    exactly one measures and the others reuse its numbers, whoever publishes first."""
    # No heartbeat thread beats for trials asked by hand: a long heartbeat keeps them alive for the test.
    journal = storage.open_storage(f"journal://{tmp_path}/study.log", 60)
    study = optuna.create_study(storage=journal, study_name="claims")
    distribution = {"x": optuna.distributions.IntDistribution(0, 9)}
    profile = Profile(attention_backend="_native_math", steps=2)
    measuring, overlaps, outcomes = [], [], []
    lock = threading.Lock()

    def run(trial, start):
        start.wait()
        trial.set_user_attr("claim", coordination.DECIDING)
        trial.set_user_attr("profile", profile.to_dict())
        reused = coordination.claim(study, trial, profile.to_dict())
        if reused is None:
            with lock:
                measuring.append(trial.number)
                overlaps.append(len(measuring) > 1)
            time.sleep(0.3)
            trial.set_user_attr("latency_median_s", 1.0)
            with lock:
                measuring.remove(trial.number)
        outcomes.append((trial.number, None if reused is None else reused.number))
        study.tell(trial, 1.0)

    for _ in range(3):
        start = threading.Barrier(3)
        trials = [study.ask(distribution) for _ in range(3)]
        threads = [threading.Thread(target=run, args=(t, start)) for t in trials]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a claim waited for ever"
    # One measurement in all: the first round's; every other trial reused it, or a trial that had reused it.
    measured = [number for number, reused in outcomes if reused is None]
    assert len(outcomes) == 9 and len(measured) == 1, outcomes
    assert not any(overlaps)


def test_concurrent_lock_writes_never_leave_half_a_file(tmp_path):
    from qwendoctor.profile import Workload

    path = tmp_path / "qwendoctor.lock"
    workload = Workload(model="tiny", width=128, height=128, reference_steps=4, dtype="float32")
    locks = [lockfile.Lock(fingerprint={"device": "cpu", "torch": "2.13.0", "model_id": "tiny", "pad": "x" * 50_000},
                           workload=workload, profile=Profile(steps=steps), measured={"latency_median_s": 0.1,
                                                                                      "step_ms": 5.0})
             for steps in (2, 3)]
    stop = threading.Event()

    def write(lock):
        while not stop.is_set():
            lockfile.write_lock(path, lock)

    writers = [threading.Thread(target=write, args=(lock,)) for lock in locks]
    for writer in writers:
        writer.start()
    try:
        seen = set()
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            if path.exists():
                seen.add(lockfile.read_lock(path).profile.steps)  # raises on a torn file
    finally:
        stop.set()
        for writer in writers:
            writer.join()
    assert seen <= {2, 3} and seen
    assert not [p for p in tmp_path.iterdir() if p.name != "qwendoctor.lock"], "temporary files left behind"


# ---- real worker processes ----------------------------------------------------------------------------------------

def _start_worker(tmp_path: Path, name: str, url: str, **env) -> subprocess.Popen:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"),
                   "QWENDOCTOR_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), **env}
    # tiny as if it drew (tests/test_tune.py, drawing_tiny): the workers need more profiles than its lossless
    # levers offer, to share a study of TRIALS distinct ones.
    command = [sys.executable, "-c", "from qwendoctor import models; models.RANDOM_WEIGHTS = ('synthetic',); "
               "from qwendoctor.cli import main; main()", "tune", "--model", "tiny",
               "--steps", "4", "--num-prompts", "1", "--trials", str(TRIALS), "--storage", url,
               "--heartbeat", str(HEARTBEAT_S), "--lock", str(tmp_path / "qwendoctor.lock"), "--json"]
    return subprocess.Popen(command, cwd=tmp_path, env=environment, stdout=open(tmp_path / f"{name}.out", "w"),
                            stderr=open(tmp_path / f"{name}.err", "w"))


def _finish(worker: subprocess.Popen, tmp_path: Path, name: str) -> dict:
    try:
        worker.wait(timeout=300)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == 0, (tmp_path / f"{name}.err").read_text()[-3000:]
    return json.loads((tmp_path / f"{name}.out").read_text())


def _load(url: str, name: str) -> optuna.Study:
    if url.startswith(storage.JOURNAL_SCHEME):
        from optuna.storages.journal import JournalFileBackend

        url = optuna.storages.JournalStorage(JournalFileBackend(url[len(storage.JOURNAL_SCHEME):]))
    return optuna.load_study(study_name=name, storage=url)


def _check_study(study: optuna.Study, lock: lockfile.Lock, tmp_path: Path, workers: int, retried: int) -> list:
    states = optuna.trial.TrialState
    trials = study.trials
    assert not [t for t in trials if t.state in (states.RUNNING, states.WAITING)], "a trial was left behind"
    finished = coordination.finished(study)
    # Each worker stops once the study has its trials; those that were mid-trial then finish theirs.
    assert TRIALS <= len(finished) <= TRIALS + (workers - 1) + retried
    assert lock.study["trials"] == len(finished) and lock.study["name"] == study.study_name
    # No profile measured twice (rendered, or timed and skipped as slower): a second proposal of it waited for
    # the first measurement, or reused it.
    measured = [json.dumps(t.user_attrs["profile"], sort_keys=True) for t in finished
                if (t.state == states.COMPLETE or t.user_attrs.get("skipped")) and "duplicate_of" not in t.user_attrs
                and t.user_attrs["profile"] != Profile().to_dict()]
    assert len(measured) == len(set(measured)), measured
    logs = "".join((tmp_path / f"{name}.err").read_text() for name in ("a", "b"))
    assert logs.count("images with the default profile") == 1, "the reference renders were made twice"
    return finished


def test_two_workers_share_a_journal_study(tmp_path):
    url = f"journal://{tmp_path}/study.log"
    workers = [_start_worker(tmp_path, name, url) for name in ("a", "b")]
    results = [_finish(worker, tmp_path, name) for worker, name in zip(workers, ("a", "b"))]
    for name in ("a", "b"):
        assert " trial(s) done, " in (tmp_path / f"{name}.err").read_text()  # each joined the study
    lock = lockfile.read_lock(tmp_path / "qwendoctor.lock")
    _check_study(_load(url, lock.study["name"]), lock, tmp_path, workers=2, retried=0)
    # Both wrote the lock of the finished study: the same counts, and the same profile unless a worker's own
    # side-by-side confirmation measured the study's choice slower than the default (each worker confirms on its
    # own timings, and a contradicted profile is never locked): then each lock holds what its worker upheld.
    assert results[0]["counts"] == results[1]["counts"]
    assert lock.profile.to_dict() in (results[0]["profile"], results[1]["profile"])
    if not any(result["study"].get("confirm_rejected") for result in results):
        assert results[0]["profile"] == results[1]["profile"] == lock.profile.to_dict()


def _wait_for(condition, what: str, log: Path) -> None:
    deadline = time.monotonic() + 240
    while not condition():
        assert time.monotonic() < deadline, f"{what}:\n" + log.read_text()[-3000:]
        time.sleep(0.2)


def _kill_one_mid_trial(tmp_path: Path, url: str) -> None:
    """The victim starts alone and hangs in the first trial it measures (coordination.STALL_ENV); the survivor joins and
    starts trials while the victim's trial is running; then the victim is killed."""
    stalled = tmp_path / "stalled-trial"
    victim = _start_worker(tmp_path, "a", url, **{coordination.STALL_ENV: str(stalled)})
    survivor = None
    try:
        _wait_for(lambda: stalled.exists() or victim.poll() is not None, "the victim never measured",
                  tmp_path / "a.err")
        assert victim.poll() is None and stalled.exists(), (tmp_path / "a.err").read_text()[-3000:]
        name = re.search(r"study (\S+) in ", (tmp_path / "a.err").read_text()).group(1)
        survivor = _start_worker(tmp_path, "b", url)
        survivor_id = f"{socket.gethostname()}:{survivor.pid}"
        _wait_for(lambda: survivor.poll() is not None or any(
            t.user_attrs.get("worker") == survivor_id for t in _load(url, name).trials),
            "the survivor never started a trial", tmp_path / "b.err")
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        _finish(survivor, tmp_path, "b")
    finally:
        for worker in (victim, survivor):
            if worker is not None and worker.poll() is None:
                worker.kill()

    lock = lockfile.read_lock(tmp_path / "qwendoctor.lock")
    study = _load(url, lock.study["name"])
    finished = _check_study(study, lock, tmp_path, workers=1, retried=1)
    killed = study.trials[int(stalled.read_text())]
    assert killed.state == optuna.trial.TrialState.FAIL and "failure" not in killed.user_attrs
    assert killed.number not in {t.number for t in finished}, "the killed trial counted towards --trials"
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1, "the killed trial was not retried exactly once"
    # The retry ran to a result: rendered, or timed and skipped as slower than the best by then.
    assert retries[0].state == optuna.trial.TrialState.COMPLETE or retries[0].user_attrs.get("skipped")
    assert retries[0].params == killed.params
    assert retries[0].user_attrs["worker"] == survivor_id != killed.user_attrs["worker"]


def test_a_worker_killed_mid_trial_on_a_journal_study(tmp_path):
    _kill_one_mid_trial(tmp_path, f"journal://{tmp_path}/study.log")


@pytest.fixture
def postgres_database():
    """A new database on the server QWENDOCTOR_TEST_POSTGRES_URL names, dropped afterwards: the study name only
    depends on the setup, so a database kept between runs would resume the last run's study."""
    import uuid

    import sqlalchemy

    if not POSTGRES_URL:
        pytest.skip("QWENDOCTOR_TEST_POSTGRES_URL is not set (.ci/run sets it)")
    name = f"qwendoctor_test_{uuid.uuid4().hex[:12]}"
    server = sqlalchemy.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with server.connect() as connection:
        connection.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    try:
        yield sqlalchemy.engine.make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with server.connect() as connection:
            connection.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        server.dispose()


def test_a_worker_killed_mid_trial_on_a_postgres_study(tmp_path, postgres_database):
    _kill_one_mid_trial(tmp_path, postgres_database)
