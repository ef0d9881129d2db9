"""The one report protocol: what every verb's result carries as ``.report``."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Report(Protocol):
    """What a verb did.

    Attributes:
        technique: the verb's technique name (``prune``, ``quantize``, ``distill``, ``cluster``, ``tie``,
            ``factorize``, ``separable``), the same name its recipe step and its export record use.
    """

    technique: str

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-able): what was done, per layer where it applies, and what was left alone and why."""
        ...

    def summary(self) -> str:
        """A few human lines; anything skipped, left float or made slower is said here."""
        ...
