"""The width-search config: one frozen dataclass, validated, round-tripping to YAML."""

from __future__ import annotations

from dataclasses import dataclass

from edgeslim.core.config import Config, StrEnum


class Searcher(StrEnum):
    """``netadapt``: greedy, one unit narrowed per step (NetAdapt). ``evolution``: NSGA-II over all units' widths
    at once (Optuna), every candidate repaired onto the budget; trials live in an Optuna storage, so the search
    resumes after an interruption and several workers can share it."""

    NETADAPT = "netadapt"
    EVOLUTION = "evolution"


@dataclass(frozen=True)
class NASConfig(Config):
    """How to search per-layer widths under a latency budget (NetAdapt's greedy search or NSGA-II).

    Attributes:
        searcher: ``netadapt`` (greedy steps) or ``evolution`` (NSGA-II via Optuna, resumable, several workers).
        latency_budget_ms: the latency the searched model must reach (ms, batch 1). Give this or ``latency_ratio``.
        latency_ratio: the budget as a fraction of the original model's latency (measured on ``runtime`` for
            ``device="host"``, predicted for a device profile). When neither is given: 0.25.
        runtime: the runtime the latency table is timed on (one that loads ONNX: ``onnxruntime``, ``openvino``).
        threads: intra-op threads of that runtime.
        device: ``host`` (measured here) or a device profile (``raspberry-pi-4`` ...): the host table scaled by
            the profile's roofline, every figure for it "predicted".
        round_to: kept widths are multiples of this (as in pruning).
        min_keep: no unit keeps fewer than this fraction of its channels.
        trials: evolution: candidates evaluated (BN-recalibrated accuracy and predicted latency) in the study.
        population: evolution: NSGA-II population size.
        steps: netadapt: greedy steps from the original latency to the budget (each removes an equal share).
        max_extra_steps: further steps when the final model, measured, is still over the budget.
        exclude: layer-name globs whose widths are kept (each must match a Conv/Linear layer).
        importance: channel criterion of ``edgeslim.prune`` (which channels a narrowed unit keeps).
        bn_samples: training inputs BatchNorm statistics are re-estimated on for every candidate.
        val_samples: validation samples each candidate is scored on.
        finetune_steps: training steps (one short epoch) after each greedy step; 0: none.
        finetune_lr: learning rate of that fine-tuning.
        grid_points: widths timed per unit in the latency table (interpolated between).
        fit_samples: sub-networks exported and timed to fit the predictor's ``a * sum + b``.
        rounds: interleaved timing rounds (table entries and whole models).
        build_table: time missing table entries on this host (False: a missing table is an error).
        table_dir: folder of the cached tables ("" = ``$EDGESLIM_LATENCY_DIR`` or ``~/.cache/edgeslim/latency``).
        seed: seeds sampling and fine-tuning.
    """

    kind = "nas"
    searcher: Searcher = Searcher.NETADAPT
    latency_budget_ms: float | None = None
    latency_ratio: float | None = None
    runtime: str = "onnxruntime"
    threads: int = 1
    device: str = "host"
    round_to: int = 8
    min_keep: float = 0.25
    trials: int = 40
    population: int = 8
    steps: int = 6
    max_extra_steps: int = 3
    exclude: tuple[str, ...] = ()
    importance: str = "l1"
    bn_samples: int = 512
    val_samples: int = 1000
    finetune_steps: int = 0
    finetune_lr: float = 0.01
    grid_points: int = 8
    fit_samples: int = 6
    rounds: int = 5
    build_table: bool = True
    table_dir: str = ""
    seed: int = 0

    def validate(self) -> None:
        if self.latency_budget_ms is None and self.latency_ratio is None:
            object.__setattr__(self, "latency_ratio", 0.25)  # the default budget: a quarter of the original latency
        if self.latency_budget_ms is not None and self.latency_ratio is not None:
            raise self._bad(
                "latency_budget_ms",
                "give only one of latency_budget_ms (ms) and latency_ratio (a fraction of the original latency)",
            )
        if self.latency_budget_ms is not None and not self.latency_budget_ms > 0:
            raise self._bad("latency_budget_ms", "must be a latency in ms > 0")
        if self.latency_ratio is not None and not 0 < self.latency_ratio < 1:
            raise self._bad("latency_ratio", "must be in (0, 1): the fraction of the original latency to reach")
        from edgeslim.runtime import RUNTIMES

        if self.runtime not in RUNTIMES:
            RUNTIMES.get(self.runtime)  # one line listing the valid runtimes
        if "onnx" not in RUNTIMES.get(self.runtime).formats:
            ok = [n for n in RUNTIMES if "onnx" in RUNTIMES.get(n).formats]
            raise self._bad("runtime", f"the latency table times ONNX layers; runtimes that load ONNX: {', '.join(ok)}")
        if self.device != "host":
            from edgeslim.devices import device_names

            if self.device not in device_names():
                raise self._bad("device", f"valid: {', '.join(device_names())}")
        for f in ("threads", "round_to", "steps", "bn_samples", "val_samples", "rounds", "trials"):
            if getattr(self, f) < 1:
                raise self._bad(f, "must be an integer >= 1")
        for f in ("max_extra_steps", "finetune_steps"):
            if getattr(self, f) < 0:
                raise self._bad(f, "must be an integer >= 0")
        if self.population < 2:
            raise self._bad("population", "must be an integer >= 2 (NSGA-II needs parents to cross)")
        if not 0 < self.min_keep <= 1:
            raise self._bad("min_keep", "must be in (0, 1]: the smallest fraction of channels a unit keeps")
        if self.grid_points < 2:
            raise self._bad("grid_points", "must be >= 2 (both ends of every width range are timed)")
        if self.fit_samples < 0:
            raise self._bad("fit_samples", "must be >= 0 (0: no fit, the plain sum of the layers)")
        if not self.finetune_lr > 0:
            raise self._bad("finetune_lr", "must be > 0")
        from edgeslim.prune import IMPORTANCE

        if self.importance not in IMPORTANCE or IMPORTANCE.get(self.importance).needs_grad:
            ok = [n for n in IMPORTANCE if not IMPORTANCE.get(n).needs_grad]
            raise self._bad("importance", f"valid: {', '.join(ok)} (criteria that need no gradients)")
        if any(not isinstance(x, str) or not x for x in self.exclude):
            raise self._bad("exclude", "must be non-empty layer-name globs")
