"""ExecuTorch runtime: runs ``.pte`` programs (lowered to the XNNPACK delegate by ``edgeslim.export``).

Needs the ``executorch`` extra. ExecuTorch's thread pool is process-wide and an XNNPACK program binds it when it
loads, so the runner sizes the pool to ``threads`` before loading and never resizes it under a loaded program:
a runner whose pool was resized since (by loading another executorch runner with a different thread count)
refuses to run instead of touching a freed pool.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeslim.core.errors import RuntimeBackendError
from edgeslim.runtime._runners import RUNTIMES, Runner, _require, artifact_path, one_input


@RUNTIMES.register("executorch")
class ExecuTorchRunner(Runner):
    """``executorch.runtime.Runtime`` loading the program's ``forward`` method; batch fixed at export."""

    name = "executorch"
    formats = {"executorch": (".pte",)}
    requires = ("executorch.runtime", "executorch.extension.pybindings.portable_lib")
    extra = "executorch"

    def __init__(self, target: Any, *, threads: int = 1) -> None:
        super().__init__(target, threads=threads)
        self.path, self.format = artifact_path(target, self.name, self.formats)
        rt = _require("executorch.runtime", "executorch", self.extra)
        self._pool = _require("executorch.extension.pybindings.portable_lib", "executorch", self.extra)
        from importlib.metadata import version

        import torch

        self._torch = torch
        self.version = version("executorch")
        if self._pool._threadpool_get_thread_count() != self.threads:
            self._pool._unsafe_reset_threadpool(self.threads)
        try:
            self.method = rt.Runtime.get().load_program(str(self.path)).load_method("forward")
        except Exception as e:  # the pybindings raise RuntimeError for invalid programs
            raise RuntimeBackendError(f"executorch cannot load {str(self.path)!r}: {str(e).strip()[:300]}") from None
        meta = self.method.metadata
        one_input(self.path, meta.num_inputs())
        self.fixed_batch = int(meta.input_tensor_meta(0).sizes()[0])

    def run(self, x: np.ndarray) -> np.ndarray:
        if len(x) != self.fixed_batch:
            raise RuntimeBackendError(
                f"{self.path.name} runs batch {self.fixed_batch}, not {len(x)} (the batch dimension is fixed at export)"
            )
        pool = self._pool._threadpool_get_thread_count()
        if pool != self.threads:
            raise RuntimeBackendError(
                f"{self.path.name} was loaded for {self.threads} thread(s) but ExecuTorch's process-wide thread pool "
                f"now has {pool} (another executorch runner was loaded since): load one thread count at a time"
            )
        y = self.method.execute([self._torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))])[0]
        return y.float().numpy().copy()

    def describe(self) -> str:
        return f"executorch {self.version} (XNNPACK), {self.threads} thread{'s' * (self.threads != 1)}"
