"""Compatibility shims that make Torch-Pruning 1.6's dependency graph correct and fast on this torch.

* :func:`tolerate_unmapped_reshapes`: reshapes mapped by Torch-Pruning's own rule with the grad_fn sizes under the
  name it expects, cached per graph, and cut at channel shuffles (which permute channels, so no index mapping is
  right); :func:`shuffle_bound_roots` lists the layers whose channels would cross such a cut.
* :func:`out_channel_groups`: the dependency group of every prunable layer, without recomputing every mapping per
  layer.
* :func:`opaque_calls` / :func:`kept_width_pruner` / :func:`attention_bound_roots`: a module whose projections run
  as functions (Swin's windowed attention) traced as one opaque node of known widths that is never pruned, and the
  layers that write its residual width kept with it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from edgeslim.core.errors import ModelError
from edgeslim.prune._importance import torch_pruning


class _Cut:
    """Index mapping that stops a pruning group at an unmappable reshape and records that it was reached."""

    def __init__(self, hits: list) -> None:
        self.hits = hits

    def __call__(self, idxs: list) -> list:
        if idxs:
            self.hits.append(True)
        return []


class _NoRemap:
    @staticmethod
    def update_index_mapping(graph: Any) -> None:
        pass


class _SizedGradFn:
    """A grad_fn seen through a proxy that also answers ``_saved_self_sizes`` (torch >= 2.1 names it
    ``_saved_self_sym_sizes``; Torch-Pruning 1.6 looks for the old name, and without it maps *every* reshape
    as a flatten: wrong couplings, and index lists that grow until tracing a transformer takes many minutes)."""

    def __init__(self, grad_fn: Any) -> None:
        self._grad_fn = grad_fn
        self._saved_self_sizes = tuple(int(v) for v in grad_fn._saved_self_sym_sizes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grad_fn, name)


def _input_sizes(node: Any) -> tuple | None:
    g = node.grad_fn
    size = getattr(g, "_saved_self_sizes", None)
    if size is None:
        size = getattr(g, "_saved_self_sym_sizes", None)
    return tuple(int(v) for v in size) if size is not None else None


@contextlib.contextmanager
def tolerate_unmapped_reshapes(hits: list):
    """Trace reshapes the way Torch-Pruning intends on this torch, and cut it at channel shuffles.

    * Every reshape is mapped by Torch-Pruning's own rule, given the grad_fn sizes under the name it expects
      (:class:`_SizedGradFn`).
    * A channel shuffle (ShuffleNet: ``view(b, g, c // g, h, w)`` -> ``transpose`` -> ``view(b, c, h, w)``)
      permutes channels, which DepGraph cannot map (1.6 divides by zero there, or couples the wrong channels).
      Both of its reshapes are cut (a :class:`_Cut` mapping that records in ``hits`` when a group reaches it)
      and the graph is marked ``_es_unmapped``; :func:`shuffle_bound_roots` then keeps every layer whose
      channels would cross the shuffle unpruned.

    DepGraph recomputes mappings on every group query, so this stays active for the whole trace -> prune step.
    """
    from torch_pruning.dependency import index_mapping as im

    original = im.update_reshape_index_mapping

    def cut_at(node) -> None:
        cut = _Cut(hits)
        for dep in node.dependencies:
            dep.index_mapping[0] = cut
        for other in list(node.inputs) + list(node.outputs):
            for dep in other.dependencies:
                if dep.target is node:
                    dep.index_mapping[0] = cut

    def mark(graph, node) -> None:
        cuts = graph.__dict__.setdefault("_es_cut", set())
        cuts.add(id(node))
        graph._es_unmapped = True
        cut_at(node)

    def safe(graph, node):
        cuts = graph.__dict__.get("_es_cut", set())
        if id(node) in cuts:
            cut_at(node)
            return
        size = _input_sizes(node)
        if size is not None and len(size) == 5:  # 5-D feature map back to 4-D: the end of a channel shuffle
            mark(graph, node)
            frontier = list(node.inputs)
            for _ in range(3):  # its start: the 4-D -> 5-D reshape just before (through the transpose)
                nxt = []
                for o in frontier:
                    if o.type == node.type and (_input_sizes(o) or ()) and len(_input_sizes(o)) == 4:
                        mark(graph, o)
                    else:
                        nxt.extend(o.inputs)
                frontier = nxt
            return
        cache = graph.__dict__.setdefault("_es_reshape_maps", {})
        deps = list(node.dependencies) + [
            d for o in list(node.inputs) + list(node.outputs) for d in o.dependencies if d.target is node
        ]
        if id(node) in cache:  # a reshape's mapping (a flatten stride) survives pruning; inferring it again
            for d, mp in zip(deps, cache[id(node)]):  # walks the graph recursively on every group query
                d.index_mapping[0] = mp
            return
        g = node.grad_fn
        proxied = size is not None and not hasattr(g, "_saved_self_sizes")
        if proxied:
            node.grad_fn = _SizedGradFn(g)
        try:
            original(graph, node)
            cache[id(node)] = [d.index_mapping[0] for d in deps]
        except ZeroDivisionError:
            mark(graph, node)
        finally:
            if proxied:
                node.grad_fn = g

    split_call = im._SplitIndexMapping.__call__

    def safe_split(self, idxs):  # offsets inferred through the cut reshape can be incomplete: cut there too
        if len(self.offset) < 2 and not self.reverse:
            if idxs:
                hits.append(True)
            return []
        return split_call(self, idxs)

    concat = im.update_concat_index_mapping

    def safe_concat(graph, node):  # 1.6 sums inferred widths before checking them for None: cut there
        if id(node) in graph.__dict__.get("_es_cut", set()):
            cut_at(node)
            return
        try:
            concat(graph, node)
        except TypeError:
            mark(graph, node)

    im.update_reshape_index_mapping = safe
    im.update_concat_index_mapping = safe_concat
    im._SplitIndexMapping.__call__ = safe_split
    try:
        yield
    finally:
        im.update_reshape_index_mapping = original
        im.update_concat_index_mapping = concat
        im._SplitIndexMapping.__call__ = split_call


def out_channel_groups(dg: Any, model: nn.Module, ignored: list[nn.Module]) -> Iterator[tuple[str, nn.Module, Any]]:
    """``(name, layer, group)``: the dependency group of all output channels of every conv/linear in the graph."""
    from torch_pruning.dependency import graph as tp_graph

    skip = {id(m) for m in ignored}
    for name, m in model.named_modules():
        if id(m) in skip or not isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) or m not in dg.module2node:
            continue
        fn = dg.get_pruner_of_module(m)
        n = fn.get_out_channels(m) if fn is not None else None
        if not n:
            continue
        mapping = tp_graph.index_mapping
        tp_graph.index_mapping = _NoRemap  # mappings are already up to date; recomputing them per layer is slow
        try:
            group = dg.get_pruning_group(m, fn.prune_out_channels, list(range(n)))
        finally:
            tp_graph.index_mapping = mapping
        yield name, m, group


def shuffle_bound_roots(dg: Any, hits: list, model: nn.Module, ignored: list[nn.Module]) -> dict[str, str]:
    """Layers whose output channels reach an unmappable reshape (channel shuffle), with the reason."""
    out: dict[str, str] = {}
    hits.clear()
    for name, _m, _group in out_channel_groups(dg, model, ignored):  # building a group records the hits
        if hits:
            out[name] = (
                "its channels pass through a reshape the dependency graph cannot map to channels "
                "(a channel shuffle or a 5-D window partition), so it is kept"
            )
        hits.clear()
    return out


class _Opaque(torch.autograd.Function):
    """A whole module call as one autograd node: the dependency graph sees its input and output, not its inside."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, run: Any) -> torch.Tensor:  # grad is off in here: nothing inside is traced
        return run(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        raise ModelError("an opaque attention stand-in was differentiated; it exists only while tracing the graph")


@contextlib.contextmanager
def opaque_calls(modules: list[nn.Module]):
    """While tracing, run each module as one :class:`_Opaque` node and remember its input/output widths."""
    widths: dict[int, tuple[int, int]] = {}

    def wrap(m: nn.Module) -> Any:
        inner = m.forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            out = _Opaque.apply(x, inner) if x.requires_grad else inner(x)
            widths[id(m)] = (int(x.shape[-1]), int(out.shape[-1]))
            return out

        return forward

    for m in modules:
        m.forward = wrap(m)
    try:
        yield widths
    finally:
        for m in modules:
            del m.forward  # the instance attribute; the class's forward shows through again


def kept_width_pruner(widths: dict[int, tuple[int, int]]) -> Any:
    """A Torch-Pruning layer pruner for an opaque attention module: reports its widths, never prunes it."""
    base = torch_pruning().pruner.function.BasePruningFunc

    class KeepWidth(base):
        def prune_out_channels(self, layer: nn.Module, idxs: Any) -> nn.Module:
            raise ModelError(f"windowed attention {type(layer).__name__} cannot lose channels; it must be kept")

        def prune_in_channels(self, layer: nn.Module, idxs: Any) -> nn.Module:
            raise ModelError(f"windowed attention {type(layer).__name__} cannot lose channels; it must be kept")

        def get_out_channels(self, layer: nn.Module) -> int | None:
            return widths.get(id(layer), (None, None))[1]

        def get_in_channels(self, layer: nn.Module) -> int | None:
            return widths.get(id(layer), (None, None))[0]

    return KeepWidth()


def attention_bound_roots(
    dg: Any, model: nn.Module, ignored: list[nn.Module], opaque: list[nn.Module]
) -> dict[str, str]:
    """Layers left unpruned because their output channels are the width an opaque attention reads or writes."""
    names = {id(m): n for n, m in model.named_modules()}
    ids = {id(m) for m in opaque}
    out: dict[str, str] = {}
    for name, _m, group in out_channel_groups(dg, model, ignored):
        hit = next((dep.target.module for dep, _ in group if id(dep.target.module) in ids), None)
        if hit is not None:
            out[name] = (
                f"its output channels are the residual width of windowed attention {names[id(hit)]!r} "
                f"({type(hit).__name__}), whose heads are not traceable, so it is kept"
            )
    return out


def fresh_defaults() -> dict[str, Any]:
    """New empty dicts for every mutable-default dict argument of Torch-Pruning's pruner constructor.

    ``BasePruner.__init__`` (1.6) has ``in_channel_groups={}``, ``out_channel_groups={}``, ``channel_groups={}``
    and ``num_heads={}`` as defaults and writes into them (grouped convs, GroupNorm, attention heads): left to their
    defaults, every call adds entries that key the pruned model's modules, so the dicts grow call after call and
    keep discarded models alive. Pass these to every pruner constructed.
    """
    import inspect

    params = inspect.signature(torch_pruning().pruner.BasePruner.__init__).parameters
    return {k: {} for k, p in params.items() if isinstance(p.default, dict)}
