"""Export: ONNX FP32 / FP16 / INT8 (QDQ) / dynamic INT8; OpenVINO IR, TFLite and ExecuTorch FP32 / INT8 (extras);
each validated in its runtime against the torch model."""

from edgeslim.export._api import DEFAULT_FLOORS, FORMATS, ValidationFloors, compare, export

__all__ = ["DEFAULT_FLOORS", "FORMATS", "ValidationFloors", "compare", "export"]
