"""`edgeslim <verb>`: a thin command line over the same verbs as the Python API.

Every command takes ``--json`` for machine-readable output and ``-v`` for INFO logging (before or after the verb).
Bad input of any kind (options, config files, models, weights, datasets, output paths) prints one line that names
what was wrong on stderr and exits 2, before any work is done where it can be checked up front; with ``--json``
stdout gets ``{"error": ..., "message": ...}``. Ctrl-C exits 130 and leaves no partial outputs. Long steps show
progress bars on stderr (not with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

from edgeslim.core.errors import ConfigError, EdgeslimError

EXIT_ERROR, EXIT_INTERRUPTED = 2, 130
_STATE: dict[str, Any] = {"json": False, "interrupted": False}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2; JSON on stdout with ``--json``)."""

    def error(self, message: str) -> NoReturn:
        _fail(self.prog, "UsageError", f"{message} (see `{self.prog} --help`)")
        sys.exit(EXIT_ERROR)


def _one_line(text: str) -> str:
    return "; ".join(ln.strip() for ln in str(text).splitlines() if ln.strip()) or "(no message)"


def _close_bars() -> None:
    """Close progress bars left open by an exception, so that the error line starts on a clean line."""
    from edgeslim.core.progress import close_all

    close_all()


def _fail(prog: str, kind: str, message: str) -> None:
    _close_bars()
    message = _one_line(message)
    if _STATE["json"]:
        print(json.dumps({"error": kind, "message": message}))
    print(f"{prog}: error: {message}", file=sys.stderr)


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return v


# ---------------------------------------------------------------------------------------------------- helpers


def _warn(a: argparse.Namespace, message: str) -> None:
    """A warning line on stderr (the run goes on); listed under ``warnings`` in ``--json`` output too."""
    a.warnings.append(message)
    print(f"edgeslim {a.command}: warning: {message}", file=sys.stderr)


def _emit(a: argparse.Namespace, obj: dict[str, Any], text: str) -> None:
    if a.json:
        print(json.dumps({**obj, "warnings": a.warnings} if a.warnings else obj, indent=2, default=str))
    else:
        print(text)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _check_threads(a: argparse.Namespace, threads: tuple[int, ...]) -> None:
    cores = _cores()
    over = [t for t in threads if t > cores]
    if over:
        _warn(
            a,
            f"--threads {','.join(map(str, over))} is more than the {cores} core(s) this process may use: "
            "threads beyond the cores oversubscribe the CPU, and their latency says little about the model",
        )


def _check_samples(a: argparse.Namespace, asked: int | None, have: int, what: str) -> None:
    if asked is not None and asked > have:
        _warn(a, f"--samples {asked:,} is more than the {have:,} {what}: all {have:,} are used")


def _out_file(a: argparse.Namespace, path: str | Path, option: str = "--out") -> Path:
    """Check an output file before any work: its folder exists and is writable; it is free unless --force."""
    p = Path(path)
    parent = p.parent
    if not parent.exists():
        raise ConfigError(f"{option} {str(p)!r}: the folder {str(parent)!r} does not exist; create it first")
    if not parent.is_dir():
        raise ConfigError(f"{option} {str(p)!r}: {str(parent)!r} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {str(p)!r}: the folder {str(parent)!r} is not writable")
    if p.is_dir():
        raise ConfigError(f"{option} {str(p)!r} is a folder; give a file name")
    if p.exists() and not a.force:
        from edgeslim.core.errors import OutputExistsError

        raise OutputExistsError(f"output {str(p)!r} already exists; pass --force to overwrite it")
    return p


def _out_dir(a: argparse.Namespace, path: str | Path, files: tuple[str, ...] = (), option: str = "--out") -> Path:
    """Check an output folder before any work: it is a writable folder (or can be made in a writable one) and
    the named files in it are free unless --force."""
    d = Path(path)
    if d.exists():
        if not d.is_dir():
            raise ConfigError(f"{option} {str(d)!r} is a file; give a folder")
        if not os.access(d, os.W_OK | os.X_OK):
            raise ConfigError(f"{option} {str(d)!r}: the folder is not writable")
        for f in files:
            _out_file(a, d / f, option)
        return d
    parent = d.parent
    if not parent.is_dir():
        raise ConfigError(f"{option} {str(d)!r}: its parent folder {str(parent)!r} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {str(d)!r}: cannot be created, the folder {str(parent)!r} is not writable")
    return d


def _config(cls: Any, path: str | None) -> Any:
    return cls.from_yaml(Path(path)) if path else cls()


def _is_recipe(spec: str) -> bool:
    return str(spec).endswith(".recipe")


def _recipe_source(spec: str) -> dict:
    from edgeslim.core.recipe import read

    src = read(spec).get("source")
    return src if isinstance(src, dict) else {}


def _load_model(a: argparse.Namespace):
    """The one place the CLI turns a model spec (``a.model``, ``--dataset``, ``--weights``) into a torch model:
    a zoo name, ``package.module:function`` (runs the user's code), or a ``.recipe`` file (replayed)."""
    from edgeslim import models

    if str(a.model).endswith(".onnx"):
        from edgeslim.core.onnx_model import OnnxModel

        if not Path(a.model).is_file():
            raise ConfigError(f"model {a.model!r}: no such ONNX file")
        return OnnxModel(a.model)  # an ONNX file as a model: quantize works on its graph (capture=onnx)
    if _is_recipe(a.model):
        from edgeslim.pipeline import load

        if getattr(a, "weights", None):
            raise ConfigError(f"--weights does not apply to a recipe ({a.model!r} holds its own weights)")
        base = getattr(a, "base", None)
        return load(a.model, model=models.load(base, a.dataset, pretrained=False) if base else None)
    return models.load(a.model, a.dataset, pretrained=not a.no_pretrained, weights=a.weights, preprocess=_preprocess(a))


def _resolve_dataset(a: argparse.Namespace, spec: str | None) -> None:
    """``--dataset`` left out: a recipe's own dataset, else fashion-mnist."""
    if getattr(a, "dataset", "") is None:
        a.dataset = (_recipe_source(spec).get("dataset") if spec and _is_recipe(spec) else None) or "fashion-mnist"


def _preprocess(a: argparse.Namespace) -> Any:
    """The ImagePreprocess fields given by ``--input-size`` / ``--normalize`` / ``--resize`` (for folder: and elpv
    data), or None when none is given: a source fills the rest with its own defaults."""
    given = {"input_size": a.input_size, "normalize": a.normalize, "resize": a.resize} if hasattr(a, "resize") else {}
    return {k: v for k, v in given.items() if v is not None} or None


def _is_detection_data(name: str) -> bool:
    from edgeslim.data import DETECTION_SOURCES

    return name.startswith("coco:") or name in DETECTION_SOURCES


def _load_data(a: argparse.Namespace, model: Any = None):
    """The (train, val) splits of ``--dataset``; detection data at ``--input-size``, else at the detector's own
    input size (``model.input_size``, see :func:`edgeslim.data.load`)."""
    from edgeslim import data

    if _is_detection_data(a.dataset):  # --input-size, else the detector's own size (or an artifact's input side)
        size = getattr(a, "input_size", None)
        shape = getattr(model, "input_shape", None)
        if size is None and not hasattr(model, "input_size") and shape and int(shape[-1]) > 0:
            size = int(shape[-1])
        return data.load(a.dataset, size=size, model=model)
    return data.load(a.dataset, preprocess=_preprocess(a), model=model)


def _inputs(val: Any, n: int) -> Any:
    """The first ``n`` inputs of a split as one batch (detection sets give (image, target) pairs)."""
    import torch

    if hasattr(val, "normalized"):
        return val.normalized()[:n]
    return torch.stack([val[i][0] for i in range(min(n, len(val)))])


def _export_inputs(val: Any) -> Any:
    """What export validates on: the split itself (top-1 agreement too), or 32 detection images."""
    return val if hasattr(val, "normalized") else _inputs(val, 32)


def _agreement(art: Any) -> str:
    v = art.validation.get("top1_agreement")
    return f", top-1 agreement {v:.3f}" if v is not None else ""


def _save_model(a: argparse.Namespace, model: Any, out: Path) -> Path:
    from edgeslim.pipeline import save

    return save(model, out, force=a.force)


def _check_model_data(a: argparse.Namespace, model: Any, val: Any) -> None:
    """Refuse a dataset whose class count is not the model's output width, before any long step."""
    import torch

    from edgeslim.core.errors import DataError
    from edgeslim.runtime._measure import check_classes

    if not hasattr(val, "normalized"):  # detection data: a detector with the same classes
        from edgeslim.core.detection import check_detector, check_output

        n = check_detector(model, f"model {a.model!r}")
        if val.num_classes != n:
            raise DataError(f"--dataset {a.dataset!r} has {val.num_classes} classes but model {a.model!r} detects {n}")
        with torch.no_grad():
            check_output(model.eval()(_inputs(val, 1)), n, f"model {a.model!r}'s output")
        return
    try:
        with torch.no_grad():
            out = model.eval()(val.take(1).normalized())  # one sample: a streamed folder decodes one image
    except Exception as e:  # a shape mismatch surfaces as RuntimeError deep in torch
        raise DataError(
            f"samples of --dataset {a.dataset!r} (shape {tuple(val.input_shape)}) do not fit the model: "
            f"{_one_line(str(e))[:200]}"
        ) from None
    if isinstance(out, torch.Tensor) and out.ndim == 2:
        check_classes(int(out.shape[1]), val, f"model {a.model!r}")


def _validation_note(a: argparse.Namespace, art: Any) -> None:
    n = art.validation.get("samples", 0)
    if n and n < 32:
        _warn(a, f"the export was validated on only {n} sample(s): agreement on so few says little")


# ---------------------------------------------------------------------------------------------------- commands


def cmd_train(a: argparse.Namespace) -> None:
    from edgeslim.core.io import safe_name
    from edgeslim.train import TrainConfig, train_baseline

    stem = f"{safe_name(a.model)}-{safe_name(a.dataset)}"
    out = _out_dir(a, a.out, (f"{stem}.pt", f"{stem}.json"))
    cfg = TrainConfig(epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, seed=a.seed)
    rec = train_baseline(
        a.model, a.dataset, cfg, init=a.init, out=out, force=a.force, progress=not a.json, device=a.device
    )
    _emit(
        a,
        {**rec, "checkpoint": str(out / f"{stem}.pt")},
        f"{a.model} on {a.dataset}: accuracy {rec['accuracy']:.4f} ({rec['train_seconds']} s); wrote "
        f"{out / f'{stem}.pt'} and .json",
    )


def cmd_quantize(a: argparse.Namespace) -> None:
    from edgeslim.core.io import write_text
    from edgeslim.export import export
    from edgeslim.quantize import QuantConfig, quantize

    out = _out_file(a, a.out)
    if out.suffix not in (".onnx", ".recipe"):
        raise ConfigError(
            f"--out {a.out!r}: give an .onnx file (exported and validated; its recipe is written "
            "beside it) or a .recipe file (export it later with `edgeslim export`)"
        )
    recipe = _out_file(a, out.with_suffix(".recipe")) if out.suffix == ".onnx" else out
    config_yaml = _out_file(a, out.with_suffix(".config.yaml"))
    _resolve_dataset(a, a.model)
    base = _config(QuantConfig, a.config)
    changes = {
        k: v
        for k, v in {
            "mode": a.mode,
            "calibration": a.calibration,
            "activation_type": a.activation_type,
            "num_samples": a.samples,
            "exclude": tuple(a.exclude) if a.exclude else None,
            "per_channel": False if a.per_tensor else None,
            "per_tensor_sqnr_db": a.per_tensor_above,
            "reduce_range": {"on": True, "off": False}.get(a.reduce_range),
            "capture": a.capture,
            "runtime": a.runtime,
            "placement": a.placement,
        }.items()
        if v is not None
    }
    if a.reduce_range == "auto":  # the host decides, whatever the --config file says
        changes["reduce_range"] = None
    cfg = base.replace(**changes)
    model = _load_model(a)
    train, val = _load_data(a, model)
    _check_model_data(a, model, val)
    if cfg.mode == "static":
        _check_samples(a, cfg.num_samples, len(train), f"training samples of {a.dataset} to calibrate on")
    q = quantize(model, cfg, data=train, example_inputs=_inputs(val, 8))
    art = None
    if out.suffix == ".onnx":
        art = export(q, "onnx", example_inputs=_export_inputs(val), path=out, force=a.force)
        _validation_note(a, art)
    _save_model(a, q, recipe)
    write_text(config_yaml, cfg.to_yaml(), force=a.force)
    steps = " -> ".join(s["technique"] for s in q.edgeslim_recipe)
    text = f"{q.report.summary()}\nwrote {recipe} (recipe: {steps}) and {config_yaml} (the QuantConfig)"
    if art is not None:
        text += (
            f"\nwrote {art.path} ({art.size_bytes:,} bytes); validation: cosine "
            f"{art.validation['cosine']:.4f}, SQNR {art.validation['sqnr_db']:.1f} dB{_agreement(art)}"
        )
    _emit(
        a,
        {
            "artifact": art.to_dict() if art else None,
            "recipe": str(recipe),
            "steps": steps.split(" -> "),
            "quantize": q.report.to_dict(),
        },
        text,
    )


def cmd_prune(a: argparse.Namespace) -> None:
    from edgeslim.core.io import safe_name
    from edgeslim.prune import PruneConfig, prune, save_pruned

    name = f"{safe_name(Path(a.model).stem if _is_recipe(a.model) else a.model)}-pruned"
    to_recipe = _is_recipe(a.out)
    out = _out_file(a, a.out) if to_recipe else _out_dir(a, a.out, (f"{name}.json", f"{name}.pt"))
    _resolve_dataset(a, a.model)
    base = _config(PruneConfig, a.config)
    changes = {
        k: v
        for k, v in {
            "method": a.method,
            "ratio": a.ratio,
            "target_macs": a.target_macs,
            "importance": a.importance,
            "scope": a.scope,
            "round_to": a.round_to,
            "heads_ratio": a.heads_ratio,
            "exclude": tuple(a.ignore) if a.ignore else None,
            "recalibrate_bn": a.recalibrate_bn,
        }.items()
        if v is not None
    }
    if a.ratio is not None and a.target_macs is None:
        changes["target_macs"] = None  # --ratio alone prunes by ratio, even if the YAML set target_macs
    cfg = base.replace(**changes)
    model = _load_model(a)
    train, val = _load_data(a, model)
    _check_model_data(a, model, val)
    p = prune(model, cfg, example_inputs=_inputs(val, 2), data=train)
    rep = p.prune_report
    if to_recipe:
        _save_model(a, p, out)
        steps = [s["technique"] for s in p.edgeslim_recipe]
        _emit(
            a,
            {"report": rep.to_dict(), "config": cfg.to_dict(), "recipe": str(out), "steps": steps},
            f"{_prune_table(rep)}\n{rep.summary()}\nwrote {out} (recipe: {' -> '.join(steps)}; reload: "
            f"edgeslim.load({str(out)!r}))\nfine-tune before use: pruned weights lose accuracy until retrained",
        )
        return
    _warn(
        a,
        f"--out {a.out!r} is a folder: the <model>-pruned.json/.pt pair is deprecated; give --out NAME.recipe "
        "(one file that `edgeslim quantize/export/measure` take as the model)",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        js, pt = save_pruned(p, out / name, force=a.force)
    _emit(
        a,
        {"report": rep.to_dict(), "config": cfg.to_dict(), "recipe": str(js), "weights": str(pt)},
        f"{_prune_table(rep)}\n{rep.summary()}\nwrote {js} and {pt} (reload: edgeslim.prune.load_pruned(<fresh model>, "
        f"{str(js.with_suffix(''))!r}))\nfine-tune before use: pruned weights lose accuracy until retrained",
    )


def _prune_table(rep: Any) -> str:
    rows = [
        ("", "before", "after", "ratio"),
        (
            "params",
            f"{rep.params_before:,}",
            f"{rep.params_after:,}",
            f"{rep.params_after / rep.params_before:.3f}" if rep.params_before else "-",
        ),
        (
            "MACs",
            f"{rep.macs_before:,}",
            f"{rep.macs_after:,}",
            f"{rep.macs_after / rep.macs_before:.3f}" if rep.macs_before else "-",
        ),
    ]
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r)) for r in rows)


def cmd_export(a: argparse.Namespace) -> None:
    from edgeslim.export import export

    out = _out_file(a, a.out)
    _resolve_dataset(a, a.model)
    model = _load_model(a)
    _, val = _load_data(a, model)
    _check_model_data(a, model, val)
    art = export(model, "onnx", example_inputs=_export_inputs(val), path=out, precision=a.precision, force=a.force)
    _validation_note(a, art)
    _emit(
        a,
        art.to_dict(),
        f"wrote {art.path} ({art.precision}, {art.size_bytes:,} bytes); validation: "
        f"cosine {art.validation['cosine']:.6f}{_agreement(art)}",
    )


def _is_artifact(target: str) -> bool:
    from edgeslim.core.artifact import SUFFIX_FORMATS

    return Path(target).suffix in SUFFIX_FORMATS or Path(target).is_file()


def _check_save(a: argparse.Namespace) -> Path | None:
    """``--save`` must be a free file, and never an artifact (or an artifact's own ``.json`` record)."""
    if not a.save:
        return None
    from edgeslim.core.artifact import SUFFIX_FORMATS

    p = Path(a.save)
    rec_of = p.with_name(p.name[: -len(".json")]) if p.name.endswith(".json") else None
    if p.suffix in SUFFIX_FORMATS or (rec_of is not None and rec_of.suffix in SUFFIX_FORMATS):
        what = f"the record of the artifact {rec_of.name!r}" if rec_of is not None else "an artifact file name"
        raise ConfigError(
            f"--save {str(p)!r} is {what}; measure needs that file to know the artifact: save the "
            "metrics under another name, e.g. metrics.json"
        )
    if _is_artifact(a.target) and p.resolve() == Path(a.target).resolve():
        raise ConfigError(f"--save {str(p)!r} is the artifact being measured")
    return _out_file(a, p, "--save")


def _runtime_stages(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``measure --runtime all`` rows as Metrics dicts, so that `edgeslim report` reads the saved file."""
    from edgeslim.core.metrics import Metrics

    stages = []
    for r in rows:
        if r.get("status") != "ok":
            continue
        t = r["threads"]
        m = Metrics(
            f"{r['label']} ({r['runtime']})" if r["label"] != r["runtime"] else r["runtime"],
            context={
                "runtime": r["runtime"],
                "runtime_version": r.get("runtime_version"),
                "host": r.get("host"),
                "target": {"format": r.get("format"), "precision": r.get("precision"), "path": r.get("path")},
                "threads": [t],
                "batch_sizes": [1],
                "accuracy_samples": r.get("samples"),
            },
        )
        how = (
            f"measured on {r.get('describe', r['runtime'])}, batch 1, {r.get('runs')} interleaved runs, {r.get('host')}"
        )
        m.add("accuracy", r["accuracy"], "fraction", "measured", f"top-1 on {r.get('samples')} samples; {how}")
        for p in ("p50", "p90", "p99"):
            m.add(f"latency_{p}_ms@t{t}b1", r[f"{p}_ms"], "ms", "measured", how)
        if r.get("peak_memory_mb") is not None:
            m.add("peak_memory_mb", r["peak_memory_mb"], "MB", "measured", f"extra peak RSS in a child process; {how}")
        for k in ("top1_agreement", "cosine"):
            if r.get(k) is not None:
                m.add(k, r[k], "fraction", "measured", f"vs the torch reference on {r.get('samples')} samples; {how}")
        stages.append(m.to_dict())
    return stages


def cmd_measure(a: argparse.Namespace) -> None:
    from edgeslim.core.io import write_json

    save = _check_save(a)
    if a.artifacts:
        _out_dir(a, a.artifacts, option="--artifacts")
    _check_threads(a, a.threads)
    if a.runtime == "all":
        return _measure_all(a, save)
    from edgeslim.core.artifact import Artifact
    from edgeslim.report import render_table
    from edgeslim.runtime import measure

    target: Any
    _resolve_dataset(a, a.target)
    if _is_recipe(a.target):
        a.model = a.target
        target = _load_model(a)
        runtime = a.runtime or "torch"
    elif _is_artifact(a.target):
        target = Artifact.load(a.target)
        runtime = a.runtime or "onnxruntime"
    else:
        a.model = a.target
        target = _load_model(a)
        runtime = a.runtime or "torch"
    val = None
    if not a.no_data:
        _, val = _load_data(a, target)
        _check_samples(a, a.samples, len(val), f"validation samples of {a.dataset}")
        if a.samples:
            val = val.take(a.samples, seed=0)
    m = measure(
        target,
        data=val,
        runtime=runtime,
        threads=a.threads,
        batch_sizes=a.batch,
        runs=a.runs,
        label=a.label or str(a.target),
        input_shape=a.input_shape,
    )
    if a.device:
        from edgeslim.devices import add_device_predictions

        for dev in a.device:
            add_device_predictions(m, target, dev)
    if save:
        write_json(save, m.to_dict(), force=a.force)
    _emit(a, m.to_dict(), render_table([m]))


def _measure_all(a: argparse.Namespace, save: Path | None) -> None:
    """`measure --runtime all`: one candidate on every runtime, same inputs and threads, one table."""
    from edgeslim.core.artifact import Artifact
    from edgeslim.core.io import write_json
    from edgeslim.pipeline import measure_all_runtimes
    from edgeslim.runtime._compare import render_rows

    if len(a.threads) != 1:
        raise ConfigError("--runtime all measures every runtime at one thread count: pass one --threads value")
    train, val = _load_data(a)
    _check_samples(a, a.samples, len(val), f"validation samples of {a.dataset}")
    val = val.take(a.samples, seed=0) if a.samples else val
    reference = None
    if _is_artifact(a.target):
        target: Any = Artifact.load(a.target)
        if a.reference:
            a.model = a.reference
            reference = _load_model(a)
    else:
        a.model = a.target
        target = _load_model(a)
        _check_model_data(a, target, val)
    rows = measure_all_runtimes(
        target,
        data=val,
        calib=train,
        precision=a.precision,
        reference=reference,
        threads=a.threads[0],
        runs=a.runs,
        peak_memory=not a.no_memory,
        artifacts_dir=a.artifacts,
        name=Path(a.target).name,
    )
    if save:
        write_json(save, {"rows": rows, "stages": _runtime_stages(rows)}, force=a.force)
    _emit(
        a,
        {"rows": rows},
        render_rows(rows) + f"\n{len(val)} samples of {val.name}/{val.split}; latency at "
        f"batch 1, {a.threads[0]} thread(s), interleaved rounds on host {rows[0].get('host', '?')}",
    )


def _read_stages(f: str) -> list[Any]:
    """The stages in one file written by `measure --save` (one Metrics, or `--runtime all` rows) or `report`."""
    from edgeslim.core.metrics import Metrics

    p = Path(f)
    if not p.is_file():
        raise ConfigError(f"metrics file {f!r} does not exist (write one with `edgeslim measure ... --save`)")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"metrics file {f!r} is not readable JSON: {type(e).__name__}") from None
    items = (
        d["stages"]
        if isinstance(d, dict) and isinstance(d.get("stages"), list)
        else (d if isinstance(d, list) else [d])
    )
    out = []
    for i, s in enumerate(items):
        try:
            out.append(Metrics.from_dict(s))
        except (AttributeError, KeyError, TypeError, ValueError):
            where = f" (entry {i})" if len(items) > 1 else ""
            raise ConfigError(
                f"metrics file {f!r}{where} is not a saved Metrics JSON (label, figures, context); "
                "write one with `edgeslim measure ... --save`"
            ) from None
    if not out:
        raise ConfigError(f"metrics file {f!r} holds no measured stages")
    return out


def cmd_report(a: argparse.Namespace) -> None:
    from edgeslim.report import render_table, report

    out = _out_dir(a, a.out, ("report.json", "report.md", "report.html"))
    stages = [s for f in a.metrics for s in _read_stages(f)]
    paths = report(stages, out, title=a.title, force=a.force)
    _emit(
        a,
        {k: str(v) for k, v in paths.items()},
        render_table(stages) + "\n" + "\n".join(f"wrote {v}" for v in paths.values()),
    )


def cmd_demo(a: argparse.Namespace) -> None:
    from edgeslim.pipeline import run_demo
    from edgeslim.report import render_table

    _out_dir(a, a.out, (f"{a.model}-fp32.onnx", f"{a.model}-int8.onnx", "report.json", "report.md", "report.html"))
    _check_threads(a, a.threads)
    res = run_demo(a.model, a.dataset, a.out, threads=a.threads, eval_samples=a.samples, runs=a.runs, force=a.force)
    text = (
        render_table(res["stages"])
        + "\n\n"
        + "\n".join(res["notes"])
        + "\n\n"
        + "\n".join(f"wrote {v}" for v in res["report"].values())
        + f"\ndemo took {res['seconds']} s"
    )
    _emit(
        a,
        {
            "stages": [s.to_dict() for s in res["stages"]],
            "report": {k: str(v) for k, v in res["report"].items()},
            "notes": res["notes"],
            "seconds": res["seconds"],
        },
        text,
    )


# ---------------------------------------------------------------------------------------------------- parser


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        help="zoo name (small_cnn, mobilenet_v2, resnet18), torchvision:NAME or timm:NAME (random weights: "
        "give --weights FILE; never downloaded), hf:FOLDER (a local Hugging Face folder or offline package), "
        "a .recipe file written by an earlier command (its steps are replayed), an .onnx file (quantized on "
        "its graph), or 'package.module:function(key=value, ...)' (imports that module and calls the "
        "function: it runs your code; arguments are literals)",
    )
    p.add_argument(
        "--dataset",
        default=None,
        help="dataset name or folder:<path> (default: a recipe's own dataset, else fashion-mnist)",
    )
    p.add_argument(
        "--base",
        help="with a .recipe made from your own code: the 'package.module:function' to replay it "
        "on (runs your code; edgeslim never runs code because a file names it)",
    )
    p.add_argument("--weights", help="state_dict file to load (read with weights_only=True)")
    p.add_argument(
        "--no-pretrained", action="store_true", help="random initialisation instead of the shipped checkpoint"
    )
    _image_args(p)


def _image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input-size",
        type=_positive,
        metavar="N",
        help="folder: / elpv data: resize the shorter side to N/0.875 and center-crop NxN (default: the first "
        "image's size, elpv 224, or the model's own with --normalize model)",
    )
    p.add_argument(
        "--resize",
        choices=["crop", "stretch"],
        help="folder: / elpv data: crop (default: shorter side to N/0.875, center NxN) or stretch (the whole image "
        "to NxN; the ELPV fine-tune recipe uses stretch)",
    )
    p.add_argument(
        "--normalize",
        choices=["imagenet", "0.5", "model", "dataset"],
        help="folder: data: mean/std preset (default dataset: statistics of up to 256 training images; model: "
        "the model's own, from timm / torchvision metadata)",
    )


def _global_flags(p: argparse.ArgumentParser, default: Any) -> None:
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="log progress at INFO level")
    p.add_argument(
        "--json",
        action="store_true",
        default=default,
        help='print machine-readable JSON (errors too: {"error": ..., "message": ...})',
    )


def build_parser() -> argparse.ArgumentParser:
    from edgeslim._version import __version__

    p = _Parser(prog="edgeslim", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"edgeslim {__version__}")
    _global_flags(p, False)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def add(name: str, fn, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(fn=fn)
        _global_flags(sp, argparse.SUPPRESS)  # given after the verb they count too; not given, the global value stays
        return sp

    t = add("train", cmd_train, "train a zoo model and save a baseline checkpoint (resumes after interruption)")
    t.add_argument("model")
    t.add_argument("--dataset", default="fashion-mnist")
    t.add_argument("--init", choices=["random", "imagenet"], default="random")
    t.add_argument("--epochs", type=_positive, default=3)
    t.add_argument("--lr", type=_positive_float, default=0.05)
    t.add_argument("--batch-size", type=_positive, default=128)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu", help="where the training steps run: cpu (default) or cuda")
    t.add_argument(
        "--out",
        default="edgeslim-checkpoints",
        help="checkpoint folder (default: edgeslim-checkpoints in the working folder); files are named "
        "<model>-<dataset>.pt/.json and always written inside it",
    )
    t.add_argument("--force", action="store_true", help="overwrite an existing checkpoint")

    q = add("quantize", cmd_quantize, "quantize a model with calibration data and export the INT8 ONNX artifact")
    _model_args(q)
    q.add_argument("--config", help="QuantConfig YAML (the CLI options below override it)")
    q.add_argument("--mode", choices=["static", "dynamic", "fp16"])
    q.add_argument("--calibration", help="minmax, percentile, entropy or mse")
    q.add_argument("--activation-type", choices=["uint8", "int8"])
    q.add_argument(
        "--capture",
        choices=["auto", "fx", "onnx"],
        help="how the model's operations are found: fx (torch graph: needed by AdaRound, bias correction, "
        "QAT), onnx (the exported ONNX graph: sees functional convs, attention, HF models; an .onnx "
        "model always), auto (default: fx when it covers >= 90%% of the MACs)",
    )
    q.add_argument(
        "--runtime",
        choices=["onnxruntime", "openvino"],
        help="the runtime the INT8 file's Q/DQ pairs are laid out for (static; default onnxruntime): openvino drops "
        "the pairs OpenVINO cannot fuse (Conv->activation, after pad/split/concat/pool) and shares Concat ranges",
    )
    q.add_argument(
        "--placement",
        choices=["all", "measured"],
        help="measured: layers whose integer kernel ONNX Runtime runs slower on this host stay float, when the "
        "whole file times faster that way (static; default all)",
    )
    q.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor instead of per channel")
    q.add_argument(
        "--per-tensor-above",
        type=float,
        metavar="DB",
        help="per layer: one weight scale per tensor where the weights keep >= DB dB SQNR with it (e.g. 35; a "
        "smaller file), per channel elsewhere",
    )
    q.add_argument(
        "--reduce-range",
        nargs="?",
        const="on",
        choices=("auto", "on", "off"),
        help="7-bit weights (no int16 saturation in u8 x s8 kernels on x86 without VNNI); alone: on; default auto "
        "(on where this host lacks VNNI; off for a file meant for a VNNI CPU)",
    )
    q.add_argument("--samples", type=_positive, help="calibration samples (default 512)")
    q.add_argument("--exclude", action="append", help="module name or pattern kept in float (repeatable)")
    q.add_argument(
        "--out",
        required=True,
        help="output .onnx file (exported and validated; NAME.recipe and "
        "NAME.config.yaml are written beside it) or a .recipe file (no export)",
    )
    q.add_argument("--force", action="store_true", help="overwrite an existing output")

    pr = add("prune", cmd_prune, "prune a model (channel: physically smaller) and save its recipe + state_dict")
    _model_args(pr)
    pr.add_argument("--config", help="PruneConfig YAML (the CLI options below override it)")
    pr.add_argument("--method", choices=["channel", "magnitude", "nm"])
    pr.add_argument("--target-macs", type=float, help="fraction of MACs to remove, e.g. 0.5 (channel only)")
    pr.add_argument("--ratio", type=float, help="fraction of channels/weights to remove (instead of --target-macs)")
    pr.add_argument("--importance", help="l1, l2, bn_scale, taylor, fpgm or random")
    pr.add_argument("--scope", choices=["layer", "global"])
    pr.add_argument("--round-to", type=_positive, help="kept channel counts are multiples of this (default 8)")
    pr.add_argument("--heads-ratio", type=float, help="fraction of attention heads removed (transformers)")
    pr.add_argument("--ignore", action="append", help="module-name glob left unpruned (repeatable)")
    pr.add_argument(
        "--recalibrate-bn",
        type=int,
        metavar="N",  # PruneConfig.recalibrate_bn says what is allowed
        help="re-estimate BatchNorm statistics on N training images after pruning (0: off, the default)",
    )
    pr.add_argument(
        "--out",
        required=True,
        help="output NAME.recipe (one file: the steps so far + weights; the "
        "model argument of quantize/export/measure/prune), or a folder for the deprecated "
        "<model>-pruned.json/.pt pair",
    )
    pr.add_argument("--force", action="store_true", help="overwrite existing outputs")

    e = add("export", cmd_export, "export a float model to ONNX (validated against torch)")
    _model_args(e)
    e.add_argument(
        "--precision",
        choices=["fp32", "fp16"],
        help="a float model's precision (default fp32); a quantized recipe exports at its own",
    )
    e.add_argument("--out", required=True, help="output .onnx file")
    e.add_argument("--force", action="store_true")

    m = add("measure", cmd_measure, "measure size, MACs, accuracy, latency and memory of an artifact or model")
    m.add_argument("target", help="an .onnx artifact, a zoo name or 'package.module:function' (runs your code)")
    m.add_argument("--dataset", default=None, help="default: a recipe's own dataset, else fashion-mnist")
    m.add_argument("--weights")
    m.add_argument("--no-pretrained", action="store_true")
    _image_args(m)
    m.add_argument(
        "--runtime",
        help="onnxruntime (default for .onnx), torch (default for models), openvino, litert, "
        "executorch, or 'all': every runtime side by side in one table (models are exported for each)",
    )
    m.add_argument(
        "--precision",
        choices=["fp32", "int8"],
        default="fp32",
        help="with --runtime all and a model: fp32, or int8 (edgeslim PTQ on the training split first)",
    )
    m.add_argument("--reference", help="with --runtime all and an artifact: the zoo model to measure agreement against")
    m.add_argument("--artifacts", help="with --runtime all and a model: keep the exported files in this folder")
    m.add_argument("--no-memory", action="store_true", help="with --runtime all: skip the peak-memory child processes")
    m.add_argument("--threads", type=_ints, default=(1,), help="comma-separated thread counts, e.g. 1,2")
    m.add_argument("--batch", type=_ints, default=(1,), help="comma-separated batch sizes")
    m.add_argument("--runs", type=_positive, default=100)
    m.add_argument("--samples", type=_positive, help="evaluate accuracy on this many validation samples")
    m.add_argument("--no-data", action="store_true", help="latency on zeros, no accuracy")
    m.add_argument(
        "--input-shape",
        type=_ints,
        metavar="C,H,W",
        help="one sample's shape, for an .onnx file whose input shape is not fixed (dynamic rank or "
        "symbolic sizes), e.g. 3,224,224",
    )
    m.add_argument("--label")
    m.add_argument("--save", help="write the metrics JSON here (input for `edgeslim report`)")
    m.add_argument("--force", action="store_true")
    m.add_argument(
        "--device",
        action="append",
        help="also print figures predicted for this device profile (repeatable), e.g. raspberry-pi-4",
    )

    r = add("report", cmd_report, "write a JSON/Markdown/HTML report from saved metrics, in pipeline order")
    r.add_argument("metrics", nargs="+", help="metrics JSON files written by `edgeslim measure --save`")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--title", default="edgeslim report")
    r.add_argument("--force", action="store_true")

    from edgeslim.pipeline._cli import add_optimize_parser

    o = add_optimize_parser(sub, add)
    o.set_defaults(
        on_interrupt="interrupted; the finished trials are kept in the run store: the same command "
        "resumes where it stopped"
    )

    d = add("demo", cmd_demo, "baseline -> INT8 PTQ -> export -> validate -> measure -> report, on a shipped model")
    d.add_argument("--model", default="mobilenet_v2")
    d.add_argument("--dataset", default="fashion-mnist")
    d.add_argument("--out", default="edgeslim-out")
    d.add_argument("--threads", type=_ints, default=(1, 2))
    d.add_argument("--samples", type=_positive, help="evaluate on this many validation samples (default: all)")
    d.add_argument("--runs", type=_positive, default=200)
    d.add_argument("--force", action="store_true", help="overwrite earlier demo outputs")
    return p


def _caused_by_interrupt(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (0, 2 on bad input, 130 when interrupted)."""
    from edgeslim.core.progress import progress_enabled

    argv = list(sys.argv[1:] if argv is None else argv)
    _STATE["json"] = "--json" in argv[: argv.index("--")] if "--" in argv else "--json" in argv
    _STATE["interrupted"] = False
    try:
        a = build_parser().parse_args(argv)
    except SystemExit as e:  # a usage error (one line already printed): return its status like any other error
        if e.code in (0, None):  # --help, --version
            raise
        return int(e.code) if isinstance(e.code, int) else EXIT_ERROR
    a.warnings = []
    logging.basicConfig(
        level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    prog = f"edgeslim {a.command}"

    def on_sigint(signum: int, frame: Any) -> None:
        _STATE["interrupted"] = True  # whatever a library turns the KeyboardInterrupt into, it was Ctrl-C
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread
        previous = None
    interrupted = getattr(a, "on_interrupt", "interrupted; no partial outputs were written (temporary files removed)")
    try:
        with progress_enabled(not a.json):
            status = a.fn(a)
    except KeyboardInterrupt:
        _fail(prog, "Interrupted", interrupted)
        return EXIT_INTERRUPTED
    except EdgeslimError as e:
        if _STATE["interrupted"]:
            _fail(prog, "Interrupted", interrupted)
            return EXIT_INTERRUPTED
        _fail(prog, type(e).__name__, str(e))
        return EXIT_ERROR
    except BrokenPipeError:  # the reader of stdout went away (e.g. `| head`): nothing left to say
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stdout for the rest of this process
        return 141
    except OSError as e:  # the file system said no (disk full, permissions) while writing or reading
        if _STATE["interrupted"] or _caused_by_interrupt(e):
            _fail(prog, "Interrupted", interrupted)
            return EXIT_INTERRUPTED
        where = f" {e.filename!r}" if e.filename else ""
        _fail(prog, type(e).__name__, f"{e.strerror or e}{':' if where else ''}{where}")
        return EXIT_ERROR
    except Exception as e:
        if _STATE["interrupted"] or _caused_by_interrupt(e):
            _fail(prog, "Interrupted", interrupted)
            return EXIT_INTERRUPTED
        raise  # a bug in edgeslim: keep the traceback
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
