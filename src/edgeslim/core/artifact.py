"""Artifact: one deployable file (ONNX ...) with its format, precision and validation record.

The record is also written beside the file as ``<file>.json`` so that a later ``measure`` or ``report``
knows what the file is without re-deriving it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeslim.core.errors import ExportError
from edgeslim.core.io import write_json


#: file suffix -> artifact format
SUFFIX_FORMATS = {".onnx": "onnx", ".xml": "openvino", ".tflite": "tflite", ".pte": "executorch"}


@dataclass
class Artifact:
    """A deployable model file.

    Attributes:
        path: the file.
        format: ``onnx``, ``openvino`` (IR ``.xml`` + ``.bin``), ``tflite`` or ``executorch`` (``.pte``).
        precision: ``fp32``, ``fp16``, ``int8`` (static, QDQ) or ``int8-dynamic``.
        input_shape: one sample's shape ``(C, H, W)``; the batch dimension is dynamic.
        validation: the numerical check against the torch reference (cosine, SQNR dB, top-1 agreement, samples).
        meta: anything else worth keeping (source model, quantization report, opset, ...).
    """

    path: Path
    format: str
    precision: str
    input_shape: tuple[int, ...]
    validation: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.input_shape = tuple(int(v) for v in self.input_shape)

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size

    @property
    def record_path(self) -> Path:
        return self.path.with_name(self.path.name + ".json")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["input_shape"] = list(self.input_shape)
        return d

    def save_record(self, *, force: bool = True) -> Path:
        return write_json(self.record_path, self.to_dict(), force=force)

    @classmethod
    def load(cls, path: str | Path) -> Artifact:
        """An artifact from its file (reading the ``.json`` record beside it when there is one)."""
        p = Path(path)
        if not p.is_file():
            raise ExportError(f"artifact file {str(p)!r} does not exist")
        rec = p.with_name(p.name + ".json")
        if rec.is_file():
            d = json.loads(rec.read_text())
            d["path"] = p
            return cls(**d)
        if p.suffix != ".onnx":
            fmt = SUFFIX_FORMATS.get(p.suffix)
            if fmt is None:
                raise ExportError(f"cannot tell the format of {str(p)!r}: no record beside it and its suffix is not "
                                  f"one of {', '.join(SUFFIX_FORMATS)}")
            # without a record only the format is known; the precision and input shape are not
            return cls(p, fmt, "unknown", ())
        import onnx

        m = onnx.load(str(p), load_external_data=False)
        dims = [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim][1:]
        ops = {n.op_type for n in m.graph.node}
        precision = "int8" if "QuantizeLinear" in ops or "QLinearConv" in ops else (
            "int8-dynamic" if "DynamicQuantizeLinear" in ops else "fp32")
        return cls(p, "onnx", precision, tuple(dims))
