"""The edgeslim error tree.

Every error edgeslim raises on purpose derives from :class:`EdgeslimError`, so a caller can catch one type::

    EdgeslimError
    ├── ConfigError          a config field, CLI option or recipe key has a value that is not allowed
    ├── DataError            a dataset is missing, empty, corrupt, or does not fit the model
    ├── ModelError           unknown model name, bad factory, corrupt or mismatched weights
    ├── QuantizationError    nothing to quantize, calibration failed
    ├── ExportError          export failed, or the exported file did not validate against torch
    ├── RuntimeBackendError  a runtime is missing, or cannot run the artifact
    └── OutputExistsError    an output path exists and overwriting was not asked for

Messages name the file, field or value that is wrong and say what is allowed.
"""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Iterable
from typing import Any

#: the longest a value is shown in a message (a config value can be a huge, or alias-expanded, structure)
MAX_SHOWN = 200


class EdgeslimError(Exception):
    """Base of every error edgeslim raises on purpose."""


class ConfigError(EdgeslimError, ValueError):
    """A config field, option or recipe key has a value that is not allowed."""


class DataError(EdgeslimError):
    """A dataset is missing, empty, corrupt or does not fit the model."""


class ModelError(EdgeslimError):
    """Unknown model name, bad factory, or weights that are corrupt or do not match."""


class QuantizationError(EdgeslimError):
    """Quantization could not be carried out (nothing to quantize, calibration failed)."""


class ExportError(EdgeslimError):
    """Export failed, or the exported artifact did not validate against the torch reference."""


class RuntimeBackendError(EdgeslimError):
    """A runtime is not installed, or cannot run the given artifact."""


class OutputExistsError(EdgeslimError, FileExistsError):
    """An output path already exists and overwriting was not asked for."""


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 3, 8, 8, 8, 8
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = MAX_SHOWN, MAX_SHOWN, 60


def shown(value: Any, limit: int = MAX_SHOWN) -> str:
    """``repr(value)`` for a message, bounded in length and in the work done to build it.

    A plain ``repr`` of a nested value (e.g. a YAML alias bomb, 9 levels of 9 references) takes exponential
    time and memory; this one looks at most 8 items per level and 3 levels deep, then cuts at ``limit`` chars.
    """
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def near(name: str, valid: Iterable[str], n: int = 3) -> str:
    """A ' (did you mean ...?)' suffix listing the closest valid names, or ''."""
    name = name if isinstance(name, str) and len(name) <= MAX_SHOWN else shown(name)
    close = difflib.get_close_matches(str(name), list(valid), n=n, cutoff=0.5)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
