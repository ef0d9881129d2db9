"""``search_widths``: NetAdapt-style greedy per-layer width search under a latency budget, measured at the end.

Each step sets a latency target a share closer to the budget. For every unit of the width space it finds the
widest cut that reaches the target by the latency table (:class:`~edgeslim.nas._predictor.Predictor`), realizes it
with ``edgeslim.prune`` (weights inherited), re-estimates BatchNorm statistics on training inputs and scores it on a
validation subset; the best candidate is kept (optionally fine-tuned briefly) and the next step starts from it. The
final model is exported and timed on the runtime: its latency is *measured*, never only predicted; if it is still
over the budget, further steps aim lower by the measured/predicted ratio.

The result records one ``nas`` recipe step holding the final structure (the same data ``edgeslim.prune`` records),
so ``edgeslim.save`` / ``edgeslim.load`` rebuild it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from typing import Any, ClassVar

from torch import nn

from edgeslim.core import recipe as _recipe
from edgeslim.core.errors import ConfigError, DataError, ModelError
from edgeslim.core.verbs import check_config
from edgeslim.nas._config import NASConfig
from edgeslim.nas._predictor import build_predictor, measure_models
from edgeslim.nas._space import width_space

log = logging.getLogger(__name__)


@dataclasses.dataclass
class NASReport:
    """What one :func:`search_widths` call did.

    Attributes:
        device: ``host`` or the device profile the budget is for; ``latency_label`` says how its figures were got.
        budget_ms: the latency budget (on ``device``).
        original_ms: the original model's latency on ``device`` (measured on the host; predicted for a profile).
        predicted_ms: the final model's predicted latency on ``device``.
        measured_ms: the final model's latency measured on the host runtime (always measured).
        original_measured_ms: the original model's latency measured on the host runtime.
        met: whether the budget is met (by the measured figure on the host, the predicted one for a profile).
        widths: unit -> ``[full, final]``.
        accuracy_original, accuracy: top-1 on the validation subset (after BN recalibration for the final).
        steps: netadapt: per greedy step: unit cut, width, target, predicted latency, accuracy, candidates scored;
            evolution: per finished trial: accuracy (BN recalibrated), predicted latency, repaired, worker.
        searcher: ``netadapt`` or ``evolution``.
        search: evolution: the study (name, storage without password, trials, best trial, resumed/requeued).
        predictor: the latency model (table file, a, b, fit samples).
        fixed: units kept at full width (excluded, or too narrow to cut), with why.
    """

    technique: ClassVar[str] = "nas"
    device: str
    latency_label: str
    budget_ms: float
    original_ms: float
    predicted_ms: float
    measured_ms: float
    original_measured_ms: float
    met: bool
    widths: dict[str, list[int]]
    accuracy_original: float
    accuracy: float
    steps: list[dict] = dataclasses.field(default_factory=list)
    predictor: dict = dataclasses.field(default_factory=dict)
    fixed: dict[str, str] = dataclasses.field(default_factory=dict)
    runtime: str = ""
    seconds: float = 0.0
    note: str = ""
    searcher: str = "netadapt"
    search: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"technique": self.technique, **dataclasses.asdict(self)}

    def summary(self) -> str:
        cut = {n: w for n, w in self.widths.items() if w[1] != w[0]}
        unit = f"ms ({self.latency_label})"
        lines = [
            (
                f"nas (widths, {self.searcher}, {self.runtime}): latency {self.original_ms:.3f} -> {self.predicted_ms:.3f} {unit}, "
                f"budget {self.budget_ms:.3f} ms {'met' if self.met else 'NOT met'}; measured on this host "
                f"{self.original_measured_ms:.3f} -> {self.measured_ms:.3f} ms"
            ),
            (
                f"  accuracy on the validation subset {self.accuracy_original:.4f} -> {self.accuracy:.4f} "
                f"(BN recalibrated{', fine-tuned between steps' if 'fine-tuned' in self.note else ', not fine-tuned'})"
            ),
            f"  {len(cut)} of {len(self.widths)} units narrowed: "
            + ", ".join(f"{n} {a}->{b}" for n, (a, b) in list(cut.items())[:8])
            + (" ..." if len(cut) > 8 else ""),
        ]
        for n, why in self.fixed.items():
            lines.append(f"  kept {n}: {why}")
        if self.note:
            lines.append(f"  note: {self.note}")
        return "\n".join(lines)


def _split(data: Any) -> tuple[Any, Any]:
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise DataError(
            "search_widths() needs data=(train, val): labelled datasets for BatchNorm recalibration "
            "and for scoring candidates"
        )
    train, val = data
    for what, d in (("train", train), ("val", val)):
        if not hasattr(d, "take") or not hasattr(d, "labels"):
            raise DataError(
                f"search_widths(): data {what} must be an edgeslim ImageDataset (edgeslim.data.load "
                f"or an image folder), got {type(d).__name__}"
            )
        if len(d) == 0:
            raise DataError(f"search_widths(): data {what} is empty")
    return train, val


def _merged_structure(steps: list[dict]) -> dict[str, dict]:
    """The structure of several recorded channel-prune steps as one (later shapes replace earlier ones)."""
    out: dict[str, dict] = {}
    for st in steps:
        state = st.get("state", {})
        if st.get("technique") != "prune" or state.get("method") != "channel":
            raise ModelError(f"the width search made an unexpected step {st.get('technique')!r}")
        for n, change in state.get("structure", {}).items():
            cur = out.setdefault(n, {"attrs": {}, "tensors": {}})
            cur["attrs"].update(change.get("attrs", {}))
            cur["tensors"].update(change.get("tensors", {}))
    return out


def search_widths(
    model: nn.Module, config: NASConfig, *, data: Any, example_inputs: Any, storage: Any = None
) -> nn.Module:
    """Search per-layer widths of a copy of ``model`` so that it runs within the latency budget.

    Args:
        model: a trained CNN (Conv2d/Linear layers; residual, depthwise and grouped convs are coupled).
        config: the budget, runtime, space and search settings.
        data: ``(train, val)`` ImageDatasets: BatchNorm statistics are re-estimated on training inputs, candidates
            scored on a validation subset.
        example_inputs: an input batch (traced at batch 1 for the layers' shapes and the exported models).
        storage: ``searcher="evolution"`` only: where the trials live, a SQLite file path or an RDB URL
            (``sqlite:///f.db``, ``postgresql://user@host/db`` shared by several workers); None:
            ``<table_dir>/nas-studies.db`` or ``~/.cache/edgeslim/nas/studies.db``. The same search run again
            resumes its study (finished trials are kept).

    Returns:
        A new, physically narrower model with ``.report`` (a :class:`NASReport`) and a ``nas`` recipe step.

    Raises:
        ConfigError: the budget is below the smallest sub-network of the space (or above the original), the space
            is empty after the exclusions, an exclude glob matches no layer.
        ModelError: no latency table for this host and ``build_table=False``; the model cannot be traced.
        DataError: ``data`` is not ``(train, val)``.
    """
    from edgeslim.train import TrainConfig, evaluate, fit, recalibrate_bn

    if not isinstance(model, nn.Module):
        raise ModelError(f"search_widths() needs a torch.nn.Module, got {type(model).__name__}")
    check_config(config, NASConfig, "search_widths")
    _recipe.check_next(model, "prune")
    train, val = _split(data)
    t0 = time.perf_counter()
    base = copy.deepcopy(model).eval()
    space = width_space(
        base,
        example_inputs,
        round_to=config.round_to,
        min_keep=config.min_keep,
        exclude=config.exclude,
        grid_points=config.grid_points,
    )
    fixed = dict(space.fixed)
    if not space.units:
        raise ConfigError(
            f"NASConfig.exclude={list(config.exclude)!r} leaves nothing to search in "
            f"{type(model).__name__}: no unit can lose {config.round_to} channels (round_to="
            f"{config.round_to}, min_keep={config.min_keep}); {len(space.fixed)} units are kept "
            f"({'; '.join(f'{n}: {why}' for n, why in list(space.fixed.items())[:4])}"
            f"{' ...' if len(space.fixed) > 4 else ''})"
        )
    host_pred = build_predictor(
        base,
        space,
        runtime=config.runtime,
        threads=config.threads,
        directory=config.table_dir or None,
        allow_build=config.build_table,
        fit_samples=config.fit_samples,
        seed=config.seed,
        rounds=config.rounds,
    )
    pred = host_pred.with_device(config.device)
    measured0 = measure_models(
        {"original": base}, space.example, runtime=config.runtime, threads=config.threads, rounds=config.rounds
    )["original"]["ms"]
    full = space.full()
    original = measured0 if config.device == "host" else pred.predict(full)
    budget = config.latency_budget_ms if config.latency_budget_ms is not None else config.latency_ratio * original
    # the predictor is fitted to measured latencies; anchor it on the original's measurement (host) so the search
    # aims at the budget in measured terms (and the smallest sub-network is compared with the budget in those terms)
    anchor = [measured0 / pred.predict(full) if config.device == "host" and pred.predict(full) > 0 else 1.0]
    smallest = pred.predict(space.smallest()) * anchor[0]
    label = "measured" if config.device == "host" else pred.label
    if budget < smallest:
        field = "latency_budget_ms" if config.latency_budget_ms is not None else "latency_ratio"
        value = config.latency_budget_ms if config.latency_budget_ms is not None else config.latency_ratio
        raise ConfigError(
            f"NASConfig.{field}={value} asks for {budget:.3f} ms, below the smallest sub-network of this space "
            f"({smallest:.3f} ms {pred.label if config.device != 'host' else 'predicted on ' + config.runtime}, every "
            f"unit at min_keep={config.min_keep}); possible: >= {smallest:.3f} ms"
            + (f" (latency_ratio >= {smallest / original:.3f})" if original else "")
            + ", or lower min_keep / exclude fewer layers"
        )
    val_sub = val.take(min(config.val_samples, len(val)), seed=config.seed)
    acc0 = evaluate(base, val_sub)
    current, assign = base, dict(full)
    history: list[dict] = []
    note = []

    def predicted(a: dict[str, int]) -> float:
        return pred.predict(a) * anchor[0]

    def measured_of(m: nn.Module) -> float:
        return measure_models(
            {"final": m}, space.example, runtime=config.runtime, threads=config.threads, rounds=config.rounds
        )["final"]["ms"]

    def step(target: float, i: int) -> bool:
        nonlocal current, assign
        cands = []
        for n, u in space.units.items():
            lower = [w for w in u.choices if w < assign[n]]
            if not lower:
                continue
            ok = [w for w in lower if predicted({**assign, n: w}) <= target]
            cands.append((n, max(ok) if ok else min(lower), bool(ok)))
        if not cands:
            return False
        if any(reach for _, _, reach in cands):
            cands = [c for c in cands if c[2]]
        scored = []
        for n, w, _reach in cands:
            m = space.realize(current, {n: w}, importance=config.importance)
            m = recalibrate_bn(m, train, num_samples=min(config.bn_samples, len(train)))
            acc = evaluate(m, val_sub)
            lat = predicted({**assign, n: w})
            scored.append((acc, -lat, n, w, m))
        acc, neg, n, w, m = max(scored, key=lambda s: (s[0], s[1]))
        if config.finetune_steps:
            res = fit(
                m,
                train,
                val_sub,
                TrainConfig(epochs=1, lr=config.finetune_lr, seed=config.seed + i),
                max_steps_per_epoch=config.finetune_steps,
                progress=False,
            )
            m = res.model
            acc = evaluate(m, val_sub)
        current, assign = m, {**assign, n: w}
        history.append(
            {
                "step": i,
                "unit": n,
                "width": w,
                "target_ms": target,
                "predicted_ms": -neg,
                "accuracy": acc,
                "candidates": len(scored),
            }
        )
        log.info(
            "nas step %d: %s -> %d, predicted %.3f ms (target %.3f), accuracy %.4f (%d candidates)",
            i,
            n,
            w,
            -neg,
            target,
            acc,
            len(scored),
        )
        return True

    def _greedy() -> float:
        nonlocal current, assign
        start = predicted(full)
        if budget >= start:
            note.append(f"the original already meets the budget ({start:.3f} <= {budget:.3f} ms); nothing was cut")
        i = 0
        for i in range(1, config.steps + 1):
            if predicted(assign) <= budget:
                break
            if not step(start - (start - budget) * i / config.steps, i):
                break
        while predicted(assign) > budget and step(budget, i + 1):  # greedy steps can fall short of a step's target
            i += 1
        measured = measure_models(
            {"final": current}, space.example, runtime=config.runtime, threads=config.threads, rounds=config.rounds
        )["final"]["ms"]
        extra = 0
        while config.device == "host" and measured > budget and extra < config.max_extra_steps:
            # the prediction was optimistic: aim lower by the measured/predicted ratio
            extra += 1
            target = budget * predicted(assign) / measured
            if not step(target, i + extra):
                break
            measured = measure_models(
                {"final": current}, space.example, runtime=config.runtime, threads=config.threads, rounds=config.rounds
            )["final"]["ms"]
        if extra:
            note.append(f"{extra} extra step(s): the measured latency was over the budget after the planned steps")
        return measured

    evo_info: dict[str, Any] = {}
    if config.searcher == "evolution":
        current, assign, budget, evo_info = _evolution(
            base, space, config, pred, anchor, predicted, budget, train, val_sub, storage, note, history, measured_of
        )
        measured = evo_info.pop("measured_ms")
    else:
        measured = _greedy()
    if config.finetune_steps:
        note.append(
            f"fine-tuned {config.finetune_steps} steps "
            + ("after each greedy step" if config.searcher == "netadapt" else "after the search")
        )
    final_pred = predicted(assign)
    met = (measured if config.device == "host" else final_pred) <= budget
    if not met:
        note.append(
            f"the budget is NOT met: {measured if config.device == 'host' else final_pred:.3f} ms > {budget:.3f} ms"
        )
    if config.device != "host":
        note.append(
            f"latencies for {config.device} are predicted (host table scaled by the roofline), measured "
            "only on this host"
        )
    out = copy.deepcopy(current)
    own = len(_recipe.steps_of(model))
    structure = _merged_structure(_recipe.steps_of(out)[own:])
    for attr in ("prune_report",):
        if hasattr(out, attr):
            delattr(out, attr)
    report = NASReport(
        device=config.device,
        latency_label=label,
        budget_ms=budget,
        original_ms=original,
        predicted_ms=final_pred,
        measured_ms=measured,
        original_measured_ms=measured0,
        met=met,
        widths={n: [space.units[n].full, assign[n]] for n in space.units},
        accuracy_original=acc0,
        accuracy=evaluate(out, val_sub),
        steps=history,
        predictor={**pred.to_dict(), "anchor_scale": anchor[0], "device": config.device, "label": pred.label},
        fixed=fixed,
        runtime=host_pred.table.describe(),
        seconds=round(time.perf_counter() - t0, 1),
        note="; ".join(note),
        searcher=str(config.searcher),
        search=evo_info,
    )
    out.report = report
    _recipe.record(out, "nas", config, {"structure": structure}, report, previous=model)
    log.info("%s", report.summary())
    return out.train(model.training)


def _evolution(
    base: nn.Module,
    space: Any,
    config: NASConfig,
    pred: Any,
    anchor: list[float],
    predicted: Any,
    budget: float,
    train: Any,
    val_sub: Any,
    storage: Any,
    note: list[str],
    history: list[dict],
    measured_of: Any,
) -> tuple[nn.Module, dict[str, int], float, dict[str, Any]]:
    """NSGA-II over the widths (:class:`~edgeslim.nas._evolve.Evolution`), then the best candidate realized,
    BN-recalibrated, optionally fine-tuned, and measured; when the measurement is over the budget, the best
    finished candidate under a budget lowered by the measured/predicted ratio is taken instead (or the best one
    repaired onto it)."""
    from edgeslim.nas._evolve import IDENT_FIELDS, Evolution, model_key, storage_url
    from edgeslim.train import TrainConfig, evaluate, fit, recalibrate_bn

    def realize(a: dict[str, int]) -> nn.Module:
        m = space.realize(base, a, importance=config.importance)
        return recalibrate_bn(m, train, num_samples=min(config.bn_samples, len(train)))

    def score(a: dict[str, int]) -> float:
        return evaluate(realize(a), val_sub)

    ident = {
        "model_and_val_sha256": model_key(base, val_sub),
        "units": {n: list(u.choices) for n, u in space.units.items()},
        **{f: getattr(config, f) for f in IDENT_FIELDS},
    }
    evo = Evolution(space, predicted, score, config, ident)
    info = {
        "a": pred.a,
        "b": pred.b,
        "c": pred.c,
        "form": pred.form,
        "anchor": anchor[0],
        "table": str(pred.table.path),
    }

    def restore(stored: dict) -> float:
        # a resumed study (or another worker) keeps the latency model and budget it was created with
        pred.a, pred.b, pred.c, pred.form = stored["a"], stored["b"], stored["c"], stored["form"]
        anchor[0] = stored["anchor"]
        if stored.get("table") != str(pred.table.path):
            note.append(f"the study's latency model was fitted on table {stored.get('table')}, used here as is")
        return float(stored["budget_ms"])

    url = storage_url(storage, config.table_dir)
    study = evo.run(url, budget, info, restore)
    budget = evo.budget
    from edgeslim.core.store import redact

    ranked = evo.ranked(study, budget)
    if not ranked:
        raise ModelError(f"the evolutionary search finished no trial within {budget:.3f} ms (study {evo.name})")
    acc, lat, assign, number = ranked[0]
    current = realize(assign)
    measured = measured_of(current)
    extra = 0
    while config.device == "host" and measured > budget and extra < config.max_extra_steps:
        extra += 1
        target = budget * predicted(assign) / measured  # the prediction was optimistic: aim lower
        lower = evo.ranked(study, target)
        if lower:
            acc, lat, assign, number = lower[0]
        else:
            genes = {n: space.units[n].choices.index(w) for n, w in assign.items()}
            assign, _ = evo.repair(genes, target)
            number = -1
            acc = score(assign)
        current = realize(assign)
        measured = measured_of(current)
    if extra:
        note.append(f"{extra} re-pick(s): the measured latency of the best candidate was over the budget")
    if config.finetune_steps:
        current = fit(
            current,
            train,
            val_sub,
            TrainConfig(epochs=1, lr=config.finetune_lr, seed=config.seed),
            max_steps_per_epoch=config.finetune_steps,
            progress=False,
        ).model
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    for t in done:
        history.append(
            {
                "trial": t.number,
                "accuracy": t.values[0],
                "predicted_ms": t.values[1],
                "repaired": bool(t.user_attrs.get("repaired")),
                "worker": t.user_attrs.get("worker", "?"),
            }
        )
    if evo.resumed:
        note.append(f"resumed study {evo.name}: {evo.resumed} finished trial(s) kept")
    if evo.requeued:
        note.append(f"re-queued trial(s) {evo.requeued} left RUNNING by a stopped process")
    return (
        current,
        assign,
        budget,
        {
            "measured_ms": measured,
            "study": evo.name,
            "storage": redact(url),
            "trials": len(done),
            "best_trial": number,
            "best_trial_accuracy": acc,
            "resumed_trials": evo.resumed,
            "requeued": evo.requeued,
        },
    )


@_recipe.STEPS.register("nas")
def _replay_nas(model: nn.Module, step: dict) -> nn.Module:
    """Rebuild a searched model's widths: the recorded structure, replayed as a channel-prune structure."""
    from edgeslim.prune import apply_recipe

    structure = step.get("state", {}).get("structure")
    if not isinstance(structure, dict):
        raise ModelError("recipe step 'nas' has no recorded structure")
    return apply_recipe(model, [{"method": "channel", "structure": structure, "remask": []}])
