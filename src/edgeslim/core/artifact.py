"""Artifact: one deployable file (ONNX ...) with its format, precision and validation record.

The record is also written beside the file as ``<file>.json`` so that a later ``measure`` or ``report``
knows what the file is without re-deriving it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from edgeslim.core.errors import ExportError, ModelError, shown
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
        """An artifact from its file (reading the ``.json`` record beside it when there is one).

        Raises:
            ExportError: the file does not exist, its format cannot be told, or the record beside it is not an
                artifact record (e.g. a metrics JSON saved over it).
            ModelError: an ``.onnx`` file that is not a readable ONNX model (truncated, or not ONNX at all).
        """
        p = Path(path)
        if not p.is_file():
            raise ExportError(f"artifact file {str(p)!r} does not exist")
        rec = p.with_name(p.name + ".json")
        if rec.is_file():
            return cls._from_record(p, rec)
        if p.suffix != ".onnx":
            fmt = SUFFIX_FORMATS.get(p.suffix)
            if fmt is None:
                raise ExportError(
                    f"cannot tell the format of {str(p)!r}: no record beside it and its suffix is not "
                    f"one of {', '.join(SUFFIX_FORMATS)}"
                )
            # without a record only the format is known; the precision and input shape are not
            return cls(p, fmt, "unknown", ())
        m = load_onnx(p, load_external_data=False)
        if not m.graph.input:
            raise ModelError(f"ONNX file {str(p)!r} has no graph inputs")
        t = m.graph.input[0].type.tensor_type
        # () when the input's rank is unknown or a sample dimension is symbolic: measure then needs input_shape=
        dims = [d.dim_value for d in t.shape.dim][1:] if t.HasField("shape") else []
        if not all(d > 0 for d in dims):
            dims = []
        ops = {n.op_type for n in m.graph.node}
        precision = (
            "int8"
            if "QuantizeLinear" in ops or "QLinearConv" in ops
            else ("int8-dynamic" if "DynamicQuantizeLinear" in ops else "fp32")
        )
        return cls(p, "onnx", precision, tuple(dims))

    @classmethod
    def _from_record(cls, p: Path, rec: Path) -> Artifact:
        names = {f.name for f in fields(cls)}
        try:
            d = json.loads(rec.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ExportError(
                f"the record {str(rec)!r} beside {p.name!r} is not readable JSON ({type(e).__name__}); "
                "move or delete it to measure the file without it"
            ) from None
        if not isinstance(d, dict) or not {"format", "precision", "input_shape"} <= set(d) or set(d) - names:
            what = f"keys {shown(sorted(d)[:8])}" if isinstance(d, dict) else f"a {type(d).__name__}"
            raise ExportError(
                f"the record {str(rec)!r} beside {p.name!r} is not an artifact record (it has {what}; an "
                f"artifact record has {', '.join(sorted(names))}); it may be a metrics file saved over "
                "it: move or delete it to measure the file without it"
            )
        d["path"] = p
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise ExportError(
                f"the record {str(rec)!r} beside {p.name!r} has a bad value: {shown(str(e))}; move or "
                "delete it to measure the file without it"
            ) from None


def load_onnx(path: str | Path, *, load_external_data: bool = True) -> Any:
    """``onnx.load`` with a corrupt or truncated file as one clear :class:`ModelError` (not a protobuf error)."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=load_external_data)
    except Exception as e:  # protobuf DecodeError, onnx's own errors, a missing external-data file ...
        raise ModelError(
            f"{str(path)!r} is not a readable ONNX model (truncated, corrupt or not ONNX): "
            f"{type(e).__name__}: {shown(str(e).splitlines()[0] if str(e) else '', 120)}"
        ) from None
