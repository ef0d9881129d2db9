"""``edgeslim optimize``: the command-line face of :func:`edgeslim.optimize` (wired into ``cli.py``'s parser by
:func:`add_optimize_parser`).

    edgeslim optimize mobilenet_v2 --max-drop 0.5 --min-speedup 3 --target host --minutes 30 --out runs/mbv2
    edgeslim optimize mobilenet_v2 --budget budget.yaml --space space.yaml --out runs/mbv2 --resume
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from typing import Any

from edgeslim.core.errors import ConfigError


#: exit status when the search finished but no candidate meets the budget (the closest one is still saved)
EXIT_NOT_MET = 3


def add_optimize_parser(sub: Any, add: Callable[[str, Callable, str], argparse.ArgumentParser]
                        ) -> argparse.ArgumentParser:
    """Add the ``optimize`` subcommand with ``add(name, fn, help)`` (cli.py's helper, which adds ``--json``)."""
    o = add("optimize", cmd_optimize, "search prune / fine-tune / INT8 chains for the model that meets a budget "
            "(measured on this host or predicted for a device); save the chosen artifact and a report")
    o.add_argument("model", help="zoo name (small_cnn, mobilenet_v2, resnet18) or 'package.module:function' (runs "
                   "that code)")
    o.add_argument("--dataset", default="fashion-mnist", help="dataset name or folder:<path> (default fashion-mnist)")
    o.add_argument("--weights", help="state_dict file to load (read with weights_only=True)")
    o.add_argument("--no-pretrained", action="store_true", help="random initialisation instead of the shipped "
                   "checkpoint")
    o.add_argument("--budget", metavar="YAML", help="Budget YAML (the limit options below override it)")
    o.add_argument("--space", metavar="YAML", help="search Space YAML (default: edgeslim's default space)")
    o.add_argument("--max-drop", type=float, metavar="PT", help="allowed top-1 drop in POINTS, e.g. 0.5 "
                   "(default 1.0, or the Budget YAML's)")
    o.add_argument("--max-latency-ms", type=float, metavar="MS", help="latency limit, batch 1")
    o.add_argument("--min-speedup", type=float, metavar="X", help="at least X times faster than the FP32 ONNX file")
    o.add_argument("--max-size-mb", type=float, metavar="MB", help="file size limit")
    o.add_argument("--max-memory-mb", type=float, metavar="MB", help="peak memory limit")
    o.add_argument("--max-energy-mj", type=float, metavar="MJ", help="energy per inference limit (estimated)")
    o.add_argument("--target", help="host (measured here, default) or a device profile name / YAML (predicted)")
    o.add_argument("--runtime", help="runtime measured on (default onnxruntime)")
    o.add_argument("--threads", type=int, help="deployment threads (default 1)")
    o.add_argument("--prefer", choices=["latency", "accuracy", "size"], help="what the choice among candidates "
                   "that meet the budget is best at (default latency)")
    o.add_argument("--minutes", type=float, help="stop starting trials after this many minutes")
    o.add_argument("--trials", type=int, help="stop after this many finished trials (default 40 without --minutes)")
    o.add_argument("--samples", type=int, help="validation samples accuracy is measured on during the search "
                   "(the chosen candidate is re-measured on all of them)")
    o.add_argument("--out", default="runs/optimize", help="run folder (study.db, cache/, chosen/, report.*)")
    o.add_argument("--storage", metavar="URL", help="shared Optuna storage, e.g. postgresql://user@host/db (workers "
                   "on several machines join one study with the same options and --resume)")
    o.add_argument("--resume", action="store_true", help="continue the run in --out (same model, data, budget)")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--sampler", choices=["tpe", "nsga2"], default="tpe")
    return o


_LIMITS = (("max_drop", "max_accuracy_drop"), ("max_latency_ms", "max_latency_ms"), ("min_speedup", "min_speedup"),
           ("max_size_mb", "max_size_mb"), ("max_memory_mb", "max_peak_memory_mb"),
           ("max_energy_mj", "max_energy_mj"))


def budget_from_args(a: argparse.Namespace) -> Any:
    """The Budget the options describe (over the ``--budget`` YAML when given)."""
    from edgeslim.pipeline._budget import Budget

    base = Budget.from_yaml(a.budget) if a.budget else Budget()
    changes: dict[str, Any] = {}
    for opt, field in _LIMITS:
        v = getattr(a, opt)
        if v is None:
            continue
        if not math.isfinite(v) or v < 0:
            raise ConfigError(f"--{opt.replace('_', '-')}={v:g} is not allowed; use a number >= 0")
        changes[field] = v / 100.0 if opt == "max_drop" else v
    if "max_latency_ms" in changes:
        changes.setdefault("min_speedup", None)
    if "min_speedup" in changes and changes["min_speedup"] is not None:
        changes.setdefault("max_latency_ms", None)
    for opt in ("target", "runtime", "threads", "prefer"):
        if getattr(a, opt) is not None:
            changes[opt] = getattr(a, opt)
    return base.replace(**changes) if changes else base


def cmd_optimize(a: argparse.Namespace) -> None:
    """Run :func:`edgeslim.optimize` as the options say; print the outcome (``--json``: as JSON)."""
    from edgeslim import data as es_data
    from edgeslim import models
    from edgeslim.pipeline._optimize import optimize
    from edgeslim.pipeline._space import Space

    budget = budget_from_args(a)  # every option is checked before the model and data load
    space = Space.from_yaml(a.space) if a.space else Space()
    if a.samples is not None:
        if a.samples < 1:
            raise ConfigError(f"--samples={a.samples} is not allowed; use an integer >= 1")
        space = space.replace(search_samples=a.samples)
    model = models.load(a.model, a.dataset, pretrained=not a.no_pretrained, weights=a.weights)
    train, val = es_data.load(a.dataset)
    res = optimize(model, data=(train, val), budget=budget, space=space, max_trials=a.trials, max_minutes=a.minutes,
                   out=a.out, storage=a.storage, seed=a.seed, resume=a.resume, progress=None,
                   sampler=a.sampler)
    paths = {k: str(v) for k, v in res.paths.items()}
    if a.json:
        print(json.dumps({"meets_budget": res.meets_budget, "violations": res.violations, "recipe": res.recipe,
                          "final": res.report.data["chosen"]["final"],
                          "baseline_final": res.report.data["baseline_final"], "paths": paths}, indent=2,
                         default=str))
    else:
        print(res.report.summary())
        print("\n".join(f"wrote {v}" for v in paths.values()))
    return 0 if res.meets_budget else EXIT_NOT_MET
