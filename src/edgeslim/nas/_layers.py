"""What the latency table measures: each Conv/Linear layer of a model as ONNX Runtime runs it, described as data.

A :class:`LayerOp` is one layer's op (``conv`` / ``linear``), its fixed geometry (kernel, stride, padding, dilation,
input size) and the activation ONNX Runtime fuses into it (``relu``, ``relu6``, ``hardswish`` or ``none``); BatchNorm
is folded into the convolution at export, so a Conv-BN-act triple is one fused kernel at run time and one table entry.
Its widths (``cin``, ``cout``) are free: the table is looked up at any widths of the search space.

:func:`micro_onnx` builds the tiny one-node graph that is timed for an entry.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeslim.core.errors import ModelError

#: activation module types ONNX Runtime fuses into the preceding Conv/Gemm (FusedConv / FusedGemm)
_ACTS: dict[type, str] = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish"}
#: modules passed over when looking for the activation after a layer (folded into the layer at export)
_FOLDED = (nn.BatchNorm1d, nn.BatchNorm2d, nn.Identity, nn.Dropout)


@dataclasses.dataclass(frozen=True)
class LayerOp:
    """One Conv/Linear layer's geometry, independent of its widths.

    Attributes:
        op: ``conv`` or ``linear``.
        kernel, stride, padding, dilation: the convolution's (height, width) pairs (``(1, 1)``/``(0, 0)`` for linear).
        depthwise: one group per channel (``groups == cin == cout``; the widths move together).
        groups: the group count of a grouped, non-depthwise convolution (1 otherwise).
        height, width: the layer's input spatial size (1 x 1 for linear).
        act: the activation fused into it.
    """

    op: str
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    depthwise: bool = False
    groups: int = 1
    height: int = 1
    width: int = 1
    act: str = "none"

    def key(self, cin: int, cout: int) -> str:
        """The table key of this op at widths ``cin`` x ``cout`` (dtype, threads and runtime live in the file)."""
        k = "x".join(map(str, self.kernel))
        geo = (
            f"k{k}s{self.stride[0]}x{self.stride[1]}p{self.padding[0]}x{self.padding[1]}"
            f"d{self.dilation[0]}x{self.dilation[1]}"
        )
        g = "dw" if self.depthwise else f"g{self.groups}"
        return f"{self.op}|{cin}|{cout}|{geo}|{g}|{self.height}x{self.width}|{self.act}"

    def macs(self, cin: int, cout: int) -> int:
        if self.op == "linear":
            return cin * cout
        oh, ow = self.out_size()
        per = (1 if self.depthwise else cin // self.groups) * self.kernel[0] * self.kernel[1]
        return per * cout * oh * ow

    def out_size(self) -> tuple[int, int]:
        if self.op == "linear":
            return 1, 1
        hw = []
        for i, n in enumerate((self.height, self.width)):
            eff = self.dilation[i] * (self.kernel[i] - 1) + 1
            hw.append((n + 2 * self.padding[i] - eff) // self.stride[i] + 1)
        return hw[0], hw[1]


@dataclasses.dataclass(frozen=True)
class Layer:
    """A named layer of a model: its op, its base widths, and the search-space units its widths follow."""

    name: str
    op: LayerOp
    cin: int
    cout: int
    cin_unit: str | None = None
    cout_unit: str | None = None

    def widths(self, assign: dict[str, int]) -> tuple[int, int]:
        """``(cin, cout)`` of this layer when the units have the widths in ``assign`` (others at their base)."""
        cout = assign.get(self.cout_unit, self.cout) if self.cout_unit else self.cout
        cin = assign.get(self.cin_unit, self.cin) if self.cin_unit else self.cin
        if self.op.depthwise:
            cin = cout
        return cin, cout


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _one(example_inputs: Any) -> torch.Tensor:
    if not isinstance(example_inputs, torch.Tensor) or example_inputs.ndim < 2 or len(example_inputs) == 0:
        raise ModelError(
            "example_inputs must be a batch tensor (N, ...) with N >= 1, got "
            f"{type(example_inputs).__name__}"
            + (f" of shape {tuple(example_inputs.shape)}" if isinstance(example_inputs, torch.Tensor) else "")
        )
    return example_inputs[:1].float()


def trace_layers(model: nn.Module, example_inputs: Any) -> list[Layer]:
    """The Conv/Linear layers of ``model`` in execution order, each with its geometry and fused activation.

    Raises:
        ModelError: a layer runs twice (a shared layer has one latency per call; not supported), a Conv is not 2-D,
            or the model has no Conv/Linear layer.
    """
    x = _one(example_inputs)
    order: list[tuple[nn.Module, tuple[int, ...]]] = []
    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [
        m.register_forward_hook(
            lambda mod, inp, out: order.append(
                (mod, tuple(inp[0].shape) if inp and isinstance(inp[0], torch.Tensor) else ())
            )
        )
        for m in leaves
    ]
    was = model.training
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    names = {id(m): n for n, m in model.named_modules()}
    seen: set[int] = set()
    layers: list[Layer] = []
    for i, (m, shape) in enumerate(order):
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            if isinstance(m, nn.modules.conv._ConvNd):
                raise ModelError(
                    f"layer {names[id(m)]!r} is a {type(m).__name__}: the latency table times 2-D "
                    "convolutions and linear layers only"
                )
            continue
        if id(m) in seen:
            raise ModelError(
                f"layer {names[id(m)]!r} runs more than once per forward pass; a shared layer is not "
                "supported by the width search"
            )
        seen.add(id(m))
        act = "none"
        for nxt, _ in order[i + 1 :]:
            if isinstance(nxt, _FOLDED):
                continue
            act = _ACTS.get(type(nxt), "none")
            break
        if isinstance(m, nn.Linear):
            if len(shape) != 2:
                raise ModelError(
                    f"linear layer {names[id(m)]!r} gets a {len(shape)}-D input {shape}; the latency "
                    "table times 2-D (batch, features) linear layers only"
                )
            op = LayerOp("linear", act=act)
            layers.append(Layer(names[id(m)], op, m.in_features, m.out_features))
            continue
        dw = m.groups > 1 and m.groups == m.in_channels == m.out_channels
        op = LayerOp(
            "conv",
            _pair(m.kernel_size),
            _pair(m.stride),
            _pair(m.padding),
            _pair(m.dilation),
            depthwise=dw,
            groups=1 if dw else m.groups,
            height=int(shape[2]),
            width=int(shape[3]),
            act=act,
        )
        if isinstance(m.padding, str):
            raise ModelError(f"conv {names[id(m)]!r} uses padding={m.padding!r}; give explicit padding")
        layers.append(Layer(names[id(m)], op, m.in_channels, m.out_channels))
    if not layers:
        raise ModelError(f"{type(model).__name__} has no Conv2d/Linear layer to time")
    return layers


def micro_onnx(op: LayerOp, cin: int, cout: int, *, seed: int = 0) -> bytes:
    """A one-layer ONNX model (FP32, batch 1): Conv (or Gemm) with bias, then the fused activation."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    if op.op == "linear":
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin])
        w = rng.standard_normal((cout, cin), dtype=np.float32) * 0.05
        inits += [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(cout, np.float32), "b")]
        nodes.append(helper.make_node("Gemm", ["x", "w", "b"], ["y0"], transB=1))
        out_shape = [1, cout]
    else:
        g = cout if op.depthwise else op.groups
        if cin % g or cout % g:
            raise ModelError(f"conv with {cin} -> {cout} channels cannot have {g} groups")
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, op.height, op.width])
        w = rng.standard_normal((cout, cin // g, *op.kernel), dtype=np.float32) * 0.05
        inits += [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(cout, np.float32), "b")]
        nodes.append(
            helper.make_node(
                "Conv",
                ["x", "w", "b"],
                ["y0"],
                kernel_shape=list(op.kernel),
                strides=list(op.stride),
                pads=[op.padding[0], op.padding[1]] * 2,
                dilations=list(op.dilation),
                group=g,
            )
        )
        out_shape = [1, cout, *op.out_size()]
    last = "y0" if op.act != "none" else "y"
    nodes[-1].output[0] = last
    if op.act == "relu":
        nodes.append(helper.make_node("Relu", [last], ["y"]))
    elif op.act == "relu6":
        inits += [
            numpy_helper.from_array(np.array(0, np.float32), "lo"),
            numpy_helper.from_array(np.array(6, np.float32), "hi"),
        ]
        nodes.append(helper.make_node("Clip", [last, "lo", "hi"], ["y"]))
    elif op.act == "hardswish":
        nodes.append(helper.make_node("HardSwish", [last], ["y"]))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)
    graph = helper.make_graph(nodes, "layer", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgeslim.nas")
    model.ir_version = 8
    return model.SerializeToString()
