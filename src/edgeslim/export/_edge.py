"""Writers for the edge formats besides ONNX: OpenVINO IR, TFLite (LiteRT) and ExecuTorch (XNNPACK).

Each artifact is validated in its own runtime (the edgeslim runner for its format) against the torch model.

INT8 per format:
- ``openvino``: converted from edgeslim's INT8 Q/DQ ONNX (the same scales as the ONNX artifact).
- ``tflite`` / ``executorch``: these converters take PT2E-quantized graphs, not edgeslim's fake-quantization,
  so the BatchNorm-folded float graph of the quantized model is re-quantized with the runtime's own PT2E
  quantizer (litert-torch ``PT2EQuantizer`` / ExecuTorch ``XNNPACKQuantizer``; symmetric INT8, per-channel
  weights as the QuantConfig says), calibrated on ``calib``. The artifact's ``meta["int8"]`` records this.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import shutil
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from edgeslim.core.errors import DataError, ExportError

log = logging.getLogger(__name__)

SUFFIX = {"onnx": ".onnx", "openvino": ".xml", "tflite": ".tflite", "executorch": ".pte"}
PRECISIONS = {"openvino": ("fp32", "int8"), "tflite": ("fp32", "int8"), "executorch": ("fp32", "int8")}
RUNTIME = {"openvino": "openvino", "tflite": "litert", "executorch": "executorch"}
EXTRA = {"openvino": "openvino", "tflite": "litert", "executorch": "executorch"}


def _need(module: str, fmt: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ExportError(
            f"{fmt} export needs {module.split('.')[0]!r} ({e}): pip install 'edgeslim[{EXTRA[fmt]}]'"
        ) from None


def _float(model: nn.Module) -> contextlib.AbstractContextManager:
    """Within the block a quantized model computes its folded float reference; a float model is itself."""
    ctx = getattr(model, "float_reference", None)
    return ctx() if ctx else contextlib.nullcontext()


def _float_graph(model: nn.Module, x1: torch.Tensor) -> nn.Module:
    """A plain float graph of ``model`` (``torch.export``) for PT2E: the folded float reference of a quantized model."""
    with _float(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(model.eval(), (x1,)).module()


def _calib_samples(calib: Any, n: int) -> torch.Tensor:
    if calib is None:
        raise DataError(
            "INT8 tflite/executorch export re-quantizes with the runtime's PT2E quantizer and needs "
            "calibration data: pass calib=<dataset or tensor of real samples> (the same you gave "
            "edgeslim.quantize)"
        )
    if hasattr(calib, "normalized") and hasattr(calib, "take"):
        if len(calib) == 0:
            raise DataError(f"calibration dataset {calib.name!r} is empty")
        return calib.take(min(n, len(calib)), seed=0).normalized()
    if isinstance(calib, torch.Tensor) and calib.ndim >= 2 and len(calib):
        return calib[:n].float()
    raise DataError(f"calib must be an ImageDataset or a non-empty tensor batch, got {type(calib).__name__}")


def _pt2e(
    model: nn.Module, x1: torch.Tensor, quantizer: Any, calib: Any, *, fold_quantize: bool = True
) -> tuple[nn.Module, dict[str, Any]]:
    """PT2E post-training quantization of ``model``'s float graph with ``quantizer``, calibrated on ``calib``.

    litert-torch needs ``fold_quantize=False`` (folded int8 weight constants fail its converter).
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    cfg = getattr(model, "config", None)
    n = int(getattr(cfg, "num_samples", 512) or 512)
    xs = _calib_samples(calib, n)
    prepared = prepare_pt2e(_float_graph(model, x1), quantizer)
    with torch.no_grad():
        for i in range(len(xs)):  # the exported graph has a static batch of 1
            prepared(xs[i : i + 1])
    return convert_pt2e(prepared, fold_quantize=fold_quantize), {"calibration_samples": len(xs)}


def _per_channel(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "per_channel", True))


def write_tflite(model: nn.Module, x: torch.Tensor, out: Path, precision: str, calib: Any) -> dict[str, Any]:
    litert_torch = _need("litert_torch", "tflite")
    x1 = x[:1]
    meta: dict[str, Any] = {"converter": f"litert-torch {litert_torch.__version__}", "batch": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if precision == "int8":
            from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
            from litert_torch.quantize.quant_config import QuantConfig

            quantizer = PT2EQuantizer().set_global(
                get_symmetric_quantization_config(is_per_channel=_per_channel(model))
            )
            qmodel, info = _pt2e(model, x1, quantizer, calib, fold_quantize=False)
            edge = litert_torch.convert(qmodel, (x1,), quant_config=QuantConfig(pt2e_quantizer=quantizer))
            meta["int8"] = {
                "method": "re-quantized with litert-torch PT2EQuantizer (symmetric INT8, per-channel "
                f"weights={_per_channel(model)}) on the folded float graph",
                **info,
            }
        else:
            with _float(model):
                edge = litert_torch.convert(model.eval(), (x1,))
        edge.export(str(out))
    return meta


def write_executorch(model: nn.Module, x: torch.Tensor, out: Path, precision: str, calib: Any) -> dict[str, Any]:
    _need("executorch.exir", "executorch")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    x1 = x[:1]
    meta: dict[str, Any] = {"converter": "executorch.exir to_edge_transform_and_lower + XnnpackPartitioner", "batch": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if precision == "int8":
            from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
                XNNPACKQuantizer,
                get_symmetric_quantization_config,
            )

            quantizer = XNNPACKQuantizer().set_global(
                get_symmetric_quantization_config(is_per_channel=_per_channel(model))
            )
            graph, info = _pt2e(model, x1, quantizer, calib)
            meta["int8"] = {
                "method": "re-quantized with ExecuTorch XNNPACKQuantizer (symmetric INT8, per-channel "
                f"weights={_per_channel(model)}) on the folded float graph",
                **info,
            }
        else:
            graph = _float_graph(model, x1)
        program = to_edge_transform_and_lower(
            torch.export.export(graph, (x1,)), partitioner=[XnnpackPartitioner()]
        ).to_executorch()
    out.write_bytes(program.buffer)
    return meta


def write_openvino(onnx_file: Path, out: Path) -> dict[str, Any]:
    ov = _need("openvino", "openvino")
    model = ov.convert_model(str(onnx_file))
    ov.save_model(model, str(out), compress_to_fp16=False)  # OpenVINO would store fp16 weights by default
    return {"converter": f"openvino {ov.__version__.split('-')[0]} convert_model from the edgeslim ONNX"}


def run_in_runtime(fmt: str, path: Path, x: torch.Tensor) -> Any:
    """Outputs of the artifact at ``path`` in its own runtime, for every sample of ``x`` (numpy)."""
    import numpy as np

    from edgeslim.runtime import load
    from edgeslim.runtime._compare import _outputs

    try:
        runner = load(path, RUNTIME[fmt], threads=1)
    except Exception as e:  # noqa: BLE001 (reported as an export error naming the file)
        raise ExportError(f"the exported {fmt} file {path.name} does not load in {RUNTIME[fmt]}: {e}") from None
    return np.asarray(_outputs(runner, x.numpy()))


def move(src: Path, dst: Path, fmt: str) -> None:
    """Move the written file (and an OpenVINO ``.bin`` beside it) to ``dst``."""
    if fmt == "openvino":
        shutil.move(str(src.with_suffix(".bin")), str(dst.with_suffix(".bin")))
    shutil.move(str(src), str(dst))
