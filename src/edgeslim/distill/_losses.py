"""Distillation losses (registry ``LOSSES``): logit, feature-map and relation based.

Every loss is ``fn(ctx) -> scalar`` over a :class:`LossContext` holding student/teacher logits, the paired
intermediate features and the learned adapters; :func:`distill` sums them with the config's weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from edgeslim.core.registry import Registry


@dataclass
class LossContext:
    """What a distillation loss sees for one batch."""

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor
    targets: torch.Tensor
    temperature: float
    student_feats: list[torch.Tensor] = field(default_factory=list)
    teacher_feats: list[torch.Tensor] = field(default_factory=list)
    adapters: nn.ModuleList | None = None


LossFnT = Callable[[LossContext], torch.Tensor]
LOSSES: Registry[LossFnT] = Registry("distillation loss")
FEATURE_LOSSES = frozenset({"hint", "attention", "hidden_state", "attention_map"})


def _hidden(t: torch.Tensor | tuple) -> torch.Tensor:
    return t[0] if isinstance(t, (tuple, list)) else t


def make_adapter(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> nn.Module:
    """A learned map from a student feature to the teacher's width: 1×1 conv for maps, linear otherwise."""
    s, t = _hidden(student_feat), _hidden(teacher_feat)
    if s.ndim == 4:
        return nn.Conv2d(s.shape[1], t.shape[1], 1, bias=False)
    return nn.Linear(s.shape[-1], t.shape[-1], bias=False)


def _match_spatial(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if s.ndim == 4 and s.shape[-2:] != t.shape[-2:]:
        return F.adaptive_avg_pool2d(s, t.shape[-2:])
    return s


def _pairs(ctx: LossContext):
    return zip(ctx.student_feats, ctx.teacher_feats, strict=True)


@LOSSES.register("kd")
def kd(ctx: LossContext) -> torch.Tensor:
    """Hinton KD: KL(teacher ‖ student) of temperature-softened distributions, times T²."""
    t = ctx.temperature
    return (
        F.kl_div(
            F.log_softmax(ctx.student_logits / t, -1),
            F.log_softmax(ctx.teacher_logits / t, -1),
            reduction="batchmean",
            log_target=True,
        )
        * t
        * t
    )


@LOSSES.register("hint")
def hint(ctx: LossContext) -> torch.Tensor:
    """FitNets: MSE between the adapted student feature and the teacher feature, per layer pair."""
    losses = []
    for i, (s, t) in enumerate(_pairs(ctx)):
        s, t = _hidden(s), _hidden(t)
        a = ctx.adapters[i](s) if ctx.adapters is not None else s
        losses.append(F.mse_loss(_match_spatial(a, t), t))
    return torch.stack(losses).mean()


LOSSES.register("hidden_state")(hint)  # transformers: the same with linear adapters on (B, L, H) states


def _at(f: torch.Tensor) -> torch.Tensor:
    return F.normalize(f.pow(2).mean(1).flatten(1), dim=1)


@LOSSES.register("attention")
def attention(ctx: LossContext) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis): match normalised channel-energy maps of CNN features."""
    losses = []
    for s, t in _pairs(ctx):
        s, t = _hidden(s), _hidden(t)
        losses.append((_at(_match_spatial(s, t)) - _at(t)).pow(2).mean())
    return torch.stack(losses).mean()


@LOSSES.register("attention_map")
def attention_map(ctx: LossContext) -> torch.Tensor:
    """Transformer attention maps: KL between teacher and student attention probabilities (heads averaged).

    The paired modules must return ``(hidden, attention_probs, ...)`` (Hugging Face self-attention with
    ``attn_implementation="eager"`` and ``output_attentions=True``).
    """
    losses = []
    for s, t in _pairs(ctx):
        if not (isinstance(s, (tuple, list)) and len(s) > 1 and s[1] is not None and s[1].ndim == 4):
            raise ValueError(
                "attention_map: the paired module did not return attention probabilities; load the "
                "model with attn_implementation='eager' and call it with output_attentions=True"
            )
        ps, pt = s[1].mean(1), t[1].mean(1)
        losses.append(F.kl_div(ps.clamp_min(1e-8).log(), pt, reduction="batchmean"))
    return torch.stack(losses).mean()


def _relation_inputs(ctx: LossContext) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if ctx.student_feats:
        return [(_hidden(s).flatten(1), _hidden(t).flatten(1)) for s, t in _pairs(ctx)]
    return [(ctx.student_logits, ctx.teacher_logits)]


def _pdist(e: torch.Tensor) -> torch.Tensor:
    d = torch.cdist(e, e)
    mean = d[d > 0].mean() if (d > 0).any() else d.new_tensor(1.0)
    return d / mean


@LOSSES.register("rkd")
def rkd(ctx: LossContext, distance_weight: float = 1.0, angle_weight: float = 2.0) -> torch.Tensor:
    """Relational KD (Park et al.): smooth-L1 on normalised pairwise distances plus on triplet angles."""
    out = []
    for s, t in _relation_inputs(ctx):
        with torch.no_grad():
            td = _pdist(t.float())
        dist = F.smooth_l1_loss(_pdist(s.float()), td)

        def angles(e: torch.Tensor) -> torch.Tensor:
            v = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
            return torch.bmm(v, v.transpose(1, 2)).flatten()

        with torch.no_grad():
            ta = angles(t.float())
        ang = F.smooth_l1_loss(angles(s.float()), ta)
        out.append(distance_weight * dist + angle_weight * ang)
    return torch.stack(out).mean()


@LOSSES.register("similarity")
def similarity(ctx: LossContext) -> torch.Tensor:
    """Similarity-preserving KD (Tung & Mori): match row-normalised batch Gram matrices."""
    out = []
    for s, t in _relation_inputs(ctx):
        gs = F.normalize(s @ s.t(), dim=1)
        gt = F.normalize(t @ t.t(), dim=1)
        out.append((gs - gt).pow(2).sum() / (s.shape[0] ** 2))
    return torch.stack(out).mean()
