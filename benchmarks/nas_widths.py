"""Searched per-layer widths vs uniform pruning and a uniform width multiplier, at 25% of the FP32 latency (issue 17).

For each model (the zoo's Fashion-MNIST checkpoints), rows at the same latency target (``--ratio`` of the FP32 model's
latency, measured on ONNX Runtime at 1 thread):
  FP32                 the zoo model.
  uniform pruning      every unit keeps the same fraction of its channels (the largest whose predicted latency meets the
                       target), same criterion as the searches (``--importance``), weights inherited, BN recalibrated.
  width multiplier     MobileNetV2 only: torchvision's ``width_mult`` 0.5 / 0.35 (stem adapted like the zoo's), trained
                       from random init by the zoo's trainer (``edgeslim.train.fit``) for the same ``--steps``.
  netadapt             ``edgeslim.nas.search_widths(searcher="netadapt")``.
  evolution            ``edgeslim.nas.search_widths(searcher="evolution")`` (NSGA-II, ``--trials``).
Every row but FP32 is then fine-tuned for the same ``--steps`` SGD steps (the equal budget), and all rows are exported
and timed side by side in one interleaved session (ORT, 1 thread). Top-1 is on the Fashion-MNIST test split (``--val``
images). Search wall time is the search's own (table build and predictor fit included). Rows where a search loses
to uniform pruning are printed as they are.

    python benchmarks/nas_widths.py --quick                   # MobileNetV2 + ResNet-18, small budgets: end to end
    python benchmarks/nas_widths.py --steps 300 --trials 60   # the issue's setting (long)

The machine is shared: timings are labelled "under load" with the load average.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _harness import host

import edgeslim as es
from edgeslim.core.io import write_json
from edgeslim.nas import NASConfig, build_predictor, search_widths, width_space
from edgeslim.nas._predictor import measure_models
from edgeslim.train import TrainConfig, evaluate, fit, recalibrate_bn

log = logging.getLogger("nas_widths")


def width_mult_model(mult: float) -> nn.Module:
    """torchvision MobileNetV2 at ``width_mult``, stem adapted as the zoo adapts it for 1x28x28 inputs."""
    from torchvision.models import mobilenet_v2

    torch.manual_seed(0)
    m = mobilenet_v2(weights=None, num_classes=10, width_mult=mult)
    first = m.features[0][0]
    m.features[0][0] = nn.Conv2d(1, first.out_channels, 3, 1, 1, bias=False)
    return m


def uniform(
    model: nn.Module, cfg: NASConfig, x: torch.Tensor, train, budget_ratio: float
) -> tuple[nn.Module | None, dict]:
    """The same keep fraction for every unit: the largest whose predicted latency meets the target."""
    t0 = time.perf_counter()
    space = width_space(model, x, round_to=cfg.round_to, min_keep=cfg.min_keep, grid_points=cfg.grid_points)
    pred = build_predictor(
        model, space, directory=cfg.table_dir or None, fit_samples=cfg.fit_samples, rounds=cfg.rounds, seed=cfg.seed
    )
    full = pred.predict(space.full())

    def at(f: float) -> dict[str, int]:
        return {
            n: max([w for w in u.choices if w <= f * u.full + 1e-9] or [u.smallest]) for n, u in space.units.items()
        }

    lo, hi = min(u.smallest / u.full for u in space.units.values()), 1.0
    for _ in range(16):
        mid = (lo + hi) / 2
        if pred.predict(at(mid)) <= budget_ratio * full:
            lo = mid
        else:
            hi = mid
    point = at(lo)
    smallest = pred.predict(space.smallest()) / full
    if pred.predict(point) > budget_ratio * full:
        return None, {"smallest_ratio": smallest, "seconds": round(time.perf_counter() - t0, 1)}
    m = space.realize(model, point, importance=cfg.importance)
    m = recalibrate_bn(m, train, num_samples=min(cfg.bn_samples, len(train)))
    return m, {"keep_fraction": round(lo, 4), "seconds": round(time.perf_counter() - t0, 1)}


def finetune(m: nn.Module, train, steps: int, lr: float) -> nn.Module:
    if steps <= 0:
        return m
    return fit(m, train, None, TrainConfig(epochs=1, lr=lr, seed=0), max_steps_per_epoch=steps, progress=False).model


def run_model(name: str, args: argparse.Namespace, train, val) -> dict:
    model = es.models.load(name, dataset="fashion-mnist", pretrained=True).eval()
    x = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    common = {
        "latency_ratio": args.ratio,
        "importance": args.importance,
        "table_dir": args.table_dir,
        "grid_points": args.grid,
        "fit_samples": args.fit,
        "rounds": args.rounds,
        "bn_samples": args.bn_samples,
        "val_samples": args.val_samples,
        "min_keep": args.min_keep,
    }
    rows: dict[str, dict] = {"FP32": {"model": model, "search_s": 0.0}}
    ratio, note = args.ratio, ""
    m, info = uniform(model, NASConfig(**common), x, train, ratio)
    if m is None:  # the target is below the smallest sub-network of the space: say so, and use the nearest reachable
        ratio = round(info["smallest_ratio"] * 1.1, 3)
        note = (
            f"{args.ratio:.0%} of FP32 is below the smallest sub-network of the space (predicted "
            f"{info['smallest_ratio']:.1%} of FP32 at min_keep={common['min_keep']}); searched at {ratio:.1%} instead"
        )
        log.warning("%s: %s", name, note)
        common["latency_ratio"] = ratio
        m, info = uniform(model, NASConfig(**common), x, train, ratio)
    rows["uniform pruning"] = {"model": m, "search_s": info["seconds"], "info": info}
    if name == "mobilenet_v2":
        for mult in (0.5, 0.35):
            rows[f"width multiplier {mult}x"] = {"model": width_mult_model(mult), "search_s": 0.0, "scratch": True}
    for searcher, extra in (
        ("netadapt", {"steps": args.netadapt_steps}),
        ("evolution", {"trials": args.trials, "population": args.population}),
    ):
        if searcher not in args.searchers.split(","):
            continue
        cfg = NASConfig(searcher=searcher, **common, **extra)
        t0 = time.perf_counter()
        out = search_widths(
            model,
            cfg,
            data=(train, val),
            example_inputs=x,
            storage=Path(args.study_dir) / f"{name}-{searcher}.db" if searcher == "evolution" else None,
        )
        rows[searcher] = {
            "model": out,
            "search_s": round(time.perf_counter() - t0, 1),
            "info": {
                "budget_ms_measured_in_search": out.report.budget_ms,
                "measured_ms_in_search": out.report.measured_ms,
                "met_in_search": out.report.met,
                "bn_accuracy_on_val_subset": out.report.accuracy,
                "search": out.report.search,
                "note": out.report.note,
            },
        }
    for label, r in rows.items():
        if label == "FP32":
            continue
        t0 = time.perf_counter()
        lr = args.scratch_lr if r.get("scratch") else args.lr
        r["model"] = finetune(copy.deepcopy(r["model"]), train, args.steps, lr)
        r["finetune_s"] = round(time.perf_counter() - t0, 1)
    load0 = os.getloadavg()[0]
    lat = measure_models({k: r["model"] for k, r in rows.items()}, x, rounds=args.rounds, sessions=args.sessions)
    fp32 = lat["FP32"]["ms"]
    out_rows = []
    for label, r in rows.items():
        out_rows.append(
            {
                "row": label,
                "latency_ms": lat[label]["ms"],
                "latency_sessions_ms": lat[label]["sessions_ms"],
                "ratio_to_fp32": lat[label]["ms"] / fp32,
                "top1": evaluate(r["model"], val),
                "search_s": r["search_s"],
                "finetune_steps": 0 if label == "FP32" else args.steps,
                "finetune_s": r.get("finetune_s", 0.0),
                "params": sum(p.numel() for p in r["model"].parameters()),
                "info": r.get("info", {}),
            }
        )
    return {
        "model": name,
        "target_ratio": ratio,
        "asked_ratio": args.ratio,
        "note": note,
        "fp32_ms": fp32,
        "load_avg_1min_at_timing": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "rows": out_rows,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mobilenet_v2,resnet18")
    ap.add_argument("--ratio", type=float, default=0.25, help="latency target as a fraction of FP32 (measured)")
    ap.add_argument("--steps", type=int, default=300, help="fine-tuning SGD steps of every row (the equal budget)")
    ap.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate (inherited weights)")
    ap.add_argument("--scratch-lr", type=float, default=0.05, help="learning rate of the width-multiplier rows")
    ap.add_argument("--importance", default="l1", help="channel criterion of every pruned row")
    ap.add_argument("--searchers", default="netadapt,evolution", help="which searched rows to run")
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--population", type=int, default=12)
    ap.add_argument("--netadapt-steps", type=int, default=6)
    ap.add_argument("--grid", type=int, default=8)
    ap.add_argument("--min-keep", type=float, default=0.1, help="smallest fraction of channels a unit keeps")
    ap.add_argument("--fit", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sessions", type=int, default=3)
    ap.add_argument("--bn-samples", type=int, default=512)
    ap.add_argument("--val-samples", type=int, default=1000, help="validation images candidates are scored on")
    ap.add_argument("--val", type=int, default=10000, help="test images the final top-1 is measured on")
    ap.add_argument("--table-dir", default="", help="latency table folder (default: ~/.cache/edgeslim/latency)")
    ap.add_argument("--out", default=str(HERE / "results" / "nas_widths.json"))
    ap.add_argument(
        "--study-dir",
        default=str(Path.home() / ".cache" / "edgeslim" / "nas"),
        help="where the evolution studies live (SQLite; a rerun resumes them: delete to start afresh)",
    )
    ap.add_argument("--quick", action="store_true", help="small budgets, end to end in minutes")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.trials, args.population, args.netadapt_steps = min(args.steps, 30), 10, 4, 3
        args.fit, args.rounds, args.sessions = 6, 3, 1
        args.bn_samples, args.val_samples, args.val = 256, 300, 2000
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("edgeslim.prune", "edgeslim.nas._table", "edgeslim.train"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    h = host()
    train, val = es.data.load("fashion-mnist")
    val = val.take(min(args.val, len(val)), seed=0)
    t0 = time.perf_counter()
    results = [run_model(n.strip(), args, train, val) for n in args.models.split(",")]
    doc = {
        "benchmark": "nas_widths",
        "host": h,
        "under_load": True,
        "load_avg_end": [round(v, 2) for v in os.getloadavg()],
        "runtime": "onnxruntime, 1 thread, FP32, batch 1",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "seconds": round(time.perf_counter() - t0, 1),
        "models": results,
    }
    write_json(args.out if not args.quick else str(Path(args.out).with_name("nas_widths_quick.json")), doc, force=True)
    print(
        f"host: {h.get('cpu')} [{h.get('isa')}]; timings UNDER LOAD (shared 2-core host), load avg {doc['load_avg_end']}"
    )
    for r in results:
        print(
            f"\n### {r['model']} (FMNIST), target {r['target_ratio']:.0%} of FP32 = {r['fp32_ms'] * r['target_ratio']:.3f} ms"
        )
        print("| row | latency ms (ORT 1T, under load) | x FP32 | top-1 after fine-tune | search wall s (under load) |")
        print("|---|---|---|---|---|")
        for row in r["rows"]:
            print(
                f"| {row['row']} | {row['latency_ms']:.3f} | {row['ratio_to_fp32']:.2f} | {row['top1']:.4f} | "
                f"{row['search_s']:.0f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
