"""The ``quantize`` verb and the model it returns."""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from edgeslim.core import recipe as _recipe
from edgeslim.core.counting import call, first_sample
from edgeslim.core.errors import DataError, ModelError, QuantizationError
from edgeslim.core.onnx_model import OnnxModel, batch_len, slice_inputs
from edgeslim.core.progress import bar, progress_enabled
from edgeslim.core.verbs import check_config, data_alias
from edgeslim.quantize import _graph
from edgeslim.quantize._adaround import adaround
from edgeslim.quantize._calibrate import CALIBRATORS
from edgeslim.quantize._config import ActivationType, QuantConfig, QuantMode, WeightRange
from edgeslim.quantize._equalize import correct_bias, equalize
from edgeslim.quantize._modules import ActQuant, QuantWeight

if TYPE_CHECKING:
    from edgeslim.quantize._capture import OnnxQuantizedModel

log = logging.getLogger(__name__)


@dataclass
class QuantReport:
    """What ``quantize`` did: which layers were quantized, which were not and why, and the ranges used."""

    technique: ClassVar[str] = "quantize"
    mode: str
    precision: str
    calibration: str | None
    calibration_samples: int
    quantized_layers: list[dict[str, Any]] = field(default_factory=list)
    skipped_layers: list[dict[str, str]] = field(default_factory=list)
    float_ops: list[dict[str, str]] = field(default_factory=list)
    activations: list[dict[str, Any]] = field(default_factory=list)
    corrections: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    capture: str = "fx"
    capture_reason: str = ""
    integer_macs: dict[str, Any] | None = None
    preprocessing: str | None = None
    speed: dict[str, Any] | None = None
    tail: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    calibration_runtime: str = ""
    placement: dict[str, Any] | None = None
    layout: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"technique": self.technique, **asdict(self)}

    @property
    def integer_mac_share(self) -> float | None:
        """Share of the model's Conv/Linear/MatMul MACs that run in integer kernels (None: not known)."""
        return None if not self.integer_macs else self.integer_macs.get("share")

    def summary(self) -> str:
        from edgeslim.quantize._capture import MIN_INTEGER_SHARE, speed_note

        text = (
            f"{self.precision}: {len(self.quantized_layers)} layers quantized, {len(self.skipped_layers)} kept in "
            f"float, {len(self.activations)} activation ranges ({self.calibration or 'none'}, "
            f"{self.calibration_samples} samples), {self.seconds:.1f} s"
            + (f" ({', '.join(f'{k} {v:.1f} s' for k, v in self.timings.items())})" if self.timings else "")
            + f"; capture {self.capture}"
        )
        share = self.integer_mac_share
        if share is not None:
            text += f"; {share:.1%} of MACs in integer kernels"
        per_tensor = self.corrections.get("per_tensor_layers")
        if per_tensor:
            text += (
                f"; {len(per_tensor)} of {len(self.quantized_layers)} layers per-tensor (their weights' SQNR with one "
                "scale cleared per_tensor_sqnr_db)"
            )
        if self.corrections.get("reduce_range"):
            text += "; " + self.corrections["reduce_range"]
        if self.tail:
            kept = [m["node"] for m in self.tail.get("measured", []) if m.get("float")]
            n_ratio = len(self.tail.get("range_ratio", []))
            n_post = len(self.tail.get("after_last_mac", []))
            text += (
                f"; head: {len(kept) + n_ratio + n_post} node(s) kept float ({n_ratio} Concat(s) by range ratio, "
                f"{n_post} after the last Conv/Gemm/MatMul, {len(kept)} of {len(self.tail.get('measured', []))} "
                f"tail Conv/Gemm/MatMul by sensitivity < {self.tail.get('threshold_db')} dB), "
                f"{len(self.tail.get('float_by_design', []))} float by design (see float_ops)"
            )
        if self.placement:
            p = self.placement
            text += f"; placement measured here (ORT, {p['threads']} thread(s)): {p.get('decision', '')}"
        if self.layout:
            lay = self.layout
            text += (
                f"; laid out for {lay['runtime']} ({lay['activation_pairs_dropped']} Conv->activation Q/DQ pairs "
                f"and {lay['preserving_pairs_dropped']} after precision-preserving ops dropped, "
                f"{lay['concat_inputs_unified']} Concat inputs on shared ranges, "
                f"{len(lay['concats_requantized'])} Concat(s) requantizing); in ONNX Runtime this file runs slower "
                "than one laid out for it"
            )
        notes = list(self.warnings)
        if share is not None and share < MIN_INTEGER_SHARE and self.precision.startswith("int8"):
            notes.insert(
                0,
                f"WARNING: only {share:.1%} of the MACs run in integer kernels (below "
                f"{MIN_INTEGER_SHARE:.0%}): the model will be barely faster than FP32; see skipped_layers "
                "for each float layer and why",
            )
        if self.preprocessing and "failed" in self.preprocessing:
            notes.append(self.preprocessing)
        if self.speed:
            notes.append(speed_note(self.speed))
        return "; ".join([text, *notes])


class QuantizedModel(nn.Module):
    """A quantized model: the BatchNorm-folded float graph with fake-quantization inserted.

    Its forward simulates the integer model; :func:`edgeslim.export` writes the integer ONNX model.
    ``float_reference()`` switches the fake-quantization off (the folded float model, for comparisons).

    Attributes:
        graph_module: the rewritten ``torch.fx.GraphModule``.
        config: the :class:`QuantConfig` used.
        report: the :class:`QuantReport`.
        edgeslim_precision: ``int8``, ``int8-dynamic`` or ``fp16`` (read by export).
    """

    def __init__(self, graph_module: torch.fx.GraphModule, config: QuantConfig, report: QuantReport) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.config = config
        self.report = report
        self.edgeslim_precision = report.precision
        self.edgeslim_export = {"per_channel": config.per_channel}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.graph_module(*args, **kwargs)

    def act_quants(self) -> list[ActQuant]:
        return [m for m in self.modules() if isinstance(m, ActQuant)]

    def weight_quants(self) -> list[QuantWeight]:
        return [m for m in self.modules() if isinstance(m, QuantWeight)]

    @contextlib.contextmanager
    def float_reference(self) -> Iterator[QuantizedModel]:
        """Within the block the model computes in float (no fake quantization)."""
        saved = [(a, a.state) for a in self.act_quants()]
        ws = [(w, w.enabled) for w in self.weight_quants()]
        for a, _ in saved:
            a.state = "off"
        for w, _ in ws:
            w.enabled = False
        try:
            yield self
        finally:
            for a, s in saved:
                a.state = s
            for w, e in ws:
                w.enabled = e


def _calibration_batches(calib: Any, config: QuantConfig, batch_size: int = 128) -> list[Any]:
    """Turn the calibration argument into a list of input batches (class-balanced when labels are known).

    A batch is a tensor, or a dict of tensors for models called with keyword inputs (token ids, attention mask).
    """
    if calib is None:
        raise DataError(
            "static quantization needs calibration data: pass data=<dataset or tensor of real samples> "
            "(edgeslim never calibrates on random data)"
        )
    from edgeslim.data import DetectionDataset, ImageDataset, calibration_subset

    if isinstance(calib, DetectionDataset):  # a detector's calibration: its images (pixels / 255), boxes unused
        if len(calib) == 0:
            raise DataError(f"calibration dataset {calib.name!r} ({calib.split}) is empty")
        sub = calib.take(config.num_samples, seed=config.seed)
        x = torch.stack([sub[i][0] for i in range(len(sub))])
    elif isinstance(calib, ImageDataset):
        if len(calib) == 0:
            raise DataError(f"calibration dataset {calib.name!r} ({calib.split}) is empty")
        sub = calibration_subset(calib, config.num_samples, seed=config.seed)
        x = sub.normalized()
    elif isinstance(calib, torch.Tensor):
        x = calib[: config.num_samples]
    elif isinstance(calib, Mapping):
        x = slice_inputs(calib, 0, config.num_samples)
    elif isinstance(calib, torch.utils.data.Dataset) and hasattr(calib, "__len__"):
        # a map-style dataset yields single samples ((input, target) or input): stack, never concatenate them
        n = min(len(calib), config.num_samples)
        items = [calib[i] for i in range(n)]
        items = [b[0] if isinstance(b, (tuple, list)) else b for b in items]
        if items and isinstance(items[0], Mapping):
            x = {k: torch.stack([torch.as_tensor(b[k]) for b in items]) for k in items[0]}
        else:
            x = torch.stack([torch.as_tensor(b) for b in items]) if items else torch.empty(0)
    else:
        xs = []
        for b in calib:
            xs.append(b[0] if isinstance(b, (tuple, list)) else b)
            if sum(batch_len(t) for t in xs) >= config.num_samples:
                break
        if xs and isinstance(xs[0], Mapping):
            x = slice_inputs({k: torch.cat([b[k] for b in xs]) for k in xs[0]}, 0, config.num_samples)
        else:
            x = torch.cat(xs)[: config.num_samples] if xs else torch.empty(0)
    n = batch_len(x)
    if n == 0:
        raise DataError("calibration data is empty: pass at least one real sample")
    return [slice_inputs(x, i, i + batch_size) for i in range(0, n, batch_size)]


def _check_fits(model: nn.Module, x: Any) -> None:
    try:
        with torch.no_grad():
            call(model, first_sample(x))
    except Exception as e:  # a shape mismatch surfaces as RuntimeError deep in torch
        shape = {k: tuple(v.shape[1:]) for k, v in x.items()} if isinstance(x, Mapping) else tuple(x.shape[1:])
        raise DataError(
            f"input of shape {shape} does not fit {type(model).__name__}: {str(e).splitlines()[0][:200]}"
        ) from None


def keeps_full_range(layer: nn.Module) -> bool:
    """Whether ``layer``'s 8-bit weights keep the full range when ``reduce_range`` asks for 7 bits: a depthwise
    Conv2d (one input and one output channel per group). ONNX Runtime runs it in its depthwise kernel, which sums
    16-bit products in 32 bits; the saturating 16-bit sum of u8 x s8 pairs is in its GEMM kernels (every other Conv,
    Gemm and MatMul). Measured on an AVX2-only EPYC: ImageNet MobileNetV2's file agrees with its quantized reference
    as well with 8-bit depthwise weights (18.3 dB) as with 7-bit ones (18.7 dB; all 8-bit: 10.4 dB), and with FP32
    1.2 dB better (top-1 agreement 0.88 vs 0.72 on 32 images)."""
    return isinstance(layer, nn.Conv2d) and 1 < layer.groups == layer.in_channels == layer.out_channels


def weight_qmax(config: QuantConfig, bits: int | None = None, full_range: bool = False) -> int:
    """Largest weight integer: 127 for 8 bits (63 with reduce_range, unless ``full_range``: a layer that
    :func:`keeps_full_range`), 7 for 4 bits (``bits``: config's)."""
    if (bits or config.weight_bits) == 4:
        return 7
    return 63 if config.weights_7bit and not full_range else 127


def range_note(config: QuantConfig, bits: int | None = None, full_range: bool = False) -> str:
    """The weight range in a layer's description, for the report: said only when ``reduce_range`` narrows 8-bit
    weights (``full_range``: a layer that keeps the full range, :func:`keeps_full_range`)."""
    if not config.weights_7bit or (bits or config.weight_bits) != 8:
        return ""
    return " (full range: depthwise)" if full_range else " (7-bit range)"


def weights_desc(
    config: QuantConfig, bits: int | None = None, per_channel: bool | None = None, full_range: bool = False
) -> str:
    """How a layer's weights are quantized, for the report (``bits``: the config's weight bits; ``per_channel``:
    the layer's granularity, default the config's; ``full_range``: see :func:`range_note`)."""
    if config.mode == QuantMode.FP16:
        return "fp16"
    per_channel = config.per_channel if per_channel is None else per_channel
    return (
        f"int{bits or config.weight_bits} {'per-channel' if per_channel else 'per-tensor'} symmetric"
        + (" (MSE scales)" if config.weight_range == WeightRange.MSE else "")
        + range_note(config, bits, full_range)
    )


def fit_weight_scale(qw: QuantWeight, config: QuantConfig) -> None:
    """Choose a freshly built QuantWeight's scale as the config says (``weight_range``)."""
    if config.weight_range == WeightRange.MSE and config.mode != QuantMode.FP16:
        qw.fit_scale_mse()


PRECISION = {QuantMode.STATIC: "int8", QuantMode.DYNAMIC: "int8-dynamic", QuantMode.FP16: "fp16"}


def build_graph(
    model: nn.Module,
    config: QuantConfig,
    per_tensor: list[str] | None = None,
    folded: torch.fx.GraphModule | None = None,
) -> tuple[torch.fx.GraphModule, _graph.Placement, dict[str, ActQuant]]:
    """Trace and fold a copy of ``model``, plan the placement and insert the (uncalibrated) quantizers.

    ``per_tensor``: the layers whose weights take one scale (a replayed recipe's record); default: chosen from the
    weights as ``config.per_tensor_sqnr_db`` says (:func:`choose_granularity`). ``folded``: ``model`` already traced
    and folded (a copy of it the caller gives up, e.g. the fx coverage check's)."""
    gm = folded if folded is not None else _graph.trace_and_fold(copy.deepcopy(model), inplace=True)
    gm.edgeslim_equalization = equalize(gm) if config.equalize else None
    placement = _graph.plan(gm, config.exclude, config.quantize_output, config.int8_layers)
    signed = config.activation_type == ActivationType.INT8
    default_qmax = weight_qmax(config)
    layer_qmax = {}
    for n in placement.weighted:  # 8-bit int8_layers of a 4-bit model; depthwise layers under reduce_range
        qmax = weight_qmax(config, 8 if n in placement.int8_layers else None, keeps_full_range(gm.get_submodule(n)))
        if qmax != default_qmax:
            layer_qmax[n] = qmax
    gm, quants = _graph.apply(
        gm,
        placement,
        qmin=-128 if signed else 0,
        qmax=127 if signed else 255,
        per_channel=config.per_channel,
        weight_qmax=default_qmax,
        fp16=config.mode == QuantMode.FP16,
        layer_qmax=layer_qmax,
    )
    if per_tensor is None:
        gm.edgeslim_per_tensor = choose_granularity(gm, config)
    else:
        layers = {n: m for n, m in gm.named_modules() if isinstance(m, QuantWeight)}
        for name in per_tensor:
            if name not in layers:
                raise ModelError(
                    f"the recipe's quantize step keeps {name!r} per-tensor, but this model has no such quantized "
                    f"layer ({len(layers)} quantized layers, e.g. {', '.join(sorted(layers)[:3])}): it is not the "
                    "model the recipe was made from"
                )
            layers[name].set_granularity(False)
    for m in gm.modules():
        if isinstance(m, QuantWeight):
            fit_weight_scale(m, config)
    # the inserted quantizers are new modules (training mode): the graph is calibrated and exported in eval mode,
    # where a weight quantizer's output is a constant (QAT sets training mode itself)
    return gm.eval(), placement, quants


def choose_granularity(gm: torch.fx.GraphModule, config: QuantConfig) -> dict[str, dict[str, float]]:
    """With ``config.per_tensor_sqnr_db``: every per-channel layer whose output channels keep that weight SQNR with
    one scale for the whole tensor (all but the worst tenth of them: :meth:`QuantWeight.channel_sqnr_db`) takes it.
    Returns ``{layer: {"per_tensor_sqnr_db", "per_channel_sqnr_db"}}`` for those layers."""
    chosen: dict[str, dict[str, float]] = {}
    floor = config.per_tensor_sqnr_db
    if floor is None or config.mode == QuantMode.FP16:
        return chosen
    for name, m in gm.named_modules():
        if not isinstance(m, QuantWeight) or not m.per_channel or m.layer.weight.shape[0] < 2:
            continue
        per_channel_db = m.channel_sqnr_db()
        m.set_granularity(False)
        per_tensor_db = m.channel_sqnr_db()
        if per_tensor_db >= floor:
            chosen[name] = {
                "per_tensor_sqnr_db": round(per_tensor_db, 2),
                "per_channel_sqnr_db": round(per_channel_db, 2),
            }
        else:
            m.set_granularity(True)
    return chosen


def _link_input_scales(gm: torch.fx.GraphModule) -> None:
    """Give every quantized layer whose input is quantized that input's scale (for its int32 bias)."""
    for n in gm.graph.nodes:
        if n.op != "call_module" or not isinstance(gm.get_submodule(str(n.target)), QuantWeight):
            continue
        src = n.args[0]
        if isinstance(src, torch.fx.Node) and src.op == "call_module":
            aq = gm.get_submodule(str(src.target))
            if isinstance(aq, ActQuant):
                gm.get_submodule(str(n.target)).set_input_scale(float(aq.scale.detach()))


@torch.no_grad()
def quantize(
    model: nn.Module,
    config: QuantConfig = QuantConfig(),
    *,
    data: Any = None,
    example_inputs: Any = None,
    calib: Any = None,
    progress: bool | None = None,
) -> QuantizedModel | OnnxQuantizedModel:
    """Quantize a copy of ``model`` (the input is never modified).

    The capture (``config.capture``) decides how the model's operations are found: ``fx`` rewrites the torch graph
    with fake quantization (a :class:`QuantizedModel`); ``onnx`` quantizes the exported ONNX graph (an
    :class:`OnnxQuantizedModel`, run by ONNX Runtime); ``auto`` picks fx when it covers at least 90% of the MACs.
    The report says which capture ran and why, and the share of MACs in integer kernels.

    Args:
        model: a float ``nn.Module`` (masked or clustered layers are made dense first), or an ONNX file (a path, an
            ``onnx.ModelProto`` or an :class:`~edgeslim.core.onnx_model.OnnxModel`).
        config: the :class:`QuantConfig`.
        data: calibration data (static mode, required): an ImageDataset (a class-balanced subset of
            ``config.num_samples`` is drawn), a DetectionDataset (a seeded subset of ``config.num_samples`` images,
            RGB / 255 NCHW; the boxes are not used), a tensor of inputs, a dict of input tensors (keyword inputs such as
            ``input_ids`` and ``attention_mask``), or an iterable of such batches.
        example_inputs: an input batch for dynamic/fp16 modes (to check the shape fits; the ONNX capture exports
            with it).
        calib: the old name of ``data`` (deprecated).
        progress: show progress bars on stderr (calibration, AdaRound); ``None`` inherits
            :func:`edgeslim.core.progress.progress_enabled` (off by default).

    Returns:
        the quantized model; its ``report`` lists what was quantized and what was not, and why.
    """
    calib = data_alias(data, calib, "quantize")
    with progress_enabled(progress):
        return _quantize(model, config, calib, example_inputs)


def _quantize(model: nn.Module, config: QuantConfig, calib: Any, example_inputs: torch.Tensor | None) -> QuantizedModel:
    t0 = time.perf_counter()
    timings = _Phases()
    check_config(config, QuantConfig, "quantize")
    config, host_note = config.for_host()  # the model records the weight range it was quantized with
    from edgeslim.quantize import _capture

    if _capture.is_onnx_source(model):
        model = OnnxModel(model)
    _recipe.check_next(model, "quantize")
    static = config.mode == QuantMode.STATIC
    batches = _calibration_batches(calib, config) if static else []
    probe = batches[0] if batches else example_inputs
    if probe is not None:
        _check_fits(model, probe)
    precision = PRECISION[config.mode]
    report = QuantReport(
        mode=config.mode.value,
        precision=precision,
        calibration=config.calibration if static else None,
        calibration_samples=sum(batch_len(b) for b in batches),
    )
    if host_note:
        report.corrections["reduce_range"] = host_note
    if probe is None and (config.capture != "fx" or isinstance(model, OnnxModel)):
        if isinstance(model, OnnxModel) or config.capture == "onnx":
            raise DataError(
                f"{config.mode.value} quantization on the ONNX graph needs example_inputs= (an input "
                "batch to export the model with)"
            )
        capture, why, coverage = "fx", "no example_inputs to measure the fx capture's coverage with", None
    else:
        capture, why, coverage = _capture.choose(model, config, probe)
    timings.end("choose_capture")
    if capture == "onnx":
        q = _capture.quantize_onnx(model, config, batches, probe, report, why, timings)
        if config.check_speed:
            _capture.check_speed(report, model, q, probe)
            timings.end("speed_check")
        report.timings = timings.rounded()
        report.seconds = round(time.perf_counter() - t0, 3)
        previous = _recipe.steps_of(model)
        setattr(q, _recipe.RECIPE_ATTR, previous)
        src = getattr(model, _recipe.SOURCE_ATTR, None)
        if src is not None:
            setattr(q, _recipe.SOURCE_ATTR, src)
        _recipe.record(q, "quantize", q.config, {"capture": "onnx", "plan": q.plan}, report)
        log.info("quantize: %s", report.summary())
        return q
    if config.capture != "fx":
        config = config.replace(capture="fx")
    report.capture, report.capture_reason = "fx", why
    gm, placement, quants = build_graph(model, config, folded=(coverage or {}).pop("folded", None))
    if gm.edgeslim_equalization:
        report.corrections["equalization"] = gm.edgeslim_equalization
    timings.end("capture")
    if static:
        report.calibration_runtime = observe_activations(gm, quants, batches, config)
        timings.end("calibrate")
        method = CALIBRATORS.get(config.calibration)
        inputs = {n.name for n in gm.graph.nodes if n.op == "placeholder"}
        for key, a in quants.items():
            value = key.split(":")[1]
            if a.observer.lo == float("inf"):
                raise QuantizationError(f"activation {value!r} was never reached during calibration")
            # the model's input keeps its observed range: clipping input data only loses information
            fn = CALIBRATORS.get("minmax") if value in inputs else method
            lo, hi = fn(a.observer.stats(a.qmin, a.qmax, config.percentile))
            a.set_range(lo, hi)
            a.state = "quant"
            a.observer = type(a.observer)()  # drop the histograms
        by_quant = {id(a): key.split(":")[0] for key, a in quants.items()}
        for key, a in quants.items():
            a.copy_source()  # MaxPool / flatten outputs: their input's scale and zero point
            r = a.range
            entry = {
                "value": key.split(":")[1],
                "module": key.split(":")[0],
                "range": [round(r[0], 6), round(r[1], 6)],
                "scale": float(a.scale),
                "zero_point": int(a.zero_point),
            }
            if a.shares is not None:
                entry["shares"] = by_quant[id(a.shares)]
            report.activations.append(entry)
        _link_input_scales(gm)
        timings.end("ranges")
        if config.adaround:
            with torch.enable_grad():
                ada = torch.cat(batches)[: config.adaround_samples]
                report.corrections["adarounded_layers"] = adaround(
                    gm, list(ada.split(64)), iterations=config.adaround_iterations, seed=config.seed
                )
            timings.end("adaround")
        if config.bias_correction:
            report.corrections["bias_corrected_layers"] = correct_bias(gm, batches)
            _link_input_scales(gm)
            timings.end("bias_correction")
    elif config.mode == QuantMode.DYNAMIC:
        for a in quants.values():
            a.state = "dynamic"
    per_tensor = getattr(gm, "edgeslim_per_tensor", {})
    if per_tensor:
        report.corrections["per_tensor_layers"] = per_tensor
    for name in placement.weighted:
        layer = gm.get_submodule(name).layer
        desc = weights_desc(
            config,
            8 if name in placement.int8_layers else None,
            per_channel=name not in per_tensor,
            full_range=keeps_full_range(layer),
        )
        if name in per_tensor:
            desc += f" (weight SQNR {per_tensor[name]['per_tensor_sqnr_db']:.1f} dB >= {config.per_tensor_sqnr_db:g})"
        report.quantized_layers.append(
            {
                "name": name,
                "type": type(layer).__name__,
                "weights": desc,
                "params": int(sum(p.numel() for p in layer.parameters())),
            }
        )
    for name, why in placement.excluded.items():
        report.skipped_layers.append({"name": name, "type": type(gm.get_submodule(name)).__name__, "reason": why})
    report.float_ops = [{"node": k, "reason": v} for k, v in placement.float_ops.items()]
    excluded_macs = 0
    if coverage and placement.excluded:
        excluded_macs = _excluded_macs(model, probe, list(placement.excluded))
    _capture.fx_integer_share(report, coverage, placement.weighted, excluded_macs)
    qm = QuantizedModel(gm, config, report).eval()
    timings.end("report")
    if config.check_speed:
        _capture.check_speed(report, model, qm, probe)
        timings.end("speed_check")
    report.timings = timings.rounded()
    report.seconds = round(time.perf_counter() - t0, 3)
    record_quantized(qm, model)
    log.info("quantize: %s", report.summary())
    return qm


class _Phases(dict):
    """Seconds per phase of a run, in order: ``end(name)`` closes the phase that began when the last one ended."""

    def __init__(self) -> None:
        super().__init__()
        self._tick = time.perf_counter()

    def end(self, name: str) -> None:
        now = time.perf_counter()
        self[name] = self.get(name, 0.0) + now - self._tick
        self._tick = now

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.items()}


def observe_activations(
    gm: torch.fx.GraphModule, quants: dict[str, ActQuant], batches: list[Any], config: QuantConfig
) -> str:
    """Collect every activation quantizer's statistics in one pass over ``batches``; say where it ran.

    ONNX Runtime runs the pass when the fake-quant graph exports (see ``_observe``); otherwise torch does, with the
    quantizers observing in place (same statistics, slower).
    """
    from edgeslim.quantize import _observe
    from edgeslim.quantize._calibrate import Observer

    entropy = config.calibration == "entropy"
    by_module = {key.split(":")[0]: a for key, a in quants.items()}
    for a in by_module.values():
        a.observer = Observer(count_zeros=entropy)
    try:
        graph, tensor_of = _observe.fx_calibration_graph(gm, by_module, batches[0])
        observers: dict[str, Observer] = {}
        for m, a in by_module.items():  # two quantizers on one tensor (one feeds the other) share one observer
            a.observer = observers.setdefault(tensor_of[m], a.observer)
        bad = _observe.observe_graph(graph, observers, batches)
        if bad:
            raise RuntimeError(f"non-finite values in {sorted(bad)[:3]}")
        return "onnxruntime (one pass)"
    except Exception as e:  # noqa: BLE001 - any failure to export or run: torch observes instead, and the report says so
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}"
        log.info("quantize: calibrating in torch (the ONNX Runtime pass failed: %s)", why)
    for a in by_module.values():
        a.observer = Observer(count_zeros=entropy)
        a.state = "observe"
    with bar(desc="calibrate", total=len(batches), unit="batch") as pb:
        for b in batches:
            gm(b)
            pb.update()
    return f"torch (one pass; the ONNX Runtime pass failed: {why})"


def _excluded_macs(model: nn.Module, probe: Any, names: list[str]) -> int:
    """MACs (batch 1) of the fx layers the user excluded, from the folded graph."""
    from edgeslim.core.counting import count_macs

    gm = _graph.trace_and_fold(copy.deepcopy(model), inplace=True)
    seen: dict[str, Any] = {}
    hooks = [
        gm.get_submodule(n).register_forward_pre_hook(lambda _m, a, n=n: seen.setdefault(n, a) and None) for n in names
    ]
    try:
        with torch.no_grad():
            call(gm, first_sample(probe))
    finally:
        for h in hooks:
            h.remove()
    return sum(count_macs(gm.get_submodule(n), seen[n]) for n in names if n in seen)


def record_quantized(qm: QuantizedModel, source: nn.Module) -> QuantizedModel:
    """Record ``qm``'s quantize step after ``source``'s recipe (its config, learnable scales and QAT mode)."""
    src = getattr(source, _recipe.SOURCE_ATTR, None)
    if src is not None:
        setattr(qm, _recipe.SOURCE_ATTR, src)
    learnable = sorted(
        n for n, m in qm.named_modules() if isinstance(m, (ActQuant, QuantWeight)) and isinstance(m.scale, nn.Parameter)
    )
    qat = sorted({str(w.qat) for w in qm.weight_quants() if getattr(w, "qat", None)})
    previous = _recipe.steps_of(source)
    if previous and previous[-1]["technique"] == "quantize":  # QAT of a quantized model: one quantize step
        previous = previous[:-1]
    setattr(qm, _recipe.RECIPE_ATTR, previous)
    state: dict[str, Any] = {"learnable_scales": learnable, "qat": qat[0] if qat else None}
    per_tensor = sorted(  # layers whose granularity differs from the config's: chosen per layer
        n
        for n, w in qm.graph_module.named_modules()
        if isinstance(w, QuantWeight) and w.per_channel != qm.config.per_channel
    )
    if per_tensor:
        state["per_tensor_layers"] = per_tensor
    return _recipe.record(qm, "quantize", qm.config, state, qm.report)


@_recipe.STEPS.register("quantize")
def _replay_step(model: nn.Module, step: dict) -> QuantizedModel:
    """Rebuild a quantized model's structure (BN folded, quantizers placed, modes set) for its state_dict."""
    config = QuantConfig.from_dict(step["config"], source="recipe step 'quantize'")
    if config.capture == "onnx" or step.get("state", {}).get("capture") == "onnx":
        from edgeslim.quantize._capture import replay_onnx

        return replay_onnx(model, step)
    state = step.get("state", {})
    gm, placement, quants = build_graph(model, config, state.get("per_tensor_layers", []))
    q = QuantizedModel(gm, config, QuantReport(config.mode.value, PRECISION[config.mode], config.calibration, 0))
    for name in state.get("learnable_scales", []):
        q.get_submodule(name).make_learnable()
    if state.get("qat"):
        for w in q.weight_quants():
            w.qat = state["qat"]
    for a in quants.values():
        a.state = {QuantMode.STATIC: "quant", QuantMode.DYNAMIC: "dynamic"}.get(config.mode, a.state)
    q.report.quantized_layers = [{"name": n} for n in placement.weighted]
    return q.eval()
