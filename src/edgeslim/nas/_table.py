"""The per-layer latency lookup table: each layer timed on a runtime as that runtime runs it, cached per host.

An entry is one :class:`~edgeslim.nas._layers.LayerOp` at one pair of widths, timed as a one-layer ONNX model
(:func:`~edgeslim.nas._layers.micro_onnx`) at batch 1, FP32, on the table's runtime and thread count: a warm-up, then
several rounds in which every entry of a batch gets one turn of timed runs (interleaved, so load drifting on a shared
host hits all of them alike); the entry is the median of the round medians.

One table file holds one runtime, runtime version, thread count and host. The file name carries a hash of the host's
CPU model and ISA flags (:func:`edgeslim.core.metrics.host_info`) and the file repeats them, so another host (one with
AVX-512 VNNI where this one has only AVX2) never reads this host's figures. Files live in
``~/.cache/edgeslim/latency/`` unless a folder is given (or ``EDGESLIM_LATENCY_DIR`` is set), and are written
atomically; entries another process wrote meanwhile are merged in, not lost.

Widths are looked up on a grid (:meth:`LatencyTable.estimate`): only the grid points a search space needs are timed,
and a width between two grid points is interpolated linearly (bilinearly in ``cin`` x ``cout``).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeslim.core.errors import ConfigError, ModelError, RuntimeBackendError
from edgeslim.nas._layers import LayerOp, micro_onnx

log = logging.getLogger(__name__)

FORMAT = "edgeslim.latency-table/1"
ENV_DIR = "EDGESLIM_LATENCY_DIR"


def default_dir() -> Path:
    """Where tables are cached: ``$EDGESLIM_LATENCY_DIR``, else ``~/.cache/edgeslim/latency``."""
    env = os.environ.get(ENV_DIR)
    return Path(env) if env else Path.home() / ".cache" / "edgeslim" / "latency"


def host_key(host: dict | None = None) -> dict[str, str]:
    """The host facts a table is bound to: CPU model and vector ISA flags."""
    from edgeslim.core.metrics import host_info

    h = host if host is not None else host_info()
    return {"cpu": str(h.get("cpu", "?")), "isa": str(h.get("isa", "?"))}


def runtime_version(runtime: str) -> str:
    """The installed version of ``runtime`` (a runner that loads ONNX files), or a one-line error saying what to do."""
    import importlib

    from edgeslim.runtime import RUNTIMES, missing

    cls = RUNTIMES.get(runtime)
    if "onnx" not in cls.formats:
        onnx_ones = [n for n in RUNTIMES if "onnx" in RUNTIMES.get(n).formats]
        raise ConfigError(
            f"runtime={runtime!r} does not load ONNX files, so the latency table cannot time layers on "
            f"it; runtimes that can: {', '.join(onnx_ones)}"
        )
    how = missing(runtime)
    if how:
        raise RuntimeBackendError(f"runtime {runtime!r} is not installed here; {how}")
    return str(importlib.import_module(cls.requires[0]).__version__)


class LatencyTable:
    """Measured per-layer latencies (ms) for one runtime, version, thread count and host.

    Attributes:
        runtime, version, threads: what the entries were timed on.
        host: ``{"cpu", "isa"}`` of the host they were timed on.
        entries: ``LayerOp.key(cin, cout)`` -> ``{"ms", "spread_pct"}``.
        path: the cache file.
        measured: entries timed by this object (not read from the cache).
    """

    def __init__(
        self,
        runtime: str,
        threads: int,
        *,
        directory: str | os.PathLike | None = None,
        host: dict | None = None,
        version: str | None = None,
    ) -> None:
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ConfigError(f"threads={threads!r} is not allowed; use an integer >= 1")
        self.runtime = str(runtime)
        self.version = version or runtime_version(self.runtime)
        self.threads = threads
        self.host = host_key(host)
        digest = hashlib.sha256(f"{self.host['cpu']}|{self.host['isa']}".encode()).hexdigest()[:12]
        self.dir = Path(directory) if directory is not None else default_dir()
        # a version may hold '/' (OpenVINO: "2026.4.1-...-releases/2026/4"): one file name, never a sub-folder
        safe = re.sub(r"[^A-Za-z0-9._+-]", "_", self.version)
        self.path = self.dir / f"{self.runtime}-{safe}-t{threads}-fp32-{digest}.json"
        self.entries: dict[str, dict[str, float]] = {}
        self.measured = 0
        self.entries.update(self._read())

    # ------------------------------------------------------------------------------------------- the file
    def _read(self) -> dict[str, dict[str, float]]:
        if not self.path.is_file():
            return {}
        try:
            blob = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            log.warning("latency table %s is unreadable (%s); it will be rebuilt", self.path, e)
            return {}
        head = {k: blob.get(k) for k in ("format", "runtime", "version", "threads", "host")}
        want = {
            "format": FORMAT,
            "runtime": self.runtime,
            "version": self.version,
            "threads": self.threads,
            "host": self.host,
        }
        if head != want:  # a hash collision or a hand-copied file: never use another host's figures
            log.warning("latency table %s was made for %s, not for %s; it is ignored", self.path, head, want)
            return {}
        return dict(blob.get("entries", {}))

    def save(self) -> Path:
        """Write the table atomically, merging in entries another process added since it was read."""
        from edgeslim.core.io import write_json

        merged = {**self._read(), **self.entries}
        self.entries = merged
        write_json(
            self.path,
            {
                "format": FORMAT,
                "runtime": self.runtime,
                "version": self.version,
                "threads": self.threads,
                "dtype": "fp32",
                "batch": 1,
                "host": self.host,
                "entries": dict(sorted(merged.items())),
            },
            force=True,
        )
        return self.path

    def describe(self) -> str:
        return (
            f"{self.runtime} {self.version}, {self.threads} thread{'s' * (self.threads != 1)}, FP32, batch 1, "
            f"on {self.host['cpu']} ({self.host['isa']})"
        )

    # ---------------------------------------------------------------------------------------- measuring
    def missing(self, requests: Iterable[tuple[LayerOp, int, int]]) -> list[tuple[LayerOp, int, int]]:
        """The requests ``(op, cin, cout)`` the table has no entry for (each once)."""
        out, seen = [], set()
        for op, cin, cout in requests:
            k = op.key(cin, cout)
            if k not in self.entries and k not in seen:
                seen.add(k)
                out.append((op, cin, cout))
        return out

    def measure(
        self,
        requests: Iterable[tuple[LayerOp, int, int]],
        *,
        rounds: int = 5,
        batch: int = 32,
        max_seconds_per_turn: float = 0.02,
        allow_build: bool = True,
        save: bool = True,
    ) -> int:
        """Time every request the table lacks; return how many were timed.

        Raises:
            ModelError: entries are missing and ``allow_build`` is false (the message names the file and runtime).
        """
        todo = self.missing(requests)
        if not todo:
            return 0
        if not allow_build:
            raise ModelError(
                f"no latency table for {self.describe()} covers this search space ({len(todo)} of its "
                f"layer entries are missing from {str(self.path)!r}); build it with build_table=True "
                "(minutes, once per host) or pick a runtime/threads that has one"
            )
        from edgeslim.runtime import RUNTIMES, interleaved_latency

        t0 = time.perf_counter()
        cls = RUNTIMES.get(self.runtime)
        with tempfile.TemporaryDirectory(prefix="edgeslim-lut-") as td:
            for start in range(0, len(todo), batch):
                chunk = todo[start : start + batch]
                calls = {}
                for i, (op, cin, cout) in enumerate(chunk):
                    p = Path(td) / f"l{start + i}.onnx"
                    p.write_bytes(micro_onnx(op, cin, cout))
                    runner = cls(p, threads=self.threads)
                    shape = (1, cin) if op.op == "linear" else (1, cin, op.height, op.width)
                    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
                    calls[op.key(cin, cout)] = lambda r=runner, x=x: r.run(x)
                got = interleaved_latency(
                    calls,
                    None,
                    rounds=rounds,
                    runs=200,
                    warmup=3,
                    rewarm=2,
                    shuffle=True,
                    seed=start,
                    max_seconds_per_turn=max_seconds_per_turn,
                    min_runs=5,
                )
                for k, v in got.items():
                    self.entries[k] = {
                        "ms": round(v["median_of_rounds_ms"], 6),
                        "spread_pct": round(v["round_spread_pct"], 2),
                    }
                self.measured += len(chunk)
                log.info(
                    "latency table: %d/%d entries timed (%.0f s)",
                    start + len(chunk),
                    len(todo),
                    time.perf_counter() - t0,
                )
                if save:
                    self.save()
        return len(todo)

    # ------------------------------------------------------------------------------------------ lookups
    def get(self, op: LayerOp, cin: int, cout: int) -> float:
        """The measured entry (ms) at exactly these widths."""
        k = op.key(cin, cout)
        try:
            return float(self.entries[k]["ms"])
        except KeyError:
            raise ModelError(f"latency table {str(self.path)!r} has no entry {k!r}; measure it first") from None

    def estimate(self, op: LayerOp, cin: int, cout: int, grid_in: Sequence[int], grid_out: Sequence[int]) -> float:
        """The latency (ms) at widths ``cin`` x ``cout``, interpolated between the timed grid points.

        A depthwise op moves along one axis (``cin == cout``; ``grid_out`` is its grid). A width outside its grid
        is extrapolated from the two nearest points (never below zero).
        """
        if op.depthwise:
            i0, i1, t = _bracket(grid_out, cout)
            a, b = self.get(op, grid_out[i0], grid_out[i0]), self.get(op, grid_out[i1], grid_out[i1])
            return max(0.0, a + (b - a) * t)
        j0, j1, u = _bracket(grid_in, cin)
        i0, i1, t = _bracket(grid_out, cout)
        v00 = self.get(op, grid_in[j0], grid_out[i0])
        v01 = self.get(op, grid_in[j0], grid_out[i1])
        v10 = self.get(op, grid_in[j1], grid_out[i0])
        v11 = self.get(op, grid_in[j1], grid_out[i1])
        top = v00 + (v01 - v00) * t
        bot = v10 + (v11 - v10) * t
        return max(0.0, top + (bot - top) * u)


def _bracket(grid: Sequence[int], w: int) -> tuple[int, int, float]:
    """Indices of the grid points around ``w`` and the fraction of the way from the first to the second."""
    g = list(grid)
    if not g:
        raise ModelError("an empty width grid")
    if len(g) == 1:
        return 0, 0, 0.0
    i = bisect.bisect_left(g, w)
    if i < len(g) and g[i] == w:
        return i, i, 0.0
    i = min(max(i, 1), len(g) - 1)  # outside the grid: the two nearest points, extrapolated
    lo, hi = g[i - 1], g[i]
    return i - 1, i, (w - lo) / (hi - lo)


def table_info(table: LatencyTable) -> dict[str, Any]:
    return {
        "path": str(table.path),
        "runtime": table.runtime,
        "version": table.version,
        "threads": table.threads,
        "host": table.host,
        "entries": len(table.entries),
        "timed_now": table.measured,
    }
