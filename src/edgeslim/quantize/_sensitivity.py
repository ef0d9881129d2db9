"""Per-layer quantization sensitivity and mixed precision under an accuracy budget.

Both verbs calibrate once: the full model is quantized with :func:`quantize`, and every variant ("these
layers kept in float") reuses its calibrated activation ranges. A variant's placement is planned exactly as
``QuantConfig(exclude=...)`` would plan it (:func:`edgeslim.quantize._graph.plan` on the folded graph; a
variant only ever drops quantizers, never adds one). For measuring, the calibrated model's ``QuantWeight.enabled``
flags and ``ActQuant`` states are switched in place; for returning, a fresh graph with the exclusions is built
and the calibrated scales are copied into it, so the returned model computes exactly what was measured. The
ranges were observed with every layer's weights quantized: a model calibrated anew with the same exclusions
can differ slightly (usually by less than the sampling noise of the evaluation).

>>> rep = sensitivity(model, QuantConfig(weight_bits=4), data=(train, val.take(500)))
>>> print(rep.table(10))
>>> cfg = BudgetConfig(max_accuracy_drop=0.002, quant=QuantConfig(weight_bits=4))
>>> res = quantize_with_budget(model, cfg, data=(train, val))
>>> res.met, res.kept_float, res.model

``data=(calib, score)`` is the calibration data and the data candidates are scored on; one dataset given as
``data=`` serves as both. The keywords of the earlier releases (``calib=``, and ``max_accuracy_drop=`` and the
other settings of :class:`BudgetConfig` beside a :class:`QuantConfig`) still work for one release, with a
``DeprecationWarning``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeslim.core.config import Config, StrEnum, _coerce_enum
from edgeslim.core.errors import ConfigError, DataError, EdgeslimError, QuantizationError
from edgeslim.core.progress import bar
from edgeslim.quantize import _graph
from edgeslim.quantize._api import (
    QuantizedModel,
    QuantReport,
    _link_input_scales,
    build_graph,
    fit_weight_scale,
    keeps_full_range,
    quantize,
    record_quantized,
    weight_qmax,
    weights_desc,
)
from edgeslim.quantize._config import QuantConfig, QuantMode
from edgeslim.quantize._modules import ActQuant, QuantWeight
from edgeslim.runtime._runners import positive_int

log = logging.getLogger(__name__)

Metric = Callable[[nn.Module, Any], float]  # (model, data) -> score, higher is better


class SensitivityMode(StrEnum):
    """``one_at_a_time``: only the layer is quantized. ``all_but_one``: every layer but it is quantized."""

    ONE_AT_A_TIME = "one_at_a_time"
    ALL_BUT_ONE = "all_but_one"


class RankBy(StrEnum):
    """``metric``: by the metric lost (ties: the logits' SQNR). ``sqnr``: by the SQNR of the variant's logits against
    the float model's, a continuous measure of the noise the layer adds (noise powers roughly add up over layers),
    steadier than top-1 on a few hundred samples (default metric only)."""

    METRIC = "metric"
    SQNR = "sqnr"


class Fallback(StrEnum):
    """What the budget search keeps its most sensitive layers in. ``float``: floating point (``QuantConfig.exclude``).
    ``int8``: 8-bit weights in a 4-bit model (``QuantConfig.int8_layers``), so every layer still runs an integer
    kernel and no Quantize/Dequantize pair is added around float layers."""

    FLOAT = "float"
    INT8 = "int8"


class BudgetSearch(StrEnum):
    """``greedy``: keep 0, 1, 2, ... of the most sensitive layers in float until the budget is met.
    ``bisect``: 0, then doubling (1, 2, 4, ...) until met, then bisection between the last miss and the first hit."""

    GREEDY = "greedy"
    BISECT = "bisect"


@dataclass(frozen=True)
class BudgetConfig(Config):
    """Settings of :func:`quantize_with_budget`: the budget, the quantization, and how the search runs.

    Attributes:
        max_accuracy_drop: the allowed drop of the metric below the float model's, a fraction in [0, 1]
            (0.002 = 0.2 points of top-1).
        quant: the :class:`QuantConfig` every candidate is quantized with, e.g. ``QuantConfig(weight_bits=4)``
            (in YAML, a mapping of its fields).
        mode: the sensitivity mode used for the ranking (:class:`SensitivityMode`).
        sensitivity_samples: rank on a seeded subset of this many samples of the search data (default: all).
        rank_by: the order in which layers are kept in float: ``metric`` or ``sqnr`` (see :class:`RankBy`);
            default: the order of a given ``sensitivity_report``, else ``metric``.
        search: ``greedy`` (monotone, one layer per step) or ``bisect`` (fewer evaluations; :class:`BudgetSearch`).
        measure_latency: export each candidate to INT8 ONNX (in a temporary folder) and measure its ONNX Runtime
            latency at 1 thread, batch 1, and its top-1 there.
        latency_runs: timed runs per latency measurement.
        fallback: ``float`` (default) or ``int8`` (needs ``quant.weight_bits=4``): what the kept layers are kept in
            (:class:`Fallback`). The ranking is the same either way (each layer's cost of its low-bit weights).
    """

    kind = "quantize_with_budget"
    max_accuracy_drop: float = 0.01
    quant: QuantConfig = field(default_factory=QuantConfig)
    mode: SensitivityMode = SensitivityMode.ONE_AT_A_TIME
    sensitivity_samples: int | None = None
    rank_by: RankBy | None = None
    search: BudgetSearch = BudgetSearch.GREEDY
    measure_latency: bool = False
    latency_runs: int = 100
    fallback: Fallback = Fallback.FLOAT

    def validate(self) -> None:
        d = self.max_accuracy_drop
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d <= 1.0:
            raise self._bad("max_accuracy_drop", "use a fraction in [0, 1] (e.g. 0.002 = 0.2 points of top-1)")
        if self.sensitivity_samples is not None and not _count(self.sensitivity_samples):
            raise self._bad("sensitivity_samples", "use an integer >= 1, or null (all samples)")
        if not _count(self.latency_runs):
            raise self._bad("latency_runs", "use an integer >= 1")
        if not isinstance(self.measure_latency, bool):
            raise self._bad("measure_latency", "use true or false")
        if self.fallback == Fallback.INT8 and self.quant.weight_bits != 4:
            raise ConfigError(
                f"BudgetConfig.fallback='int8' keeps layers at 8-bit weights, which needs "
                f"QuantConfig(weight_bits=4); got weight_bits={self.quant.weight_bits} "
                "(use fallback='float')"
            )


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


@dataclass(frozen=True)
class LayerSensitivity:
    """One layer's row. ``metric``: the variant's score; ``drop``: float score minus it; ``sensitivity``: the
    score this layer's quantization costs (``one_at_a_time``: all-float-layers score minus the variant's;
    ``all_but_one``: the variant's score minus the fully quantized score); ``sqnr_db``: the variant's logits
    against the float model's (default metric only; breaks ties)."""

    layer: str
    type: str
    params: int
    metric: float
    drop: float
    sensitivity: float
    sqnr_db: float | None


@dataclass(frozen=True)
class SensitivityReport:
    """Layers sorted most sensitive first, with the float, fully quantized and reference scores."""

    mode: str
    metric_name: str
    samples: int
    float_metric: float
    quantized_metric: float
    reference_metric: float  # all layers in float (one_at_a_time) or all quantized (all_but_one)
    layers: tuple[LayerSensitivity, ...]
    seconds: float
    rank_by: str = "metric"

    @property
    def ranking(self) -> tuple[str, ...]:
        return tuple(r.layer for r in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def rerank(self, rank_by: RankBy | str) -> SensitivityReport:
        """The same measurements, ordered by ``rank_by`` (``metric`` or ``sqnr``)."""
        by = _rank_by(rank_by, all(r.sqnr_db is not None for r in self.layers))
        one = self.mode == SensitivityMode.ONE_AT_A_TIME

        def sq(r: LayerSensitivity) -> float:  # ascending = more sensitive
            return 0.0 if r.sqnr_db is None else r.sqnr_db if one else -r.sqnr_db

        key = (lambda r: (sq(r), -r.sensitivity)) if by == RankBy.SQNR else (lambda r: (-r.sensitivity, sq(r)))
        return replace(self, rank_by=by.value, layers=tuple(sorted(self.layers, key=key)))

    def table(self, top: int | None = None) -> str:
        """The ``top`` most sensitive layers (all by default) as text; scores in points (x100)."""
        rows = [
            [
                str(i),
                r.layer,
                r.type,
                str(r.params),
                _pt(r.metric),
                _pt(r.drop),
                _pt(r.sensitivity),
                "-" if r.sqnr_db is None else f"{r.sqnr_db:.1f}",
            ]
            for i, r in enumerate(self.layers[:top], 1)
        ]
        return (
            f"sensitivity ({self.mode}, ranked by {self.rank_by}, {self.samples} samples): float "
            f"{_pt(self.float_metric)}, all quantized {_pt(self.quantized_metric)}\n"
            + _table(["#", "layer", "type", "params", self.metric_name, "drop pt", "sens pt", "SQNR dB"], rows)
        )


@dataclass(frozen=True)
class BudgetStep:
    """One evaluated candidate: the ``n_float`` most sensitive layers kept in higher precision (float, or 8-bit
    weights with ``fallback="int8"``; the field names say float either way)."""

    n_float: int
    kept_float: tuple[str, ...]
    params_float: int
    metric: float
    drop: float
    met: bool
    sqnr_db: float | None = None
    latency_p50_ms: float | None = None  # ONNX Runtime, 1 thread, batch 1
    accuracy_ort: float | None = None
    latency_error: str | None = None


@dataclass(frozen=True)
class BudgetResult:
    """The chosen model (the fewest float layers that meet the budget, else the best candidate) and the search."""

    model: QuantizedModel = field(repr=False)
    met: bool
    max_accuracy_drop: float
    float_metric: float
    metric: float
    drop: float
    kept_float: tuple[str, ...]
    steps: tuple[BudgetStep, ...]
    sensitivity: SensitivityReport = field(repr=False)
    eval: dict[str, Any] | None = None  # float and chosen scores on eval_data
    float_latency_ms: float | None = None
    seconds: float = 0.0
    noise_2se: float | None = None  # 2 SE of the paired float-vs-all-quantized top-1 difference on the search data
    fallback: str = "float"  # what kept_float layers are kept in: "float", or "int8" (8-bit weights)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(replace(self, model=None))  # type: ignore[arg-type]  (asdict would deep-copy the model)
        del d["model"]
        d["report"] = self.model.report.to_dict()
        return d

    def table(self) -> str:
        """Every search step as text; scores in points (x100), ONNX Runtime latency at 1 thread, batch 1."""
        kept = "in float" if self.fallback == "float" else f"at {self.fallback}"
        rows = [
            [
                str(i),
                str(s.n_float),
                str(s.params_float),
                _pt(s.metric),
                _pt(s.drop),
                "yes" if s.met else "no",
                _pt(s.accuracy_ort),
                "-" if s.latency_p50_ms is None else f"{s.latency_p50_ms:.3f}",
            ]
            for i, s in enumerate(self.steps)
        ]
        fp32 = f", FP32 ORT 1T {self.float_latency_ms:.3f} ms" if self.float_latency_ms else ""
        name = self.sensitivity.metric_name
        return (
            f"budget {_pt(self.max_accuracy_drop)} pt, float {name} {_pt(self.float_metric)}{fp32}\n"
            + _table(["step", kept, f"params {kept}", name, "drop pt", "met", "ORT top-1", "ORT 1T ms"], rows)
            + f"\n{'met' if self.met else 'NOT met, best candidate'}: {len(self.kept_float)} layers {kept} "
            f"{list(self.kept_float)}, drop {_pt(self.drop)} pt"
            + (
                ""
                if self.noise_2se is None
                else f"; sampling noise of the search data +-{_pt(self.noise_2se)} pt"
                + (" (LARGER than the budget)" if self.noise_2se > self.max_accuracy_drop else "")
            )
        )


def _pt(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.2f}"


def _table(head: list[str], rows: list[list[str]]) -> str:
    """Columns sized to fit; layer names left-aligned, the others right-aligned."""
    w = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def fmt(r: list[str]) -> str:
        return " ".join(c.ljust(w[i]) if head[i] == "layer" else c.rjust(w[i]) for i, c in enumerate(r))

    return "\n".join([fmt(head), "-" * (sum(w) + len(w) - 1), *map(fmt, rows)])


class _Evaluator:
    """Scores models on fixed data: the metric, plus logits SQNR against the float model for the default metric."""

    def __init__(self, model: nn.Module, data: Any, metric: Metric | None, samples: int | None) -> None:
        if data is None or len(data) == 0:
            raise DataError("sensitivity and budget search need evaluation data: pass data=<non-empty dataset>")
        if samples is not None:
            if not hasattr(data, "take"):
                raise DataError(f"samples= needs an ImageDataset, got {type(data).__name__}")
            data = data.take(positive_int("samples", samples), seed=0)
        self.data, self.metric = data, metric
        self.name = "top-1" if metric is None else getattr(metric, "__name__", "metric")
        self.ref: torch.Tensor | None = None
        self.last_correct: torch.Tensor | None = None
        self.float_correct: torch.Tensor | None = None
        self.float_metric, _ = self.score(model)

    def paired_noise(self) -> float | None:
        """Two standard errors of (float - last scored) top-1 on these samples, paired per sample: a drop smaller
        than this cannot be told from sampling noise. None for a custom metric."""
        if self.float_correct is None or self.last_correct is None:
            return None
        d = self.float_correct.double() - self.last_correct.double()
        n = len(d)
        return float(2 * d.std(unbiased=True) / math.sqrt(n)) if n > 1 else None

    @torch.no_grad()
    def score(self, model: nn.Module) -> tuple[float, float | None]:
        was = model.training
        model.eval()
        try:
            if self.metric is not None:
                return float(self.metric(model, self.data)), None
            batches = self.data.batches(500) if hasattr(self.data, "batches") else self.data
            out, ys = zip(*[(model(x), y) for x, y in batches])
        finally:
            model.train(was)
        logits, y = torch.cat(out), torch.cat(ys)
        self.last_correct = logits.argmax(1) == y
        acc = int(self.last_correct.sum()) / len(y)  # exact: float32 blurs the budget edge
        if self.ref is None:
            self.ref, self.float_correct = logits, self.last_correct
            return acc, None
        noise = float(((logits - self.ref) ** 2).sum())
        return acc, (math.inf if noise == 0 else 10 * math.log10(max(float((self.ref**2).sum()), 1e-30) / noise))


class _Variants:
    """A once-calibrated quantized model, toggled or rebuilt with extra layers kept in float."""

    def __init__(self, model: nn.Module, config: QuantConfig, calib: Any) -> None:
        self.model, self.config = model, config.for_host()[0]
        if config.capture == "onnx":
            raise QuantizationError(
                "sensitivity and the budget search score the torch fake-quant model: "
                "QuantConfig.capture must be 'fx' or 'auto' here, not 'onnx'"
            )
        # layers are toggled in the torch fake-quant model: the fx capture (its report states what it covers)
        self.q = quantize(model, config.replace(capture="fx"), data=calib)
        self.layers = {d["name"]: d for d in self.q.report.quantized_layers}
        self.folded = _graph.trace_and_fold(copy.deepcopy(model), inplace=True)
        gm = self.q.graph_module
        self.acts: dict[str, ActQuant] = {}
        for n in gm.graph.nodes:
            if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), ActQuant):
                self.acts[n.args[0].name] = gm.get_submodule(str(n.target))
        self.on = {v: a.state for v, a in self.acts.items()}
        self._eight: dict[str, tuple[int, torch.Tensor]] = {}

    def plan(self, floats: Sequence[str]) -> _graph.Placement:
        p = _graph.plan(self.folded, self.config.exclude + tuple(floats), self.config.quantize_output)
        if set(p.values) - set(self.acts):  # cannot happen: excluding layers only removes quantizers
            raise QuantizationError(f"internal: keeping {list(floats)} in float adds quantizers; please report")
        return p

    @contextlib.contextmanager
    def variant(self, floats: Sequence[str], int8: Sequence[str] = ()) -> Iterator[QuantizedModel]:
        """The calibrated model with ``floats`` (and whatever quantizers only they needed) switched off, and the
        ``int8`` layers' weights at 8 bits (scales chosen as :func:`quantize` would choose them)."""
        p = self.plan(floats)
        keep = set(p.weighted)
        for name in self.layers:
            self.q.graph_module.get_submodule(name).enabled = name in keep
        for v, a in self.acts.items():
            a.state = self.on[v] if v in p.values else "off"
        saved = {}
        for name in int8:
            qw = self.q.graph_module.get_submodule(name)
            saved[name] = (qw.qmax, qw.scale.clone())
            qmax, scale = self._eight_bit(name)
            qw.qmax = qmax
            qw.scale.copy_(scale)
        try:
            yield self.q
        finally:
            for name in self.layers:
                self.q.graph_module.get_submodule(name).enabled = True
            for v, a in self.acts.items():
                a.state = self.on[v]
            for name, (qmax, scale) in saved.items():
                qw = self.q.graph_module.get_submodule(name)
                qw.qmax = qmax
                qw.scale.copy_(scale)

    @torch.no_grad()
    def _eight_bit(self, name: str) -> tuple[int, torch.Tensor]:
        """8-bit weight qmax and scale of a layer, as ``quantize(..., QuantConfig(int8_layers=(name,)))`` sets them."""
        if name not in self._eight:
            qw = self.q.graph_module.get_submodule(name)
            qmax = weight_qmax(self.config, 8, keeps_full_range(qw.layer))
            tmp = QuantWeight(qw.layer, per_channel=qw.per_channel, qmax=qmax)
            fit_weight_scale(tmp, self.config)
            if float(qw.input_scale) > 0:
                tmp.set_input_scale(float(qw.input_scale))
            self._eight[name] = (qmax, tmp.scale.clone())
        return self._eight[name]

    @torch.no_grad()
    def build(self, floats: Sequence[str], int8: Sequence[str] = ()) -> QuantizedModel:
        """A standalone QuantizedModel with ``floats`` excluded, ``int8`` at 8-bit weights and the calibrated
        ranges copied in."""
        cfg = replace(
            self.config, exclude=self.config.exclude + tuple(floats), int8_layers=self.config.int8_layers + tuple(int8)
        )
        gm, p, quants = build_graph(self.model, cfg)
        for key, a in quants.items():
            src = self.acts[key.split(":")[1]]
            a.scale.copy_(src.scale)
            a.zero_point.copy_(src.zero_point)
            a.state = self.on[key.split(":")[1]]
        if cfg.mode == QuantMode.STATIC:
            _link_input_scales(gm)
        full = self.q.report
        values = {key.split(":")[1] for key in quants}
        report = QuantReport(
            mode=full.mode,
            precision=full.precision,
            calibration=full.calibration,
            calibration_samples=full.calibration_samples,
            quantized_layers=[
                {**d, "weights": weights_desc(cfg, 8, full_range=keeps_full_range(gm.get_submodule(d["name"]).layer))}
                if d["name"] in p.int8_layers
                else d
                for d in full.quantized_layers
                if d["name"] in set(p.weighted)
            ],
            skipped_layers=[
                {"name": n, "type": type(gm.get_submodule(n)).__name__, "reason": why} for n, why in p.excluded.items()
            ],
            float_ops=[{"node": k, "reason": v} for k, v in p.float_ops.items()],
            activations=[a for a in full.activations if a["value"] in values],
        )
        return record_quantized(QuantizedModel(gm, cfg, report).eval(), self.model)


def sensitivity(
    model: nn.Module,
    config: QuantConfig = QuantConfig(),
    *,
    data: Any = None,
    metric: Metric | None = None,
    mode: SensitivityMode | str = SensitivityMode.ONE_AT_A_TIME,
    samples: int | None = None,
    rank_by: RankBy | str = RankBy.METRIC,
    calib: Any = None,
) -> SensitivityReport:
    """Measure how much quantizing each layer costs, on a once-calibrated copy of ``model``.

    Every layer that ``quantize(model, config)`` quantizes is scored with the fake-quantized model in torch:
    ``one_at_a_time`` quantizes only that layer (all others as if in ``QuantConfig.exclude``), ``all_but_one``
    quantizes every layer but it. Calibration runs once (see the module docstring); each variant costs one
    evaluation on the score data.

    Args:
        model: the float model (not modified).
        config: the :class:`QuantConfig` (its ``exclude`` layers stay in float throughout).
        data: ``(calib, score)``: the calibration data, as for :func:`quantize`, and the data each variant is
            scored on (an ImageDataset, or a list of ``(x, y)`` batches). One dataset given alone is used for both
            (logged).
        metric: ``metric(model, data) -> float``, higher is better; default top-1 accuracy.
        mode: ``one_at_a_time`` or ``all_but_one``.
        samples: score on a seeded subset of this many samples of the score data.
        rank_by: ``metric`` (the metric lost; ties broken by the logits' SQNR) or ``sqnr`` (see :class:`RankBy`).
        calib: deprecated alias of the first element of ``data`` (``calib=train, data=val`` is
            ``data=(train, val)``); warns.

    Returns:
        a :class:`SensitivityReport`, most sensitive layer first.
    """
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"sensitivity expects a QuantConfig, got {type(config).__name__}")
    if calib is not None:
        warnings.warn(
            "sensitivity(model, config, calib=..., data=...) is deprecated; pass data=(calib, score_data)",
            DeprecationWarning,
            stacklevel=2,
        )
    calib, data = _calib_and_score("sensitivity", data, calib)
    mode = _coerce_enum("sensitivity", "mode", SensitivityMode, mode)
    rank_by = _rank_by(rank_by, metric is None)
    ev = _Evaluator(model, data, metric, samples)
    return _sensitivity(_Variants(model, config, calib), ev, mode).rerank(rank_by)


def _budget_config(config: Any, calib: Any, old: dict[str, Any]) -> BudgetConfig:
    """The BudgetConfig of a call, built from the earlier release's keywords (with a DeprecationWarning) if used."""
    unknown = [k for k in old if k not in _OLD_BUDGET_KWARGS]
    if unknown:
        raise TypeError(f"quantize_with_budget() got an unexpected keyword argument {unknown[0]!r}")
    if isinstance(config, BudgetConfig) or (config is None and not old):
        if old:
            raise ConfigError(
                f"quantize_with_budget: {', '.join(old)} belong in the BudgetConfig "
                f"(BudgetConfig({next(iter(old))}=...)), not beside it"
            )
        if calib is not None:
            warnings.warn(
                "quantize_with_budget(..., calib=..., data=...) is deprecated; pass data=(calib, score_data)",
                DeprecationWarning,
                stacklevel=3,
            )
        return BudgetConfig() if config is None else config
    if config is not None and not isinstance(config, QuantConfig):
        raise ConfigError(f"quantize_with_budget() needs a BudgetConfig, got {type(config).__name__}")
    if "max_accuracy_drop" not in old:
        raise ConfigError(
            "quantize_with_budget(model, QuantConfig(...)) needs max_accuracy_drop=; better, pass "
            "BudgetConfig(max_accuracy_drop=..., quant=QuantConfig(...))"
        )
    warnings.warn(
        "quantize_with_budget(model, QuantConfig(...), calib=..., data=..., max_accuracy_drop=..., ...) "
        "is deprecated; use quantize_with_budget(model, BudgetConfig(max_accuracy_drop=..., "
        "quant=QuantConfig(...), ...), data=(calib, score_data))",
        DeprecationWarning,
        stacklevel=3,
    )
    return BudgetConfig(quant=config or QuantConfig(), **old)


def _is_batch(x: Any) -> bool:
    return isinstance(x, (tuple, list)) and len(x) == 2 and all(isinstance(t, torch.Tensor) for t in x)


def _calib_and_score(verb: str, data: Any, calib: Any) -> tuple[Any, Any]:
    """``(calibration data, score data)`` from ``data=(calib, score)``, a single ``data=`` (both), or the deprecated
    ``calib=`` beside ``data=``. A tuple of two ``(x, y)`` batches is one dataset of batches, not a pair."""
    pair = isinstance(data, tuple) and len(data) == 2 and not _is_batch(data) and not any(map(_is_batch, data))
    if calib is not None:
        if pair:
            raise ConfigError(
                f"{verb}: calibration data given twice, as calib= and in data=(calib, score); "
                "pass data=(calib, score) only"
            )
        return calib, data
    if pair:
        return data
    if data is None:
        raise DataError(
            f"{verb} needs data: pass data=(calib, score), the calibration data and the data to score "
            "on, or one dataset for both"
        )
    log.info(
        "%s: one dataset given as data=: calibrating on it and scoring on it too (pass data=(calib, score) "
        "to keep them apart)",
        verb,
    )
    return data, data


def _rank_by(rank_by: RankBy | str, has_sqnr: bool) -> RankBy:
    by = _coerce_enum("sensitivity", "rank_by", RankBy, rank_by)
    if by == RankBy.SQNR and not has_sqnr:
        raise ConfigError("rank_by='sqnr' needs the logits' SQNR, measured only with the default top-1 metric")
    return by


def _sensitivity(v: _Variants, ev: _Evaluator, mode: SensitivityMode) -> SensitivityReport:
    t0 = time.perf_counter()
    names = list(v.layers)
    with v.variant([]) as q:
        full, _ = ev.score(q)
    one = mode == SensitivityMode.ONE_AT_A_TIME
    if one:
        with v.variant(names) as q:
            ref, _ = ev.score(q)
    else:
        ref = full
    rows = []
    for name in bar(names, desc=f"sensitivity ({ev.name})", unit="layer"):
        with v.variant([n for n in names if n != name] if one else [name]) as q:
            m, sq = ev.score(q)
        d = v.layers[name]
        rows.append(
            LayerSensitivity(name, d["type"], d["params"], m, ev.float_metric - m, ref - m if one else m - ref, sq)
        )
        log.info("sensitivity %s: %s %.4f", name, ev.name, m)
    return SensitivityReport(
        mode.value, ev.name, len(ev.data), ev.float_metric, full, ref, tuple(rows), round(time.perf_counter() - t0, 3)
    )


_OLD_BUDGET_KWARGS = (
    "max_accuracy_drop",
    "mode",
    "sensitivity_samples",
    "rank_by",
    "search",
    "measure_latency",
    "latency_runs",
    "fallback",
)


def quantize_with_budget(
    model: nn.Module,
    config: BudgetConfig | None = None,
    *,
    data: Any = None,
    eval_data: Any = None,
    metric: Metric | None = None,
    sensitivity_report: SensitivityReport | None = None,
    calib: Any = None,
    **deprecated: Any,
) -> BudgetResult:
    """Quantize ``model`` keeping the fewest, most sensitive layers in float (or, with ``fallback="int8"`` and
    4-bit weights, at 8-bit weights) so the drop stays within budget.

    Layers are ranked by :func:`sensitivity` (or ``sensitivity_report``); candidates keep the ``k`` most
    sensitive in float (``QuantConfig.exclude``) and are scored on the score data against the float model. All
    candidates share one calibration (see the module docstring).

    Args:
        model: the float model (not modified).
        config: the :class:`BudgetConfig` (the budget, its ``quant`` :class:`QuantConfig` and the search settings);
            default ``BudgetConfig()``.
        data: ``(calib, score)``: the calibration data, as for :func:`quantize`, and the data the search scores
            candidates on (an ImageDataset for the default top-1 metric). One dataset given alone is used for both
            (logged); scoring on the calibration data flatters every candidate a little.
        eval_data: also score the float and the chosen model here (e.g. the full validation split).
        metric: ``metric(model, data) -> float``, higher is better; default top-1 accuracy.
        sensitivity_report: a ranking computed before (same model and ``quant`` config); skips the sensitivity pass.
        calib: deprecated alias of the first element of ``data``; warns.
        **deprecated: the earlier release's form, ``quantize_with_budget(model, QuantConfig(...), calib=...,
            data=..., max_accuracy_drop=..., mode=..., ...)``: ``config`` a :class:`QuantConfig` and the fields of
            :class:`BudgetConfig` as keywords. Still accepted for one release; warns with the new form.

    Returns:
        a :class:`BudgetResult`. When no candidate meets the budget, ``met`` is False and the model is the best
        candidate (the smallest drop, then the fewest float layers).

    Raises:
        ConfigError: a bad setting (naming the field), a config of another type, or a ``sensitivity_report`` of
            other layers.
        DataError: missing or empty data.
    """
    config = _budget_config(config, calib, deprecated)
    calib, data = _calib_and_score("quantize_with_budget", data, calib)
    max_accuracy_drop, search, fallback = config.max_accuracy_drop, config.search, config.fallback
    latency_runs, quant = config.latency_runs, config.quant
    rank_by = _rank_by(
        config.rank_by or (sensitivity_report.rank_by if sensitivity_report else RankBy.METRIC), metric is None
    )
    if eval_data is not None and len(eval_data) == 0:
        raise DataError("eval_data is empty: pass a non-empty dataset or None")
    t0 = time.perf_counter()
    ev = _Evaluator(model, data, metric, None)
    v = _Variants(model, quant, calib)
    if sensitivity_report is None:
        samples = config.sensitivity_samples
        sub = ev if samples is None else _Evaluator(model, data, metric, samples)
        sensitivity_report = _sensitivity(v, sub, config.mode)
    elif set(sensitivity_report.ranking) != set(v.layers):
        raise ConfigError(
            "sensitivity_report does not rank this model's quantized layers: "
            f"{sorted(set(sensitivity_report.ranking) ^ set(v.layers))[:5]} differ"
        )
    sensitivity_report = sensitivity_report.rerank(rank_by)
    order = sensitivity_report.ranking
    steps: dict[int, BudgetStep] = {}

    def split(kept: Sequence[str]) -> tuple[Sequence[str], Sequence[str]]:
        """The kept layers as (kept in float, kept at 8-bit weights), as the fallback says."""
        return ((), kept) if fallback == Fallback.INT8 else (kept, ())

    timing = tempfile.TemporaryDirectory(prefix="edgeslim-budget-") if config.measure_latency else None
    with timing or contextlib.nullcontext() as td:
        tmp = Path(td) if td else None
        float_ms = _latency(copy.deepcopy(model), data, tmp / "float.onnx", latency_runs)[0] if tmp else None

        def step(k: int) -> bool:
            if k not in steps:
                floats = order[:k]
                f, i8 = split(floats)
                with v.variant(f, i8) as q:
                    m, sq = ev.score(q)
                if k == 0:
                    noise["all quantized"] = ev.paired_noise()
                drop = ev.float_metric - m
                s = BudgetStep(
                    k,
                    floats,
                    sum(v.layers[n]["params"] for n in floats),
                    m,
                    drop,
                    drop <= max_accuracy_drop + 1e-12,
                    sq,
                )
                if tmp is not None:
                    ms, acc, err = _latency(v.build(f, i8), data, tmp / f"k{k}.onnx", latency_runs)
                    s = replace(s, latency_p50_ms=ms, accuracy_ort=acc, latency_error=err)
                log.info("budget step: %d layers in %s, %s %.4f, drop %.4f", k, fallback.value, ev.name, m, drop)
                steps[k] = s
            return steps[k].met

        noise: dict[str, float | None] = {}
        step(0)
        two_se = noise.get("all quantized")
        if two_se is not None and max_accuracy_drop < two_se:
            log.warning(
                "max_accuracy_drop=%g is below the sampling noise of the %d search samples (2 standard errors "
                "of the paired top-1 difference: %.4f): the search cannot tell such drops apart; pass more "
                "data= samples, and check the result on eval_data",
                max_accuracy_drop,
                len(ev.data),
                two_se,
            )
        n = len(order)
        if search == BudgetSearch.GREEDY:
            for k in range(n + 1):
                if step(k):
                    break
        elif not step(0):
            lo, hi = 0, 1
            while not step(min(hi, n)) and hi < n:
                lo, hi = hi, hi * 2
            hi = min(hi, n)
            while steps[hi].met and hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if step(mid) else (mid, hi)
    done = list(steps.values())
    met = [s for s in done if s.met]
    best = min(met, key=lambda s: s.n_float) if met else min(done, key=lambda s: (s.drop, s.n_float))
    chosen = v.build(*split(best.kept_float))
    evald = None
    if eval_data is not None:
        fin = _Evaluator(model, eval_data, metric, None)
        m, _ = fin.score(chosen)
        evald = {"samples": len(eval_data), "float_metric": fin.float_metric, "metric": m, "drop": fin.float_metric - m}
    if not met:
        log.warning(
            "no candidate meets max_accuracy_drop=%g; returning the best (%d layers in %s, drop %.4f)",
            max_accuracy_drop,
            best.n_float,
            fallback.value,
            best.drop,
        )
    return BudgetResult(
        chosen,
        bool(met),
        float(max_accuracy_drop),
        ev.float_metric,
        best.metric,
        best.drop,
        best.kept_float,
        tuple(done),
        sensitivity_report,
        evald,
        float_ms,
        round(time.perf_counter() - t0, 3),
        noise_2se=two_se,
        fallback=fallback.value,
    )


def _latency(model: nn.Module, data: Any, path: Path, runs: int) -> tuple[float | None, float | None, str | None]:
    """Export to ONNX at ``path`` and measure p50 latency (1 thread, batch 1) and top-1 in ONNX Runtime."""
    from edgeslim.export import export
    from edgeslim.runtime import measure

    try:
        art = export(model, "onnx", example_inputs=data, path=path)
        m = measure(art, data=data, runtime="onnxruntime", threads=(1,), runs=runs, peak_memory=False)
        return m["latency_p50_ms@t1b1"], m.get("accuracy"), None
    except EdgeslimError as e:  # a failed export or run is recorded, not fatal to the search
        log.warning("latency of %s not measured: %s", path.name, e)
        return None, None, f"{type(e).__name__}: {e}"
