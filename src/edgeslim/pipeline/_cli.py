"""``edgeslim optimize``: the command-line face of :func:`edgeslim.optimize` (wired into ``cli.py``'s parser by
:func:`add_optimize_parser`).

    edgeslim optimize mobilenet_v2 --max-drop 0.5 --min-speedup 3 --target host --minutes 30 --out runs/mbv2
    edgeslim optimize mobilenet_v2 --budget budget.yaml --space space.yaml --out runs/mbv2 --resume
    edgeslim optimize mobilenet_v2 --max-drop 0.5 --trials 60 --storage postgresql://me@db/opt --out runs/mbv2
    edgeslim optimize --resume runs/mbv2 --worker        # another process or machine joins the shared study

The options a run was started with are recorded in ``out/run.json`` (``command``), so ``--resume RUN`` without a
model continues it, and ``--worker`` joins its shared study, with the same model, data, budget and space.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeslim.core.errors import ConfigError

#: exit status when the search finished but no candidate meets the budget (the closest one is still saved)
EXIT_NOT_MET = 3


def add_optimize_parser(
    sub: Any, add: Callable[[str, Callable, str], argparse.ArgumentParser]
) -> argparse.ArgumentParser:
    """Add the ``optimize`` subcommand with ``add(name, fn, help)`` (cli.py's helper, which adds ``--json``)."""
    o = add(
        "optimize",
        cmd_optimize,
        "search prune / fine-tune / INT8 chains for the model that meets a budget "
        "(measured on this host or predicted for a device); save the chosen artifact and a report",
    )
    o.add_argument(
        "model",
        nargs="?",
        help="zoo name (small_cnn, mobilenet_v2, resnet18) or "
        "'package.module:function' (runs that code); left out with --resume RUN / --worker: the run's own",
    )
    o.add_argument("--dataset", help="dataset name or folder:<path> (default fashion-mnist)")
    o.add_argument("--weights", help="state_dict file to load (read with weights_only=True)")
    o.add_argument(
        "--no-pretrained", action="store_true", help="random initialisation instead of the shipped checkpoint"
    )
    o.add_argument("--budget", metavar="YAML", help="Budget YAML (the limit options below override it)")
    o.add_argument(
        "--space",
        metavar="YAML",
        help="search Space YAML, or 'ptq' (INT8 PTQ variants only: no pruning or training) or 'full' (the "
        "default space + mixed precision, FP16, ONNX Runtime vs OpenVINO where installed); default: edgeslim's "
        "default space (pruning to 75%% MACs, fine-tune or distillation recovery, INT8 variants)",
    )
    o.add_argument(
        "--max-drop",
        type=float,
        metavar="PT",
        help="allowed top-1 drop in POINTS, e.g. 0.5 (default 1.0, or the Budget YAML's)",
    )
    o.add_argument("--max-latency-ms", type=float, metavar="MS", help="latency limit, batch 1")
    o.add_argument("--min-speedup", type=float, metavar="X", help="at least X times faster than the FP32 ONNX file")
    o.add_argument("--max-size-mb", type=float, metavar="MB", help="file size limit")
    o.add_argument(
        "--max-zipped-size-mb",
        type=float,
        metavar="MB",
        help="limit on the file's size after zlib level 9 (a download; weight clustering lowers only this one)",
    )
    o.add_argument("--max-memory-mb", type=float, metavar="MB", help="peak memory limit")
    o.add_argument("--max-energy-mj", type=float, metavar="MJ", help="energy per inference limit (estimated)")
    o.add_argument("--target", help="host (measured here, default) or a device profile name / YAML (predicted)")
    o.add_argument("--runtime", help="runtime measured on (default onnxruntime)")
    o.add_argument("--threads", type=int, help="deployment threads (default 1)")
    o.add_argument(
        "--prefer",
        choices=["latency", "accuracy", "size"],
        help="what the choice among candidates that meet the budget is best at (default latency)",
    )
    o.add_argument("--minutes", type=float, help="stop starting trials after this many minutes (of this process)")
    o.add_argument("--trials", type=int, help="stop after this many finished trials (default 40 without --minutes)")
    o.add_argument(
        "--samples",
        type=int,
        help="validation samples accuracy is measured on during the search "
        "(the chosen candidate is re-measured on all of them)",
    )
    o.add_argument(
        "--recovery-processes",
        type=int,
        metavar="N",
        help="run each trial's recovery (fine-tune / distillation) as N torchrun DDP processes (gloo, CPU; "
        "--threads // N threads each); sets the space's recovery_processes (default 1: in the trial's process)",
    )
    o.add_argument("--out", help="run folder (study.db, cache/, chosen/, report.*; default runs/optimize)")
    o.add_argument(
        "--storage",
        metavar="URL",
        help="shared Optuna storage, e.g. postgresql://user@host/db: workers "
        "(--worker) on this or other machines join the study; recorded in run.json without its password",
    )
    o.add_argument(
        "--resume",
        nargs="?",
        const=True,
        metavar="RUN",
        help="continue the run in RUN (default: --out); without a model, with the options it was started with",
    )
    o.add_argument(
        "--worker",
        action="store_true",
        help="join the shared study of the run (--resume RUN): its "
        "model, data, budget, space and storage from RUN/run.json; run trials until the study's trial "
        "budget is used up, then write the report from the whole study",
    )
    o.add_argument(
        "--heartbeat",
        type=int,
        metavar="S",
        help="shared storage: seconds between a worker's "
        "heartbeats; a trial whose worker is silent for 3 of them is queued again (default 10)",
    )
    o.add_argument("--seed", type=int, help="default 0")
    o.add_argument("--sampler", choices=["tpe", "nsga2"], help="default tpe")
    return o


_LIMITS = (
    ("max_drop", "max_accuracy_drop"),
    ("max_latency_ms", "max_latency_ms"),
    ("min_speedup", "min_speedup"),
    ("max_size_mb", "max_size_mb"),
    ("max_zipped_size_mb", "max_zipped_size_mb"),
    ("max_memory_mb", "max_peak_memory_mb"),
    ("max_energy_mj", "max_energy_mj"),
)


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


def cmd_optimize(a: argparse.Namespace) -> int:
    """Run :func:`edgeslim.optimize` as the options (or the run's ``run.json``) say; print the outcome
    (``--json``: as JSON)."""
    from edgeslim.pipeline._optimize import optimize

    if a.heartbeat is not None and a.heartbeat < 1:
        raise ConfigError(f"--heartbeat={a.heartbeat} is not allowed; use an integer >= 1 (seconds)")
    out = _run_folder(a)
    recorded = a.worker or a.model is None
    kw, had_password = _from_record(a, out) if recorded else (_from_options(a, out), False)
    try:
        res = optimize(**kw, out=out, progress=None)
    except ConfigError as e:
        if had_password and a.storage is None and "does not answer" in str(e):
            raise ConfigError(
                f"{e} (run.json keeps no password: give the URL with it in --storage, or set PGPASSWORD or ~/.pgpass)"
            ) from None
        raise
    paths = {k: str(v) for k, v in res.paths.items()}
    if a.json:
        print(
            json.dumps(
                {
                    "meets_budget": res.meets_budget,
                    "violations": res.violations,
                    "recipe": res.recipe,
                    "final": res.report.data["chosen"]["final"],
                    "baseline_final": res.report.data["baseline_final"],
                    "trials": {k: v for k, v in res.report.data["trials"].items() if k != "rows"},
                    "paths": paths,
                },
                indent=2,
                default=str,
            )
        )
    else:
        print(res.report.summary())
        print("\n".join(f"wrote {v}" for v in paths.values()))
    return 0 if res.meets_budget else EXIT_NOT_MET


def _run_folder(a: argparse.Namespace) -> str:
    if isinstance(a.resume, str):
        if a.out is not None and Path(a.out) != Path(a.resume):
            raise ConfigError(f"--resume {a.resume} and --out {a.out} name two run folders; give one")
        return a.resume
    if a.worker:
        raise ConfigError("--worker joins a run: give its folder, --resume RUN")
    if a.model is None:
        raise ConfigError(
            "give the model (a zoo name or package.module:function), or --resume RUN to continue a "
            "run with the options it was started with"
        )
    return a.out or "runs/optimize"


def _load_data(dataset: str, model: Any) -> tuple[Any, Any]:
    """The (train, val) splits of ``dataset`` (detection data at the detector's own input size)."""
    from edgeslim import data as es_data

    return es_data.load(dataset, model=model)


def _from_options(a: argparse.Namespace, out: str) -> dict[str, Any]:
    """optimize()'s arguments from the command line; the options are recorded for --resume RUN / --worker."""
    from edgeslim import models
    from edgeslim.pipeline._space import Space, space_from

    budget = budget_from_args(a)  # every option is checked before the model and data load
    space = space_from(a.space) if a.space else None
    if a.samples is not None and a.samples < 1:
        raise ConfigError(f"--samples={a.samples} is not allowed; use an integer >= 1")
    if a.recovery_processes is not None and a.recovery_processes < 1:
        raise ConfigError(f"--recovery-processes={a.recovery_processes} is not allowed; use an integer >= 1")
    dataset = a.dataset or "fashion-mnist"
    model = models.load(a.model, dataset, pretrained=not a.no_pretrained, weights=a.weights)
    train, val = _load_data(dataset, model)
    if space is None:  # the default space of the model's task
        space = Space.for_detection() if getattr(model, "edgeslim_task", None) == "detect" else Space()
    if a.samples is not None:
        space = space.replace(search_samples=a.samples)
    if a.recovery_processes is not None:
        space = space.replace(recovery_processes=a.recovery_processes)
    heartbeat = a.heartbeat or 10
    command = {
        "model": a.model,
        "dataset": dataset,
        "weights": str(Path(a.weights).resolve()) if a.weights else None,
        "pretrained": not a.no_pretrained,
        "trials": a.trials,
        "minutes": a.minutes,
        "heartbeat": heartbeat,
    }
    return {
        "model": model,
        "data": (train, val),
        "budget": budget,
        "space": space,
        "max_trials": a.trials,
        "max_minutes": a.minutes,
        "storage": a.storage,
        "seed": 0 if a.seed is None else a.seed,
        "resume": bool(a.resume),
        "sampler": a.sampler or "tpe",
        "heartbeat_s": heartbeat,
        "command": command,
    }


#: options that name what a run is: taken from run.json when resuming without a model or joining as a worker
_RUN_OPTIONS = (
    "dataset",
    "weights",
    "budget",
    "space",
    "max_drop",
    "max_latency_ms",
    "min_speedup",
    "max_size_mb",
    "max_zipped_size_mb",
    "max_memory_mb",
    "max_energy_mj",
    "target",
    "runtime",
    "threads",
    "prefer",
    "trials",
    "samples",
    "recovery_processes",
    "seed",
    "sampler",
    "heartbeat",
)


def _from_record(a: argparse.Namespace, out: str) -> tuple[dict[str, Any], bool]:
    """optimize()'s arguments from ``out/run.json`` (what the run was started with); True when its storage URL
    had a password (which run.json does not keep)."""
    from edgeslim import models
    from edgeslim.pipeline._budget import Budget
    from edgeslim.pipeline._space import Space
    from edgeslim.pipeline._store import read_run

    how = "--worker" if a.worker else "--resume RUN without a model"
    given = [f"--{k.replace('_', '-')}" for k in _RUN_OPTIONS if getattr(a, k) is not None]
    given += ["model"] if a.model is not None else []
    given += ["--no-pretrained"] if a.no_pretrained else []
    if given:
        raise ConfigError(
            f"{how} takes the model, data, budget and space from {out}/run.json; drop "
            f"{', '.join(given)} (only --storage, --minutes and --json may be given)"
        )
    rec = read_run(Path(out))
    cmd = rec.get("command")
    if not isinstance(cmd, dict) or not cmd.get("model"):
        raise ConfigError(
            f"{out}/run.json records no command (the run was started from Python): join it by "
            "calling edgeslim.optimize with the same model, data, budget, space and storage"
        )
    if a.worker and not rec.get("storage"):
        raise ConfigError(
            f"--worker: the run in {out!r} keeps its study in its own study.db, which one process at "
            "a time may use; start the run with --storage postgresql://... to share it between workers"
        )
    model = models.load(
        cmd["model"], cmd["dataset"], pretrained=cmd.get("pretrained", True), weights=cmd.get("weights")
    )
    train, val = _load_data(cmd["dataset"], model)
    kw = {
        "model": model,
        "data": (train, val),
        "budget": Budget.from_dict(rec["budget"], source=f"{out}/run.json"),
        "space": Space.from_dict(rec["space"], source=f"{out}/run.json"),
        "max_trials": cmd.get("trials"),
        "max_minutes": a.minutes,  # this process's own limit, never the starter's
        "storage": a.storage or rec.get("storage"),
        "seed": rec["seed"],
        "resume": True,
        "sampler": rec.get("sampler", "tpe"),
        "heartbeat_s": cmd.get("heartbeat", 10),
        "command": cmd,
    }
    return kw, bool(rec.get("storage_password"))
