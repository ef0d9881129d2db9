"""Benchmark: edgeslim.optimize against Microsoft Olive 0.13's searched ONNX Runtime quantization, same model,
data, budget and minutes, and against the best single techniques.

One FP32 ONNX file (the zoo's MobileNetV2 trained on Fashion-MNIST, exported by edgeslim) goes to both tools:

  - Olive: ``olive.workflows.run`` with its Optuna TPE search (joint execution order, ``max_time`` = the minutes)
    over the ``OnnxQuantization`` pass options (static/dynamic, QDQ/QOperator, per-channel, calibration method,
    activation/weight types), evaluated on accuracy (goal: the budget's drop) and latency (ORT CPU, 1 thread),
    calibrated on the same 512 training images and scored on the same validation subset edgeslim searches on (the
    .npy batches are fed through a ``user_script``, benchmarks/_olive_data.py); its best candidate is taken.
  - edgeslim.optimize: the default search space, the same budget and minutes.
  - PTQ alone: edgeslim.quantize with its defaults. Pruning alone: channel pruning (``--prune-macs``, global
    ranking, BatchNorm recalibration) + fine-tune with the step budget the default space gives that depth.

Every final file is then measured in ONE interleaved latency run (ONNX Runtime, 1 thread, batch 1, this host:
benchmarks/_harness.py) and on the whole validation split for accuracy. Rows: accuracy, drop, latency, speedup vs
FP32, size, the tool's wall time; all rows are printed, including those where edgeslim loses.

    python benchmarks/optimize_olive.py [--minutes 30] [--out /tmp/optimize_olive]
    python benchmarks/optimize_olive.py --minutes 3 --eval-samples 2000   # a short check of the whole script
    python benchmarks/optimize_olive.py --prefer accuracy   # optimize keeps the most accurate candidate >= 3x

The last line prints WINS when edgeslim's file is at least as fast as Olive's at equal or better accuracy, LOSES
otherwise. With ``--prefer latency`` (the default) optimize takes the fastest candidate within the drop, so it
spends the accuracy budget; ``--prefer accuracy`` is the comparison at Olive's own priority.

Writes benchmarks/results/optimize_olive[_prefer_accuracy].json (host CPU and ISA flags, load, versions, rows). Not a test.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

import edgeslim as es
from edgeslim.core.io import write_json
from edgeslim.pipeline._candidate import recovery_train_config
from edgeslim.pipeline._space import recovery_steps
from edgeslim.train import fit

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _harness import host, latency_rounds  # noqa: E402
from optimize_fmnist import front_within, pareto_rows  # noqa: E402


def olive_config(fp32: Path, data_dir: Path, out: Path, *, max_drop: float, minutes: float, seed: int) -> dict:
    """The Olive run config: its TPE search over the ORT quantization pass options, accuracy + latency metrics."""
    data = lambda name, split, bs: {  # noqa: E731
        "name": name,
        "type": "DataContainer",
        "user_script": str(HERE / "_olive_data.py"),
        "load_dataset_config": {"type": "fmnist_npy", "params": {"data_dir": str(data_dir), "split": split}},
        "post_process_data_config": {"type": "fmnist_argmax"},
        "dataloader_config": {"type": "default_dataloader", "params": {"batch_size": bs}},
    }
    return {
        "input_model": {
            "type": "ONNXModel",
            "model_path": str(fp32),
            "inference_settings": {"session_options": {"intra_op_num_threads": 1, "inter_op_num_threads": 1}},
        },
        "systems": {"local": {"type": "LocalSystem", "accelerators": [{"device": "cpu"}]}},
        "data_configs": [data("calib", "calib", 1), data("score", "score", 100), data("lat", "lat", 1)],
        "evaluators": {
            "common": {
                "type": "OnnxEvaluator",
                "metrics": [
                    {
                        "name": "accuracy",
                        "type": "accuracy",
                        "data_config": "score",
                        "sub_types": [
                            {
                                "name": "accuracy_score",
                                "priority": 1,
                                "goal": {"type": "max-degradation", "value": max_drop},
                                "metric_config": {"task": "multiclass", "num_classes": 10},
                            }
                        ],
                    },
                    {
                        "name": "latency",
                        "type": "latency",
                        "data_config": "lat",
                        "sub_types": [
                            {
                                "name": "avg",
                                "priority": 2,
                                "metric_config": {"warmup_num": 10, "repeat_test_num": 100},
                            }
                        ],
                        "user_config": {"io_bind": False},
                    },
                ],
            }
        },
        "passes": {"quantization": {"type": "OnnxQuantization", "data_config": "calib"}},
        "search_strategy": {
            "execution_order": "joint",
            "sampler": "tpe",
            "sampler_config": {"seed": seed},
            "max_time": int(minutes * 60),
        },
        "host": "local",
        "target": "local",
        "evaluator": "common",
        "evaluate_input_model": True,
        "cache_dir": str(out / "cache"),
        "output_dir": str(out / "output"),
        "log_severity_level": 3,
    }


def run_olive(cfg: dict) -> tuple[Path | None, dict]:
    """Run Olive; return its best candidate's ONNX file and what it reported (or why it gave nothing)."""
    from olive.workflows import run as olive_run

    wo = olive_run(cfg)
    best = wo.get_best_candidate() if wo is not None else None
    info: dict = {"candidates": len(wo.get_output_models()) if wo is not None else 0}
    if best is None:
        info["note"] = "Olive returned no candidate (no model met its goals or nothing ran)"
        return None, info
    path = Path(best.model_path)
    if path.is_dir():
        path = next(path.glob("*.onnx"))
    info.update(metrics=_plain(best.metrics_value), config=_plain(getattr(best, "model_config", None)))
    return path, info


def _plain(x):
    try:
        return json.loads(json.dumps(x, default=str))
    except Exception:  # noqa: BLE001 - a record only
        return str(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="edgeslim optimize's search time")
    ap.add_argument("--olive-minutes", type=float, help="Olive's search time (default: --minutes)")
    ap.add_argument("--max-drop", type=float, default=0.5, help="allowed top-1 drop in points")
    ap.add_argument("--min-speedup", type=float, default=3.0, help="required speedup over the FP32 ONNX file")
    ap.add_argument("--prune-macs", type=float, default=0.5, help="MAC fraction removed by the pruning-alone row")
    ap.add_argument("--eval-samples", type=int, help="validation images for the final accuracy (default: all)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds of the final table")
    ap.add_argument("--runs", type=int, default=200, help="timed runs per round and file")
    ap.add_argument("--out", default="/tmp/optimize_olive", help="work folder (optimize resumes when it exists)")
    ap.add_argument(
        "--finetune-steps", type=int, nargs="+", help="optimize's recovery step choices (default: the Space's)"
    )
    ap.add_argument(
        "--reuse-olive", action="store_true", help="take the Olive result already in OUT/olive (no second Olive run)"
    )
    ap.add_argument(
        "--prefer",
        default="latency",
        choices=["latency", "accuracy", "size"],
        help="which of optimize's candidates meeting the budget is chosen (Budget.prefer): accuracy = the most "
        "accurate one at >= --min-speedup, the row to compare with a tool that keeps accuracy first",
    )
    ap.add_argument("--skip", nargs="*", default=[], choices=["olive", "optimize", "ptq", "prune"])
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args()
    if a.olive_minutes is None:
        a.olive_minutes = a.minutes
    logging.basicConfig(
        level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    torch.manual_seed(0)
    t0 = time.perf_counter()
    out = Path(a.out)
    work = out / "files"
    work.mkdir(parents=True, exist_ok=True)
    model = es.models.load("mobilenet_v2", dataset="fashion-mnist", pretrained=True)
    train, val = es.data.load("fashion-mnist")
    space = es.Space() if not a.finetune_steps else es.Space(finetune_steps=tuple(a.finetune_steps))
    val_eval = val.take(a.eval_samples, seed=0) if a.eval_samples else val
    budget = es.Budget(max_accuracy_drop=a.max_drop / 100, min_speedup=a.min_speedup, threads=1, prefer=a.prefer)

    # the one FP32 ONNX file and the data both tools get: calibration = the training images edgeslim calibrates
    # on (class-balanced, seeded), score = edgeslim's search subset of the validation split
    fp32 = es.export(model, "onnx", example_inputs=val, path=work / "fp32.onnx", force=True)
    data_dir = out / "npy"
    data_dir.mkdir(exist_ok=True)
    calib = train.take(space.calib_samples, seed=0)
    score = val.take(space.search_samples, seed=0)
    for name, ds in (("calib", calib), ("score", score), ("lat", val.take(64, seed=1))):
        np.save(data_dir / f"{name}_x.npy", ds.normalized().numpy().astype(np.float32))
        np.save(data_dir / f"{name}_y.npy", ds.labels.numpy().astype(np.int64))

    rows: dict[str, dict] = {"FP32 ONNX (input of both tools)": {"artifact": fp32.path, "seconds": 0.0}}
    extra: dict = {}
    if "olive" not in a.skip:
        t = time.perf_counter()
        done = out / "olive" / "output" / "model.onnx"
        cfg = olive_config(
            fp32.path, data_dir, out / "olive", max_drop=a.max_drop / 100, minutes=a.olive_minutes, seed=0
        )
        try:
            if a.reuse_olive and done.exists():
                rec = out / "olive" / "seconds.json"
                path, info = done, {"reused": str(done)}
                t -= json.loads(rec.read_text())["seconds"] if rec.exists() else 60 * a.olive_minutes
            else:
                path, info = run_olive(cfg)
                (out / "olive" / "seconds.json").write_text(json.dumps({"seconds": time.perf_counter() - t}))
        except Exception as e:  # noqa: BLE001 - reported as a row, the other tools still run
            path, info = None, {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        extra["olive"] = {**info, "config": cfg}
        if path is not None:
            rows["Olive 0.13 (TPE over OnnxQuantization options)"] = {
                "artifact": path,
                "seconds": time.perf_counter() - t,
            }
        else:
            print(f"Olive gave no file: {info}", file=sys.stderr)
    if "optimize" not in a.skip:
        t = time.perf_counter()
        res = es.optimize(
            model,
            data=(train, val),
            budget=budget,
            space=space,
            max_minutes=a.minutes,
            out=out / "optimize",
            seed=0,
            progress=True,
        )
        rows[f"edgeslim optimize, prefer={a.prefer} ({res.recipe['description']})"] = {
            "artifact": res.artifact.path,
            "seconds": time.perf_counter() - t,
        }
        extra["optimize"] = {
            "meets_budget_own_measure": res.meets_budget,
            "violations": res.violations,
            "recipe": res.recipe,
            "trials": res.report.data["trials"],
            "report": str(res.paths.get("html")),
        }
        done = [r for r in extra["optimize"]["trials"].pop("rows", []) if r["state"] == "complete" and r.get("figures")]
        extra["optimize"]["pareto_front"] = pareto_rows(done)
        extra["optimize"]["pareto_points"] = len(extra["optimize"]["pareto_front"])
        extra["optimize"]["pareto_points_first_30_min"] = front_within(out / "optimize" / "study.db", 30.0)
        print(
            f"edgeslim optimize: {extra['optimize']['pareto_points']} non-dominated (accuracy, latency) trials of "
            f"{len(done)}; {extra['optimize']['pareto_points_first_30_min']} among those done in the first 30 min",
            file=sys.stderr,
        )
    if "ptq" not in a.skip:
        t = time.perf_counter()
        q = es.quantize(model, es.QuantConfig(), data=train)
        art = es.export(q, "onnx", example_inputs=val, path=work / "ptq.onnx", force=True)
        rows["PTQ alone (edgeslim quantize defaults)"] = {"artifact": art.path, "seconds": time.perf_counter() - t}
    if "prune" not in a.skip:
        t = time.perf_counter()
        p = es.prune(
            model,
            es.PruneConfig(
                method="channel",
                target_macs=a.prune_macs,
                scope="global",
                round_to=space.round_to,
                recalibrate_bn=space.bn_samples,
            ),
            example_inputs=val.normalized()[:1],
            data=train,
        )
        steps = recovery_steps(space, {"target_macs": a.prune_macs, "finetune_steps": max(space.finetune_steps)})
        tcfg, cap = recovery_train_config(space, len(train), steps)
        p = fit(p, train, None, tcfg, max_steps_per_epoch=cap, progress=False).model
        art = es.export(p, "onnx", example_inputs=val, path=work / "pruned.onnx", force=True)
        rows[f"pruning alone ({a.prune_macs:.0%} MACs global, {steps} fine-tune steps, FP32)"] = {
            "artifact": art.path,
            "seconds": time.perf_counter() - t,
        }

    # one interleaved latency run over every final file, then accuracy on the validation split (ORT, 1 thread)
    arts = {k: es.Artifact.load(r["artifact"]) for k, r in rows.items()}
    lat = latency_rounds(arts, rounds=a.rounds, runs=a.runs)
    base_key = "FP32 ONNX (input of both tools)"
    for k, r in rows.items():
        m = es.measure(arts[k], data=val_eval, runtime="onnxruntime", threads=(1,), runs=1, warmup=0, peak_memory=False)
        r.update(accuracy=m["accuracy"], latency_ms=lat[k], size_mb=Path(r["artifact"]).stat().st_size / 2**20)
    base = rows[base_key]
    print(
        f"\nMobileNetV2 / Fashion-MNIST, budget: drop <= {a.max_drop} pt, speedup >= {a.min_speedup}x; each tool "
        f"edgeslim {a.minutes:g} min, Olive {a.olive_minutes:g} min; ORT 1 thread, batch 1; accuracy on {len(val_eval)} validation images; latency median "
        f"of {a.rounds} interleaved rounds of {a.runs} runs; host {host()['cpu']} (load {host()['load_avg']})\n"
    )
    print(f"{'row':78s} {'acc %':>7s} {'drop pt':>8s} {'ms':>8s} {'speedup':>8s} {'MB':>6s} {'meets':>6s} {'s':>6s}")
    table = []
    for k, r in rows.items():
        drop = 100 * (base["accuracy"] - r["accuracy"])
        speed = base["latency_ms"] / r["latency_ms"]
        meets = drop <= a.max_drop + 1e-9 and speed >= a.min_speedup
        print(
            f"{k[:78]:78s} {100 * r['accuracy']:7.2f} {drop:8.2f} {r['latency_ms']:8.4f} {speed:7.2f}x "
            f"{r['size_mb']:6.2f} {'yes' if meets else 'no':>6s} {r['seconds']:6.0f}"
        )
        table.append(
            {
                "row": k,
                "accuracy": r["accuracy"],
                "drop_pt": drop,
                "latency_ms": r["latency_ms"],
                "speedup": speed,
                "size_mb": r["size_mb"],
                "meets_budget": meets,
                "tool_seconds": round(r["seconds"], 1),
                "file": str(r["artifact"]),
            }
        )
    ours = next((r for r in table if r["row"].startswith("edgeslim optimize")), None)
    olive = next((r for r in table if r["row"].startswith("Olive")), None)
    verdict = None
    if ours and olive:
        faster, accurate = ours["latency_ms"] <= olive["latency_ms"], ours["accuracy"] >= olive["accuracy"]
        verdict = "WINS" if faster and accurate else "LOSES"
        print(
            f"\nedgeslim vs Olive: {verdict}: {olive['latency_ms'] / ours['latency_ms']:.2f}x Olive's speed "
            f"({'at least as fast' if faster else 'slower'}), accuracy {100 * (ours['accuracy'] - olive['accuracy']):+.2f} "
            f"pt ({'equal or better' if accurate else 'worse'})"
        )
    try:
        from importlib.metadata import version

        versions = {p: version(p) for p in ("olive-ai", "onnxruntime", "onnx", "torch", "optuna")}
    except Exception:  # noqa: BLE001 - a record only
        versions = {}
    doc = {
        "benchmark": "optimize_olive",
        "host": host(),
        "versions": versions,
        "budget": budget.to_dict(),
        "minutes": {"edgeslim": a.minutes, "olive": a.olive_minutes},
        "eval_samples": len(val_eval),
        "latency": f"onnxruntime, 1 thread, batch 1, median of {a.rounds} interleaved rounds of {a.runs} runs",
        "prefer": a.prefer,
        "rows": table,
        "vs_olive": verdict,
        "tools": extra,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    name = "optimize_olive" + ("" if a.prefer == "latency" else f"_prefer_{a.prefer}")
    name += ".json" if a.minutes >= 30 else f"_{a.minutes:g}min.json"
    path = write_json(HERE / "results" / name, doc, force=True)
    print(f"\nwrote {path} ({doc['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
