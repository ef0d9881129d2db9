"""``distill(student, teacher, DistillConfig, *, data=(train, val))`` on top of :func:`edgeslim.train.fit`."""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from edgeslim.core import recipe as _recipe
from edgeslim.core.errors import ConfigError, DataError, ModelError, near
from edgeslim.core.verbs import check_config
from edgeslim.distill._config import DistillConfig
from edgeslim.distill._losses import FEATURE_LOSSES, LOSSES, LossContext, make_adapter
from edgeslim.train import TrainConfig, fit

log = logging.getLogger(__name__)

ADAPTED = frozenset({"hint", "hidden_state"})


class _Shared:
    """Holds the frozen teacher and its cache; deep copies share it (fit copies the model it trains)."""

    def __init__(self, teacher: nn.Module) -> None:
        self.teacher = teacher
        self.cache: dict[str, Any] | None = None

    def __deepcopy__(self, memo: dict) -> _Shared:
        return self


def _module(model: nn.Module, name: str, who: str) -> nn.Module:
    mods = dict(model.named_modules())
    if name not in mods:
        names = [n for n in mods if n]
        raise ConfigError(
            f"{who} has no module {name!r}{near(name, names)}; "
            f"some valid names: {', '.join(names[:12])}{' …' if len(names) > 12 else ''}"
        )
    return mods[name]


def _run_capture(model: nn.Module, x: torch.Tensor, names: tuple[str, ...], who: str):
    """Forward ``x`` and return (output, [outputs of the named modules]) via temporary forward hooks."""
    feats: dict[str, Any] = {}
    handles = [
        _module(model, n, who).register_forward_hook(lambda m, i, o, n=n: feats.__setitem__(n, o)) for n in names
    ]
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, [feats[n] for n in names]


def _detach(o):
    if isinstance(o, (tuple, list)):
        return type(o)(_detach(v) for v in o)
    return o.detach() if isinstance(o, torch.Tensor) else o


def _to(o, device):
    if isinstance(o, (tuple, list)):
        return type(o)(_to(v, device) for v in o)
    return o.to(device) if isinstance(o, torch.Tensor) else o


class _Distiller(nn.Module):
    """Student plus learned adapters; in training ``forward(x, y, idx)`` returns ``(loss, student_logits)``."""

    def __init__(self, student: nn.Module, shared: _Shared, config: DistillConfig, adapters: nn.ModuleList) -> None:
        super().__init__()
        self.student = student
        self.adapters = adapters
        self._shared = shared
        self._config = config

    def _teacher_out(self, x: torch.Tensor, idx: torch.Tensor | None):
        cache = self._shared.cache
        if cache is not None and idx is not None:
            idx = idx.cpu()
            feats = [_to(_index(f, idx), x.device) for f in cache["feats"]]
            return cache["logits"][idx].to(x.device), feats
        teacher = self._shared.teacher
        if next(teacher.parameters()).device != x.device:
            teacher.to(x.device)
        with torch.no_grad():
            out, feats = _run_capture(teacher, x, self._config.teacher_layers, "teacher")
        return _detach(out), _detach(feats)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, idx: torch.Tensor | None = None):
        if y is None:
            return self.student(x)
        cfg = self._config
        s_out, s_feats = _run_capture(self.student, x, cfg.student_layers, "student")
        t_out, t_feats = self._teacher_out(x, idx)
        ctx = LossContext(s_out, t_out, y, cfg.temperature, s_feats, t_feats, self.adapters)
        loss = cfg.hard_weight * F.cross_entropy(s_out, y) if cfg.hard_weight else s_out.new_zeros(())
        for i, name in enumerate(cfg.losses):
            w = cfg.weight_of(i)
            if w:
                loss = loss + w * LOSSES.get(name)(ctx)
        return loss, s_out


def _index(f, idx):
    if isinstance(f, (tuple, list)):
        return type(f)(_index(v, idx) for v in f)
    return f[idx] if isinstance(f, torch.Tensor) else f


def _fingerprint(teacher: nn.Module, train, config: DistillConfig) -> str:
    h = hashlib.sha1()
    for k, v in teacher.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    raw = getattr(train, "images", None)  # image sets: raw pixels + normalisation; others (token ids): the inputs
    h.update((raw if raw is not None else train.normalized()).contiguous().numpy().tobytes())
    h.update(repr((getattr(train, "mean", None), getattr(train, "std", None), config.teacher_layers)).encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def _teacher_cache(
    teacher: nn.Module, train, config: DistillConfig, device, cache_dir: Path | None, batch_size: int = 256
) -> dict[str, Any]:
    key = _fingerprint(teacher, train, config)
    path = cache_dir / f"teacher-{key}.pt" if cache_dir else None
    if path is not None and path.is_file():
        log.info("teacher outputs loaded from cache %s", path)
        return torch.load(path, weights_only=True)
    teacher.to(device)
    x_all = train.normalized()
    logits, feats = [], []
    for i in range(0, len(train), batch_size):
        out, f = _run_capture(teacher, x_all[i : i + batch_size].to(device), config.teacher_layers, "teacher")
        logits.append(out.cpu())
        feats.append([_to(_detach(v), "cpu") for v in f])
    cache = {
        "key": key,
        "logits": torch.cat(logits),
        "feats": [_cat([b[j] for b in feats], name) for j, name in enumerate(config.teacher_layers)],
    }
    if path is not None:
        from edgeslim.core.io import save_torch

        save_torch(cache, path, force=True)
    return cache


def _cat(parts, name: str = ""):
    if isinstance(parts[0], (tuple, list)):
        return type(parts[0])(_cat([p[k] for p in parts], name) for k in range(len(parts[0])))
    if not isinstance(parts[0], torch.Tensor):
        return parts[0]
    shapes = {tuple(p.shape[1:]) for p in parts}
    if len(shapes) > 1:
        raise ModelError(
            f"distill: teacher feature {name!r} changes shape between batches ({sorted(shapes)[:3]}), "
            "e.g. token sequences padded per batch; pad the inputs to one length or set "
            "DistillConfig(cache_teacher=False)"
        )
    return torch.cat(parts)


@dataclass
class DistillReport:
    """What one :func:`distill` call did: the losses, the teacher, the training history and the best accuracy."""

    technique: ClassVar[str] = "distill"
    losses: list[str]
    teacher: str
    epochs: int
    steps_per_epoch: int | None
    best_accuracy: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    stopped_at_step: int | None = None
    metric: str = "accuracy"

    def to_dict(self) -> dict[str, Any]:
        return {"technique": self.technique, **self.__dict__}

    def summary(self) -> str:
        acc = (
            f", best validation {self.metric} {self.best_accuracy:.4f}"
            if self.best_accuracy == self.best_accuracy and self.best_accuracy > 0
            else ", no validation data"
        )
        cap = f" (at most {self.steps_per_epoch} steps each)" if self.steps_per_epoch else ""
        return (
            f"distill ({' + '.join(self.losses)}) from {self.teacher}: {self.epochs} epoch(s){cap}{acc}, "
            f"{self.seconds:.1f} s"
        )


@_recipe.STEPS.register("distill")
def _replay_step(model: nn.Module, step: dict) -> nn.Module:
    return model  # distillation changes values only; the state_dict carries them


def distill(
    student: nn.Module,
    teacher: nn.Module,
    config: DistillConfig = DistillConfig(),
    *,
    data: tuple[Any, Any],
    train_config: Any = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    device: str | torch.device = "cpu",
    max_steps_per_epoch: int | None = None,
    stop: Callable[[], bool] | None = None,
) -> nn.Module:
    """Train a copy of ``student`` to imitate a frozen copy of ``teacher``; returns the new student.

    The trainer is :func:`edgeslim.train.fit` (progress, per-epoch evaluation, checkpoint/resume, early stop
    via ``train_config.patience``, seeding, torchrun/DDP). Neither input model is modified.

    Teacher outputs (logits and the ``teacher_layers`` features) are computed once and reused when
    ``config.cache_teacher`` is on and ``train_config.augment`` is off. The cache is keyed by a SHA-1 of the
    teacher's state_dict, the training images and their normalisation, and the teacher layer names; with
    ``checkpoint_dir`` it is also stored there as ``teacher-<key>.pt`` and reused by later runs; the training
    checkpoints go to ``checkpoint_dir/run-<hash of config and student architecture>/`` so a rerun resumes.

    Under torchrun each rank computes the losses on its shard of the global batch: per-sample losses (``kd``,
    ``hint``, ``attention``, ...) then give the single-process gradients, while the batch-relational ``rkd``
    and ``similarity`` see only the shard's samples and so differ from a single-process run.

    Detectors (``edgeslim_task == "detect"``, output ``[B, A, 4 + C]``) are trained by
    :func:`edgeslim.train.train_detector` with a :class:`~edgeslim.train.DetectTrainConfig`: ``kd`` distils the
    sigmoid class scores and the boxes the teacher is confident about, ``hint`` / ``attention`` the paired feature
    maps (a layer may return a list of maps, e.g. a neck's levels), ``hard_weight`` weighs the ground-truth
    detection loss; the teacher runs on every augmented batch (no cache). ``report.best_accuracy`` is then the
    best validation mAP@[.5:.95].

    Args:
        data: ``(train, val)`` datasets; ``val`` may be None. Image sets (:class:`~edgeslim.data.ImageDataset`) or
            any set with ``__len__``, ``labels``, ``normalized()`` (all inputs as one tensor, e.g. token ids),
            ``take(n)`` and ``batches(size)``; the models then get slices of ``normalized()`` as input.
        train_config: epochs, batch size, learning rate, augmentation, patience, seed (a ``TrainConfig``; default
            ``TrainConfig()``, or ``DetectTrainConfig()`` for detectors).
        stop: asked before every step (e.g. a deadline); True ends training there (``fit``'s ``stop``), and
            ``report.stopped_at_step`` says at which step.

    Raises:
        DataError: empty training data.
        ModelError: student and teacher outputs differ in shape, or cached teacher features change shape between
            batches (sequences padded per batch: pad to one length or turn ``cache_teacher`` off).
        ConfigError: unknown layer names (with the nearest valid names) or bad settings.
    """
    check_config(config, DistillConfig, "distill")
    _recipe.check_next(student, "distill")
    t0 = time.perf_counter()
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise DataError("distill: data= must be a pair (train, val); val may be None")
    train, val = data
    if train is None or len(train) == 0:
        raise DataError("distill: training dataset is empty")
    if getattr(student, "edgeslim_task", None) == "detect":
        return _distill_detector(
            student, teacher, config, train, val, train_config, checkpoint_dir, resume, progress, max_steps_per_epoch,
            stop, t0,
        )  # fmt: skip
    if train_config is None:
        train_config = TrainConfig()
    elif not isinstance(train_config, TrainConfig):
        raise ConfigError(f"distill: train_config must be a TrainConfig (got {type(train_config).__name__})")
    student = copy.deepcopy(student).cpu()
    teacher = copy.deepcopy(teacher).cpu().eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    for n in config.student_layers:
        _module(student, n, "student")
    for n in config.teacher_layers:
        _module(teacher, n, "teacher")
    probe = train.take(min(2, len(train))).normalized()
    with torch.no_grad():
        was = student.training
        student.eval()
        s_out, s_feats = _run_capture(student, probe, config.student_layers, "student")
        student.train(was)
        t_out, t_feats = _run_capture(teacher, probe, config.teacher_layers, "teacher")
    if not isinstance(s_out, torch.Tensor) or not isinstance(t_out, torch.Tensor) or s_out.shape != t_out.shape:
        raise ModelError(
            f"distill: student output shape {tuple(getattr(s_out, 'shape', ()))} does not match "
            f"teacher output shape {tuple(getattr(t_out, 'shape', ()))}; both must return logits "
            "over the same classes"
        )
    adapters = nn.ModuleList()
    if ADAPTED & set(config.losses):
        adapters.extend(make_adapter(s, t) for s, t in zip(s_feats, t_feats, strict=True))
    shared = _Shared(teacher)
    ck = Path(checkpoint_dir) if checkpoint_dir else None
    if config.cache_teacher and not train_config.augment:
        shared.cache = _teacher_cache(teacher, train, config, torch.device(device), ck)
    elif config.cache_teacher:
        log.info("teacher outputs not cached: augmentation changes the inputs every epoch")
    torch.manual_seed(train_config.seed)
    wrapper = _Distiller(student, shared, config, adapters)
    run_dir = None
    if ck is not None:  # one resumable run per (distill config, student architecture); the teacher cache is shared
        tag = hashlib.sha1((config.to_yaml() + repr(student)).encode()).hexdigest()[:12]
        run_dir = ck / f"run-{tag}"
    res = fit(
        wrapper,
        train,
        val,
        train_config,
        checkpoint_dir=run_dir,
        resume=resume,
        progress=progress,
        device=device,
        max_steps_per_epoch=max_steps_per_epoch,
        step_fn=lambda m, x, y, idx: m(x, y, idx),
        stop=stop,
    )
    out = res.model.student.eval()
    out.distill_history = res.history  # type: ignore[attr-defined]
    out.report = DistillReport(
        list(config.losses),
        type(teacher).__name__,
        train_config.epochs,
        max_steps_per_epoch,
        float(res.best_accuracy),
        res.history,
        round(time.perf_counter() - t0, 2),
        res.stopped_at_step,
    )
    return _recipe.record(out, "distill", config, {}, out.report, previous=student)


def _distill_detector(
    student, teacher, config, train, val, train_config, checkpoint_dir, resume, progress, max_steps_per_epoch, stop, t0
) -> nn.Module:
    from edgeslim.distill._detect import distill_detector
    from edgeslim.train import DetectTrainConfig

    res = distill_detector(
        student,
        teacher,
        config,
        train,
        val,
        DetectTrainConfig() if train_config is None else train_config,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        progress=progress,
        max_steps_per_epoch=max_steps_per_epoch,
        stop=stop,
    )
    out = res.model
    out.distill_history = res.history  # type: ignore[attr-defined]
    epochs = len(res.history)
    out.report = DistillReport(
        list(config.losses),
        type(teacher).__name__,
        epochs,
        max_steps_per_epoch,
        float(res.best_map) if val is not None else float("nan"),
        res.history,
        round(time.perf_counter() - t0, 2),
        res.stopped_at_step,
        "mAP@[.5:.95]",
    )
    return _recipe.record(out, "distill", config, {}, out.report, previous=student)


def kd_loss_fn(teacher: nn.Module, config: DistillConfig = DistillConfig()):
    """A ``loss_fn(outputs, targets, inputs)`` callback for ``fit``/QAT that adds logit distillation.

    Only logit losses (``kd``, and ``rkd``/``similarity`` on logits) are allowed; the trainer adds the
    hard-label cross-entropy itself. The teacher is copied and frozen.
    """
    bad = [n for n in config.losses if n in FEATURE_LOSSES] or (["layers"] if config.student_layers else [])
    if bad:
        raise ConfigError(f"kd_loss_fn supports logit losses only (kd, rkd, similarity without layers), got {bad[0]!r}")
    teacher = copy.deepcopy(teacher).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def loss_fn(outputs: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        if next(teacher.parameters()).device != inputs.device:
            teacher.to(inputs.device)
        with torch.no_grad():
            t = teacher(inputs)
        if t.shape != outputs.shape:
            raise ModelError(
                f"kd_loss_fn: student output shape {tuple(outputs.shape)} does not match teacher "
                f"output shape {tuple(t.shape)}"
            )
        ctx = LossContext(outputs, t, targets, config.temperature)
        return sum(config.weight_of(i) * LOSSES.get(n)(ctx) for i, n in enumerate(config.losses))

    return loss_fn
