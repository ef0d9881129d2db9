"""Low-rank factorization: SVD of Linear and conv layers, spatial SVD (kx1 then 1xk), depthwise-separable.

Every replaced layer becomes an ``nn.Sequential`` of two layers at the same name (``fc`` -> ``fc.0``, ``fc.1``);
to reload weights, replay the verb with the same config on a fresh model, then load the state_dict.

Ranks, per layer:
- ``svd`` on ``Linear(in, out)``: ``Linear(in, r) -> Linear(r, out)``; on ``Conv2d`` kxk (including 1x1):
  ``Conv2d(in, r, kxk) -> Conv2d(r, out, 1x1)`` (channel decomposition). Rank at most ``min(out, in*k*k)``.
- ``spatial_svd`` on ``Conv2d`` kxk with k > 1: ``Conv2d(in, r, kx1) -> Conv2d(r, out, 1xk)``, from the SVD of
  the weight arranged as ``(in*kh, out*kw)``. Rank at most ``min(in*kh, out*kw)``.
MACs per output position: Linear ``r*(in+out)`` vs ``in*out``; channel SVD ``r*(in*kh*kw + out)``; spatial SVD
``r*(in*kh*sw + out*kw)`` vs ``out*in*kh*kw`` (``sw``: horizontal stride, the kx1 layer runs on every column).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgeslim.core import recipe as _recipe
from edgeslim.core.config import Config, StrEnum, renamed
from edgeslim.core.counting import count_macs, count_params
from edgeslim.core.errors import ConfigError
from edgeslim.core.masks import mask_of, strip_masks
from edgeslim.core.modules import select, set_module
from edgeslim.core.verbs import check_config
from edgeslim.share._common import ShareReport, check_patterns, example_batch

log = logging.getLogger(__name__)


class FactorizeMethod(StrEnum):
    """``svd``: two-layer low-rank SVD of Linear and conv layers; ``spatial_svd``: kxk conv -> kx1 then 1xk."""

    SVD = "svd"
    SPATIAL_SVD = "spatial_svd"


@dataclass(frozen=True)
class FactorizeConfig(Config):
    """Low-rank factorization settings; give one of ``energy``, ``mac_ratio`` or ``rank`` (default energy 0.9).

    Attributes:
        method: ``svd`` or ``spatial_svd`` (see :class:`FactorizeMethod`).
        energy: the smallest rank keeping this fraction of the squared singular values, in (0, 1].
        mac_ratio: the largest rank whose MACs are at most this fraction of the layer's, in (0, 1].
        rank: the same rank for every layer.
        layers: names or fnmatch patterns of layers to factorize (default: every layer the method applies to;
            named layers it cannot factorize are an error).
        exclude: names or patterns of layers to leave as they are (``skip`` is its old name, deprecated).
    """

    kind = "factorize"
    method: FactorizeMethod = FactorizeMethod.SVD
    energy: float | None = None
    mac_ratio: float | None = None
    rank: int | None = None
    layers: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    skip: tuple[str, ...] = renamed("exclude")

    def __post_init__(self) -> None:
        if self.energy is None and self.mac_ratio is None and self.rank is None:
            object.__setattr__(self, "energy", 0.9)
        super().__post_init__()

    def validate(self) -> None:
        given = [f for f in ("energy", "mac_ratio", "rank") if getattr(self, f) is not None]
        if len(given) > 1:
            raise self._bad(given[1], f"give one of energy, mac_ratio or rank (also got {given[0]})")
        for f in ("energy", "mac_ratio"):
            v = getattr(self, f)
            if v is not None and not 0.0 < v <= 1.0:
                raise self._bad(f, "must be in (0, 1]")
        if self.rank is not None and self.rank < 1:
            raise self._bad("rank", "must be >= 1")
        check_patterns(self, "layers", "exclude")


def _why_not(m: nn.Module, method: FactorizeMethod) -> str | None:
    """Why the layer cannot be factorized by ``method``, or None."""
    if isinstance(m, nn.Linear):
        return (
            "spatial_svd applies to kxk convolutions, not Linear (use method='svd')"
            if (method == FactorizeMethod.SPATIAL_SVD)
            else None
        )
    if _dense_type(m) is not nn.Conv2d:
        return f"{type(m).__name__} is not a Linear or Conv2d layer"
    if m.groups != 1:
        return f"grouped/depthwise convolution (groups={m.groups})"
    if isinstance(m.padding, str) or m.padding_mode != "zeros":
        return f"padding={m.padding!r}, padding_mode={m.padding_mode!r} (needs numeric zero padding)"
    if method == FactorizeMethod.SPATIAL_SVD and min(m.kernel_size) < 2:
        return f"kernel {m.kernel_size[0]}x{m.kernel_size[1]} has no kxk spatial extent to split (use method='svd')"
    return None


def _matrix(m: nn.Module, method: FactorizeMethod) -> tuple[torch.Tensor, float, float]:
    """The matrix to decompose and the MAC cost (per output position) of the layer and of one rank unit."""
    w = m.weight.detach().double()
    if isinstance(m, nn.Linear):
        out, inp = w.shape
        return w, out * inp, inp + out
    out, inp, kh, kw = w.shape
    if method == FactorizeMethod.SVD:
        return w.reshape(out, inp * kh * kw), out * inp * kh * kw, inp * kh * kw + out
    return w.permute(1, 2, 0, 3).reshape(inp * kh, out * kw), out * inp * kh * kw, inp * kh * m.stride[1] + out * kw


def min_mac_ratio(m: nn.Module, method: FactorizeMethod | str = FactorizeMethod.SVD) -> float | None:
    """The smallest ``mac_ratio`` layer ``m`` can be factorized to by ``method`` (its MACs at rank 1 over its
    own), or None when the method does not apply to it. A ``mac_ratio`` below it needs rank < 1 (an error)."""
    method = FactorizeMethod(method)
    if _why_not(m, method) is not None:
        return None
    _, cost, unit = _matrix(m, method)
    return unit / cost


def _choose_rank(name: str, s: torch.Tensor, cost: float, unit: float, config: FactorizeConfig) -> int:
    full = len(s)
    if config.rank is not None:
        if config.rank > full:
            raise ConfigError(
                f"FactorizeConfig.rank={config.rank} is out of range for layer {name!r}: its rank is at "
                f"most {full}; use a rank in [1, {full}] or skip the layer"
            )
        return config.rank
    if config.mac_ratio is not None:
        r = math.floor(config.mac_ratio * cost / unit)
        if r < 1:
            raise ConfigError(
                f"FactorizeConfig.mac_ratio={config.mac_ratio} needs rank < 1 for layer {name!r}: the "
                f"smallest reachable ratio there is {unit / cost:.3g}; raise mac_ratio or skip the layer"
            )
        return min(r, full)
    e = (s**2).cumsum(0) / max(float((s**2).sum()), 1e-300)
    return min(int((e < config.energy - 1e-9).sum()) + 1, full)


def _two_layers(m: nn.Module, method: FactorizeMethod, a: torch.Tensor, b: torch.Tensor, r: int) -> nn.Sequential:
    """Layers computing ``m`` with the rank-r factors: matrix ~= a @ b, a: (rows, r), b: (r, cols)."""
    bias = m.bias is not None
    if isinstance(m, nn.Linear):
        first, second = nn.Linear(m.in_features, r, bias=False), nn.Linear(r, m.out_features, bias=bias)
        w1, w2 = b, a
    elif method == FactorizeMethod.SVD:
        first = nn.Conv2d(m.in_channels, r, m.kernel_size, m.stride, m.padding, m.dilation, bias=False)
        second = nn.Conv2d(r, m.out_channels, 1, bias=bias)
        w1, w2 = b.reshape(r, m.in_channels, *m.kernel_size), a.reshape(m.out_channels, r, 1, 1)
    else:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = m.kernel_size, m.stride, m.padding, m.dilation
        first = nn.Conv2d(m.in_channels, r, (kh, 1), (sh, 1), (ph, 0), (dh, 1), bias=False)
        second = nn.Conv2d(r, m.out_channels, (1, kw), (1, sw), (0, pw), (1, dw), bias=bias)
        w1 = a.reshape(m.in_channels, kh, r).permute(2, 0, 1).reshape(r, m.in_channels, kh, 1)
        w2 = b.reshape(r, m.out_channels, kw).permute(1, 0, 2).reshape(m.out_channels, r, 1, kw)
    dtype = m.weight.dtype
    with torch.no_grad():
        first.weight.copy_(w1.to(dtype))
        second.weight.copy_(w2.to(dtype))
        if bias:
            second.bias.copy_(m.bias.detach())
    return nn.Sequential(first, second).train(m.training)


def _finish(model: nn.Module, report: ShareReport, before: int, x: torch.Tensor | None, original: nn.Module) -> None:
    report.totals = {"params_before": before, "params_after": count_params(model)}
    if x is not None:
        report.totals.update(macs_before=count_macs(original, x), macs_after=count_macs(model, x))
    model.report = report


def _dense_type(m: nn.Module) -> type:
    """The layer's own class (a masked layer's class is a parametrized subclass of it)."""
    return type(m).__bases__[0] if mask_of(m) is not None else type(m)


def _bake_mask(m: nn.Module) -> dict[str, Any]:
    """Bake a pruning mask into ``m``'s weight in place; the report says the sparsity is not kept (the new
    layers are dense)."""
    mask = mask_of(m)
    if mask is None:
        return {}
    strip_masks(m)
    return {"mask_baked": f"was {1 - float(mask.float().mean()):.0%} sparse; the replacement layers are dense"}


def _skipped(report, config, name: str, why: str, action: str) -> bool:
    """Record a layer that cannot be changed: an error when the user named it, a report entry otherwise."""
    if not why:
        return False
    if config.layers:
        raise ConfigError(f"cannot {action}: {why}; remove it from layers or add it to skip")
    report.skip(name, why)
    return True


def factorize(
    model: nn.Module,
    config: FactorizeConfig = FactorizeConfig(),
    *,
    data: Any = None,
    example_inputs: torch.Tensor | None = None,
) -> nn.Module:
    """Replace Linear/conv layers by two low-rank layers (truncated SVD).

    Args:
        model: the model (not modified).
        config: the :class:`FactorizeConfig`.
        data: not used (the factorization reads the weights); accepted so every verb has the same shape.
        example_inputs: optional input batch; with it the report holds the model's MACs before and after.

    Returns:
        a new model with ``.report`` (a :class:`ShareReport`): per layer the rank, full rank, retained energy,
        params and MACs (per output position) before/after; layers made larger are flagged ``larger``.

    Raises:
        ConfigError: a named layer that cannot be factorized by the method (the message names it), a rank out of
            range, a mac_ratio that needs rank < 1, or a pattern that matches nothing.
    """
    check_config(config, FactorizeConfig, "factorize")
    _recipe.check_next(model, "factorize")
    src = model
    model = copy.deepcopy(model)
    method = FactorizeMethod(config.method)
    chosen = select(
        model,
        config.layers,
        config.exclude,
        lambda m: isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)),
        "Linear/Conv layer",
    )
    report = ShareReport("factorize", config.to_dict())
    before = count_params(model)
    for name, m in chosen:
        if _skipped(
            report, config, name, _why_not(m, method), f"factorize layer {name!r} with method={method.value!r}"
        ):
            continue
        sparse = _bake_mask(m)
        mat, cost, unit = _matrix(m, method)
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        r = _choose_rank(name, s, cost, unit, config)
        root = s[:r].sqrt()
        new = _two_layers(m, method, u[:, :r] * root, root[:, None] * vh[:r], r)
        set_module(model, name, new)
        p_before, p_after = m.weight.numel(), sum(l.weight.numel() for l in new)
        report.add(
            name,
            rank=r,
            full_rank=len(s),
            energy=round(float((s[:r] ** 2).sum() / (s**2).sum()), 6),
            params_before=p_before,
            params_after=p_after,
            mac_ratio=round(r * unit / cost, 4),
            larger=r * unit > cost,
            **sparse,
        )
        if r * unit > cost:
            log.warning(
                "factorize: %s at rank %d costs more MACs than the dense layer (%.2fx)", name, r, r * unit / cost
            )
    _finish(model, report, before, example_inputs, src)
    ranks = {row["name"]: row["rank"] for row in report.done()}
    return _recipe.record(model, "factorize", config, {"ranks": ranks}, report)


@_recipe.STEPS.register("factorize")
def _replay_factorize(model: nn.Module, step: dict) -> nn.Module:
    """Replace the recorded layers by low-rank pairs of the recorded ranks (values come from the state_dict)."""
    method = FactorizeMethod(step["config"].get("method", "svd"))
    for name, r in step.get("state", {}).get("ranks", {}).items():
        m = model.get_submodule(name)
        mat, _, _ = _matrix(m, method)
        set_module(model, name, _two_layers(m, method, torch.zeros(mat.shape[0], r), torch.zeros(r, mat.shape[1]), r))
    return model


class SeparableFit(StrEnum):
    """How the depthwise + pointwise pair is initialised: ``weights``: per input channel, the best rank-m
    approximation of its (out, kh*kw) filter slice (least squares on the weights); ``activations``: the same
    depthwise filters, then the pointwise layer and bias refit by least squares to the original layer's
    outputs on real data."""

    WEIGHTS = "weights"
    ACTIVATIONS = "activations"


@dataclass(frozen=True)
class SeparableConfig(Config):
    """Depthwise-separable replacement settings.

    Attributes:
        layers: names or fnmatch patterns of the standard kxk convolutions to replace (default: all of them;
            named layers that cannot be replaced are an error).
        exclude: names or patterns of layers to leave as they are (``skip`` is its old name, deprecated).
        multiplier: depthwise channel multiplier m (rank per input channel), 1..min(out, kh*kw).
        fit: ``weights`` or ``activations`` (see :class:`SeparableFit`; ``activations`` needs ``data``).
        samples: input samples drawn from ``data`` for the ``activations`` fit.
        max_positions: output positions (samples x pixels) used per layer in the least-squares fit.
        seed: seed of the sample and position draws.
    """

    kind = "separable"
    layers: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    skip: tuple[str, ...] = renamed("exclude")
    multiplier: int = 1
    fit: SeparableFit = SeparableFit.WEIGHTS
    samples: int = 256
    max_positions: int = 50000
    seed: int = 0

    def validate(self) -> None:
        if self.multiplier < 1:
            raise self._bad("multiplier", "must be >= 1")
        if self.samples < 1:
            raise self._bad("samples", "must be >= 1")
        if self.max_positions < 1:
            raise self._bad("max_positions", "must be >= 1")
        check_patterns(self, "layers", "exclude")


def _why_not_separable(m: nn.Module) -> str | None:
    if _dense_type(m) is not nn.Conv2d:
        return f"{type(m).__name__} is not a Conv2d"
    if m.groups != 1:
        return f"already grouped/depthwise (groups={m.groups})"
    if m.kernel_size == (1, 1):
        return "1x1 convolution has no spatial filter to separate"
    if isinstance(m.padding, str) and m.padding != "valid" and m.stride != (1, 1):
        return f"padding={m.padding!r} with stride {m.stride}"
    return None


def _separate(m: nn.Conv2d, mult: int) -> nn.Sequential:
    """Depthwise (in -> in*mult, kxk, groups=in) + pointwise (in*mult -> out) fit to ``m``'s weights."""
    out, inp, kh, kw = m.weight.shape
    per_channel = m.weight.detach().double().permute(1, 0, 2, 3).reshape(inp, out, kh * kw)
    u, s, vh = torch.linalg.svd(per_channel, full_matrices=False)  # (inp, out, q), (inp, q), (inp, q, kh*kw)
    root = s[:, :mult].sqrt()
    dw_w = (root[..., None] * vh[:, :mult]).reshape(inp * mult, 1, kh, kw)
    pw_w = (u[:, :, :mult] * root[:, None, :]).permute(1, 0, 2).reshape(out, inp * mult, 1, 1)
    new = _separable_pair(m, mult)
    dw, pw = new[0], new[1]
    with torch.no_grad():
        dw.weight.copy_(dw_w.to(m.weight.dtype))
        pw.weight.copy_(pw_w.to(m.weight.dtype))
        if m.bias is not None:
            pw.bias.copy_(m.bias.detach())
    return new


def _separable_pair(m: nn.Conv2d, mult: int) -> nn.Sequential:
    """The depthwise (in -> in*mult, kxk) + pointwise (in*mult -> out) layers replacing ``m``, uninitialised."""
    out, inp, kh, kw = m.weight.shape
    dw = nn.Conv2d(
        inp, inp * mult, (kh, kw), m.stride, m.padding, m.dilation, groups=inp, bias=False, padding_mode=m.padding_mode
    )
    pw = nn.Conv2d(inp * mult, out, 1, bias=m.bias is not None)
    return nn.Sequential(dw, pw).train(m.training)


@torch.no_grad()
def _refit_pointwise(new: nn.Sequential, m: nn.Conv2d, x: torch.Tensor, max_positions: int, seed: int) -> float:
    """Least-squares refit of the pointwise weights (and bias) to ``m``'s outputs on its inputs ``x``."""
    y, mid = m(x), new[0](x)
    y = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1]).double()
    a = mid.permute(0, 2, 3, 1).reshape(-1, mid.shape[1]).double()
    if len(a) > max_positions:
        pick = torch.randperm(len(a), generator=torch.Generator().manual_seed(seed))[:max_positions]
        a, y = a[pick], y[pick]
    if new[1].bias is not None:
        a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
    reg = 1e-6 * float((a * a).mean()) * torch.eye(a.shape[1], dtype=a.dtype)
    sol = torch.linalg.solve(a.T @ a + reg, a.T @ y)  # (channels [+1], out)
    pw = new[1]
    pw.weight.copy_(sol[: pw.in_channels].T.reshape_as(pw.weight).to(pw.weight.dtype))
    if pw.bias is not None:
        pw.bias.copy_(sol[-1].to(pw.bias.dtype))
    err = y - a @ sol
    return float((err**2).sum() / max(float((y**2).sum()), 1e-30))


def separable(
    model: nn.Module,
    config: SeparableConfig = SeparableConfig(),
    *,
    data: Any = None,
    example_inputs: torch.Tensor | None = None,
) -> nn.Module:
    """Replace standard kxk convolutions by depthwise kxk + pointwise 1x1 pairs, initialised by least squares.

    Args:
        model: the model (not modified).
        config: the :class:`SeparableConfig`.
        data: real samples (an ImageDataset or a tensor); needed by ``fit="activations"``.
        example_inputs: optional input batch; with it the report holds the model's MACs before and after.

    Returns:
        a new model with ``.report`` (a :class:`ShareReport`): per layer the relative weight (or output) error
        and params/MACs before and after.

    Raises:
        ConfigError: a named layer that cannot be replaced (the message names it), a multiplier out of range,
            or a pattern that matches nothing. DataError: ``fit="activations"`` without data.
    """
    check_config(config, SeparableConfig, "separable")
    _recipe.check_next(model, "separable")
    src = model
    model = copy.deepcopy(model)
    chosen = select(
        model, config.layers, config.exclude, lambda m: isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)), "convolution"
    )
    report = ShareReport("separable", config.to_dict())
    before = count_params(model)
    inputs: dict[str, torch.Tensor] = {}
    if config.fit == SeparableFit.ACTIVATIONS:
        x = example_batch(data, config.samples, config.seed)
        targets = {n: src.get_submodule(n) for n, m in chosen if _why_not_separable(m) is None}
        hooks = [
            t.register_forward_hook(lambda mod, args, out, n=n: inputs.__setitem__(n, args[0].detach()))
            for n, t in targets.items()
        ]
        was = src.training
        try:
            src.eval()
            with torch.no_grad():
                src(x)
        finally:
            src.train(was)
            for h in hooks:
                h.remove()
    for name, m in chosen:
        if _skipped(report, config, name, _why_not_separable(m), f"make layer {name!r} depthwise-separable"):
            continue
        sparse = _bake_mask(m)
        out, inp, kh, kw = m.weight.shape
        if config.multiplier > min(out, kh * kw):
            raise ConfigError(
                f"SeparableConfig.multiplier={config.multiplier} is out of range for layer {name!r}: "
                f"at most min(out_channels={out}, kh*kw={kh * kw}) = {min(out, kh * kw)}"
            )
        new = _separate(m, config.multiplier)
        with torch.no_grad():
            dw, pw = new[0].weight.double(), new[1].weight.double()
            approx = torch.einsum(
                "ocm,cmhw->ochw", pw.reshape(out, inp, config.multiplier), dw.reshape(inp, config.multiplier, kh, kw)
            )
            w_err = float(((approx - m.weight.double()) ** 2).sum() / max(float((m.weight.double() ** 2).sum()), 1e-30))
        row: dict[str, Any] = {"weight_rel_error": round(w_err, 6)}
        if name in inputs:
            row["output_rel_error"] = round(
                _refit_pointwise(new, m, inputs[name], config.max_positions, config.seed), 6
            )
        set_module(model, name, new)
        unit = inp * config.multiplier * (kh * kw + out)
        report.add(
            name,
            **row,
            **sparse,
            params_before=m.weight.numel(),
            params_after=sum(l.weight.numel() for l in new),
            mac_ratio=round(unit / (out * inp * kh * kw), 4),
        )
    _finish(model, report, before, example_inputs, src)
    return _recipe.record(model, "separable", config, {"layers": [row["name"] for row in report.done()]}, report)


@_recipe.STEPS.register("separable")
def _replay_separable(model: nn.Module, step: dict) -> nn.Module:
    """Replace the recorded convolutions by depthwise + pointwise pairs (values come from the state_dict)."""
    mult = int(step["config"].get("multiplier", 1))
    for name in step.get("state", {}).get("layers", []):
        set_module(model, name, _separable_pair(model.get_submodule(name), mult))
    return model
