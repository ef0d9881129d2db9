"""What every verb checks first, written once: the config's type and the one name for data."""

from __future__ import annotations

import warnings
from typing import Any

from edgeslim.core.errors import ConfigError


def check_config(config: Any, cls: type, verb: str) -> None:
    """Raise :class:`ConfigError` unless ``config`` is a ``cls`` (the verb's own config type)."""
    if not isinstance(config, cls):
        raise ConfigError(
            f"{verb}() needs a {cls.__name__}, got {type(config).__name__}"
            + (f" (a {config.kind!r} config belongs to another verb)" if hasattr(config, "kind") else "")
        )


def data_alias(data: Any, calib: Any, verb: str) -> Any:
    """``data=`` is the one name for a verb's data; ``calib=`` is accepted for one release, with a warning."""
    if calib is None:
        return data
    if data is not None:
        raise ConfigError(f"{verb}() got both data= and calib=; pass the calibration data as data= only")
    warnings.warn(f"{verb}(calib=...) is deprecated; pass data=... (the same data)", DeprecationWarning, stacklevel=3)
    return calib
