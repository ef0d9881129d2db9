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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeslim.core import recipe as _recipe
from edgeslim.core.artifact import Artifact
from edgeslim.core.config import Config
from edgeslim.core.counting import call, count_macs, count_params
from edgeslim.core.errors import ConfigError, DataError, ExportError, near
from edgeslim.core.io import atomic_path, check_output
from edgeslim.core.metrics import compare
from edgeslim.core.onnx_model import batch_len, first_output, ort_session, run_session, slice_inputs, to_onnx
from edgeslim.core.progress import bar, progress_enabled
from edgeslim.core.verbs import data_alias
from edgeslim.export import _edge
from edgeslim.export._qdq import compact_names, fold_qdq

log = logging.getLogger(__name__)

FORMATS = ("onnx", "openvino", "tflite", "executorch")
FORMAT_ALIASES = {"pte": "executorch", "ir": "openvino", "litert": "tflite"}
PRECISIONS = ("fp32", "fp16", "int8", "int8-dynamic")

# (cosine, SQNR dB, top-1 agreement) floors against the torch model that was exported (for a quantized model: its
# quantized reference, so these check that the file computes what the quantized model computes)
DEFAULT_FLOORS: dict[str, tuple[float, float, float]] = {
    "fp32": (0.99999, 50.0, 0.995),
    "fp16": (0.9999, 35.0, 0.99),
    "int8": (0.99, 15.0, 0.90),
    "int8-dynamic": (0.98, 12.0, 0.90),
}


TASKS = ("auto", "classify", "detect")


@dataclass(frozen=True)
class ValidationFloors(Config):
    """Minimum agreement between an exported artifact and its torch model; ``None`` = precision default.

    A quantized model is checked twice: against its quantized reference (``min_*``: the file computes what the
    quantized model computes) and against the FP32 model it came from (``float_*``: what quantization lost).

    Attributes:
        min_cosine: cosine similarity of all outputs, flattened.
        min_sqnr_db: signal-to-quantization-noise ratio in dB.
        min_top1_agreement: fraction of samples whose arg-max class agrees.
        float_min_cosine: a quantized file against the FP32 model: cosine similarity.
        float_min_sqnr_db: a quantized file against the FP32 model: SQNR in dB.
        float_top1_agreement: a quantized file against the FP32 model: top-1 agreement (lenient by default; a file
            that agrees with FP32 on 55% of the inputs never passes).
        samples: how many real samples to compare on.
        task: ``auto`` (a model that says ``edgeslim_task = "detect"`` is a detector, else a classifier),
            ``classify`` or ``detect``. A detector's output (``[N, 4 + C, A]`` or ``[N, A, 4 + C]``: the smaller of
            the last two axes holds 4 box values then ``C`` class scores) is compared as boxes and scores
            separately (each must pass the cosine and SQNR floors: the scores in [0, 1] would vanish behind box
            pixels in one flattened comparison), and top-1 agreement is skipped with its reason (an arg-max over
            anchors and coordinates means nothing). The validation's ``checks`` says which ran.
    """

    kind = "validation"
    min_cosine: float | None = None
    min_sqnr_db: float | None = None
    min_top1_agreement: float | None = None
    float_min_cosine: float = 0.9
    float_min_sqnr_db: float = 6.0
    float_top1_agreement: float = 0.8
    samples: int = 256
    task: str = "auto"

    def validate(self) -> None:
        if self.task not in TASKS:
            raise self._bad("task", f"one of {', '.join(TASKS)}")
        for f in ("min_cosine", "min_top1_agreement", "float_min_cosine", "float_top1_agreement"):
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


def _examples(example_inputs: Any, n: int) -> tuple[Any, np.ndarray | None]:
    if example_inputs is None:
        raise DataError(
            "export needs example_inputs=: real samples (a dataset or an input tensor) to trace and "
            "validate the artifact"
        )
    if hasattr(example_inputs, "read_image") and hasattr(example_inputs, "image_ids"):  # a DetectionDataset
        if len(example_inputs) == 0:
            raise DataError("example_inputs dataset is empty")
        ds = example_inputs.take(n, seed=0)
        return torch.stack([ds[i][0] for i in range(len(ds))]), None
    if hasattr(example_inputs, "normalized") and hasattr(example_inputs, "labels"):
        if len(example_inputs) == 0:
            raise DataError("example_inputs dataset is empty")
        ds = example_inputs.take(n, seed=0)
        return ds.normalized(), ds.labels.numpy()
    if isinstance(example_inputs, torch.Tensor):
        if example_inputs.ndim < 2 or len(example_inputs) == 0:
            raise DataError(f"example_inputs must be a batch (N, ...), got shape {tuple(example_inputs.shape)}")
        x = example_inputs[:n]
        return (x if not x.dtype.is_floating_point else x.float()), None  # token ids stay integer
    if isinstance(example_inputs, Mapping):
        bad = [k for k, v in example_inputs.items() if not isinstance(v, torch.Tensor) or v.ndim < 1]
        if bad or not example_inputs:
            raise DataError(f"example_inputs as a dict must map input names to batched tensors; {bad[:3] or 'empty'}")
        if batch_len(example_inputs) == 0:
            raise DataError("example_inputs are empty")
        return slice_inputs(example_inputs, 0, n), None
    raise DataError(
        f"example_inputs must be an ImageDataset, a tensor or a dict of tensors (keyword inputs), got "
        f"{type(example_inputs).__name__}"
    )


def _shape(x: Any) -> tuple[int, ...]:
    """One sample's shape (of the first input for keyword inputs)."""
    return tuple((next(iter(x.values())) if isinstance(x, Mapping) else x).shape[1:])


def _torch_export(model: nn.Module, x: torch.Tensor, path: Path, opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the TorchScript exporter turns fake-quantization into QuantizeLinear/DequantizeLinear pairs and
        # writes one self-contained file; the dynamo exporter does neither reliably for fake-quant modules
        torch.onnx.export(
            model,
            (x[:1],),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            do_constant_folding=True,
        )


def _forward(model: nn.Module, x: Any) -> torch.Tensor:
    """The model's first output on ``x`` (under ``no_grad`` by the caller), for the references validation compares
    with. An image batch goes in channels-last memory order: the values are the same (up to float summation order),
    and torch's CPU convolutions run 1.3-1.8x faster on it (ResNet-18 / MobileNetV2 at 224x224, measured here). A
    model that cannot take it (e.g. ``.view`` on a tensor it assumes contiguous) runs on the input as given."""
    if isinstance(x, torch.Tensor) and x.ndim == 4 and x.is_floating_point() and x.shape[1] > 1:
        try:
            return first_output(call(model, x.contiguous(memory_format=torch.channels_last)))
        except RuntimeError:
            pass
    return first_output(call(model, x))


def _ort_run(path: Path, x: Any) -> np.ndarray:
    """The file's first output on ``x`` (a tensor or a dict of input tensors) in ONNX Runtime."""
    return run_session(ort_session(path), x)[0]


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
        return _export(
            model,
            format,
            example_inputs=example_inputs,
            path=path,
            precision=precision,
            force=force,
            validate=validate,
            floors=floors,
            opset=opset,
            calib=calib,
        )


def _export(
    model: nn.Module,
    format: str,
    *,
    example_inputs: Any,
    path: str | os.PathLike | None,
    precision: str | None,
    force: bool,
    validate: bool,
    floors: ValidationFloors,
    opset: int,
    calib: Any,
) -> Artifact:
    format = FORMAT_ALIASES.get(format, format)
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}{near(format, FORMATS)}; valid: {', '.join(FORMATS)}")
    own = getattr(model, "edgeslim_precision", None)
    if precision is not None and precision not in PRECISIONS:
        raise ConfigError(
            f"precision={precision!r} is not allowed{near(precision, PRECISIONS)}; valid: {', '.join(PRECISIONS)}"
        )
    if own and precision and precision != own:
        raise ConfigError(
            f"precision={precision!r} conflicts with the quantized model's precision {own!r}; "
            "leave precision unset for quantized models"
        )
    if not own and precision not in (None, "fp32", "fp16"):
        raise ConfigError(
            f"precision={precision!r} needs a quantized model: use edgeslim.quantize first "
            "(a float model exports as 'fp32' or 'fp16')"
        )
    prec = own or precision or "fp32"
    if format != "onnx" and prec not in _edge.PRECISIONS[format]:
        raise ConfigError(f"format {format!r} takes precision {' or '.join(_edge.PRECISIONS[format])}, not {prec!r}")
    x, labels = _examples(example_inputs, floors.samples)
    has_graph = callable(getattr(model, "onnx_bytes", None))  # quantized on its ONNX graph, or an ONNX file
    # OpenVINO converts edgeslim's ONNX file, so a model quantized on its ONNX graph (or an ONNX file) goes there too
    if (isinstance(x, Mapping) or (has_graph and format != "openvino")) and format != "onnx":
        raise ConfigError(
            f"format {format!r} takes models with one tensor input built in torch; this model "
            f"({type(model).__name__}) exports to 'onnx'"
            + (" or 'openvino'" if not isinstance(x, Mapping) else "")
            + " only"
        )
    target = Path(path) if path else Path(f"{type(model).__name__.lower()}-{prec}{_edge.SUFFIX[format]}")
    if target.suffix != _edge.SUFFIX[format]:
        raise ConfigError(f"path {str(target)!r} does not fit format {format!r}: use a {_edge.SUFFIX[format]} file")
    check_output(target, force=force)
    model = model.eval()
    tick = time.perf_counter()
    timings: dict[str, float] = {}

    def phase(name: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        timings[name] = round(timings.get(name, 0.0) + now - tick, 3)
        tick = now

    try:
        with torch.no_grad():
            ref = _forward(model, x)
    except Exception as e:  # shape mismatches surface as RuntimeError deep in torch
        raise DataError(
            f"example_inputs of shape {_shape(x)} do not fit {type(model).__name__}: {str(e).splitlines()[0][:200]}"
        ) from None
    phase("reference")
    t0 = time.perf_counter()
    if format != "onnx":
        return _export_edge(
            model,
            format,
            x,
            ref,
            labels,
            target,
            prec,
            force=force,
            validate=validate,
            floors=floors,
            opset=opset,
            calib=calib,
            t0=t0,
        )
    float_ctx = getattr(model, "float_reference", None)
    with (
        atomic_path(target, force=force) as tmp,
        tempfile.TemporaryDirectory() as td,
        bar(desc=f"export {target.name}", total=3 if validate else 2, unit="step") as pb,
    ):
        raw = Path(td) / "raw.onnx"
        if has_graph:  # the file the model runs is the artifact
            raw.write_bytes(model.onnx_bytes())
        elif isinstance(x, Mapping):
            with float_ctx() if float_ctx and prec in ("int8-dynamic", "fp16") else contextlib.nullcontext():
                raw.write_bytes(to_onnx(model, x, opset=opset))
        else:
            with float_ctx() if float_ctx and prec in ("int8-dynamic", "fp16") else contextlib.nullcontext():
                _torch_export(model, x, raw, opset)
        phase("export")
        with float_ctx() if float_ctx else contextlib.nullcontext():
            macs = count_macs(model, x)
        phase("count_macs")
        pb.update()
        if has_graph:
            _check_graph(raw, tmp, prec)
        else:
            _convert(raw, tmp, prec, getattr(model, "edgeslim_export", {}))
        phase("convert")
        pb.update()
        validation: dict[str, Any] = {}
        if validate:
            pb.set_postfix_str(f"validating on {len(x)} samples")
            validation = _validate(model, tmp, x, ref, labels, prec, floors)
            phase("validate")
            pb.update()
        integer = _integer_share(tmp, x, prec, model, target.name)
        phase("integer_macs")
        if not macs and integer:
            macs = integer["total_macs"]  # an ONNX-file model: torch's counter sees no ops, the graph has them
    art = Artifact(
        target,
        "onnx",
        prec,
        _shape(x),
        validation,
        {
            "macs": macs,
            "opset": opset,
            "source_model": type(model).__name__,
            "export_seconds": round(time.perf_counter() - t0, 3),
            "timings": timings,
            **({"integer_macs": integer} if integer else {}),
            **report_meta(model),
        },
    )
    art.save_record(force=True)
    log.info("exported %s (%s, %d bytes)", target, prec, art.size_bytes)
    return art


def _check_graph(raw: Path, out: Path, precision: str) -> None:
    """A ready ONNX file (an ONNX-captured quantized model, an ONNX-file model): checked, then written as it is."""
    import onnx

    try:
        onnx.checker.check_model(onnx.load(str(raw)))
    except onnx.checker.ValidationError as e:
        raise ExportError(f"the {precision} ONNX graph is invalid: {str(e).splitlines()[0]}") from None
    out.write_bytes(raw.read_bytes())


def _placed_float(model: Any) -> set[str]:
    """The nodes a quantized model keeps float because they measured faster in float here (placement='measured')."""
    placement = getattr(getattr(model, "report", None), "placement", None) or {}
    return set(placement.get("float_nodes") or ())


def _relay_for_openvino(path: Path, model: Any) -> dict[str, Any] | None:
    """Lay the Q/DQ pairs of ``model``'s INT8 ONNX file out for OpenVINO, in place, when they were laid out for
    ONNX Runtime (a pure graph pass on the calibrated scales: what ``QuantConfig(runtime="openvino")`` does at
    quantize time), so an OpenVINO artifact fuses each activation into its convolution whatever the model was
    quantized for. None when the file is laid out for OpenVINO already."""
    from edgeslim.quantize._layout import for_openvino, runtime_of

    if runtime_of(model) == "openvino":
        return None

    graph, record = for_openvino(path.read_bytes())
    path.write_bytes(graph)
    return {**record, "when": "at export (the model's Q/DQ pairs were laid out for onnxruntime)"}


def _integer_share(path: Path, x: Any, precision: str, model: Any, name: str = "") -> dict[str, Any] | None:
    """For INT8 files: the share of Conv/Gemm/MatMul MACs that run in integer kernels, measured on the graph as the
    runtime ``model`` is laid out for reads it."""
    if not precision.startswith("int8"):
        return None
    from edgeslim.core.onnx_model import as_feeds
    from edgeslim.quantize._capture import MIN_INTEGER_SHARE
    from edgeslim.quantize._layout import runtime_of
    from edgeslim.quantize._onnx import integer_macs

    placed, runtime = _placed_float(model), runtime_of(model)
    sess = ort_session(path)
    names = [i.name for i in sess.get_inputs()]
    feeds = as_feeds(slice_inputs(x, 0, 1), names)
    types = {i.name: i.type for i in sess.get_inputs()}
    feeds = {k: v.astype(np.float32) if types.get(k) == "tensor(float)" else v for k, v in feeds.items()}
    try:
        im = integer_macs(path.read_bytes(), feeds, runtime=runtime)
    except Exception as e:  # noqa: BLE001 - the share is a record; a graph it cannot read is said, not fatal
        log.warning("export: cannot measure the integer-MAC share of %s: %s", path.name, e)
        return None
    out = {k: im[k] for k in ("share", "integer_macs", "total_macs")}
    out["float_nodes"] = [n["node"] for n in im["nodes"] if not n["integer"]]
    if out["share"] is not None and out["share"] < MIN_INTEGER_SHARE:
        faster = len(placed & set(out["float_nodes"]))
        log.warning(
            "export: only %.1f%% of the MACs of %s run in integer kernels (%d of %d MAC nodes stay float%s)",
            100 * out["share"],
            name or path.name,
            len(out["float_nodes"]),
            len(im["nodes"]),
            f"; {faster} of them because they measured faster in float on this host (placement='measured')"
            if faster
            else "",
        )
    return out


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


def _export_edge(
    model: nn.Module,
    fmt: str,
    x: torch.Tensor,
    ref: torch.Tensor,
    labels: np.ndarray | None,
    target: Path,
    prec: str,
    *,
    force: bool,
    validate: bool,
    floors: ValidationFloors,
    opset: int,
    calib: Any,
    t0: float,
) -> Artifact:
    """Write an openvino/tflite/executorch artifact, validated in its own runtime against the torch model."""
    check_output(target, force=force)
    if fmt == "openvino":
        check_output(target.with_suffix(".bin"), force=force)
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td) / f"model{_edge.SUFFIX[fmt]}"
        if fmt == "openvino":  # from edgeslim's own ONNX file (INT8: its Q/DQ nodes)
            onnx_art = export(
                model, "onnx", example_inputs=x, path=Path(td) / "model.onnx", validate=False, opset=opset
            )
            layout = _relay_for_openvino(onnx_art.path, model) if prec == "int8" else None
            meta = _edge.write_openvino(onnx_art.path, tmp)
            if layout is not None:
                meta["qdq_layout"] = layout
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
    art = Artifact(
        target,
        fmt,
        prec,
        tuple(x.shape[1:]),
        validation,
        {
            "macs": macs,
            "params": count_params(model),
            "source_model": type(model).__name__,
            "export_seconds": round(time.perf_counter() - t0, 3),
            **meta,
            **report_meta(model),
        },
    )
    art.save_record(force=True)
    log.info("exported %s (%s %s, %d bytes)", target, fmt, prec, art.size_bytes)
    return art


def _validate(
    model: nn.Module,
    path: Path,
    x: torch.Tensor,
    ref: torch.Tensor,
    labels: np.ndarray | None,
    prec: str,
    floors: ValidationFloors,
    fmt: str = "onnx",
) -> dict[str, Any]:
    """Run the file in its runtime (ONNX Runtime for ONNX) on the samples and compare with the torch model;
    raise below the floors."""
    out = _ort_run(path, x) if fmt == "onnx" else _edge.run_in_runtime(fmt, path, x)
    n = batch_len(x)
    detect = _detector_layout(model, ref, floors.task)
    cmp = (lambda r, o: compare_detection(r, o, detect)) if detect else compare
    validation: dict[str, Any] = {
        "samples": n,
        "reference": "torch model passed to export",
        "runtime": "onnxruntime" if fmt == "onnx" else _edge.RUNTIME[fmt],
        **cmp(ref.numpy(), out),
    }
    if labels is not None:
        validation["accuracy_torch"] = float((ref.numpy().argmax(1) == labels).mean())
        validation["accuracy_artifact"] = float((out.argmax(1) == labels).mean())
    validation.setdefault("checks", ["cosine, SQNR and top-1 agreement (arg-max per sample) of the flattened output"])
    float_ctx = getattr(model, "float_reference", None)
    fl = None
    if float_ctx:
        with float_ctx(), torch.no_grad():
            fref = _forward(model, x).float().numpy()
        fl = cmp(fref, out)
        if labels is not None:
            fl["accuracy_float"] = float((fref.argmax(1) == labels).mean())
            fl["accuracy_artifact"] = validation["accuracy_artifact"]
        fl["floors"] = {
            "cosine": floors.float_min_cosine,
            "sqnr_db": floors.float_min_sqnr_db,
            "top1_agreement": floors.float_top1_agreement,
        }
        validation["vs_float_reference"] = fl
    cmin, smin, tmin = floors.resolve(prec)
    validation["floors"] = {"cosine": cmin, "sqnr_db": smin, "top1_agreement": tmin}
    validation["summary"] = _summary_line(validation, fl)
    log.info("export validation: %s", validation["summary"])
    bad = _below(validation, {"cosine": cmin, "sqnr_db": smin, "top1_agreement": tmin}, "")
    if fl is not None:
        bad += _below(fl, fl["floors"], "vs FP32 ")
    if bad:
        raise ExportError(
            f"{prec} {fmt} export of {type(model).__name__} failed validation on {n} samples: "
            + "; ".join(bad)
            + f" ({validation['summary']}; floors are set by ValidationFloors)"
            + _saturation_hint(model, fmt)
        )
    return validation


def _saturation_hint(model: nn.Module, fmt: str) -> str:
    """Where the file's INT8 kernels may have saturated (8-bit weights run in ONNX Runtime on x86 without VNNI):
    the likely cause and the fix, for the validation error."""
    from edgeslim.core.metrics import u8s8_saturates

    config = getattr(model, "config", None)
    if fmt != "onnx" or getattr(config, "reduce_range", None) is not False or getattr(config, "weight_bits", 8) != 8:
        return ""
    why = u8s8_saturates()
    return f"; likely saturation: {why}; quantize with QuantConfig(reduce_range=True) (7-bit weights)" if why else ""


def _below(v: dict[str, Any], floors: dict[str, float], prefix: str) -> list[str]:
    """The checks of one comparison under their floors (a detector's: per part, no top-1)."""
    if "parts" not in v:
        return [f"{prefix}{k} {v[k]:.4f} < {f}" for k, f in floors.items() if v[k] < f]
    return [
        f"{prefix}{part} {k} {d[k]:.4f} < {floors[k]}"
        for part, d in v["parts"].items()
        for k in ("cosine", "sqnr_db")
        if d[k] < floors[k]
    ]


def _detector_layout(model: nn.Module, ref: torch.Tensor, task: str) -> dict[str, Any] | None:
    """How a detector's output is laid out (``axis``: the box + score axis, ``classes``), or None for a
    classifier; a detector whose output has no such axis is one clear error."""
    if task == "classify":
        return None
    said = (
        getattr(model, "edgeslim_task", None)
        or getattr(getattr(model, "float_model", None), "edgeslim_task", None)
        or (getattr(model, "plan", None) or {}).get("task")  # the ONNX capture found a detector's output
    )
    if task == "auto" and said != "detect":
        return None
    shape = tuple(ref.shape)
    if len(shape) != 3 or min(shape[1], shape[2]) < 5:
        raise ExportError(
            f"the detector's output has shape {shape}; a detector output is [N, 4 + C, anchors] or "
            "[N, anchors, 4 + C] (4 box values then C >= 1 class scores): set ValidationFloors.task='classify' "
            "for another model"
        )
    from edgeslim.core.detection import DETECT_LAYOUT

    declared = getattr(model, "edgeslim_output", None) or getattr(
        getattr(model, "float_model", None), "edgeslim_output", None
    )
    # edgeslim's own detectors declare [N, A, 4 + C]; otherwise the smaller axis holds the boxes and scores
    axis = 2 if declared == DETECT_LAYOUT else (1 if shape[1] <= shape[2] else 2)
    return {"axis": axis, "classes": shape[axis] - 4}


def compare_detection(ref: np.ndarray, out: np.ndarray, layout: dict[str, Any]) -> dict[str, Any]:
    """A detector's output compared as its box values and its class scores (cosine, SQNR each); no top-1."""
    ax = layout["axis"]
    parts = {
        "boxes": compare(np.take(ref, range(4), axis=ax), np.take(out, range(4), axis=ax)),
        "scores": compare(
            np.take(ref, range(4, ref.shape[ax]), axis=ax), np.take(out, range(4, out.shape[ax]), axis=ax)
        ),
    }
    for d in parts.values():
        d.pop("top1_agreement")
    whole = compare(ref, out)
    return {
        "cosine": min(d["cosine"] for d in parts.values()),
        "sqnr_db": min(d["sqnr_db"] for d in parts.values()),
        "top1_agreement": None,
        "parts": parts,
        "whole_output": {k: whole[k] for k in ("cosine", "sqnr_db")},
        "checks": [
            f"detector output (box + score axis {ax}, {layout['classes']} classes): cosine and SQNR of the boxes "
            "and of the scores, each against the floors (cosine / sqnr_db below: the worse part)",
            "top-1 agreement skipped: an arg-max over a detector's anchors and coordinates means nothing",
        ],
    }


def _summary_line(v: dict[str, Any], fl: dict[str, Any] | None) -> str:
    """Both comparisons in one line: the file vs its (quantized) reference, and vs FP32 (what was lost)."""

    def part(d: dict[str, Any]) -> str:
        if "parts" in d:
            return (
                "; ".join(f"{k} cosine {p['cosine']:.4f}, SQNR {p['sqnr_db']:.1f} dB" for k, p in d["parts"].items())
                + " (detector: top-1 agreement skipped)"
            )
        return f"cosine {d['cosine']:.4f}, SQNR {d['sqnr_db']:.1f} dB, top-1 agreement {d['top1_agreement']:.3f}"

    text = f"vs {'quantized ' if fl is not None else ''}reference: {part(v)}"
    if "accuracy_artifact" in v:
        text += f", accuracy {v['accuracy_artifact']:.4f}"
    if fl is not None:
        text += f"; vs FP32: {part(fl)}"
        if "accuracy_float" in fl:
            text += f", accuracy {fl['accuracy_float']:.4f} -> {fl['accuracy_artifact']:.4f}"
    return text


def _convert(raw: Path, out: Path, precision: str, opts: dict) -> None:
    """Turn the exporter's file into the final one for ``precision`` (written to ``out``)."""
    import onnx

    if precision == "int8-dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        dyn = raw.with_name("dynamic.onnx")
        quantize_dynamic(
            str(raw), str(dyn), per_channel=bool(opts.get("per_channel", True)), weight_type=QuantType.QInt8
        )
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
