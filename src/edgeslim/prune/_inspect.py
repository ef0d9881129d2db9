"""What structured and mask pruning need to know about a model: the modules a config's globs name, its output
layer, which module a failing forward pass failed in, and whether pruning emptied a layer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from edgeslim.core.counting import call
from edgeslim.core.errors import EdgeslimError, ModelError
from edgeslim.core.modules import select


def match_modules(model: nn.Module, patterns: Iterable[str], field: str) -> dict[str, nn.Module]:
    """Modules whose names match any of ``patterns`` (``PruneConfig.<field>`` globs; none: an empty dict).

    Raises:
        ConfigError: a glob matches no module (the message names the field and the nearest names).
    """
    patterns = tuple(patterns)
    return dict(select(model, patterns, owner="PruneConfig", fields=(field, "skip"))) if patterns else {}


def layer_ratios(model: nn.Module, cfg: Any) -> dict[str, float]:
    """``PruneConfig.layer_ratios`` resolved to module names (a later glob overrides an earlier one)."""
    out: dict[str, float] = {}
    for pat, r in cfg.layer_ratios.items():
        for n in match_modules(model, [pat], "layer_ratios"):
            out[n] = float(r)
    return out


def weighted(modules: Any) -> list[nn.Module]:
    """The Conv/Linear modules among ``modules``."""
    return [m for m in modules if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]


def executed(model: nn.Module, example_inputs: Any, modules: list[nn.Module]) -> list[nn.Module]:
    """Those of ``modules`` that run as modules in one no-grad eval forward pass, in the order they ran."""
    ran: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: ran.append(mod)) for m in modules]
    try:
        with torch.no_grad():
            call(model.eval(), example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return ran


def output_layer(model: nn.Module, example_inputs: Any) -> str | None:
    """Name of the last Conv/Linear executed in a forward pass (the classifier of an ordinary model)."""
    ran = executed(model, example_inputs, weighted(model.modules()))
    names = {id(m): n for n, m in model.named_modules()}
    return names[id(ran[-1])] if ran else None


def output_layers(model: nn.Module, example_inputs: Any) -> list[str]:
    """The layers that define the model's output layout, to keep at their width.

    * ``model.edgeslim_output_layers`` (module-name globs), when the model declares it;
    * a detector (``model.edgeslim_task == "detect"``): every Conv/Linear with a path to an output tensor that
      crosses no other Conv/Linear (the class-logit and box convs of every head level), found on the autograd
      graph of one forward pass;
    * otherwise the last Conv/Linear executed (:func:`output_layer`, the classifier).
    """
    declared = getattr(model, "edgeslim_output_layers", None)
    if declared:
        return sorted(match_modules(model, list(declared), f"{type(model).__name__}.edgeslim_output_layers"))
    if getattr(model, "edgeslim_task", None) == "detect":
        return terminal_layers(model, example_inputs)
    name = output_layer(model, example_inputs)
    return [name] if name else []


def terminal_layers(model: nn.Module, example_inputs: Any) -> list[str]:
    """Names of the Conv/Linear layers whose outputs reach a model output without crossing another Conv/Linear."""
    mods = weighted(model.modules())
    names = {id(m): n for n, m in model.named_modules()}
    made: dict[Any, nn.Module] = {}  # output grad_fn -> layer (the dict keeps the grad_fn objects alive)

    def hook(mod: nn.Module, inputs: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            made[out.grad_fn] = mod

    hooks = [m.register_forward_hook(hook) for m in mods]
    was = model.training
    try:
        model.eval()
        with torch.enable_grad():
            out = call(model, example_inputs)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    tensors = [t for t in _flat(out) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    found: dict[str, None] = {}
    seen: set[int] = set()
    stack = [t.grad_fn for t in tensors]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        if fn in made:
            found[names[id(made[fn])]] = None
            continue
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return sorted(found)


def _flat(out: Any) -> list:
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat(o)]
    return [out]


@contextlib.contextmanager
def blame_module(model: nn.Module, what: str, *, exact: bool = True):
    """Turn an exception inside a forward pass into a ModelError naming the module that raised it.

    With ``exact=False`` (graph tracing, whose errors can come after a module ran) the module is named as
    the last one entered.
    """
    stack: list[str] = []
    names = {id(m): n or type(model).__name__ for n, m in model.named_modules()}

    def enter(mod, args):
        stack.append(names.get(id(mod), type(mod).__name__))

    def leave(mod, args, out):
        if stack:
            stack.pop()

    hooks = []
    for m in model.modules():
        hooks.append(m.register_forward_pre_hook(enter))
        hooks.append(m.register_forward_hook(leave))
    try:
        yield
    except EdgeslimError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the module named
        where = stack[-1] if stack else type(model).__name__
        at = f"in module {where!r}" if exact else f"at or after module {where!r} (the last one entered)"
        msg = str(e).splitlines()[0][:300] if str(e) else ""
        raise ModelError(f"{what} failed {at} ({type(e).__name__}: {msg})") from e
    finally:
        for h in hooks:
            h.remove()


def check_not_empty(model: nn.Module) -> None:
    """Raise naming the first layer left with zero channels/features."""
    for n, m in model.named_modules():
        sizes = []
        if isinstance(m, nn.modules.conv._ConvNd):
            sizes = [m.in_channels, m.out_channels]
        elif isinstance(m, nn.Linear):
            sizes = [m.in_features, m.out_features]
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            sizes = [m.num_features]
        if any(s == 0 for s in sizes):
            raise ModelError(
                f"pruning would remove every channel of module {n!r} ({type(m).__name__}); "
                "lower the ratio or the layer's entry in layer_ratios"
            )
