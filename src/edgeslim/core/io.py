"""Atomic file output: write to a temporary file beside the target, then rename.

An interrupted run never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgeslim.core.errors import OutputExistsError


def check_output(path: str | os.PathLike, *, force: bool = False) -> Path:
    """Refuse an existing output path unless ``force``; make the parent folder."""
    p = Path(path)
    if p.exists() and not force:
        raise OutputExistsError(f"output {str(p)!r} already exists; pass force=True (CLI: --force) to overwrite it")
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path; on success rename it to ``path``, on failure remove it."""
    target = check_output(path, force=force)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600 files; outputs get the usual permissions
        os.replace(tmp_path, target)
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
