"""Weight-only INT4/INT8 quantization of Linear (MatMul) weights in ONNX, using ONNX Runtime's ``MatMulNBits``.

Activations stay FP32; each MatMul whose weight is a constant becomes one ``com.microsoft::MatMulNBits`` node that
holds packed 4- or 8-bit weights with one FP32 scale (and, asymmetric, one zero point) per output channel and group
of ``group_size`` input features (``group_size=0``: per-channel, one block spanning the whole input dimension,
zero-padded to a power of two as MatMulNBits requires; a group never spans more than that). ORT's CPU kernel
dequantizes block by block inside the matmul, so the file shrinks ~4-7x on Linear-heavy models; whether it runs
*faster* than FP32 depends on shapes and the CPU — measure it (``edgeslim.measure``), never assume it.

Embedding tables (Gather) stay FP32: on BERT-like models they are a large share of the file (MiniLM: 47 of 90 MB).
ORT's Gather quantization path upgrades the opset and broke this graph's ReduceL2 (tried; not shipped).

Gemm nodes written by the TorchScript exporter for 2-D inputs are first rewritten to MatMul(+Add), because ORT's
quantizer only handles MatMul. Weights are quantized by ORT's ``MatMulNBitsQuantizer`` (round to nearest).
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeslim.core.config import Config
from edgeslim.core.errors import ExportError, QuantizationError
from edgeslim.core.io import atomic_path

__all__ = ["WeightOnlyConfig", "weight_only_onnx", "export_weight_only"]

log = logging.getLogger(__name__)

_BITS = (4, 8)
_GROUPS = (0, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class WeightOnlyConfig(Config):
    """Weight-only quantization of MatMul/Linear weights.

    Attributes:
        bits: weight bit width, 4 or 8.
        group_size: input features per scale; 0 means per-channel (one scale per output channel).
        symmetric: symmetric (no zero point) or asymmetric (a 4/8-bit zero point per group).
        accuracy_level: ORT ``MatMulNBits`` compute precision hint (0 = unset, 1 fp32, 2 fp16, 3 bf16, 4 int8
            activations); 4 lets ORT use integer dot products where the CPU has them.
        min_cosine: the exported model must reach this output cosine vs the torch model, else an error.
    """

    kind = "weight_only"
    bits: int = 4
    group_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 0
    min_cosine: float = 0.99

    def validate(self) -> None:
        if self.bits not in _BITS:
            raise self._bad("bits", f"weight-only supports {list(_BITS)} bits")
        if self.group_size not in _GROUPS:
            raise self._bad("group_size", f"must be one of {list(_GROUPS)} (0 = per-channel)")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise self._bad("accuracy_level", "must be 0..4 (ORT MatMulNBits accuracy_level)")
        if not -1.0 <= self.min_cosine <= 1.0:
            raise self._bad("min_cosine", "must be in [-1, 1]")


def _gemm_to_matmul(model: Any) -> int:
    """Rewrite Gemm(A, B_const, C) with alpha=beta=1, transA=0 into MatMul(A, B') + Add(C); return the count."""
    import onnx
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    new_nodes, n_rewritten = [], 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        ok = (
            node.op_type == "Gemm"
            and node.input[1] in inits
            and attrs.get("transA", 0) == 0
            and float(attrs.get("alpha", 1.0)) == 1.0
            and float(attrs.get("beta", 1.0)) == 1.0
        )
        if not ok:
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            w = np.ascontiguousarray(w.T)
        wname = node.input[1] + "_kn"
        model.graph.initializer.append(numpy_helper.from_array(w, wname))
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = node.output[0] + "_mm" if has_bias else node.output[0]
        new_nodes.append(helper.make_node("MatMul", [node.input[0], wname], [mm_out], name=node.name + "_matmul"))
        if has_bias:
            new_nodes.append(
                helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=node.name + "_add")
            )
        n_rewritten += 1
    if not n_rewritten:
        return 0
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    # drop initializers nobody uses any more (the transposed originals)
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    onnx.checker.check_model(model)
    return n_rewritten


def weight_only_onnx(
    src: str | Path, path: str | Path, config: WeightOnlyConfig = WeightOnlyConfig(), *, force: bool = False
) -> dict[str, Any]:
    """Quantize the constant MatMul weights of the ONNX file ``src`` to ``config.bits`` and write ``path``.

    Returns:
        A report: ``quantized`` / ``skipped`` MatMul counts, op-type counts, file sizes in bytes.

    Raises:
        QuantizationError: no MatMul with a constant weight was found, or none could be quantized.
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config.validate()
    model = onnx.load(str(src))
    rewritten = _gemm_to_matmul(model)
    inits = {t.name for t in model.graph.initializer}
    candidates = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    if not candidates:
        raise QuantizationError(
            f"{src}: no MatMul/Gemm with a constant weight to quantize (ops: "
            f"{sorted(Counter(n.op_type for n in model.graph.node))})"
        )
    # per node: a block never spans more than K (rounded up to a power of two >= 16, as MatMulNBits requires);
    # per-channel = one block over the whole K. ORT takes one block size per pass, so run one pass per size.
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    by_block: dict[int, list[str]] = {}
    for n in model.graph.node:
        if n.name in candidates:
            k_pow2 = max(16, 1 << int(np.ceil(np.log2(max(shapes[n.input[1]][0], 1)))))
            by_block.setdefault(min(config.group_size or k_pow2, k_pow2), []).append(n.name)
    ort_log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = ort_log.level
    ort_log.setLevel(logging.WARNING)
    try:
        for block, names in sorted(by_block.items()):
            algo = DefaultWeightOnlyQuantConfig(
                block_size=block,
                is_symmetric=config.symmetric,
                accuracy_level=config.accuracy_level or None,
                bits=config.bits,
            )
            others = [c for c in candidates if c not in names]  # ORT's nodes_to_include adds, it does not restrict
            q = MatMulNBitsQuantizer(model, algo_config=algo, nodes_to_exclude=others)
            q.process()
            model = q.model.model
    finally:
        ort_log.setLevel(level)
    out_model = model
    ops = Counter(n.op_type for n in out_model.graph.node)
    n_q = ops.get("MatMulNBits", 0)
    if n_q == 0:
        raise QuantizationError(
            f"{src}: ORT quantized none of {len(candidates)} MatMuls "
            f"(bits={config.bits}, group_size={config.group_size})"
        )
    with atomic_path(path, force=force) as tmp:
        onnx.save(out_model, str(tmp))
    skipped = len(candidates) - n_q
    if skipped:
        log.warning("weight-only: %d of %d constant-weight MatMuls left in FP32", skipped, len(candidates))
    return {
        "quantized": n_q,
        "skipped": skipped,
        "gemm_rewritten": rewritten,
        "ops": dict(ops),
        "src_bytes": Path(src).stat().st_size,
        "bytes": Path(path).stat().st_size,
        "config": config.to_dict(),
    }


def export_weight_only(
    model: nn.Module,
    config: WeightOnlyConfig = WeightOnlyConfig(),
    *,
    example_inputs: torch.Tensor,
    path: str | Path,
    opset: int = 17,
    force: bool = False,
) -> dict[str, Any]:
    """Export ``model`` to ONNX with weight-only quantized Linear layers and validate it against torch.

    The model is deep-copied (never mutated). ``example_inputs`` must be real inputs (a batch): the cosine and top-1
    agreement of the ORT outputs vs the torch outputs on them are checked against ``config.min_cosine``.

    Returns:
        The :func:`weight_only_onnx` report plus ``cosine``, ``top1_agreement`` and ``fp32_bytes``.

    Raises:
        ExportError: the exported model falls below ``config.min_cosine``.
    """
    from edgeslim.export._api import _ort_run, _torch_export, compare

    config.validate()
    if not isinstance(example_inputs, torch.Tensor) or example_inputs.dim() < 1:
        raise ExportError(f"example_inputs must be a batched tensor, got {type(example_inputs).__name__}")
    m = copy.deepcopy(model).eval().float()
    x = example_inputs.float()
    with torch.no_grad():
        ref = m(x).numpy()
    with tempfile.TemporaryDirectory(prefix="edgeslim-wo-") as d:
        raw = Path(d) / "fp32.onnx"
        _torch_export(m, x, raw, opset)
        report = weight_only_onnx(raw, path, config, force=force)
        report["fp32_bytes"] = raw.stat().st_size
    out = _ort_run(Path(path), x.numpy())
    report.update(compare(ref, out))
    if report["cosine"] < config.min_cosine:
        Path(path).unlink(missing_ok=True)
        raise ExportError(
            f"weight-only INT{config.bits} (group_size={config.group_size}) output cosine "
            f"{report['cosine']:.4f} < min_cosine {config.min_cosine}; try 8 bits or a smaller group"
        )
    return report
