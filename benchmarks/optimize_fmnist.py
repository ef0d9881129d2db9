"""Benchmark: edgeslim.optimize on MobileNetV2 or ResNet-18 / Fashion-MNIST against the best single techniques.

The budget: at most ``--max-drop`` points of top-1 below the FP32 model and at least ``--min-speedup`` x faster
than its FP32 ONNX file on ONNX Runtime, 1 thread, batch 1, measured on this host. Rows, all re-measured side by
side at the end (accuracy on the validation split in ONNX Runtime; latency: interleaved rounds on this host):

  - FP32 ONNX: the shipped checkpoint, exported
  - PTQ alone: edgeslim.quantize with its defaults (INT8)
  - pruning alone: channel pruning to ``--prune-macs`` of the MACs removed, BatchNorm recalibration and the same
    recovery fine-tune steps optimize may use, FP32
  - optimize: the candidate edgeslim.optimize chose within ``--minutes`` / ``--trials``

    python benchmarks/optimize_fmnist.py [--model mobilenet_v2|resnet18] [--minutes 30] [--trials N] [--out DIR]
    python benchmarks/optimize_fmnist.py --smoke        # < 2 minutes: tiny space, 3 trials, 1k validation images

The issue's targets: MobileNetV2 <= 0.5 pt and >= 3x, ResNet-18 <= 0.5 pt and >= 8x (``--min-speedup`` defaults to
the model's), each within 60 minutes; the number of non-dominated (accuracy, latency) trials is printed.

Prints a table and writes benchmarks/results/optimize_fmnist[_<model>][_smoke].json (host CPU, ISA flags, versions, rows).
Not a test: numbers vary run to run and host to host.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

import edgeslim as es
from edgeslim.core.io import write_json
from edgeslim.core.metrics import host_info
from edgeslim.pipeline import pareto_front
from edgeslim.pipeline._candidate import recovery_train_config
from edgeslim.runtime import RUNTIMES, interleaved_latency
from edgeslim.train import fit

HERE = Path(__file__).parent
TARGETS = {"mobilenet_v2": 3.0, "resnet18": 8.0}  # the speedup targets (at <= 0.5 pt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenet_v2", choices=sorted(TARGETS), help="the zoo model (shipped weights)")
    ap.add_argument("--minutes", type=float, default=30.0, help="optimize's time budget (search)")
    ap.add_argument("--trials", type=int, help="optimize's trial budget")
    ap.add_argument("--max-drop", type=float, default=0.5, help="allowed top-1 drop in points")
    ap.add_argument("--min-speedup", type=float, help="required speedup over the FP32 ONNX file (default: the target)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prune-macs", type=float, default=0.35, help="MAC fraction removed by the pruning-alone row")
    ap.add_argument(
        "--prune-steps", type=int, help="fine-tune steps of the pruning-alone row (default: the space's largest)"
    )
    ap.add_argument("--eval-samples", type=int, help="validation images for the final table (default: all)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds of the final table")
    ap.add_argument(
        "--out", help="optimize's run folder (resumes when it exists; default /tmp/optimize_fmnist_<model>)"
    )
    ap.add_argument("--smoke", action="store_true", help="a < 2-minute run to check the script works")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args()
    if a.min_speedup is None:
        a.min_speedup = TARGETS[a.model]
    if a.out is None:
        a.out = f"/tmp/optimize_fmnist_{a.model}"
    logging.basicConfig(
        level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = es.models.load(a.model, dataset="fashion-mnist", pretrained=True)
    train, val = es.data.load("fashion-mnist")
    if a.smoke:
        space = es.Space(
            target_macs=(0.0, 0.3),
            keep_early_layers=(True,),
            finetune_steps=(10,),
            calibration=("minmax",),
            per_channel=(True,),
            equalize=(False,),
            bias_correction=(False,),
            quantize=(True,),
            calib_samples=128,
            bn_samples=128,
            cheap_trials=1,
            search_samples=300,
            latency_runs=10,
            finetune_batch_size=32,
        )
        trials, minutes, eval_n, rounds, out = 2, None, 1000, 2, a.out + "-smoke"
    else:
        space = es.Space()
        trials, minutes, eval_n, rounds, out = a.trials, a.minutes, a.eval_samples, a.rounds, a.out
    val_eval = val.take(eval_n, seed=0) if eval_n else val
    if a.smoke:  # the chosen candidate is re-measured on these 1,000 images instead of all 10,000
        val = val_eval
    budget = es.Budget(
        max_accuracy_drop=a.max_drop / 100,
        min_speedup=a.min_speedup,
        target="host",
        runtime="onnxruntime",
        threads=a.threads,
    )

    work = Path(out) / "bench"
    work.mkdir(parents=True, exist_ok=True)
    ex = val.normalized()[:1]
    t_opt = time.perf_counter()
    res = es.optimize(
        model,
        data=(train, val),
        budget=budget,
        space=space,
        max_trials=trials,
        max_minutes=minutes,
        out=out,
        seed=0,
        progress=True,
    )
    opt_seconds = time.perf_counter() - t_opt

    rows: dict[str, dict] = {}
    t = time.perf_counter()
    fp32 = es.export(model, "onnx", example_inputs=val, path=work / "fp32.onnx", force=True)
    rows["FP32 ONNX"] = {"artifact": fp32, "seconds": time.perf_counter() - t}
    t = time.perf_counter()
    q = es.quantize(model, es.QuantConfig(), data=train)
    rows["PTQ alone (edgeslim defaults)"] = {
        "artifact": es.export(q, "onnx", example_inputs=val, path=work / "ptq.onnx", force=True),
        "seconds": time.perf_counter() - t,
    }
    t = time.perf_counter()
    p = es.prune(
        model,
        es.PruneConfig(
            method="channel", target_macs=a.prune_macs, round_to=space.round_to, recalibrate_bn=space.bn_samples
        ),
        example_inputs=ex,
        data=train,
    )
    steps = max(space.finetune_steps) if a.prune_steps is None else a.prune_steps
    if steps:
        tcfg, cap = recovery_train_config(space, len(train), steps)
        p = fit(p, train, None, tcfg, max_steps_per_epoch=cap, progress=False).model
    rows[f"pruning alone ({a.prune_macs:.0%} MACs, {steps} ft steps)"] = {
        "artifact": es.export(p, "onnx", example_inputs=val, path=work / "pruned.onnx", force=True),
        "seconds": time.perf_counter() - t,
    }
    rows[f"optimize (trial {res.recipe['trial']}: {res.recipe['description']})"] = {
        "artifact": res.artifact,
        "seconds": opt_seconds,
    }

    runners = {k: RUNTIMES.get("onnxruntime")(r["artifact"], threads=a.threads) for k, r in rows.items()}
    lat = interleaved_latency(runners, val.normalized()[:1].numpy(), rounds=rounds, runs=space.latency_runs * 4)
    base_ms = lat["FP32 ONNX"]["median_of_rounds_ms"]
    for k, r in rows.items():
        m = es.measure(
            r["artifact"],
            data=val_eval,
            runtime="onnxruntime",
            threads=(a.threads,),
            runs=1,
            warmup=0,
            peak_memory=False,
        )
        r.update(
            accuracy=m["accuracy"],
            latency_ms=lat[k]["median_of_rounds_ms"],
            spread_pct=lat[k]["round_spread_pct"],
            size_mb=r["artifact"].size_bytes / 2**20,
        )
    base_acc = rows["FP32 ONNX"]["accuracy"]
    out_rows = []
    print(
        f"\n{a.model} / Fashion-MNIST, budget: drop <= {a.max_drop} pt, speedup >= {a.min_speedup}x "
        f"(onnxruntime, {a.threads} thread, batch 1, host {host_info()['cpu']})"
    )
    print(f"accuracy on {len(val_eval)} validation images; latency median of {rounds} interleaved rounds\n")
    print(f"{'row':70s} {'acc %':>7s} {'drop pt':>8s} {'ms':>8s} {'speedup':>8s} {'MB':>6s} {'meets':>6s} {'s':>6s}")
    for k, r in rows.items():
        drop = 100 * (base_acc - r["accuracy"])
        speed = base_ms / r["latency_ms"]
        meets = drop <= a.max_drop + 1e-9 and speed >= a.min_speedup
        print(
            f"{k[:70]:70s} {100 * r['accuracy']:7.2f} {drop:8.2f} {r['latency_ms']:8.3f} {speed:7.2f}x "
            f"{r['size_mb']:6.2f} {'yes' if meets else 'no':>6s} {r['seconds']:6.0f}"
        )
        out_rows.append(
            {
                "row": k,
                "accuracy": r["accuracy"],
                "drop_pt": drop,
                "latency_ms": r["latency_ms"],
                "latency_round_spread_pct": r["spread_pct"],
                "speedup": speed,
                "size_mb": r["size_mb"],
                "meets_budget": meets,
                "seconds": r["seconds"],
                "file": str(r["artifact"].path),
            }
        )
    done = [r for r in res.report.data["trials"]["rows"] if r["state"] == "complete" and r.get("figures")]
    front_rows = pareto_rows(done)
    print(
        f"\nPareto front (search figures: accuracy on the search subset, latency): {len(front_rows)} non-dominated of "
        f"{len(done)} completed trials in {opt_seconds / 60:.1f} min"
    )
    for r in front_rows:
        print(
            f"  #{r['trial']:<4} {r['accuracy_search']:.2%}  {r['latency_ms_search']:.4f} ms  "
            f"[{r['stage'] or 'sampler/cheap'}] {r['candidate']}"
        )
    front30 = front_within(Path(out) / "study.db", 30.0)
    print(f"Pareto front of the trials completed in the search's first 30 minutes: {front30} non-dominated points")
    distinct = latency_distinct(front_rows, DISTINCT_STEP)
    print(
        f"  of which {distinct} are at least {DISTINCT_STEP:.0%} apart in latency (closer neighbours count once: the "
        "search's latency noise)"
    )
    doc = {
        "benchmark": "optimize_fmnist",
        "model": a.model,
        "smoke": a.smoke,
        "host": host_info(),
        "budget": budget.to_dict(),
        "space": space.to_dict(),
        "max_trials": trials,
        "max_minutes": minutes,
        "eval_samples": len(val_eval),
        "latency": f"onnxruntime, {a.threads} thread(s), batch 1, median of "
        f"{rounds} interleaved rounds of {space.latency_runs * 4} runs",
        "optimize": {
            "meets_budget": res.meets_budget,
            "violations": res.violations,
            "recipe": res.recipe,
            "report": str(res.paths.get("html")),
            "trials": res.report.data["trials"]["complete"],
            "seconds": opt_seconds,
            "pareto_points": len(front_rows),
            "pareto_points_first_30_min": front30,
            f"pareto_points_{round(100 * DISTINCT_STEP)}pct_apart": distinct,
            "pareto_trials": [r["trial"] for r in front_rows],
            "pareto_front": front_rows,
        },
        "rows": out_rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    path = write_json(
        HERE
        / "results"
        / f"optimize_fmnist{'' if a.model == 'mobilenet_v2' else '_' + a.model}{'_smoke' if a.smoke else ''}.json",
        doc,
        force=True,
    )
    print(f"\noptimize report: {res.paths.get('html')}\nwrote {path} ({doc['seconds']:.0f} s)")


def pareto_rows(done: list[dict]) -> list[dict]:
    """The non-dominated (accuracy, latency) rows among the report's completed trial rows ``done``, fastest first."""
    front = pareto_front([(r["figures"]["accuracy"], r["figures"]["latency_ms"]) for r in done])
    return [
        {
            "trial": done[i]["number"],
            "stage": done[i].get("stage"),
            "candidate": done[i]["description"],
            "accuracy_search": done[i]["figures"]["accuracy"],
            "latency_ms_search": done[i]["figures"]["latency_ms"],
        }
        for i in sorted(front, key=lambda i: done[i]["figures"]["latency_ms"])
    ]


#: front points closer than this in latency (relative) count once in the "apart" figure
DISTINCT_STEP = 0.03


def latency_distinct(front: list[dict], step: float) -> int:
    """How many points of ``front`` (fastest first) remain when a point less than ``step`` (relative) slower than the
    last one kept replaces it (two deployment choices of one structure a few microseconds apart are one trade-off
    within the search's latency noise)."""
    kept: list[float] = []
    for r in front:
        ms = r["latency_ms_search"]
        if kept and ms < kept[-1] * (1 + step):
            kept[-1] = ms
        else:
            kept.append(ms)
    return len(kept)


def front_within(db: Path, minutes: float) -> int:
    """Non-dominated (accuracy, latency) trials among those the study completed within ``minutes`` of its first
    trial's start (search figures), read from the run's Optuna storage."""
    import optuna

    study = optuna.load_study(study_name=None, storage=f"sqlite:///{db}")
    ts = [t for t in study.get_trials(deepcopy=False) if t.datetime_start]
    if not ts:
        return 0
    t0 = min(t.datetime_start for t in ts)
    ok = [
        t
        for t in ts
        if t.state.name == "COMPLETE"
        and "figures" in t.user_attrs
        and (t.datetime_complete - t0).total_seconds() <= minutes * 60
    ]
    return len(pareto_front([(t.user_attrs["figures"]["accuracy"], t.user_attrs["figures"]["latency_ms"]) for t in ok]))


if __name__ == "__main__":
    main()
