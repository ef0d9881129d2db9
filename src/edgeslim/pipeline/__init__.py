"""Pipelines that compose the techniques (the only place that may import several of them)."""

from edgeslim.pipeline._demo import run_demo
from edgeslim.pipeline._runtimes import measure_all_runtimes

__all__ = ["measure_all_runtimes", "run_demo"]
