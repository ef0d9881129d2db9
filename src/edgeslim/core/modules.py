"""Module selection by name pattern and submodule surgery, shared by every technique.

Patterns are module names or ``fnmatch`` globs (``features.*``, ``encoder.layer.?.attention.*``), matched
case-sensitively against the dotted names of ``model.named_modules()``. A pattern that matches nothing is an
error (:class:`~edgeslim.core.errors.ConfigError`) naming the field, the pattern and the nearest names: a typo
never silently selects nothing.

>>> select(model, ("features.*",), skip=("features.0",), eligible=lambda m: isinstance(m, nn.Conv2d))
>>> set_module(model, "features.3", nn.Identity())
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence

from torch import nn

from edgeslim.core.errors import ConfigError, ModelError, near

__all__ = ["first_match", "get_module", "owner_of", "require_matches", "select", "set_module"]

_SHOWN = 12  # names listed in an error message


def first_match(name: str, patterns: Iterable[str]) -> str | None:
    """The first of ``patterns`` (module names or fnmatch globs) that ``name`` matches, or None."""
    return next((p for p in patterns if p == name or fnmatch.fnmatchcase(name, p)), None)


def _listing(what: str, names: Sequence[str]) -> str:
    more = f" ... ({len(names)} in all)" if len(names) > _SHOWN else ""
    return f"{what} names: {', '.join(names[:_SHOWN])}{more}" if names else f"the model has no {what}"


def require_matches(
    names: Sequence[str],
    patterns: Iterable[str],
    *,
    field: str,
    what: str = "module",
    others: Sequence[tuple[str, nn.Module]] = (),
) -> None:
    """Raise :class:`ConfigError` for the first of ``patterns`` that matches none of ``names``.

    Args:
        names: the candidate names (e.g. the eligible layers).
        patterns: module names or fnmatch globs.
        field: the config field the patterns come from, e.g. ``"QuantConfig.exclude"``.
        what: what ``names`` are, in words (``"quantizable layer"``, ``"Linear/Conv layer"``).
        others: all ``(name, module)`` pairs of the model: a pattern matching only non-candidates says which
            module it did match and its type.
    """
    for p in patterns:
        if any(first_match(n, (p,)) for n in names):
            continue
        other = next((f" ({n!r} is a {type(m).__name__})" for n, m in others if first_match(n, (p,))), "")
        raise ConfigError(f"{field} pattern {p!r} matches no {what}{other}{near(p, names)}; {_listing(what, names)}")


def select(
    model: nn.Module,
    layers: Sequence[str] = (),
    skip: Sequence[str] = (),
    eligible: Callable[[nn.Module], bool] | None = None,
    what: str = "module",
    *,
    owner: str = "",
    fields: tuple[str, str] = ("layers", "exclude"),
) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs of ``model`` that are eligible, match ``layers`` and match no ``skip`` pattern.

    Args:
        model: the model (its root, named ``""``, is never selected).
        layers: module names or fnmatch globs to select; empty selects every eligible module.
        skip: module names or globs to leave out of the selection.
        eligible: which modules may be selected (default: every module).
        what: the eligible modules in words, for error messages.
        owner: the config class name, prefixed to the field in error messages (``"ClusterConfig"``).
        fields: the field names of ``layers`` and ``skip`` in error messages.

    Returns:
        The selected pairs in ``named_modules()`` order.

    Raises:
        ConfigError: a pattern of ``layers`` or ``skip`` matches no eligible module.
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    cands = [(n, m) for n, m in named if eligible is None or eligible(m)]
    names = [n for n, _ in cands]
    for f, patterns in zip(fields, (layers, skip)):
        require_matches(names, patterns, field=f"{owner}.{f}" if owner else f, what=what, others=named)
    return [
        (n, m) for n, m in cands if (not layers or first_match(n, layers) is not None) and first_match(n, skip) is None
    ]


def owner_of(model: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    """The module holding the attribute at ``dotted`` (a submodule, parameter or buffer name) and the attribute."""
    parent, _, attr = dotted.rpartition(".")
    return get_module(model, parent), attr


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at dotted ``name`` (``""`` is ``model``); a missing one raises naming the nearest names."""
    if not name:
        return model
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        raise ModelError(f"{type(model).__name__} has no submodule {name!r}{near(name, names)}") from None


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` of ``model`` by ``new`` (in place)."""
    if not name:
        raise ModelError("set_module: cannot replace the root module (name '')")
    parent, attr = owner_of(model, name)
    setattr(parent, attr, new)
