"""Training detectors in the edgeslim layout: a task-aligned assigner, CIoU + BCE loss, and a small loop.

The loss works on the model's own output ``[B, A, 4 + C]`` (boxes xyxy in pixels, sigmoid scores), so it needs
nothing from the model but its anchor points (``model.anchor_points(h, w)``).

Assignment (simplified task-aligned assigner, as in TOOD / YOLOv8): an anchor is a candidate for a ground-truth box
when its centre lies inside the box (a box holding no centre gets the nearest one); among the candidates the
``topk`` with the best alignment ``score ** alpha * IoU ** beta`` are positives; an anchor claimed by several boxes
keeps the one it overlaps most. Class targets are soft: the alignment, normalised per box to the box's best IoU.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from edgeslim.core.config import Config, StrEnum
from edgeslim.core.detection import check_detector
from edgeslim.core.errors import ConfigError, DataError
from edgeslim.core.io import save_torch
from edgeslim.core.seed import seed_everything
from edgeslim.train._trainer import _progress, _progress_line, _to_cpu

log = logging.getLogger(__name__)


class ClsLoss(StrEnum):
    VARIFOCAL = "varifocal"
    BCE = "bce"


@dataclass(frozen=True)
class DetectTrainConfig(Config):
    """Detector training settings.

    Attributes:
        epochs: passes over the training set.
        batch_size: images per step.
        lr: peak AdamW learning rate (linear warm-up, then cosine decay to 5% of it).
        weight_decay: AdamW decoupled weight decay (not applied to norms and biases).
        warmup_steps: linear warm-up steps.
        freeze_backbone: the first N blocks of ``model.backbone`` keep their weights and BN statistics (their
            backward pass is skipped, the costliest part on a CPU); 0 trains everything.
        hflip: flip half of the training images (and their boxes) horizontally.
        topk: positives per ground-truth box in the assigner.
        alpha: score exponent of the alignment metric.
        beta: IoU exponent of the alignment metric.
        box_weight: weight of the CIoU box loss.
        cls_weight: weight of the class loss.
        cls_loss: ``varifocal`` (BCE with easy negatives weighted down by ``0.75 * p ** 2`` and positives weighted by
            their soft target, VarifocalNet) or plain ``bce``.
        seed: seeds shuffling and augmentation.
        channels_last: run the steps in NHWC memory layout (faster convolutions on CPUs).
        cache_frozen: compute the frozen blocks' outputs once for every training image (and its mirror image with
            ``hflip``), kept in float16, instead of at every step; needs a model with ``backbone_state`` and
            ``forward_from`` (as ``yolo_mobilenet_v2``). Exact up to float16 rounding, since frozen blocks and
            their BN statistics do not change.
    """

    kind = "detect_train"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    freeze_backbone: int = 4
    hflip: bool = True
    topk: int = 10
    alpha: float = 0.5
    beta: float = 6.0
    box_weight: float = 5.0
    cls_weight: float = 1.0
    cls_loss: ClsLoss = ClsLoss.VARIFOCAL
    seed: int = 0
    channels_last: bool = True
    cache_frozen: bool = False

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "topk"):
            if getattr(self, name) < 1:
                raise self._bad(name, "must be >= 1")
        if not (0 < self.lr < 1):
            raise self._bad("lr", "must be in (0, 1)")
        for name in ("weight_decay", "warmup_steps", "freeze_backbone", "alpha", "beta", "box_weight", "cls_weight"):
            if getattr(self, name) < 0:
                raise self._bad(name, "must be >= 0")


def _pad_targets(targets: Sequence[dict], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ground truth of a batch padded to the most boxes: boxes ``[B, G, 4]``, labels ``[B, G]``, valid ``[B, G]``."""
    g = max(1, max(len(t["labels"]) for t in targets))
    b = len(targets)
    boxes = torch.zeros(b, g, 4, device=device)
    labels = torch.zeros(b, g, dtype=torch.long, device=device)
    valid = torch.zeros(b, g, dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        n = len(t["labels"])
        if n:
            boxes[i, :n] = torch.as_tensor(t["boxes"], dtype=torch.float32, device=device).view(n, 4)
            labels[i, :n] = torch.as_tensor(t["labels"], dtype=torch.long, device=device).view(n)
            valid[i, :n] = True
    return boxes, labels, valid


def _pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boxes ``a [B, G, 4]`` with ``b [B, A, 4]`` (xyxy) -> ``[B, G, A]``."""
    a, b = a.unsqueeze(2), b.unsqueeze(1)
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter / (area_a + area_b - inter + 1e-9)


@torch.no_grad()
def assign(
    pred: torch.Tensor,
    points: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    valid: torch.Tensor,
    *,
    topk: int = 10,
    alpha: float = 0.5,
    beta: float = 6.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Task-aligned assignment.

    Args:
        pred: detector output ``[B, A, 4 + C]``.
        points: anchor centres ``[A, 2]``.
        gt_boxes, gt_labels, valid: padded ground truth (see :func:`_pad_targets`).

    Returns:
        ``fg [B, A]`` (positive anchors), ``target_boxes [B, A, 4]``, ``target_scores [B, A, C]`` (soft).
    """
    bsz, n_anchor = pred.shape[:2]
    n_cls = pred.shape[2] - 4
    boxes, scores = pred[..., :4].float(), pred[..., 4:].float()
    px, py = points[:, 0].view(1, 1, -1), points[:, 1].view(1, 1, -1)
    x1, y1, x2, y2 = (gt_boxes[..., i : i + 1] for i in range(4))
    inside = torch.stack([px - x1, py - y1, x2 - px, y2 - py], -1).amin(-1) > 1e-6  # [B, G, A]
    # a box too small to hold an anchor centre gets the nearest one
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    nearest = ((px - cx) ** 2 + (py - cy) ** 2).argmin(-1, keepdim=True)  # [B, G, 1]
    empty = ~inside.any(-1, keepdim=True)
    inside = inside | (F.one_hot(nearest.squeeze(-1), n_anchor).bool() & empty)
    inside &= valid.unsqueeze(-1)
    iou = _pairwise_iou(gt_boxes, boxes)  # [B, G, A]
    cls_score = scores.gather(2, gt_labels.unsqueeze(1).expand(bsz, n_anchor, -1)).transpose(1, 2)  # [B, G, A]
    align = cls_score.pow(alpha) * iou.pow(beta) * inside
    k = min(topk, n_anchor)
    # top-k by alignment among the candidates; the tiny in-box bonus keeps ties inside the box
    top = (align + inside * 1e-9).topk(k, dim=-1).indices
    pos = torch.zeros_like(inside).scatter_(-1, top, True) & inside
    # an anchor claimed by several boxes keeps the one it overlaps most
    multi = pos.sum(1, keepdim=True) > 1  # [B, 1, A]
    best = F.one_hot((iou * pos).argmax(1), gt_boxes.shape[1]).transpose(1, 2).bool()  # [B, G, A]
    pos = torch.where(multi, best & pos, pos)
    fg = pos.any(1)  # [B, A]
    gt_idx = pos.float().argmax(1)  # [B, A]
    target_boxes = gt_boxes.gather(1, gt_idx.unsqueeze(-1).expand(-1, -1, 4))
    target_labels = gt_labels.gather(1, gt_idx)
    align = align * pos
    norm = align * (iou * pos).amax(-1, keepdim=True) / (align.amax(-1, keepdim=True) + 1e-9)
    norm = norm.amax(1)  # [B, A]
    target_scores = F.one_hot(target_labels, n_cls).float() * (norm * fg).unsqueeze(-1)
    return fg, target_boxes, target_scores


def detection_loss(
    pred: torch.Tensor,
    targets: Sequence[dict],
    points: torch.Tensor,
    config: DetectTrainConfig = DetectTrainConfig(),
) -> tuple[torch.Tensor, dict[str, float]]:
    """CIoU box loss and varifocal (or BCE) class loss of a batch, both normalised by the sum of the soft class
    targets.

    Args:
        pred: detector output ``[B, A, 4 + C]`` (boxes xyxy pixels, sigmoid scores).
        targets: per image ``{"boxes": [N, 4] xyxy pixels, "labels": [N]}``.
        points: anchor centres ``[A, 2]`` in the order of ``pred``'s rows.

    Returns:
        the loss and its parts (``box``, ``cls``) as floats.
    """
    from torchvision.ops import complete_box_iou_loss

    gt_boxes, gt_labels, valid = _pad_targets(targets, pred.device)
    fg, t_boxes, t_scores = assign(
        pred.detach(), points.to(pred.device), gt_boxes, gt_labels, valid,
        topk=config.topk, alpha=config.alpha, beta=config.beta,
    )  # fmt: skip
    norm = t_scores.sum().clamp(min=1.0)
    scores = pred[..., 4:].float().clamp(1e-7, 1 - 1e-7)
    bce = F.binary_cross_entropy(scores, t_scores, reduction="none")
    if config.cls_loss == ClsLoss.VARIFOCAL:
        pos = t_scores > 0
        bce = bce * torch.where(pos, t_scores, 0.75 * scores.detach().pow(2))
    cls = bce.sum() / norm
    if fg.any():
        weight = t_scores.sum(-1)[fg]
        box = (complete_box_iou_loss(pred[..., :4][fg].float(), t_boxes[fg], reduction="none") * weight).sum() / norm
    else:
        box = pred[..., :4].sum() * 0.0
    loss = config.cls_weight * cls + config.box_weight * box
    return loss, {"box": float(box.detach()), "cls": float(cls.detach())}


@dataclass
class DetectTrainResult:
    model: nn.Module
    history: list[dict]
    best_map: float
    resumed_from_epoch: int
    stopped_at_step: int | None = None


def _batches(data: Any, order: torch.Tensor, batch_size: int):
    for s in range(0, len(order), batch_size):
        items = [data[int(i)] for i in order[s : s + batch_size]]
        yield torch.stack([im for im, _ in items]), [t for _, t in items]


def _hflip(x: torch.Tensor, targets: list[dict], g: torch.Generator) -> tuple[torch.Tensor, list[dict]]:
    flip = torch.rand(len(x), generator=g) < 0.5
    if not flip.any():
        return x, targets
    x = x.clone()
    x[flip] = x[flip].flip(-1)
    return x, _flip_targets(targets, flip.tolist(), x.shape[-1])


def _freeze(model: nn.Module, n: int) -> list[nn.Module]:
    if n == 0:
        return []
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Sequential) or n > len(backbone):
        have = f"a backbone of {len(backbone)} blocks" if isinstance(backbone, nn.Sequential) else "no backbone"
        raise ConfigError(f"freeze_backbone={n} does not fit {type(model).__name__} ({have}); use 0 to train all")
    frozen = list(backbone[:n])
    for m in frozen:
        m.requires_grad_(False)
    return frozen


def _targets(data: Any) -> list[dict]:
    """Every item's target, without decoding images where the dataset can (``DetectionDataset.target``)."""
    get = getattr(data, "target", None)
    return [get(i) if callable(get) else data[i][1] for i in range(len(data))]


@torch.no_grad()
def _frozen_cache(model: nn.Module, data: Any, stop: int, hflip: bool, progress: bool) -> list[list[torch.Tensor]]:
    """``cache[flip][j]``: the j-th tensor of ``model.backbone_state(image, stop)`` for every image, float16."""
    views = (False, True) if hflip else (False,)
    out: list[list[torch.Tensor]] = []
    order = torch.arange(len(data))
    for flip in views:
        parts: list[list[torch.Tensor]] = []
        bar = _progress(_batches(data, order, 64), total=math.ceil(len(data) / 64), desc="caching frozen blocks",
                        disable=not progress)  # fmt: skip
        for x, _ in bar:
            x = (x.flip(-1) if flip else x).contiguous(memory_format=torch.channels_last)
            for j, t in enumerate(model.backbone_state(x, stop)):
                if len(parts) <= j:
                    parts.append([])
                parts[j].append(t.half().contiguous())
        out.append([torch.cat(p) for p in parts])
    return out


def _flip_targets(targets: list[dict], flip: list[bool], w: int) -> list[dict]:
    out = []
    for f, t in zip(flip, targets, strict=True):
        if f and len(t["boxes"]):
            b = torch.as_tensor(t["boxes"], dtype=torch.float32).view(-1, 4)
            t = {**t, "boxes": torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1)}
        out.append(t)
    return out


def train_detector(
    model: nn.Module,
    train: Any,
    val: Any = None,
    config: DetectTrainConfig | None = None,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    max_steps_per_epoch: int | None = None,
    eval_every: int = 1,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]
    | None = None,
    stop: Callable[[], bool] | None = None,
    **overrides: Any,
) -> DetectTrainResult:
    """Train a copy of a detector (edgeslim layout) on a detection dataset; the input model is not modified.

    ``train``/``val`` give ``(image [3, H, W] in [0, 1], {"boxes", "labels", "image_id"})`` per index (an
    :class:`edgeslim.data.DetectionDataset`). Config fields can be passed as keywords (``epochs=``, ``lr=``,
    ``batch_size=`` ...). With ``checkpoint_dir`` the full state is written after every epoch (``last.pt``) and a
    later call with the same settings resumes after the last finished epoch; the best weights by validation
    mAP@[.5:.95] (computed with :func:`edgeslim.runtime.evaluate_detector` every ``eval_every`` epochs and after
    the last) are kept in ``best.pt`` and returned.

    ``loss_fn(model, x, out, det_loss) -> (loss, parts)``, when given, turns each step's detection loss into the
    loss that is minimised (e.g. adds distillation terms; ``model`` is the copy being trained, ``x`` the augmented
    batch it saw, ``out`` its output); ``parts`` (floats) are averaged into the epoch's history. It needs the input
    images at every step, so it cannot be combined with ``cache_frozen``. ``stop`` is asked before every step (e.g.
    a deadline); True ends training there, and ``stopped_at_step`` (0-based, counted over the whole run) says where
    (the weights are then the partly trained ones: no evaluation, no checkpoint of the unfinished epoch).
    """
    from edgeslim.runtime import evaluate_detector

    check_detector(model)
    if not callable(getattr(model, "anchor_points", None)):
        raise ConfigError(
            f"{type(model).__name__} has no anchor_points(height, width) method: train_detector needs the anchor "
            "centres in the order of the output rows"
        )
    config = (config or DetectTrainConfig()).replace(**overrides) if overrides else (config or DetectTrainConfig())
    if len(train) == 0:
        raise DataError("training dataset is empty")
    if eval_every < 1:
        raise ConfigError(f"eval_every={eval_every!r} is not allowed; use an integer >= 1")
    if loss_fn is not None and config.cache_frozen:
        raise ConfigError(
            "cache_frozen=True cannot be combined with a loss_fn (e.g. distillation): the loss needs the input "
            "images at every step; set cache_frozen=False"
        )
    seed_everything(config.seed)
    model = copy.deepcopy(model).train()
    frozen = _freeze(model, config.freeze_backbone)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    if max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, max_steps_per_epoch)
    total = steps_per_epoch * config.epochs
    warm = min(config.warmup_steps, total // 5)

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    g = torch.Generator().manual_seed(config.seed)
    history: list[dict] = []
    start_epoch, best_map, best_state = 0, -1.0, None
    ck_dir = Path(checkpoint_dir) if checkpoint_dir else None
    if ck_dir and resume and (ck_dir / "last.pt").is_file():
        state = torch.load(ck_dir / "last.pt", map_location="cpu", weights_only=True)
        if state.get("config") != config.to_dict() or state.get("max_steps_per_epoch") != max_steps_per_epoch:
            log.warning("checkpoint in %s was written with other settings; starting afresh", ck_dir)
        else:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            g.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            history, start_epoch = list(state["history"]), int(state["epoch"])
            best_map = float(state["best_map"])
            if (ck_dir / "best.pt").is_file():
                best_state = torch.load(ck_dir / "best.pt", map_location="cpu", weights_only=True)
            log.info("resumed from %s after epoch %d", ck_dir, start_epoch)
    size = tuple(train[0][0].shape[-2:])
    points, _ = model.anchor_points(*size)
    k = config.freeze_backbone
    cache = None
    if k and config.cache_frozen and all(callable(getattr(model, a, None)) for a in ("backbone_state", "forward_from")):
        if start_epoch < config.epochs:
            t0 = time.perf_counter()
            for m in frozen:
                m.eval()
            cache = _frozen_cache(model, train, k, config.hflip, progress)
            all_targets = _targets(train)
            mb = sum(t.numel() * 2 for views in cache for t in views) / 2**20
            log.info("cached frozen blocks 0-%d for %d images in %.1f s (%.0f MiB)", k - 1, len(train),
                     time.perf_counter() - t0, mb)  # fmt: skip
            if progress:
                _progress_line(f"cached the frozen blocks' outputs ({mb:.0f} MiB) in {time.perf_counter() - t0:.0f} s")
    stopped_at: int | None = None
    for epoch in range(start_epoch, config.epochs):
        model.train()
        for m in frozen:
            m.eval()
        t0 = time.perf_counter()
        order = torch.randperm(len(train), generator=g)[: steps_per_epoch * config.batch_size]
        sums = {"loss": 0.0, "box": 0.0, "cls": 0.0}
        bar = _progress(
            _batches(train, order, config.batch_size),
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=not progress,
        )
        steps = 0
        if cache is not None:
            bar = _progress(
                (order[s : s + config.batch_size] for s in range(0, len(order), config.batch_size)),
                total=steps_per_epoch,
                desc=f"epoch {epoch + 1}/{config.epochs}",
                disable=not progress,
            )
        for batch in bar:
            if stop is not None and stop():
                stopped_at = epoch * steps_per_epoch + steps
                break
            if cache is not None:
                idx = batch
                flip = (
                    (torch.rand(len(idx), generator=g) < 0.5)
                    if config.hflip
                    else torch.zeros(len(idx), dtype=torch.bool)
                )
                state = []
                for j in range(len(cache[0])):
                    t = cache[0][j][idx].float()
                    if flip.any():
                        t[flip] = cache[1][j][idx[flip]].float()
                    state.append(t.contiguous(memory_format=torch.channels_last) if config.channels_last else t)
                targets = _flip_targets([all_targets[int(i)] for i in idx], flip.tolist(), size[1])
                out = model.forward_from(state, k)
            else:
                x, targets = batch
                if tuple(x.shape[-2:]) != size:
                    raise DataError(f"training images have different sizes: {size} and {tuple(x.shape[-2:])}")
                if config.hflip:
                    x, targets = _hflip(x, targets, g)
                if config.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                out = model(x)
            loss, parts = detection_loss(out, targets, points, config)
            if loss_fn is not None:
                loss, extra = loss_fn(model, x, out, loss)
                parts = {**parts, **extra}
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            sched.step()
            steps += 1
            sums["loss"] += float(loss.detach())
            for key, v in parts.items():
                sums[key] = sums.get(key, 0.0) + float(v)
            if hasattr(bar, "set_postfix") and steps % 10 == 0:
                bar.set_postfix(loss=f"{sums['loss'] / steps:.3f}")
        if stopped_at is not None:
            if hasattr(bar, "close"):
                bar.close()
            log.info("training stopped before step %d (stop() said so)", stopped_at)
            break
        row: dict[str, Any] = {"epoch": epoch + 1, **{k: v / max(steps, 1) for k, v in sums.items()}}
        row["train_seconds"] = round(time.perf_counter() - t0, 1)
        last = epoch + 1 == config.epochs
        if val is not None and len(val) and ((epoch + 1) % eval_every == 0 or last):
            t1 = time.perf_counter()
            m = evaluate_detector(model, val, runtime="torch", threads=torch.get_num_threads())
            row.update(
                {"val_map": m["map"], "val_map50": m["map50"], "eval_seconds": round(time.perf_counter() - t1, 1)}
            )
            model.train()
            for fm in frozen:
                fm.eval()
        history.append(row)
        score = row.get("val_map", float("nan"))
        log.info("epoch %d: %s", epoch + 1, row)
        if progress:
            if hasattr(bar, "close"):
                bar.close()
            _progress_line(
                f"epoch {epoch + 1}/{config.epochs}: loss {row['loss']:.4f} (box {row['box']:.3f}, cls "
                f"{row['cls']:.3f}), val mAP {score:.4f} ({row['train_seconds']} s)"
            )
        if val is None or score > best_map:
            best_map = score if val is not None else best_map
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            if ck_dir:
                save_torch(best_state, ck_dir / "best.pt", force=True)
        if ck_dir:
            save_torch(
                {
                    "model": _to_cpu(model.state_dict()),
                    "optimizer": _to_cpu(opt.state_dict()),
                    "scheduler": sched.state_dict(),
                    "generator": g.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "history": history,
                    "epoch": epoch + 1,
                    "best_map": best_map,
                    "config": config.to_dict(),
                    "max_steps_per_epoch": max_steps_per_epoch,
                },
                ck_dir / "last.pt",
                force=True,
            )
    model = model.to(memory_format=torch.contiguous_format)
    if best_state is not None and stopped_at is None:
        model.load_state_dict(best_state)
    model.requires_grad_(True)
    return DetectTrainResult(model.eval(), history, best_map, start_epoch, stopped_at)


__all__ = ["ClsLoss", "DetectTrainConfig", "DetectTrainResult", "assign", "detection_loss", "train_detector"]
