"""LiteRT (TensorFlow Lite) runtime: runs ``.tflite`` files with the XNNPACK delegate.

Needs the ``litert`` extra. Models with integer input/output (full-integer INT8) are fed and read through the
tensors' own scale and zero point, so callers always pass and get float32.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeslim.core.errors import RuntimeBackendError
from edgeslim.runtime._runners import RUNTIMES, Runner, _require, artifact_path, one_input


@RUNTIMES.register("litert")
class LiteRtRunner(Runner):
    """``ai_edge_litert.interpreter.Interpreter(num_threads=threads)`` (XNNPACK delegate on CPU).

    The batch size is the one the file was converted with (``fixed_batch``; litert-torch writes static shapes).
    """

    name = "litert"
    formats = {"tflite": (".tflite",)}
    requires = ("ai_edge_litert.interpreter",)
    extra = "litert"

    def __init__(self, target: Any, *, threads: int = 1) -> None:
        super().__init__(target, threads=threads)
        self.path, self.format = artifact_path(target, self.name, self.formats)
        interp = _require("ai_edge_litert.interpreter", "ai-edge-litert", self.extra)
        from importlib.metadata import version

        self.version = version("ai-edge-litert")
        try:
            self.interpreter = interp.Interpreter(model_path=str(self.path), num_threads=self.threads)
            self.interpreter.allocate_tensors()
        except Exception as e:  # LiteRT raises ValueError/RuntimeError for files it cannot parse
            raise RuntimeBackendError(f"litert cannot load {str(self.path)!r}: {str(e).strip()[:300]}") from None
        ins, outs = self.interpreter.get_input_details(), self.interpreter.get_output_details()
        one_input(self.path, len(ins))
        self.input, self.output = ins[0], outs[0]
        self.fixed_batch = int(self.input["shape"][0])

    def run(self, x: np.ndarray) -> np.ndarray:
        if len(x) != self.fixed_batch:
            raise RuntimeBackendError(
                f"{self.path.name} runs batch {self.fixed_batch}, not {len(x)} (LiteRT files "
                "from litert-torch have a static batch dimension)"
            )
        dtype = self.input["dtype"]
        if np.issubdtype(dtype, np.integer):
            scale, zp = self.input["quantization"]
            info = np.iinfo(dtype)
            x = np.clip(np.round(x / scale) + zp, info.min, info.max)
        self.interpreter.set_tensor(self.input["index"], np.ascontiguousarray(x, dtype=dtype))
        self.interpreter.invoke()
        y = self.interpreter.get_tensor(self.output["index"])
        if np.issubdtype(y.dtype, np.integer):
            scale, zp = self.output["quantization"]
            return (y.astype(np.float32) - zp) * scale
        return np.array(y, dtype=np.float32, copy=True)

    def describe(self) -> str:
        io = "int8 I/O" if np.issubdtype(self.input["dtype"], np.integer) else "float I/O"
        return f"litert {self.version} (XNNPACK, {io}), {self.threads} thread{'s' * (self.threads != 1)}"
