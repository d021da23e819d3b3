"""The study: Optuna storage, the config snapshot, run folders and recovery.

The study is the source of truth. The config snapshot is a study user attribute; each
trial carries its recipe, scores, timings, worker and error. A run folder holds
``run.json`` (storage URL and study name) so that `resume RUN` finds everything.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from mergesearch.config import Config, mask_password, parse_config
from mergesearch.errors import StudyError

CONFIG_ATTR = "mergesearch.config"
DRIVER_PREFIX = "mergesearch.driver."
# A driver that has not written its heartbeat for this long is taken for dead.
STALE_AFTER_S = 60.0
HEARTBEAT_S = 10.0
# Opening a new database loses a race to create its schema at most this often.
SCHEMA_RACE_TRIES = 5

optuna.logging.set_verbosity(optuna.logging.WARNING)


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for any SQLAlchemy URL, or ``journal:PATH`` for a journal file.

    Connection problems are refused as a `StudyError` naming the (masked) URL."""
    for attempt in range(SCHEMA_RACE_TRIES):
        try:
            return _open(url)
        except Exception as e:  # noqa: BLE001 - SQLAlchemy raises many kinds
            if attempt + 1 < SCHEMA_RACE_TRIES and _lost_schema_race(e):
                time.sleep(0.1 * (attempt + 1) + random.random() * 0.1)
                continue
            msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
            raise StudyError(f"study.storage: cannot open {mask_password(url)} ({msg})") from None
    raise AssertionError("unreachable")


def _open(url: str) -> optuna.storages.BaseStorage:
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # Wait for a writer holding the lock instead of failing at once.
        storage = RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
        _write_ahead_log(storage.engine)
        return storage
    return RDBStorage(url, engine_kwargs={"pool_pre_ping": True})


def _lost_schema_race(error: Exception) -> bool:
    """Two drivers opening a new database at once both create Optuna's tables and its
    schema-version row; the slower one fails on what the faster one just created. Opening
    again finds the schema in place."""
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    if isinstance(error, IntegrityError):
        return True
    return isinstance(error, (OperationalError, ProgrammingError)) and "already exists" in str(error)


def _write_ahead_log(engine) -> None:
    """SQLite in WAL mode with `synchronous=NORMAL`: a commit appends to the log instead
    of rewriting pages with several fsyncs. A killed process loses nothing committed; only
    a power cut can lose the last commits, never consistency. Readers (status, the
    dashboard) no longer block the driver's writes."""
    from sqlalchemy import event

    def on_connect(dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(engine, "connect", on_connect)
    engine.dispose()  # connections opened before the listener are replaced


def directions(config: Config) -> list[str]:
    return [o.direction for o in config.objectives]


def create_or_load(config: Config) -> optuna.Study:
    """Create the study (storing the config snapshot), or load it if it exists and its
    objectives match; refuse a study whose objectives differ."""
    storage = open_storage(config.storage_url)
    names = [o.name for o in config.objectives]
    try:
        study = optuna.load_study(study_name=config.study.name, storage=storage)
    except KeyError:
        try:
            study = optuna.create_study(study_name=config.study.name, storage=storage,
                                        directions=directions(config))
        except optuna.exceptions.DuplicatedStudyError:  # another driver created it just now
            return create_or_load(config)
        with warnings.catch_warnings():  # experimental in Optuna, stable enough for names
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(names)
        study.set_user_attr(CONFIG_ATTR, config.snapshot())
    else:
        if study.metric_names not in (None, names):
            raise StudyError(
                f"study.name: study {config.study.name!r} already exists with objectives "
                f"{study.metric_names}, not {names}; choose another study name"
            )
    write_run_file(config)
    return study


def write_run_file(config: Config) -> None:
    """``run.json``: the storage URL and the study name. A URL with a password is kept as
    the config wrote it, so that a password given as ``${VAR}`` is read from the
    environment again on resume and never written down."""
    run = config.run_dir
    run.mkdir(parents=True, exist_ok=True)
    url = config.storage_url
    if mask_password(url) != url:
        url = config.study.storage
    (run / "run.json").write_text(json.dumps({"storage": url, "study": config.study.name}, indent=2) + "\n")


@dataclass
class RunRef:
    """Where a run lives: a run folder, or an explicit storage URL and study name."""

    storage: str
    study: str

    @classmethod
    def from_args(cls, run: str | None, storage: str | None = None, study: str | None = None) -> RunRef:
        if storage:
            if not study:
                raise StudyError("--study: needed with --storage")
            return cls(storage, study)
        if not run:
            raise StudyError("RUN: give a run folder, or --storage URL --study NAME")
        f = Path(run) / "run.json"
        try:
            data = json.loads(f.read_text())
        except FileNotFoundError:
            raise StudyError(f"{f}: not found; is {run} a run folder?") from None
        except json.JSONDecodeError as e:
            raise StudyError(f"{f}: corrupt ({e})") from None
        return cls(os.path.expandvars(data["storage"]), data["study"])

    def load(self) -> optuna.Study:
        storage = open_storage(self.storage)
        try:
            return optuna.load_study(study_name=self.study, storage=storage)
        except KeyError:
            raise StudyError(f"--study: no study named {self.study!r} in {mask_password(self.storage)}") from None

    def config(self, study: optuna.Study | None = None) -> Config:
        study = study or self.load()
        data = dict(study.user_attrs.get(CONFIG_ATTR) or {})
        if not data:
            raise StudyError(f"study {self.study!r} has no mergesearch config snapshot")
        root = Path(data.pop("root", "."))
        if data["study"].get("storage"):
            data["study"]["storage"] = self.storage  # the snapshot holds it masked
        return parse_config(data, source=f"study {self.study!r} config snapshot", root=root)


# ---- drivers and recovery ------------------------------------------------------------------


class Driver:
    """This process as a driver of the study: an id, and a heartbeat in the storage."""

    def __init__(self, study: optuna.Study):
        self.study = study
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._last = 0.0
        self.beat(force=True)

    def beat(self, force: bool = False) -> None:
        now = time.time()
        if force or now - self._last >= HEARTBEAT_S:
            self.study.set_user_attr(DRIVER_PREFIX + self.id, now)
            self._last = now

    def rank(self) -> int:
        """How many live drivers of this study registered before this one: drivers that
        start together get distinct ranks, whatever the order of their reads and writes."""
        attrs = self.study.user_attrs
        mine = (attrs.get(DRIVER_PREFIX + self.id, 0.0), self.id)
        others = [(beat, key.removeprefix(DRIVER_PREFIX)) for key, beat in attrs.items()
                  if key.startswith(DRIVER_PREFIX) and key != DRIVER_PREFIX + self.id
                  and driver_alive(attrs, key.removeprefix(DRIVER_PREFIX))]
        return sum(other < mine for other in others)

    def stop(self) -> None:
        self.study.set_user_attr(DRIVER_PREFIX + self.id, 0.0)


def driver_alive(study_attrs: dict[str, Any], driver_id: str | None, now: float | None = None) -> bool:
    if not driver_id:
        return False
    beat = study_attrs.get(DRIVER_PREFIX + driver_id)
    if not beat:
        return False
    host, pid = driver_id.split(":")[:2]
    if host == socket.gethostname() and not _pid_alive(int(pid)):
        return False
    return (now or time.time()) - beat < STALE_AFTER_S


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_orphans(study: optuna.Study, reason: str = "its driver died") -> list[int]:
    """Fail the trials left RUNNING by dead drivers and enqueue their parameters again,
    so they are evaluated anew and counted once. Returns the failed trial numbers."""
    attrs = study.user_attrs
    orphans = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
               if not driver_alive(attrs, t.user_attrs.get("driver"))]
    for t in orphans:
        study._storage.set_trial_user_attr(t._trial_id, "requeued", True)
        study._storage.set_trial_user_attr(t._trial_id, "error", f"interrupted: {reason}")
        try:
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except RuntimeError:  # another driver finished it in the meantime
            continue
        if t.params:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
    return [t.number for t in orphans]


def counted(trial: FrozenTrial) -> bool:
    """Trials that use the budget: finished ones, except those re-queued after an
    interruption (their re-run is counted instead) and those a driver asked for when
    other drivers had used the budget up."""
    if trial.state == TrialState.COMPLETE:
        return True
    return (trial.state == TrialState.FAIL and not trial.user_attrs.get("requeued")
            and not trial.user_attrs.get("over_budget"))
