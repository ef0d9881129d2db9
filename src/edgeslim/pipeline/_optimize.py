"""``edgeslim.optimize``: the user's budget in, a deployable artifact out, searched with Optuna and resumable.

    best = edgeslim.optimize(model, data=(train, val), budget=Budget(max_accuracy_drop=0.005, min_speedup=3.0),
                             max_minutes=30, out="runs/mbv2")
    best.artifact.path, best.meets_budget, best.report.summary()

How it works:

1. The input model is exported to FP32 ONNX and measured: the baseline every limit is judged against
   (accuracy on the search subset of the validation split, latency on the runtime or predicted for the device).
2. An Optuna study (multi-objective: accuracy up, latency down; the budget as constraints) runs trials, each one
   candidate chain (see :class:`~edgeslim.pipeline.Space`). Cheap PTQ-only candidates are queued first. Every
   trial is a row in the storage; every step's output is cached by content key under ``out/cache``.
3. After the search the best candidates that met the budget on the search subset are re-measured on the whole
   validation split (latency interleaved with the baseline's, on the host) and the first that still meets it is
   chosen. When none does, the closest candidate is chosen, saved and reported with what failed and by how much.
4. The chosen candidate is written to ``out/chosen/`` (validated ONNX file, recipe, state_dicts) and a report to
   ``out/report.{json,md,html}``.

Several workers (processes, on one machine or several) share one study through ``storage="postgresql://..."``:
each runs trials until the study holds ``max_trials`` finished ones (a worker that finds every remaining slot
taken by a running trial waits for it, so a dead worker's trial is picked up, not lost), then writes the report
from the whole study. ``edgeslim optimize --resume out --worker`` joins a run with the options in its
``run.json``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import random
import shutil
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeslim._version import __version__
from edgeslim.core.artifact import Artifact
from edgeslim.core.errors import ConfigError, DataError, EdgeslimError, ModelError
from edgeslim.core.io import write_json
from edgeslim.pipeline import _store
from edgeslim.pipeline._budget import Budget, Prefer, Violation
from edgeslim.pipeline._candidate import (
    STRUCTURAL_STEPS,
    Context,
    DeadlineReached,
    Gated,
    build_candidate,
    deployment,
    depth,
    early_layers,
    interleaved_latency,
    measure_candidate,
    pruned_accuracy,
    structure_key,
)
from edgeslim.pipeline._report import pareto_front, write_report
from edgeslim.pipeline._space import Space, describe, restructured
from edgeslim.pipeline._task import check_space, task_of

log = logging.getLogger(__name__)

RECIPE_FORMAT = "edgeslim.optimize-recipe/1"
DEFAULT_TRIALS = 40
FINAL_CANDIDATES = 3  # the best feasible trials (by ``prefer``) re-measured on the whole validation split
#: a probe counts as clear of the budget's latency limit when this much slower would still meet it (promotion order)
LATENCY_MARGIN = 1.05
#: then the feasible trials with the most accuracy to spare on the search subset: the preferred ones sit at the
#: accuracy limit by construction (the fastest that passes), where the subset's sampling error decides
FINAL_MARGIN_CANDIDATES = 2
MAX_DUPLICATES_IN_A_ROW = 25
WAIT_POLL_S = 1.0  # how often a worker whose trial slots are all taken looks again
BASELINE = {"drop_blocks": 0, "target_macs": 0.0, "factorize": 0.0, "cluster": 0, "quantize": False}


@dataclass
class OptimizeReport:
    """What :func:`optimize` did: the budget, the baseline, every trial, the choice and its final figures."""

    technique: str = "optimize"
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return self.data

    def summary(self) -> str:
        d = self.data
        c = d["chosen"]
        t = d["trials"]
        head = (
            f"optimize: {t['complete']} trials ({t['failed']} failed, {t['gated']} gated before recovery, "
            f"{t.get('deadline', 0)} stopped by max_minutes, {t['duplicates']} duplicates skipped) in "
            f"{d['seconds']:.0f} s; chosen trial {c['trial']}: {c['description']}"
        )
        fin, base = c["final"], d["baseline_final"]
        lines = [
            head,
            f"  {d.get('metric', 'accuracy')} {100 * fin['accuracy']:.2f}% vs FP32 {100 * base['accuracy']:.2f}% "
            f"({d['final_data']}), latency {fin['latency_ms']:.4g} ms vs {base['latency_ms']:.4g} ms "
            f"({base['latency_ms'] / fin['latency_ms']:.2f}x, {d['latency_source']}), size "
            f"{fin['size_mb']:.3g} MB"
            + (f" ({fin['size_zipped_mb']:.3g} MB zipped)" if "size_zipped_mb" in fin else ""),
        ]
        if c["meets_budget"]:
            lines.append("  meets the budget: " + "; ".join(d["budget_lines"]))
        else:
            lines.append(
                "  DOES NOT MEET the budget (closest candidate saved): " + "; ".join(v["text"] for v in c["violations"])
            )
        return "\n".join(lines)


@dataclass
class OptimizeResult:
    """The chosen candidate.

    Attributes:
        model: the chosen torch model (a ``QuantizedModel`` when quantized).
        artifact: its validated ONNX :class:`~edgeslim.core.artifact.Artifact` in ``out/chosen/``.
        recipe: its replayable recipe (the trial's parameters and the steps they stand for).
        report: the :class:`OptimizeReport`.
        meets_budget: whether the chosen candidate meets the budget on the final (full-split) figures.
        violations: what fails and by how much when it does not.
        paths: the files written (artifact, recipe, report.json/md/html).
    """

    model: nn.Module
    artifact: Artifact
    recipe: dict[str, Any]
    report: OptimizeReport
    meets_budget: bool
    violations: list[dict[str, Any]]
    paths: dict[str, Path]


class _TrialError(Exception):
    """A trial that failed for a reason recorded on it (caught by Optuna; the search goes on)."""


def _check_args(
    model: Any, data: Any, budget: Any, space: Any, max_trials: Any, max_minutes: Any, seed: Any
) -> tuple[Any, Any]:
    if not isinstance(model, nn.Module):
        raise ModelError(f"optimize() needs a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(budget, Budget):
        raise ConfigError(f"optimize(budget=...) must be an edgeslim.Budget, got {type(budget).__name__}")
    if space is not None and not isinstance(space, Space):
        raise ConfigError(f"optimize(space=...) must be an edgeslim.pipeline.Space or None, got {type(space).__name__}")
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise DataError(
            "optimize(data=...) must be (train, val): the training split (calibration, BatchNorm "
            "recalibration, fine-tuning) and the validation split (accuracy)"
        )
    for name, v in (("max_trials", max_trials), ("max_minutes", max_minutes)):
        if v is not None and (
            isinstance(v, bool)
            or not isinstance(v, (int, float))
            or not v > 0
            or (name == "max_trials" and not float(v).is_integer())
        ):
            raise ConfigError(f"optimize({name}={v!r}) is not allowed; use a number > 0 (trials: an integer) or None")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"optimize(seed={seed!r}) is not allowed; use an integer >= 0")
    task_of(model).check_data(*data)
    return data[0], data[1]


def _check_space_fits_budget(space: Space, budget: Budget) -> None:
    """The space's choices that need something of the budget: one clear line when they do not fit it."""
    if True in space.mixed_precision and budget.max_accuracy_drop is None:
        raise ConfigError(
            "Space.mixed_precision=true keeps layers float under the accuracy budget left after pruning; "
            "it needs Budget.max_accuracy_drop (None given)"
        )
    if (space.runtimes or space.threads) and not budget.on_host:
        raise ConfigError(
            f"Space.runtimes={space.runtimes!r} / Space.threads={space.threads!r} are deployment choices measured "
            f"on this host; Budget.target={budget.target!r} predicts latency for a device: leave them empty"
        )
    over = [t for t in space.threads if t > budget.threads]
    if over:
        raise ConfigError(
            f"Space.threads={space.threads!r} has {over[0]} > Budget.threads={budget.threads} (the threads the "
            "deployment may use); give thread counts up to the budget's"
        )


def _import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError("optimize needs optuna: pip install optuna") from None
    return optuna


def optimize(
    model: nn.Module,
    *,
    data: tuple[Any, Any],
    budget: Budget = Budget(),
    space: Space | None = None,
    max_trials: int | None = None,
    max_minutes: float | None = None,
    out: str | Path = "runs/optimize",
    storage: str | None = None,
    seed: int = 0,
    resume: bool = True,
    example_inputs: torch.Tensor | None = None,
    progress: bool | None = None,
    sampler: str = "tpe",
    heartbeat_s: int = 10,
    command: dict[str, Any] | None = None,
) -> OptimizeResult:
    """Search chains of edgeslim's verbs for the candidate that best meets ``budget``; save and report it.

    Args:
        model: the trained float model (not modified).
        data: ``(train, val)`` ImageDatasets: train feeds calibration, BatchNorm recalibration and fine-tuning;
            val measures accuracy (a seeded subset of ``space.search_samples`` during the search, all of it for
            the final choice).
        budget: the :class:`Budget` (limits, target, runtime, threads).
        space: the :class:`Space` searched (default ``Space()``).
        max_trials: stop after this many finished trials in the study (completed or failed; counted over resumes
            and workers: a worker starts a trial only while finished + running trials are fewer). Default: 40 when
            ``max_minutes`` is not given either.
        max_minutes: the search's time: no trial starts after this many minutes of this call, and a trial
            running then stops cleanly (recovery within one optimizer step, other steps before they start; its
            candidate is recorded as pruned with ``deadline`` and queued again on resume, nothing partial is
            cached). The last measurement running at the deadline and the final re-measurement come after.
        out: the run folder (``study.db``, ``cache/``, ``chosen/``, ``report.*``).
        storage: an Optuna RDB URL shared by several workers (``postgresql://user@host/db``; each worker calls
            optimize with the same arguments, or runs ``edgeslim optimize --resume out --worker``); default: the
            SQLite file ``out/study.db`` (one process at a time). Recorded in ``out/run.json`` without its password.
        seed: seeds the sampler (per trial number), calibration subsets, fine-tuning and the search subset.
        resume: continue the run already in ``out`` (the same model, data, budget, space and seed); False refuses
            a folder that holds a run.
        example_inputs: an input batch to trace the model for pruning (default: the first validation sample).
        progress: a progress bar on stderr (trial n of N, best so far, time left); None (default): on when the
            caller turned progress on (``edgeslim.core.progress.progress_enabled``; the CLI does).
        sampler: ``tpe`` (multi-objective TPE with constraints) or ``nsga2`` (NSGA-II with constraints).
        heartbeat_s: shared storage only: seconds between a worker's heartbeats; a trial whose worker has been
            silent for 3 heartbeats is failed and its candidate queued again. Every worker of a study should use
            the same value (the CLI records it in ``run.json``).
        command: how the run was started (the CLI's options), recorded in ``run.json`` so that
            ``edgeslim optimize --resume out --worker`` can join with them.

    Returns:
        the :class:`OptimizeResult`: the chosen model, its validated artifact, its recipe and the report.

    Raises:
        ConfigError: a bad budget, space or setting; a run folder or study of another model, data or budget; a
            storage that does not answer. DataError: unusable data. OutputExistsError: ``out`` holds a run and
            ``resume`` is False, or another process is running in it.
    """
    t_start = time.perf_counter()
    train, val = _check_args(model, data, budget, space, max_trials, max_minutes, seed)
    task = task_of(model)
    space = space or (Space.for_detection() if task.kind == "detect" else Space())
    check_space(task, space)
    _check_space_fits_budget(space, budget)
    if max_trials is None and max_minutes is None:
        max_trials = DEFAULT_TRIALS
        log.info("optimize: neither max_trials nor max_minutes given; stopping after %d trials", DEFAULT_TRIALS)
    optuna = _import_optuna()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"optimize(out={str(out)!r}) is a file, not a folder")
    base = copy.deepcopy(model).eval()
    x = task.inputs(val, 1) if example_inputs is None else example_inputs
    try:
        with torch.no_grad():
            base(x)
    except Exception as e:  # noqa: BLE001 - a shape mismatch surfaces deep in torch
        raise DataError(
            f"samples of shape {tuple(x.shape[1:])} do not fit {type(base).__name__}: {str(e).splitlines()[0][:200]}"
        ) from None
    space, space_note = _fit_blocks(space, base, x)
    base_hash = _store.state_hash(base)
    ident = {
        "model_class": type(base).__name__,
        "base_model_sha256": base_hash,
        "data_sha256": _store.key(task.data_hash(train), task.data_hash(val)),
        "budget": budget.to_dict(),
        "space": space.to_dict(),
        "seed": seed,
        "sampler": sampler,
    }
    shared = storage is not None
    with contextlib.ExitStack() as stack:
        stack.enter_context(_quiet_optuna(optuna))
        if shared:  # the database must answer before anything is written
            url = storage
            st = _store.open_storage(url, shared=True, heartbeat_s=heartbeat_s)
            with _store.locked(out, name=".run.lock", wait=True):
                _store.check_run(out, ident, resume=resume, storage=url, command=command)
        else:
            stack.enter_context(_store.locked(out))
            _store.check_run(out, ident, resume=resume, command=command)
            url = _store.default_storage(out)
            st = _store.open_storage(url, shared=False)
        name = "edgeslim-" + _store.key(ident)[:16]
        study = optuna.create_study(
            storage=st,
            study_name=name,
            directions=["maximize", "minimize"],
            sampler=_store.seeded_sampler(sampler, seed),
            load_if_exists=True,
        )
        _check_study(study, ident, url)
        slots = _store.StudyLock(st, name, shared=shared)
        stack.callback(slots.close)
        with slots.held():
            requeued = [] if shared else _store.requeue_running(study, st)
            requeued += _requeue_interrupted(study)
        ctx = Context(
            base=base,
            base_key=_store.key(base_hash, ident["data_sha256"]),
            train=train,
            val=val,
            search_val=val.take(space.search_samples, seed=seed),
            example_inputs=x,
            space=space,
            budget=budget,
            seed=seed,
            cache=_store.Cache(out / "cache"),
            early_layers=early_layers(base, space),
            notes=[space_note] if space_note else [],
            task=task,
        )
        if not budget.on_host:
            ctx.device = budget.device()
        baseline = _baseline(ctx, study)
        with slots.held():
            if not study.user_attrs.get("cheap_queued"):
                for p in space.cheap():
                    study.enqueue_trial(space.optuna_params(p), skip_if_exists=True)
                for p in space.probes():
                    study.enqueue_trial(space.optuna_params(p), user_attrs={"probe": True}, skip_if_exists=True)
                study.set_user_attr("cheap_queued", len(space.cheap()) + len(space.probes()))
        stopped = _search(study, ctx, baseline, max_trials, max_minutes, progress, t_start, slots)
        # workers sharing the folder take turns at the report (each writes it from the whole study)
        with _store.locked(out, name=".finish.lock", wait=True) if shared else contextlib.nullcontext():
            result = _finish(study, ctx, baseline, out, stopped, requeued, url, t_start)
    return result


@contextlib.contextmanager
def _quiet_optuna(optuna: Any):
    """Optuna logs every trial at INFO and each caught failure with a traceback; edgeslim reports them itself."""
    prev = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(prev)


def _check_study(study: Any, ident: dict[str, Any], url: str) -> None:
    old = study.user_attrs.get("edgeslim")
    if old is None:
        study.set_user_attr("edgeslim", {**ident, "edgeslim_version": __version__})
        return
    for k in ("base_model_sha256", "data_sha256", "budget", "space", "seed"):
        if old.get(k) != ident.get(k):
            raise ConfigError(
                f"study {study.study_name!r} in storage {_store.redact(url)!r} was run with another "
                f"{k.replace('_sha256', '').replace('_', ' ')}; use another storage or out="
            )


#: the rungs of the multi-fidelity ladder, each a trial attribute (a trial's ``stage`` in reports); all but the
#: probes are exempt from the gates (chosen for their latency: their recovery is the point)
STAGES = ("probe", "sweep", "promoted", "requant")
#: the trial attributes that place a queued trial on the ladder (kept when it is queued again)
LADDER_ATTRS = (*STAGES, "recovery_units")


def _requeue_interrupted(study: Any) -> list[int]:
    """Queue again the trials a Ctrl-C (or a dead shared worker) left failed without a result of their own."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    out = []
    for t in trials:
        stopped = t.state == TrialState.FAIL and t.user_attrs.get("interrupted")
        stopped = stopped or (t.state == TrialState.PRUNED and "deadline" in t.user_attrs)  # max_minutes hit
        if stopped and t.number not in retried:  # its rung of the ladder (gates, sized recovery) goes with it
            ladder = {k: t.user_attrs[k] for k in LADDER_ATTRS if k in t.user_attrs}
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number, **ladder})
            out.append(t.number)
    return out


# ---------------------------------------------------------------------------------------------- baseline
def _baseline(ctx: Context, study: Any) -> dict[str, Any]:
    """The FP32 ONNX file of the input model, measured once per study (kept in the study, so a resumed or second
    worker judges every trial against the same figures)."""
    from edgeslim.devices import DEFAULT_CALIBRATION, Calibration, calibrate, graph_cost

    got = study.user_attrs.get("baseline")
    if got:
        if got.get("calibration"):
            ctx.calibration = Calibration(**got["calibration"])
        ctx.latency_how = got.get("latency_how", "")
        return got
    params = ctx.space.canonical(BASELINE)
    _, art, ck, _ = build_candidate(ctx, params)
    if not ctx.budget.on_host:
        if ctx.device.efficiency is None:  # a CPU profile: calibrate the roofline on this host's FP32 latency
            from edgeslim.runtime import RUNTIMES, latency

            runner = RUNTIMES.get("onnxruntime")(art, threads=1)
            host_ms = latency(runner, ctx.task.inputs(ctx.val, 1).numpy(), warmup=10, runs=ctx.space.latency_runs)[
                "p50_ms"
            ]
            ctx.calibration = calibrate(
                [("fp32 input model", graph_cost(art, as_run_by="onnxruntime"), host_ms)], "host"
            )
            ctx.latency_how = (
                f"roofline with efficiencies calibrated on this host's measured latency of the FP32 "
                f"input model ({host_ms:.4g} ms, onnxruntime, 1 thread)"
            )
        else:  # an accelerator profile with its own efficiency: host overheads say nothing about it
            ctx.calibration = DEFAULT_CALIBRATION
            ctx.latency_how = (
                f"roofline with the profile's efficiency {ctx.device.efficiency:g} and the default "
                "per-node overheads (not calibrated)"
            )
    m = measure_candidate(ctx, art, ck)
    got = {
        "params": params,
        "figures": m["figures"],
        "provenance": m["provenance"],
        "key": ck,
        "calibration": ctx.calibration.to_dict() if ctx.calibration else None,
        "latency_how": ctx.latency_how,
    }
    study.set_user_attr("baseline", got)
    return study.user_attrs.get("baseline") or got


# ---------------------------------------------------------------------------------------------- search
def _finished(study: Any) -> list[Any]:
    """Trials that count toward max_trials: completed, failed with an error of their own, or gated."""
    from optuna.trial import TrialState

    return [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED))
        if t.state == TrialState.COMPLETE or "error" in t.user_attrs or "gated" in t.user_attrs
    ]


def _fit_blocks(space: Space, base: nn.Module, x: torch.Tensor) -> tuple[Space, str]:
    """``space`` with the ``drop_blocks`` choices the model can take (at most its removable residual blocks), and
    a note saying what was dropped from the search ('' when nothing)."""
    if not any(space.drop_blocks):
        return space, ""
    from edgeslim.prune._blocks import residual_blocks

    n = len(residual_blocks(base, x)[0])
    keep = tuple(b for b in space.drop_blocks if b <= n) or (0,)
    if keep == space.drop_blocks:
        return space, ""
    note = (
        f"{type(base).__name__} has {n} removable residual block(s): drop_blocks choice(s) "
        f"{', '.join(str(b) for b in space.drop_blocks if b not in keep)} not searched"
    )
    log.warning("optimize: %s", note)
    return dataclasses.replace(space, drop_blocks=keep), note


def _recal_best(study: Any) -> dict[str, float]:
    """The best BatchNorm-recalibrated accuracy recorded per pruning depth (the relative multi-fidelity gate)."""
    best: dict[str, float] = {}
    for t in study.get_trials(deepcopy=False):
        acc, p = t.user_attrs.get("recal_accuracy"), t.user_attrs.get("params") or {}
        if acc is not None and restructured(p):
            k = depth(p)
            best[k] = max(best.get(k, acc), acc)
    return best


def _search(
    study: Any,
    ctx: Context,
    baseline: dict[str, Any],
    max_trials: int | None,
    max_minutes: float | None,
    progress: bool,
    t_start: float,
    slots: _store.StudyLock,
) -> str:
    """Run trials until the trial or time budget is spent (or the space is exhausted); returns why it stopped.

    Each trial starts under ``slots`` (the study's lock): the check that a slot of ``max_trials`` is free
    (finished + running trials of every worker), Optuna's ask (which first fails the trials of dead workers and
    queues them again) and the claim of the candidate (no other worker's running or finished trial has the same
    parameters). The lock is released before the candidate is built, so workers build and measure in parallel.
    """
    import optuna
    from optuna.trial import TrialState

    space, budget = ctx.space, ctx.budget
    deadline = t_start + max_minutes * 60 if max_minutes else None
    ctx.deadline = deadline  # trials stop cleanly at it (see build_candidate)
    candidates = space.all_candidates()
    n_space = len(candidates)
    bar = _progress_bar(max_trials, len(_finished(study)), progress)
    dup_run = 0
    me = _store.worker_id()
    last: dict[str, Any] = {}

    def claim(trial: Any) -> dict[str, Any]:
        """The trial's candidate, or TrialPruned when another trial has (or is running) the same one."""
        params = space.suggest(trial)
        if (units := trial.user_attrs.get("recovery_units")) and params.get("finetune_steps"):
            params = {**params, "finetune_steps": int(units)}  # a promoted recovery sized by time (sized_units)
        trial.set_user_attr("params", params)
        trial.set_user_attr("worker", me)
        last["number"] = trial.number
        taken = {
            repr(t.user_attrs.get("params")): t
            for t in study.get_trials(
                deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
            )
            if "duplicate_of" not in t.user_attrs
            and "deadline" not in t.user_attrs
            and "params" in t.user_attrs
            and t.number != trial.number
        }
        ctx.stage = ""
        failed = {  # structures that could not be built (e.g. a MAC target unreachable with the early layers kept)
            structure_key(t.user_attrs["params"]): t
            for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
            if t.user_attrs.get("structure_failed") and "params" in t.user_attrs
        }
        dup = taken.get(repr(params))
        if dup is None and (bad := failed.get(structure_key(params))) is not None and bad.number != trial.number:
            dup = bad
        if dup is not None:
            last["duplicate"] = True
            trial.set_user_attr("duplicate_of", dup.number)
            for k, v in dup.constraints.items():
                trial.set_constraint(k, v)
            # queue an untried candidate instead (drawn with the trial's own seed, so a resumed run draws the same)
            untried = [c for c in candidates if repr(c) not in taken and structure_key(c) not in failed]
            if untried:
                pick = random.Random(ctx.seed * 1_000_003 + trial.number).choice(untried)
                study.enqueue_trial(
                    space.optuna_params(pick), user_attrs={"instead_of_duplicate": trial.number}, skip_if_exists=True
                )
            if dup.state == TrialState.FAIL:
                raise optuna.TrialPruned(f"same structure as trial {dup.number}, which could not be built")
            what = "running" if dup.state == TrialState.RUNNING else "tried"
            raise optuna.TrialPruned(f"same candidate as trial {dup.number} ({what})")
        ctx.recal_best = _recal_best(study)
        ctx.ungated = any(trial.user_attrs.get(k) for k in STAGES[1:])
        return params

    def objective(trial: Any) -> tuple[float, float]:
        try:
            params = claim(trial)
        finally:
            slots.release()  # claimed (or given up): the other workers may start theirs
        t0 = time.perf_counter()
        try:
            _, art, ck, steps = build_candidate(ctx, params)
            m = measure_candidate(ctx, art, ck, params=params)
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            raise
        except Gated as g:
            trial.set_user_attr("gated", str(g))
            if g.recal_accuracy is not None:
                trial.set_user_attr("recal_accuracy", g.recal_accuracy)
            trial.set_user_attr("seconds", round(time.perf_counter() - t0, 2))
            log.info("trial %d (%s) %s", trial.number, describe(params, space), g)
            raise optuna.TrialPruned(str(g)) from None
        except DeadlineReached as dl:
            trial.set_user_attr("deadline", str(dl))
            trial.set_user_attr("seconds", round(time.perf_counter() - t0, 2))
            log.info("trial %d (%s) %s", trial.number, describe(params, space), dl)
            raise optuna.TrialPruned(str(dl)) from None
        except Exception as e:
            msg = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
            trial.set_user_attr("error", msg)
            if ctx.stage == "structure":  # every candidate of this structure would fail the same way: not tried again
                trial.set_user_attr("structure_failed", True)
            trial.set_user_attr("seconds", round(time.perf_counter() - t0, 2))
            log.warning("trial %d (%s) failed: %s", trial.number, describe(params, space), msg)
            if not isinstance(e, EdgeslimError):
                log.debug("trial %d traceback", trial.number, exc_info=True)
            raise _TrialError(msg) from None
        figs = m["figures"]
        viol = budget.check(figs, baseline["figures"])
        trial.set_user_attr("figures", figs)
        trial.set_user_attr("provenance", m["provenance"])
        trial.set_user_attr("violations", [v.to_dict() for v in viol])
        trial.set_user_attr("steps", steps)
        trial.set_user_attr("deployment", m.get("deployment"))
        if any(n in steps for n in STRUCTURAL_STEPS):
            trial.set_user_attr("recal_accuracy", pruned_accuracy(steps))
        trial.set_user_attr("seconds", round(time.perf_counter() - t0, 2))
        for k, v in budget.constraint_values(figs, baseline["figures"]).items():
            trial.set_constraint(k, v)
        return figs["accuracy"], figs["latency_ms"]

    stopped = "max_trials"
    waiting_since = None
    try:
        while True:
            ran = False
            with slots.held():
                finished = _finished(study)
                if max_trials is not None and len(finished) >= max_trials:
                    stopped = f"max_trials={max_trials} reached"
                    break
                if deadline is not None and time.perf_counter() >= deadline:
                    stopped = f"max_minutes={max_minutes:g} reached"
                    break
                _promote(study, ctx, baseline)
                distinct = {repr(t.user_attrs.get("params")) for t in finished}
                if len(distinct) >= n_space:
                    stopped = f"all {n_space} candidates of the space tried"
                    break
                if dup_run >= MAX_DUPLICATES_IN_A_ROW:
                    stopped = f"the sampler proposed {dup_run} tried candidates in a row: the space looks exhausted"
                    break
                running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
                if max_trials is None or len(finished) + running < max_trials:
                    ran, waiting_since = True, None
                    last.clear()
                    try:
                        study.optimize(objective, n_trials=1, catch=(_TrialError,), gc_after_trial=False)
                    except optuna.exceptions.UpdateFinishedTrialError:
                        # another worker took this one's trial for dead (its heartbeat lagged) and queued it again
                        log.warning(
                            "trial %s was failed by another worker (no heartbeat for %d intervals) while it "
                            "ran here; its candidate was queued again, this result is dropped",
                            last.get("number", "?"),
                            _store.GRACE_INTERVALS,
                        )
            if not ran:  # every free slot is taken by a running trial: wait for it (or for its worker to go stale)
                if waiting_since is None:
                    waiting_since = time.perf_counter()
                    log.info(
                        "optimize: %d finished + %d running trials fill max_trials=%d; waiting for them",
                        len(finished),
                        running,
                        max_trials,
                    )
                time.sleep(WAIT_POLL_S)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    optuna.storages.fail_stale_trials(study)  # a dead worker's trial is failed and queued again
                continue
            is_dup = bool(last.get("duplicate"))
            dup_run = dup_run + 1 if is_dup else 0
            if bar is not None and not is_dup:
                bar.update(1)
                bar.set_postfix_str(_best_text(study, ctx, baseline, deadline), refresh=True)
    finally:
        ctx.deadline = None  # the final re-measurement and the report come after the search's time
        if bar is not None:
            bar.close()
    log.info("optimize: search stopped: %s", stopped)
    return stopped


def _spread(idx: list[int], lat: list[float], k: int) -> list[int]:
    """``k`` of ``idx`` spread evenly over latency (the fastest and the slowest always among them when k > 1)."""
    order = sorted(idx, key=lambda i: lat[i])
    if k >= len(order):
        return order
    if k == 1:
        return [order[0]]
    return [order[round(j * (len(order) - 1) / (k - 1))] for j in range(k)]


def sweep_picks(points: list[tuple[float, float]], feasible: list[bool], n: int) -> list[int]:
    """Indices of up to ``n`` probes for the sweep (see ``Space.sweep``): ``points`` are (recalibrated accuracy,
    latency); successive non-dominated fronts, each thinned evenly over latency when it has more than the places
    left; those meeting the budget's non-accuracy limits (``feasible``) first, then by latency."""
    left = list(range(len(points)))
    picks: list[int] = []
    lat = [c for _, c in points]
    while left and len(picks) < n:
        front = [left[i] for i in pareto_front([points[i] for i in left])]
        picks += _spread(front, lat, n - len(picks))
        left = [i for i in left if i not in front]
    return sorted(picks, key=lambda i: (not feasible[i], lat[i]))


def meets_all_but(
    budget: Budget, figs: dict[str, Any], base: dict[str, Any], skip: set[str], slower: float = 1.0
) -> bool:
    """Whether ``figs`` meet every limit of ``budget`` but those named in ``skip``, with the latency ``slower``
    times what was measured."""
    figs = {**figs, "latency_ms": figs["latency_ms"] * slower}
    return not any(v.field not in skip for v in budget.check(figs, base))


def _promote(study: Any, ctx: Context, baseline: dict[str, Any]) -> None:
    """The multi-fidelity ladder after the probes (see ``Space.sweep`` and ``Space.promote``). Once every structure
    probe has finished: queue the sweep (probed structures across the latency range, smallest recovery). Once the
    sweep has finished too: queue the best ``space.promote`` probed structures that meet every limit of the budget
    but accuracy (those that meet it ``LATENCY_MARGIN`` slower first; then swept ones by recovered accuracy), with
    the largest recovery (in a timed run sized to ``space.promote_time_share`` of the time
    left: :func:`sized_units`), then (``space.promote_front``) the rest of the sweep's front with the largest
    choice. Each runs once per study (study attributes record them, so resumed runs and other workers do not queue
    them again; the sized steps are stored on the queued trial)."""
    from optuna.trial import TrialState

    space = ctx.space
    if not space.probes() or study.user_attrs.get("promoted") is not None:
        return
    trials = study.get_trials(deepcopy=False)
    probes = [t for t in trials if t.user_attrs.get("probe")]
    if any(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in probes):
        return
    # probes are not clustered: when the space clusters, a zipped-size excess may still be clustered away
    later = {"max_accuracy_drop"} | ({"max_zipped_size_mb"} if any(space.cluster) else set())
    done = [t for t in probes if t.state == TrialState.COMPLETE and "figures" in t.user_attrs]
    base = baseline["figures"]
    feasible = [meets_all_but(ctx.budget, t.user_attrs["figures"], base, later) for t in done]
    # a structure whose probe meets the latency limit only within its measurement noise is promoted after the others
    # (its recovered model, quantized again, often lands on the wrong side: a ResNet-18 structure probed at 0.585 ms
    # measured 0.608 ms when promoted, against a 0.599 ms limit)
    safe = [meets_all_but(ctx.budget, t.user_attrs["figures"], base, later, LATENCY_MARGIN) for t in done]
    recal = [t.user_attrs.get("recal_accuracy", t.user_attrs["figures"]["accuracy"]) for t in done]
    if study.user_attrs.get("swept") is None:
        swept = [space.swept(t.user_attrs["params"]) for t in done] if space.sweep else []
        picks = []
        if swept and swept[0] is not None:
            points = [(a, t.user_attrs["figures"]["latency_ms"]) for a, t in zip(recal, done, strict=True)]
            picks = [swept[i] for i in sweep_picks(points, feasible, space.sweep)]
        for p in picks:
            study.enqueue_trial(space.optuna_params(p), user_attrs={"sweep": True}, skip_if_exists=True)
        study.set_user_attr("swept", len(picks))
        if picks:
            log.info(
                "optimize: %d of %d probed structures queued with the smallest recovery (%d steps), across the "
                "latency range",
                len(picks),
                len(probes),
                picks[0]["finetune_steps"],
            )
            return
    sweep = [t for t in trials if t.user_attrs.get("sweep")]
    if any(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in sweep):
        return
    swept_done = [t for t in sweep if t.state == TrialState.COMPLETE and "figures" in t.user_attrs]
    recovered = {structure_key(t.user_attrs["params"]): t.user_attrs["figures"]["accuracy"] for t in swept_done}
    tried = {repr(t.user_attrs.get("params")) for t in sweep}
    ok = []
    for t, fits, clear, acc in zip(done, feasible, safe, recal, strict=True):
        p = space.promoted(t.user_attrs["params"])
        if not fits or not p["finetune_steps"] or repr(p) in tried:  # swept at the largest recovery already
            continue
        sk = structure_key(p)
        ok.append(((clear, sk in recovered, recovered.get(sk, acc)), -t.number, p))
    picks = [p for _, _, p in sorted(ok, key=lambda r: (r[0], r[1]), reverse=True)[: space.promote]]
    n_budget = len(picks)
    if space.promote_front:
        points = [(t.user_attrs["figures"]["accuracy"], t.user_attrs["figures"]["latency_ms"]) for t in swept_done]
        queued = tried | {repr(q) for q in picks}
        for i in sorted(pareto_front(points), key=lambda i: points[i][1]):
            p = space.promoted(swept_done[i].user_attrs["params"])
            if p["finetune_steps"] and repr(p) not in queued:
                picks.append(p)
                queued.add(repr(p))
    left = None if ctx.deadline is None else ctx.deadline - time.perf_counter()
    largest = max(space.finetune_steps)
    # the budget's picks get the time; the front's (context for the plot) the largest choice
    units = sized_units(space, picks[:n_budget], swept_done, left) + [largest] * (len(picks) - n_budget)
    # the same recovered model (cached: seconds each), quantized as the input model kept accuracy best, and left in
    # float when the space has that choice: the slower, more accurate points of the front
    quant = best_quantization(study, space) if space.requantize else None
    # and at the other weight granularity (per-channel weights: a few more bytes, often less loss; per-tensor: the
    # smaller file): two deployment choices a few seconds apart that the front shows side by side
    flipped = [{**quant, "per_channel": not quant["per_channel"]}] if quant and len(set(space.per_channel)) > 1 else []
    changes = (
        ([quant] if quant else [])
        + flipped
        + ([{"quantize": False}] if space.requantize and False in space.quantize else [])
    )
    n_requant = 0
    for p, n in zip(picks, units, strict=True):
        sized = {"recovery_units": n} if n != largest else {}
        study.enqueue_trial(space.optuna_params(p), user_attrs={"promoted": True, **sized}, skip_if_exists=True)
        for v in (space.canonical({**p, **change}) for change in changes):
            if v != p:
                study.enqueue_trial(space.optuna_params(v), user_attrs={"requant": True, **sized}, skip_if_exists=True)
                n_requant += 1
    study.set_user_attr("promoted", len(picks))
    if n_requant:
        log.info(
            "optimize: %d trials of the promoted structures' recovered models quantized as the most accurate PTQ "
            "trial was (%s) or left in float",
            n_requant,
            ", ".join(f"{k}={v}" for k, v in quant.items()) if quant else "no PTQ trial",
        )
    log.info(
        "optimize: %d of %d probed structures meet the budget's non-accuracy limits; %d queued with the longest "
        "recovery (best recovered accuracy in the sweep first; steps at 50%% MACs: %s), %d more from the sweep's "
        "front (%d steps)",
        sum(feasible),
        len(probes),
        n_budget,
        units[:n_budget],
        len(picks) - n_budget,
        largest,
    )


def best_quantization(study: Any, space: Space) -> dict[str, Any] | None:
    """The quantization settings of the most accurate completed PTQ-only trial (INT8, nothing pruned, factorized
    or clustered; ties by latency), or None when there is none."""
    from optuna.trial import TrialState

    from edgeslim.pipeline._space import QUANT_PARAMS

    ptq = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "figures" in t.user_attrs
        and t.user_attrs["params"].get("quantize")
        and not restructured(t.user_attrs["params"])
        and not t.user_attrs["params"].get("cluster")
    ]
    if not ptq:
        return None
    best = min(
        ptq, key=lambda t: (-t.user_attrs["figures"]["accuracy"], t.user_attrs["figures"]["latency_ms"], t.number)
    )
    return {k: best.user_attrs["params"][k] for k in QUANT_PARAMS}


#: promoted recoveries sized by time: at most this many times the largest ``finetune_steps`` choice
SIZED_MAX_FACTOR = 10


def sized_units(space: Space, picks: list[dict[str, Any]], swept: list[Any], seconds_left: float | None) -> list[int]:
    """The recovery of each promoted candidate in ``finetune_steps`` units (see ``Space.promote_time_share``):
    ``promote_time_share`` of ``seconds_left`` split evenly over ``picks``, less each trial's other costs, at the
    seconds per unit its structure's swept trial measured (the median of the swept trials for a structure not
    swept); between the largest ``finetune_steps`` choice and ``SIZED_MAX_FACTOR`` times it, rounded down to 100.
    Without a time limit (``seconds_left`` None), a share of 0 or no measured sweep: the largest choice."""
    largest = max(space.finetune_steps)
    rates: dict[str, tuple[float, float]] = {}  # structure -> (seconds per unit, seconds of the rest of the trial)
    for t in swept:
        p, st = t.user_attrs["params"], t.user_attrs.get("steps") or {}
        rec = st.get(p.get("recovery") or "finetune") or {}
        if rec.get("seconds") and not rec.get("cached") and p.get("finetune_steps"):
            rest = max(0.0, float(t.user_attrs.get("seconds") or 0.0) - rec["seconds"])
            rates[structure_key(p)] = (rec["seconds"] / p["finetune_steps"], rest)
    if seconds_left is None or not space.promote_time_share or not picks or not rates:
        return [largest] * len(picks)
    each = space.promote_time_share * max(0.0, seconds_left) / len(picks)
    typical = (statistics.median(r for r, _ in rates.values()), statistics.median(o for _, o in rates.values()))
    out = []
    for p in picks:
        rate, rest = rates.get(structure_key(p), typical)
        n = int((each - rest) / rate) // 100 * 100  # rate > 0: measured seconds of non-zero steps
        out.append(min(max(n, largest), SIZED_MAX_FACTOR * largest))
    return out


def _progress_bar(total: int | None, initial: int, enabled: bool | None) -> Any:
    """Trial n of N on stderr (edgeslim.core.progress: on when ``progress`` says so, or the caller turned it on)."""
    from edgeslim.core.progress import bar

    b = bar(desc="optimize: trials", total=total, unit="trial", leave=True, on=enabled)
    if initial:
        b.update(min(initial, total or initial))
    return b


def _best_text(study: Any, ctx: Context, baseline: dict[str, Any], deadline: float | None) -> str:
    ranked, feasible = _ranked(study, ctx.budget)
    left = f", {max(0.0, (deadline - time.perf_counter()) / 60):.1f} min left" if deadline else ""
    if not ranked:
        return "no completed trial yet" + left
    t = ranked[0]
    f, b = t.user_attrs["figures"], baseline["figures"]
    state = "meets budget" if feasible else "closest, budget not met"
    return (
        f"best #{t.number}: {'mAP' if ctx.task.kind == 'detect' else 'acc'} {100 * f['accuracy']:.2f}% "
        f"({100 * (f['accuracy'] - b['accuracy']):+.2f} pt), "
        f"{b['latency_ms'] / f['latency_ms']:.2f}x, {state}{left}"
    )


def _ranked(study: Any, budget: Budget) -> tuple[list[Any], bool]:
    """Completed trials best first: those meeting the budget ranked by ``prefer``, else all by closeness."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if "figures" in t.user_attrs]
    feasible = [t for t in done if not t.user_attrs["violations"]]
    if feasible:
        return sorted(feasible, key=lambda t: _prefer_key(t.user_attrs["figures"], budget.prefer, t.number)), True
    return sorted(done, key=lambda t: (_excess(t.user_attrs["violations"]), t.number)), False


def final_order(ranked: list[Any], feasible: bool) -> list[Any]:
    """The trials re-measured on the whole validation split after the search, in order (the first that meets the
    budget there is chosen): the ``FINAL_CANDIDATES`` best by ``prefer``, then the ``FINAL_MARGIN_CANDIDATES``
    other feasible trials with the highest search-subset accuracy (ties in ``ranked``'s order). Without a feasible
    trial: the closest one alone."""
    if not feasible:
        return ranked[:1]
    head = ranked[:FINAL_CANDIDATES]
    rest = sorted(ranked[FINAL_CANDIDATES:], key=lambda t: -t.user_attrs["figures"]["accuracy"])  # stable
    return head + rest[:FINAL_MARGIN_CANDIDATES]


def _prefer_key(f: dict[str, float], prefer: Prefer, number: int) -> tuple:
    if prefer == Prefer.ACCURACY:
        return (-f["accuracy"], f["latency_ms"], number)
    if prefer == Prefer.SIZE:
        return (f["size_mb"], f["latency_ms"], number)
    return (f["latency_ms"], -f["accuracy"], number)


def _excess(violations: list[dict[str, Any]]) -> float:
    """How far a candidate is from the budget: the sum of its relative excesses over the limits."""
    return sum(max(0.0, v["excess"]) for v in violations)


# ---------------------------------------------------------------------------------------------- final
def _final_figures(
    ctx: Context,
    art: Artifact,
    ck: str,
    base_art: Artifact,
    base_ck: str,
    params: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(candidate, baseline) figures on the whole validation split; host latency re-measured interleaved (the
    candidate on its deployment's runtime and threads, the baseline on the budget's)."""
    cand = measure_candidate(ctx, art, ck, data=ctx.val, cache=False, params=params)
    base = measure_candidate(ctx, base_art, base_ck, data=ctx.val, cache=True)
    base = {**base, "figures": dict(base["figures"]), "provenance": dict(base["provenance"])}
    if ctx.budget.on_host:
        deps = [deployment(ctx, None), deployment(ctx, params)]
        b_ms, c_ms = interleaved_latency(ctx, [base_art.path, art.path], deployments=deps)
        how = "; re-measured after the search, 3 rounds interleaved with the FP32 baseline, median of the rounds"
        cand["figures"]["latency_ms"], cand["provenance"]["latency_ms"] = c_ms, cand["provenance"]["latency_ms"] + how
        base["figures"]["latency_ms"], base["provenance"]["latency_ms"] = b_ms, base["provenance"]["latency_ms"] + how
    return cand, base


def _finish(
    study: Any,
    ctx: Context,
    baseline: dict[str, Any],
    out: Path,
    stopped: str,
    requeued: list[int],
    url: str,
    t_start: float,
) -> OptimizeResult:
    from optuna.trial import TrialState

    budget = ctx.budget
    ranked, feasible = _ranked(study, budget)
    ctx.ungated = True  # completed trials are rebuilt (from the cache): the gates decided when they ran
    _, base_art, base_ck, _ = build_candidate(ctx, ctx.space.canonical(BASELINE))
    trials = study.get_trials(deepcopy=False)
    notes: list[str] = list(ctx.notes)
    tried: list[tuple[Any, dict, dict, list[Violation]]] = []
    for t in final_order(ranked, feasible):
        _, art, ck, _ = build_candidate(ctx, t.user_attrs["params"])
        cand, base = _final_figures(ctx, art, ck, base_art, base_ck, t.user_attrs["params"])
        tried.append((t, cand, base, budget.check(cand["figures"], base["figures"])))
        if not tried[-1][3]:
            break
    if tried:
        ok = [r for r in tried if not r[3]]
        pick = ok[0] if ok else min(tried, key=lambda r: (_excess([v.to_dict() for v in r[3]]), r[0].number))
        if feasible and not ok:
            notes.append(
                f"{len(tried)} candidate(s) met the budget on the {len(ctx.search_val)}-sample search "
                "subset but not on the whole validation split; the closest of them is saved"
            )
        elif ok and len(tried) > 1:
            notes.append(
                f"trial(s) {', '.join(str(r[0].number) for r in tried[:-1])} met the budget on the "
                f"{len(ctx.search_val)}-sample search subset but not on the whole validation split; trial "
                f"{tried[-1][0].number} does"
            )
        t, cand, base, viol = pick
        chosen_params, chosen_no, chosen_steps = t.user_attrs["params"], t.number, t.user_attrs.get("steps", {})
    else:  # every trial failed: the input model itself is the closest candidate there is
        errors = [t.user_attrs["error"] for t in trials if "error" in t.user_attrs]
        notes.append(
            f"no trial completed ({len(errors)} failed; first error: {errors[0] if errors else 'none'}); "
            "the FP32 input model is reported as the candidate"
        )
        chosen_params, chosen_no, chosen_steps = ctx.space.canonical(BASELINE), None, {}
        cand, base = _final_figures(ctx, base_art, base_ck, base_art, base_ck)
        viol = budget.check(cand["figures"], base["figures"])
    model, art, _, _ = build_candidate(ctx, chosen_params)
    paths, recipe = _save_chosen(ctx, out, chosen_params, chosen_no, model, art, not viol)
    lost = {t.user_attrs["retry_of"] for t in trials if "worker_lost" in t.user_attrs}  # failed by a heartbeat
    counts = {s.name.lower(): 0 for s in TrialState}
    dups = gated = stopped_by_deadline = 0
    for t in trials:
        if "duplicate_of" in t.user_attrs:
            dups += 1
        elif "gated" in t.user_attrs:
            gated += 1
        elif "deadline" in t.user_attrs:
            stopped_by_deadline += 1
        else:
            counts[t.state.name.lower()] += 1
    doc = {
        "title": f"edgeslim optimize: {type(ctx.base).__name__} on {ctx.val.name}",
        "edgeslim_version": __version__,
        "seconds": round(time.perf_counter() - t_start, 1),
        "study": {
            "name": study.study_name,
            "storage": _store.redact(url),
            "stopped": stopped,
            "requeued_on_resume": requeued,
        },
        "budget": budget.to_dict(),
        "budget_lines": budget.describe(),
        "space": ctx.space.to_dict(),
        "target": budget.device_name(),
        "runtime": budget.runtime,
        "threads": budget.threads,
        "latency_source": "measured on the host" if budget.on_host else f"predicted for {budget.device_name()}",
        "task": ctx.task.kind,
        "metric": ctx.task.metric_label,
        "host": ctx.host,
        "search_data": f"{len(ctx.search_val)} samples of {ctx.val.name}/{ctx.val.split} (seeded subset; search proxy)",
        "final_data": f"all {len(ctx.val)} samples of {ctx.val.name}/{ctx.val.split}",
        "baseline": baseline,
        "baseline_final": base["figures"],
        "baseline_final_provenance": base["provenance"],
        "trials": {
            "complete": counts.get("complete", 0),
            "failed": counts.get("fail", 0),
            "duplicates": dups,
            "gated": gated,
            "deadline": stopped_by_deadline,
            "running": counts.get("running", 0),
            "waiting": counts.get("waiting", 0),
            "worker_lost": sorted(lost),
            "workers": sorted({t.user_attrs["worker"] for t in trials if "worker" in t.user_attrs}),
            "rows": [{**_trial_row(t, ctx.space), "worker_lost": t.number in lost} for t in trials],
        },
        "final_candidates": [
            {"trial": r[0].number, "final": r[1]["figures"], "violations": [v.to_dict() for v in r[3]]} for r in tried
        ],
        "chosen": {
            "trial": chosen_no,
            "params": chosen_params,
            "description": describe(chosen_params, ctx.space),
            "deployment": dict(zip(("runtime", "threads"), deployment(ctx, chosen_params), strict=True)),
            "meets_budget": not viol,
            "violations": [v.to_dict() for v in viol],
            "final": cand["figures"],
            "final_provenance": cand["provenance"],
            "steps": chosen_steps,
            "artifact": str(paths["artifact"]),
            "recipe": str(paths["recipe"]),
        },
        "notes": notes,
    }
    if viol:
        notes.append("nothing met the budget; closest candidate: " + "; ".join(v.text for v in viol))
    paths.update(write_report(doc, out))
    rep = OptimizeReport(data=doc)
    log.info("%s", rep.summary())
    return OptimizeResult(
        model=model,
        artifact=Artifact.load(paths["artifact"]),
        recipe=recipe,
        report=rep,
        meets_budget=not viol,
        violations=[v.to_dict() for v in viol],
        paths=paths,
    )


def _trial_row(t: Any, space: Space) -> dict[str, Any]:
    u = t.user_attrs
    return {
        "number": t.number,
        "state": t.state.name.lower(),
        "stage": next((k for k in STAGES if u.get(k)), None),
        "params": u.get("params", t.params),
        "description": describe(u["params"], space) if "params" in u else "",
        "figures": u.get("figures"),
        "violations": u.get("violations"),
        "error": u.get("error"),
        "duplicate_of": u.get("duplicate_of"),
        "gated": u.get("gated"),
        "deadline": u.get("deadline"),
        "recal_accuracy": u.get("recal_accuracy"),
        "deployment": u.get("deployment"),
        "seconds": u.get("seconds"),
        "requeued": u.get("requeued"),
        "retry_of": u.get("retry_of"),
        "worker": u.get("worker"),
        "cached_steps": sorted(k for k, v in (u.get("steps") or {}).items() if v.get("cached")),
    }


def _save_chosen(
    ctx: Context, out: Path, params: dict[str, Any], trial: int | None, model: nn.Module, art: Artifact, meets: bool
) -> tuple[dict[str, Path], dict[str, Any]]:
    """Write the chosen candidate to ``out/chosen/``: the ONNX file (+ its record), the model as one edgeslim
    recipe file (``model.recipe``: every step + the state_dict; ``edgeslim.load``) and ``recipe.json`` (the
    trial's parameters, which replay through :func:`build_candidate`)."""
    from edgeslim.core import recipe as _recipe

    d = out / "chosen"
    d.mkdir(parents=True, exist_ok=True)
    target = d / "model.onnx"
    tmp = d / ".model.onnx.tmp"
    shutil.copyfile(art.path, tmp)
    tmp.replace(target)
    chosen_art = Artifact(
        target,
        art.format,
        art.precision,
        art.input_shape,
        art.validation,
        {
            **art.meta,
            "optimize_trial": trial,
            "meets_budget": meets,
            "deployment": dict(zip(("runtime", "threads"), deployment(ctx, params), strict=True)),
        },
    )
    chosen_art.save_record(force=True)
    _recipe.save(model, d / "model.recipe", force=True)
    recipe = {
        "format": RECIPE_FORMAT,
        "trial": trial,
        "params": params,
        "description": describe(params, ctx.space),
        "deployment": dict(zip(("runtime", "threads"), deployment(ctx, params), strict=True)),
        "steps": [{k: st.get(k) for k in ("technique", "config", "summary")} for st in _recipe.steps_of(model)],
        "base_model": {"class": type(ctx.base).__name__, "sha256": _store.state_hash(ctx.base)},
        "space": ctx.space.to_dict(),
        "seed": ctx.seed,
        "early_layers": list(ctx.early_layers),
        "files": {"artifact": "model.onnx", "model": "model.recipe"},
        "meets_budget": meets,
        "replay": "edgeslim.load('model.recipe', model=<a fresh instance of the input model>) rebuilds the "
        "model; edgeslim.pipeline.build_candidate replays the params on the input model and the data",
    }
    write_json(d / "recipe.json", recipe, force=True)
    return {"artifact": target, "recipe": d / "recipe.json", "model": d / "model.recipe"}, recipe


def load_chosen(model: nn.Module, folder: str | Path) -> nn.Module:
    """Rebuild the chosen candidate saved in ``folder`` (``out/chosen``) on a fresh copy of the input model (its
    architecture; the weights come from ``model.recipe``). ``model`` is not modified."""
    from edgeslim.pipeline._recipe import load

    d = Path(folder)
    if not (d / "model.recipe").is_file():
        raise ModelError(f"{str(d)!r} holds no chosen optimize candidate (model.recipe)")
    return load(d / "model.recipe", model=model)


__all__ = ["OptimizeReport", "OptimizeResult", "load_chosen", "optimize", "pareto_front"]
