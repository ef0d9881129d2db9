"""Progress bars (tqdm, on stderr) for long steps, quiet unless asked for.

Library calls are quiet by default. A caller turns bars on for everything below it, however deep, with
``with progress_enabled(True): ...`` (the CLI does, unless ``--json``), or per call with a verb's ``progress=``
keyword (``None``, the default, inherits the surrounding setting).
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("edgeslim_progress", default=False)
_OPEN: weakref.WeakSet[Any] = weakref.WeakSet()


def enabled() -> bool:
    """Whether progress bars are on here."""
    return _ENABLED.get()


@contextlib.contextmanager
def progress_enabled(on: bool | None = True) -> Iterator[None]:
    """Turn progress bars on or off for the block (``None``: leave the surrounding setting)."""
    if on is None:
        yield
        return
    token = _ENABLED.set(bool(on))
    try:
        yield
    finally:
        _ENABLED.reset(token)


def bar(
    iterable: Iterable[Any] | None = None,
    *,
    desc: str,
    total: int | None = None,
    unit: str = "it",
    leave: bool = False,
    on: bool | None = None,
) -> Any:
    """A tqdm bar on stderr, shown when progress is enabled (or ``on`` says so); a silent pass-through otherwise."""
    from tqdm.auto import tqdm

    show = enabled() if on is None else on
    b = tqdm(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        leave=leave,
        disable=not show,
        file=sys.stderr,
        mininterval=0.5,
        dynamic_ncols=True,
    )
    if show:
        _OPEN.add(b)
    return b


def close_all() -> None:
    """Close (and so clear) every bar still open, e.g. after an exception, before printing an error line."""
    for b in list(_OPEN):
        with contextlib.suppress(Exception):
            b.close()
    _OPEN.clear()


def note(text: str) -> None:
    """A line on stderr that does not break the bars (only when progress is enabled)."""
    if enabled():
        from tqdm.auto import tqdm

        tqdm.write(text, file=sys.stderr)
