"""Distillation for detectors in the edgeslim layout (``forward -> [B, A, 4 + C]``, boxes xyxy pixels, sigmoid
scores): the student is trained by :func:`edgeslim.train.train_detector` on the ground truth (times
``hard_weight``) plus terms that pull it towards a frozen teacher on the same augmented images.

- ``kd`` (logit): per anchor and class, binary cross-entropy of the student's scores against the teacher's scores
  (soft targets), normalised like the detection loss by the sum of the targets; plus a CIoU loss between the
  student's and the teacher's boxes on the anchors the teacher is confident about, weighted by the teacher's best
  class score. The two parts are weighted by the train config's ``cls_weight`` and ``box_weight``, as in the ground
  truth loss. Scores are sigmoids, not a softmax: ``temperature`` is not used.
- ``hint`` (feature, FitNets): per paired layer (a module returning a map or a list of maps, e.g. the neck's three
  levels), a learned 1x1 conv maps the student's map to the teacher's width; the loss is the MSE relative to the
  teacher map's mean square, so its weight does not depend on the feature scale.
- ``attention`` (feature): attention transfer on the same pairs (normalised channel-energy maps).

Teacher and student see the same anchors, so a pruned copy of the teacher (same strides, same input size) pairs
row by row; anything else is refused with the two shapes.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgeslim.core.errors import ConfigError, ModelError
from edgeslim.distill._config import DistillConfig
from edgeslim.distill._losses import _at, _match_spatial

#: losses a detector can be distilled with
DETECT_LOSSES = ("kd", "hint", "attention")
#: teacher anchors whose best class score is below this carry no box term
BOX_MIN_SCORE = 0.05


def _maps(o: Any) -> list[torch.Tensor]:
    if isinstance(o, torch.Tensor):
        return [o]
    if isinstance(o, (tuple, list)) and o and all(isinstance(v, torch.Tensor) for v in o):
        return list(o)
    raise ModelError(f"distill: a paired detector layer returned {type(o).__name__}; need a tensor or a list of them")


class _Capture:
    """Forward hooks that keep the outputs of named modules while on."""

    def __init__(self, model: nn.Module, names: tuple[str, ...], who: str) -> None:
        from edgeslim.distill._api import _module  # the named module, or one line with the nearest valid names

        mods = [_module(model, n, who) for n in names]
        self.names = names
        self.out: dict[str, Any] = {}
        self.handles = [m.register_forward_hook(self._hook(n)) for m, n in zip(mods, names, strict=True)]

    def _hook(self, name: str):
        def fn(module, inputs, output):
            self.out[name] = output

        return fn

    def take(self) -> list[torch.Tensor]:
        feats = [m for n in self.names for m in _maps(self.out[n])]
        self.out = {}
        return feats

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _DetectStudent(nn.Module):
    """The student plus the learned adapters, trained as one module; anything else is the student's.

    ``train_detector`` copies the module it trains, so the feature hooks live on this module's student and are put
    back by ``__deepcopy__``.
    """

    def __init__(self, student: nn.Module, adapters: nn.ModuleList, layers: tuple[str, ...]) -> None:
        super().__init__()
        self.student = student
        self.adapters = adapters
        self._layers = layers
        self._capture = _Capture(student, layers, "student") if layers else None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("student"), name)

    def __deepcopy__(self, memo: dict) -> _DetectStudent:
        if self._capture is not None:  # the copy gets hooks of its own, not ours
            self._capture.remove()
        try:
            new = _DetectStudent(copy.deepcopy(self.student, memo), copy.deepcopy(self.adapters, memo), self._layers)
        finally:
            if self._capture is not None:
                self._capture = _Capture(self.student, self._layers, "student")
        new.train(self.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)

    def features(self) -> list[torch.Tensor]:
        return self._capture.take() if self._capture is not None else []

    def release(self) -> nn.Module:
        if self._capture is not None:
            self._capture.remove()
        return self.student


def _relative_mse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(_match_spatial(s, t), t) / t.pow(2).mean().clamp_min(1e-8)


def score_box_kd(s_out: torch.Tensor, t_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Detection logit distillation: (score term, box term) of student vs teacher outputs ``[B, A, 4 + C]``."""
    from torchvision.ops import complete_box_iou_loss

    s_scores = s_out[..., 4:].float().clamp(1e-7, 1 - 1e-7)
    t_scores = t_out[..., 4:].float()
    cls = F.binary_cross_entropy(s_scores, t_scores, reduction="sum") / t_scores.sum().clamp(min=1.0)
    w = t_scores.amax(-1)
    keep = w > BOX_MIN_SCORE
    if keep.any():
        ciou = complete_box_iou_loss(s_out[..., :4][keep].float(), t_out[..., :4][keep].float(), reduction="none")
        box = (ciou * w[keep]).sum() / w[keep].sum()
    else:
        box = s_out[..., :4].sum() * 0.0
    return cls, box


def distill_detector(
    student: nn.Module,
    teacher: nn.Module,
    config: DistillConfig,
    train: Any,
    val: Any,
    train_config: Any,
    *,
    checkpoint_dir: str | Path | None,
    resume: bool,
    progress: bool,
    max_steps_per_epoch: int | None,
    stop: Any = None,
):
    """Train ``student`` (a copy) by :func:`edgeslim.train.train_detector` plus the distillation terms; returns the
    trainer's result with ``.model`` the student alone."""
    from edgeslim.core.detection import check_detector
    from edgeslim.train import DetectTrainConfig, train_detector

    if not isinstance(train_config, DetectTrainConfig):
        raise ConfigError(
            f"distill: the student is a detector; pass train_config=DetectTrainConfig(...) "
            f"(got {type(train_config).__name__})"
        )
    bad = [n for n in config.losses if n not in DETECT_LOSSES]
    if bad:
        raise ConfigError(
            f"distill: loss {bad[0]!r} is not defined for detectors; valid for detectors: {', '.join(DETECT_LOSSES)}"
        )
    if train_config.cache_frozen:
        raise ConfigError("distill: DetectTrainConfig(cache_frozen=True) is not possible: the teacher needs the images")
    n_s, n_t = check_detector(student, "student"), check_detector(teacher, "teacher")
    if n_s != n_t:
        raise ModelError(f"distill: the student detects {n_s} classes, the teacher {n_t}; they must be the same")
    teacher = copy.deepcopy(teacher).cpu().eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if train_config.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    t_capture = _Capture(teacher, config.teacher_layers, "teacher")
    probe = torch.stack([train[i][0] for i in range(min(2, len(train)))])
    student = copy.deepcopy(student).cpu()
    s_capture = _Capture(student, config.student_layers, "student")
    with torch.no_grad():
        was = student.training
        s_out = student.eval()(probe)
        student.train(was)
        t_out = teacher(probe)
    s_feats, t_feats = s_capture.take(), t_capture.take()
    s_capture.remove()
    if s_out.shape != t_out.shape:
        raise ModelError(
            f"distill: student output {tuple(s_out.shape)} and teacher output {tuple(t_out.shape)} differ; a "
            "detector is distilled anchor by anchor, so both need the same strides and input size"
        )
    if len(s_feats) != len(t_feats):
        raise ModelError(
            f"distill: the student layers {config.student_layers} give {len(s_feats)} maps, the teacher layers "
            f"{config.teacher_layers} {len(t_feats)}; pair layers that return the same number of maps"
        )
    for s, t in zip(s_feats, t_feats, strict=True):
        if s.ndim != 4 or t.ndim != 4:
            raise ModelError(f"distill: detector feature pairs must be maps [B, C, H, W]; got {tuple(s.shape)}")
    torch.manual_seed(train_config.seed)  # the adapters' initial weights follow the seed
    adapters = nn.ModuleList(nn.Conv2d(s.shape[1], t.shape[1], 1, bias=False) for s, t in zip(s_feats, t_feats))
    for a in adapters:  # start from the identity where the widths agree (a pruned copy of the teacher's neck)
        if a.in_channels == a.out_channels:
            nn.init.eye_(a.weight.view(a.out_channels, a.in_channels))
    wrapper = _DetectStudent(student, adapters, config.student_layers)
    weights = {n: config.weight_of(i) for i, n in enumerate(config.losses)}
    cw, bw = train_config.cls_weight, train_config.box_weight

    def loss_fn(model: nn.Module, x: torch.Tensor, out: torch.Tensor, det_loss: torch.Tensor):
        if next(teacher.parameters()).device != x.device:
            teacher.to(x.device)
        with torch.no_grad():
            t_out = teacher(x)
            t_feats = t_capture.take()
        s_feats = model.features()
        loss = config.hard_weight * det_loss
        parts: dict[str, float] = {}
        if weights.get("kd"):
            cls, box = score_box_kd(out, t_out)
            loss = loss + weights["kd"] * (cw * cls + bw * box)
            parts.update(kd_cls=float(cls.detach()), kd_box=float(box.detach()))
        if weights.get("hint"):
            hint = torch.stack(
                [_relative_mse(a(s), t) for a, s, t in zip(model.adapters, s_feats, t_feats, strict=True)]
            ).mean()
            loss = loss + weights["hint"] * hint
            parts["hint"] = float(hint.detach())
        if weights.get("attention"):
            att = torch.stack(
                [(_at(_match_spatial(s, t)) - _at(t)).pow(2).mean() for s, t in zip(s_feats, t_feats, strict=True)]
            ).mean()
            loss = loss + weights["attention"] * att
            parts["attention"] = float(att.detach())
        return loss, parts

    ck = None
    if checkpoint_dir:  # one resumable run per (distill config, train config, student architecture)
        tag = hashlib.sha1((config.to_yaml() + train_config.to_yaml() + repr(student)).encode()).hexdigest()[:12]
        ck = Path(checkpoint_dir) / f"run-{tag}"
    try:
        res = train_detector(
            wrapper,
            train,
            val,
            train_config,
            checkpoint_dir=ck,
            resume=resume,
            progress=progress,
            max_steps_per_epoch=max_steps_per_epoch,
            loss_fn=loss_fn,
            stop=stop,
        )
    finally:
        t_capture.remove()
    res.model = res.model.release().eval()
    return res
