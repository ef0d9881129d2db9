"""Pipelines that compose the techniques (the only place that may import several of them)."""

from edgeslim.pipeline._demo import run_demo
from edgeslim.pipeline._recipe import load, save, steps
from edgeslim.pipeline._runtimes import measure_all_runtimes

__all__ = ["load", "measure_all_runtimes", "run_demo", "save", "steps"]
