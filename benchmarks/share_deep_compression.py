"""Benchmark: Deep Compression (prune -> cluster -> entropy-code) and low-rank / separable layers on Fashion-MNIST.

Parts:
  1. LeNet-300-100 (784-300-100-10 MLP; Han et al. 2016 report 40x on MNIST): train with edgeslim.train.fit,
     magnitude-prune and fine-tune in two rounds, cluster (32, linear init), fine-tune, save_compressed. Accuracy and storage after every step;
     storage ratio against the FP32 state_dict written by torch.save. Targets: >= 30x at <= 1 point drop.
  2. Clustering alone (32 clusters, no fine-tuning, each k-means init) on the shipped small_cnn. Target: within
     0.5 point.
  3. Cross-layer tying on the shipped MobileNetV2 (auto groups of identical inverted-residual blocks): params,
     ONNX file size, accuracy on 1000 validation samples without fine-tuning.
  4. small_cnn with its two large 3x3 convs (features.4, features.8) factorized: channel SVD, spatial SVD,
     depthwise-separable (weight and activation fits). Per row: MACs, ONNX Runtime latency (1 thread, batch 1,
     median of interleaved rounds of edgeslim.runtime.measure), accuracy in ONNX Runtime before fine-tuning and
     in torch after a short fine-tune. Rows slower than the baseline say "slower".
Accuracy is top-1 on the 10k validation split. Fine-tuning keeps the best epoch by that same split, as
edgeslim.train.fit does, so the fine-tuned numbers are slightly optimistic.

    python benchmarks/share_deep_compression.py [--epochs 10] [--rounds 5]

Prints a table and writes benchmarks/results/share_deep_compression.json. Not a test: numbers vary run to run.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from _harness import latency_rounds
from torch import nn

import edgeslim as es
from edgeslim.core.counting import count_params
from edgeslim.core.io import write_json
from edgeslim.core.metrics import host_info
from edgeslim.share import (
    ClusterConfig,
    FactorizeConfig,
    SeparableConfig,
    cluster,
    dense_size,
    factorize,
    load_compressed,
    magnitude_prune,
    save_compressed,
    separable,
    strip_clustering,
)
from edgeslim.train import TrainConfig, evaluate, fit

HERE = Path(__file__).parent
# iterative magnitude pruning, per layer (keys: module names of the Sequential); Han et al. 2016 end at 92/91/74%
PRUNE = ({"1": 0.80, "3": 0.80, "5": 0.50}, {"1": 0.95, "3": 0.90, "5": 0.70})


def lenet_300_100() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
    )


def tune(model: nn.Module, train, val, epochs: int, lr: float, steps: int | None = None) -> nn.Module:
    cfg = TrainConfig(epochs=epochs, lr=lr, augment=False, warmup_steps=0, weight_decay=0.0)
    return fit(model, train, val, cfg, progress=False, max_steps_per_epoch=steps).model


def deep_compression(train, val, args, tmp: Path) -> dict:
    rows = []
    t0 = time.perf_counter()
    base = fit(
        lenet_300_100(), train, val, TrainConfig(epochs=args.epochs, lr=0.05, augment=False), progress=False
    ).model
    dense = dense_size(base)

    def row(step: str, model: nn.Module, path: Path | None, note: str = "") -> dict:
        stored = save_compressed(model, path, force=True) if path else None
        size = stored.compressed_bytes if stored else dense
        r = {
            "step": step,
            "accuracy": evaluate(model, val),
            "bytes": size,
            "ratio": dense / size,
            "note": note,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        if stored:
            r["parts"], r["codec_bytes"] = stored.parts, stored.codec_bytes
        rows.append(r)
        return r

    row("LeNet-300-100 FP32 (torch.save state_dict)", base, None)
    row("clustered 32, no pruning, no fine-tune", cluster(base, ClusterConfig(clusters=32)), tmp / "c.eslz")
    linear = ClusterConfig(clusters=args.clusters, init="linear")  # Han et al.'s choice when fine-tuning follows
    pruned = base
    for i, (rates, epochs) in enumerate(zip(PRUNE, args.prune_epochs)):
        pruned = magnitude_prune(pruned, rates)
        sp = pruned.report.totals["sparsity"]
        row(f"prune round {i + 1}: {sp:.1%} zeros", pruned, tmp / "p0.eslz", "sparse FP32: mask + values")
        pruned = tune(pruned, train, val, epochs, 0.02)
        row(f"  + fine-tune {epochs} ep", pruned, tmp / "p.eslz", "sparse FP32: mask + values")
    clustered = cluster(pruned, linear)
    row(f"+ cluster {args.clusters} (linear init)", clustered, tmp / "pc0.eslz")
    clustered = tune(clustered, train, val, args.cluster_epochs, 0.005)
    r = row(
        f"+ fine-tune centroids {args.cluster_epochs} ep, entropy-coded",
        clustered,
        tmp / "pc.eslz",
        "final Deep Compression file",
    )
    reloaded = load_compressed(tmp / "pc.eslz", lenet_300_100)
    ref = strip_clustering(clustered).state_dict()
    exact = list(ref) == list(reloaded.state_dict()) and all(
        torch.equal(ref[k], v) for k, v in reloaded.state_dict().items()
    )
    return {
        "dense_bytes": dense,
        "rows": rows,
        "final": r,
        "reload_exact": exact,
        "prune_per_layer": list(PRUNE),
        "sparsity": sp,
    }


def tie_part(val, tmp: Path) -> list[dict]:
    from edgeslim.share import TieConfig, tie_layers

    base = es.models.load("mobilenet_v2")
    sub = val.take(1000, seed=0)
    rows = []
    for name, cfg in (
        ("MobileNetV2 (shipped)", None),
        ("tied, own BN statistics", TieConfig(auto=True, buffers=False)),
        ("tied, shared BN statistics", TieConfig(auto=True)),
    ):
        model = base if cfg is None else tie_layers(base, cfg)
        art = es.export(model, "onnx", example_inputs=val, path=tmp / f"tie{len(rows)}.onnx", force=True)
        rows.append(
            {
                "variant": name,
                "params": count_params(model),
                "onnx_bytes": art.size_bytes,
                "accuracy_1000": evaluate(model, sub),
                "groups": [r["name"] for r in model.report.done()] if cfg else [],
            }
        )
    return rows


def small_cnn_part(train, val, args, tmp: Path) -> dict:
    base = es.models.load("small_cnn")
    base_acc = evaluate(base, val)
    cl = []
    for init in ("kmeans++", "linear", "density"):
        c = cluster(base, ClusterConfig(clusters=32, init=init))
        stored = save_compressed(c, tmp / "small_cnn.eslz", force=True)
        cl.append(
            {
                "init": init,
                "accuracy_before": base_acc,
                "accuracy_after": evaluate(c, val),
                "dense_bytes": stored.dense_bytes,
                "compressed_bytes": stored.compressed_bytes,
                "ratio": stored.ratio,
                "onnx_bytes": es.export(
                    strip_clustering(c), "onnx", example_inputs=val, path=tmp / "small_cnn-clustered.onnx", force=True
                ).size_bytes,
            }
        )

    big = ("features.4", "features.8")
    variants = {
        "baseline": (base, ""),
        "svd energy 0.9": (factorize(base, FactorizeConfig(method="svd", energy=0.9, layers=big)), ""),
        "svd mac_ratio 0.5": (factorize(base, FactorizeConfig(method="svd", mac_ratio=0.5, layers=big)), ""),
        "spatial_svd energy 0.9": (factorize(base, FactorizeConfig(method="spatial_svd", energy=0.9, layers=big)), ""),
        "spatial_svd mac_ratio 0.5": (
            factorize(base, FactorizeConfig(method="spatial_svd", mac_ratio=0.5, layers=big)),
            "",
        ),
        "separable (weights fit)": (separable(base, SeparableConfig(layers=big)), ""),
        "separable (activations fit)": (
            separable(base, SeparableConfig(layers=big, fit="activations", samples=256), data=train),
            "",
        ),
    }
    arts, rows = {}, []
    for name, (model, _) in variants.items():
        arts[name] = es.export(model, "onnx", example_inputs=val, path=tmp / f"{len(arts)}.onnx", force=True)
        m = es.measure(arts[name], data=val, threads=1, runs=50, peak_memory=False)
        rep = getattr(model, "report", None)
        rows.append(
            {
                "variant": name,
                "macs": int(m["macs"]),
                "params": int(m["params"]),
                "accuracy_ort": m["accuracy"],
                "ranks": {r["name"]: r.get("rank", "dw+pw") for r in rep.done()} if rep else {},
                "accuracy_finetuned": (
                    base_acc if name == "baseline" else evaluate(tune(model, train, val, 1, 0.01, args.tune_steps), val)
                ),
            }
        )
    lat = latency_rounds(arts, args.rounds, args.runs, warmup=20)
    b = lat["baseline"]
    for r in rows:
        r["latency_p50_ms"] = lat[r["variant"]]
        ratio = lat[r["variant"]] / b
        r["vs_baseline"] = (
            "-"
            if r["variant"] == "baseline"
            else ("slower" if ratio > 1.05 else "faster" if ratio < 0.95 else "same (within 5%)")
        )
    return {"clustering": cl, "factorization": rows, "base_accuracy": base_acc}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10, help="LeNet-300-100 training epochs")
    ap.add_argument("--prune-epochs", type=int, nargs=2, default=(4, 6), help="fine-tune epochs per prune round")
    ap.add_argument("--cluster-epochs", type=int, default=3)
    ap.add_argument("--clusters", type=int, default=32)
    ap.add_argument("--tune-steps", type=int, default=300, help="steps of the 1-epoch small_cnn fine-tune")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "share_deep_compression.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    train, val = es.data.load("fashion-mnist")
    with tempfile.TemporaryDirectory() as td:
        dc = deep_compression(train, val, args, Path(td))
        ties = tie_part(val, Path(td))
        sc = small_cnn_part(train, val, args, Path(td))

    base_acc = dc["rows"][0]["accuracy"]
    print(f"\nDeep Compression, LeNet-300-100 on Fashion-MNIST (FP32 state_dict {dc['dense_bytes']} bytes)")
    print(f"{'step':<52} {'top-1':>7} {'drop':>6} {'bytes':>9} {'ratio':>7}")
    for r in dc["rows"]:
        print(
            f"{r['step']:<52} {r['accuracy']:>7.4f} {100 * (base_acc - r['accuracy']):>5.2f}p {r['bytes']:>9} "
            f"{r['ratio']:>6.1f}x"
        )
    fin = dc["final"]
    for part, codecs in fin["codec_bytes"].items():
        print(f"  {part}: " + ", ".join(f"{k} {v} B" for k, v in codecs.items()))
    print(f"  parts: {fin['parts']}; reload exact: {dc['reload_exact']}")
    print(f"\nsmall_cnn (shipped, top-1 {sc['base_accuracy']:.4f}), 32 clusters, no fine-tune")
    for c in sc["clustering"]:
        drop = 100 * (c["accuracy_before"] - c["accuracy_after"])
        print(
            f"  init {c['init']:<9} top-1 {c['accuracy_after']:.4f} ({drop:.2f} pt drop); {c['dense_bytes']} -> "
            f"{c['compressed_bytes']} bytes ({c['ratio']:.1f}x); dense ONNX of the stripped model "
            f"{c['onnx_bytes']} bytes"
        )
    print(f"\ncross-layer tying, groups: {'; '.join(ties[-1]['groups'])}")
    print(f"{'variant':<28} {'params':>9} {'ONNX bytes':>11} {'top-1 (1000)':>12}")
    for r in ties:
        print(f"{r['variant']:<28} {r['params']:>9} {r['onnx_bytes']:>11} {r['accuracy_1000']:>12.4f}")
    print("\nsmall_cnn, features.4 and features.8 factorized (ORT 1 thread, batch 1)")
    print(f"{'variant':<28} {'MACs':>9} {'params':>7} {'p50 ms':>7} {'top-1 ORT':>9} {'1-ep ft':>8}  latency")
    for r in sc["factorization"]:
        print(
            f"{r['variant']:<28} {r['macs']:>9} {r['params']:>7} {r['latency_p50_ms']:>7.3f} "
            f"{r['accuracy_ort']:>9.4f} {r['accuracy_finetuned']:>8.4f}  {r['vs_baseline']}"
        )
    total = time.perf_counter() - t0
    print(f"\ntotal {total:.0f} s")
    write_json(
        args.out,
        {
            "benchmark": "share_deep_compression",
            "host": host_info(),
            "seconds": round(total, 1),
            "args": {k: str(v) for k, v in vars(args).items()},
            "deep_compression": dc,
            "small_cnn": sc,
            "tie_mobilenet_v2": ties,
            "targets": {"lenet_ratio": ">= 30x", "lenet_drop": "<= 1 pt", "small_cnn_cluster_drop": "<= 0.5 pt"},
        },
        force=True,
    )
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
