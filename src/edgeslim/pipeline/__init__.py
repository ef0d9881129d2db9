"""Pipelines that compose the techniques (the only place that may import several of them).

``optimize`` searches chains of the verbs for the candidate that meets a :class:`Budget`; ``run_demo`` is the
fixed demo chain (baseline -> INT8 PTQ -> export -> measure -> report).
"""

from edgeslim.pipeline._budget import Budget, Prefer, Violation
from edgeslim.pipeline._candidate import build_candidate
from edgeslim.pipeline._demo import run_demo
from edgeslim.pipeline._optimize import OptimizeReport, OptimizeResult, load_chosen, optimize, pareto_front
from edgeslim.pipeline._recipe import load, save, steps
from edgeslim.pipeline._runtimes import measure_all_runtimes
from edgeslim.pipeline._space import Space

__all__ = [
    "Budget",
    "OptimizeReport",
    "OptimizeResult",
    "Prefer",
    "Space",
    "Violation",
    "build_candidate",
    "load",
    "load_chosen",
    "measure_all_runtimes",
    "optimize",
    "pareto_front",
    "run_demo",
    "save",
    "steps",
]
