"""Torch model <-> ONNX graph: one export for every model input shape, and ONNX files as models.

A model is called with one tensor, or with keyword inputs (a dict of tensors: ``input_ids``, ``attention_mask``
...). :func:`to_onnx` writes any such model to ONNX with the TorchScript exporter, which records every
``F.conv2d``/``F.linear``/``matmul`` whatever module calls it, keeps integer inputs integer, and names each node after
the module that ran it (:func:`module_of` reads the name back). :class:`OnnxModel` is an ``.onnx`` file held as a
torch module (its forward runs ONNX Runtime), so a user who only has an ONNX file can use the same verbs.

onnx and onnxruntime are imported only when used.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeslim.core.errors import DataError, ModelError

__all__ = [
    "OnnxModel",
    "as_feeds",
    "first_output",
    "input_names",
    "module_of",
    "ort_session",
    "slice_inputs",
    "to_onnx",
]

SINGLE_INPUT = "input"


def input_names(example: Any) -> list[str]:
    """The ONNX input names of a model called with ``example`` (a tensor: ``input``; a dict: its keys)."""
    if isinstance(example, Mapping):
        return [str(k) for k in example]
    return [SINGLE_INPUT]


def slice_inputs(example: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of a tensor or of every tensor in a dict of inputs."""
    if isinstance(example, Mapping):
        return {k: v[start:stop] if isinstance(v, torch.Tensor) else v for k, v in example.items()}
    return example[start:stop]


def batch_len(example: Any) -> int:
    """Samples in a tensor or in a dict of batched tensors (their first dimension)."""
    if isinstance(example, Mapping):
        lens = {len(v) for v in example.values() if isinstance(v, torch.Tensor)}
        if len(lens) != 1:
            raise DataError(
                f"the inputs {list(example)} must be tensors with one batch size (got sizes {sorted(lens)})"
            )
        return lens.pop()
    return len(example)


def as_feeds(example: Any, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """ONNX Runtime feeds of ``example``: dtypes kept (int64 token ids stay int64), names as :func:`input_names`."""
    if isinstance(example, Mapping):
        items = [(str(k), v) for k, v in example.items()]
    else:
        items = [((names or [SINGLE_INPUT])[0], example)]
    out = {}
    for k, v in items:
        a = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        out[k] = np.ascontiguousarray(a)
    return out


def first_output(y: Any) -> torch.Tensor:
    """The first tensor of a model's output (a tensor, a tuple/list, a dict or a Hugging Face ModelOutput)."""
    if isinstance(y, torch.Tensor):
        return y
    if isinstance(y, Mapping):
        y = list(y.values())
    if isinstance(y, (tuple, list)) and y:
        return first_output(y[0])
    raise ModelError(f"the model's output is a {type(y).__name__}, not a tensor (or a tuple/dict of tensors)")


class _Adapter(nn.Module):
    """Calls ``model`` with positional ONNX inputs as keyword arguments (so dict inputs export by name)."""

    def __init__(self, model: nn.Module, names: list[str] | None) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *args: torch.Tensor) -> Any:
        if self.names is None:
            return self.model(*args)
        return self.model(**dict(zip(self.names, args, strict=True)))


def to_onnx(model: nn.Module, example: Any, *, opset: int = 17) -> bytes:
    """``model`` (eval mode, called on ``example``'s first sample) as a self-contained ONNX file, in memory.

    Inputs are named as :func:`input_names` says, with a dynamic batch dimension; outputs ``output``, ``output_1``...
    Node names carry the module that ran them (read them with :func:`module_of`).
    """
    from edgeslim.core.counting import _no_fused_attention

    if isinstance(model, OnnxModel):
        return model.onnx_bytes()
    names = input_names(example)
    keyed = isinstance(example, Mapping)
    one = slice_inputs(example, 0, 1)
    args = tuple(one[k] for k in names) if keyed else (one,)
    adapter = _Adapter(model, names if keyed else None).eval()
    with torch.no_grad():
        y = adapter(*args)
    n_out = len(y) if isinstance(y, (tuple, list)) else len(y.values()) if isinstance(y, Mapping) else 1
    out_names = ["output"] + [f"output_{i}" for i in range(1, n_out)]
    axes = {n: {0: "batch"} for n in [*names, *out_names]}
    f = io.BytesIO()
    was = model.training
    with warnings.catch_warnings(), torch.no_grad(), _no_fused_attention():
        warnings.simplefilter("ignore")
        # the TorchScript exporter writes one self-contained file, turns fake quantization into Q/DQ nodes and
        # sees functional convolutions, linears and matmuls wherever they are called
        torch.onnx.export(
            adapter,
            args,
            f,
            dynamo=False,
            opset_version=opset,
            input_names=names,
            output_names=out_names,
            dynamic_axes=axes,
            do_constant_folding=True,
        )
    model.train(was)
    return f.getvalue()


def module_of(node_name: str, root: str = "model") -> str:
    """The module (dotted name, as ``named_modules`` gives it) that ran an exported node, '' for the top level.

    The exporter names a node ``/scope/scope/OpType_N``: each scope is either the child's own name or, inside a
    Sequential/ModuleList, the full path so far (``/features/features.0/Conv``); ``root`` is the adapter's scope.
    """
    parts = [p for p in node_name.split("/") if p][:-1]
    if parts and parts[0] == root:
        parts = parts[1:]
    path = ""
    for p in parts:
        path = p if not path or p.startswith(path + ".") else f"{path}.{p}"
    return path


def ort_session(model: bytes | str | os.PathLike, *, threads: int = 0, optimize: bool = True, spin: bool = True) -> Any:
    """An ONNX Runtime CPU session for ONNX bytes or a file (``threads`` 0: ORT's default; ``spin`` False: idle
    worker threads sleep, for passes over data on a shared CPU)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if not spin:
        # worker threads sleep between runs instead of spinning: on a shared or busy CPU the spinning threads take
        # cores the next run needs (used for calibration and validation passes, never for timing)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    src = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises its own types for invalid graphs
        where = "the ONNX graph" if isinstance(model, bytes) else repr(str(model))
        raise ModelError(f"onnxruntime cannot load {where}: {str(e).strip().splitlines()[0][:300]}") from None


def fixed_batch(session: Any) -> int | None:
    """The batch size an ONNX Runtime session's inputs are fixed to (e.g. 1 for a file exported with a static
    batch), or ``None`` when their first dimension is symbolic."""
    for i in session.get_inputs():
        d = i.shape[0] if i.shape else None
        if isinstance(d, int) and d > 0:
            return d
    return None


def run_session(session: Any, example: Any, *, chunk: int = 256) -> list[np.ndarray]:
    """All outputs of ``session`` on ``example`` (a tensor or a dict of tensors), run in chunks of samples (of the
    fixed batch size when the file has one)."""
    chunk = fixed_batch(session) or chunk
    names = [i.name for i in session.get_inputs()]
    feeds = as_feeds(example, names)
    missing = [n for n in names if n not in feeds]
    if missing:
        raise DataError(f"the ONNX model needs inputs {names}; missing {missing} (pass a dict of inputs by name)")
    dtypes = {i.name: _NP_TYPES.get(i.type) for i in session.get_inputs()}
    feeds = {
        k: v.astype(dtypes[k]) if dtypes.get(k) is not None and v.dtype != dtypes[k] else v
        for k, v in feeds.items()
        if k in dtypes
    }
    n = len(next(iter(feeds.values())))
    outs: list[list[np.ndarray]] = []
    i = 0
    while i < max(n, 1):
        try:
            outs.append(session.run(None, {k: v[i : i + chunk] for k, v in feeds.items()}))
        except Exception:
            if chunk == 1 or n == 1:
                raise
            chunk = 1  # a graph the tracer fixed to batch 1 (e.g. a Python len() of the batch): one sample a run
            continue
        i += chunk
    return [np.concatenate([o[j] for o in outs]) for j in range(len(outs[0]))]


_NP_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(double)": np.float64,
    "tensor(bool)": np.bool_,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
}


class OnnxModel(nn.Module):
    """An ONNX file as a torch module: its forward runs ONNX Runtime (CPU) and returns torch tensors.

    The file's bytes are a ``uint8`` buffer, so the model saves and loads with its state_dict like any module.

    Args:
        source: a path to an ``.onnx`` file, the file's bytes, or an ``onnx.ModelProto``.
    """

    def __init__(self, source: str | os.PathLike | bytes | Any) -> None:
        super().__init__()
        self.name = "onnx-model"
        if isinstance(source, (str, os.PathLike)):
            p = Path(source)
            if not p.is_file():
                raise ModelError(f"ONNX file {str(p)!r} does not exist")
            self.name = p.stem
            data = p.read_bytes()
        elif isinstance(source, bytes):
            data = source
        elif hasattr(source, "SerializeToString"):
            data = source.SerializeToString()
        else:
            raise ModelError(f"OnnxModel needs a path, bytes or an onnx.ModelProto, not {type(source).__name__}")
        self.register_buffer("onnx_data", torch.frombuffer(bytearray(data), dtype=torch.uint8).clone())
        self._session: Any = None
        self.register_load_state_dict_post_hook(lambda m, _keys: m._drop_session())
        self.session()  # refuse a corrupt file now, with one line

    def _drop_session(self) -> None:
        self._session = None

    def onnx_bytes(self) -> bytes:
        return self.onnx_data.numpy().tobytes()

    def session(self) -> Any:
        if self._session is None:
            try:
                import onnx

                onnx.load_from_string(self.onnx_bytes())
            except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
                raise ModelError(
                    f"{self.name!r} is not a valid ONNX file ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200] if str(e) else ''})"
                ) from None
            self._session = ort_session(self.onnx_bytes())
        return self._session

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session().get_inputs()]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        names = self.input_names
        if args and kwargs:
            raise DataError(f"{self.name}: pass inputs either positionally or by name {names}, not both")
        example = dict(kwargs) if kwargs else (args[0] if len(args) == 1 else dict(zip(names, args, strict=False)))
        if not kwargs and len(args) == 1 and len(names) == 1:
            example = {names[0]: args[0]}
        outs = run_session(self.session(), example)
        ts = [torch.from_numpy(o) for o in outs]
        return ts[0] if len(ts) == 1 else tuple(ts)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_session"] = None  # an ONNX Runtime session is rebuilt, never copied
        return state
