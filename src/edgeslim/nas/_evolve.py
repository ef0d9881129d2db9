"""The evolutionary width search: NSGA-II (Optuna) over every unit's width at once, in a resumable run store.

A trial's genotype is one width index per unit. It is *repaired* onto the budget: when the predicted latency is over
it, every unit is moved the same fraction of the way towards its narrowest width (bisection on that fraction), so
every candidate meets the budget by the latency model and none is wasted. The candidate is then realized with
inherited weights (``edgeslim.prune``), its BatchNorm statistics re-estimated on training inputs, and it is scored
on a validation subset. The two objectives are that accuracy (up) and the predicted latency (down); the first
trial is the uniform shrink (all units at full width, repaired), so the search starts from the uniform answer.

Trials live in an Optuna RDB storage (``edgeslim.core.store``, the same store ``edgeslim.optimize`` uses): a SQLite
file by default, or a PostgreSQL URL that several workers share. The study records the budget and the fitted
latency model when it is created; a resumed run or a joining worker uses those, so a trial means the same thing
in every process. A trial a killed process left RUNNING is queued again in place (SQLite, one process under a file
lock) or, in a shared study, failed by Optuna's heartbeat and queued again with the same parameters.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch import nn

from edgeslim.core import store as _store
from edgeslim.core.errors import ConfigError

log = logging.getLogger(__name__)

#: config fields that change what a trial computes: a study is only resumed with the same values
IDENT_FIELDS = (
    "latency_budget_ms",
    "latency_ratio",
    "runtime",
    "threads",
    "device",
    "round_to",
    "min_keep",
    "exclude",
    "importance",
    "bn_samples",
    "val_samples",
    "grid_points",
    "population",
    "seed",
)


def model_key(model: nn.Module, val: Any) -> str:
    """A content hash of a model's weights and the validation subset candidates are scored on."""
    h = hashlib.sha256(type(model).__name__.encode())
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).numpy().tobytes() if t.numel() else b"")
    h.update(val.images.contiguous().numpy().tobytes())
    h.update(val.labels.contiguous().numpy().tobytes())
    return h.hexdigest()


def default_storage(table_dir: str) -> str:
    """``sqlite:///`` of ``<table_dir>/nas-studies.db``, or ``~/.cache/edgeslim/nas/studies.db``."""
    from edgeslim.nas._table import default_dir

    path = Path(table_dir) / "nas-studies.db" if table_dir else default_dir().parent / "nas" / "studies.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path.resolve()}"


def storage_url(storage: Any, table_dir: str) -> str:
    if storage is None:
        return default_storage(table_dir)
    if isinstance(storage, Path) or (isinstance(storage, str) and "://" not in storage):
        p = Path(storage)
        p.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{p.resolve()}"
    if not isinstance(storage, str):
        raise ConfigError(
            f"storage={storage!r} is not allowed; give a SQLite file path, an RDB URL (sqlite:///f.db, "
            "postgresql://user@host/db) or None"
        )
    return storage


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    import optuna

    was = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(was)


class Evolution:
    """One evolutionary search: open (or resume) the study, run trials up to the count, pick the best.

    Args:
        space: the width space.
        predicted: latency (ms) of a point, by the anchored latency model (read at call time: a resumed study
            replaces the model's coefficients with the ones it was created with).
        score: accuracy of a point (realize, recalibrate BN, evaluate).
        config: the NASConfig.
        ident: what the study is for (model/data hash and the config's identity fields).
    """

    def __init__(
        self,
        space: Any,
        predicted: Callable[[dict[str, int]], float],
        score: Callable[[dict[str, int]], float],
        config: Any,
        ident: dict[str, Any],
    ) -> None:
        self.space, self.predicted, self.score, self.config, self.ident = space, predicted, score, config, ident
        self.units = list(space.units)
        blob = json.dumps(ident, sort_keys=True, default=str).encode()
        self.name = "edgeslim-nas-" + hashlib.sha256(blob).hexdigest()[:16]
        self.budget = 0.0
        self.requeued: list[int] = []
        self.resumed = 0

    # ------------------------------------------------------------------------------------------ genotype
    def repair(self, genes: dict[str, int], budget: float) -> tuple[dict[str, int], bool]:
        """The point of ``genes`` (unit -> width index) moved towards the narrowest point until it meets
        ``budget`` by the latency model; True when it had to move."""
        ch = {n: self.space.units[n].choices for n in self.units}
        point = {n: ch[n][genes[n]] for n in self.units}
        if self.predicted(point) <= budget:
            return point, False

        def at(t: float) -> dict[str, int]:
            out = {}
            for n in self.units:
                lo, hi = ch[n][0], point[n]
                want = lo + t * (hi - lo)
                out[n] = max(w for w in ch[n] if w <= want + 1e-9)
            return out

        lo_t, hi_t = 0.0, 1.0
        for _ in range(14):
            mid = (lo_t + hi_t) / 2
            if self.predicted(at(mid)) <= budget:
                lo_t = mid
            else:
                hi_t = mid
        return at(lo_t), True

    # ------------------------------------------------------------------------------------------- running
    def run(self, url: str, budget: float, model_info: dict[str, Any], restore: Callable[[dict], float]) -> Any:
        """Run the study at ``url`` until it holds ``config.trials`` finished trials; returns the study.

        ``model_info`` (the latency model and budget) is stored in a new study; for a study that exists,
        ``restore`` is called with what it stored and returns the budget to use.
        """
        import optuna
        from optuna.trial import TrialState

        cfg = self.config
        lock_file = _store.sqlite_file(url)
        shared = lock_file is None
        with contextlib.ExitStack() as stack:
            stack.enter_context(_quiet_optuna())
            if not shared:
                stack.enter_context(_store.file_lock(lock_file + ".lock", what="width search"))
            st = _store.open_storage(url, shared=shared)
            study = optuna.create_study(
                storage=st,
                study_name=self.name,
                directions=["maximize", "minimize"],
                sampler=_store.seeded_sampler("nsga2", cfg.seed, population=cfg.population),
                load_if_exists=True,
            )
            slots = _store.StudyLock(st, self.name, shared=shared)
            stack.callback(slots.close)
            with slots.held():
                if "ident" not in study.user_attrs:
                    study.set_user_attr("ident", json.loads(json.dumps(self.ident, default=str)))
                    study.set_user_attr("latency_model", {**model_info, "budget_ms": budget})
                    # the uniform shrink first: every unit at full width, repaired onto the budget
                    study.enqueue_trial({f"w:{n}": len(self.space.units[n].choices) - 1 for n in self.units})
                    self.budget = budget
                else:
                    self.budget = restore(study.user_attrs["latency_model"])
                    self.resumed = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
                self.requeued = [] if shared else _store.requeue_running(study, st)
            seen: dict[str, tuple[float, float]] = {}
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                if "widths" in t.user_attrs:
                    seen[json.dumps(t.user_attrs["widths"], sort_keys=True)] = (t.values[0], t.values[1])
            me = _store.worker_id()
            while True:
                with slots.held():
                    n = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)))
                    if n >= cfg.trials:
                        break
                    trial = study.ask()
                trial.set_user_attr("worker", me)
                genes = {n: trial.suggest_int(f"w:{n}", 0, len(self.space.units[n].choices) - 1) for n in self.units}
                point, moved = self.repair(genes, self.budget)
                k = json.dumps(point, sort_keys=True)
                if k in seen:
                    acc, lat = seen[k]
                    trial.set_user_attr("duplicate", True)
                else:
                    acc, lat = self.score(point), self.predicted(point)
                    seen[k] = (acc, lat)
                trial.set_user_attr("widths", point)
                trial.set_user_attr("repaired", moved)
                study.tell(trial, [acc, lat])
                log.info(
                    "nas trial %d: accuracy %.4f, predicted %.3f ms%s", trial.number, acc, lat, " (repaired)" * moved
                )
            return study

    @staticmethod
    def ranked(study: Any, target: float) -> list[tuple[float, float, dict[str, int], int]]:
        """Finished trials whose predicted latency is within ``target``, best accuracy first (then faster)."""
        from optuna.trial import TrialState

        out = [
            (t.values[0], t.values[1], dict(t.user_attrs["widths"]), t.number)
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if "widths" in t.user_attrs and t.values[1] <= target + 1e-9
        ]
        return sorted(out, key=lambda r: (-r[0], r[1], r[3]))
