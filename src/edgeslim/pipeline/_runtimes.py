"""One candidate on every runtime, side by side (``edgeslim measure --runtime all``).

A file is run on each runtime that loads its format. A torch model is exported once per runtime format
(ONNX, OpenVINO IR, TFLite, ExecuTorch), optionally after edgeslim's INT8 post-training quantization, so this
composes quantize and export with the runtime comparison and lives in ``pipeline/``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from edgeslim.core.artifact import Artifact
from edgeslim.core.errors import ConfigError, EdgeslimError
from edgeslim.core.io import safe_name
from edgeslim.core.progress import progress_enabled
from edgeslim.export._api import export
from edgeslim.quantize._api import quantize
from edgeslim.quantize._config import QuantConfig
from edgeslim.runtime._candidates import artifact_candidates
from edgeslim.runtime._compare import compare_runtimes
from edgeslim.runtime._runners import missing

#: runtime -> (export format, file suffix) for models exported for every runtime
EXPORTS = (
    ("onnxruntime", "onnx", ".onnx"),
    ("openvino", "openvino", ".xml"),
    ("litert", "tflite", ".tflite"),
    ("executorch", "executorch", ".pte"),
)


def measure_all_runtimes(
    target: Artifact | str | Path | nn.Module,
    *,
    data: Any,
    calib: Any = None,
    precision: str = "fp32",
    reference: nn.Module | None = None,
    threads: int = 1,
    runs: int = 100,
    peak_memory: bool = True,
    artifacts_dir: str | Path | None = None,
    name: str | None = None,
    progress: bool | None = None,
) -> list[dict[str, Any]]:
    """Measure one candidate on every registered runtime with the same inputs and thread count.

    Args:
        target: an artifact (or its path): run on each runtime that loads its format; or a torch model: run in
            torch and exported for each installed runtime (a failed export is a ``failed`` row, not an error).
        data: an ImageDataset for accuracy, agreement and latency inputs.
        calib: calibration data, needed for a model with ``precision="int8"`` (edgeslim PTQ first) and for
            the INT8 TFLite/ExecuTorch exports.
        precision: ``fp32`` or ``int8``, for a model only.
        reference: the torch model agreement is measured against (for a model: the model itself by default).
        threads, runs, peak_memory: as in :func:`edgeslim.runtime.compare_runtimes`.
        artifacts_dir: keep the exported files here (default: a temporary folder, removed afterwards).
        name: the stem of the exported files (default: the model's class name).
        progress: progress bars on stderr; ``None`` inherits :func:`edgeslim.core.progress.progress_enabled`.

    Returns:
        the rows of :func:`edgeslim.runtime.compare_runtimes`, plus ``n/a`` rows for installed runtimes that
        cannot load an artifact's format and ``failed`` rows for exports that failed.
    """
    if precision not in ("fp32", "int8"):
        raise ConfigError(f"precision={precision!r} is not allowed; use 'fp32' or 'int8'")
    with progress_enabled(progress), tempfile.TemporaryDirectory() as td:
        extra: list[dict[str, Any]] = []
        if not isinstance(target, nn.Module):
            if precision != "fp32":
                raise ConfigError("precision='int8' quantizes a torch model; an artifact is measured as it is")
            art = target if isinstance(target, Artifact) else Artifact.load(target)
            candidates, extra = artifact_candidates(art, threads=threads)
        else:
            out = Path(artifacts_dir or td)
            model = reference = reference if reference is not None else target
            laid_out: dict[str, nn.Module] = {}
            if precision == "int8":
                model = quantize(target, QuantConfig(), calib=calib, example_inputs=data.normalized()[:8])
                if not missing("openvino"):  # OpenVINO's file with the Q/DQ pairs where OpenVINO fuses them
                    try:
                        laid_out["openvino"] = quantize(
                            target, QuantConfig(runtime="openvino"), calib=calib, example_inputs=data.normalized()[:8]
                        )
                    except EdgeslimError as e:  # the ORT-layout file goes to OpenVINO instead, and the row says so
                        extra.append(
                            {
                                "label": "openvino (OpenVINO Q/DQ layout)",
                                "runtime": "openvino",
                                "threads": threads,
                                "status": "failed",
                                "note": f"quantize(runtime='openvino'): {e}; the openvino row runs the ORT-layout file",
                            }
                        )
            candidates = {"torch": ("torch", model)}
            stem = safe_name(name or type(target).__name__)
            for runtime, fmt, sfx in EXPORTS:
                if missing(runtime):
                    candidates[runtime] = (runtime, None)  # listed as not installed, with its pip line
                    continue
                try:
                    art = export(
                        laid_out.get(runtime, model),
                        fmt,
                        path=out / f"{stem}-{precision}{sfx}",
                        example_inputs=data,
                        force=True,
                        calib=calib,
                    )
                except EdgeslimError as e:
                    extra.append(
                        {
                            "label": runtime,
                            "runtime": runtime,
                            "threads": threads,
                            "status": "failed",
                            "note": f"export to {fmt}: {e}",
                        }
                    )
                    continue
                candidates[runtime] = (runtime, art)
        return (
            compare_runtimes(
                candidates, data=data, reference=reference, threads=threads, runs=runs, peak_memory=peak_memory
            )
            + extra
        )
