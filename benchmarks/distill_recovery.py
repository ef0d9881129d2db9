"""Recovery after pruning: ResNet-18-FMNIST pruned to ~50% MACs, fine-tuned with and without KD (same budget).

The unpruned model is the teacher. Both fine-tunes use the same steps, data subset, optimizer and seed; the KD run
adds Hinton KD on the cached teacher logits (``distill()``). Accuracy is on the full Fashion-MNIST test split
(10k) before fine-tuning, after cross-entropy only, and after KD. The default budget is short and CPU-sized
(1 epoch over a 3k-row subset: 47 SGD steps of 64), so the numbers show the early recovery, not the converged one.

    PYTHONPATH=src python benchmarks/distill_recovery.py --smoke         # ~1 min
    PYTHONPATH=src python benchmarks/distill_recovery.py            # ~8 min, 2 idle cores (~40 loaded); resumable
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

import edgeslim as es
from edgeslim.distill import DistillConfig, distill
from edgeslim.train import TrainConfig, evaluate, fit

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("distill_recovery")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-size", type=int, default=3000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--target-macs", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument(
        "--work",
        type=Path,
        default=Path("/tmp/distill_recovery"),
        help="stage results and checkpoints; delete it after changing settings",
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    for name in ("distill_recovery", "edgeslim"):
        logging.getLogger(name).setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    train, val = es.data.load("fashion-mnist")
    if args.smoke:
        args.train_size, args.work = 256, args.work.with_name(args.work.name + "_smoke")
        val = val.take(256)
    sub = train.take(args.train_size, seed=0)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / "stages.json"
    st: dict = json.loads(state_path.read_text()) if state_path.is_file() else {}

    def stage(key: str, fn):
        if key not in st:
            t0 = time.perf_counter()
            st[key] = {"value": fn(), "seconds": round(time.perf_counter() - t0, 1)}
            state_path.write_text(json.dumps(st, indent=1))
        log.info("%s: %s", key, st[key])
        return st[key]["value"]

    def acc(m) -> float:
        return round(evaluate(m, val, batch_size=250, device=args.device), 4)

    teacher = es.models.load("resnet18", dataset="fashion-mnist", pretrained=True).eval()
    x = val.normalized()[:2]
    pcfg = es.PruneConfig(method="channel", target_macs=args.target_macs)
    pruned = es.prune(teacher, pcfg, example_inputs=x)
    rep = pruned.prune_report
    log.info(
        "pruned: MACs %d -> %d (-%.1f%%), params %d -> %d",
        rep.macs_before,
        rep.macs_after,
        100 * rep.mac_reduction,
        rep.params_before,
        rep.params_after,
    )
    tc = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, augment=False, seed=0, warmup_steps=20)
    kd_cfg = DistillConfig(losses=("kd",), temperature=args.temperature, hard_weight=1.0)
    stage("teacher_accuracy", lambda: acc(teacher))
    stage("pruned_accuracy", lambda: acc(pruned))

    def ce_run() -> float:
        torch.manual_seed(0)
        return acc(fit(pruned, sub, None, tc, checkpoint_dir=work / "ce", device=args.device, progress=False).model)

    def kd_run() -> float:
        torch.manual_seed(0)
        return acc(
            distill(
                pruned,
                teacher,
                kd_cfg,
                data=(sub, None),
                train_config=tc,
                checkpoint_dir=work / "kd",
                device=args.device,
                progress=False,
            )
        )

    stage("ce_accuracy", ce_run)
    stage("kd_accuracy", kd_run)

    t_acc = st["teacher_accuracy"]["value"]
    rows = {
        "teacher (unpruned)": t_acc,
        "pruned, before fine-tuning": st["pruned_accuracy"]["value"],
        "pruned + fine-tune CE": st["ce_accuracy"]["value"],
        "pruned + fine-tune KD": st["kd_accuracy"]["value"],
    }
    budget = (
        f"{args.epochs} epoch(s) over {len(sub)} training rows, batch {args.batch_size}, SGD lr {args.lr}, "
        f"{args.device}" + (", short CPU budget" if args.device == "cpu" else "")
    )
    print(
        f"\n== ResNet-18-FMNIST pruned to {100 * (1 - rep.mac_reduction):.1f}% MACs — fine-tune: {budget}; "
        f"accuracy on {len(val)} test rows"
    )
    print(f"{'row':30s} {'accuracy':>9s} {'of teacher':>11s} {'seconds':>8s}")
    secs = {
        "pruned + fine-tune CE": st["ce_accuracy"]["seconds"],
        "pruned + fine-tune KD": st["kd_accuracy"]["seconds"],
    }
    for k, v in rows.items():
        print(f"{k:30s} {v:9.4f} {100 * v / t_acc:10.1f}% {secs.get(k, ''):>8}")
    out = args.out or (
        work / "distill_recovery_smoke.json"
        if args.smoke
        else ROOT / "benchmarks" / "results" / "distill_recovery.json"
    )
    meta = {
        "benchmark": "distill_recovery",
        "budget": budget,
        "note": "short fine-tuning budget; stage seconds on a shared, loaded host (include the KD teacher-cache pass)",
        "val_rows": len(val),
        "train_rows": len(sub),
        "prune": {
            "config": pcfg.to_dict(),
            "macs_before": rep.macs_before,
            "macs_after": rep.macs_after,
            "mac_reduction": round(rep.mac_reduction, 4),
            "params_before": rep.params_before,
            "params_after": rep.params_after,
        },
        "train_config": tc.to_dict(),
        "kd_config": kd_cfg.to_dict(),
        "accuracy": rows,
        "kd_minus_ce_pt": round(100 * (rows["pruned + fine-tune KD"] - rows["pruned + fine-tune CE"]), 2),
        "stage_seconds": {k: v["seconds"] for k, v in st.items()},
        "env": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "threads": args.threads,
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(meta, indent=2))
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
