"""Frozen, validated config dataclasses that round-trip to dict and YAML.

Each technique's config subclasses :class:`Config`. Fields hold plain data only (numbers, strings,
str Enums, tuples of those, nested configs); runtime objects such as data or teachers are arguments of the verb.
A nested config field accepts a mapping of its fields (as YAML gives it) and writes one.
Enum fields accept plain strings; ``from_dict`` rejects unknown keys and names the valid ones.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from edgeslim.core.errors import ConfigError, near

C = TypeVar("C", bound="Config")

CONFIGS: dict[str, type[Config]] = {}


class StrEnum(str, enum.Enum):
    """A str Enum: ``Mode("static") is Mode.STATIC`` and ``Mode.STATIC == "static"``."""

    def __str__(self) -> str:
        return str(self.value)

    @classmethod
    def values(cls) -> list[str]:
        return [m.value for m in cls]


def _coerce_enum(cls_name: str, field: str, enum_type: type[StrEnum], value: Any) -> StrEnum:
    try:
        return enum_type(getattr(value, "value", value))
    except ValueError:
        raise ConfigError(
            f"{cls_name}.{field}={value!r} is not allowed{near(str(value), enum_type.values())}; "
            f"valid: {', '.join(enum_type.values())}"
        ) from None


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of every config: coercion of enums/tuples, validation hook, dict/YAML round-trip."""

    kind: ClassVar[str] = "config"

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.__dict__.get("kind") and cls.kind != "config":
            CONFIGS[cls.kind] = cls

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            hint = hints.get(f.name)
            for t in _candidate_types(hint):
                if isinstance(t, type) and issubclass(t, StrEnum) and value is not None:
                    object.__setattr__(self, f.name, _coerce_enum(type(self).__name__, f.name, t, value))
                    break
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        _build_nested(self, hints)
        _merge_renamed(self)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the field, the value and what is allowed."""

    def _bad(self, field: str, allowed: str) -> ConfigError:
        return ConfigError(f"{type(self).__name__}.{field}={getattr(self, field)!r} is not allowed; {allowed}")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.metadata.get("renamed_to"):
                continue  # an old field name, kept for one release; its values live in the new field
            v = getattr(self, f.name)
            if isinstance(v, Config):
                v = v.to_dict()
            elif isinstance(v, enum.Enum):
                v = v.value
            elif isinstance(v, tuple):
                v = [x.value if isinstance(x, enum.Enum) else x for x in v]
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], *, source: str = "") -> C:
        if not isinstance(data, dict):
            raise ConfigError(f"{source or cls.__name__}: expected a mapping of fields, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in names]
        if unknown:
            where = f"{source}: " if source else ""
            raise ConfigError(
                f"{where}unknown {cls.__name__} field {unknown[0]!r}{near(unknown[0], names)}; valid: {', '.join(names)}"
            )
        return cls(**data)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump({self.kind: self.to_dict()}, sort_keys=False)

    @classmethod
    def from_yaml(cls: type[C], text_or_path: str | Path) -> C:
        import yaml

        source = ""
        text = str(text_or_path)
        if isinstance(text_or_path, Path) or (len(text) < 4096 and "\n" not in text and Path(text).is_file()):
            source = str(text_or_path)
            text = Path(text_or_path).read_text()
        data = yaml.safe_load(text) or {}
        if isinstance(data, dict) and list(data) == [cls.kind]:
            data = data[cls.kind] or {}
        return cls.from_dict(data, source=source)

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)


def _build_nested(cfg: Config, hints: dict[str, Any]) -> None:
    """Nested configs: a field whose type hint is a :class:`Config` subclass accepts a mapping of that config's
    fields (as read from YAML) and holds the config built from it; any other value but an instance is refused."""
    for f in dataclasses.fields(cfg):
        types = _candidate_types(hints.get(f.name))
        sub = next((t for t in types if isinstance(t, type) and issubclass(t, Config)), None)
        value = getattr(cfg, f.name)
        if sub is None or isinstance(value, sub) or (value is None and type(None) in types):
            continue
        where, allowed = f"{type(cfg).__name__}.{f.name}", f"use a {sub.__name__} or a mapping of its fields"
        if isinstance(value, Config):
            raise ConfigError(f"{where} is a {type(value).__name__}; {allowed}")
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={_short(value)} is not allowed; {allowed}")
        object.__setattr__(cfg, f.name, sub.from_dict(value, source=where))


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _candidate_types(hint: Any) -> list[Any]:
    if hint is None:
        return []
    args = typing.get_args(hint)
    return [hint, *args] if args else [hint]


def renamed(new: str, default: Any = ()) -> Any:
    """A config field kept under its old name for one release: values given to it move to ``new`` (with a
    DeprecationWarning), and it is left out of ``to_dict``."""
    return dataclasses.field(default=default, metadata={"renamed_to": new})


def _merge_renamed(cfg: Config) -> None:
    import warnings

    for f in dataclasses.fields(cfg):
        new = f.metadata.get("renamed_to")
        value = getattr(cfg, f.name)
        if not new or value == f.default:
            continue
        warnings.warn(f"{type(cfg).__name__}.{f.name} is deprecated; use {new}= (the same values)", DeprecationWarning,
                      stacklevel=4)
        current = getattr(cfg, new)
        merged = tuple(current) + tuple(v for v in value if v not in current) if isinstance(value, tuple) else value
        object.__setattr__(cfg, new, merged)
        object.__setattr__(cfg, f.name, f.default)
