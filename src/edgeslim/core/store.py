"""The Optuna run store every search of edgeslim shares: an RDB storage (a SQLite file, or a PostgreSQL URL that
several workers share), resumption of trials a killed process left RUNNING, an advisory lock for the few steps
workers must not interleave, and a sampler that draws trial *n* the same way after a restart.

``edgeslim.optimize`` (``pipeline/``) and the width search (``nas/``) both use it; it lives in ``core/`` because
techniques never import ``pipeline/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import time
import warnings
from collections.abc import Iterator
from typing import Any

from edgeslim.core.errors import ConfigError

log = logging.getLogger(__name__)


def sqlite_file(url: str) -> str | None:
    """The file of a ``sqlite:///...`` URL (None for another database)."""
    return url.split(":///", 1)[1] if url.startswith("sqlite:///") else None


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, what: str) -> Iterator[None]:
    """Hold an exclusive, non-blocking lock on the file ``path`` for the block (created if missing): one process
    at a time on a study that is not shared. ``what`` names the holder in the error a second process gets."""
    import fcntl
    from pathlib import Path

    from edgeslim.core.errors import OutputExistsError

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")  # noqa: SIM115 - held open as the lock
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise OutputExistsError(
                f"{str(path)!r} is locked by another {what} process; wait for it, or share the study through "
                "a PostgreSQL storage (storage='postgresql://...') to run several workers"
            ) from None
        yield
    finally:
        f.close()


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def strip_password(url: str) -> str:
    """``url`` without its password (what ``run.json`` records)."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1@", url)


#: a trial whose worker has sent no heartbeat for this many heartbeat intervals is taken as dead
GRACE_INTERVALS = 3


def open_storage(url: str, *, shared: bool, heartbeat_s: int = 10) -> Any:
    """An Optuna RDB storage at ``url``; shared ones get heartbeats (every ``heartbeat_s`` seconds) so a trial
    whose worker died (silent for ``GRACE_INTERVALS`` heartbeats) is failed and its parameters queued again."""
    import optuna

    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(
            f"storage={url!r} is not allowed; give an RDB URL (sqlite:///file.db, "
            "postgresql://user@host/db) or None for out/study.db"
        )
    if isinstance(heartbeat_s, bool) or not isinstance(heartbeat_s, int) or heartbeat_s < 1:
        raise ConfigError(f"heartbeat_s={heartbeat_s!r} is not allowed; use an integer >= 1 (seconds)")
    kw: dict[str, Any] = {}
    if shared:
        kw = {
            "heartbeat_interval": heartbeat_s,
            "grace_period": GRACE_INTERVALS * heartbeat_s,
            "heartbeat_stale_trial_callback": requeue_failed,
        }
    engine: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("postgresql"):  # a host that drops packets must not hang the command
        engine["connect_args"] = {"connect_timeout": 10}
    try:
        with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna 5; they are what we rely on
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=engine, **kw)
    except ImportError:  # sqlalchemy could not import the URL's database driver
        scheme = url.split("://", 1)[0].split("+", 1)[0]
        pkg = {"postgresql": "'psycopg[binary]'", "mysql": "pymysql"}.get(scheme, f"a {scheme} driver for SQLAlchemy")
        raise ConfigError(
            f"storage {redact(url)!r} needs a database driver that is not installed: pip install {pkg}"
        ) from None
    except Exception as e:  # noqa: BLE001 - sqlalchemy/driver errors: unreachable host, bad URL, refused login
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"storage {redact(url)!r} does not answer: {type(e).__name__}: {first}") from None


def requeue_failed(study: Any, trial: Any) -> None:
    """Heartbeat callback: a trial whose worker died is queued again with the same parameters (Optuna calls it
    once per such trial, in the one worker whose update marked it failed)."""
    study.enqueue_trial(
        trial.params, user_attrs={"retry_of": trial.number, "worker_lost": trial.user_attrs.get("worker", "?")}
    )
    log.warning(
        "trial %d's worker (%s) stopped answering; its parameters are queued again",
        trial.number,
        trial.user_attrs.get("worker", "?"),
    )


def worker_id() -> str:
    """This process as the trials it runs record it: ``host:pid``."""
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


class StudyLock:
    """An exclusive lock shared by every worker of one study in a shared storage, for the short steps that must
    not interleave: queueing trials, and claiming a candidate and a slot of the trial budget.

    PostgreSQL: a session-level advisory lock (``pg_advisory_lock``) on a connection of its own, released by the
    server if the worker dies. Other storages take no lock (the folder's own SQLite study has one process; for
    another shared database a warning says that two workers may then run the same candidate at once).
    """

    def __init__(self, storage: Any, study_name: str, *, shared: bool) -> None:
        self._conn = None
        self._held = False
        self._key = int(hashlib.sha256(study_name.encode()).hexdigest()[:15], 16)  # fits a signed bigint
        engine = getattr(storage, "engine", None)
        if shared and engine is not None and engine.dialect.name == "postgresql":
            self._conn = engine.connect()
        elif shared:
            log.warning(
                "storage %s has no advisory lock edgeslim knows: two workers may claim the same candidate "
                "or overrun the trial budget by a trial each",
                engine.dialect.name if engine else "?",
            )

    def acquire(self) -> None:
        if self._conn is not None and not self._held:
            from sqlalchemy import text

            self._conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": self._key})
            self._conn.commit()
        self._held = True

    def release(self) -> None:
        if self._conn is not None and self._held:
            from sqlalchemy import text

            self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
            self._conn.commit()
        self._held = False

    @contextlib.contextmanager
    def held(self) -> Iterator[StudyLock]:
        """Hold the lock for the block (the block may :meth:`release` it early)."""
        self.acquire()
        try:
            yield self
        finally:
            self.release()

    def close(self) -> None:
        self.release()
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def requeue_running(study: Any, storage: Any) -> list[int]:
    """Put every RUNNING trial of ``study`` (in ``storage``) back in the queue, in place (same number and
    parameters); the caller holds the run folder's lock, so no live process owns them. Returns their numbers."""
    from optuna.trial import TrialState

    done = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        note = list(t.user_attrs.get("requeued", [])) + [
            f"left RUNNING by a stopped process; re-queued at {time.strftime('%Y-%m-%d %H:%M:%S')}"
        ]
        storage.set_trial_user_attr(t._trial_id, "requeued", note)
        storage.set_trial_state_values(t._trial_id, TrialState.WAITING)
        done.append(t.number)
    if done:
        log.warning(
            "re-queued trial(s) %s left RUNNING by a stopped run; finished trials are kept", ", ".join(map(str, done))
        )
    return done


# ---------------------------------------------------------------------------------------------- sampler
def seeded_sampler(kind: str, seed: int, *, population: int = 8) -> Any:
    """A sampler that seeds a fresh Optuna sampler per trial number (``seed`` and the number).

    A resumed process then draws trial *n* exactly as an uninterrupted one would (Optuna's own samplers keep
    their random state in the process, which a restart loses); the search history they condition on is the
    storage's. Both honour the constraints each trial sets (``Trial.set_constraint``): the budget's limits.
    """
    import optuna

    if kind not in ("tpe", "nsga2"):
        raise ConfigError(f"sampler={kind!r} is not allowed; valid: tpe, nsga2")
    if isinstance(population, bool) or not isinstance(population, int) or population < 2:
        raise ConfigError(f"population={population!r} is not allowed; use an integer >= 2")

    def make(n: int) -> Any:
        s = (seed * 1_000_003 + n) % 2**32
        if kind == "tpe":
            return optuna.samplers.TPESampler(seed=s, n_startup_trials=8)
        return optuna.samplers.NSGAIISampler(seed=s, population_size=population)

    class PerTrialSeeded(optuna.samplers.BaseSampler):
        def __init__(self) -> None:
            self._inner: dict[int, Any] = {}

        def _for(self, n: int) -> Any:
            if n not in self._inner:
                if len(self._inner) > 64:
                    self._inner.pop(next(iter(self._inner)))
                self._inner[n] = make(n)
            return self._inner[n]

        def infer_relative_search_space(self, study: Any, trial: Any) -> dict:
            return self._for(trial.number).infer_relative_search_space(study, trial)

        def sample_relative(self, study: Any, trial: Any, search_space: dict) -> dict:
            return self._for(trial.number).sample_relative(study, trial, search_space)

        def sample_independent(self, study: Any, trial: Any, name: str, dist: Any) -> Any:
            return self._for(trial.number).sample_independent(study, trial, name, dist)

        def before_trial(self, study: Any, trial: Any) -> None:
            self._for(trial.number).before_trial(study, trial)

        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            self._for(trial.number).after_trial(study, trial, state, values)

        def reseed_rng(self) -> None:  # per-trial seeds are fixed by design
            return None

    return PerTrialSeeded()
