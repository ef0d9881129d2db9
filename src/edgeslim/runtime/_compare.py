"""One candidate on several runtimes, side by side: the same inputs, the same thread count, interleaved timing.

``compare_runtimes`` returns one row per (label, runtime, artifact) and one row per registered runtime whose
package is not installed (with the pip line that installs it): nothing is skipped silently.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import nn

from edgeslim.core.artifact import Artifact
from edgeslim.core.errors import DataError, EdgeslimError
from edgeslim.core.metrics import compare, host_info
from edgeslim.core.progress import bar, progress_enabled
from edgeslim.runtime._runners import RUNTIMES, Runner, eval_model, missing, positive_int

log = logging.getLogger(__name__)


def _outputs(runner: Runner, x: np.ndarray) -> np.ndarray:
    """The runner's outputs for every sample of ``x``, at its fixed batch (padded) or in batches of 64."""
    bs = runner.fixed_batch or 64
    outs = []
    with runner:
        for i in range(0, len(x), bs):
            xb = x[i : i + bs]
            n = len(xb)
            if n < bs and runner.fixed_batch:
                xb = np.concatenate([xb, np.zeros((bs - n, *xb.shape[1:]), xb.dtype)])
            outs.append(np.asarray(runner.run(xb))[:n].reshape(n, -1))
    return np.concatenate(outs)


def compare_runtimes(
    candidates: Mapping[str, tuple[str, Any]],
    *,
    data: Any,
    reference: nn.Module | None = None,
    threads: int = 1,
    runs: int = 100,
    warmup: int = 10,
    rounds: int = 5,
    accuracy_samples: int | None = None,
    peak_memory: bool = True,
    list_missing: bool = True,
    progress: bool | None = None,
) -> list[dict[str, Any]]:
    """Measure each candidate on its runtime with the same inputs and thread count.

    Args:
        candidates: row label -> ``(runtime, target)``; the target is what that runtime loads (an Artifact
            or a file for file runtimes, an ``nn.Module`` for ``torch``).
        data: an ImageDataset: accuracy, output agreement and the latency input (its first sample, batch 1).
        reference: the torch model that agreement is measured against (top-1 agreement, cosine); without it
            agreement is not reported.
        threads: intra-op threads, the same for every runtime.
        runs: timed runs per candidate, split over ``rounds`` interleaved rounds (each round runs every
            candidate in turn, after ``warmup`` untimed runs before the first round; see
            :func:`~edgeslim.runtime.interleaved_latency`), so that a noisy host
            affects every runtime alike.
        accuracy_samples: use a seeded random subset of this many samples (default: all of ``data``).
        peak_memory: measure each candidate's extra peak RSS in a child process.
        list_missing: add a row for every registered runtime whose package is not installed.
        progress: progress bars on stderr; ``None`` inherits :func:`edgeslim.core.progress.progress_enabled`.

    Returns:
        rows with ``label``, ``runtime``, ``runtime_version``, ``format``, ``precision``, ``threads``,
        ``p50_ms``/``p90_ms``/``p99_ms`` (batch 1), ``peak_memory_mb``, ``top1_agreement``, ``cosine``,
        ``accuracy``, ``samples`` and ``status`` (``ok``, ``not installed``, or ``failed``) with ``note``.
    """
    with progress_enabled(progress):
        return _compare(
            candidates, data, reference, threads, runs, warmup, rounds, accuracy_samples, peak_memory, list_missing
        )


def _compare(
    candidates: Mapping[str, tuple[str, Any]],
    data: Any,
    reference: nn.Module | None,
    threads: int,
    runs: int,
    warmup: int,
    rounds: int,
    accuracy_samples: int | None,
    peak_memory: bool,
    list_missing: bool,
) -> list[dict[str, Any]]:
    from edgeslim.runtime._measure import _peak_memory_probe, check_classes, interleaved_latency

    threads, runs, rounds = positive_int("threads", threads), positive_int("runs", runs), positive_int("rounds", rounds)
    if data is None or len(data) == 0:
        raise DataError("compare_runtimes needs data=: real samples for accuracy, agreement and latency inputs")
    if accuracy_samples is not None:
        data = data.take(positive_int("accuracy_samples", accuracy_samples), seed=0)
    x = data.normalized().numpy()
    y = data.labels.numpy()
    ref = None
    if reference is not None:
        import torch

        ref_model = eval_model(reference)
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                ref = np.concatenate(
                    [ref_model(torch.from_numpy(x[i : i + 256])).float().numpy() for i in range(0, len(x), 256)]
                )
        finally:
            torch.set_num_threads(prev)
        ref = ref.reshape(len(ref), -1)

    rows: list[dict[str, Any]] = []
    live: list[tuple[dict[str, Any], Runner]] = []
    for label, (runtime, target) in bar(candidates.items(), desc="load and run each runtime", unit="runtime"):
        cls = RUNTIMES.get(runtime)
        fmt = "torch module" if isinstance(target, nn.Module) else getattr(target, "format", str(target))
        prec = (
            getattr(target, "edgeslim_precision", "fp32")
            if isinstance(target, nn.Module)
            else getattr(target, "precision", "unknown")
        )
        row: dict[str, Any] = {
            "label": label,
            "runtime": runtime,
            "format": fmt,
            "precision": prec,
            "threads": threads,
            "samples": len(x),
        }
        rows.append(row)
        how = missing(runtime)
        if how:
            row.update(status="not installed", note=how)
            continue
        try:
            if not isinstance(target, (nn.Module, Artifact)):
                target = Artifact.load(target)
            runner = cls(target, threads=threads)
            out = _outputs(runner, x)
        except EdgeslimError as e:
            row.update(status="failed", note=str(e))
            log.warning("%s on %s failed: %s", label, runtime, e)
            continue
        check_classes(out.shape[1], data, label)
        row.update(
            status="ok",
            runtime_version=runner.version,
            describe=runner.describe(),
            accuracy=float((out.argmax(1) == y).mean()),
            target=target,
        )
        if ref is not None:
            c = compare(ref, out)
            row["top1_agreement"], row["cosine"] = c["top1_agreement"], c["cosine"]
        live.append((row, runner))

    per_round = max(1, -(-runs // rounds))
    lat = (
        interleaved_latency(
            {str(i): runner for i, (_, runner) in enumerate(live)},
            x[:1],
            rounds=rounds,
            runs=per_round,
            warmup=warmup,
            rewarm=1,
        )
        if live
        else {}
    )
    for i, (row, _) in enumerate(live):
        t = lat[str(i)]
        row["p50_ms"], row["p90_ms"], row["p99_ms"], row["runs"] = t["p50_ms"], t["p90_ms"], t["p99_ms"], t["runs"]
        if peak_memory:
            target = row["target"]
            try:
                row["peak_memory_mb"] = _peak_memory_probe(target, row["runtime"], (1, *x.shape[1:]), threads, 5)[0]
            except EdgeslimError as e:
                row["peak_memory_mb"] = None
                row["note"] = f"peak memory: {e}"
    for row in rows:
        t = row.pop("target", None)
        if isinstance(t, Artifact):
            row["path"] = str(t.path)

    if list_missing:
        asked = {rt for rt, _ in candidates.values()}
        for name in RUNTIMES:
            how = missing(name)
            if how and name not in asked:
                rows.append(
                    {"label": name, "runtime": name, "status": "not installed", "note": how, "threads": threads}
                )
    host = host_info()
    for row in rows:
        row["host"] = f"{host['cpu']} ({host['cores']} cores)"
    return rows


def render_rows(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of :func:`compare_runtimes` rows."""
    head = [
        "candidate",
        "runtime",
        "format",
        "precision",
        "thr",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "peak MB",
        "top-1 agr",
        "cosine",
        "accuracy",
    ]

    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    lines = []
    for r in rows:
        if r.get("status") != "ok":
            lines.append(
                [
                    r["label"],
                    r["runtime"],
                    r.get("format", "-"),
                    r.get("precision", "-"),
                    str(r["threads"]),
                    f"{r['status']}: {r.get('note', '')}",
                ]
            )
            continue
        lines.append(
            [
                r["label"],
                f"{r['runtime']} {r['runtime_version']}",
                r["format"],
                r["precision"],
                str(r["threads"]),
                f(r["p50_ms"], ".3f"),
                f(r["p90_ms"], ".3f"),
                f(r["p99_ms"], ".3f"),
                f(r.get("peak_memory_mb"), ".1f"),
                f(r.get("top1_agreement"), ".4f"),
                f(r.get("cosine"), ".6f"),
                f(r["accuracy"], ".4f"),
            ]
        )
    widths = [
        max(len(h), *(len(ln[i]) for ln in lines if len(ln) > i and len(ln) == len(head))) if lines else len(h)
        for i, h in enumerate(head)
    ]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    for ln in lines:
        if len(ln) == len(head):
            out.append("  ".join(c.ljust(w) for c, w in zip(ln, widths)))
        else:
            out.append("  ".join(c.ljust(w) for c, w in zip(ln[:5], widths)) + "  " + ln[5])
    return "\n".join(out)
