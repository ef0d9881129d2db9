"""Baseline checkpoints: train a zoo model on a dataset and write an FP16 state_dict plus its record."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from edgeslim import data as es_data
from edgeslim import models as es_models
from edgeslim.core.errors import ConfigError
from edgeslim.core.io import check_output, inside, safe_name, save_torch, write_json
from edgeslim.train._trainer import TrainConfig, evaluate, fit


def train_baseline(
    name: str,
    dataset: str = "fashion-mnist",
    config: TrainConfig = TrainConfig(),
    *,
    init: str = "random",
    out: str | Path | None = None,
    work_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    device: str = "cpu",
) -> dict:
    """Train zoo model ``name`` on ``dataset`` and save ``<out>/<name>-<dataset>.pt`` (FP16) and ``.json``.

    ``<dataset>`` in the file names is made safe (``folder:../imgs`` becomes ``folder-imgs``): every file is
    written inside ``out``. (The shipped checkpoints are refreshed with ``out=edgeslim.models.checkpoint_path(name, dataset).parent``.)

    Args:
        init: ``random`` or ``imagenet`` (MobileNetV2 from the offline ImageNet weights).
        out: folder for the checkpoint (default: ``edgeslim-checkpoints`` in the working folder).
        work_dir: where per-epoch checkpoints go, so an interrupted run resumes (default ``<out>/.work``).
    """
    from edgeslim.models._zoo import DETECTORS

    if name in DETECTORS:
        raise ConfigError(
            f"{name!r} is a detector: train it with edgeslim.train.train_detector(model, train, val, epochs=..., "
            "lr=...) (python benchmarks/detect_fmnist.py --train), not with edgeslim train / train_baseline"
        )
    out_dir = Path(out) if out else Path("edgeslim-checkpoints")
    stem = f"{safe_name(name)}-{safe_name(dataset)}"
    ck = inside(out_dir / f"{stem}.pt", out_dir, "checkpoint")
    for p in (ck, ck.with_suffix(".json")):
        check_output(p, force=force)  # refuse before training, not after it
    train, val = es_data.load(dataset, seed=config.seed)
    torch.manual_seed(config.seed)
    model = es_models.build(name, dataset, input_shape=train.input_shape, num_classes=train.num_classes)
    if init == "imagenet":
        es_models.init_from_imagenet(model, name)
    work = Path(work_dir) if work_dir else out_dir / ".work" / stem
    t0 = time.perf_counter()
    result = fit(model, train, val, config, checkpoint_dir=work, progress=progress, device=device)
    fp32_acc = evaluate(result.model, val)
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in result.model.state_dict().items()}
    # the accuracy recorded is the one of the weights as shipped (FP16 storage, loaded back to FP32)
    reloaded = es_models.build(name, dataset, input_shape=train.input_shape, num_classes=train.num_classes)
    es_models.apply_state_dict(reloaded, half, str(ck))
    acc = evaluate(reloaded.eval(), val)
    record = {
        "model": name,
        "dataset": dataset,
        "init": init,
        "val_split": val.split,
        "val_size": len(val),
        "accuracy": round(acc, 4),
        "accuracy_fp32_weights": round(fp32_acc, 4),
        "storage": "fp16",
        "config": config.to_dict(),
        "history": result.history,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": device,
        "host": platform.processor() or platform.machine(),
        "command": f"edgeslim train {name} --dataset {dataset} --init {init} --epochs {config.epochs} "
        f"--lr {config.lr} --batch-size {config.batch_size} --seed {config.seed}"
        + (f" --device {device}" if device != "cpu" else ""),
    }
    save_torch(half, ck, force=force)
    write_json(ck.with_suffix(".json"), record, force=force)
    return record
