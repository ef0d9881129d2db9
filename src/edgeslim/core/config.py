"""Frozen, validated config dataclasses that round-trip to dict and YAML.

Each technique's config subclasses :class:`Config`. Fields hold plain data only (numbers, strings,
str Enums, tuples of those, nested configs); runtime objects such as data or teachers are arguments of the verb.
A nested config field accepts a mapping of its fields (as YAML gives it) and writes one.
Enum fields accept plain strings; ``from_dict`` rejects unknown keys and names the valid ones.

Every field is checked against its type hint when a config is made: a ``bool`` field takes only ``True`` or
``False`` (the string ``"no"`` is refused, it is not silently true), an ``int`` field only integers (not bools),
a ``float`` field integers or floats, a ``str`` field only strings, a ``tuple[str, ...]`` only strings, and so on.
Collections hold at most :data:`MAX_ITEMS` entries, and YAML with more than :data:`MAX_YAML_NODES` nodes once its
aliases are expanded is refused before it is built (an "alias bomb" of nested references).
"""

from __future__ import annotations

import dataclasses
import enum
import numbers
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from edgeslim.core.errors import ConfigError, near, shown

C = TypeVar("C", bound="Config")

CONFIGS: dict[str, type[Config]] = {}

#: most entries a config collection (tuple, dict) may hold
MAX_ITEMS = 10_000
#: most YAML nodes a config file may expand to (aliases counted at every use)
MAX_YAML_NODES = 100_000


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
            f"{cls_name}.{field}={shown(value)} is not allowed{near(value, enum_type.values())}; "
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
                    value = _coerce_enum(type(self).__name__, f.name, t, value)
                    break
            value = _checked(type(self).__name__, f.name, hint, value)
            object.__setattr__(self, f.name, value)
        _build_nested(self, hints)
        _merge_renamed(self)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the field, the value and what is allowed."""

    def _bad(self, field: str, allowed: str) -> ConfigError:
        return ConfigError(f"{type(self).__name__}.{field}={shown(getattr(self, field))} is not allowed; {allowed}")

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
        """A config from YAML text or a YAML file (``{kind: {fields}}`` or just ``{fields}``).

        Raises:
            ConfigError: the file is missing or unreadable, the YAML is malformed, uses tags other than plain
                data (``!!python/object`` ...), expands to more than :data:`MAX_YAML_NODES` nodes, or a field is
                unknown or has a value that is not allowed. The message names the file, line and field.
        """
        source = ""
        text = str(text_or_path)
        if isinstance(text_or_path, Path) or (len(text) < 4096 and "\n" not in text and Path(text).is_file()):
            source = str(text_or_path)
            p = Path(text_or_path)
            if not p.is_file():
                raise ConfigError(
                    f"config file {source!r} does not exist"
                    if not p.exists()
                    else f"config file {source!r} is not a file"
                )
            try:
                text = p.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(
                    f"cannot read config file {source!r}: {type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}"
                ) from None
        data = load_yaml(text, source=source or f"{cls.__name__} YAML") or {}
        if isinstance(data, dict) and list(data) == [cls.kind]:
            data = data[cls.kind] or {}
        try:
            return cls.from_dict(data, source=source)
        except ConfigError as e:
            if source and source not in str(e):
                raise ConfigError(f"{source}: {e}") from None
            raise

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


def load_yaml(text: str, *, source: str = "YAML", max_nodes: int = MAX_YAML_NODES) -> Any:
    """Plain YAML data (``safe_load`` rules) with every failure as one-line :class:`ConfigError`.

    The document is composed first, and its size with every alias expanded is counted on the node graph
    (each distinct node once, so the count itself is cheap) before any Python object is built.
    """
    import yaml

    def where(mark: Any) -> str:
        return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        n = _expanded_size(node, {}, max_nodes)
        if n > max_nodes:
            raise ConfigError(
                f"{source}: the YAML expands to more than {max_nodes:,} values once its aliases (*name) "
                "are expanded; a config is far smaller (refused before it is built)"
            )
        return loader.construct_document(node)
    except yaml.constructor.ConstructorError as e:
        problem = " ".join(str(e.problem or "").split())
        if "constructor for the tag" in problem:
            problem = (
                f"the tag {problem.split('tag', 1)[1].strip()} is not allowed: configs are plain YAML data "
                "(mappings, lists, strings, numbers, booleans)"
            )
        raise ConfigError(f"{source}{where(e.problem_mark)}: {problem}") from None
    except yaml.MarkedYAMLError as e:
        problem = " ".join(str(e.problem or e.context or "malformed YAML").split())
        raise ConfigError(f"{source}: YAML syntax error{where(e.problem_mark)}: {problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {' '.join(str(e).split())[:200]}") from None
    finally:
        loader.dispose()


def _expanded_size(node: Any, memo: dict[int, int], cap: int) -> int:
    """Nodes under ``node`` with aliases expanded (memoized per node object; stops counting past ``cap``)."""
    import yaml

    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = cap + 1  # a node reached again while being counted is a recursive alias: too big
    total = 1
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [x for kv in node.value for x in kv]
    else:
        children = []
    for child in children:
        total += _expanded_size(child, memo, cap)
        if total > cap:
            break
    memo[key] = min(total, cap + 1)
    return memo[key]


def _describe(hint: Any) -> str:
    """A type hint in words, for messages."""
    if hint is bool:
        return "true or false (a boolean, not a string)"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "a string"
    if isinstance(hint, type) and issubclass(hint, StrEnum):
        return "one of " + ", ".join(hint.values())
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is tuple:
        return (
            f"a list of {_describe(args[0])}"
            if len(args) == 2 and args[1] is Ellipsis
            else (f"a list of {len(args)} values")
        )
    if origin is dict or hint is dict:
        return "a mapping" + (f" of {_describe(args[0])} to {_describe(args[1])}" if args else "")
    return str(hint)


class _Mismatch(Exception):
    pass


def _conform(hint: Any, value: Any) -> Any:
    """``value`` as the type ``hint`` says (lists become tuples), or raise :class:`_Mismatch`."""
    if hint is None or hint is Any or isinstance(hint, typing.TypeVar):
        return value
    if hint is type(None):
        if value is None:
            return None
        raise _Mismatch
    if hint is bool:
        if isinstance(value, bool) or type(value).__name__ == "bool_":  # numpy booleans too
            return bool(value)
        raise _Mismatch
    if hint is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool) and type(value).__name__ != "bool_":
            return value
        raise _Mismatch
    if hint is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_":
            return value
        raise _Mismatch
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        if isinstance(value, hint):
            return value
        raise _Mismatch
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for a in args:
            try:
                return _conform(a, value)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is tuple or hint is tuple:
        if not isinstance(value, (list, tuple)) or len(value) > MAX_ITEMS:
            raise _Mismatch
        if not args:
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_conform(args[0], v) for v in value)
        if len(args) != len(value):
            raise _Mismatch
        return tuple(_conform(a, v) for a, v in zip(args, value))
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping) or len(value) > MAX_ITEMS:
            raise _Mismatch
        if not args:
            return value
        return {_conform(args[0], k): _conform(args[1], v) for k, v in value.items()}
    return value  # a hint this checker does not know: the config's validate() checks it


def _checked(cls_name: str, field: str, hint: Any, value: Any) -> Any:
    try:
        return _conform(hint, value)
    except _Mismatch:
        size = len(value) if isinstance(value, (list, tuple, Mapping)) else 0
        extra = f" (it has {size:,} entries; at most {MAX_ITEMS:,} are allowed)" if size > MAX_ITEMS else ""
        raise ConfigError(
            f"{cls_name}.{field}={shown(value)} is not allowed; expected {_describe(hint)}{extra}"
        ) from None
    except RecursionError:
        raise ConfigError(f"{cls_name}.{field} is nested too deeply") from None


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
        warnings.warn(
            f"{type(cfg).__name__}.{f.name} is deprecated; use {new}= (the same values)",
            DeprecationWarning,
            stacklevel=4,
        )
        current = getattr(cfg, new)
        merged = tuple(current) + tuple(v for v in value if v not in current) if isinstance(value, tuple) else value
        object.__setattr__(cfg, new, merged)
        object.__setattr__(cfg, f.name, f.default)
