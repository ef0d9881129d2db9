"""The search space of :func:`edgeslim.optimize`: which chains of the existing verbs are tried.

A candidate is ``[channel prune (+ BatchNorm recalibration) (+ recovery fine-tune)] -> [INT8 PTQ] -> ONNX``.
Every dimension is a tuple of choices (a one-choice tuple fixes it); dimensions that do not apply are left
out of a trial (no pruning: no fine-tune steps; no quantization: no calibration method), so every distinct
candidate has one canonical parameter dict.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from edgeslim.core.config import Config

#: the canonical parameter names, in the order steps run
PARAMS = (
    "target_macs",
    "keep_early",
    "recalibrate_bn",
    "finetune_steps",
    "quantize",
    "per_channel",
    "calibration",
    "equalize",
    "bias_correction",
)
PRUNE_PARAMS = ("keep_early", "recalibrate_bn", "finetune_steps")
QUANT_PARAMS = ("per_channel", "calibration", "equalize", "bias_correction")
_DIMS = {
    "target_macs": "target_macs",
    "keep_early": "keep_early_layers",
    "recalibrate_bn": "recalibrate_bn",
    "finetune_steps": "finetune_steps",
    "quantize": "quantize",
    "per_channel": "per_channel",
    "calibration": "calibration",
    "equalize": "equalize",
    "bias_correction": "bias_correction",
}


@dataclass(frozen=True)
class Space(Config):
    """What :func:`edgeslim.optimize` searches, and how much each trial may spend.

    Attributes:
        target_macs: channel-pruning choices: the fraction of multiply-accumulates removed (0 = no pruning).
        keep_early_layers: choices for leaving the early layers whole (small, launch-bound layers where pruning
            buys little time and costs accuracy).
        early_layers: module-name globs of the early layers; empty = the first quarter of the convolutions.
        importance: the channel criterion (``edgeslim.prune`` registry: l1, l2, bn_scale, fpgm, ...).
        round_to: kept channel counts are multiples of this (SIMD-friendly widths).
        recalibrate_bn: choices for re-estimating BatchNorm statistics after pruning.
        bn_samples: training images the BatchNorm statistics are re-estimated on.
        finetune_steps: recovery fine-tune choices after pruning, in optimizer steps (0 = none).
        finetune_lr: peak learning rate of the recovery fine-tune (SGD, cosine decay).
        finetune_batch_size: batch size of the recovery fine-tune.
        finetune_gate: multi-fidelity: a pruned candidate whose BatchNorm-recalibrated accuracy (torch, search
            subset) is more than this fraction below the input model's is not fine-tuned (the trial is recorded
            as gated); recalibrated accuracy ranks pruned candidates as fine-tuning will (EagleEye). None: off.
        quantize: choices for INT8 post-training quantization.
        per_channel: choices for per-channel (else per-tensor) weight scales.
        calibration: activation-range methods tried (``edgeslim.quantize.CALIBRATORS``).
        equalize: choices for cross-layer equalization (CLE) before quantization.
        bias_correction: choices for bias correction after quantization.
        calib_samples: calibration images (class-balanced, from the training split).
        cheap_trials: PTQ-only candidates queued first (no training; seconds each), before the sampler's.
        search_samples: validation images accuracy is measured on during the search (a seeded subset; the
            chosen candidate is re-measured on the whole validation split).
        latency_runs: timed runs per latency measurement (after 10 warm-up runs; the median is used).
    """

    kind = "search_space"
    target_macs: tuple[float, ...] = (0.0, 0.2, 0.35, 0.5)
    keep_early_layers: tuple[bool, ...] = (True, False)
    early_layers: tuple[str, ...] = ()
    importance: str = "l1"
    round_to: int = 8
    recalibrate_bn: tuple[bool, ...] = (True,)
    bn_samples: int = 1024
    finetune_steps: tuple[int, ...] = (0, 300)
    finetune_lr: float = 0.01
    finetune_batch_size: int = 64
    finetune_gate: float | None = 0.3
    quantize: tuple[bool, ...] = (True, False)
    per_channel: tuple[bool, ...] = (True, False)
    calibration: tuple[str, ...] = ("minmax", "percentile", "mse")
    equalize: tuple[bool, ...] = (False, True)
    bias_correction: tuple[bool, ...] = (False, True)
    calib_samples: int = 512
    cheap_trials: int = 4
    search_samples: int = 2000
    latency_runs: int = 50

    def validate(self) -> None:
        from edgeslim.prune._importance import IMPORTANCE
        from edgeslim.quantize._calibrate import CALIBRATORS

        for f in ("keep_early_layers", "recalibrate_bn", "quantize", "per_channel", "equalize", "bias_correction"):
            v = getattr(self, f)
            if not isinstance(v, tuple) or not v or not all(isinstance(x, bool) for x in v) or len(set(v)) != len(v):
                raise self._bad(f, "must be a non-empty list of distinct booleans (true/false), e.g. [true, false]")
        if (
            not self.target_macs
            or len(set(self.target_macs)) != len(self.target_macs)
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < 1 for x in self.target_macs)
        ):
            raise self._bad("target_macs", "must be distinct fractions in [0, 1) (0 = no pruning), e.g. [0, 0.3]")
        if (
            not self.finetune_steps
            or len(set(self.finetune_steps)) != len(self.finetune_steps)
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in self.finetune_steps)
        ):
            raise self._bad("finetune_steps", "must be distinct integers >= 0 (0 = no fine-tune), e.g. [0, 300]")
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
            ("calib_samples", 1),
            ("cheap_trials", 0),
            ("search_samples", 1),
            ("latency_runs", 1),
        ):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise self._bad(f, f"must be an integer >= {lo}")
        if self.finetune_gate is not None and (
            isinstance(self.finetune_gate, bool)
            or not isinstance(self.finetune_gate, (int, float))
            or not 0 <= self.finetune_gate <= 1
        ):
            raise self._bad("finetune_gate", "must be a fraction in [0, 1] (0.3 = 30 points) or None (off)")
        if (
            isinstance(self.finetune_lr, bool)
            or not isinstance(self.finetune_lr, (int, float))
            or not 0 < self.finetune_lr < 10
        ):
            raise self._bad("finetune_lr", "must be a number in (0, 10)")

    # ------------------------------------------------------------------------------------------ params
    def choices(self, name: str) -> tuple[Any, ...]:
        return tuple(getattr(self, _DIMS[name]))

    @staticmethod
    def active(name: str, params: dict[str, Any]) -> bool:
        """Whether dimension ``name`` applies given the earlier choices in ``params``."""
        if name in PRUNE_PARAMS:
            return bool(params.get("target_macs"))
        if name in QUANT_PARAMS:
            return bool(params.get("quantize"))
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
            out[name] = float(v) if name == "target_macs" else v
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
        """Up to ``cheap_trials`` PTQ-only candidates (no pruning, INT8), spread over the quantization choices."""
        if 0 not in self.target_macs or True not in self.quantize or not self.cheap_trials:
            return []
        combos = list(itertools.product(self.per_channel, self.calibration, self.equalize, self.bias_correction))
        k = min(self.cheap_trials, len(combos))
        picks = [round(i * (len(combos) - 1) / max(k - 1, 1)) for i in range(k)] if k > 1 else [0]
        return [
            self.canonical(
                {
                    "target_macs": 0.0,
                    "quantize": True,
                    "per_channel": pc,
                    "calibration": cal,
                    "equalize": eq,
                    "bias_correction": bc,
                }
            )
            for pc, cal, eq, bc in (combos[i] for i in dict.fromkeys(picks))
        ]


#: named spaces for the CLI's ``--space NAME`` (a YAML file otherwise)
PRESETS: dict[str, dict[str, Any]] = {
    # INT8 PTQ variants only (per-channel x calibration x CLE x bias correction): no pruning, no training
    "ptq": {"target_macs": (0.0,), "quantize": (True,)},
}


def space_from(name_or_yaml: str) -> Space:
    """A preset (``ptq``) by name, else a Space YAML file."""
    from pathlib import Path

    from edgeslim.core.errors import ConfigError

    if name_or_yaml in PRESETS:
        return Space(**PRESETS[name_or_yaml])
    if not Path(name_or_yaml).exists():
        raise ConfigError(f"space {name_or_yaml!r} is neither a YAML file nor a preset (presets: {', '.join(PRESETS)})")
    return Space.from_yaml(Path(name_or_yaml))


def describe(params: dict[str, Any]) -> str:
    """A candidate in words, e.g. ``prune 35% MACs (early kept, BN recal, 300 ft steps) + INT8 per-channel mse``."""
    parts = []
    if params.get("target_macs"):
        extra = [
            x
            for x in (
                "early kept" if params.get("keep_early") else "",
                "BN recal" if params.get("recalibrate_bn") else "",
                f"{params['finetune_steps']} ft steps" if params.get("finetune_steps") else "",
            )
            if x
        ]
        parts.append(f"prune {100 * params['target_macs']:.0f}% MACs" + (f" ({', '.join(extra)})" if extra else ""))
    if params.get("quantize"):
        extra = [
            x
            for x in ("CLE" if params.get("equalize") else "", "bias corr" if params.get("bias_correction") else "")
            if x
        ]
        parts.append(
            f"INT8 {'per-channel' if params.get('per_channel') else 'per-tensor'} {params.get('calibration')}"
            + (f" + {' + '.join(extra)}" if extra else "")
        )
    return " + ".join(parts) or "FP32 (unchanged)"
