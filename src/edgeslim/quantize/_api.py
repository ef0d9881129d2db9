"""The ``quantize`` verb and the model it returns."""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from edgeslim.core import recipe as _recipe
from edgeslim.core.errors import DataError, QuantizationError
from edgeslim.core.verbs import check_config, data_alias
from edgeslim.core.progress import bar, progress_enabled
from edgeslim.quantize import _graph
from edgeslim.quantize._calibrate import CALIBRATORS
from edgeslim.quantize._config import ActivationType, QuantConfig, QuantMode, WeightRange
from edgeslim.quantize._adaround import adaround
from edgeslim.quantize._equalize import correct_bias, equalize
from edgeslim.quantize._modules import ActQuant, QuantWeight

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

    def to_dict(self) -> dict[str, Any]:
        return {"technique": self.technique, **asdict(self)}

    def summary(self) -> str:
        return (
            f"{self.precision}: {len(self.quantized_layers)} layers quantized, {len(self.skipped_layers)} kept in "
            f"float, {len(self.activations)} activation ranges ({self.calibration or 'none'}, "
            f"{self.calibration_samples} samples), {self.seconds:.1f} s"
        )


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


def _calibration_batches(calib: Any, config: QuantConfig, batch_size: int = 128) -> list[torch.Tensor]:
    """Turn the calibration argument into a list of input batches (class-balanced when labels are known)."""
    if calib is None:
        raise DataError(
            "static quantization needs calibration data: pass data=<dataset or tensor of real samples> "
            "(edgeslim never calibrates on random data)"
        )
    from edgeslim.data import ImageDataset, calibration_subset

    if isinstance(calib, ImageDataset):
        if len(calib) == 0:
            raise DataError(f"calibration dataset {calib.name!r} ({calib.split}) is empty")
        sub = calibration_subset(calib, config.num_samples, seed=config.seed)
        x = sub.normalized()
    elif isinstance(calib, torch.Tensor):
        x = calib[: config.num_samples]
    else:
        xs = []
        for b in calib:
            xs.append(b[0] if isinstance(b, (tuple, list)) else b)
            if sum(len(t) for t in xs) >= config.num_samples:
                break
        x = torch.cat(xs)[: config.num_samples] if xs else torch.empty(0)
    if len(x) == 0:
        raise DataError("calibration data is empty: pass at least one real sample")
    return [x[i : i + batch_size] for i in range(0, len(x), batch_size)]


def _check_fits(model: nn.Module, x: torch.Tensor) -> None:
    try:
        with torch.no_grad():
            model(x[:1])
    except Exception as e:  # a shape mismatch surfaces as RuntimeError deep in torch
        raise DataError(
            f"input of shape {tuple(x.shape[1:])} does not fit {type(model).__name__}: "
            f"{str(e).splitlines()[0][:200]}"
        ) from None


def weight_qmax(config: QuantConfig, bits: int | None = None) -> int:
    """Largest weight integer: 127 for 8 bits (63 with reduce_range), 7 for 4 bits (``bits``: config's)."""
    if (bits or config.weight_bits) == 4:
        return 7
    return 63 if config.reduce_range else 127


def weights_desc(config: QuantConfig, bits: int | None = None) -> str:
    """How a layer's weights are quantized, for the report (``bits``: the config's weight bits)."""
    if config.mode == QuantMode.FP16:
        return "fp16"
    return (f"int{bits or config.weight_bits} {'per-channel' if config.per_channel else 'per-tensor'} symmetric"
            + (" (MSE scales)" if config.weight_range == WeightRange.MSE else "")
            + (" (7-bit range)" if config.reduce_range else ""))


def fit_weight_scale(qw: QuantWeight, config: QuantConfig) -> None:
    """Choose a freshly built QuantWeight's scale as the config says (``weight_range``)."""
    if config.weight_range == WeightRange.MSE and config.mode != QuantMode.FP16:
        qw.fit_scale_mse()


PRECISION = {QuantMode.STATIC: "int8", QuantMode.DYNAMIC: "int8-dynamic", QuantMode.FP16: "fp16"}


def build_graph(model: nn.Module, config: QuantConfig) -> tuple[torch.fx.GraphModule, _graph.Placement,
                                                                   dict[str, ActQuant]]:
    """Trace and fold a copy of ``model``, plan the placement and insert the (uncalibrated) quantizers."""
    gm = _graph.trace_and_fold(copy.deepcopy(model))
    gm.edgeslim_equalization = equalize(gm) if config.equalize else None
    placement = _graph.plan(gm, config.exclude, config.quantize_output, config.int8_layers)
    signed = config.activation_type == ActivationType.INT8
    gm, quants = _graph.apply(gm, placement, qmin=-128 if signed else 0, qmax=127 if signed else 255,
                              per_channel=config.per_channel, weight_qmax=weight_qmax(config),
                              fp16=config.mode == QuantMode.FP16,
                              layer_qmax={n: weight_qmax(config, 8) for n in placement.int8_layers})
    for m in gm.modules():
        if isinstance(m, QuantWeight):
            fit_weight_scale(m, config)
    return gm, placement, quants


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
    example_inputs: torch.Tensor | None = None,
    calib: Any = None,
    progress: bool | None = None,
) -> QuantizedModel:
    """Quantize a copy of ``model`` (the input is never modified).

    Args:
        model: a float ``nn.Module`` traceable by torch.fx (masked or clustered layers are made dense first).
        config: the :class:`QuantConfig`.
        data: calibration data (static mode, required): an ImageDataset (a class-balanced subset of
            ``config.num_samples`` is drawn), a tensor of inputs, or an iterable of batches.
        example_inputs: an input batch for dynamic/fp16 modes (to check the shape fits).
        calib: the old name of ``data`` (deprecated).
        progress: show progress bars on stderr (calibration, AdaRound); ``None`` inherits
            :func:`edgeslim.core.progress.progress_enabled` (off by default).

    Returns:
        a :class:`QuantizedModel` whose ``report`` lists what was quantized and what was not, and why.
    """
    calib = data_alias(data, calib, "quantize")
    with progress_enabled(progress):
        return _quantize(model, config, calib, example_inputs)


def _quantize(model: nn.Module, config: QuantConfig, calib: Any, example_inputs: torch.Tensor | None
              ) -> QuantizedModel:
    t0 = time.perf_counter()
    check_config(config, QuantConfig, "quantize")
    _recipe.check_next(model, "quantize")
    static = config.mode == QuantMode.STATIC
    batches = _calibration_batches(calib, config) if static else []
    probe = batches[0] if batches else example_inputs
    if probe is not None:
        _check_fits(model, probe)
    gm, placement, quants = build_graph(model, config)
    precision = PRECISION[config.mode]
    report = QuantReport(
        mode=config.mode.value, precision=precision, calibration=config.calibration if static else None,
        calibration_samples=sum(len(b) for b in batches),
    )
    if gm.edgeslim_equalization:
        report.corrections["equalization"] = gm.edgeslim_equalization
    if static:
        aqs = list(quants.values())
        with bar(desc="calibrate", total=2 * len(batches), unit="batch") as pb:
            for state in ("observe_range", "observe_hist"):
                for a in aqs:
                    a.state = state
                for b in batches:
                    gm(b)
                    pb.update()
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
            r = a.range
            report.activations.append({"value": key.split(":")[1], "module": key.split(":")[0],
                                       "range": [round(r[0], 6), round(r[1], 6)],
                                       "scale": float(a.scale), "zero_point": int(a.zero_point)})
        _link_input_scales(gm)
        if config.adaround:
            with torch.enable_grad():
                ada = torch.cat(batches)[: config.adaround_samples]
                report.corrections["adarounded_layers"] = adaround(gm, list(ada.split(64)),
                                                                   iterations=config.adaround_iterations,
                                                                   seed=config.seed)
        if config.bias_correction:
            report.corrections["bias_corrected_layers"] = correct_bias(gm, batches)
            _link_input_scales(gm)
    elif config.mode == QuantMode.DYNAMIC:
        for a in quants.values():
            a.state = "dynamic"
    for name in placement.weighted:
        layer = gm.get_submodule(name).layer
        desc = weights_desc(config, 8 if name in placement.int8_layers else None)
        report.quantized_layers.append({"name": name, "type": type(layer).__name__, "weights": desc,
                                        "params": int(sum(p.numel() for p in layer.parameters()))})
    for name, why in placement.excluded.items():
        report.skipped_layers.append({"name": name, "type": type(gm.get_submodule(name)).__name__, "reason": why})
    report.float_ops = [{"node": k, "reason": v} for k, v in placement.float_ops.items()]
    qm = QuantizedModel(gm, config, report).eval()
    report.seconds = round(time.perf_counter() - t0, 3)
    record_quantized(qm, model)
    log.info("quantize: %s", report.summary())
    return qm


def record_quantized(qm: QuantizedModel, source: nn.Module) -> QuantizedModel:
    """Record ``qm``'s quantize step after ``source``'s recipe (its config, learnable scales and QAT mode)."""
    src = getattr(source, _recipe.SOURCE_ATTR, None)
    if src is not None:
        setattr(qm, _recipe.SOURCE_ATTR, src)
    learnable = sorted(n for n, m in qm.named_modules() if isinstance(m, (ActQuant, QuantWeight))
                       and isinstance(m.scale, nn.Parameter))
    qat = sorted({str(w.qat) for w in qm.weight_quants() if getattr(w, "qat", None)})
    previous = _recipe.steps_of(source)
    if previous and previous[-1]["technique"] == "quantize":  # QAT of a quantized model: one quantize step
        previous = previous[:-1]
    setattr(qm, _recipe.RECIPE_ATTR, previous)
    return _recipe.record(qm, "quantize", qm.config, {"learnable_scales": learnable, "qat": qat[0] if qat else None},
                          qm.report)


@_recipe.STEPS.register("quantize")
def _replay_step(model: nn.Module, step: dict) -> QuantizedModel:
    """Rebuild a quantized model's structure (BN folded, quantizers placed, modes set) for its state_dict."""
    config = QuantConfig.from_dict(step["config"], source="recipe step 'quantize'")
    gm, placement, quants = build_graph(model, config)
    q = QuantizedModel(gm, config, QuantReport(config.mode.value, PRECISION[config.mode], config.calibration, 0))
    state = step.get("state", {})
    for name in state.get("learnable_scales", []):
        q.get_submodule(name).make_learnable()
    if state.get("qat"):
        for w in q.weight_quants():
            w.qat = state["qat"]
    for a in quants.values():
        a.state = {QuantMode.STATIC: "quant", QuantMode.DYNAMIC: "dynamic"}.get(config.mode, a.state)
    q.report.quantized_layers = [{"name": n} for n in placement.weighted]
    return q.eval()
