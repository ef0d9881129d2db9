"""Structured pruning on Fashion-MNIST: ResNet-18 and MobileNetV2 at ~50% fewer MACs, fine-tuned; and a
criteria table (each importance criterion vs random at the same channel ratio, before/after a short fine-tune).

This is the training half (GPU-friendly). It writes, to ``--out``:
  ``<model>-pruned.json/.pt``   the replayable recipe + state_dict of each fine-tuned pruned model
  ``prune_fmnist_train.json``   accuracies, MACs, params, settings and timings
The measuring half (ONNX Runtime latency at batch 1, FP32 and INT8, sizes) is ``benchmarks/prune_measure.py``,
run on the CPU host on these outputs.

    PYTHONPATH=src python benchmarks/prune_fmnist.py --device cuda --out /tmp/prune-out
    PYTHONPATH=src python benchmarks/prune_fmnist.py --smoke --out /tmp/prune-smoke     # CPU, ~1 min
    PYTHONPATH=src python benchmarks/prune_fmnist.py --keep-early --no-criteria --out /tmp/prune-early

``--keep-early`` leaves the first, small, launch-bound layers whole (``EARLY`` below) and takes the MAC cut
from the rest: the layout that turned most of the MAC cut into ORT speed in ``benchmarks/prune_latency_ab.py``.

Needs torch, torchvision, numpy and torch-pruning (pure Python; put its folder on PYTHONPATH if it is not
installed). Fashion-MNIST is found as edgeslim.data finds it (EDGESLIM_FMNIST_DIR first).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from edgeslim import data, models  # noqa: E402
from edgeslim.core.io import write_json  # noqa: E402
from edgeslim.prune import IMPORTANCE, PruneConfig, count_macs, prune, save_pruned  # noqa: E402
from edgeslim.train import TrainConfig, evaluate, fit, recalibrate_bn  # noqa: E402

log = logging.getLogger("prune_fmnist")

# the early layers left whole by --keep-early (they are small and bound by kernel launches, not MACs)
EARLY = {"resnet18": ("conv1", "layer1.*"), "mobilenet_v2": ("features.0.*", "features.1.*", "features.2.*")}


def _eval(model, val, device) -> float:
    return evaluate(model.to(device), val, batch_size=1000, device=device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny data and steps: checks the script end to end")
    ap.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs of the two main models")
    ap.add_argument("--target-macs", type=float, default=0.5)
    ap.add_argument("--importance", default="l2")
    ap.add_argument("--models", default="resnet18,mobilenet_v2")
    ap.add_argument("--criteria-model", default="resnet18")
    ap.add_argument("--criteria-ratio", type=float, default=0.3)
    ap.add_argument(
        "--criteria-steps",
        type=int,
        default=150,
        help="fine-tuning steps per criterion (0: no fine-tuning, only the before/BN-recalibrated columns)",
    )
    ap.add_argument(
        "--random-seeds",
        default="",
        help="more rows of the random criterion with these seeds (e.g. 1,2,3,4): its spread",
    )
    ap.add_argument("--criteria-only", default="", help="only these criteria (comma-separated; default all)")
    ap.add_argument("--no-criteria", action="store_true", help="skip the criteria table")
    ap.add_argument("--keep-early", action="store_true", help="leave the early layers (EARLY) unpruned")
    ap.add_argument("--round-to", type=int, default=8, help="pruned widths rounded to a multiple of this")
    ap.add_argument(
        "--steps-per-epoch",
        type=int,
        default=0,
        help="cap on fine-tuning steps per epoch (0: the whole training split; for CPU-only hosts)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument(
        "--recalibrate-bn",
        type=int,
        default=1024,
        help="re-estimate BatchNorm statistics on this many training images after pruning, before "
        "fine-tuning (0: off); the accuracy is recorded before and after",
    )
    ap.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train in NHWC memory format (same arithmetic, faster CPU convolutions)",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, val = data.load("fashion-mnist")
    if args.smoke:
        train, val = train.take(512), val.take(256)
    max_steps = 3 if args.smoke else (args.steps_per_epoch or None)
    epochs = 1 if args.smoke else args.epochs
    x = val.normalized()[:2]
    results: dict = {
        "benchmark": "prune_fmnist (training half)",
        "host": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": args.device,
            "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
        },
        "settings": vars(args),
        "train_size": len(train),
        "val_size": len(val),
        "models": {},
        "criteria": {},
    }
    state = out / "prune_fmnist_train.json"  # rewritten (atomically) after every model and criterion
    earlier = json.loads(state.read_text()) if state.is_file() else {}
    # resume: models an earlier run finished in this folder are kept (each with its settings), and criteria rows
    results["models"] = {k: v for k, v in earlier.get("models", {}).items() if (out / f"{k}-pruned.json").is_file()}
    prev_criteria = _earlier_criteria(args, earlier)
    t_all = time.perf_counter()
    for name in [m for m in args.models.split(",") if m]:
        if name in results["models"]:
            log.info("%s: done in an earlier run (%s), kept", name, state)
            continue
        t0 = time.perf_counter()
        base = models.load(name, "fashion-mnist")
        acc_base = _eval(base, val, args.device)
        base = base.cpu()
        cfg = PruneConfig(
            method="channel",
            target_macs=args.target_macs,
            importance=args.importance,
            round_to=args.round_to,
            exclude=EARLY[name] if args.keep_early else (),
        )
        pruned = prune(base, cfg, example_inputs=x, data=train.take(512))
        rep = pruned.prune_report
        acc_pruned = _eval(pruned, val, args.device)
        acc_bn = None
        if args.recalibrate_bn:
            pruned = recalibrate_bn(pruned.cpu(), train, num_samples=args.recalibrate_bn)
            acc_bn = _eval(pruned, val, args.device)
        tc = TrainConfig(epochs=epochs, batch_size=256, lr=0.02, weight_decay=4e-5, warmup_steps=50)
        # an interrupted run resumes after the last finished epoch
        res = fit(
            pruned.cpu(),
            train,
            val,
            tc,
            device=args.device,
            progress=False,
            max_steps_per_epoch=max_steps,
            checkpoint_dir=out / f"{name}-ckpt",
            channels_last=args.channels_last,
        )
        tuned = res.model
        tuned.prune_report = rep
        acc_tuned = _eval(tuned, val, args.device)
        tuned = tuned.cpu()
        save_pruned(tuned, out / f"{name}-pruned", force=True, half=True)  # FP16 storage: files < 16 MB
        results["models"][name] = {
            "accuracy_base": acc_base,
            "accuracy_pruned": acc_pruned,
            "accuracy_bn_recalibrated": acc_bn,
            "accuracy_finetuned": acc_tuned,
            "accuracy_drop_pt": round(100 * (acc_base - acc_tuned), 2),
            "macs_base": rep.macs_before,
            "macs_pruned": rep.macs_after,
            "mac_reduction": round(rep.mac_reduction, 4),
            "params_base": rep.params_before,
            "params_pruned": rep.params_after,
            "channel_ratio": rep.layers.get("_channel_ratio"),
            "config": cfg.to_dict(),
            "train_config": tc.to_dict(),
            "max_steps_per_epoch": max_steps,
            "settings": vars(args),
            "history": res.history,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        log.info(
            "%s: base %.4f, pruned %.4f, BN-recalibrated %s, fine-tuned %.4f, MACs -%.1f%%",
            name,
            acc_base,
            acc_pruned,
            acc_bn,
            acc_tuned,
            100 * rep.mac_reduction,
        )
        write_json(state, results, force=True)
    if not args.no_criteria:
        _criteria(args, results, train, val, x, prev_criteria, state)
    results["seconds_total"] = round(time.perf_counter() - t_all, 1)
    write_json(state, results, force=True)
    print(
        json.dumps(
            {
                k: {kk: vv for kk, vv in v.items() if kk.startswith("acc") or kk == "mac_reduction"}
                for k, v in results["models"].items()
            },
            indent=1,
        )
    )
    print(json.dumps(results["criteria"], indent=1))
    print(f"total {results['seconds_total']} s")


def _criteria(args, results: dict, train, val, x, prev: dict, state: Path) -> None:
    """Criteria table: same channel ratio, same short fine-tune, one row per registered criterion; accuracy right
    after pruning, after BatchNorm recalibration (EagleEye's adaptive BN, no training) and after fine-tuning."""
    name = args.criteria_model
    base = models.load(name, "fashion-mnist")
    acc_base = _eval(base, val, args.device)
    base = base.cpu()
    results["criteria_model"] = name
    results["criteria_base_accuracy"] = acc_base
    rows = [(c, c, 0) for c in IMPORTANCE.names() if not args.criteria_only or c in args.criteria_only.split(",")]
    rows += [(f"random_seed{s}", "random", s) for s in (int(v) for v in args.random_seeds.split(",") if v)]
    for label, crit, seed in rows:
        if label in prev:  # resume: rows an earlier run of this folder finished
            results["criteria"][label] = prev[label]
            continue
        t0 = time.perf_counter()
        cfg = PruneConfig(method="channel", ratio=args.criteria_ratio, importance=crit, seed=seed)
        pruned = prune(base, cfg, example_inputs=x, data=train.take(512))
        acc0 = _eval(pruned, val, args.device)
        row = {"accuracy_pruned": acc0, "macs": count_macs(pruned.cpu(), x), "ratio": args.criteria_ratio}
        if args.recalibrate_bn:
            pruned = recalibrate_bn(pruned.cpu(), train, num_samples=args.recalibrate_bn)
            row["accuracy_bn_recalibrated"] = _eval(pruned, val, args.device)
        steps = 3 if args.smoke else args.criteria_steps
        if steps:
            tc = TrainConfig(epochs=1, batch_size=256, lr=0.01, warmup_steps=20)
            res = fit(
                pruned.cpu(),
                train,
                val,
                tc,
                device=args.device,
                progress=False,
                max_steps_per_epoch=steps,
                channels_last=args.channels_last,
            )
            row["accuracy_finetuned"] = _eval(res.model, val, args.device)
            row["finetune_steps"] = steps
        row["seconds"] = round(time.perf_counter() - t0, 1)
        results["criteria"][label] = row
        log.info("criterion %s: %s", label, {k: v for k, v in row.items() if k.startswith("acc")})
        write_json(state, results, force=True)


def _earlier_criteria(args, earlier: dict) -> dict:
    """Criteria rows of an earlier run in ``--out`` (``earlier``, its JSON) with the same ratio, steps, BN
    recalibration and model; none otherwise."""
    keys = ("criteria_ratio", "criteria_steps", "recalibrate_bn", "criteria_model")
    if any(earlier.get("settings", {}).get(k) != getattr(args, k) for k in keys):
        return {}
    return earlier.get("criteria", {})


if __name__ == "__main__":
    main()
