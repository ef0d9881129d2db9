"""Measuring half of the Fashion-MNIST pruning benchmark: ONNX Runtime latency at batch 1 (measured
side by side, interleaved), MAC gain vs latency gain, accuracy, file sizes, FP32 and INT8 (edgeslim.quantize);
and the unstructured / 2:4 rows (storage sizes; dense ORT latency does not improve).

Reads what ``benchmarks/prune_fmnist.py`` wrote (``--from``: ``<model>-pruned.{json,pt}`` and
``prune_fmnist_train.json``). Models missing there are pruned here with the same settings and reported as
not fine-tuned. Writes benchmarks/results/prune_fmnist.json and prints one table.

    PYTHONPATH=src python benchmarks/prune_measure.py --from /tmp/prune-gpu [--variant early_kept=/tmp/prune-early]

``--variant LABEL=DIR`` (repeatable) adds the fine-tuned models another ``prune_fmnist.py`` run wrote to DIR
(e.g. with ``--keep-early``) as rows ``pruned_LABEL_fp32`` / ``pruned_LABEL_int8``, measured in the same
interleaved rounds as the others.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from _harness import host, ort_session  # noqa: E402

import edgeslim as es  # noqa: E402
from edgeslim import data, models  # noqa: E402
from edgeslim.core.io import write_json  # noqa: E402
from edgeslim.prune import PruneConfig, count_macs, load_pruned, prune, sparse_storage, strip_masks  # noqa: E402

log = logging.getLogger("prune_measure")


def ort_accuracy(path: Path, val, n: int) -> float:
    s = ort_session(path, 2)
    name = s.get_inputs()[0].name
    sub = val.take(n)
    correct = 0
    for x, y in sub.batches(250):
        out = s.run(None, {name: x.numpy()})[0]
        correct += int((out.argmax(1) == y.numpy()).sum())
    return correct / len(sub)


def interleaved_latency(paths: dict[str, Path], x: np.ndarray, threads: int, rounds: int, iters: int) -> dict:
    """Median/p90 ms per variant; variants take turns every round so load drifts hit them alike."""
    runners = {k: es.runtime.load(p, "onnxruntime", threads=threads) for k, p in paths.items()}
    res = es.runtime.interleaved_latency(runners, x, rounds=rounds, runs=iters, warmup=5, rewarm=0)
    return {
        k: {"p50_ms": round(r["p50_ms"], 3), "p90_ms": round(r["p90_ms"], 3), "runs": r["runs"]} for k, r in res.items()
    }


def export_onnx(model, path: Path, example) -> Path:
    es.export(model, "onnx", example_inputs=example, path=path, force=True, validate=False)
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--from", dest="src", default="/tmp/prune-gpu")
    ap.add_argument("--models", default="resnet18,mobilenet_v2")
    ap.add_argument("--eval-n", type=int, default=2000, help="validation images for the ORT accuracy columns")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="more fine-tuned pruned models (a prune_fmnist.py --out folder) measured side by side",
    )
    ap.add_argument(
        "--criteria-from",
        default="",
        help="a prune_fmnist.py --out folder whose criteria rows (e.g. a --criteria-steps 0 run with BN "
        "recalibration) are printed and stored beside the fine-tuned criteria table",
    )
    ap.add_argument("--host-note", default="", help="what else the host was doing (recorded in the JSON)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prune_fmnist.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(2)
    if args.smoke:
        args.eval_n, args.rounds, args.iters = 200, 2, 3
    src = Path(args.src)
    trained = (
        json.loads((src / "prune_fmnist_train.json").read_text()) if (src / "prune_fmnist_train.json").is_file() else {}
    )
    train, val = data.load("fashion-mnist")
    calib = train.take(2048, seed=1)
    x1 = val.normalized()[:1].numpy()
    example = val.take(64, seed=2)
    work = Path(tempfile.mkdtemp(prefix="prune-measure-"))
    result: dict = {
        "benchmark": "prune_fmnist",
        "source_of_finetuned_models": str(src) if trained else None,
        "host": {**host(), "note": args.host_note or "variants interleaved round by round"},
        "settings": vars(args),
        "training": trained.get("models", {}),
        "criteria": trained.get("criteria", {}),
        "criteria_model": trained.get("criteria_model"),
        "criteria_base_accuracy": trained.get("criteria_base_accuracy"),
        "models": {},
    }
    if args.criteria_from:
        cj = json.loads((Path(args.criteria_from) / "prune_fmnist_train.json").read_text())
        result["criteria_extra"] = {
            "source": args.criteria_from,
            "settings": cj.get("settings"),
            "base_accuracy": cj.get("criteria_base_accuracy"),
            "rows": cj.get("criteria", {}),
        }
    extra = {}
    for spec in args.variant:
        label, sep, folder = spec.partition("=")
        if not sep or not label or not Path(folder).is_dir():
            ap.error(f"--variant {spec!r}: expected LABEL=DIR with an existing folder DIR")
        extra[label] = Path(folder)
        tj = Path(folder) / "prune_fmnist_train.json"
        result.setdefault("training_variants", {})[label] = json.loads(tj.read_text())["models"] if tj.is_file() else {}
    threads = [int(t) for t in args.threads.split(",")]
    for name in args.models.split(","):
        base = models.load(name, "fashion-mnist")
        xt = val.normalized()[:2]
        rec = src / f"{name}-pruned"
        finetuned = rec.with_suffix(".json").is_file()
        if finetuned:
            pruned = load_pruned(models.build(name, "fashion-mnist"), rec)
        else:
            log.warning("%s: no fine-tuned model in %s; pruning here (accuracy is before fine-tuning)", name, src)
            pruned = prune(base, PruneConfig(method="channel", target_macs=0.5, importance="l2"), example_inputs=xt)
        variants = {"base_fp32": base, "pruned_fp32": pruned}
        for label, folder in extra.items():
            if (folder / f"{name}-pruned.json").is_file():
                variants[f"pruned_{label}_fp32"] = load_pruned(
                    models.build(name, "fashion-mnist"), folder / f"{name}-pruned"
                )
            else:
                log.warning("%s: no %s-pruned.json in %s (variant %s skipped)", name, name, folder, label)
        paths = {k: export_onnx(m, work / f"{name}-{k}.onnx", example) for k, m in variants.items()}
        qcfg = es.QuantConfig(calibration="mse", num_samples=256 if not args.smoke else 32)
        for k, m in list(variants.items()):
            q = es.quantize(m, qcfg, calib=calib)
            kk = k.replace("fp32", "int8")
            paths[kk] = export_onnx(q, work / f"{name}-{kk}.onnx", example)
        if name == "resnet18":  # unstructured / 2:4 rows: zeros only (no fine-tuning); latency stays dense
            for kk, cfg in (
                ("magnitude80_fp32", PruneConfig(method="magnitude", ratio=0.8)),
                ("nm24_fp32", PruneConfig(method="nm", n=2, m=4)),
            ):
                sp = strip_masks(prune(base, cfg, example_inputs=xt))
                variants[kk] = sp
                paths[kk] = export_onnx(sp, work / f"{name}-{kk}.onnx", example)
        lat = {t: interleaved_latency(paths, x1, t, args.rounds, args.iters) for t in threads}
        macs = {k: count_macs(m, xt) for k, m in variants.items()}
        rows = {}
        for k, p in paths.items():
            fp = k.replace("int8", "fp32")
            rows[k] = {
                "macs": macs.get(fp),
                "onnx_bytes": p.stat().st_size,
                "ort_accuracy": ort_accuracy(p, val, args.eval_n),
                **{f"latency_{t}t": lat[t][k] for t in threads},
            }
            if k in ("magnitude80_fp32", "nm24_fp32"):
                rows[k]["storage"] = sparse_storage(variants[k])
        b = rows["base_fp32"]
        for r in rows.values():
            r["mac_gain"] = round(b["macs"] / r["macs"], 3) if r["macs"] else None
            for t in threads:
                r[f"latency_gain_{t}t"] = round(b[f"latency_{t}t"]["p50_ms"] / r[f"latency_{t}t"]["p50_ms"], 3)
                if r["mac_gain"] and r["mac_gain"] > 1.01:  # the target: >= 0.8
                    r[f"latency_gain_to_mac_gain_ratio_{t}t"] = round(r[f"latency_gain_{t}t"] / r["mac_gain"], 3)
            r["size_gain"] = round(b["onnx_bytes"] / r["onnx_bytes"], 3)
        result["models"][name] = {"finetuned_here_or_on_gpu": finetuned, "rows": rows, "eval_subset": args.eval_n}
        _print(name, rows, threads, trained.get("models", {}).get(name))
        for label, tr in result.get("training_variants", {}).items():
            if name in tr:
                t = tr[name]
                print(
                    f"   {label}: torch accuracy on 10k val: {_before(t)}, fine-tuned {t['accuracy_finetuned']:.4f} "
                    f"(drop {t['accuracy_drop_pt']:.2f} pt), MACs -{100 * t['mac_reduction']:.1f}%"
                )
    _print_criteria(result)
    write_json(args.out, result, force=True)
    print(f"\nwrote {args.out}")


def _print(name: str, rows: dict, threads: list[int], tr: dict | None) -> None:
    print(f"\n== {name} (ORT CPU, batch 1, variants interleaved; load average {os.getloadavg()[0]:.2f})")
    if tr:
        print(
            f"   torch accuracy on 10k val: base {tr['accuracy_base']:.4f}, {_before(tr)}, "
            f"fine-tuned {tr['accuracy_finetuned']:.4f} (drop {tr['accuracy_drop_pt']:.2f} pt)"
        )
    hdr = (
        f"{'variant':18s} {'MACs':>12s} {'MACx':>6s} "
        + " ".join(f"{f'p50 {t}T ms':>11s} {f'speedup {t}T':>11s}" for t in threads)
        + f" {'size MB':>8s} {'acc':>7s}"
    )
    print(hdr)
    for k, r in rows.items():
        line = f"{k:26s} {r['macs'] or 0:12,d} {r['mac_gain'] or 0:6.2f} " + " ".join(
            f"{r[f'latency_{t}t']['p50_ms']:11.3f} {r[f'latency_gain_{t}t']:11.2f}" for t in threads
        )
        line += f" {r['onnx_bytes'] / 1e6:8.2f} {r['ort_accuracy']:7.4f}"
        if "storage" in r:
            s = r["storage"]
            line += f"  [sparse {s['sparsity']:.0%}: best {s['best_format']} {s[s['best_format']] / 1e6:.2f} MB vs dense {s['dense_fp32'] / 1e6:.2f} MB]"
        print(line)


def _before(t: dict) -> str:
    """'pruned 0.1000' or 'pruned 0.1000 / BN-recalibrated 0.7920' (the accuracy before fine-tuning)."""
    s = f"pruned {t['accuracy_pruned']:.4f}"
    if t.get("accuracy_bn_recalibrated") is not None:
        s += f" / BN-recalibrated {t['accuracy_bn_recalibrated']:.4f}"
    return s


def _print_criteria(result: dict) -> None:
    tables = []
    if result.get("criteria"):
        tables.append((result["criteria"], result["criteria_base_accuracy"], "fine-tuned run"))
    if result.get("criteria_extra", {}).get("rows"):
        ex = result["criteria_extra"]
        tables.append((ex["rows"], ex["base_accuracy"], f"from {ex['source']}"))
    for crit, base, where in tables:
        print(
            f"\n== criteria on {result.get('criteria_model') or 'resnet18'} (same channel ratio; base accuracy "
            f"{base:.4f}; torch accuracy on 10k val; {where})"
        )
        print(f"{'criterion':13s} {'pruned':>8s} {'BN-recal':>9s} {'fine-tuned':>11s}")
        tuned = all("accuracy_finetuned" in v for v in crit.values())
        key = "accuracy_finetuned" if tuned else "accuracy_bn_recalibrated"
        for k, v in sorted(crit.items(), key=lambda kv: -(kv[1].get(key) or 0)):
            cols = [v.get("accuracy_bn_recalibrated"), v.get("accuracy_finetuned")]
            print(
                f"{k:13s} {v['accuracy_pruned']:8.4f} "
                + " ".join(f"{c:{w}.4f}" if c is not None else f"{'-':>{w}s}" for c, w in zip(cols, (9, 11)))
            )


if __name__ == "__main__":
    main()
