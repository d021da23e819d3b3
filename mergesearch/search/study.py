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
from mergesearch.evaluators import check_objectives
from mergesearch.files import read_text

CONFIG_ATTR = "mergesearch.config"
DRIVER_PREFIX = "mergesearch.driver."
# A driver that has not written its heartbeat for this long is taken for dead. Tests
# shorten both (MERGESEARCH_* variables reach the workers and the CLI subprocesses).
STALE_AFTER_S = float(os.environ.get("MERGESEARCH_STALE_AFTER_S", 60.0))
HEARTBEAT_S = float(os.environ.get("MERGESEARCH_HEARTBEAT_S", 10.0))
# Opening a new database loses a race to create its schema at most this often.
SCHEMA_RACE_TRIES = 5

optuna.logging.set_verbosity(optuna.logging.WARNING)


def open_storage(url: str, create: bool = True,
                 named_by: str = "study.storage") -> optuna.storages.BaseStorage:
    """An Optuna storage for any SQLAlchemy URL, or ``journal:PATH`` for a journal file.

    Connection problems are refused as a `StudyError` naming the (masked) URL. With
    ``create=False`` (opening an existing run) a SQLite or journal file that does not exist
    is refused, naming it and where its name came from, instead of being created empty."""
    path = storage_file(url)
    if not create and path is not None and not path.exists():
        raise StudyError(f"{path}: storage file not found (named by {named_by})")
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


def storage_file(url: str) -> Path | None:
    """The file a SQLite or journal URL names; None for a server or an in-memory database."""
    if url.startswith("journal:"):
        return Path(url.removeprefix("journal:"))
    if not url.startswith("sqlite"):
        return None
    from sqlalchemy.engine import make_url

    try:
        database = make_url(url).database
    except Exception:  # noqa: BLE001 - refused when opened, with SQLAlchemy's reason
        return None
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


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
    """Each objective's direction; where the config leaves one unset, its evaluator's."""
    return [o.direction for o in check_objectives(config).objectives]


def create_or_load(config: Config, storage: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    """Create the study (storing the config snapshot), or load it if it exists and its
    objectives match; refuse a study whose objectives differ. ``storage``: the config's,
    opened already (by `check_storage`)."""
    storage = storage or open_storage(config.storage_url)
    names = [o.name for o in config.objectives]
    try:
        study = optuna.load_study(study_name=config.study.name, storage=storage)
    except KeyError:
        try:
            study = optuna.create_study(study_name=config.study.name, storage=storage,
                                        directions=directions(config))
        except optuna.exceptions.DuplicatedStudyError:  # another driver created it just now
            return create_or_load(config, storage)
        with warnings.catch_warnings():  # experimental in Optuna, stable enough for names
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(names)
        study.set_user_attr(CONFIG_ATTR, config.snapshot())
    else:
        _check_objectives(study, config)
        _store_budget(study, config)
    write_run_file(config)
    return study


def _store_budget(study: optuna.Study, config: Config) -> None:
    """A budget raised on resume becomes the study's: `status` and a later plain `resume`
    read it from the stored snapshot."""
    stored = dict(study.user_attrs.get(CONFIG_ATTR) or {})
    budget = config.snapshot()["budget"]
    if stored and stored.get("budget") != budget:
        study.set_user_attr(CONFIG_ATTR, {**stored, "budget": budget})


def check_storage(config: Config) -> optuna.storages.BaseStorage | None:
    """Refuse, before any worker starts, a storage the run could not use: a run folder or
    storage file that cannot be created, a server that cannot be reached, a study of this
    name with other objectives. A new SQLite or journal file is not created here, so that
    a config refused later (by the workers' set-up) leaves nothing behind: its folder is
    checked instead. Returns the storage it opened (None where it opened none), for
    `create_or_load`."""
    _check_creatable(config.run_dir, "study.run_dir")
    url = config.storage_url
    path = storage_file(url)
    if path is not None and not path.exists():
        _check_creatable(path.parent, "study.storage")
        return None
    storage = open_storage(url)
    try:
        study = optuna.load_study(study_name=config.study.name, storage=storage)
    except KeyError:
        return storage
    _check_objectives(study, config)
    return storage


def _check_creatable(folder: Path, field: str) -> None:
    """A folder that exists or can be made: its nearest existing ancestor is a writable folder."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise StudyError(f"{field}: cannot create {folder}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StudyError(f"{field}: cannot create {folder}: {existing} is not writable")


def _check_objectives(study: optuna.Study, config: Config) -> None:
    """A study of this name is continued only for the same objectives, in the same directions."""
    names = [o.name for o in config.objectives]
    stored = [d.name.lower() for d in study.directions]
    if study.metric_names not in (None, names) or stored != directions(config):
        raise StudyError(
            f"study.name: study {config.study.name!r} already exists with objectives "
            f"{_objectives(study.metric_names, stored)}, not {_objectives(names, directions(config))}; "
            "choose another study name")


def _objectives(names: list[str] | None, dirs: list[str]) -> str:
    """``add (maximize), size (minimize)``; directions alone for a study without names."""
    return ", ".join(f"{n} ({d})" if n else d for n, d in zip(names or [None] * len(dirs), dirs))


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
    named_by: str = "--storage"  # where the two came from: the options, or a run.json

    @classmethod
    def from_args(cls, run: str | None, storage: str | None = None, study: str | None = None) -> RunRef:
        if storage:
            if not study:
                raise StudyError("--study: needed with --storage")
            return cls(storage, study)
        if not run:
            raise StudyError("RUN: give a run folder, or --storage URL --study NAME")
        return cls.from_folder(Path(run))

    @classmethod
    def from_folder(cls, run: Path) -> RunRef:
        """The run that a folder's ``run.json`` names; a StudyError naming what is wrong."""
        if run.exists() and not run.is_dir():
            hint = (f"; a search starts from a config with `mergesearch run {run}`"
                    if run.suffix in (".yaml", ".yml") else "")
            raise StudyError(f"RUN: {run} is a file, not a run folder{hint}")
        f = run / "run.json"
        try:
            data = json.loads(read_text(f))
        except FileNotFoundError:
            raise StudyError(f"{f}: not found; is {run} a run folder?") from None
        except OSError as e:
            raise StudyError(f"{f}: cannot read ({e.strerror})") from None
        except json.JSONDecodeError as e:
            raise StudyError(f"{f}: corrupt ({e})") from None
        except ValueError as e:  # not UTF-8
            raise StudyError(str(e)) from None
        if not isinstance(data, dict):
            raise StudyError(f'{f}: expected a JSON object with "storage" and "study"')
        for key in ("storage", "study"):
            if not data.get(key):
                raise StudyError(f'{f}: "{key}" is missing')
            if not isinstance(data[key], str):
                raise StudyError(f'{f}: "{key}" is not a string')
        return cls(os.path.expandvars(data["storage"]), data["study"], named_by=str(f))

    def load(self) -> optuna.Study:
        """The study; its storage is opened, never created."""
        storage = open_storage(self.storage, create=False, named_by=self.named_by)
        try:
            return optuna.load_study(study_name=self.study, storage=storage)
        except KeyError:
            where = "--study" if self.named_by == "--storage" else self.named_by
            raise StudyError(f"{where}: no study named {self.study!r} in {mask_password(self.storage)}") from None

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

    def beat(self, force: bool = False) -> bool:
        """Write the heartbeat if it is due; whether it was written."""
        now = time.time()
        if force or now - self._last >= HEARTBEAT_S:
            self.study.set_user_attr(DRIVER_PREFIX + self.id, now)
            self._last = now
            return True
        return False

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


def orphaned(study_attrs: dict[str, Any], trial: FrozenTrial, now: float | None = None) -> bool:
    """A RUNNING trial no live driver will finish. A trial without a driver yet was just
    asked (the driver names itself right after) unless it is older than a stale heartbeat."""
    driver_id = trial.user_attrs.get("driver")
    if driver_id:
        return not driver_alive(study_attrs, driver_id, now)
    started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
    return (now or time.time()) - started >= STALE_AFTER_S


def recover_orphans(study: optuna.Study, reason: str = "its driver died",
                    keep_driver: str | None = None) -> list[int]:
    """Fail the trials left RUNNING by dead drivers and enqueue their parameters again,
    so they are evaluated anew and counted once. Returns the failed trial numbers.

    A live driver calls this while it runs, to take over a dead co-driver's trials; it
    passes its own id as ``keep_driver``, so that a stall of its own (a long lock wait that
    outlasts its heartbeat) never fails the trials it still holds."""
    attrs = study.user_attrs
    orphans = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
               if orphaned(attrs, t) and (keep_driver is None or t.user_attrs.get("driver") != keep_driver)]
    recovered = []
    for t in orphans:
        try:
            study._storage.set_trial_user_attr(t._trial_id, "requeued", True)
            study._storage.set_trial_user_attr(t._trial_id, "error", f"interrupted: {reason}")
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except RuntimeError:  # UpdateFinishedTrialError among them
            continue  # another driver finished or recovered it in the meantime
        recovered.append(t.number)
        if t.params:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
    return recovered


def is_duplicate(trial: FrozenTrial) -> bool:
    """A trial whose recipe was already scored (or in flight) when it was asked: it is told
    the first one's scores, so that the sampler learns them, and is not evaluated again."""
    return "duplicate_of_hash" in trial.user_attrs or "duplicate_of" in trial.user_attrs


def counted(trial: FrozenTrial) -> bool:
    """Trials that use the budget: finished ones, except duplicates of a recipe already
    scored, those re-queued after an interruption (their re-run is counted instead) and
    those a driver asked for when other drivers had used the budget up."""
    if is_duplicate(trial):
        return False
    if trial.state == TrialState.COMPLETE:
        return True
    return (trial.state == TrialState.FAIL and not trial.user_attrs.get("requeued")
            and not trial.user_attrs.get("over_budget"))


def failure_reason(trial: FrozenTrial, rerun: set[int]) -> str:
    """Why a FAIL trial failed, in a few words, and what became of it when it was not
    counted (``rerun``: the numbers of re-queued trials whose re-run has ended)."""
    error = trial.user_attrs.get("error", "?")
    if trial.user_attrs.get("requeued"):
        return f"{error} ({'re-queued, re-run' if trial.number in rerun else 're-queued, not re-run yet'})"
    if trial.user_attrs.get("over_budget"):
        return "over budget: asked when other drivers had used the budget up (not counted)"
    if is_duplicate(trial):
        return "duplicate of a failed trial (not counted)"
    return error.split(":")[0]
