"""The search space of :func:`edgeslim.optimize`: which chains of the existing verbs are tried.

A candidate is ``[residual blocks removed] [channel prune] [low-rank factorization] [(+ BatchNorm recalibration)
(+ recovery: fine-tune or distillation from the input model)] [weight clustering] -> [INT8 PTQ (per-channel/
per-tensor, CLE, bias correction, mixed precision) | FP16 | FP32] -> ONNX -> deployment (runtime, threads)``. Every
dimension is a tuple of choices (a one-choice tuple fixes it); dimensions that do not apply are left out of a trial
(no pruning or factorization: no recovery; no quantization: no calibration method; clustering: no CLE), so every
distinct candidate has one canonical parameter dict.

The step order follows :data:`edgeslim.core.recipe.FORBIDDEN`: factorization after pruning (pruning cannot slice
the low-rank pairs' shared rank meaningfully, and the recovery then trains the factorized model), clustering after
every step that rewrites layers (factorizing or pruning a clustered layer undoes its codebook) and before
quantization, which comes last.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from typing import Any

from edgeslim.core.config import Config

log = logging.getLogger(__name__)

#: the canonical parameter names, in the order steps run
PARAMS = (
    "drop_blocks",
    "target_macs",
    "prune_scope",
    "keep_early",
    "factorize",
    "recalibrate_bn",
    "finetune_steps",
    "recovery",
    "cluster",
    "quantize",
    "per_channel",
    "calibration",
    "equalize",
    "bias_correction",
    "mixed_precision",
    "fp16",
    "runtime",
    "threads",
)
CHANNEL_PARAMS = ("prune_scope", "keep_early")  # apply to channel pruning only
RESTRUCTURE_PARAMS = ("recalibrate_bn", "finetune_steps")  # apply after any pruning or factorization
QUANT_PARAMS = ("per_channel", "calibration", "equalize", "bias_correction", "mixed_precision")
RECOVERIES = ("finetune", "distill")
SCOPES = ("layer", "global")
FACTORIZE_METHODS = ("svd", "spatial_svd")
#: a layer is clustered only when it holds at least this many weights per cluster (smaller layers stay dense, said
#: in the step record: a codebook of k values for fewer than 4k weights saves little and k-means may not find k)
CLUSTER_MIN_WEIGHTS_PER_CLUSTER = 4
_DIMS = {
    "drop_blocks": "drop_blocks",
    "target_macs": "target_macs",
    "prune_scope": "prune_scope",
    "keep_early": "keep_early_layers",
    "factorize": "factorize",
    "recalibrate_bn": "recalibrate_bn",
    "finetune_steps": "finetune_steps",
    "recovery": "recovery",
    "cluster": "cluster",
    "quantize": "quantize",
    "per_channel": "per_channel",
    "calibration": "calibration",
    "equalize": "equalize",
    "bias_correction": "bias_correction",
    "mixed_precision": "mixed_precision",
    "fp16": "fp16",
    "runtime": "runtimes",
    "threads": "threads",
}
#: the pruning depth the ``finetune_steps`` choices are given at (see :func:`recovery_steps`)
STEPS_AT_MACS = 0.5


def recovery_steps(space: Space, params: dict[str, Any]) -> int:
    """The recovery steps of a pruned candidate: its ``finetune_steps`` choice, given at 50 % of the MACs removed,
    scaled linearly with the pruning depth when ``space.scale_steps`` (300 at 50 % -> 450 at 75 %, 180 at 30 %)."""
    n = params.get("finetune_steps") or 0
    if not n or not restructured(params):
        return 0
    if not space.scale_steps or not params.get("target_macs"):  # blocks removed / factorized: the choice as given
        return int(n)
    return max(1, math.ceil(n * params["target_macs"] / STEPS_AT_MACS))


def pruned(params: dict[str, Any]) -> bool:
    """Whether a candidate removes anything (channels or residual blocks)."""
    return bool(params.get("target_macs")) or bool(params.get("drop_blocks"))


def restructured(params: dict[str, Any]) -> bool:
    """Whether a candidate changes the model's layers (pruning or low-rank factorization): what recovery follows."""
    return pruned(params) or bool(params.get("factorize"))


@dataclass(frozen=True)
class Space(Config):
    """What :func:`edgeslim.optimize` searches, and how much each trial may spend.

    Attributes:
        drop_blocks: depth-pruning choices: how many residual blocks are removed (``PruneConfig(method="block")``,
            the blocks whose removal changes the output least, before any channel pruning; 0 = none). Choices
            above the model's count of removable blocks are dropped from the search (and said so); a model
            without residual blocks searches 0 only. On small inputs, where a runtime's per-kernel cost dominates,
            removing blocks buys speed that channel pruning cannot.
        target_macs: channel-pruning choices: the fraction of multiply-accumulates removed (0 = no pruning).
        prune_scope: channel ranking choices: ``layer`` (every layer loses the same share of its channels) or
            ``global`` (channels ranked across layers, each layer capped at 90 %); both searched to ``target_macs``.
        keep_early_layers: choices for leaving the early layers whole (small, launch-bound layers where pruning
            buys little time and costs accuracy).
        early_layers: module-name globs of the early layers; empty = the first quarter of the convolutions.
        importance: the channel criterion (``edgeslim.prune`` registry: l1, l2, bn_scale, fpgm, ...).
        round_to: kept channel counts are multiples of this (SIMD-friendly widths).
        recalibrate_bn: choices for re-estimating BatchNorm statistics after pruning (and again after the
            factorization, when there is one).
        bn_samples: training images the BatchNorm statistics are re-estimated on.
        finetune_steps: recovery step-budget choices after pruning, in optimizer steps at 50 % of the MACs
            removed (0 = no recovery); with ``scale_steps`` a candidate gets them scaled linearly with its pruning
            depth (:func:`recovery_steps`).
        scale_steps: scale the recovery steps with the pruning depth (deeper pruning, longer recovery).
        factorize: low-rank factorization choices, after pruning and before the recovery (which then trains the
            factorized model): the fraction of MACs removed from every layer ``factorize_method`` applies to
            (``edgeslim.factorize`` with ``mac_ratio = 1 - choice``: each Linear / non-grouped Conv2d becomes two
            layers of the largest rank within that share of its MACs; depthwise and grouped convolutions stay as
            they are, so the model's MACs fall by less; the step records both counts). 0 = none. Fewer MACs is
            not less time: the latency of every candidate is measured, and a factorization that makes the runtime
            slower (two kernels launched instead of one) shows as slower.
        factorize_method: ``svd`` (channel decomposition: kxk conv -> kxk conv to rank r + 1x1; Linear -> two
            Linear) or ``spatial_svd`` (kxk conv -> kx1 then 1xk; other layers left as they are).
        recovery: how a pruned or factorized candidate recovers: ``finetune`` (cross-entropy on the labels) or ``distill``
            (``edgeslim.distill`` from the input model: logit KD at temperature 4 + cross-entropy).
        cluster: weight-clustering choices, after the recovery and before quantization: centroids per layer
            (``edgeslim.cluster``, k-means, a codebook per Linear/Conv layer with at least
            ``CLUSTER_MIN_WEIGHTS_PER_CLUSTER * k`` weights; no fine-tune of the centroids). 0 = none. Clustering
            changes neither MACs nor latency nor the file's bytes: every weight is still stored in full (an INT8
            file holds at most k distinct int8 values per output channel, BatchNorm folding included). It buys
            the compressed size only (``size_zipped_mb``, limited by ``Budget.max_zipped_size_mb``). CLE is not
            searched with clustering: equalization rescales input channels and so multiplies the distinct values
            per output channel.
        finetune_lr: peak learning rate of the recovery (SGD, cosine decay).
        finetune_batch_size: batch size of the recovery.
        recovery_processes: processes a trial's recovery runs in. 1: in the trial's own process. N > 1: as
            ``torchrun`` DDP processes (gloo, CPU; each with ``Budget.threads // N`` threads, at least 1), every
            global batch of ``finetune_batch_size`` split across them; the deadline still stops it within a step.
            DDP results are close to, not bit-identical with, one process's (BatchNorm sees each rank's shard), so
            they are cached apart. The input model is pickled for the processes: its class must be importable.
        finetune_gate: multi-fidelity, absolute rule: a pruned candidate whose BatchNorm-recalibrated accuracy
            (torch, search subset) is more than this fraction below the input model's is not recovered (the
            trial is recorded as gated). None: off. The default only gates models left near chance: deep pruning
            is often near chance before recovery (MobileNetV2 on Fashion-MNIST at 75 % MACs removed: 14-15 %
            after recalibration, from 93 %), so the relative rule does the ranking.
        gate_margin: multi-fidelity, relative rule (EagleEye: recalibrated accuracy ranks pruned candidates as
            recovery will): a pruned candidate whose recalibrated accuracy is more than this fraction below the
            best recalibrated accuracy recorded in the study at the same pruning depth is not recovered (gated).
            None: off.
        quantize: choices for INT8 post-training quantization.
        per_channel: choices for per-channel (else per-tensor) weight scales.
        calibration: activation-range methods tried (``edgeslim.quantize.CALIBRATORS``).
        equalize: choices for cross-layer equalization (CLE) before quantization.
        bias_correction: choices for bias correction after quantization.
        mixed_precision: choices for INT8 with the most sensitive layers kept float
            (``edgeslim.quantize.quantize_with_budget``) under the accuracy budget left after pruning and recovery
            (needs ``Budget.max_accuracy_drop``); False: every supported layer INT8.
        fp16: choices for FP16 weights and activations when not quantized to INT8 (on x86 CPUs FP16 usually runs
            slower than FP32: measured, never assumed).
        runtimes: deployment choices: runtimes the candidate's ONNX file is measured and chosen on (``onnxruntime``,
            ``openvino``, ...); empty: the budget's runtime only. Speedups stay relative to the FP32 file on the
            budget's runtime.
        threads: deployment choices: intra-op thread counts (each at most ``Budget.threads``, the cores the
            deployment may use); empty: the budget's threads only.
        calib_samples: calibration images (class-balanced, from the training split).
        quant_placement: ``all`` or ``measured`` (``QuantConfig.placement``): with ``measured``, each INT8
            candidate keeps float the layers whose integer kernel ONNX Runtime runs slower on this host at the
            deployment's threads (the ONNX capture; used only when the budget's target is ``host`` and its runtime
            ``onnxruntime``, else ``all``). Default for detectors.
        cheap_trials: PTQ-only candidates queued first (no training; seconds each), before the sampler's.
        probe_structures: latency first: after the cheap trials, every pruning structure (``drop_blocks`` x
            ``target_macs`` x early layers kept or not, with the first scope choice) is queued without recovery, INT8
            per-tensor (+ CLE when searched): seconds each. Latency, size and memory do not depend on the recovery,
            so a structure the budget's latency (or size) rules out never gets trained; needs 0 among
            ``finetune_steps``.
        sweep: multi-fidelity across the latency range: once every probe has finished, up to this many probed
            structures are queued with the smallest recovery (the smallest non-zero ``finetune_steps`` choice, the
            first ``recovery`` choice), exempt from the multi-fidelity gates: the probes' front first (structures
            no other probe beats on both recalibrated accuracy and measured latency), then the next front, each
            thinned evenly over latency when it has more than the places left; those meeting every limit but
            accuracy run first. The first minutes of a run so give a front of recovered candidates from the
            slowest to the fastest structure (not one point at the budget's edge), and promotion ranks structures
            by recovered accuracy rather than by recalibrated accuracy alone. 0: off.
        promote: how many probed structures that meet every limit but accuracy are then queued with the largest
            recovery (the largest ``finetune_steps`` choice, or longer in a timed run: ``promote_time_share``; the
            first ``recovery`` choice), after the sweep: best
            swept accuracy first, then best recalibrated accuracy (the structures pruning hurt least recover best),
            exempt from the multi-fidelity gates (they were chosen for their measured speed: their recovery is
            the point); the sampler goes on after them.
        promote_front: after the ``promote`` picks, also queue with the largest recovery every swept structure on
            the sweep's front (swept accuracy vs measured latency: no other swept structure is both more accurate
            and faster), fastest first: the front the report plots then holds fully recovered candidates across
            the latency range, not short-recovery ones dominated by the budget's picks.
        requantize: after each promoted structure, queue the same recovered model (from the cache: seconds)
            quantized with the settings of the most accurate PTQ-only trial (e.g. per-channel, MSE ranges, bias
            correction), when they differ from the probes' fast INT8, and (when ``quantize`` has False) left in
            float: points a little slower and more accurate on the front; the first is often the most accurate
            candidate that still meets a speed limit.
        promote_time_share: in a run with ``max_minutes``, the share of the time left when the promoted rung is
            queued that the recoveries of the budget's ``promote`` picks are sized to fill, each the same part
            (the front's picks keep the largest choice): a structure's recovery steps follow its swept trial's
            measured seconds per step (and the trial's other costs), never fewer than the largest
            ``finetune_steps`` choice nor more than 10 times it (rounded down to 100 steps). A model that trains
            fast, or a long run, so gets a long recovery for the candidates the budget is judged on, where a slow
            one keeps the largest choice. 0, or a run without ``max_minutes`` (it has no time to size by): the
            largest choice.
        search_samples: validation images accuracy is measured on during the search (a seeded subset; the
            chosen candidate is re-measured on the whole validation split).
        latency_runs: timed runs per latency measurement (after 10 warm-up runs; the median is used).
    """

    kind = "search_space"
    drop_blocks: tuple[int, ...] = (0, 3, 6, 9)
    target_macs: tuple[float, ...] = (0.0, 0.35, 0.5, 0.65, 0.75, 0.85, 0.9)
    prune_scope: tuple[str, ...] = ("layer", "global")
    keep_early_layers: tuple[bool, ...] = (True, False)
    early_layers: tuple[str, ...] = ()
    importance: str = "l1"
    round_to: int = 8
    recalibrate_bn: tuple[bool, ...] = (True,)
    bn_samples: int = 1024
    finetune_steps: tuple[int, ...] = (0, 300, 1000)
    scale_steps: bool = True
    factorize: tuple[float, ...] = (0.0,)
    factorize_method: str = "svd"
    recovery: tuple[str, ...] = ("finetune", "distill")
    cluster: tuple[int, ...] = (0,)
    finetune_lr: float = 0.01
    finetune_batch_size: int = 64
    recovery_processes: int = 1
    finetune_gate: float | None = 0.8
    gate_margin: float | None = 0.05
    quantize: tuple[bool, ...] = (True, False)
    per_channel: tuple[bool, ...] = (True, False)
    calibration: tuple[str, ...] = ("minmax", "percentile", "mse")
    equalize: tuple[bool, ...] = (False, True)
    bias_correction: tuple[bool, ...] = (False, True)
    mixed_precision: tuple[bool, ...] = (False,)
    fp16: tuple[bool, ...] = (False,)
    runtimes: tuple[str, ...] = ()
    threads: tuple[int, ...] = ()
    calib_samples: int = 512
    quant_placement: str = "all"
    cheap_trials: int = 4
    probe_structures: bool = True
    sweep: int = 8
    promote: int = 3
    promote_front: bool = True
    requantize: bool = True
    promote_time_share: float = 0.5
    search_samples: int = 2000
    latency_runs: int = 50

    def validate(self) -> None:
        from edgeslim.prune._importance import IMPORTANCE
        from edgeslim.quantize._calibrate import CALIBRATORS

        for f in (
            "keep_early_layers",
            "recalibrate_bn",
            "quantize",
            "per_channel",
            "equalize",
            "bias_correction",
            "mixed_precision",
            "fp16",
        ):
            v = getattr(self, f)
            if not isinstance(v, tuple) or not v or not all(isinstance(x, bool) for x in v) or len(set(v)) != len(v):
                raise self._bad(f, "must be a non-empty list of distinct booleans (true/false), e.g. [true, false]")
        if (
            not isinstance(self.drop_blocks, tuple)
            or not self.drop_blocks
            or len(set(self.drop_blocks)) != len(self.drop_blocks)
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in self.drop_blocks)
        ):
            raise self._bad("drop_blocks", "must be distinct integers >= 0 (residual blocks removed; 0 = none)")
        if self.quant_placement not in ("all", "measured"):
            raise self._bad("quant_placement", "one of: all, measured")
        if (
            not self.target_macs
            or len(set(self.target_macs)) != len(self.target_macs)
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < 1 for x in self.target_macs)
        ):
            raise self._bad("target_macs", "must be distinct fractions in [0, 1) (0 = no pruning), e.g. [0, 0.3]")
        if (
            not isinstance(self.factorize, tuple)
            or not self.factorize
            or len(set(self.factorize)) != len(self.factorize)
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < 1 for x in self.factorize)
        ):
            raise self._bad(
                "factorize",
                "must be distinct fractions in [0, 1) of MACs removed by factorization (0 = none), e.g. [0, 0.3]",
            )
        if self.factorize_method not in FACTORIZE_METHODS:
            raise self._bad("factorize_method", f"must be one of: {', '.join(FACTORIZE_METHODS)}")
        if (
            not isinstance(self.cluster, tuple)
            or not self.cluster
            or len(set(self.cluster)) != len(self.cluster)
            or not all(
                isinstance(x, int) and not isinstance(x, bool) and (x == 0 or 2 <= x <= 256) for x in self.cluster
            )
        ):
            raise self._bad(
                "cluster", "must be distinct integers, 0 (no clustering) or 2..256 clusters per layer, e.g. [0, 16]"
            )
        if (
            not self.finetune_steps
            or len(set(self.finetune_steps)) != len(self.finetune_steps)
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in self.finetune_steps)
        ):
            raise self._bad("finetune_steps", "must be distinct integers >= 0 (0 = no fine-tune), e.g. [0, 300]")
        for f, allowed in (("prune_scope", SCOPES), ("recovery", RECOVERIES)):
            v = getattr(self, f)
            if not isinstance(v, tuple) or not v or len(set(v)) != len(v) or not all(x in allowed for x in v):
                raise self._bad(f, f"must be a non-empty list of distinct names from: {', '.join(allowed)}")
        if not isinstance(self.runtimes, tuple) or len(set(self.runtimes)) != len(self.runtimes):
            raise self._bad("runtimes", "must be distinct runtime names (empty: the budget's runtime)")
        for rt in self.runtimes:
            _check_runtime(self, rt)
        if (
            not isinstance(self.threads, tuple)
            or len(set(self.threads)) != len(self.threads)
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in self.threads)
        ):
            raise self._bad("threads", "must be distinct integers >= 1 (empty: the budget's threads)")
        if not self.calibration or len(set(self.calibration)) != len(self.calibration):
            raise self._bad("calibration", f"must be distinct names from: {', '.join(CALIBRATORS.names())}")
        for c in self.calibration:
            CALIBRATORS.get(c)  # raises, listing the valid names
        if self.importance not in IMPORTANCE:
            IMPORTANCE.get(self.importance)
        if self.importance == "taylor":
            raise self._bad("importance", "taylor needs gradients per trial; use l1, l2, bn_scale or fpgm")
        if not all(isinstance(e, str) and e for e in self.early_layers):
            raise self._bad("early_layers", "must be non-empty module-name globs")
        for f, lo in (
            ("round_to", 1),
            ("bn_samples", 1),
            ("finetune_batch_size", 1),
            ("recovery_processes", 1),
            ("calib_samples", 1),
            ("cheap_trials", 0),
            ("sweep", 0),
            ("promote", 0),
            ("search_samples", 1),
            ("latency_runs", 1),
        ):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise self._bad(f, f"must be an integer >= {lo}")
        if self.recovery_processes > self.finetune_batch_size:
            raise self._bad(
                "recovery_processes",
                f"must be at most finetune_batch_size={self.finetune_batch_size} (each process trains a share of "
                "every batch)",
            )
        for f in ("finetune_gate", "gate_margin"):
            v = getattr(self, f)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1):
                raise self._bad(f, "must be a fraction in [0, 1] (0.3 = 30 points) or None (off)")
        if not isinstance(self.probe_structures, bool):
            raise self._bad("probe_structures", "must be true or false")
        for f in ("promote_front", "requantize"):
            if not isinstance(getattr(self, f), bool):
                raise self._bad(f, "must be true or false")
        v = self.promote_time_share
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 0.9:
            raise self._bad("promote_time_share", "must be a fraction in [0, 0.9] of the time left (0 = off)")
        if not isinstance(self.scale_steps, bool):
            raise self._bad("scale_steps", "must be true or false")
        if (
            isinstance(self.finetune_lr, bool)
            or not isinstance(self.finetune_lr, (int, float))
            or not 0 < self.finetune_lr < 10
        ):
            raise self._bad("finetune_lr", "must be a number in (0, 10)")

    # ------------------------------------------------------------------------------------------ params
    @classmethod
    def for_detection(cls, **overrides: Any) -> Space:
        """The default space for detectors (what ``optimize`` searches for one when no space is given): channel
        pruning up to 60% of the MACs (per-layer ranking, early layers kept or not) with BatchNorm recalibration,
        a sweep of 4 structures and 2 promoted ones (a detector's recovery step costs ~0.35 s on 2 CPU cores at
        160x160, 10-100x a small classifier's), recovery by ``train_detector`` (AdamW, peak
        learning rate 1e-3, batch 16) or by distillation from the input detector (score + box KD), INT8 PTQ (the
        ONNX capture with its head rules and host-measured placement: per-channel or not, min-max / percentile /
        MSE ranges) or FP32;
        accuracy is mAP@[.5:.95] on a 300-image search subset. Not searched for detectors: block removal, mixed
        precision, CLE and bias correction (see :func:`edgeslim.pipeline._task.check_space`)."""
        base = cls(
            drop_blocks=(0,),
            target_macs=(0.0, 0.3, 0.4, 0.5, 0.6),
            prune_scope=("layer",),
            sweep=4,
            promote=2,
            finetune_steps=(0, 300, 1000),
            finetune_lr=1e-3,
            finetune_batch_size=16,
            bn_samples=512,
            equalize=(False,),
            bias_correction=(True,),
            mixed_precision=(False,),
            calib_samples=256,
            quant_placement="measured",
            search_samples=300,
        )
        return base.replace(**overrides) if overrides else base

    def choices(self, name: str) -> tuple[Any, ...]:
        """The choices of dimension ``name``; ``(None,)`` for a deployment dimension left to the budget."""
        return tuple(getattr(self, _DIMS[name])) or (None,)

    @staticmethod
    def active(name: str, params: dict[str, Any]) -> bool:
        """Whether dimension ``name`` applies given the earlier choices in ``params``."""
        if name in CHANNEL_PARAMS:
            return bool(params.get("target_macs"))
        if name in RESTRUCTURE_PARAMS:
            return restructured(params)
        if name == "recovery":
            return restructured(params) and bool(params.get("finetune_steps"))
        if name == "equalize":  # CLE rescales input channels: it would multiply a clustered layer's distinct values
            return bool(params.get("quantize")) and not params.get("cluster")
        if name in QUANT_PARAMS:
            return bool(params.get("quantize"))
        if name == "fp16":
            return not params.get("quantize")
        return True

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Draw one candidate's parameters from an Optuna trial; returns the canonical dict."""
        params: dict[str, Any] = {}
        for name in PARAMS:
            if not self.active(name, params):
                continue
            ch = self.choices(name)
            params[name] = (
                ch[0] if len(ch) == 1 and name not in trial.params else trial.suggest_categorical(name, list(ch))
            )
        return self.canonical(params)

    def canonical(self, params: dict[str, Any]) -> dict[str, Any]:
        """All of :data:`PARAMS` in order, inactive ones ``None``, values normalised (``0.2`` not ``0.20000001``)."""
        out: dict[str, Any] = {}
        for name in PARAMS:
            if not self.active(name, out):
                out[name] = None
                continue
            v = params.get(name, self.choices(name)[0])
            out[name] = float(v) if name in ("target_macs", "factorize") else v
        return out

    def optuna_params(self, canonical: dict[str, Any]) -> dict[str, Any]:
        """The parameters Optuna sees for a canonical dict (active, multi-choice dimensions only)."""
        return {k: v for k, v in canonical.items() if v is not None and len(self.choices(k)) > 1}

    def all_candidates(self) -> list[dict[str, Any]]:
        """Every distinct canonical candidate (the search space is finite)."""
        out: dict[str, dict[str, Any]] = {}
        names = list(PARAMS)
        for combo in itertools.product(*(self.choices(n) for n in names)):
            c = self.canonical(dict(zip(names, combo, strict=True)))
            out[repr(c)] = c
        return list(out.values())

    def cheap(self) -> list[dict[str, Any]]:
        """Up to ``cheap_trials`` PTQ-only candidates (no pruning, factorization or clustering, INT8), spread over the
        quantization choices."""
        if (
            0 not in self.target_macs
            or 0 not in self.drop_blocks
            or 0 not in self.factorize
            or 0 not in self.cluster
            or True not in self.quantize
            or not self.cheap_trials
        ):
            return []
        combos = list(itertools.product(self.per_channel, self.calibration, self.equalize, self.bias_correction))
        k = min(self.cheap_trials, len(combos))
        picks = [round(i * (len(combos) - 1) / max(k - 1, 1)) for i in range(k)] if k > 1 else [0]
        return [
            self.canonical(
                {
                    "drop_blocks": 0,
                    "target_macs": 0.0,
                    "factorize": 0.0,
                    "cluster": 0,
                    "quantize": True,
                    "per_channel": pc,
                    "calibration": cal,
                    "equalize": eq,
                    "bias_correction": bc,
                }
            )
            for pc, cal, eq, bc in (combos[i] for i in dict.fromkeys(picks))
        ]

    def probes(self) -> list[dict[str, Any]]:
        """The structure probes (see ``probe_structures``): every pruned or factorized structure, no recovery, no
        clustering (when the space has that choice: it changes no latency), fast INT8."""
        if not self.probe_structures or 0 not in self.finetune_steps:
            return []
        quant = (
            {
                "quantize": True,
                "per_channel": False if False in self.per_channel else self.per_channel[0],
                "equalize": True in self.equalize,
            }
            if True in self.quantize
            else {"quantize": False}
        )
        out = []
        k = 0 if 0 in self.cluster else self.cluster[0]
        for b, t, f in itertools.product(self.drop_blocks, self.target_macs, self.factorize):
            if not (b or t or f):
                continue
            # with channel pruning, each early-layer choice is its own structure: keeping the early layers whole
            # puts the MAC cut elsewhere (often faster at the same MACs) but can make a deep target unreachable
            for early in self.keep_early_layers if t else (None,):
                p = {"drop_blocks": b, "target_macs": t, "factorize": f, "finetune_steps": 0, "cluster": k, **quant}
                out.append(self.canonical({**p, "keep_early": early} if early is not None else p))
        return out

    def swept(self, probe: dict[str, Any]) -> dict[str, Any] | None:
        """A probed structure with the smallest recovery the space allows (see ``sweep``); None without recovery."""
        steps = [n for n in self.finetune_steps if n]
        if not steps:
            return None
        return self.canonical({**probe, "finetune_steps": min(steps), "recovery": self.recovery[0]})

    def promoted(self, probe: dict[str, Any]) -> dict[str, Any]:
        """A probed structure with the largest recovery the space allows (see ``promote``; a timed run sizes it
        on the queued trial: ``promote_time_share``)."""
        return self.canonical({**probe, "finetune_steps": max(self.finetune_steps), "recovery": self.recovery[0]})


#: named spaces for the CLI's ``--space NAME`` (a YAML file otherwise)
PRESETS: dict[str, dict[str, Any]] = {
    # INT8 PTQ variants only (per-channel x calibration x CLE x bias correction): no pruning, no training
    "ptq": {"drop_blocks": (0,), "target_macs": (0.0,), "quantize": (True,)},
    # the default space plus low-rank factorization, weight clustering, mixed precision, FP16 and ONNX Runtime vs
    # OpenVINO (those installed here)
    "full": {
        "factorize": (0.0, 0.3),
        "cluster": (0, 16),
        "mixed_precision": (False, True),
        "fp16": (False, True),
        "runtimes": ("onnxruntime", "openvino"),
    },
}


def space_from(name_or_yaml: str) -> Space:
    """A preset (``ptq``) by name, else a Space YAML file."""
    from pathlib import Path

    from edgeslim.core.errors import ConfigError

    if name_or_yaml in PRESETS:
        kw = dict(PRESETS[name_or_yaml])
        if "runtimes" in kw:  # a preset names the runtimes worth trying; only those installed here are searched
            from edgeslim.runtime import missing

            kw["runtimes"] = tuple(r for r in kw["runtimes"] if not missing(r))
            gone = set(PRESETS[name_or_yaml]["runtimes"]) - set(kw["runtimes"])
            if gone:
                log.warning("space %s: runtime(s) %s not installed here, not searched", name_or_yaml, sorted(gone))
        return Space(**kw)
    if not Path(name_or_yaml).exists():
        raise ConfigError(f"space {name_or_yaml!r} is neither a YAML file nor a preset (presets: {', '.join(PRESETS)})")
    return Space.from_yaml(Path(name_or_yaml))


def _check_runtime(space: Space, name: str) -> None:
    from edgeslim.core.errors import near
    from edgeslim.runtime import RUNTIMES, missing

    onnx_runtimes = [n for n in RUNTIMES.names() if "onnx" in RUNTIMES.get(n).formats]
    if name not in onnx_runtimes:
        raise space._bad(
            "runtimes",
            f"has {name!r}{near(str(name), onnx_runtimes)}; optimize deploys ONNX files, valid: "
            f"{', '.join(onnx_runtimes)}",
        )
    how = missing(name)
    if how:
        raise space._bad("runtimes", f"has {name!r}, which is not installed here; install it with: {how}")


def describe(params: dict[str, Any], space: Space | None = None) -> str:
    """A candidate in words, e.g. ``prune 50% MACs (global, early kept, BN recal, distill 300 steps) + INT8
    per-channel mse + CLE on openvino, 1 thread`` or ``prune 30% MACs (BN recal) + factorize 30% MACs (svd,
    finetune 180 steps) + cluster 16 values/layer + INT8 ...`` (with ``space``, the recovery steps are the scaled
    count)."""
    parts = []
    steps = recovery_steps(space, params) if space is not None else params.get("finetune_steps")
    rec = params.get("recovery") or "finetune"
    recal = ["BN recal"] if params.get("recalibrate_bn") else []
    trained = [(f"{rec} {steps} steps" if space is not None else f"{rec} {steps} steps at 50%")] if steps else []
    # the recovery is said with the last step that changes the layers (BatchNorm recalibration with the pruning)
    last = "factorize" if params.get("factorize") else "target_macs" if params.get("target_macs") else "drop_blocks"
    if params.get("drop_blocks"):
        n = params["drop_blocks"]
        extra = [*recal, *(trained if last == "drop_blocks" else [])] if not params.get("target_macs") else []
        parts.append(f"drop {n} residual block{'s' if n != 1 else ''}" + (f" ({', '.join(extra)})" if extra else ""))
    if params.get("target_macs"):
        extra = [
            x
            for x in (
                "global" if params.get("prune_scope") == "global" else "",
                "early kept" if params.get("keep_early") else "",
                *recal,
                *(trained if last == "target_macs" else []),
            )
            if x
        ]
        parts.append(f"prune {100 * params['target_macs']:.0f}% MACs" + (f" ({', '.join(extra)})" if extra else ""))
    if params.get("factorize"):
        method = space.factorize_method if space is not None else "svd"
        parts.append(f"factorize {100 * params['factorize']:.0f}% MACs ({', '.join([method, *recal, *trained])})")
    if params.get("cluster"):
        parts.append(f"cluster {params['cluster']} values/layer")
    if params.get("quantize"):
        extra = [
            x
            for x in (
                "CLE" if params.get("equalize") else "",
                "bias corr" if params.get("bias_correction") else "",
                "mixed precision" if params.get("mixed_precision") else "",
            )
            if x
        ]
        parts.append(
            f"INT8 {'per-channel' if params.get('per_channel') else 'per-tensor'} {params.get('calibration')}"
            + (f" + {' + '.join(extra)}" if extra else "")
        )
    elif params.get("fp16"):
        parts.append("FP16")
    text = " + ".join(parts) or "FP32 (unchanged)"
    deploy = [
        x
        for x in (
            f"on {params['runtime']}" if params.get("runtime") else "",
            f"{params['threads']} thread{'s' if params['threads'] != 1 else ''}" if params.get("threads") else "",
        )
        if x
    ]
    return text + (" " + ", ".join(deploy) if deploy else "")
