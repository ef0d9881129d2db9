"""Atomic file output: write to a temporary file beside the target, then publish it under the final name.

An interrupted run never leaves a half-written file under the final name. Without ``force`` the file is
published with an exclusive create (a hard link, which fails if the name exists), so of two runs writing the
same output the second refuses with :class:`OutputExistsError` instead of silently replacing the first one's
result. Temporary files are named ``.<name>.<pid>.<random>.tmp``; those left behind by a killed writer are
removed by the next write of the same target (see :func:`clean_stale_temps`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgeslim.core.errors import ConfigError, OutputExistsError

#: a temporary file whose writer cannot be identified is stale after this many seconds
STALE_SECONDS = 3600.0
#: any temporary file is stale after this many seconds (a writer's pid may have been reused by now)
MAX_TMP_AGE_SECONDS = 24 * 3600.0
_TMP_RE = re.compile(r"^(?:(\d+)\.)?[a-z0-9_]{8}$")


def check_output(path: str | os.PathLike, *, force: bool = False) -> Path:
    """Refuse an existing output path unless ``force``, or an output folder that cannot be written; make the
    parent folder."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"output {str(p)!r} is a folder; give a file path")
    if p.exists() and not force:
        raise OutputExistsError(f"output {str(p)!r} already exists; pass force=True (CLI: --force) to overwrite it")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the output folder {str(p.parent)!r}: {e.strerror or e}") from None
    if not os.access(p.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"output folder {str(p.parent)!r} is not writable")
    return p


def safe_name(text: str) -> str:
    """``text`` as one file-name component: letters, digits, ``_`` and ``-`` only (no separators, no dots).

    >>> safe_name("folder:../x")
    'folder-x'
    """
    return re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9_-]", "-", str(text))).strip("-") or "unnamed"


def inside(path: str | os.PathLike, folder: str | os.PathLike, what: str = "output") -> Path:
    """``path`` if it lies inside ``folder`` once resolved, else a :class:`ConfigError`."""
    p, root = Path(path).resolve(), Path(folder).resolve()
    if p != root and root not in p.parents:
        raise ConfigError(f"{what} {str(path)!r} would be written outside the folder {str(folder)!r}")
    return Path(path)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return True
    return True


def clean_stale_temps(target: str | os.PathLike, *, now: float | None = None) -> list[Path]:
    """Remove temporary files of ``target`` left by writers that died (e.g. killed with SIGKILL).

    Only this module's own pattern for this target, ``.<name>.<pid>.<random>.tmp``, is considered. One is
    stale when its writer process no longer exists on this host, or when it is older than
    :data:`MAX_TMP_AGE_SECONDS` (the pid may have been reused). Files of the older ``.<name>.<random>.tmp``
    pattern, which carry no pid, are stale after :data:`STALE_SECONDS`. A live writer's file is never
    touched: two runs writing the same target do not remove each other's work in progress.

    Returns:
        the files removed.
    """
    t = Path(target)
    prefix = f".{t.name}."
    now = time.time() if now is None else now
    removed = []
    try:
        names = os.listdir(t.parent)
    except OSError:
        return removed
    for fn in names:
        if not (fn.startswith(prefix) and fn.endswith(".tmp")):
            continue
        m = _TMP_RE.match(fn[len(prefix) : -len(".tmp")])
        if not m:
            continue
        p = t.parent / fn
        try:
            age = now - p.stat().st_mtime
        except OSError:
            continue
        pid = int(m.group(1)) if m.group(1) else None
        stale = age > MAX_TMP_AGE_SECONDS or (age > STALE_SECONDS if pid is None else not _pid_alive(pid))
        if stale:
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def _publish(tmp: Path, target: Path, force: bool) -> None:
    """Give ``tmp`` the name ``target``: replace with ``force``, else an exclusive create that never replaces."""
    if force:
        os.replace(tmp, target)
        return
    exists = OutputExistsError(
        f"output {str(target)!r} already exists (another run may have written it while this "
        "one worked); pass force=True (CLI: --force) to overwrite it"
    )
    try:
        os.link(tmp, target)  # atomic, fails if the name exists
        return
    except FileExistsError:
        raise exists from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
    try:  # file systems without hard links: claim the name, then move the finished file over the claim
        os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        raise exists from None
    os.replace(tmp, target)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path; on success publish it as ``path``, on failure (or Ctrl-C) remove it.

    Without ``force`` an existing ``path`` is refused both before and after the work (the publication is an
    exclusive create), so a concurrent run's output is never replaced.
    """
    target = check_output(path, force=force)
    clean_stale_temps(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600 files; outputs get the usual permissions
        _publish(tmp_path, target, force)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: str | os.PathLike, data: bytes, *, force: bool = False) -> Path:
    with atomic_path(path, force=force) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, *, force: bool = False) -> Path:
    return write_bytes(path, text.encode("utf-8"), force=force)


def write_json(path: str | os.PathLike, obj: Any, *, force: bool = False) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", force=force)


def save_torch(obj: Any, path: str | os.PathLike, *, force: bool = False) -> Path:
    import torch

    with atomic_path(path, force=force) as tmp:
        torch.save(obj, tmp)
    return Path(path)
