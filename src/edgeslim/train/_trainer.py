"""One small trainer: seeded fit/evaluate with progress bars, a checkpoint every epoch, and resume."""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgeslim.core.config import Config, StrEnum
from edgeslim.core.errors import DataError
from edgeslim.core.io import save_torch
from edgeslim.core.seed import seed_everything

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""An extra loss term ``loss_fn(outputs, targets, inputs)`` added to cross-entropy (e.g. distillation)."""

StepFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""A whole training-step loss ``step_fn(model, inputs, targets, indices) -> (loss, outputs)`` replacing
cross-entropy; ``indices`` are the rows of the training set in the batch (keys for cached teacher outputs)."""


def _dist() -> tuple[int, int]:
    """(rank, world size) of the current torch.distributed group, or (0, 1) when not distributed."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        return td.get_rank(), td.get_world_size()
    return 0, 1


class Optimizer(StrEnum):
    SGD = "sgd"
    ADAMW = "adamw"


@dataclass(frozen=True)
class TrainConfig(Config):
    """Training settings.

    Attributes:
        epochs: passes over the training set.
        batch_size: samples per step.
        lr: peak learning rate (cosine decay to zero after ``warmup_steps``).
        optimizer: ``sgd`` (momentum 0.9, nesterov) or ``adamw``.
        weight_decay: L2 / decoupled weight decay.
        label_smoothing: cross-entropy label smoothing.
        augment: random crop (pad 2) and horizontal flip on the training images.
        seed: seeds initial shuffling, augmentation and dropout.
        warmup_steps: linear learning-rate warm-up steps.
        patience: stop early after this many epochs without a better validation accuracy (0: never).
    """

    kind = "train"
    epochs: int = 3
    batch_size: int = 128
    lr: float = 0.05
    optimizer: Optimizer = Optimizer.SGD
    weight_decay: float = 4e-5
    label_smoothing: float = 0.0
    augment: bool = True
    seed: int = 0
    warmup_steps: int = 100
    patience: int = 0

    def validate(self) -> None:
        if self.epochs < 1:
            raise self._bad("epochs", "must be >= 1")
        if self.batch_size < 1:
            raise self._bad("batch_size", "must be >= 1")
        if not (0 < self.lr < 10):
            raise self._bad("lr", "must be in (0, 10)")
        if self.weight_decay < 0:
            raise self._bad("weight_decay", "must be >= 0")
        if not 0 <= self.label_smoothing < 1:
            raise self._bad("label_smoothing", "must be in [0, 1)")
        if self.warmup_steps < 0:
            raise self._bad("warmup_steps", "must be >= 0")
        if self.patience < 0:
            raise self._bad("patience", "must be >= 0 (0 turns early stopping off)")


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict]
    best_accuracy: float
    resumed_from_epoch: int
    stopped_at_step: int | None = None  # the global step ``stop`` ended the run at (None: ran to the end)

    def to_dict(self) -> dict:
        return {
            "history": self.history,
            "best_accuracy": self.best_accuracy,
            "resumed_from_epoch": self.resumed_from_epoch,
            "stopped_at_step": self.stopped_at_step,
        }


def _progress(iterable, **kw):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return iterable
    return tqdm(iterable, leave=False, mininterval=1.0, **kw)


def _progress_line(text: str) -> None:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return
    tqdm.write(text, file=sys.stderr)


@torch.no_grad()
def evaluate(
    model: nn.Module, data, *, batch_size: int = 512, progress: bool = False, device: str | torch.device | None = None
) -> float:
    """Top-1 accuracy of ``model`` on an :class:`~edgeslim.data.ImageDataset` (or (x, y) batches).

    Args:
        device: where to run (default: where the model's first parameter lives, else the CPU).
    """
    if len(data) == 0:
        raise DataError("cannot evaluate on an empty dataset")
    was_training = model.training
    model.eval()
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    correct = total = 0
    batches = data.batches(batch_size) if hasattr(data, "batches") else data
    for x, y in _progress(batches, desc="eval", disable=not progress):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    model.train(was_training)
    return correct / total


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    pad = nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    dy = torch.randint(0, 5, (n,), generator=g)
    dx = torch.randint(0, 5, (n,), generator=g)
    rows = (torch.arange(h).view(1, h) + dy.view(n, 1)).view(n, 1, h, 1).expand(n, x.shape[1], h, w + 4)
    out = pad.gather(2, rows)
    cols = (torch.arange(w).view(1, w) + dx.view(n, 1)).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def fit(
    model: nn.Module,
    train,
    val=None,
    config: TrainConfig = TrainConfig(),
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    loss_fn: LossFn | None = None,
    progress: bool = True,
    max_steps_per_epoch: int | None = None,
    device: str | torch.device = "cpu",
    step_fn: StepFn | None = None,
    channels_last: bool = False,
    stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train a copy of ``model`` on ``train`` and return it with its history; the input is not modified.

    With ``checkpoint_dir`` the full state (model, optimizer, schedule, RNG, history) is written atomically
    after every epoch to ``last.pt`` and, when ``resume`` is true, a later call picks up after the last
    finished epoch; a checkpoint written with another ``config`` or ``max_steps_per_epoch`` is not resumed (a
    warning, then a fresh start). The best-by-validation weights are kept in ``best.pt`` and returned.

    ``device`` (e.g. ``"cuda"``) is where the steps run; checkpoints hold CPU tensors and the returned
    model is on the CPU either way.

    ``step_fn`` replaces the default cross-entropy (+ ``loss_fn``) step loss; distillation uses it to reach
    teacher outputs and intermediate features. Under ``torchrun`` (torch.distributed initialised) the model
    is wrapped in DistributedDataParallel and every global batch is split across the ranks, so the averaged
    gradients equal the single-process ones; only rank 0 writes checkpoints.

    ``channels_last`` runs the steps in NHWC memory format (4-D weights and image batches): the same
    arithmetic, faster convolutions on CPUs (1.15-1.55x per step measured for pruned ResNet-18 / MobileNetV2 on
    Fashion-MNIST, 2 threads). The returned model is back in the default layout.

    ``stop`` is asked before every step (e.g. a deadline): when it returns True the run ends there, without the
    epoch's evaluation or checkpoint, and the model is returned as trained so far with
    ``TrainResult.stopped_at_step`` set (the caller decides whether a partial run is usable).
    """
    if len(train) == 0:
        raise DataError("training dataset is empty")
    seed_everything(config.seed)
    device = torch.device(device)
    model = copy.deepcopy(model).to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    rank, world = _dist()
    net: nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=None if device.type == "cpu" else [device])
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == Optimizer.SGD:
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay
        )
    else:
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    if max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, max_steps_per_epoch)
    total = steps_per_epoch * config.epochs
    warm = min(config.warmup_steps, max(total // 5, 0))

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    g = torch.Generator().manual_seed(config.seed)
    history: list[dict] = []
    start_epoch = 0
    best_acc = -1.0
    best_state = None
    best_epoch = 0
    ck_dir = Path(checkpoint_dir) if checkpoint_dir else None
    if ck_dir and resume and (ck_dir / "last.pt").is_file():
        state = torch.load(ck_dir / "last.pt", map_location=device, weights_only=True)
        same_cap = (state.get("max_steps_per_epoch") or None) == (max_steps_per_epoch or None)
        if state.get("config") != config.to_dict() or not same_cap:
            log.warning("checkpoint in %s was written with other settings; starting afresh", ck_dir)
        else:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            g.set_state(state["generator"].cpu())
            torch.set_rng_state(state["torch_rng"].cpu())
            history = list(state["history"])
            start_epoch = int(state["epoch"])
            best_acc = float(state["best_accuracy"])
            best_epoch = int(state.get("best_epoch", start_epoch))
            if (ck_dir / "best.pt").is_file():
                best_state = torch.load(ck_dir / "best.pt", map_location=device, weights_only=True)
            log.info("resumed from %s after epoch %d", ck_dir, start_epoch)
    x_all = train.normalized()
    y_all = train.labels
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    stopped_at = None
    for epoch in range(start_epoch, config.epochs):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(train), generator=g)
        running = 0.0
        bar = _progress(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress)
        for step in bar:
            if stop is not None and stop():
                stopped_at = epoch * steps_per_epoch + step
                break
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            if world > 1:
                idx = idx.tensor_split(world)[rank]
            x, y = x_all[idx], y_all[idx]
            if config.augment:
                x = _augment(x, g)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            if step_fn is not None:
                loss, out = step_fn(net, x, y, idx)
            else:
                out = net(x)
                loss = criterion(out, y)
                if loss_fn is not None:
                    loss = loss + loss_fn(out, y, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += float(loss.detach())
            if hasattr(bar, "set_postfix") and step % 20 == 0:
                bar.set_postfix(loss=f"{running / (step + 1):.3f}")
        if stopped_at is not None:
            if hasattr(bar, "close"):
                bar.close()
            log.info("training stopped by its stop condition at step %d of %d", stopped_at, total)
            break
        acc = evaluate(model, val) if val is not None and len(val) else float("nan")
        row = {
            "epoch": epoch + 1,
            "loss": running / steps_per_epoch,
            "val_accuracy": acc,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        history.append(row)
        log.info("epoch %d: loss %.4f, val accuracy %.4f", epoch + 1, row["loss"], acc)
        if progress and rank == 0:  # one line per epoch that stays on screen (the step bar is transient)
            if hasattr(bar, "close"):
                bar.close()
            _progress_line(
                f"epoch {epoch + 1}/{config.epochs}: loss {row['loss']:.4f}, val accuracy "
                f"{acc:.4f} ({row['seconds']} s)"
            )
        if val is None or acc > best_acc:
            best_acc = acc
            best_epoch = epoch + 1
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            if ck_dir and rank == 0:
                save_torch(best_state, ck_dir / "best.pt", force=True)
        if ck_dir and rank == 0:
            save_torch(
                {
                    "model": _to_cpu(model.state_dict()),
                    "optimizer": _to_cpu(opt.state_dict()),
                    "scheduler": sched.state_dict(),
                    "generator": g.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "history": history,
                    "epoch": epoch + 1,
                    "best_accuracy": best_acc,
                    "config": config.to_dict(),
                    "best_epoch": best_epoch,
                    "max_steps_per_epoch": max_steps_per_epoch,
                },
                ck_dir / "last.pt",
                force=True,
            )
        if config.patience and val is not None and epoch + 1 - best_epoch >= config.patience:
            log.info(
                "early stop after epoch %d: no better validation accuracy for %d epochs", epoch + 1, config.patience
            )
            break
    model = model.cpu()
    if channels_last:
        model = model.to(memory_format=torch.contiguous_format)
    if best_state is not None and stopped_at is None:
        model.load_state_dict({k: v.cpu() for k, v in best_state.items()})
    return TrainResult(model.eval(), history, best_acc, start_epoch, stopped_at)


def _to_cpu(obj):
    """A copy of a (nested) state dict with every tensor on the CPU, so checkpoints load anywhere."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


__all__ = ["TrainConfig", "TrainResult", "fit", "evaluate", "Optimizer", "LossFn", "StepFn"]
