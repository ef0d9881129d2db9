"""What :func:`edgeslim.optimize` scores candidates by, per kind of model: top-1 accuracy for classifiers,
COCO mAP@[.5:.95] for detectors (``edgeslim_task == "detect"``, output ``[B, A, 4 + C]``).

A task knows how to check the data, fingerprint it for the run store, take input tensors from it (tracing,
validation, latency), score a torch model and a deployed file on it, and recover a pruned model (fine-tune on the
labels, or distill the input model into it). The search itself does not depend on which: the budget's
``max_accuracy_drop`` is a drop in the task's metric (0.01 = 1 point of mAP for a detector).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
from torch import nn

from edgeslim.core.errors import ConfigError, DataError

#: the distillation recovery of classifiers: logit KD from the input model (temperature 4) plus cross-entropy
DISTILL_KW = {"losses": ("kd",), "temperature": 4.0, "hard_weight": 1.0, "cache_teacher": False}
#: the distillation recovery of detectors: score + box KD from the input model plus the ground-truth loss
DETECT_DISTILL_KW = {"losses": ("kd",), "hard_weight": 1.0}


def epochs_and_cap(n_train: int, batch_size: int, n_steps: int) -> tuple[int, int]:
    """(epochs, steps per epoch) that give ``n_steps`` optimizer steps (or a few more: whole epochs of equal
    length) on ``n_train`` samples in batches of ``batch_size``."""
    epochs = math.ceil(n_steps / math.ceil(n_train / batch_size))
    return epochs, math.ceil(n_steps / epochs)


def recovery_train_config(space: Any, n_train: int, n_steps: int, *, seed: int = 0) -> tuple[Any, int]:
    """``n_steps`` optimizer steps of ``space``'s recovery fine-tune on ``n_train`` samples, as a TrainConfig and
    the steps per epoch it is capped at (for ``fit(..., max_steps_per_epoch=cap)``)."""
    from edgeslim.train import TrainConfig

    epochs, cap = epochs_and_cap(n_train, space.finetune_batch_size, n_steps)
    tcfg = TrainConfig(
        epochs=epochs,
        lr=space.finetune_lr,
        batch_size=space.finetune_batch_size,
        seed=seed,
        warmup_steps=min(100, n_steps // 10),
        augment=False,
    )
    return tcfg, cap


class Classify:
    """Image classification on an :class:`~edgeslim.data.ImageDataset`: top-1 accuracy."""

    kind = "classify"
    metric = "accuracy"
    metric_label = "top-1 accuracy"

    def check_data(self, train: Any, val: Any) -> None:
        for name, ds in (("train", train), ("val", val)):
            if not (hasattr(ds, "normalized") and hasattr(ds, "labels") and hasattr(ds, "take")):
                raise DataError(
                    f"optimize: data[{name!r}] must be an edgeslim ImageDataset (edgeslim.data.load(...)), "
                    f"got {type(ds).__name__}"
                )
            if len(ds) == 0:
                raise DataError(f"optimize: the {name} split ({ds.name}/{ds.split}) is empty")
        if tuple(train.input_shape) != tuple(val.input_shape):
            raise DataError(
                f"optimize: train samples are {tuple(train.input_shape)} but validation samples "
                f"{tuple(val.input_shape)}"
            )
        if len(set(val.labels.tolist())) < 2:
            raise DataError(
                f"optimize: the validation split ({val.name}/{val.split}) holds a single class: accuracy on it "
                "says nothing"
            )

    def data_hash(self, ds: Any) -> str:
        """sha256 of an ImageDataset's name, split, images, labels and normalisation."""
        h = hashlib.sha256(f"{ds.name}|{ds.split}|{len(ds)}|{ds.mean}|{ds.std}".encode())
        h.update(ds.images.contiguous().numpy().tobytes())
        h.update(ds.labels.contiguous().numpy().tobytes())
        return h.hexdigest()

    def inputs(self, ds: Any, n: int) -> torch.Tensor:
        return ds.normalized()[:n]

    def validation_inputs(self, ds: Any) -> Any:
        return ds  # export validates on the dataset (and compares top-1 with it)

    def score(self, model: nn.Module, ds: Any) -> float:
        from edgeslim.train import evaluate

        return evaluate(model, ds)

    def distill_kw(self) -> dict[str, Any]:
        return DISTILL_KW

    def train_config(self, space: Any, n_train: int, n_steps: int, seed: int) -> tuple[Any, int]:
        return recovery_train_config(space, n_train, n_steps, seed=seed)

    def recover(self, base: nn.Module, train: Any, model: nn.Module, how: str, tcfg: Any, cap: int, stop: Any):
        """Fine-tune ``model`` on ``train`` or distill the input model ``base`` into it (``cap`` steps per epoch);
        ``stop`` (the deadline) ends it before a step. Returns (model, the step it stopped at or None)."""
        if how == "distill":
            from edgeslim.distill import DistillConfig, distill

            out = distill(
                model,
                base,
                DistillConfig(**self.distill_kw()),
                data=(train, None),
                train_config=tcfg,
                progress=False,
                max_steps_per_epoch=cap,
                stop=stop,
            )
            return out, out.report.stopped_at_step
        return self.finetune(train, model, tcfg, cap, stop)

    def finetune(self, train: Any, model: nn.Module, tcfg: Any, cap: int, stop: Any):
        from edgeslim.train import fit

        res = fit(model, train, None, tcfg, max_steps_per_epoch=cap, progress=False, stop=stop)
        return res.model, res.stopped_at_step  # fit keeps the recorded steps (the pruned structure)


class Detect(Classify):
    """Object detection on a :class:`~edgeslim.data.DetectionDataset`: COCO mAP@[.5:.95] (pycocotools) with NMS
    outside the model (:func:`edgeslim.runtime.evaluate_detector`), on torch and on the deployed file alike."""

    kind = "detect"
    metric = "map"
    metric_label = "mAP@[.5:.95]"
    #: images the exported file is validated against torch on (the export gate)
    VALIDATION_IMAGES = 32

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    def check_data(self, train: Any, val: Any) -> None:
        for name, ds in (("train", train), ("val", val)):
            if not (hasattr(ds, "target") and hasattr(ds, "annotation_file") and hasattr(ds, "take")):
                raise DataError(
                    f"optimize: the model is a detector, so data[{name!r}] must be an edgeslim DetectionDataset "
                    f"(edgeslim.data.load('fmnist-detect') or 'coco:<file.json>'), got {type(ds).__name__}"
                )
            if len(ds) == 0:
                raise DataError(f"optimize: the {name} split ({ds.name}/{ds.split}) is empty")
            if ds.num_classes != self.num_classes:
                raise DataError(
                    f"optimize: the {name} split ({ds.name}/{ds.split}) has {ds.num_classes} classes but the "
                    f"detector {self.num_classes}"
                )
        if train.image_size != val.image_size:
            raise DataError(
                f"optimize: train images are {train.image_size}x{train.image_size} but validation images "
                f"{val.image_size}x{val.image_size}"
            )
        if not any(len(val.target(i)["labels"]) for i in range(len(val))):
            raise DataError(f"optimize: the validation split ({val.name}/{val.split}) holds no boxes: mAP says nothing")

    def data_hash(self, ds: Any) -> str:
        """sha256 of a DetectionDataset's name, split, image size, every image file's bytes and its boxes."""
        h = hashlib.sha256(f"{ds.name}|{ds.split}|{len(ds)}|{ds.image_size}|{ds.classes}".encode())
        for r in ds.records:
            h.update(r.path.read_bytes())
            h.update(r.boxes.tobytes())
            h.update(r.labels.tobytes())
        return h.hexdigest()

    def inputs(self, ds: Any, n: int) -> torch.Tensor:
        return torch.stack([ds[i][0] for i in range(min(n, len(ds)))])

    def validation_inputs(self, ds: Any) -> Any:
        return self.inputs(ds, self.VALIDATION_IMAGES)

    def score(self, model: nn.Module, ds: Any) -> float:
        from edgeslim.runtime import evaluate_detector

        return float(evaluate_detector(model, ds, runtime="torch", threads=torch.get_num_threads())["map"])

    def score_file(self, art: Any, ds: Any, runtime: str, threads: int) -> tuple[float, str]:
        from edgeslim.runtime import evaluate_detector

        m = evaluate_detector(art, ds, runtime=runtime, threads=threads)
        return float(m["map"]), (
            f"COCO mAP@[.5:.95] (pycocotools; NMS outside the model, conf 0.001, IoU 0.6, 100 per image) of the "
            f"file on {m['runtime']}, {m['images']} images of {ds.name}/{ds.split}"
        )

    def distill_kw(self) -> dict[str, Any]:
        return DETECT_DISTILL_KW

    def train_config(self, space: Any, n_train: int, n_steps: int, seed: int) -> tuple[Any, int]:
        """``n_steps`` AdamW steps of :func:`edgeslim.train.train_detector` (``space.finetune_lr`` is the peak
        learning rate, ``finetune_batch_size`` the batch), every layer trained, and the steps per epoch."""
        from edgeslim.train import DetectTrainConfig

        epochs, cap = epochs_and_cap(n_train, space.finetune_batch_size, n_steps)
        cfg = DetectTrainConfig(
            epochs=epochs,
            batch_size=space.finetune_batch_size,
            lr=space.finetune_lr,
            warmup_steps=min(20, n_steps // 10),
            freeze_backbone=0,
            seed=seed,
        )
        return cfg, cap

    def finetune(self, train: Any, model: nn.Module, tcfg: Any, cap: int, stop: Any):
        from edgeslim.train import train_detector

        res = train_detector(model, train, None, tcfg, progress=False, max_steps_per_epoch=cap, stop=stop)
        return res.model, res.stopped_at_step


def task_of(model: nn.Module) -> Classify:
    """The task of ``model``: :class:`Detect` for detectors in the edgeslim layout, else :class:`Classify`."""
    if getattr(model, "edgeslim_task", None) == "detect":
        from edgeslim.core.detection import check_detector

        return Detect(check_detector(model))
    return Classify()


def check_space(task: Classify, space: Any) -> None:
    """Refuse the search choices a task cannot take, in one line each."""
    if task.kind != "detect":
        return
    if any(space.drop_blocks):
        raise ConfigError(
            f"Space.drop_blocks={space.drop_blocks!r}: removing blocks is not searched for detectors (the block "
            "ranking scores classifier outputs); use (0,) — Space.for_detection() does"
        )
    if True in space.mixed_precision:
        raise ConfigError(
            "Space.mixed_precision=(True, ...): mixed precision is not searched for detectors (its layer "
            "sensitivity is scored by top-1 accuracy); use (False,)"
        )
    torch_only = [f for f in ("equalize",) if True in getattr(space, f)]
    if torch_only:
        raise ConfigError(
            f"Space.{torch_only[0]}=(True, ...): not searched for detectors (it needs the torch fake-quant capture; "
            "a detector is quantized on its ONNX graph, where the head rules keep the decode float); use (False,)"
        )
    if space.recovery_processes > 1:
        raise ConfigError(
            f"Space.recovery_processes={space.recovery_processes}: a detector's recovery runs in one process; use 1"
        )
