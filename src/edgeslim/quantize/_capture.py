"""Which capture quantizes a model (fx or the ONNX graph), and the model the ONNX capture returns.

``QuantConfig(capture="auto")`` measures what the fx capture would cover: the MACs of the ``nn.Conv1d/Conv2d/Linear``
modules torch.fx finds, against all the model's MACs (``torch.utils.flop_counter``). Functional convolutions
(``nn.Conv2d`` subclasses calling ``F.conv2d``), parameters used through ``F.linear``, attention and anything fx cannot
trace are invisible to it; when more than 10% of the MACs would stay float (or fx cannot trace the model), the ONNX
capture quantizes instead, and the report says which capture ran and why.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeslim.core import recipe as _recipe
from edgeslim.core.counting import call, count_macs, first_sample
from edgeslim.core.errors import (
    ConfigError,
    EdgeslimError,
    ModelError,
    QuantizationError,
)
from edgeslim.core.onnx_model import OnnxModel, ort_session, run_session, to_onnx
from edgeslim.quantize import _onnx
from edgeslim.quantize._api import range_note
from edgeslim.quantize._config import Capture, Placement, QuantConfig, QuantMode

log = logging.getLogger(__name__)

#: the fx capture is used (in ``auto``) when it leaves at most this share of the MACs in float
MAX_FX_FLOAT_SHARE = 0.10
#: the report warns loudly below this share of MACs in integer kernels
MIN_INTEGER_SHARE = 0.90
OPSET = 17


def fx_coverage(model: nn.Module, probe: Any) -> dict[str, Any]:
    """What the fx capture would quantize: ``quantizable_macs`` (its Conv/Linear modules), ``total_macs`` (the whole
    model, batch 1) and ``layers``, with ``folded``: the traced, BatchNorm-folded copy it counted (the capture
    builds on it instead of tracing again); raises QuantizationError when fx cannot trace the model."""
    from torch.utils.flop_counter import FlopCounterMode

    from edgeslim.core.counting import _extra_formulas, _no_fused_attention
    from edgeslim.quantize import _graph

    total = count_macs(model, probe)
    gm = _graph.trace_and_fold(copy.deepcopy(model), inplace=True)
    names = _graph.weighted_modules(gm)
    try:  # one counted pass of the folded graph: its per-module counts are the layers' MACs
        with (
            torch.no_grad(),
            _no_fused_attention(),
            FlopCounterMode(display=False, custom_mapping=_extra_formulas()) as fc,
        ):
            call(gm, first_sample(probe))
    except Exception as e:  # noqa: BLE001 - a traced graph that does not run is one more reason for onnx
        raise QuantizationError(
            f"the fx-traced graph of {type(model).__name__} does not run "
            f"({type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''})"
        ) from None
    per_module = fc.get_flop_counts()
    root = type(gm).__name__
    covered = sum(sum(per_module.get(f"{root}.{n}", {}).values()) // 2 for n in names)
    return {"quantizable_macs": int(covered), "total_macs": int(total), "layers": names, "folded": gm}


def _onnx_only(config: QuantConfig, setting: str, what: str) -> tuple[str, str, None]:
    """The ONNX capture for a ``setting`` only it does, or one line when the config rules that capture out."""
    if config.capture == Capture.FX:
        raise ConfigError(
            f"QuantConfig.{setting} {what} on the ONNX capture; it is not available with capture='fx' (use "
            "capture='onnx' or 'auto')"
        )
    fx_only = _onnx.needs_fx(config)
    if fx_only:
        raise ConfigError(f"QuantConfig.{setting} needs the ONNX capture, but {fx_only} needs fx")
    return "onnx", f"{setting} {what} on the ONNX graph", None


def choose(model: nn.Module, config: QuantConfig, probe: Any) -> tuple[str, str, dict[str, Any] | None]:
    """(capture, why, fx coverage or None) for ``model`` under ``config``."""
    if isinstance(model, OnnxModel):
        if config.capture == Capture.FX:
            raise ConfigError(
                "QuantConfig.capture='fx' cannot quantize an ONNX file (there is no torch graph to "
                "trace); use capture='onnx' or 'auto'"
            )
        return "onnx", "the model is an ONNX file", None
    if config.capture == Capture.ONNX:
        _onnx.check_onnx_config(config)
        return "onnx", "asked for (capture='onnx')", None
    if config.placement == Placement.MEASURED:
        return _onnx_only(config, "placement='measured'", "times ONNX Runtime's kernels")
    if config.runtime != "onnxruntime":
        return _onnx_only(config, f"runtime={config.runtime!r}", "lays out the Q/DQ pairs")
    try:
        cov = fx_coverage(model, probe)
    except QuantizationError as e:
        if config.capture == Capture.FX:
            raise
        if _onnx.needs_fx(config):
            raise QuantizationError(f"{e}; and {_onnx.needs_fx(config)} needs the fx capture") from None
        return "onnx", f"torch.fx cannot capture the model: {str(e)[:200]}", None
    total, covered = cov["total_macs"], cov["quantizable_macs"]
    float_share = 1.0 - covered / total if total else 0.0
    desc = (
        f"fx finds {len(cov['layers'])} Conv/Linear modules holding {100 * (1 - float_share):.1f}% of the "
        f"model's {total:,} MACs"
    )
    if config.capture == Capture.FX:
        return "fx", f"asked for (capture='fx'); {desc}", cov
    fx_only = _onnx.needs_fx(config)
    if fx_only:
        return "fx", f"{fx_only} needs the torch fake-quant model; {desc}", cov
    if getattr(model, "edgeslim_task", None) == "detect" and config.mode == "static":
        return (
            "onnx",
            (
                f"{desc}; the model is a detector: the ONNX capture finds which head nodes (decode, the "
                "boxes+scores concat, sensitive output convs) stay float"
            ),
            cov,
        )
    if total and float_share > MAX_FX_FLOAT_SHARE:
        return (
            "onnx",
            (
                f"{desc}: more than {MAX_FX_FLOAT_SHARE:.0%} would stay float (functional or "
                "attention ops fx does not match), so the exported ONNX graph is quantized"
            ),
            cov,
        )
    if not cov["layers"] and not total:
        raise QuantizationError(
            "the model has no quantizable layers (Conv1d, Conv2d, Linear, matmul); nothing to quantize"
        )
    return "fx", desc, cov


# ----------------------------------------------------------------------------------------- the onnx model
def replay_example(example: Any) -> tuple[Any, list[dict[str, Any]]]:
    """The one sample the float model is exported with, and its record for the recipe: float inputs are zeros of
    the sample's shape (nothing about the data is kept), integer inputs (token ids, masks) their first sample (the
    exporter follows the model's Python branches on them, e.g. "all tokens attended")."""
    one = first_sample(example)
    items = one.items() if isinstance(one, Mapping) else [("input", one)]
    spec, values = [], {}
    for k, v in items:
        if not isinstance(v, torch.Tensor):
            raise ConfigError(
                f"input {k!r} is a {type(v).__name__}; the ONNX capture takes tensors (or a dict of tensors)"
            )
        entry: dict[str, Any] = {
            "name": str(k),
            "shape": list(v.shape[1:]),
            "dtype": str(v.dtype).replace("torch.", ""),
        }
        if v.dtype.is_floating_point:
            values[k] = torch.zeros_like(v)
        else:
            entry["value"] = v.tolist()
            values[k] = v.clone()
        spec.append(entry)
    return (values if isinstance(one, Mapping) else values["input"]), spec


def example_from_spec(spec: list[dict[str, Any]], keyed: bool) -> Any:
    values = {}
    for e in spec:
        dtype = getattr(torch, e["dtype"])
        values[e["name"]] = (
            torch.tensor(e["value"], dtype=dtype) if "value" in e else torch.zeros([1, *e["shape"]], dtype=dtype)
        )
    return values if keyed else values[spec[0]["name"]]


class OnnxQuantizedModel(nn.Module):
    """A model quantized on its ONNX graph: the quantized ONNX file, run by ONNX Runtime in ``forward``.

    The float model it was made from is kept (``float_model``; its weights are this module's state_dict), so
    ``float_reference()`` computes the FP32 reference, and a recipe replays the quantization from the recorded plan
    (ranges per tensor, excluded nodes) without data. :func:`edgeslim.export` writes the quantized file as it is.

    Attributes:
        float_model: the float model (an :class:`~edgeslim.core.onnx_model.OnnxModel` for ONNX-file inputs).
        config: the :class:`QuantConfig` used (``capture="onnx"``).
        report: the :class:`~edgeslim.quantize.QuantReport`.
        plan: plain data: ``inputs`` (the export sample's record), ``keyed``, ``preprocessed``, ``ranges``,
            ``excluded``, ``opset`` and ``task`` (``detect`` when the output is a detector's boxes + scores).
        edgeslim_precision: ``int8``, ``int8-dynamic`` or ``fp16`` (read by export).
    """

    def __init__(
        self, float_model: nn.Module, config: QuantConfig, report: Any, plan: dict[str, Any], graph: bytes | None = None
    ) -> None:
        super().__init__()
        self.float_model = float_model
        self.config = config
        self.report = report
        self.plan = plan
        self.edgeslim_precision = report.precision
        self.edgeslim_capture = "onnx"
        if plan.get("task"):
            self.edgeslim_task = plan["task"]
        self._graph = graph
        self._session: Any = None
        self._float = False
        self.register_load_state_dict_post_hook(lambda m, _keys: m._drop_graph())

    def _drop_graph(self) -> None:
        self._graph, self._session = None, None

    def float_graph(self) -> bytes:
        """The float model's ONNX graph, as quantized (pre-processed when the plan says so)."""
        example = example_from_spec(self.plan["inputs"], self.plan["keyed"])
        graph = to_onnx(self.float_model, example, opset=self.plan.get("opset", OPSET))
        if self.plan.get("preprocessed"):
            graph, err = _onnx.preprocess(graph)
            if err:
                raise ModelError(f"ORT pre-processing, which the recorded quantization used, now fails: {err}")
            return graph
        return _onnx.constants_to_initializers(graph)

    def onnx_bytes(self) -> bytes:
        """The quantized ONNX file (rebuilt from the float model and the plan after weights are loaded)."""
        if self._graph is None:
            graph = self.float_graph()
            model = _onnx._onnx().load_from_string(graph)
            per_tensor = self.plan.get("per_tensor", [])
            for what, kind, recorded, present in (
                ("ranges name", "tensor(s)", self.plan["ranges"], set(_onnx.float_activations(model))),
                ("per-tensor weights name", "initializer(s)", per_tensor, {i.name for i in model.graph.initializer}),
            ):
                if lost := [t for t in recorded if t not in present]:
                    raise ModelError(
                        f"the recorded {what} {len(lost)} {kind} the model's ONNX graph does not "
                        f"have (e.g. {lost[:3]}): the model is not the one quantized"
                    )
            graph = _onnx.with_bias_deltas(graph, self.plan.get("bias_deltas") or {})
            self._graph = _onnx.build_qdq(graph, self.plan["ranges"], self.plan["excluded"], self.config, per_tensor)
        return self._graph

    def session(self) -> Any:
        if self._session is None:
            self._session = ort_session(self.onnx_bytes())
        return self._session

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._float:
            return self.float_model(*args, **kwargs)
        if args and kwargs:
            raise ConfigError("pass the inputs either as one tensor or by name, not both")
        if kwargs:
            example: Any = kwargs
        elif len(args) == 1 and not isinstance(args[0], Mapping):
            example = args[0]
        elif len(args) == 1:
            example = dict(args[0])
        else:
            example = dict(zip([e["name"] for e in self.plan["inputs"]], args, strict=False))
        outs = [torch.from_numpy(o) for o in run_session(self.session(), example)]
        return outs[0] if len(outs) == 1 else tuple(outs)

    @contextlib.contextmanager
    def float_reference(self) -> Iterator[OnnxQuantizedModel]:
        """Within the block the model computes in float (the float model it was made from)."""
        was, self._float = self._float, True
        try:
            yield self
        finally:
            self._float = was

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_session"] = None  # an ONNX Runtime session is rebuilt, never copied
        return state


def quantize_onnx(
    model: nn.Module,
    config: QuantConfig,
    batches: list[Any],
    probe: Any,
    report: Any,
    why: str,
    timings: Any = None,
) -> OnnxQuantizedModel:
    """Quantize ``model`` on its ONNX graph (analysis, statistics, apply; see ``_onnx``) and fill ``report``."""
    float_model = copy.deepcopy(model).eval() if not isinstance(model, OnnxModel) else model
    if not isinstance(float_model, OnnxModel):
        _recipe.materialize(float_model)
    example, spec = replay_example(probe)
    keyed = isinstance(example, Mapping)
    graph = to_onnx(float_model, example, opset=OPSET)
    pre_err: str | None = "not used (dynamic / fp16 mode)"
    if config.mode == QuantMode.STATIC:
        graph, pre_err = _onnx.preprocess(graph)
    else:
        graph = _onnx.constants_to_initializers(graph)
    _end(timings, "capture")
    correct = config.bias_correction is not False and config.mode == QuantMode.STATIC  # None: on for this capture
    means: dict[str, np.ndarray] | None = {} if correct else None
    ranges = _onnx.calibrate(graph, batches, config, means) if config.mode == QuantMode.STATIC else {}
    if config.mode == QuantMode.STATIC:
        report.calibration_runtime = "onnxruntime (one pass)"
        ranges, widened = _onnx.widen_for_bias(graph, ranges, config)
        if widened:
            report.corrections["bias_fit_ranges"] = widened
            report.warnings.append(
                f"{len(widened)} near-dead input range(s) widened so the int32 bias of the Conv/Gemm reading them "
                "fits (else it saturates and the output is off by the bias; see corrections['bias_fit_ranges'])"
            )
    _end(timings, "calibrate")
    excluded = _onnx.plan_exclusions(
        graph,
        ranges,
        config.exclude,
        not isinstance(float_model, OnnxModel),
        check_ranges=config.mode == QuantMode.STATIC,
    )
    tail_record = None
    if config.mode == QuantMode.STATIC:
        from edgeslim.quantize import _tail

        tail_float, tail_record = _tail.sensitivity(graph, ranges, excluded, config, batches)
        excluded.update(tail_float)
    granularity = _onnx.choose_granularity(graph, excluded, config)
    if granularity:
        report.corrections["per_tensor_layers"] = {
            v["node"]: {k: v[k] for k in ("per_tensor_sqnr_db", "per_channel_sqnr_db")} for v in granularity.values()
        }
    if config.placement == Placement.MEASURED and config.mode == QuantMode.STATIC:
        from edgeslim.quantize import _placement

        _end(timings, "convert")
        per_tensor = sorted(granularity)
        placed, report.placement = _placement.place(
            graph,
            lambda extra: _onnx.build_qdq(graph, ranges, {**excluded, **extra}, config, per_tensor),
            excluded,
            _placement_feeds(graph, batches),
            threads=config.placement_threads,
        )
        excluded.update(placed)
        _end(timings, "placement")
    layout: dict[str, Any] = {}
    qgraph = _onnx.build_qdq(graph, ranges, excluded, config, sorted(granularity), record=layout)
    report.layout = layout or None
    _end(timings, "convert")
    deltas: dict[str, list[float]] = {}
    if means is not None:  # bias correction: the weight rounding's mean output shift, measured, then rebuilt
        deltas = _onnx.bias_deltas(graph, qgraph, means)
        if deltas:
            qgraph = _onnx.build_qdq(
                _onnx.with_bias_deltas(graph, deltas), ranges, excluded, config, sorted(granularity)
            )
        report.corrections["bias_corrected_layers"] = len(deltas)
        _end(timings, "bias_correction")
    plan = {
        "inputs": spec,
        "keyed": keyed,
        "preprocessed": pre_err is None,
        "ranges": _onnx.state_json(ranges),
        "excluded": dict(sorted(excluded.items())),
        "opset": OPSET,
    }
    if granularity:  # weights quantized per tensor (per_tensor_sqnr_db): a replay keeps the record, not the rule
        plan["per_tensor"] = sorted(granularity)
    if deltas:  # bias correction's shifts (measured on the calibration data): a replay adds them, no data needed
        plan["bias_deltas"] = deltas
    if tail_record and tail_record.get("detector_output"):
        plan["task"] = "detect"  # export validates its boxes and scores apart, with no top-1 (kept by a recipe)
    cfg = config.replace(capture=Capture.ONNX)
    q = OnnxQuantizedModel(float_model, cfg, report, plan, qgraph).eval()
    report.tail = tail_record
    fill_onnx_report(report, q, why, pre_err)
    _end(timings, "report")
    return q


def _placement_feeds(graph: bytes, batches: list[Any]) -> dict[str, np.ndarray]:
    """One calibration sample as ONNX Runtime feeds of ``graph`` (typed as its inputs), for timing."""
    from edgeslim.core.onnx_model import slice_inputs

    return _feeds_for(ort_session(graph, optimize=False), slice_inputs(batches[0], 0, 1))


def _end(timings: Any, phase: str) -> None:
    if timings is not None:
        timings.end(phase)


def fill_onnx_report(report: Any, q: OnnxQuantizedModel, why: str, pre_err: str | None) -> None:
    """Layers quantized / left float (with their reason), integer-MAC share, ranges: from the quantized graph."""
    report.capture, report.capture_reason = "onnx", why
    if q.config.mode == QuantMode.STATIC:
        report.preprocessing = (
            "ORT quant_pre_process (shape inference + graph optimization)"
            if pre_err is None
            else f"ORT quant_pre_process failed ({pre_err}); quantized without it"
        )
    else:
        report.preprocessing = None
    im = _onnx.integer_macs(q.onnx_bytes(), _onnx_feeds(q), runtime=q.config.runtime)
    modules = not isinstance(q.float_model, OnnxModel)
    per_tensor = report.corrections.get("per_tensor_layers") or {}
    qmodel = _onnx._onnx().load_from_string(q.onnx_bytes())
    depthwise = set(_onnx.depthwise_weights(qmodel).values())
    fusable = _onnx.ort_may_fuse(qmodel) if q.config.runtime == "onnxruntime" else set()
    for n in im["nodes"]:
        module = _module_label(n["node"], modules)
        if n["integer"]:
            desc = _weights_desc(q.config, depthwise=n["node"] in depthwise)
            if n["node"] in per_tensor:
                sqnr = per_tensor[n["node"]]["per_tensor_sqnr_db"]
                desc = desc.replace("per-channel", "per-tensor") + (
                    f" (weight SQNR {sqnr:.1f} dB >= {q.config.per_tensor_sqnr_db:g})"
                )
            report.quantized_layers.append(
                {
                    "name": n["node"],
                    "type": n["op"],
                    "module": module,
                    "macs": n["macs"],
                    "weights": desc,
                }
            )
        else:
            report.skipped_layers.append(
                {
                    "name": n["node"],
                    "type": n["op"],
                    "module": module,
                    "macs": n["macs"],
                    "reason": _onnx.float_reason(n["node"], n["op"], q.plan["excluded"], q.config)
                    + (
                        " (it sits between a DequantizeLinear and a QuantizeLinear: ONNX Runtime's optimizer may "
                        "quantize its weights and run it as an integer kernel)"
                        if n["node"] in fusable
                        else ""
                    ),
                }
            )
    for node in im["unknown"]:
        report.skipped_layers.append(
            {
                "name": node,
                "type": "?",
                "reason": "shape inference gives no shapes for this node: its MACs are not counted",
            }
        )
    report.integer_macs = {
        "share": im["share"],
        "integer_macs": im["integer_macs"],
        "total_macs": im["total_macs"],
        "source": "the quantized ONNX graph (Conv/Gemm/MatMul fed by DequantizeLinear on both inputs, or integer ops)"
        if q.config.runtime == "onnxruntime"
        else f"the quantized ONNX graph as {q.config.runtime} reads it (Conv/Gemm/MatMul whose inputs reach a "
        "DequantizeLinear through precision-preserving ops)",
    }
    report.float_ops = [
        {"node": k, "reason": v} for k, v in q.plan["excluded"].items() if k not in {n["node"] for n in im["nodes"]}
    ]
    tail = getattr(report, "tail", None) or {}
    listed = {f["node"] for f in report.float_ops} | {n["node"] for n in im["nodes"]}
    for n in tail.get("float_by_design", []):  # the head's float arithmetic, named so nothing float is silent
        if n["node"] not in listed:
            report.float_ops.append(
                {
                    "node": n["node"],
                    "reason": f"{n['op']} between the last Conv/Gemm/MatMul and the output: ONNX Runtime has no "
                    "integer kernel for it (float by design)",
                }
            )
    report.activations = [{"value": k, "range": [round(v[0], 6), round(v[1], 6)]} for k, v in q.plan["ranges"].items()]


def _onnx_feeds(q: OnnxQuantizedModel) -> dict[str, np.ndarray]:
    """One sample for the quantized graph (its recorded export sample), to measure shapes with."""
    return _feeds_for(q.session(), example_from_spec(q.plan["inputs"], q.plan["keyed"]))


def _module_label(node: str, modules: bool) -> str:
    from edgeslim.core.onnx_model import module_of

    return module_of(node) if modules else ""


def _weights_desc(config: QuantConfig, depthwise: bool = False) -> str:
    if config.mode == QuantMode.FP16:
        return "fp16"
    return (
        f"int8 {'per-channel' if config.per_channel else 'per-tensor'} symmetric"
        + range_note(config, 8, full_range=depthwise)
        + (" (dynamic activations)" if config.mode == QuantMode.DYNAMIC else "")
    )


def fx_integer_share(
    report: Any, coverage: dict[str, Any] | None, quantized: list[str], excluded_macs: int = 0
) -> None:
    """The fx capture's integer-MAC share, estimated from the torch modules it quantized."""
    if not coverage or not coverage["total_macs"]:
        return
    total = coverage["total_macs"]
    integer = max(0, coverage["quantizable_macs"] - excluded_macs)
    report.integer_macs = {
        "share": integer / total,
        "integer_macs": integer,
        "total_macs": total,
        "source": "estimated from the quantized torch modules; edgeslim.export measures it on the ONNX graph",
    }
    rest = total - coverage["quantizable_macs"]
    if rest > 0:
        report.skipped_layers.append(
            {
                "name": "(functional and attention ops)",
                "type": "F.conv2d/F.linear/matmul",
                "macs": int(rest),
                "reason": f"{rest:,} MACs ({rest / total:.1%}) run outside nn.Conv/nn.Linear modules, which the fx capture "
                "does not see: they stay float (capture='onnx' quantizes them)",
            }
        )


def is_onnx_source(model: Any) -> bool:
    return isinstance(model, (str, os.PathLike)) or hasattr(model, "SerializeToString")


# ------------------------------------------------------------------------------------------- speed check
def compare_speed(
    float_model: Any, quantized: Any, example_inputs: Any = None, *, threads: int = 1, rounds: int = 5, runs: int = 20
) -> dict[str, Any]:
    """Time the quantized ONNX file against the float model's ONNX file on this host: ONNX Runtime, batch 1,
    ``rounds`` interleaved rounds of ``runs`` runs each (load drifting on a shared host hits both alike).

    Args:
        float_model: the float model (an ``nn.Module`` or an ONNX file / :class:`OnnxModel`).
        quantized: a model returned by :func:`edgeslim.quantize` (either capture).
        example_inputs: one input (batch 1 is taken) for the float export and the timing; for ONNX-capture models
            the recorded export sample is used when omitted.

    Returns:
        ``float_ms``, ``quantized_ms`` (median of the round medians), ``speedup`` (float / quantized),
        ``slower`` (True when the quantized file is slower), ``threads``, ``rounds``, ``spread_pct`` (noise), ``host``.
    """
    from edgeslim.core.metrics import host_info
    from edgeslim.runtime._measure import interleaved_latency

    if isinstance(float_model, (str, os.PathLike)) or hasattr(float_model, "SerializeToString"):
        float_model = OnnxModel(float_model)
    if example_inputs is None:
        plan = getattr(quantized, "plan", None)
        if plan is None:
            raise ConfigError("compare_speed needs example_inputs= for a model quantized with the fx capture")
        example_inputs = example_from_spec(plan["inputs"], plan["keyed"])
    x = first_sample(example_inputs)
    fgraph = to_onnx(float_model, x, opset=OPSET)
    qgraph = quantized_graph(quantized, x)
    from edgeslim.quantize._layout import runtime_of

    runtime = runtime_of(quantized)
    with tempfile.TemporaryDirectory() as td:
        if runtime == "onnxruntime":
            sessions = {
                "float": ort_session(fgraph, threads=threads),
                "quantized": ort_session(qgraph, threads=threads),
            }
            feeds = {k: _feeds_for(s, x) for k, s in sessions.items()}
            runners = {k: (lambda s=s, f=feeds[k]: s.run(None, f)) for k, s in sessions.items()}
            desc = "onnxruntime (CPUExecutionProvider)"
        else:  # the runtime the file is laid out for
            from edgeslim.runtime import load

            loaded = {}
            for k, g in (("float", fgraph), ("quantized", qgraph)):
                path = Path(td) / f"{k}.onnx"
                path.write_bytes(g)
                loaded[k] = load(str(path), runtime, threads=threads)
            sample = x if not isinstance(x, torch.Tensor) else x.detach().cpu().numpy()
            runners = {k: (lambda r=r: r.run(sample)) for k, r in loaded.items()}
            desc = loaded["quantized"].describe()
        lat = interleaved_latency(runners, rounds=rounds, runs=runs, warmup=3, shuffle=True)
    f_ms, q_ms = lat["float"]["median_of_rounds_ms"], lat["quantized"]["median_of_rounds_ms"]
    spread = max(lat["float"]["round_spread_pct"], lat["quantized"]["round_spread_pct"])
    return {
        "float_ms": round(f_ms, 4),
        "quantized_ms": round(q_ms, 4),
        "speedup": round(f_ms / q_ms, 3),
        "slower": bool(q_ms > f_ms),
        "threads": threads,
        "rounds": rounds,
        "batch": 1,
        "spread_pct": round(float(spread), 1),
        "runtime": desc,
        "host": host_info().get("cpu", ""),
    }


def _feeds_for(session: Any, x: Any) -> dict[str, np.ndarray]:
    from edgeslim.core.onnx_model import _NP_TYPES, as_feeds

    names = [i.name for i in session.get_inputs()]
    types = {i.name: _NP_TYPES.get(i.type) for i in session.get_inputs()}
    feeds = as_feeds(x, names)
    return {k: v.astype(types[k]) if types.get(k) is not None else v for k, v in feeds.items() if k in types}


def quantized_graph(quantized: Any, x: Any) -> bytes:
    """The quantized model's ONNX file in memory (the ONNX capture's own; the fx capture's via edgeslim.export)."""
    if isinstance(quantized, OnnxQuantizedModel):
        return quantized.onnx_bytes()
    from edgeslim.export import export

    with tempfile.TemporaryDirectory() as td:
        art = export(quantized, "onnx", example_inputs=x, path=Path(td) / "q.onnx", validate=False)
        return art.path.read_bytes()


def _rt(speed: dict[str, Any]) -> str:
    return str(speed.get("runtime", "onnxruntime")).split(" (")[0]


def speed_note(speed: dict[str, Any] | None) -> str:
    if not speed:
        return ""
    if speed["slower"]:
        return (
            f"WARNING: the INT8 file is SLOWER than FP32 on this host in {_rt(speed)} ({speed['quantized_ms']:.3f} ms vs "
            f"{speed['float_ms']:.3f} ms, {speed['speedup']:.2f}x, {speed['threads']} thread(s), batch 1): keep "
            "the FP32 model for speed here"
        )
    return (
        f"INT8 {speed['speedup']:.2f}x the FP32 speed on this host in {_rt(speed)} ({speed['quantized_ms']:.3f} vs "
        f"{speed['float_ms']:.3f} ms, {speed['threads']} thread(s), batch 1)"
    )


def replay_onnx(model: nn.Module, step: dict) -> OnnxQuantizedModel:
    """Rebuild an ONNX-captured quantized model on a fresh float model (its weights come from the state_dict)."""
    from edgeslim.quantize._api import PRECISION, QuantReport

    config = QuantConfig.from_dict(step["config"], source="recipe step 'quantize'")
    plan = step.get("state", {}).get("plan")
    if not isinstance(plan, dict) or not {"inputs", "ranges", "excluded"} <= set(plan):
        raise ModelError("recipe step 'quantize' (capture onnx) lacks its plan (inputs, ranges, excluded)")
    report = QuantReport(config.mode.value, PRECISION[config.mode], config.calibration, 0)
    report.capture = "onnx"
    float_model = copy.deepcopy(model).eval()
    if not isinstance(float_model, OnnxModel):
        _recipe.materialize(float_model)  # as quantize did: masks baked, codebooks expanded
    return OnnxQuantizedModel(float_model, config, report, plan).eval()


def check_speed(report: Any, float_model: Any, q: Any, probe: Any) -> None:
    """``QuantConfig(check_speed=True)``: time INT8 vs FP32 and record it (a failure to time is said, not raised)."""
    try:
        report.speed = compare_speed(float_model, q, probe)
    except EdgeslimError as e:
        report.warnings.append(f"speed check failed: {e}")
    if report.speed and report.speed["slower"]:
        log.warning("quantize: %s", speed_note(report.speed))
