"""Depth pruning: remove whole residual blocks (``PruneMethod.BLOCK``).

A *residual block* is any submodule whose forward is ``tail(x + branch(x))`` for its single input ``x``: the skip
is the input itself (no projection), ``branch`` is anything, and ``tail`` is a chain of one-input ops after the
sum (a ReLU in ResNet's BasicBlock; nothing in MobileNetV2's inverted residual, timm's EfficientNet blocks or a
transformer's ``x + attn(x)`` written as a module). Removing the block means computing ``tail(x)`` instead: its
branch's layers no longer run at all, so the model launches fewer kernels. On small inputs, where the per-kernel
cost of a runtime dominates, this buys speed that channel pruning cannot (a MobileNetV2 at 28x28 with 75% of its
MACs removed by channels still runs every one of its 52 convolutions).

Blocks are found by tracing each submodule on its own with ``torch.fx`` (modules fx cannot trace, or whose skip
goes through a layer such as a strided projection, are not candidates and are listed). Which blocks go is decided
greedily on data: at each step every remaining block is tried out and the one whose removal moves the model's
output least (KL divergence of the softmax outputs from the unpruned model's, or mean squared error for a non-
classifier output) is removed (as in ShortGPT's block influence and "The Unreasonable Ineffectiveness of the Deeper
Layers", but measured end to end). The removal is recorded by module name, so a recipe replays it on a fresh model.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from edgeslim.core.counting import call
from edgeslim.core.errors import ConfigError, DataError, ModelError
from edgeslim.core.modules import get_module, set_module

log = logging.getLogger(__name__)

_ADD = (operator.add, operator.iadd, torch.add, "add", "add_")
#: one-input ops allowed after the residual sum (their removal would change the function, so they are kept)
_TAIL_FUNCS = (F.relu, F.relu6, F.gelu, F.silu, F.hardswish, torch.relu, torch.sigmoid, F.leaky_relu)
_TAIL_METHODS = ("relu", "relu_", "sigmoid", "contiguous")
_TAIL_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.LeakyReLU, nn.Identity, nn.Dropout)


def _is_add(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in _ADD[:3]) or (n.op == "call_method" and n.target in _ADD[3:])


def _tail_op(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_function":
        return n.target in _TAIL_FUNCS
    if n.op == "call_method":
        return n.target in _TAIL_METHODS
    if n.op == "call_module":
        return isinstance(gm.get_submodule(str(n.target)), _TAIL_MODULES)
    return False


def _residual(n: Any, x: fx.Node) -> bool:
    """Whether ``n`` is ``x`` plus branches: ``x + f(x)``, or ``(x + f(x)) + g(...)`` and so on (a transformer
    layer's two sums), every skip leading back to ``x`` through sums only."""
    if not isinstance(n, fx.Node) or not _is_add(n) or len(n.args) != 2 or n.kwargs:
        return False
    a, b = n.args
    return any(
        isinstance(s, fx.Node) and isinstance(o, fx.Node) and o is not x and (s is x or _residual(s, x))
        for s, o in ((a, b), (b, a))
    )


def _skip_graph(module: nn.Module) -> tuple[fx.GraphModule | None, str]:
    """The module with its branches removed (``tail(x)``) as a GraphModule, or None and why it is not a block."""
    import inspect

    try:  # optional arguments (an attention mask defaulting to None) are traced at their defaults
        params = list(inspect.signature(module.forward).parameters.values())
        concrete = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        gm = fx.symbolic_trace(module, concrete_args=concrete or None)
    except Exception as e:  # fx raises many types on untraceable code  # noqa: BLE001
        return None, f"not traceable by torch.fx ({type(e).__name__})"
    g = gm.graph
    ph = [n for n in g.nodes if n.op == "placeholder"]  # the input, then the arguments traced at their defaults
    out = next(n for n in g.nodes if n.op == "output")
    if len(ph) != 1 + len(concrete) or not isinstance(out.args[0], fx.Node):
        return None, "not one input and one output"
    x = ph[0]
    n = out.args[0]
    while not _is_add(n):
        if not _tail_op(gm, n) or len(n.args) < 1 or not isinstance(n.args[0], fx.Node) or len(n.users) > 1:
            return None, "its output is not a residual sum of its input"
        n = n.args[0]
    if len(n.users) > 1 or not _residual(n, x):
        return None, "its output is not a residual sum of its input (or its skip goes through a layer)"
    n.replace_all_uses_with(x)
    g.eliminate_dead_code()
    _not_inplace(gm)
    gm.recompile()
    # fx keeps every submodule; drop the ones the graph no longer calls (the branches' layers)
    used = {str(m.target) for m in g.nodes if m.op in ("call_module", "get_attr")}
    for name, _ in list(gm.named_children()):
        if not any(u == name or u.startswith(name + ".") for u in used):
            delattr(gm, name)
    for name, _ in list(gm.named_parameters(recurse=False)) + list(gm.named_buffers(recurse=False)):
        if name not in used:
            delattr(gm, name)
    return gm, ""


def _not_inplace(gm: fx.GraphModule) -> None:
    """The tail now reads the block's input directly: an in-place op there (ResNet's ``ReLU(inplace=True)``) would
    overwrite the previous layer's output, which autograd keeps for its backward pass. Make every tail op out of
    place (copies of in-place modules; ``relu_`` -> ``relu``; ``inplace=True`` arguments off)."""
    import copy

    for n in gm.graph.nodes:
        if n.op == "call_module":
            m = gm.get_submodule(str(n.target))
            if getattr(m, "inplace", False):
                m = copy.copy(m)
                m.inplace = False
                parent, _, attr = str(n.target).rpartition(".")
                setattr(gm.get_submodule(parent) if parent else gm, attr, m)
        elif n.op == "call_method" and isinstance(n.target, str) and n.target.endswith("_"):
            n.target = n.target[:-1]
        if n.kwargs.get("inplace"):
            n.kwargs = {**n.kwargs, "inplace": False}


class SkippedBlock(nn.Module):
    """What a removed residual block becomes: ``tail(x)`` (``nn.Identity`` when the block has no tail)."""

    def __init__(self, tail: fx.GraphModule, name: str) -> None:
        super().__init__()
        self.tail = tail
        self.edgeslim_removed_block = name

    def forward(self, x: Any) -> Any:
        return self.tail(x)


def _replacement(module: nn.Module, name: str) -> nn.Module:
    gm, why = _skip_graph(module)
    if gm is None:
        raise ModelError(f"module {name!r} ({type(module).__name__}) is not a removable residual block: {why}")
    if not any(n.op in ("call_module", "call_function", "call_method") for n in gm.graph.nodes):
        return nn.Identity()
    return SkippedBlock(gm, name)


def residual_blocks(model: nn.Module, example_inputs: Any) -> tuple[list[str], dict[str, str]]:
    """The names of ``model``'s removable residual blocks (in execution order), and why the other modules with a
    residual-looking shape are not (only modules that preserve their input's shape are examined)."""
    shapes: dict[str, tuple[Any, Any]] = {}
    order: list[str] = []
    names = {m: n for n, m in model.named_modules() if n}

    def hook(m: nn.Module, args: tuple, out: Any) -> None:
        n = names.get(m)
        if n is None or n in shapes or len(args) != 1 or not torch.is_tensor(args[0]) or not torch.is_tensor(out):
            return
        shapes[n] = (tuple(args[0].shape), tuple(out.shape))
        order.append(n)

    hs = [m.register_forward_hook(hook) for m in names]
    try:
        with torch.no_grad():
            call(model.eval(), example_inputs)
    finally:
        for h in hs:
            h.remove()
    found: list[str] = []
    why_not: dict[str, str] = {}
    for n in order:
        i, o = shapes[n]
        m = model.get_submodule(n)
        if i != o or isinstance(m, (nn.Sequential, nn.ModuleList)) or not any(True for _ in m.children()):
            continue
        if any(n.startswith(f + ".") for f in found):
            continue
        gm, why = _skip_graph(m)
        if gm is None:
            if "not a residual sum" not in why:
                why_not[n] = why
            continue
        found.append(n)
    return found, why_not


def remove_block(model: nn.Module, name: str) -> nn.Module:
    """In place: replace residual block ``name`` by its skip path (see the module docstring)."""
    set_module(model, name, _replacement(get_module(model, name), name))
    return model


def _batches(data: Any, n: int) -> list[torch.Tensor]:
    """Up to ``n`` input samples of ``data`` (an ImageDataset, a tensor, or an iterable of batches)."""
    if hasattr(data, "normalized"):
        x = data.normalized()
        return list(x[:n].split(128))
    if torch.is_tensor(data):
        return list(data[:n].split(128))
    out: list[torch.Tensor] = []
    seen = 0
    for b in data:
        x = b[0] if isinstance(b, (tuple, list)) else b
        if not torch.is_tensor(x):
            raise DataError(f"block pruning scores on tensors; data gave {type(x).__name__}")
        out.append(x)
        seen += len(x)
        if seen >= n:
            break
    return out


def _distance(ref: torch.Tensor, out: torch.Tensor) -> float:
    if ref.dim() == 2 and ref.shape[1] > 1:  # class scores: KL of the softmaxes
        return float(F.kl_div(F.log_softmax(out, 1), F.log_softmax(ref, 1), log_target=True, reduction="batchmean"))
    return float(F.mse_loss(out, ref) / ref.pow(2).mean().clamp_min(1e-12))


def drop_blocks(
    model: nn.Module, blocks: int, example_inputs: Any, data: Any, *, samples: int = 512, exclude: tuple = ()
) -> tuple[nn.Module, dict[str, Any]]:
    """Remove ``blocks`` residual blocks from ``model`` in place, greedily, least output change first.

    Returns the model and an info dict: ``dropped`` (names, in removal order), ``scores`` (each removed block's
    output distance when it was chosen), ``candidates`` and ``not_blocks`` (modules that looked like blocks but are
    not removable, with the reason).
    """
    if data is None:
        raise DataError("PruneConfig(method='block') ranks blocks on data: pass data= (inputs or (input, label)s)")
    from edgeslim.prune._inspect import match_modules

    cands, why_not = residual_blocks(model, example_inputs)
    skip = set(match_modules(model, exclude, "exclude")) if exclude else set()
    cands = [c for c in cands if c not in skip and not any(c.startswith(s + ".") for s in skip)]
    if blocks > len(cands):
        raise ConfigError(
            f"PruneConfig.blocks={blocks} but {type(model).__name__} has {len(cands)} removable residual block(s)"
            + (f" ({', '.join(cands)})" if cands else "")
            + (f"; not removable: {'; '.join(f'{k}: {v}' for k, v in list(why_not.items())[:5])}" if why_not else "")
        )
    xs = _batches(data, samples)
    model.eval()
    with torch.no_grad():
        refs = [model(x) for x in xs]
    dropped: list[str] = []
    scores: dict[str, float] = {}
    # each candidate's skip path, traced once (its tail's layers belong to the block, which no step changes)
    skips = {c: _replacement(get_module(model, c), c) for c in cands}
    for _ in range(blocks):
        best, best_d = None, float("inf")
        for c in cands:
            orig = get_module(model, c)
            set_module(model, c, skips[c])
            try:
                with torch.no_grad():
                    d = sum(_distance(r, model(x)) * len(x) for r, x in zip(refs, xs, strict=True))
            finally:
                set_module(model, c, orig)
            if d < best_d:
                best, best_d = c, d
        if best is None:
            raise ModelError(
                f"block pruning: with any of {', '.join(cands)} removed the output of {type(model).__name__} is not "
                "finite on the data; no block can be ranked"
            )
        set_module(model, best, skips.pop(best))
        cands.remove(best)
        dropped.append(best)
        scores[best] = round(best_d / sum(len(x) for x in xs), 6)
        log.info("block pruning: removed %s (output distance %.4g)", best, scores[best])
    return model, {"dropped": dropped, "scores": scores, "candidates": len(cands) + len(dropped), "not_blocks": why_not}
