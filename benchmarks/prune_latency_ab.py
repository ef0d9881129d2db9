"""Does the way channels are removed change how much of the MAC cut turns into ONNX Runtime speed?

Same MAC target (``target_macs``, default 0.5), same criterion (l2), different layouts of the cut:
width rounding to 8 vs 16, the early (launch-bound, small) layers left alone, and global vs per-layer
ranking. Latency only: the pruned weights are *not* fine-tuned here (speed does not depend on the weight
values), so these rows say nothing about accuracy; accuracy after fine-tuning exists only for the default
configuration (benchmarks/results/prune_fmnist.json, fine-tuned on a GPU). Variants are measured
interleaved, round by round, batch 1, 1 and 2 ORT threads. Writes benchmarks/results/prune_latency_ab.json.

    PYTHONPATH=src python benchmarks/prune_latency_ab.py [--models resnet18,mobilenet_v2] [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from prune_measure import export_onnx, interleaved_latency  # noqa: E402

from edgeslim import data, models  # noqa: E402
from edgeslim.prune import PruneConfig, count_macs, prune  # noqa: E402

EARLY = {"resnet18": ("conv1", "layer1.*"), "mobilenet_v2": ("features.0.*", "features.1.*", "features.2.*")}


def variants(name: str, target: float) -> dict[str, PruneConfig]:
    base = PruneConfig(method="channel", target_macs=target, importance="l2")
    return {
        "default_r8_layer": base,
        "r16_layer": base.replace(round_to=16),
        "r8_early_kept": base.replace(exclude=EARLY[name]),
        "r16_early_kept": base.replace(round_to=16, exclude=EARLY[name]),
        "r8_global": base.replace(scope="global", max_layer_ratio=0.8),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet18,mobilenet_v2")
    ap.add_argument("--target-macs", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prune_latency_ab.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    _, val = data.load("fashion-mnist")
    xt = val.normalized()[:2]
    x1 = val.normalized()[:1].numpy()
    example = val.take(64, seed=2)
    work = Path(tempfile.mkdtemp(prefix="prune-ab-"))
    threads = [int(t) for t in args.threads.split(",")]
    result: dict = {
        "benchmark": "prune_latency_ab",
        "settings": vars(args),
        "host": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "note": f"2-core host, load avg {os.getloadavg()[0]:.1f} at start; variants "
            "interleaved round by round; pruned weights not fine-tuned (latency only)",
        },
        "models": {},
    }
    for name in args.models.split(","):
        base = models.load(name, "fashion-mnist")
        macs0 = count_macs(base, xt)
        paths = {"base": export_onnx(base, work / f"{name}-base.onnx", example)}
        macs = {"base": macs0}
        for k, cfg in variants(name, args.target_macs).items():
            try:
                p = prune(base, cfg, example_inputs=xt)
            except Exception as e:  # noqa: BLE001 - record and go on
                result["models"].setdefault(name, {}).setdefault("errors", {})[k] = str(e)
                continue
            macs[k] = count_macs(p, xt)
            paths[k] = export_onnx(p, work / f"{name}-{k}.onnx", example)
        lat = {t: interleaved_latency(paths, x1, t, args.rounds, args.iters) for t in threads}
        rows = {}
        for k in paths:
            r = {"macs": macs[k], "mac_gain": round(macs0 / macs[k], 3)}
            for t in threads:
                r[f"p50_ms_{t}t"] = lat[t][k]["p50_ms"]
                r[f"speedup_{t}t"] = round(lat[t]["base"]["p50_ms"] / lat[t][k]["p50_ms"], 3)
                if k != "base":
                    r[f"speedup_over_mac_gain_{t}t"] = round(r[f"speedup_{t}t"] / r["mac_gain"], 3)
            rows[k] = r
        result["models"].setdefault(name, {})["rows"] = rows
        print(f"\n== {name}: ORT batch 1, interleaved; speedup / MAC gain (target >= 0.8)")
        print(
            f"{'variant':18s} {'MACx':>6s} "
            + " ".join(f"{f'p50 {t}T':>9s} {f'x{t}T':>6s} {f'r{t}T':>6s}" for t in threads)
        )
        for k, r in rows.items():
            print(
                f"{k:18s} {r['mac_gain']:6.2f} "
                + " ".join(
                    f"{r[f'p50_ms_{t}t']:9.3f} {r[f'speedup_{t}t']:6.2f} {r.get(f'speedup_over_mac_gain_{t}t', 1.0):6.2f}"
                    for t in threads
                )
            )
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
