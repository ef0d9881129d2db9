"""The ``export`` verb: write a deployable file and check it numerically against the torch model.

Every artifact is run once in its own runtime (ONNX Runtime for ONNX; OpenVINO, LiteRT, ExecuTorch for the
others, see ``_edge.py``) on real samples and compared with the torch model it came
from (cosine similarity, SQNR in dB, top-1 agreement). Below the floors it is an error, not a file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeslim.core import recipe as _recipe
from edgeslim.core.artifact import Artifact
from edgeslim.core.config import Config
from edgeslim.core.counting import count_macs, count_params
from edgeslim.core.errors import ConfigError, DataError, ExportError, near
from edgeslim.core.io import atomic_path, check_output
from edgeslim.core.metrics import compare
from edgeslim.core.verbs import data_alias
from edgeslim.core.progress import bar, progress_enabled
from edgeslim.export import _edge
from edgeslim.export._qdq import compact_names, fold_qdq

log = logging.getLogger(__name__)

FORMATS = ("onnx", "openvino", "tflite", "executorch")
FORMAT_ALIASES = {"pte": "executorch", "ir": "openvino", "litert": "tflite"}
PRECISIONS = ("fp32", "fp16", "int8", "int8-dynamic")

# (cosine, SQNR dB, top-1 agreement) floors against the torch model that was exported
DEFAULT_FLOORS: dict[str, tuple[float, float, float]] = {
    "fp32": (0.99999, 50.0, 0.995),
    "fp16": (0.9999, 35.0, 0.99),
    "int8": (0.99, 15.0, 0.90),
    "int8-dynamic": (0.98, 12.0, 0.90),
}


@dataclass(frozen=True)
class ValidationFloors(Config):
    """Minimum agreement between an exported artifact and its torch model; ``None`` = precision default.

    Attributes:
        min_cosine: cosine similarity of all outputs, flattened.
        min_sqnr_db: signal-to-quantization-noise ratio in dB.
        min_top1_agreement: fraction of samples whose arg-max class agrees.
        samples: how many real samples to compare on.
    """

    kind = "validation"
    min_cosine: float | None = None
    min_sqnr_db: float | None = None
    min_top1_agreement: float | None = None
    samples: int = 256

    def validate(self) -> None:
        for f in ("min_cosine", "min_top1_agreement"):
            v = getattr(self, f)
            if v is not None and not -1.0 <= v <= 1.0:
                raise self._bad(f, "must be in [-1, 1] (or None for the precision's default)")
        if self.samples < 1:
            raise self._bad("samples", "must be >= 1")

    def resolve(self, precision: str) -> tuple[float, float, float]:
        c, s, t = DEFAULT_FLOORS[precision]
        return (
            c if self.min_cosine is None else self.min_cosine,
            s if self.min_sqnr_db is None else self.min_sqnr_db,
            t if self.min_top1_agreement is None else self.min_top1_agreement,
        )


def _examples(example_inputs: Any, n: int) -> tuple[torch.Tensor, np.ndarray | None]:
    if example_inputs is None:
        raise DataError("export needs example_inputs=: real samples (a dataset or an input tensor) to trace and "
                        "validate the artifact")
    if hasattr(example_inputs, "normalized") and hasattr(example_inputs, "labels"):
        if len(example_inputs) == 0:
            raise DataError("example_inputs dataset is empty")
        ds = example_inputs.take(n, seed=0)
        return ds.normalized(), ds.labels.numpy()
    if isinstance(example_inputs, torch.Tensor):
        if example_inputs.ndim < 2 or len(example_inputs) == 0:
            raise DataError(f"example_inputs must be a batch (N, ...), got shape {tuple(example_inputs.shape)}")
        return example_inputs[:n].float(), None
    raise DataError(f"example_inputs must be an ImageDataset or a tensor, got {type(example_inputs).__name__}")


def _torch_export(model: nn.Module, x: torch.Tensor, path: Path, opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the TorchScript exporter turns fake-quantization into QuantizeLinear/DequantizeLinear pairs and
        # writes one self-contained file; the dynamo exporter does neither reliably for fake-quant modules
        torch.onnx.export(
            model, (x[:1],), str(path), dynamo=False, opset_version=opset, input_names=["input"],
            output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            do_constant_folding=True,
        )


def _ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + 256]})[0] for i in range(0, len(x), 256)])


def export(
    model: nn.Module,
    format: str = "onnx",
    *,
    example_inputs: Any = None,
    path: str | os.PathLike | None = None,
    precision: str | None = None,
    force: bool = False,
    validate: bool = True,
    floors: ValidationFloors = ValidationFloors(),
    opset: int = 17,
    data: Any = None,
    calib: Any = None,
    progress: bool | None = None,
) -> Artifact:
    """Export ``model`` to a deployable file and validate it against the torch model.

    Args:
        model: a float ``nn.Module`` or a model returned by :func:`edgeslim.quantize`.
        format: ``onnx``; ``openvino`` (IR .xml + .bin), ``tflite`` (LiteRT) or ``executorch`` (``pte``, XNNPACK)
            with their extras installed. These take ``fp32`` and ``int8``; TFLite and ExecuTorch files have batch 1.
        example_inputs: real samples: an ImageDataset (labels add accuracy to the validation) or a tensor.
        path: output file (default ``<model>-<precision>.onnx`` in the working folder); an existing file is
            refused unless ``force``.
        precision: ``fp32`` or ``fp16`` for a float model; a quantized model exports at its own precision.
        validate: run the artifact in ONNX Runtime and compare with the torch model (floors apply).
        floors: the :class:`ValidationFloors`.
        opset: ONNX opset.
        data: calibration samples for INT8 ``tflite``/``executorch``, which re-quantize the quantized model's
            folded float graph with their runtime's PT2E quantizer (see ``edgeslim.export._edge``).
        calib: the old name of ``data`` (deprecated).
        progress: a progress bar on stderr over the steps (export, convert, validate); ``None`` inherits
            :func:`edgeslim.core.progress.progress_enabled` (off by default).

    Returns:
        the :class:`Artifact`, whose ``validation`` holds the comparison; its record is written beside it.
    """
    calib = data_alias(data, calib, "export")
    with progress_enabled(progress):
        return _export(model, format, example_inputs=example_inputs, path=path, precision=precision, force=force,
                       validate=validate, floors=floors, opset=opset, calib=calib)


def _export(model: nn.Module, format: str, *, example_inputs: Any, path: str | os.PathLike | None,
            precision: str | None, force: bool, validate: bool, floors: ValidationFloors, opset: int, calib: Any
            ) -> Artifact:
    format = FORMAT_ALIASES.get(format, format)
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}{near(format, FORMATS)}; valid: {', '.join(FORMATS)}")
    own = getattr(model, "edgeslim_precision", None)
    if precision is not None and precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is not allowed{near(precision, PRECISIONS)}; valid: "
                          f"{', '.join(PRECISIONS)}")
    if own and precision and precision != own:
        raise ConfigError(f"precision={precision!r} conflicts with the quantized model's precision {own!r}; "
                          "leave precision unset for quantized models")
    if not own and precision not in (None, "fp32", "fp16"):
        raise ConfigError(f"precision={precision!r} needs a quantized model: use edgeslim.quantize first "
                          "(a float model exports as 'fp32' or 'fp16')")
    prec = own or precision or "fp32"
    if format != "onnx" and prec not in _edge.PRECISIONS[format]:
        raise ConfigError(f"format {format!r} takes precision {' or '.join(_edge.PRECISIONS[format])}, not {prec!r}")
    x, labels = _examples(example_inputs, floors.samples)
    target = Path(path) if path else Path(f"{type(model).__name__.lower()}-{prec}{_edge.SUFFIX[format]}")
    if target.suffix != _edge.SUFFIX[format]:
        raise ConfigError(f"path {str(target)!r} does not fit format {format!r}: use a {_edge.SUFFIX[format]} file")
    check_output(target, force=force)
    model = model.eval()
    try:
        with torch.no_grad():
            ref = model(x)
    except Exception as e:  # shape mismatches surface as RuntimeError deep in torch
        raise DataError(f"example_inputs of shape {tuple(x.shape[1:])} do not fit {type(model).__name__}: "
                        f"{str(e).splitlines()[0][:200]}") from None
    t0 = time.perf_counter()
    if format != "onnx":
        return _export_edge(model, format, x, ref, labels, target, prec, force=force, validate=validate,
                            floors=floors, opset=opset, calib=calib, t0=t0)
    float_ctx = getattr(model, "float_reference", None)
    with atomic_path(target, force=force) as tmp, tempfile.TemporaryDirectory() as td, \
            bar(desc=f"export {target.name}", total=3 if validate else 2, unit="step") as pb:
        raw = Path(td) / "raw.onnx"
        with (float_ctx() if float_ctx and prec in ("int8-dynamic", "fp16") else contextlib.nullcontext()):
            _torch_export(model, x, raw, opset)
        with float_ctx() if float_ctx else contextlib.nullcontext():
            macs = count_macs(model, x)
        pb.update()
        _convert(raw, tmp, prec, getattr(model, "edgeslim_export", {}))
        pb.update()
        validation: dict[str, Any] = {}
        if validate:
            pb.set_postfix_str(f"validating on {len(x)} samples")
            validation = _validate(model, tmp, x, ref, labels, prec, floors)
            pb.update()
    art = Artifact(
        target, "onnx", prec, tuple(x.shape[1:]), validation,
        {"macs": macs, "opset": opset, "source_model": type(model).__name__,
         "export_seconds": round(time.perf_counter() - t0, 3),
         **report_meta(model)},
    )
    art.save_record(force=True)
    log.info("exported %s (%s, %d bytes)", target, prec, art.size_bytes)
    return art


def report_meta(model: nn.Module) -> dict[str, Any]:
    """The artifact's record of how the model was made: the last step's report under its technique's name, and
    the chain of steps (technique, config, one-line summary) from the model's recipe."""
    out: dict[str, Any] = {}
    rep = getattr(model, "report", None)
    if rep is not None and hasattr(rep, "to_dict"):
        out[getattr(rep, "technique", type(rep).__name__)] = rep.to_dict()
    steps = _recipe.steps_of(model)
    if steps:
        out["recipe"] = [{k: s.get(k) for k in ("technique", "config", "summary")} for s in steps]
    return out


def _export_edge(model: nn.Module, fmt: str, x: torch.Tensor, ref: torch.Tensor, labels: np.ndarray | None,
                 target: Path, prec: str, *, force: bool, validate: bool, floors: ValidationFloors, opset: int,
                 calib: Any, t0: float) -> Artifact:
    """Write an openvino/tflite/executorch artifact, validated in its own runtime against the torch model."""
    check_output(target, force=force)
    if fmt == "openvino":
        check_output(target.with_suffix(".bin"), force=force)
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td) / f"model{_edge.SUFFIX[fmt]}"
        if fmt == "openvino":  # from edgeslim's own ONNX file (INT8: its Q/DQ nodes)
            onnx_art = export(model, "onnx", example_inputs=x, path=Path(td) / "model.onnx", validate=False,
                              opset=opset)
            meta = _edge.write_openvino(onnx_art.path, tmp)
        elif fmt == "tflite":
            meta = _edge.write_tflite(model, x, tmp, prec, calib)
        else:
            meta = _edge.write_executorch(model, x, tmp, prec, calib)
        validation = _validate(model, tmp, x, ref, labels, prec, floors, fmt) if validate else {}
        _edge.move(tmp, target, fmt)
    with contextlib.ExitStack() as es:
        if getattr(model, "float_reference", None):
            es.enter_context(model.float_reference())
        macs = count_macs(model, x)
    art = Artifact(target, fmt, prec, tuple(x.shape[1:]), validation,
                   {"macs": macs, "params": count_params(model),
                    "source_model": type(model).__name__, "export_seconds": round(time.perf_counter() - t0, 3),
                    **meta, **report_meta(model)})
    art.save_record(force=True)
    log.info("exported %s (%s %s, %d bytes)", target, fmt, prec, art.size_bytes)
    return art


def _validate(model: nn.Module, path: Path, x: torch.Tensor, ref: torch.Tensor, labels: np.ndarray | None,
              prec: str, floors: ValidationFloors, fmt: str = "onnx") -> dict[str, Any]:
    """Run the file in its runtime (ONNX Runtime for ONNX) on the samples and compare with the torch model;
    raise below the floors."""
    out = _ort_run(path, x.numpy()) if fmt == "onnx" else _edge.run_in_runtime(fmt, path, x)
    validation: dict[str, Any] = {"samples": len(x), "reference": "torch model passed to export",
                                  "runtime": "onnxruntime" if fmt == "onnx" else _edge.RUNTIME[fmt],
                                  **compare(ref.numpy(), out)}
    if labels is not None:
        validation["accuracy_torch"] = float((ref.numpy().argmax(1) == labels).mean())
        validation["accuracy_artifact"] = float((out.argmax(1) == labels).mean())
    float_ctx = getattr(model, "float_reference", None)
    if float_ctx:
        with float_ctx(), torch.no_grad():
            validation["vs_float_reference"] = compare(model(x).numpy(), out)
    cmin, smin, tmin = floors.resolve(prec)
    validation["floors"] = {"cosine": cmin, "sqnr_db": smin, "top1_agreement": tmin}
    bad = [
        f"{k} {validation[k]:.4f} < {v}"
        for k, v in (("cosine", cmin), ("sqnr_db", smin), ("top1_agreement", tmin))
        if validation[k] < v
    ]
    if bad:
        raise ExportError(
            f"{prec} {fmt} export of {type(model).__name__} failed validation on {len(x)} samples: "
            + "; ".join(bad) + " (floors are set by ValidationFloors)"
        )
    return validation


def _convert(raw: Path, out: Path, precision: str, opts: dict) -> None:
    """Turn the exporter's file into the final one for ``precision`` (written to ``out``)."""
    import onnx

    if precision == "int8-dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        dyn = raw.with_name("dynamic.onnx")
        quantize_dynamic(str(raw), str(dyn), per_channel=bool(opts.get("per_channel", True)),
                         weight_type=QuantType.QInt8)
        raw = dyn
    model = onnx.load(str(raw))
    if precision == "int8":
        fold_qdq(model)  # compacts names too
    elif precision == "fp16":
        try:
            from onnxconverter_common import float16
        except ImportError:
            raise ExportError("FP16 export needs onnxconverter-common: pip install onnxconverter-common") from None

        model = float16.convert_float_to_float16(model, keep_io_types=True)
        compact_names(model)
    else:  # the same short names as the quantized files, so sizes compare like with like
        compact_names(model)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"the exported {precision} ONNX graph is invalid: {str(e).splitlines()[0]}") from None
    onnx.save(model, str(out))
