"""OpenVINO runtime (CPU plugin): loads ONNX files (FP32, FP16 or INT8 QDQ) or OpenVINO IR (``.xml`` + ``.bin``).

Needs the ``openvino`` extra. Each batch size gets its own statically shaped compiled model (OpenVINO runs
static shapes faster than dynamic ones); FP32 inference precision is forced so results compare with torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeslim.core.errors import RuntimeBackendError
from edgeslim.runtime._runners import RUNTIMES, Runner, _require, artifact_path, one_input


@RUNTIMES.register("openvino")
class OpenVinoRunner(Runner):
    """OpenVINO CPU: ``INFERENCE_NUM_THREADS=threads``, 1 stream, latency hint, f32 inference precision.

    INT8 comes from the Q/DQ nodes of an INT8 ONNX artifact (OpenVINO runs them as low-precision kernels).
    """

    name = "openvino"
    formats = {"onnx": (".onnx",), "openvino": (".xml",)}
    requires = ("openvino",)
    extra = "openvino"

    def __init__(self, target: Any, *, threads: int = 1) -> None:
        super().__init__(target, threads=threads)
        self.path, self.format = artifact_path(target, self.name, self.formats)
        ov = _require("openvino", "openvino", self.extra)
        self.version = ov.__version__.split("-")[0]
        self.core = ov.Core()
        try:
            self.model = self.core.read_model(str(self.path))
        except Exception as e:  # OpenVINO raises its own exception types for unreadable files
            raise RuntimeBackendError(f"openvino cannot read {str(self.path)!r}: {str(e).strip()[:300]}") from None
        one_input(self.path, len(self.model.inputs))
        shape = self.model.inputs[0].get_partial_shape()
        self.fixed_batch = shape[0].get_length() if shape.rank.is_static and shape[0].is_static else None
        self.config = {
            "INFERENCE_NUM_THREADS": self.threads,
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32",
        }
        self._requests: dict[tuple[int, ...], Any] = {}

    def _request(self, shape: tuple[int, ...]) -> Any:
        req = self._requests.get(shape)
        if req is None:
            model = self.model.clone()
            if self.fixed_batch is None:
                model.reshape({model.inputs[0]: list(shape)})
            try:
                compiled = self.core.compile_model(model, "CPU", self.config)
            except Exception as e:
                raise RuntimeBackendError(
                    f"openvino cannot compile {str(self.path)!r} for input shape {shape}: {str(e).strip()[:300]}"
                ) from None
            req = self._requests[shape] = compiled.create_infer_request()
        return req

    def run(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        req = self._request(x.shape)
        req.infer({0: x})
        return np.array(req.get_output_tensor(0).data, copy=True)

    def describe(self) -> str:
        return (
            f"openvino {self.version} (CPU, {self.format}), {self.threads} thread{'s' * (self.threads != 1)}, 1 stream"
        )
