"""How well the per-layer latency table predicts whole sub-networks of the width space (issue 17's check).

For each model: the width space (round_to 8, every unit keeps 25-100% of its channels), the per-layer table timed on
ONNX Runtime (cached per host; the time to build it is reported), the ``a * sum + b`` fit on a few measured
sub-networks, then K *held-out* random sub-networks pruned with edgeslim.prune, exported to ONNX and timed side by
side (interleaved rounds). Reported: median / max absolute % error and Kendall tau of predicted vs measured, and the
same for the raw sum of the layers (what the fit adds). Target (issue 17): K >= 50, median <= 10%, tau >= 0.9 on
ORT at 1 thread. The fit is timed in the same interleaved session as the held-out sub-networks (never on them):
load drifts between sessions on a shared host. The host (CPU, ISA flags) and the load average before and after are recorded: the machine is
shared, and timings on it are noisy.

    python benchmarks/nas_latency.py --smoke                      # small_cnn, 8 sub-networks, seconds
    python benchmarks/nas_latency.py --models mobilenet_v2 --samples 50
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _harness import host

import edgeslim as es
from edgeslim.core.io import write_json
from edgeslim.nas import build_predictor, check_predictor, width_space

log = logging.getLogger("nas_latency")


def run_model(name: str, args: argparse.Namespace) -> dict:
    model = es.models.build(name, "fashion-mnist").eval()
    x = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    space = width_space(model, x, round_to=8, min_keep=0.25, grid_points=args.grid)
    t0 = time.perf_counter()
    pred = build_predictor(
        model, space, threads=args.threads, directory=args.table_dir, fit_samples=args.fit, seed=0, rounds=args.rounds
    )
    t_build = time.perf_counter() - t0
    load0 = os.getloadavg()[0]
    res = check_predictor(
        model, pred, samples=args.samples, seed=1000, rounds=args.rounds, refit=args.fit, sessions=args.sessions
    )
    res.update(
        {
            "model": name,
            "input": [1, 28, 28],
            "units": len(space.units),
            "layers": len(space.layers),
            "grid_points": args.grid,
            "table_entries_timed_now": pred.table.measured,
            "table_entries": len(pred.table.entries),
            "seconds_table_and_fit": round(t_build, 1),
            "load_avg_1min_before_check": round(load0, 2),
            "load_avg_1min_after_check": round(os.getloadavg()[0], 2),
        }
    )
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mobilenet_v2,resnet18")
    ap.add_argument("--samples", type=int, default=50, help="held-out sub-networks per model")
    ap.add_argument("--fit", type=int, default=12, help="sub-networks the a*sum+b fit uses (not among the held-out)")
    ap.add_argument("--grid", type=int, default=8, help="widths timed per unit")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--sessions", type=int, default=3, help="times the same sub-networks are timed (measured: their median)"
    )
    ap.add_argument("--table-dir", default=None, help="latency table folder (default: ~/.cache/edgeslim/latency)")
    ap.add_argument("--out", default=str(HERE / "results" / "nas_latency.json"))
    ap.add_argument("--smoke", action="store_true", help="small_cnn, 8 sub-networks, a coarse grid")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("edgeslim.prune", "edgeslim.nas._table"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.smoke:
        args.models, args.samples, args.fit, args.grid, args.rounds, args.sessions = "small_cnn", 8, 6, 4, 3, 2
    h = host()
    rows = []
    t0 = time.perf_counter()
    for name in args.models.split(","):
        rows.append(run_model(name.strip(), args))
    out = {
        "benchmark": "nas_latency",
        "host": h,
        "load_avg_end": [round(v, 2) for v in os.getloadavg()],
        "runtime": f"onnxruntime, {args.threads} thread(s), FP32, batch 1",
        "smoke": args.smoke,
        "target": {"samples": ">= 50", "median_abs_error_pct": "<= 10", "kendall_tau": ">= 0.9"},
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
    write_json(args.out if not args.smoke else str(Path(args.out).with_name("nas_latency_smoke.json")), out, force=True)
    print(f"host: {h.get('cpu')} [{h.get('isa')}], load avg {h['load_avg']} -> {out['load_avg_end']}")
    print(
        f"{'model':14} {'K':>3} {'units':>5} {'timed':>5} {'a':>6} {'b ms':>7} {'med err%':>8} {'max err%':>8} "
        f"{'tau':>5} {'meas tau':>8} {'form':>14} {'sum err%':>8} {'asbuilt%':>8} {'measured ms':>15} {'spread%':>7}"
    )
    for r in rows:
        p = r["fit"]
        lo, hi = r["measured_ms_range"]
        print(
            f"{r['model']:14} {r['samples']:>3} {r['units']:>5} {r['table_entries_timed_now']:>5} {p['a']:>6.3f} "
            f"{p['b_ms']:>7.3f} {r['median_abs_error_pct']:>8.2f} {r['max_abs_error_pct']:>8.2f} "
            f"{r['kendall_tau']:>5.3f} {r['measurement_tau'] or float('nan'):>8.3f} {p['form']:>14} {r['sum_median_abs_error_pct']:>8.2f} {r['asbuilt_median_abs_error_pct']:>8.2f} {lo:>7.3f}-{hi:<7.3f} "
            f"{r['median_spread_pct']:>7.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
