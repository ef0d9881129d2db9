"""`edgeslim <verb>`: a thin command line over the same verbs as the Python API.

Every command takes ``--json`` for machine-readable output and exits non-zero on error, printing a
one-line message that names what was wrong.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from edgeslim.core.errors import EdgeslimError


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="zoo name (small_cnn, mobilenet_v2, resnet18) or 'package.module:function'")
    p.add_argument("--dataset", default="fashion-mnist", help="dataset name or folder:<path> (default fashion-mnist)")
    p.add_argument("--weights", help="state_dict file to load (read with weights_only=True)")
    p.add_argument("--no-pretrained", action="store_true", help="random initialisation instead of the shipped checkpoint")


def _load_model(a: argparse.Namespace):
    from edgeslim import models

    return models.load(a.model, a.dataset, pretrained=not a.no_pretrained, weights=a.weights)


def _emit(a: argparse.Namespace, obj: dict[str, Any], text: str) -> None:
    print(json.dumps(obj, indent=2, default=str) if a.json else text)


def cmd_train(a: argparse.Namespace) -> None:
    from edgeslim.train import TrainConfig, train_baseline

    cfg = TrainConfig(epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, seed=a.seed)
    rec = train_baseline(a.model, a.dataset, cfg, init=a.init, out=a.out, force=a.force, progress=not a.json,
                         device=a.device)
    _emit(a, rec, f"{a.model} on {a.dataset}: accuracy {rec['accuracy']:.4f} ({rec['train_seconds']} s)")


def cmd_quantize(a: argparse.Namespace) -> None:
    from edgeslim import data
    from edgeslim.core.io import write_text
    from edgeslim.export import export
    from edgeslim.quantize import QuantConfig, quantize

    base = QuantConfig.from_yaml(Path(a.config)) if a.config else QuantConfig()
    changes = {k: v for k, v in {
        "mode": a.mode, "calibration": a.calibration, "activation_type": a.activation_type,
        "num_samples": a.samples, "exclude": tuple(a.exclude) if a.exclude else None,
        "per_channel": False if a.per_tensor else None, "reduce_range": True if a.reduce_range else None,
    }.items() if v is not None}
    cfg = base.replace(**changes)
    model = _load_model(a)
    train, val = data.load(a.dataset)
    q = quantize(model, cfg, calib=train, example_inputs=val.normalized()[:8])
    art = export(q, "onnx", example_inputs=val, path=a.out, force=a.force)
    write_text(Path(a.out).with_suffix(".recipe.yaml"), cfg.to_yaml(), force=True)
    _emit(a, {"artifact": art.to_dict(), "quantize": q.report.to_dict()},
          f"{q.report.summary()}\nwrote {art.path} ({art.size_bytes:,} bytes); validation: cosine "
          f"{art.validation['cosine']:.4f}, SQNR {art.validation['sqnr_db']:.1f} dB, top-1 agreement "
          f"{art.validation['top1_agreement']:.3f}")


def cmd_prune(a: argparse.Namespace) -> None:
    from edgeslim import data
    from edgeslim.prune import PruneConfig, prune, save_pruned

    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise EdgeslimError(f"--out {a.out!r} is a file; give a folder for the recipe .json and weights .pt")
    base = PruneConfig.from_yaml(Path(a.config)) if a.config else PruneConfig()
    changes = {k: v for k, v in {
        "method": a.method, "ratio": a.ratio, "target_macs": a.target_macs, "importance": a.importance,
        "scope": a.scope, "round_to": a.round_to, "heads_ratio": a.heads_ratio,
        "exclude": tuple(a.ignore) if a.ignore else None, "recalibrate_bn": a.recalibrate_bn,
    }.items() if v is not None}
    if a.ratio is not None and a.target_macs is None:
        changes["target_macs"] = None  # --ratio alone prunes by ratio, even if the YAML set target_macs
    cfg = base.replace(**changes)
    model = _load_model(a)
    train, val = data.load(a.dataset)
    p = prune(model, cfg, example_inputs=val.normalized()[:2], data=train)
    rep = p.prune_report
    name = a.model.replace(":", "-").replace("/", "-").replace(".", "-")
    js, pt = save_pruned(p, out / f"{name}-pruned", force=a.force)
    rows = [("", "before", "after", "ratio"),
            ("params", f"{rep.params_before:,}", f"{rep.params_after:,}",
             f"{rep.params_after / rep.params_before:.3f}" if rep.params_before else "-"),
            ("MACs", f"{rep.macs_before:,}", f"{rep.macs_after:,}",
             f"{rep.macs_after / rep.macs_before:.3f}" if rep.macs_before else "-")]
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    table = "\n".join("  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r)) for r in rows)
    _emit(a, {"report": rep.to_dict(), "config": cfg.to_dict(), "recipe": str(js), "weights": str(pt)},
          f"{table}\n{rep.summary()}\nwrote {js} and {pt} (reload: edgeslim.prune.load_pruned(<fresh model>, "
          f"{str(js.with_suffix(''))!r}))\nfine-tune before use: pruned weights lose accuracy until retrained")


def cmd_export(a: argparse.Namespace) -> None:
    from edgeslim import data
    from edgeslim.export import export

    model = _load_model(a)
    _, val = data.load(a.dataset)
    art = export(model, "onnx", example_inputs=val, path=a.out, precision=a.precision, force=a.force)
    _emit(a, art.to_dict(), f"wrote {art.path} ({art.precision}, {art.size_bytes:,} bytes); validation: "
          f"cosine {art.validation['cosine']:.6f}, top-1 agreement {art.validation['top1_agreement']:.3f}")


def _measure_all(a: argparse.Namespace) -> None:
    """`measure --runtime all`: one candidate on every runtime, same inputs and threads, one table."""
    import tempfile

    from edgeslim import data
    from edgeslim.core.artifact import Artifact
    from edgeslim.core.io import write_json
    from edgeslim.export import export
    from edgeslim.runtime import RUNTIMES, compare_runtimes, missing
    from edgeslim.runtime._compare import render_rows

    if len(a.threads) != 1:
        raise EdgeslimError("--runtime all measures every runtime at one thread count: pass one --threads value")
    train, val = data.load(a.dataset)
    val = val.take(a.samples, seed=0) if a.samples else val
    with tempfile.TemporaryDirectory() as td:
        out = Path(a.artifacts or td)
        candidates: dict[str, tuple[str, Any]] = {}
        extra_rows: list[dict[str, Any]] = []
        reference = None
        if Path(a.target).suffix == ".onnx" or Path(a.target).is_file():
            art = Artifact.load(a.target)
            for name in RUNTIMES:
                if art.format in RUNTIMES.get(name).formats:
                    candidates[name] = (name, art)
                elif not missing(name):
                    extra_rows.append({"label": name, "runtime": name, "threads": a.threads[0], "status": "n/a",
                                       "note": f"cannot load format {art.format!r}; loads "
                                               f"{', '.join(RUNTIMES.get(name).formats) or 'torch modules'}"})
            if a.reference:
                a.model = a.reference
                reference = _load_model(a)
        else:
            a.model = a.target
            reference = model = _load_model(a)
            if a.precision == "int8":
                from edgeslim.quantize import QuantConfig, quantize

                model = quantize(model, QuantConfig(), calib=train, example_inputs=val.normalized()[:8])
            candidates["torch"] = ("torch", model)
            kw = {"example_inputs": val, "force": True, "calib": train}
            for runtime, fmt, sfx in (("onnxruntime", "onnx", ".onnx"), ("openvino", "openvino", ".xml"),
                                      ("litert", "tflite", ".tflite"), ("executorch", "executorch", ".pte")):
                if missing(runtime):
                    candidates[runtime] = (runtime, None)  # listed as not installed, with its pip line
                    continue
                try:
                    art = export(model, fmt, path=out / f"{Path(a.target).name}-{a.precision}{sfx}", **kw)
                except EdgeslimError as e:
                    extra_rows.append({"label": runtime, "runtime": runtime, "threads": a.threads[0],
                                       "status": "failed", "note": f"export to {fmt}: {e}"})
                    continue
                candidates[runtime] = (runtime, art)
        rows = compare_runtimes(candidates, data=val, reference=reference, threads=a.threads[0], runs=a.runs,
                                peak_memory=not a.no_memory) + extra_rows
    if a.save:
        write_json(a.save, rows, force=a.force)
    _emit(a, {"rows": rows}, render_rows(rows) + f"\n{len(val)} samples of {val.name}/{val.split}; latency at "
          f"batch 1, {a.threads[0]} thread(s), interleaved rounds on host {rows[0].get('host', '?')}")


def cmd_measure(a: argparse.Namespace) -> None:
    from edgeslim import data
    from edgeslim.core.artifact import Artifact
    from edgeslim.core.io import write_json
    from edgeslim.report import render_table
    from edgeslim.runtime import measure

    if a.runtime == "all":
        return _measure_all(a)
    target: Any
    if Path(a.target).suffix == ".onnx" or Path(a.target).is_file():
        target = Artifact.load(a.target)
        runtime = a.runtime or "onnxruntime"
    else:
        a.model = a.target
        target = _load_model(a)
        runtime = a.runtime or "torch"
    val = None
    if not a.no_data:
        _, val = data.load(a.dataset)
        if a.samples:
            val = val.take(a.samples, seed=0)
    m = measure(target, data=val, runtime=runtime, threads=a.threads, batch_sizes=a.batch, runs=a.runs,
                label=a.label or str(a.target))
    for dev in a.device or ():
        _add_device_predictions(m, target, dev, runtime)
    if a.save:
        write_json(a.save, m.to_dict(), force=a.force)
    _emit(a, m.to_dict(), render_table([m]))


def _add_device_predictions(m: Any, target: Any, device: str, runtime: str) -> None:
    """Add "predicted for D" latency/energy/memory-fit/pre-flight figures to ``m`` (needs an .onnx artifact)."""
    from edgeslim.core.artifact import Artifact
    from edgeslim.devices import (calibrate, estimate_energy, get_device, graph_cost, memory_fit, predict_latency,
                                  preflight)

    dev = get_device(device)
    if not isinstance(target, Artifact) or target.format != "onnx":
        raise EdgeslimError(f"--device {device} predicts from an ONNX graph: measure an .onnx artifact "
                            "(export it first), not a torch model")
    host_ms = m.figures.get("latency_p50_ms@t1b1")
    if host_ms is None or runtime != "onnxruntime":
        raise EdgeslimError("--device needs a host onnxruntime measurement at 1 thread, batch 1 "
                            "(include 1 in --threads and --batch) to calibrate the prediction")
    cal = calibrate([("host", graph_cost(target, as_run_by="onnxruntime"), host_ms.value)], "host")
    lat = predict_latency(target, dev, cal)
    en, fit, pf = estimate_energy(target, dev), memory_fit(target, dev), preflight(target, dev)
    src = f"predicted for {dev.name}: roofline calibrated on this model's host latency (t1 b1)"
    m.add(f"predicted_latency_ms@{dev.name}", lat["latency_ms"], "ms", src,
          f"host calibration error {cal.median_abs_error_pct:.1f}% (in-sample, 1 sample, fit pulled toward the "
          "default roofline; benchmarks/hw_predict.py reports leave-one-model-out error)")
    m.add(f"estimated_energy_mj@{dev.name}", en["energy_mj"], "mJ", en["label"], f"{en['source']}; {en['assumption']}")
    m.add(f"memory_required_mb@{dev.name}", fit["required_mb"], "MB", f"weights + peak activations vs {dev.ram_mb:.0f} MB",
          "fits" if fit["fits"] else f"DOES NOT FIT in {dev.ram_mb:.0f} MB")
    m.add(f"fully_runs@{dev.name}", float(pf.fully_runs), "bool", "operator pre-flight", str(pf))


def cmd_report(a: argparse.Namespace) -> None:
    from edgeslim.core.metrics import Metrics
    from edgeslim.report import render_table, report

    stages = []
    for f in a.metrics:
        p = Path(f)
        if not p.is_file():
            raise EdgeslimError(f"metrics file {f!r} does not exist (write one with `edgeslim measure ... --save`)")
        try:
            stages.append(Metrics.from_dict(json.loads(p.read_text())))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise EdgeslimError(f"metrics file {f!r} is not a saved Metrics JSON: {e}") from None
    paths = report(stages, a.out, title=a.title, force=a.force)
    _emit(a, {k: str(v) for k, v in paths.items()}, render_table(stages) + "\n" +
          "\n".join(f"wrote {v}" for v in paths.values()))


def cmd_demo(a: argparse.Namespace) -> None:
    from edgeslim.pipeline import run_demo
    from edgeslim.report import render_table

    res = run_demo(a.model, a.dataset, a.out, threads=a.threads, eval_samples=a.samples, runs=a.runs, force=a.force)
    text = (render_table(res["stages"]) + "\n\n" + "\n".join(res["notes"]) + "\n\n"
            + "\n".join(f"wrote {v}" for v in res["report"].values()) + f"\ndemo took {res['seconds']} s")
    _emit(a, {"stages": [s.to_dict() for s in res["stages"]], "report": {k: str(v) for k, v in res["report"].items()},
              "notes": res["notes"], "seconds": res["seconds"]}, text)


def build_parser() -> argparse.ArgumentParser:
    from edgeslim._version import __version__

    p = argparse.ArgumentParser(prog="edgeslim", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"edgeslim {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(fn=fn)
        sp.add_argument("--json", action="store_true", help="print machine-readable JSON")
        return sp

    t = add("train", cmd_train, "train a zoo model and save a baseline checkpoint (resumes after interruption)")
    t.add_argument("model")
    t.add_argument("--dataset", default="fashion-mnist")
    t.add_argument("--init", choices=["random", "imagenet"], default="random")
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--lr", type=float, default=0.05)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu", help="where the training steps run: cpu (default) or cuda")
    t.add_argument("--out", help="checkpoint folder (default: the package's shipped checkpoints)")
    t.add_argument("--force", action="store_true", help="overwrite an existing checkpoint")

    q = add("quantize", cmd_quantize, "quantize a model with calibration data and export the INT8 ONNX artifact")
    _model_args(q)
    q.add_argument("--config", help="QuantConfig YAML (the CLI options below override it)")
    q.add_argument("--mode", choices=["static", "dynamic", "fp16"])
    q.add_argument("--calibration", help="minmax, percentile, entropy or mse")
    q.add_argument("--activation-type", choices=["uint8", "int8"])
    q.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor instead of per channel")
    q.add_argument("--reduce-range", action="store_true", help="7-bit weights (no int16 saturation on AVX2)")
    q.add_argument("--samples", type=int, help="calibration samples (default 512)")
    q.add_argument("--exclude", action="append", help="module name or pattern kept in float (repeatable)")
    q.add_argument("--out", required=True, help="output .onnx file")
    q.add_argument("--force", action="store_true", help="overwrite an existing output")

    pr = add("prune", cmd_prune, "prune a model (channel: physically smaller) and save its recipe + state_dict")
    _model_args(pr)
    pr.add_argument("--config", help="PruneConfig YAML (the CLI options below override it)")
    pr.add_argument("--method", choices=["channel", "magnitude", "nm"])
    pr.add_argument("--target-macs", type=float, help="fraction of MACs to remove, e.g. 0.5 (channel only)")
    pr.add_argument("--ratio", type=float, help="fraction of channels/weights to remove (instead of --target-macs)")
    pr.add_argument("--importance", help="l1, l2, bn_scale, taylor, fpgm or random")
    pr.add_argument("--scope", choices=["layer", "global"])
    pr.add_argument("--round-to", type=int, help="kept channel counts are multiples of this (default 8)")
    pr.add_argument("--heads-ratio", type=float, help="fraction of attention heads removed (transformers)")
    pr.add_argument("--ignore", action="append", help="module-name glob left unpruned (repeatable)")
    pr.add_argument("--recalibrate-bn", type=int, metavar="N",
                    help="re-estimate BatchNorm statistics on N training images after pruning (0: off, the default)")
    pr.add_argument("--out", required=True, help="output folder for <model>-pruned.json/.pt")
    pr.add_argument("--force", action="store_true", help="overwrite existing outputs")

    e = add("export", cmd_export, "export a float model to ONNX (validated against torch)")
    _model_args(e)
    e.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    e.add_argument("--out", required=True, help="output .onnx file")
    e.add_argument("--force", action="store_true")

    m = add("measure", cmd_measure, "measure size, MACs, accuracy, latency and memory of an artifact or model")
    m.add_argument("target", help="an .onnx artifact, a zoo name or 'module:function'")
    m.add_argument("--dataset", default="fashion-mnist")
    m.add_argument("--weights")
    m.add_argument("--no-pretrained", action="store_true")
    m.add_argument("--runtime", help="onnxruntime (default for .onnx), torch (default for models), openvino, litert, "
                   "executorch, or 'all': every runtime side by side in one table (models are exported for each)")
    m.add_argument("--precision", choices=["fp32", "int8"], default="fp32",
                   help="with --runtime all and a model: fp32, or int8 (edgeslim PTQ on the training split first)")
    m.add_argument("--reference", help="with --runtime all and an artifact: the zoo model to measure agreement against")
    m.add_argument("--artifacts", help="with --runtime all and a model: keep the exported files in this folder")
    m.add_argument("--no-memory", action="store_true", help="with --runtime all: skip the peak-memory child processes")
    m.add_argument("--threads", type=_ints, default=(1,), help="comma-separated thread counts, e.g. 1,2")
    m.add_argument("--batch", type=_ints, default=(1,), help="comma-separated batch sizes")
    m.add_argument("--runs", type=int, default=100)
    m.add_argument("--samples", type=int, help="evaluate accuracy on this many validation samples")
    m.add_argument("--no-data", action="store_true", help="latency on zeros, no accuracy")
    m.add_argument("--label")
    m.add_argument("--save", help="write the metrics JSON here (input for `edgeslim report`)")
    m.add_argument("--force", action="store_true")
    m.add_argument("--device", action="append",
                   help="also print figures predicted for this device profile (repeatable), e.g. raspberry-pi-4")

    r = add("report", cmd_report, "write a JSON/Markdown/HTML report from saved metrics, in pipeline order")
    r.add_argument("metrics", nargs="+", help="metrics JSON files written by `edgeslim measure --save`")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--title", default="edgeslim report")
    r.add_argument("--force", action="store_true")

    d = add("demo", cmd_demo, "baseline -> INT8 PTQ -> export -> validate -> measure -> report, on a shipped model")
    d.add_argument("--model", default="mobilenet_v2")
    d.add_argument("--dataset", default="fashion-mnist")
    d.add_argument("--out", default="edgeslim-out")
    d.add_argument("--threads", type=_ints, default=(1, 2))
    d.add_argument("--samples", type=int, help="evaluate on this many validation samples (default: all)")
    d.add_argument("--runs", type=int, default=200)
    d.add_argument("--force", action="store_true", help="overwrite earlier demo outputs")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        a.fn(a)
    except EdgeslimError as e:
        if getattr(a, "json", False):
            print(json.dumps({"error": type(e).__name__, "message": str(e)}))
        print(f"edgeslim {a.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"edgeslim {a.command}: interrupted; no partial outputs were written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
