"""The run store of :func:`edgeslim.optimize`: the run folder, the Optuna study, and the step cache.

- The run folder ``out/`` holds ``run.json`` (which model, data, budget, space and storage the run is for, and
  the command that started it: a resume with another model or budget is refused, a ``--worker`` joins with it),
  ``study.db`` (the default SQLite storage), ``cache/`` and the outputs. A lock file keeps a second process off a
  folder whose default SQLite study is in use.
- Every trial is a row in an Optuna RDB storage: the SQLite file, or a URL (``postgresql://...``) that several
  workers share. A trial left RUNNING by a killed process is re-queued: with the folder's own SQLite file (one
  worker, under the lock) every RUNNING trial at start is put back in the queue *in place* (same number, same
  parameters, so a seeded run continues exactly as an uninterrupted one would); with a shared URL, Optuna's
  heartbeat marks trials of dead workers failed and they are queued again as new trials.
- Workers of a shared study serialise the few steps that must not interleave (queueing, claiming a candidate
  and a slot of the trial budget) with a PostgreSQL advisory lock (:class:`StudyLock`); everything else runs
  in parallel.
- Each step's output is kept under ``cache/<step>-<key>/`` where the key hashes the base model's weights, the
  data and every setting that step depends on, so no finished step is ever redone. A step is built under a
  file lock of its own (:meth:`Cache.claim`), so workers sharing the folder never write the same step at once:
  the second waits and takes the first one's output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeslim.core.errors import ConfigError, OutputExistsError
from edgeslim.core.io import write_json

# the generic store (storage URL, heartbeats, requeueing, advisory lock, seeded sampler) lives in core/ so that the
# width search (nas/) shares it without importing pipeline/; re-exported here for optimize and its callers
from edgeslim.core.store import (
    GRACE_INTERVALS,
    StudyLock,
    open_storage,
    redact,
    requeue_failed,
    requeue_running,
    seeded_sampler,
    strip_password,
    worker_id,
)

log = logging.getLogger(__name__)

RUN_FORMAT = "edgeslim.optimize-run/1"


# ---------------------------------------------------------------------------------------------- hashing
def state_hash(model: nn.Module) -> str:
    """sha256 of a model's class name and state_dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256(type(model).__name__.encode())
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def key(*parts: Any) -> str:
    """A short content key of JSON-serialisable parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def file_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- step cache
class Cache:
    """Finished steps under ``root/<step>-<key>/``; a step is finished when its ``done.json`` exists (written
    last, atomically).

    Processes may share a cache folder: :meth:`claim` holds an exclusive lock on one step while it is looked up
    and, when missing, built, so two workers never write the same step's files at once and the second one
    finds the first one's output instead of redoing it. A step half-written by a killed process has no
    ``done.json`` and is simply built again (its files overwritten) by the next claimant.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, step: str, k: str) -> Path:
        """The step's folder (not created)."""
        return self.root / f"{step}-{k}"

    def dir(self, step: str, k: str) -> Path:
        d = self.path(step, k)
        d.mkdir(parents=True, exist_ok=True)
        return d

    @contextlib.contextmanager
    def claim(self, step: str, k: str) -> Iterator[Path]:
        """The step's folder, with its lock (``<step>-<key>.lock`` beside it) held until the block ends."""
        import fcntl

        d = self.dir(step, k)
        with open(self.root / f"{step}-{k}.lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # blocks while another process builds this very step
            try:
                yield d
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @staticmethod
    def done(d: Path) -> dict[str, Any] | None:
        f = d / "done.json"
        if not f.is_file():
            return None
        try:
            return json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):  # never half-written (atomic), but be safe
            return None

    @staticmethod
    def finish(d: Path, meta: dict[str, Any]) -> dict[str, Any]:
        write_json(d / "done.json", meta, force=True)
        return meta


# ---------------------------------------------------------------------------------------------- run folder
@contextlib.contextmanager
def locked(out: Path, *, name: str = ".optimize.lock", wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` (the file ``name`` in it): for the whole run with the folder's own
    SQLite study (a second process on the folder is refused), or, with ``wait``, for a short step that workers
    sharing the folder take turns at (writing ``run.json``, the report)."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    f = open(out / name, "a+")  # noqa: SIM115 - held open as the lock for the run's lifetime
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise OutputExistsError(
                f"run folder {str(out)!r} is in use by another optimize process (its lock is "
                "held); wait for it, or use another out= (workers sharing a study: "
                "storage=postgresql://...)"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        f.close()


def check_run(
    out: Path, ident: dict[str, Any], *, resume: bool, storage: str | None = None, command: dict[str, Any] | None = None
) -> bool:
    """Write ``out/run.json`` for a new run, or check that it is the same run; True when resuming.

    ``storage`` (a shared study's URL, None for the folder's own ``study.db``) is recorded without its password
    (a worker joining gives it again, or libpq finds it in ``PGPASSWORD`` / ``~/.pgpass``); ``command`` is how
    the run was started (the CLI's options), so ``edgeslim optimize --resume out --worker`` can join with them.
    """
    rec = out / "run.json"
    if not rec.is_file():
        doc = {
            "format": RUN_FORMAT,
            **ident,
            "storage": strip_password(storage) if storage else None,
            "storage_password": bool(storage) and strip_password(storage) != storage,
            "command": command,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        write_json(rec, doc, force=True)
        return False
    old = read_run(out)
    if not resume:
        raise OutputExistsError(
            f"run folder {str(out)!r} holds an earlier optimize run; pass resume=True "
            "(CLI: --resume) to continue it, or use another out="
        )
    for k, what in (
        ("base_model_sha256", "another model (its weights differ)"),
        ("data_sha256", "other data"),
        ("budget", "another budget"),
        ("space", "another search space"),
        ("seed", "another seed"),
        ("model_class", "another model class"),
    ):
        if old.get(k) != ident.get(k):
            raise ConfigError(
                f"run folder {str(out)!r} holds a run of {what}: {k} was {_short(old.get(k))}, now "
                f"{_short(ident.get(k))}; use another out= (or the same settings to resume)"
            )
    was = old.get("storage")
    now = strip_password(storage) if storage else None
    if was != now:
        how = f"give storage={was!r} (CLI: --storage)" if was else "give no storage= (CLI: no --storage)"
        raise ConfigError(
            f"run folder {str(out)!r} holds a run whose study is in {_where(was)}, not in "
            f"{_where(now)}; {how} to resume it, or use another out="
        )
    return True


def _where(url: str | None) -> str:
    return repr(url) if url else "the folder's own study.db"


def read_run(out: Path) -> dict[str, Any]:
    """``out/run.json`` as a dict (ConfigError when it is missing or unreadable)."""
    rec = Path(out) / "run.json"
    if not rec.is_file():
        raise ConfigError(
            f"{str(rec)!r} not found: {str(out)!r} holds no optimize run (start one with "
            "`edgeslim optimize MODEL ... --out` first, or copy its run.json here)"
        )
    try:
        doc = json.loads(rec.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{rec}: not a readable optimize run record ({e}); use another out=") from None
    if not isinstance(doc, dict) or doc.get("format") != RUN_FORMAT:
        raise ConfigError(f"{rec}: not an optimize run record (format {RUN_FORMAT!r} expected)")
    return doc


def _short(v: Any) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 120 else s[:117] + "..."


# ---------------------------------------------------------------------------------------------- storage
def default_storage(out: Path) -> str:
    return f"sqlite:///{(out / 'study.db').resolve()}"


__all__ = [
    "GRACE_INTERVALS",
    "Cache",
    "StudyLock",
    "check_run",
    "default_storage",
    "file_hash",
    "key",
    "locked",
    "open_storage",
    "read_run",
    "redact",
    "requeue_failed",
    "requeue_running",
    "seeded_sampler",
    "state_hash",
    "strip_password",
    "worker_id",
]
