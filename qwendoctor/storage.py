"""Where a study lives (`--storage URL`), and the heartbeats that let workers sharing it outlive each other.

URLs:
    sqlite:///PATH              one host (the default, `sqlite:///<lock dir>/qwendoctor-study.db`)
    journal://PATH              Optuna's journal file: several workers on one host. `journal:///abs/study.log`,
                                or `journal://study.log` relative to the working directory
    postgresql+psycopg2://USER:PASSWORD@HOST:PORT/DB
                                several hosts (any SQLAlchemy URL Optuna's RDBStorage takes; PostgreSQL needs
                                `pip install 'qwendoctor[distributed]'`)

Every running trial carries a heartbeat, refreshed every `heartbeat_s` seconds by a thread of the worker that runs
it: Optuna's own for the SQL storages (a table, stamped with the database's clock), a trial system attribute here
for the journal, which Optuna 5 gives no heartbeat. A trial whose heartbeat is older than the grace period
(2 x heartbeat) belongs to a dead worker: the next worker to start a trial marks it failed and queues its
parameters again (Optuna's RetryHeartbeatStaleTrialCallback), once per death, at most MAX_RETRY times.
"""

from __future__ import annotations

import copy
import os
import time
import warnings

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from probes.context import first_line
from qwendoctor.errors import UsageError

JOURNAL_SCHEME = "journal://"
# A profile that keeps killing the worker running it (a segfaulting kernel, the OOM killer) is not retried forever.
MAX_RETRY = 2
HEARTBEAT_KEY = "qwendoctor:heartbeat"
# Workers on a new database race to create Optuna's tables; a loser sees a duplicate row or table (or, in SQLite,
# the file locked by the winner's schema transaction) and tries again once the winner has made them.
CONNECT_ATTEMPTS = 6
CREATION_RACE = ("IntegrityError", "UniqueViolation", "DuplicateTable", "already exists", "database is locked")
URL_HINT = "use sqlite:///PATH, journal:///PATH or postgresql+psycopg2://USER@HOST:PORT/DB"


def check_url(url: str) -> None:
    """A one-line UsageError for a URL that names no storage, before anything is loaded or connected to: a journal
    path, or a database URL whose SQLAlchemy dialect and driver exist here."""
    if url.startswith(JOURNAL_SCHEME):
        return
    if "://" not in url:
        raise UsageError(f"--storage {url}: not a storage URL; {URL_HINT}")
    import sqlalchemy

    try:
        parsed = sqlalchemy.engine.make_url(url)
        parsed.get_dialect()
    except ModuleNotFoundError as error:
        raise UsageError(f"--storage {describe(url)}: {error} (pip install 'qwendoctor[distributed]')") from None
    except Exception as error:
        raise UsageError(f"--storage {describe(url)}: {first_line(error)}; {URL_HINT}") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        # Optuna would run the study in memory, its heartbeat threads in other connections, and lose it at exit.
        raise UsageError(f"--storage {url}: an in-memory SQLite database loses the study when tune exits; "
                         "name a file: sqlite:///PATH")


def file_of(url: str) -> str | None:
    """The local file a sqlite or journal URL keeps the study in (None for a server's database): the lock must
    never be written over it."""
    if url.startswith(JOURNAL_SCHEME):
        return url[len(JOURNAL_SCHEME):] or None
    if url.startswith("sqlite:///"):
        return url[len("sqlite:///"):].split("?", 1)[0] or None
    return None


def is_shared(url: str) -> bool:
    """Storages meant for several workers at once (SQLite serialises writers and lives on one disk)."""
    return not url.startswith("sqlite:")


def describe(url: str) -> str:
    """The URL as logs, errors and the lock show it: without its password."""
    if url.startswith(JOURNAL_SCHEME) or "://" not in url:
        return url
    try:
        import sqlalchemy

        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # not parseable: the error that follows says so
        return url


class RetryDeadWorkerTrial:
    """Optuna's RetryHeartbeatStaleTrialCallback, minus what belonged to the dead run: its user attributes (its
    claim on a profile, see tune._claim) and its last heartbeat, which would make the retry look dead too."""

    def __init__(self, max_retry: int = MAX_RETRY):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def __call__(self, study, trial) -> None:
        trial = copy.copy(trial)
        trial.user_attrs = {}
        trial.system_attrs = {k: v for k, v in trial.system_attrs.items() if k != HEARTBEAT_KEY}
        self._retry(study, trial)


class _HeartbeatFromTheStart:
    """Records a trial's first heartbeat as soon as the trial runs, not once the sampler has proposed its
    parameters, so that a running trial with no heartbeat at all has lost its worker (tune._recover)."""

    def set_trial_state_values(self, trial_id, state, values=None) -> bool:
        claimed = super().set_trial_state_values(trial_id, state, values)
        if claimed and state == TrialState.RUNNING:  # a queued trial this worker took
            self.record_heartbeat(trial_id)
        return claimed


class HeartbeatRDBStorage(_HeartbeatFromTheStart, RDBStorage):
    """RDBStorage; Optuna's study wraps it in a cache that creates trials through `_create_new_trial`."""

    def _create_new_trial(self, study_id, template_trial=None):
        trial = super()._create_new_trial(study_id, template_trial)
        if trial.state == TrialState.RUNNING:
            self.record_heartbeat(trial._trial_id)
        return trial

    def trials_without_heartbeat(self, study_id: int) -> list[int]:
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session
        from sqlalchemy import orm

        with _create_scoped_session(self.scoped_session) as session:
            running = (session.query(models.TrialModel)
                       .options(orm.selectinload(models.TrialModel.heartbeats))
                       .filter(models.TrialModel.state == TrialState.RUNNING)
                       .filter(models.TrialModel.study_id == study_id).all())
            return [trial.trial_id for trial in running if not trial.heartbeats]


class HeartbeatJournalStorage(_HeartbeatFromTheStart, JournalStorage, BaseHeartbeat):
    """JournalStorage with a heartbeat: a trial system attribute holding the time of the worker's last beat.

    Stamped with each worker's clock, so workers sharing a journal over a network file system need synchronised
    clocks (the grace period absorbs a few seconds of skew)."""

    def __init__(self, backend, heartbeat_interval: int, grace_period: int | None = None,
                 heartbeat_stale_trial_callback=None):
        super().__init__(backend)
        self._heartbeat_interval = heartbeat_interval
        self._grace_period = grace_period or 2 * heartbeat_interval
        self._stale_callback = heartbeat_stale_trial_callback

    def create_new_trial(self, study_id, template_trial=None) -> int:
        trial_id = super().create_new_trial(study_id, template_trial)
        if template_trial is None or template_trial.state == TrialState.RUNNING:
            self.record_heartbeat(trial_id)
        return trial_id

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_KEY, time.time())
        except UpdateFinishedTrialError:
            pass  # finished meanwhile (or failed as stale by another worker): nothing left to keep alive

    def _running(self, study_id: int):
        return self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        return [t._trial_id for t in self._running(study_id)
                if HEARTBEAT_KEY in t.system_attrs and now - t.system_attrs[HEARTBEAT_KEY] > self._grace_period]

    def trials_without_heartbeat(self, study_id: int) -> list[int]:
        return [t._trial_id for t in self._running(study_id) if HEARTBEAT_KEY not in t.system_attrs]

    def get_heartbeat_interval(self) -> int:
        return self._heartbeat_interval

    def get_heartbeat_stale_trial_callback(self):
        return self._stale_callback


def open_storage(url: str, heartbeat_s: int):
    """The storage behind `--storage URL`, heartbeats on; a bad URL or an unreachable database is a one-line
    UsageError naming `--storage`."""
    shown = describe(url)
    if url.startswith(JOURNAL_SCHEME):
        return _open_journal(url, url[len(JOURNAL_SCHEME):], heartbeat_s)
    if "://" not in url:
        raise UsageError(f"--storage {shown}: not a storage URL; {URL_HINT}")
    engine_kwargs = {"pool_pre_ping": True}  # trials run for minutes; idle connections get dropped meanwhile
    if url.startswith("postgresql"):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    for attempt in range(CONNECT_ATTEMPTS):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return HeartbeatRDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_s,
                                           heartbeat_stale_trial_callback=RetryDeadWorkerTrial())
        except ModuleNotFoundError as error:
            raise UsageError(f"--storage {shown}: {error} (pip install 'qwendoctor[distributed]')") from None
        except Exception as error:
            if lost_creation_race(error) and attempt + 1 < CONNECT_ATTEMPTS:
                time.sleep(0.2 * (attempt + 1))
                continue
            message = first_line(error)
            raise UsageError(f"--storage {shown}: {message}") from None


def lost_creation_race(error: BaseException) -> bool:
    text = f"{type(error).__name__}: {error}"
    return any(sign in text for sign in CREATION_RACE)


def _open_journal(url: str, path: str, heartbeat_s: int) -> HeartbeatJournalStorage:
    if not path:
        raise UsageError(f"--storage {url}: no file; use journal:///absolute/path/study.log "
                         "or journal://relative/study.log")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UsageError(f"--storage {url}: directory {directory} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"--storage {url}: {path} is a directory, not a journal file")
    try:
        backend = JournalFileBackend(path)
        return HeartbeatJournalStorage(backend, heartbeat_interval=heartbeat_s,
                                       heartbeat_stale_trial_callback=RetryDeadWorkerTrial())
    except Exception as error:  # unreadable, or a file that is not a journal
        message = getattr(error, "strerror", None) or first_line(error)
        raise UsageError(f"--storage {url}: {message}") from None
