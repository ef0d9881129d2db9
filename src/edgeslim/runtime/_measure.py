"""The ``measure`` verb: size, parameters, MACs, accuracy, latency percentiles, throughput and peak memory.

Every figure says where it came from: measured figures name the runtime and its version, threads, batch,
number of runs and the host CPU; computed figures name their method.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeslim.core.artifact import Artifact
from edgeslim.core.counting import count_macs, count_params
from edgeslim.core.errors import ConfigError, DataError, RuntimeBackendError
from edgeslim.core.metrics import Metrics, host_info
from edgeslim.core.progress import bar, progress_enabled
from edgeslim.runtime._runners import RUNTIMES, Runner, eval_model, positive_int
from edgeslim.runtime._static import _load, onnx_macs_detail, onnx_params

log = logging.getLogger(__name__)


def latency(
    runner: Runner | Callable[[np.ndarray], Any],
    x: np.ndarray,
    *,
    warmup: int = 10,
    runs: int = 100,
    max_seconds: float = 10.0,
) -> dict[str, float]:
    """Latency of ``runner.run(x)``: ``warmup`` untimed runs, then up to ``runs`` timed runs.

    Warm-up and timed runs together stop after ``max_seconds`` (at least one timed run is always done).

    Returns:
        ``p50_ms``, ``p90_ms``, ``p99_ms``, ``mean_ms``, ``min_ms``, ``runs`` (timed runs done) and
        ``warmup_runs``.
    """
    runs, warmup = positive_int("runs", runs), positive_int("warmup", warmup, 0)
    if not max_seconds > 0:
        raise ConfigError(f"max_seconds={max_seconds!r} is not allowed; use a number > 0")
    run = runner.run if isinstance(runner, Runner) else runner
    deadline = time.perf_counter_ns() + int(max_seconds * 1e9)
    times: list[int] = []
    done_warmup = 0
    with runner if isinstance(runner, Runner) else contextlib.nullcontext():
        while done_warmup < warmup and time.perf_counter_ns() < deadline:
            run(x)
            done_warmup += 1
        while len(times) < runs:
            t0 = time.perf_counter_ns()
            run(x)
            t1 = time.perf_counter_ns()
            times.append(t1 - t0)
            if t1 >= deadline:
                break
    ms = np.asarray(times, dtype=np.float64) / 1e6
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "mean_ms": float(ms.mean()),
        "min_ms": float(ms.min()),
        "runs": len(times),
        "warmup_runs": done_warmup,
    }


def interleaved_latency(
    runners: Mapping[str, Runner | Callable[..., Any]],
    x: Any = None,
    *,
    rounds: int = 3,
    runs: int = 100,
    warmup: int = 10,
    rewarm: int = 1,
    shuffle: bool = False,
    seed: int = 0,
    max_seconds_per_turn: float | None = None,
    min_runs: int = 1,
) -> dict[str, dict[str, Any]]:
    """Latency of several runners side by side: each round gives every runner one turn of timed runs, so that
    load drifting on a shared host hits all of them alike.

    Args:
        runners: label -> a :class:`Runner` (``run(x)``; entered as a context for each turn, which sets its threads)
            or a callable (called with ``x``, or with no argument when ``x`` is None: bind per-runner inputs there).
        x: the input every runner gets (None: the callables take none).
        rounds: rounds; each runs every runner in turn.
        runs: timed runs per runner per turn.
        warmup: untimed runs per runner before the first round.
        rewarm: untimed runs at the start of every turn (caches after the other runners ran).
        shuffle: reshuffle the runners' order every round (seeded by ``seed`` and the round).
        max_seconds_per_turn: end a turn early once it has lasted this long and ``min_runs`` runs are done.

    Returns:
        label -> ``p50_ms``, ``p90_ms``, ``p99_ms``, ``mean_ms``, ``min_ms`` over all timed runs, ``runs`` (timed
        runs done), ``rounds``, ``round_p50_ms`` (each round's median), ``median_of_rounds_ms`` and
        ``round_spread_pct`` (interquartile range of the round medians over their median, in percent: the noise).
    """
    import random

    rounds, runs = positive_int("rounds", rounds), positive_int("runs", runs)
    warmup, rewarm, min_runs = (
        positive_int("warmup", warmup, 0),
        positive_int("rewarm", rewarm, 0),
        positive_int("min_runs", min_runs),
    )
    if max_seconds_per_turn is not None and not max_seconds_per_turn > 0:
        raise ConfigError(f"max_seconds_per_turn={max_seconds_per_turn!r} is not allowed; use a number > 0 or None")
    if not runners:
        raise ConfigError("interleaved_latency needs at least one runner")

    def bind(r: Runner | Callable[..., Any]) -> tuple[Callable[[], Any], Any]:
        if isinstance(r, Runner):
            return (lambda: r.run(x)), r
        return ((lambda: r(x)) if x is not None else r), contextlib.nullcontext()

    bound = {k: bind(r) for k, r in runners.items()}
    for fn, ctx in bound.values():
        with ctx:
            for _ in range(warmup):
                fn()
    per_round: dict[str, list[list[int]]] = {k: [] for k in bound}
    order = list(bound)
    for r in range(rounds):
        if shuffle:
            random.Random(seed + r).shuffle(order)
        for k in order:
            fn, ctx = bound[k]
            ts: list[int] = []
            with ctx:
                for _ in range(rewarm):
                    fn()
                end = time.perf_counter_ns() + int(max_seconds_per_turn * 1e9) if max_seconds_per_turn else None
                while len(ts) < runs:
                    t0 = time.perf_counter_ns()
                    fn()
                    t1 = time.perf_counter_ns()
                    ts.append(t1 - t0)
                    if end is not None and t1 >= end and len(ts) >= min_runs:
                        break
            per_round[k].append(ts)
    out: dict[str, dict[str, Any]] = {}
    for k, rs in per_round.items():
        ms = np.asarray([t for ts in rs for t in ts], np.float64) / 1e6
        meds = [float(np.median(ts)) / 1e6 for ts in rs]
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        med = float(np.median(meds))
        q1, q3 = np.percentile(meds, [25, 75])
        out[k] = {
            "p50_ms": float(p50),
            "p90_ms": float(p90),
            "p99_ms": float(p99),
            "mean_ms": float(ms.mean()),
            "min_ms": float(ms.min()),
            "runs": int(ms.size),
            "rounds": rounds,
            "round_p50_ms": meds,
            "median_of_rounds_ms": med,
            "round_spread_pct": float((q3 - q1) / med * 100) if med else 0.0,
        }
    return out


def _positive_ints(name: str, values: int | Iterable[int]) -> tuple[int, ...]:
    out = (values,) if isinstance(values, int) else tuple(values)
    if not out:
        raise ConfigError(f"{name}={values!r} is not allowed; give one or more integers >= 1")
    return tuple(positive_int(name, v) for v in out)


def measure(
    target: Artifact | str | Path | nn.Module,
    *,
    data: Any = None,
    runtime: str | None = None,
    threads: int | Iterable[int] = (1,),
    batch_sizes: int | Iterable[int] = (1,),
    runs: int = 100,
    warmup: int = 10,
    accuracy_samples: int | None = None,
    peak_memory: bool = True,
    label: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    max_seconds: float = 10.0,
    progress: bool | None = None,
) -> Metrics:
    """Measure an artifact (or a torch model) on a runtime.

    Args:
        target: an :class:`Artifact`, a path to an ``.onnx`` file, or a ``torch.nn.Module``.
        data: an ``ImageDataset``: real inputs for latency and labels for top-1 accuracy; or, for a detector, a
            ``DetectionDataset``: real images for latency and COCO ``map`` / ``map50`` (pycocotools, computed on
            the target's output in this runtime, NMS outside the graph) instead of top-1. Without it latency runs
            on zeros and accuracy is not reported.
        runtime: a name in ``RUNTIMES``; by default ``onnxruntime`` for files and ``torch`` for modules.
        threads: intra-op thread counts to measure latency at.
        batch_sizes: batch sizes to measure latency at (batch > 1 needs a dynamic batch dimension).
        runs: timed runs per (threads, batch) setting, after ``warmup`` untimed runs; each setting stops
            after ``max_seconds`` too.
        accuracy_samples: measure accuracy on a seeded random subset of this many samples (default: all).
        peak_memory: measure ``peak_memory_mb``, the extra peak RSS of loading and running the model, in a
            child process.
        label: the name of this stage in reports (default: the file name or the module's class name).
        input_shape: one sample's shape ``(C, H, W)``, for a module measured without ``data`` or an artifact
            whose input shape is not fixed in the file (dynamic rank or symbolic sizes).
        progress: show progress bars on stderr (accuracy batches, latency settings); ``None`` inherits
            :func:`edgeslim.core.progress.progress_enabled` (off by default).

    Returns:
        :class:`Metrics` with ``size_bytes``, ``size_zipped_bytes``, ``params``, ``macs``, ``accuracy`` (with
        data), ``latency_p50_ms@t{t}b{b}`` (and p90, p99), ``throughput_ips@t{t}b{b}``, ``peak_memory_mb``;
        the host is in ``context["host"]``.

    Raises:
        ConfigError: unknown runtime or a bad setting. RuntimeBackendError: the runtime is missing, cannot load
        the target, or the model's batch dimension is fixed and a batch size differs from it.
        DataError: the data is empty, its samples do not fit the model, or its class count differs from the
        model's output width.
    """
    with progress_enabled(progress):
        return _measure(
            target,
            data,
            runtime,
            threads,
            batch_sizes,
            runs,
            warmup,
            accuracy_samples,
            peak_memory,
            label,
            input_shape,
            max_seconds,
        )


def _measure(
    target: Any,
    data: Any,
    runtime: str | None,
    threads: int | Iterable[int],
    batch_sizes: int | Iterable[int],
    runs: int,
    warmup: int,
    accuracy_samples: int | None,
    peak_memory: bool,
    label: str | None,
    input_shape: tuple[int, ...] | None,
    max_seconds: float,
) -> Metrics:
    threads, batch_sizes = _positive_ints("threads", threads), _positive_ints("batch_sizes", batch_sizes)
    is_module = isinstance(target, nn.Module)
    runtime = str(getattr(runtime, "value", runtime) or ("torch" if is_module else "onnxruntime"))
    runner_cls = RUNTIMES.get(runtime)
    if is_module:
        target = eval_model(target)
    elif not isinstance(target, Artifact):
        target = Artifact.load(target)
    runners = {t: runner_cls(target, threads=t) for t in threads}
    r0 = runners[threads[0]]
    for b in batch_sizes:
        if r0.fixed_batch is not None and b != r0.fixed_batch:
            raise RuntimeBackendError(
                f"batch size {b} cannot run: the model's batch dimension is fixed at {r0.fixed_batch}; export it with "
                f"a dynamic batch dimension (edgeslim.export does) or measure batch_sizes=({r0.fixed_batch},)"
            )
    shape = _input_shape(target, data, input_shape)
    if data is not None and accuracy_samples is not None:
        data = data.take(positive_int("accuracy_samples", accuracy_samples), seed=0)

    host = host_info()
    cpu = f"host {host['cpu']} ({host['cores']} cores)"
    what = (
        {"module": type(target).__name__, "precision": getattr(target, "edgeslim_precision", "fp32")}
        if is_module
        else {"path": str(target.path), "format": target.format, "precision": target.precision}
    )
    m = Metrics(
        label or (what.get("module") or target.path.name),
        context={
            "host": host,
            "runtime": runtime,
            "runtime_version": r0.version,
            "target": what,
            "threads": list(threads),
            "batch_sizes": list(batch_sizes),
        },
    )
    _static_figures(m, target, shape)

    detection = data is not None and hasattr(data, "annotation_file") and hasattr(data, "image_ids")
    if detection:  # a detector on detection data: COCO mAP of the target in this runtime (NMS outside the graph)
        from edgeslim.runtime._detect import evaluate_detector

        res = evaluate_detector(target, data, runtime=runtime, threads=max(threads))
        how = (
            f"pycocotools on {res['images']} images of {getattr(data, 'name', 'the dataset')}/"
            f"{getattr(data, 'split', 'val')}, measured on {res['runtime']}, "
            f"NMS outside the graph, {cpu}"
        )
        m.add("map", res["map"], "fraction", "measured", f"COCO mAP@[.5:.95], {how}")
        m.add("map50", res["map50"], "fraction", "measured", f"COCO mAP@.5, {how}")
        m.context["map_samples"] = len(data)
    elif data is not None:
        r = runners[max(threads)]
        bs = r.fixed_batch or 256
        correct = 0
        with r:
            for x, y in bar(data.batches(bs), desc=f"accuracy ({runtime})", unit="batch"):
                xb = x.numpy()
                if len(xb) < bs and r.fixed_batch:  # pad the last batch of a fixed-batch model
                    xb = np.concatenate([xb, np.zeros((bs - len(xb), *xb.shape[1:]), xb.dtype)])
                out = r.run(xb)
                if out.ndim != 2:
                    raise DataError(f"top-1 accuracy needs (batch, classes) logits; the model outputs {out.shape}")
                check_classes(out.shape[1], data, m.label)
                correct += int((out[: len(y)].argmax(1) == y.numpy()).sum())
        m.add(
            "accuracy",
            correct / len(data),
            "fraction",
            "measured",
            f"top-1 on {len(data)} samples of {data.name}/{data.split}, measured on {r.describe()}, batch {bs}, "
            f"1 pass, {cpu}",
        )
        m.context["accuracy_samples"] = len(data)  # the report's noise rule for accuracy changes needs it

    settings = bar(desc=f"latency ({runtime})", total=len(batch_sizes) * len(runners), unit="setting")
    for b in batch_sizes:
        if detection:
            x = torch.stack([data[i][0] for i in range(min(b, len(data)))]).numpy()
            x, inputs = np.concatenate([x] * -(-b // len(x)))[:b], f"real images of {getattr(data, 'name', 'the data')}"
        elif data is not None:
            x = data.normalized()[:b].numpy()
            x, inputs = np.concatenate([x] * -(-b // len(x)))[:b], f"real samples of {data.name}"
        else:
            x, inputs = np.zeros((b, *shape), np.float32), "zeros"
        for t, r in runners.items():
            lat = latency(r, x, warmup=warmup, runs=runs, max_seconds=max_seconds)
            cut = f" (stopped by the {max_seconds:g} s bound)" if lat["runs"] < runs else ""
            how = (
                f"measured on {r.describe()}, batch {b}, {lat['runs']} runs{cut} after {lat['warmup_runs']} "
                f"warm-up, mean {lat['mean_ms']:.4g} ms, inputs: {inputs}, {cpu}"
            )
            for p in ("p50", "p90", "p99"):
                m.add(f"latency_{p}_ms@t{t}b{b}", lat[f"{p}_ms"], "ms", "measured", how)
            m.add(
                f"throughput_ips@t{t}b{b}",
                b * 1e3 / lat["mean_ms"],
                "items/s",
                "measured",
                f"batch / mean latency; {how}",
            )
            settings.update()
    settings.close()

    if peak_memory:
        b, n_runs = batch_sizes[0], 5
        extra, base, how = _peak_memory_probe(target, runtime, (b, *shape), threads[0], n_runs)
        m.add(
            "peak_memory_mb",
            extra,
            "MB",
            "measured",
            f"measured in a child process: extra peak RSS ({how}) of loading the model and running {n_runs} "
            f"inferences, over the {base:.0f} MB after imports; {r0.describe()}, batch {b}, {cpu}",
        )
    log.info("measured %s: %s", m.label, json.dumps({k: round(f.value, 4) for k, f in m.figures.items()}))
    return m


def check_classes(width: int, data: Any, what: str) -> None:
    """Refuse top-1 accuracy that cannot mean anything: a dataset with fewer than two classes, or a model whose
    output width differs from the dataset's class count (its class indices would be compared with another
    labelling: a 1000-class ImageNet model on a 2-class folder scores near 0% whatever it does)."""
    classes = getattr(data, "classes", None)
    n = len(classes) if classes is not None else getattr(data, "num_classes", None)
    if n is None:
        return
    name = f"{getattr(data, 'name', 'the dataset')!r}"
    if n < 2:
        raise DataError(
            f"dataset {name} has {n} class{'es' * (n != 1)}: top-1 accuracy and agreement on it say "
            "nothing; give a dataset with at least two classes"
        )
    if width != n:
        listed = ", ".join(map(str, list(classes)[:5])) + (", ..." if n > 5 else "") if classes is not None else ""
        raise DataError(
            f"{what} outputs {width} classes but dataset {name} has {n}"
            + (f" ({listed})" if listed else "")
            + ": accuracy would compare different labellings; measure it on the dataset it was trained "
            "for (--dataset), or pass no data"
        )


def _input_shape(target: Any, data: Any, input_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    """One sample's shape, from the data, ``input_shape`` or the artifact; checked against each other."""
    if input_shape is not None:
        input_shape = tuple(input_shape)
        if not input_shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in input_shape):
            raise ConfigError(
                f"input_shape={input_shape!r} is not allowed; give one sample's shape as positive "
                "integers, e.g. (3, 224, 224)"
            )
    known = (
        input_shape
        if input_shape is not None
        else (
            None
            if isinstance(target, nn.Module) or not target.input_shape or not all(d > 0 for d in target.input_shape)
            else target.input_shape
        )
    )
    if data is not None:
        if len(data) == 0:
            raise DataError(f"dataset {data.name!r} ({data.split}) is empty: nothing to measure accuracy on")
        if known is not None and tuple(data.input_shape) != known:
            raise DataError(
                f"dataset {data.name!r} has samples of shape {tuple(data.input_shape)} but the model takes {known}"
            )
        return tuple(data.input_shape)
    if not known:
        what = "the model's" if isinstance(target, nn.Module) else f"{target.path.name}'s"
        raise ConfigError(
            f"{what} input shape is unknown (dynamic rank or symbolic sizes): pass data= (an "
            "ImageDataset) or input_shape=(C, H, W) (CLI: --input-shape C,H,W)"
        )
    return known


def _static_figures(m: Metrics, target: Artifact | nn.Module, shape: tuple[int, ...]) -> None:
    """Size, zipped size, parameters and MACs (batch 1)."""
    if isinstance(target, nn.Module):
        buf = io.BytesIO()
        torch.save(target.state_dict(), buf)
        raw, where = buf.getvalue(), "the serialized state_dict (torch.save)"
        params, p_how = count_params(target), "the module's parameters (buffers excluded)"
        macs = count_macs(target, torch.zeros(1, *shape))
        m_how = "computed by torch.utils.flop_counter (flops / 2), batch 1"
    elif target.format != "onnx":  # tflite, executorch, openvino: sizes of the files; counts from the export record
        files = [target.path] + ([target.path.with_suffix(".bin")] if target.format == "openvino" else [])
        raw = b"".join(f.read_bytes() for f in files)
        where = " + ".join(f.name for f in files) + f" ({target.precision})"
        m.add("size_bytes", len(raw), "bytes", "measured", f"bytes of {where}")
        m.add("size_zipped_bytes", len(zlib.compress(raw, 9)), "bytes", "computed", f"zlib level 9 of {where}")
        for key, unit in (("params", "count"), ("macs", "MACs")):
            if target.meta.get(key):
                m.add(key, target.meta[key], unit, "computed", "of the torch model at export (artifact meta), batch 1")
        return
    else:
        raw, where = target.path.read_bytes(), f"file {target.path.name} ({target.precision})"
        model = _load(target.path)
        params = onnx_params(model)
        p_how = "elements of the ONNX initializers (weights, biases; not quantization scales, zero points, shapes)"
        if target.meta.get("macs"):
            macs, m_how = target.meta["macs"], "computed by torch.utils.flop_counter at export (artifact meta), batch 1"
        else:
            macs, skipped = onnx_macs_detail(model)
            m_how = "computed from ONNX shape inference (Conv/ConvTranspose/Gemm/MatMul), batch 1" + (
                f"; {len(skipped)} node(s) without shapes not counted: {', '.join(skipped)}" if skipped else ""
            )
    m.add(
        "size_bytes", len(raw), "bytes", "measured" if isinstance(target, Artifact) else "computed", f"bytes of {where}"
    )
    m.add("size_zipped_bytes", len(zlib.compress(raw, 9)), "bytes", "computed", f"zlib level 9 of {where}")
    m.add("params", params, "count", "computed", p_how)
    m.add("macs", macs, "MACs", "computed", m_how)


_PROBE = r"""
import json, resource, sys
a = json.loads(sys.argv[1])
sys.path[:0] = [p for p in a["sys_path"] if p not in sys.path]
import numpy as np
if a["runtime"] == "onnxruntime":
    import onnxruntime as ort
elif a["runtime"] == "torch":
    import torch
else:  # the other runtimes load through edgeslim's runner, their packages imported before the baseline
    import importlib
    from edgeslim.core.artifact import Artifact
    from edgeslim.runtime import RUNTIMES
    cls = RUNTIMES.get(a["runtime"])
    for mod in cls.requires:
        importlib.import_module(mod)
def peak_mb():  # VmHWM is this process's own peak; ru_maxrss can carry the parent's peak over exec
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) / 1024 for l in f if l.startswith("VmHWM:")), "VmHWM"
    except (OSError, StopIteration):
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r / 2**20 if sys.platform == "darwin" else r / 1024, "ru_maxrss"
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak to the RSS after imports
except OSError:
    pass
base, how = peak_mb()
x = np.zeros(a["shape"], np.float32)
if a["runtime"] == "onnxruntime":
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = a["threads"], 1, 3
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    s = ort.InferenceSession(a["file"], so, providers=["CPUExecutionProvider"])
    i = s.get_inputs()[0]
    x = x.astype(np.float16) if i.type == "tensor(float16)" else x
    for _ in range(a["runs"]):
        s.run(None, {i.name: x})
elif a["runtime"] != "torch":
    r = cls(Artifact.load(a["file"]), threads=a["threads"])
    for _ in range(a["runs"]):
        r.run(x)
else:
    torch.set_num_threads(a["threads"])
    m = torch.load(a["file"], weights_only=False)
    with torch.inference_mode():
        for _ in range(a["runs"]):
            m(torch.from_numpy(x))
print(json.dumps({"base_mb": base, "peak_mb": peak_mb()[0], "how": how}))
"""


def _peak_memory_probe(
    target: Artifact | nn.Module, runtime: str, shape: tuple[int, ...], threads: int, runs: int
) -> tuple[float, float, str]:
    """Load and run the model in a fresh child process: (extra peak RSS MB, RSS MB after imports, method)."""
    if runtime not in RUNTIMES:
        raise RuntimeBackendError(f"no peak-memory probe for runtime {runtime!r}; pass peak_memory=False")
    with tempfile.TemporaryDirectory() as td:
        if isinstance(target, nn.Module):
            file = Path(td) / "model.pt"
            try:
                torch.save(target, file)
            except Exception as e:  # e.g. a class defined inside a function cannot be pickled
                raise RuntimeBackendError(
                    f"cannot hand {type(target).__name__} to the peak-memory child process "
                    f"({e}); pass peak_memory=False"
                ) from None
        else:
            file = target.path
        args = {
            "runtime": runtime,
            "file": str(file),
            "shape": list(shape),
            "threads": threads,
            "runs": runs,
            "sys_path": sys.path if runtime != "onnxruntime" else [],
        }
        r = subprocess.run(
            [sys.executable, "-c", _PROBE, json.dumps(args)], capture_output=True, text=True, timeout=600
        )
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeBackendError(
            f"the peak-memory child process failed for {file.name}: {tail}; pass peak_memory=False to skip this figure"
        )
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return max(out["peak_mb"] - out["base_mb"], 0.0), out["base_mb"], out["how"]
