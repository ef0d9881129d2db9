"""Pipelines that compose the techniques (the only place that may import several of them)."""

from edgeslim.pipeline._demo import run_demo

__all__ = ["run_demo"]
