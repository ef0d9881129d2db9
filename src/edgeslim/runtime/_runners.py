"""Runtimes behind one small interface: ``RUNTIMES.get(name)(target, threads=t)`` -> :class:`Runner`.

A runner loads a model once and runs it: ``runner.run(x: np.ndarray) -> np.ndarray``. Each runtime is
its own class; optional runtimes import when first used, and a missing one says what to pip install.
"""

from __future__ import annotations

import collections
import copy
import importlib
import importlib.util
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from edgeslim.core.artifact import SUFFIX_FORMATS, Artifact
from edgeslim.core.errors import ConfigError, RuntimeBackendError
from edgeslim.core.registry import Registry


def _require(module: str, pip_name: str, extra: str | None = None) -> ModuleType:
    """Import ``module``, or raise a RuntimeBackendError saying what to pip install (the edgeslim extra if any)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        how = f"pip install 'edgeslim[{extra}]'" if extra else f"pip install {pip_name}"
        raise RuntimeBackendError(
            f"this runtime needs the package {pip_name!r} (import {module!r} failed: {e}); install it with: {how}"
        ) from None


def missing(runtime: str) -> str | None:
    """None when ``runtime``'s packages import, else the pip command that installs them (nothing is loaded)."""
    cls = RUNTIMES.get(runtime)
    for module in cls.requires:
        top = module.split(".")[0]
        if sys.modules.get(top, True) is None or (top not in sys.modules and importlib.util.find_spec(top) is None):
            return f"pip install 'edgeslim[{cls.extra}]'" if cls.extra else f"pip install {module}"
    return None


def artifact_path(target: Any, runtime: str, formats: dict[str, tuple[str, ...]]) -> tuple[Path, str]:
    """The file and format of ``target`` (an Artifact or a path), checked against what ``runtime`` loads.

    ``formats`` maps each format the runtime loads to its file suffixes.
    """
    allowed = "; ".join(f"{f!r} ({', '.join(s)})" for f, s in formats.items())
    if isinstance(target, nn.Module):
        raise RuntimeBackendError(
            f"runtime {runtime!r} runs files, not a torch module ({type(target).__name__}): export it first with "
            f"edgeslim.export(model, FORMAT, example_inputs=...) where FORMAT is one of: {allowed}; or use "
            "runtime='torch'"
        )
    path = Path(target.path if isinstance(target, Artifact) else target)
    if isinstance(target, Artifact):
        fmt = target.format
    else:
        fmt = SUFFIX_FORMATS.get(path.suffix, f"unknown, suffix {path.suffix!r}")
    if fmt not in formats or path.suffix not in formats.get(fmt, ()):
        raise RuntimeBackendError(
            f"runtime {runtime!r} cannot load {str(path)!r} (format {fmt!r}); it loads: {allowed}"
        )
    if not path.is_file():
        raise RuntimeBackendError(f"runtime {runtime!r}: artifact file {str(path)!r} does not exist")
    return path, fmt


def positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``, or a ConfigError naming the setting and the value."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name}={value!r} is not allowed; use an integer >= {minimum}")
    return int(value)


def eval_model(model: nn.Module) -> nn.Module:
    """``model`` itself if every submodule is in eval mode, else an eval-mode copy (inputs are never mutated)."""
    return copy.deepcopy(model).eval() if any(m.training for m in model.modules()) else model


def one_input(path: Any, n: int, names: Sequence[str] = ()) -> None:
    """Every runner takes models with exactly one input; ``n`` is what the file at ``path`` has."""
    if n != 1:
        listed = f" ({', '.join(names)})" if names else ""
        raise RuntimeBackendError(
            f"{str(path)!r} has {n} inputs{listed}; edgeslim runners take models with exactly one input"
        )


class Runner:
    """A model loaded on a runtime, ready to run.

    Attributes:
        name: the runtime's registry name.
        version: the runtime's version.
        threads: intra-op threads it runs with.
        fixed_batch: the batch size the model is fixed to, or None when the batch dimension is dynamic.
    """

    name: ClassVar[str] = ""
    #: formats it loads -> file suffixes (empty for runtimes that run torch modules)
    formats: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: importable modules it needs, and the edgeslim extra that installs them (None: a core dependency)
    requires: ClassVar[tuple[str, ...]] = ()
    extra: ClassVar[str | None] = None
    version: str = ""
    fixed_batch: int | None = None

    def __init__(self, target: Any, *, threads: int = 1) -> None:
        self.threads = positive_int("threads", threads)

    def run(self, x: np.ndarray) -> np.ndarray:
        """The model's (first) output for the batch ``x``."""
        raise NotImplementedError

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)

    def describe(self) -> str:
        """Runtime, version and settings, e.g. ``onnxruntime 1.32.0 (CPUExecutionProvider), 1 thread``."""
        return f"{self.name} {self.version}, {self.threads} thread{'s' * (self.threads != 1)}"

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


RUNTIMES: Registry[type[Runner]] = Registry("runtime")


@RUNTIMES.register("onnxruntime")
class OrtRunner(Runner):
    """ONNX Runtime, CPU provider: sequential execution, 1 inter-op thread, ORT_ENABLE_ALL graph optimization.

    Loads an ``onnx`` :class:`Artifact` or a path to an ``.onnx`` file.
    """

    name = "onnxruntime"
    formats = {"onnx": (".onnx",)}
    requires = ("onnxruntime",)

    def __init__(self, target: Any, *, threads: int = 1) -> None:
        super().__init__(target, threads=threads)
        if isinstance(target, nn.Module):
            raise RuntimeBackendError(
                f"runtime 'onnxruntime' runs ONNX files, not a torch module ({type(target).__name__}): export it "
                "first with edgeslim.export(model, 'onnx', example_inputs=...) and measure the Artifact, "
                "or use runtime='torch'"
            )
        if isinstance(target, Artifact) and target.format != "onnx":
            raise RuntimeBackendError(
                f"runtime 'onnxruntime' loads 'onnx' artifacts, not {target.format!r} ({target.path})"
            )
        path = Path(target.path if isinstance(target, Artifact) else target)
        if path.suffix != ".onnx":
            raise RuntimeBackendError(f"runtime 'onnxruntime' loads .onnx files, not {str(path)!r}")
        ort = _require("onnxruntime", "onnxruntime")
        self.version = ort.__version__
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = self.threads, 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 4  # errors are raised as RuntimeBackendError with ORT's message, not logged twice
        try:
            self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types for missing or invalid files
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise RuntimeBackendError(f"onnxruntime cannot load {str(path)!r}: {first[:300]}") from None
        self.path = path
        inputs = self.session.get_inputs()
        one_input(path, len(inputs), [i.name for i in inputs])
        self.input_name = inputs[0].name
        self.dtype = np.float16 if inputs[0].type == "tensor(float16)" else np.float32
        dim0 = inputs[0].shape[0] if inputs[0].shape else None
        self.fixed_batch = dim0 if isinstance(dim0, int) and dim0 > 0 else None

    def run(self, x: np.ndarray) -> np.ndarray:
        try:
            return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=self.dtype)})[0]
        except Exception as e:  # ORT's own exception types, e.g. an input of the wrong rank or shape
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise RuntimeBackendError(
                f"onnxruntime cannot run {self.path.name!r} on an input of shape {tuple(np.shape(x))}: {first[:300]}"
            ) from None

    def describe(self) -> str:
        return f"onnxruntime {self.version} (CPUExecutionProvider), {self.threads} thread{'s' * (self.threads != 1)}"


@RUNTIMES.register("torch")
class TorchRunner(Runner):
    """Eager PyTorch under ``torch.inference_mode()`` with ``torch.set_num_threads(threads)``.

    Loads a ``torch.nn.Module`` (an eval-mode copy when it is in training mode). Thread count is set for each
    run and restored after it; inside ``with runner:`` it is set once for the whole block.
    """

    name = "torch"
    requires = ("torch",)

    def __init__(self, target: Any, *, threads: int = 1) -> None:
        super().__init__(target, threads=threads)
        if not isinstance(target, nn.Module):
            fmt = target.format if isinstance(target, Artifact) else (Path(str(target)).suffix or type(target).__name__)
            raise RuntimeBackendError(
                f"runtime 'torch' runs a torch.nn.Module, not a {fmt!r} artifact ({target}); "
                "use runtime='onnxruntime' for ONNX files"
            )
        self.model = eval_model(target)
        self.version = torch.__version__
        self._outer: list[int] = []

    def run(self, x: np.ndarray) -> np.ndarray:
        with self:
            with torch.inference_mode():
                y = self.model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        y = y if isinstance(y, torch.Tensor) else next(iter(y.values())) if isinstance(y, dict) else y[0]
        return y.float().numpy()

    def __enter__(self) -> TorchRunner:
        self._outer.append(torch.get_num_threads())
        if self._outer[-1] != self.threads:
            torch.set_num_threads(self.threads)
        return self

    def __exit__(self, *exc: object) -> None:
        prev = self._outer.pop()
        if prev != self.threads:
            torch.set_num_threads(prev)


def load(target: Any, runtime: str = "onnxruntime", *, threads: int = 1) -> Runner:
    """Load ``target`` on ``runtime``.

    Args:
        target: an :class:`Artifact` or ``.onnx`` path for ``onnxruntime``; an ``nn.Module`` for ``torch``.
        runtime: a name in :data:`RUNTIMES` (``openvino``, ``litert`` and ``executorch`` need their extras).
        threads: intra-op threads.
    """
    return RUNTIMES.get(runtime)(target, threads=threads)


def optimized_op_types(path: str | Path, threads: int = 1) -> collections.Counter:
    """Op types of the graph ONNX Runtime actually runs: its optimized graph at the portable EXTENDED level.

    This proves integer kernels run: QLinearConv, QLinearAdd, QGemm ... in place of Conv, Add, Gemm.
    """
    ort = _require("onnxruntime", "onnxruntime")
    onnx = _require("onnx", "onnx")
    with tempfile.TemporaryDirectory() as td:
        so = ort.SessionOptions()
        so.intra_op_num_threads = positive_int("threads", threads)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(Path(td) / "optimized.onnx")
        so.log_severity_level = 3
        try:
            ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise RuntimeBackendError(f"onnxruntime cannot load {str(path)!r}: {str(e).strip()[:300]}") from None
        return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
