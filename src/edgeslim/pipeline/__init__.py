"""Pipelines that compose the techniques (the only place that may import several of them)."""

from edgeslim.pipeline._demo import run_demo
from edgeslim.pipeline._recipe import load, save, steps

__all__ = ["load", "run_demo", "save", "steps"]
