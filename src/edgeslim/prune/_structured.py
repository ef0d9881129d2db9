"""Structured pruning with physical removal: channels/filters through a dependency graph, attention heads and
FFN neurons of BERT-style encoders.

CNNs (and anything else Torch-Pruning's DepGraph can trace) go through :func:`prune_channels`: the graph
couples every layer that must lose the same channels (residual adds, depthwise/grouped convs,
concatenation, BatchNorm, flatten -> Linear) and the pruner removes them from all of them at once, with
kept widths rounded to ``round_to``. BERT-style encoders (``layer.attention.self.{query,key,value}``,
``attention.output.dense``, ``intermediate.dense``, ``output.dense``) go through our own
:func:`prune_transformer`, which removes whole heads and FFN neurons and keeps the hidden size, so the
model stays a valid Hugging Face model (loadable, exportable).

Both leave the structure of the pruned model recorded by :func:`structure_diff`, which
:func:`apply_structure` replays on a fresh copy of the original architecture without any pruning library.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import logging
import math
from collections.abc import Iterable
from typing import Any, Iterator

import torch
from torch import nn

from edgeslim.core.errors import ConfigError, DataError, EdgeslimError, ModelError, near
from edgeslim.prune._config import PruneConfig, Scope
from edgeslim.prune._importance import IMPORTANCE, torch_pruning

log = logging.getLogger(__name__)

_ATTR_TYPES = (int, tuple, list)


# ----------------------------------------------------------------------------------------------- helpers
def call(model: nn.Module, example_inputs: Any) -> Any:
    """Run ``model`` on example inputs given as a tensor, a tuple of positional inputs or a dict of kwargs."""
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def first_sample(example_inputs: Any) -> Any:
    """The first sample (batch 1) of the example inputs, for MAC counting."""
    if isinstance(example_inputs, torch.Tensor):
        return example_inputs[:1]
    if isinstance(example_inputs, dict):
        return {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in example_inputs.items()}
    return type(example_inputs)(v[:1] if isinstance(v, torch.Tensor) else v for v in example_inputs)


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of one forward pass at batch 1 (torch.utils.flop_counter flops / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        call(model, first_sample(example_inputs))
    model.train(was)
    return int(fc.get_total_flops() // 2)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def match_modules(model: nn.Module, patterns: Iterable[str], field: str) -> dict[str, nn.Module]:
    """Modules whose names match any glob; a glob that matches nothing raises naming the nearest names."""
    names = {n: m for n, m in model.named_modules() if n}
    out: dict[str, nn.Module] = {}
    for pat in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ConfigError(
                f"PruneConfig.{field}: {pat!r} matches no module of {type(model).__name__}{near(pat, names)}; "
                f"module names look like {', '.join(list(names)[:5])}, ..."
            )
        out.update({n: names[n] for n in hits})
    return out


def _weighted(modules: Any) -> list[nn.Module]:
    """The Conv/Linear modules among ``modules``."""
    return [m for m in modules if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]


def _executed(model: nn.Module, example_inputs: Any, modules: list[nn.Module]) -> list[nn.Module]:
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
    ran = _executed(model, example_inputs, _weighted(model.modules()))
    names = {id(m): n for n, m in model.named_modules()}
    return names[id(ran[-1])] if ran else None


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
            raise ModelError(f"pruning would remove every channel of module {n!r} ({type(m).__name__}); "
                             "lower the ratio or the layer's entry in layer_ratios")


# ------------------------------------------------------------------------------------ structure recording
def snapshot(model: nn.Module) -> dict[str, dict]:
    """Shapes of every direct parameter/buffer and the int-like attributes of every module."""
    snap = {}
    for n, m in model.named_modules():
        attrs = {k: v for k, v in vars(m).items() if not k.startswith("_") and isinstance(v, _ATTR_TYPES)
                 and not isinstance(v, bool) and _plain(v)}
        tensors = {k: list(v.shape) for k, v in list(m._parameters.items()) + list(m._buffers.items()) if v is not None}
        snap[n] = {"attrs": attrs, "tensors": tensors}
    return snap


def _plain(v: Any) -> bool:
    if isinstance(v, int):
        return True
    return all(isinstance(x, int) and not isinstance(x, bool) for x in v)


def structure_diff(before: dict[str, dict], model: nn.Module) -> dict[str, dict]:
    """What changed between a snapshot and the (pruned) model: new tensor shapes and attribute values."""
    after = snapshot(model)
    diff = {}
    for n, a in after.items():
        b = before.get(n)
        if b is None:
            raise ModelError(f"pruning added module {n!r}; structured pruning must only shrink modules")
        attrs = {k: list(v) if isinstance(v, tuple) else v for k, v in a["attrs"].items() if b["attrs"].get(k) != v}
        tensors = {k: s for k, s in a["tensors"].items() if b["tensors"].get(k) != s}
        if attrs or tensors:
            diff[n] = {"attrs": attrs, "tensors": tensors}
    return diff


def apply_structure(model: nn.Module, structure: dict[str, dict]) -> nn.Module:
    """Resize a fresh copy of the original architecture to a recorded structure, in place.

    Parameters and buffers get new (uninitialised) storage of the recorded shapes and attributes take
    their recorded values; load the pruned state_dict afterwards.
    """
    modules = dict(model.named_modules())
    for n, change in structure.items():
        m = modules.get(n)
        if m is None:
            raise ModelError(f"recipe names module {n!r}, which this model lacks{near(n, modules)}; "
                             "load the recipe into the architecture it was made from")
        for k, v in change.get("attrs", {}).items():
            old = getattr(m, k, None)
            setattr(m, k, tuple(v) if isinstance(old, tuple) else v)
        for k, shape in change.get("tensors", {}).items():
            if k in m._parameters and m._parameters[k] is not None:
                old = m._parameters[k]
                m._parameters[k] = nn.Parameter(torch.empty(shape, dtype=old.dtype), requires_grad=old.requires_grad)
            elif k in m._buffers and m._buffers[k] is not None:
                old = m._buffers[k]
                m._buffers[k] = torch.zeros(shape, dtype=old.dtype)
            else:
                raise ModelError(f"recipe resizes {n}.{k}, which this model does not have")
    return model


# ------------------------------------------------------------------------------------------- CNN channels
def _calib_grads(model: nn.Module, data: Any, cfg: PruneConfig) -> None:
    """Accumulate loss gradients on a few calibration batches (for the Taylor criterion)."""
    if data is None:
        raise DataError("importance='taylor' needs data=: a labelled dataset or an iterable of (inputs, labels)")
    batches = data.batches(64) if hasattr(data, "batches") else data
    model.zero_grad(set_to_none=True)
    model.eval()
    seen = 0
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        seen += 1
        if seen >= cfg.calib_batches:
            break
    if not seen:
        raise DataError("importance='taylor': data= yielded no batches")


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
def _tolerate_unmapped_reshapes(hits: list):
    """Trace reshapes the way Torch-Pruning intends on this torch, and cut it at channel shuffles.

    * Every reshape is mapped by Torch-Pruning's own rule, given the grad_fn sizes under the name it expects
      (:class:`_SizedGradFn`).
    * A channel shuffle (ShuffleNet: ``view(b, g, c // g, h, w)`` -> ``transpose`` -> ``view(b, c, h, w)``)
      permutes channels, which DepGraph cannot map (1.6 divides by zero there, or couples the wrong channels).
      Both of its reshapes are cut (a :class:`_Cut` mapping that records in ``hits`` when a group reaches it)
      and the graph is marked ``_es_unmapped``; :func:`_shuffle_bound_roots` then keeps every layer whose
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
        deps = list(node.dependencies) + [d for o in list(node.inputs) + list(node.outputs)
                                          for d in o.dependencies if d.target is node]
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


def _out_channel_groups(dg: Any, model: nn.Module,
                        ignored: list[nn.Module]) -> Iterator[tuple[str, nn.Module, Any]]:
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


def _shuffle_bound_roots(dg: Any, hits: list, model: nn.Module, ignored: list[nn.Module]) -> dict[str, str]:
    """Layers whose output channels reach an unmappable reshape (channel shuffle), with the reason."""
    out: dict[str, str] = {}
    hits.clear()
    for name, _m, _group in _out_channel_groups(dg, model, ignored):  # building a group records the hits
        if hits:
            out[name] = ("its channels pass through a reshape the dependency graph cannot map to channels "
                         "(a channel shuffle or a 5-D window partition), so it is kept")
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


def functional_attention(model: nn.Module, example_inputs: Any, attn: Iterable[str]) -> list[nn.Module]:
    """The attention modules among ``attn`` (names) with a projection layer that never runs as a module.

    torchvision's ``ShiftedWindowAttention`` (Swin V1/V2) passes ``qkv.weight`` / ``proj.weight`` to a function,
    so the graph never sees those layers: it would take the attention for an element-wise op, let the residual
    width it reads and writes be pruned, and leave the unpruned weights to fail at run time (a matmul shape error).
    """
    mods = dict(model.named_modules())
    cand = {n: mods[n] for n in attn if n in mods}
    ran = {id(m) for m in _executed(model, example_inputs, _weighted(c for a in cand.values() for c in a.modules()))}
    return [a for a in cand.values()  # (V2's cpb_mlp does run as modules; its qkv and proj do not)
            if any(id(c) not in ran for c in _weighted(a.modules()))]


@contextlib.contextmanager
def _opaque_calls(modules: list[nn.Module]):
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


def _kept_width_pruner(widths: dict[int, tuple[int, int]]) -> Any:
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


def _attention_bound_roots(dg: Any, model: nn.Module, ignored: list[nn.Module],
                           opaque: list[nn.Module]) -> dict[str, str]:
    """Layers left unpruned because their output channels are the width an opaque attention reads or writes."""
    names = {id(m): n for n, m in model.named_modules()}
    ids = {id(m) for m in opaque}
    out: dict[str, str] = {}
    for name, _m, group in _out_channel_groups(dg, model, ignored):
        hit = next((dep.target.module for dep, _ in group if id(dep.target.module) in ids), None)
        if hit is not None:
            out[name] = (f"its output channels are the residual width of windowed attention {names[id(hit)]!r} "
                         f"({type(hit).__name__}), whose heads are not traceable, so it is kept")
    return out


def _tp_prune_once(model: nn.Module, cfg: PruneConfig, ratio: float, example_inputs: Any, data: Any,
                   ignored: list[nn.Module], ratio_dict: dict[nn.Module, float],
                   skipped: dict[str, str] | None = None, opaque: list[nn.Module] = ()) -> list:
    tp = torch_pruning()
    crit = IMPORTANCE.get(cfg.importance)
    heads = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    hits: list = []
    ignored = list(ignored) + list(opaque)  # an opaque attention is kept, and with it the residual width it touches

    def make(ign: list[nn.Module]) -> Any:
        with blame_module(model, "tracing the dependency graph", exact=False), _opaque_calls(list(opaque)) as widths:
            return tp.pruner.MetaPruner(
                model, example_inputs, importance=crit.make(), global_pruning=cfg.scope == Scope.GLOBAL,
                pruning_ratio=ratio, pruning_ratio_dict=dict(ratio_dict) or None,
                max_pruning_ratio=cfg.max_layer_ratio, ignored_layers=ign,
                round_to=cfg.round_to if cfg.round_to > 1 else None, num_heads=heads,
                customized_pruners={type(m): _kept_width_pruner(widths) for m in opaque} or None,
            )

    with torch.random.fork_rng(devices=[]), _tolerate_unmapped_reshapes(hits):
        torch.manual_seed(cfg.seed)
        pruner = make(ignored)
        if opaque and skipped is not None:
            skipped.update(_attention_bound_roots(pruner.DG, model, ignored, list(opaque)))
        if getattr(pruner.DG, "_es_unmapped", False):  # a channel shuffle: keep the layers crossing it
            shuffle = _shuffle_bound_roots(pruner.DG, hits, model, ignored)
            mods = dict(model.named_modules())
            pruner = make(list(ignored) + [mods[n] for n in shuffle])
            if skipped is not None:
                skipped.update(shuffle)
        if crit.needs_grad:
            _calib_grads(model, data, cfg)
        with blame_module(model, "pruning"):
            pruner.step()
        model.zero_grad(set_to_none=True)
        _sync_attributes(model)
        return [list(h) for h in pruner.pruning_history()]


def _sync_attributes(model: nn.Module) -> None:
    """Update width attributes that forward() reads but the pruner does not know (torchvision ViT, MHA)."""
    for m in model.modules():
        if hasattr(m, "conv_proj") and hasattr(m, "hidden_dim"):  # torchvision VisionTransformer
            m.hidden_dim = m.conv_proj.out_channels
        if isinstance(m, nn.MultiheadAttention):
            m.embed_dim = m.out_proj.out_features if m.out_proj.out_features else m.embed_dim
            m.kdim = m.vdim = m.embed_dim
            m.head_dim = m.embed_dim // m.num_heads



def window_attention_modules(model: nn.Module) -> list[str]:
    """Names of windowed / relative-position attention modules: a per-head relative position bias table, or (Swin
    V2) the relative position index its continuous bias MLP is gathered with."""
    return [n for n, m in model.named_modules() if n and (hasattr(m, "num_heads") or hasattr(m, "n_heads")) and any(
            isinstance(getattr(m, k, None), torch.Tensor) for k in ("relative_position_bias_table",
                                                                     "relative_position_index"))]


def window_attention_layers(model: nn.Module) -> dict[str, str]:
    """Projection layers of attention blocks the dependency graph cannot split into heads, with the reason.

    Windowed / relative-position attention (torchvision Swin V1/V2 ``ShiftedWindowAttention(V2)``, MaxViT
    ``RelativePositionalMultiHeadAttention``) reshapes its projections into heads and indexes a per-head bias
    table; DepGraph cannot couple their heads, so their projections (and with them the residual width they
    read and write) are kept while the MLP, convolution and patch-merging widths around them are pruned.
    Swin's attention runs ``F.linear`` on ``qkv.weight`` / ``proj.weight`` (see :func:`functional_attention`):
    it is traced as one opaque node, kept, so every layer writing its residual width is kept too, and each of
    those is listed in the report with the attention it serves. ``nn.MultiheadAttention`` (ViT) is handled by
    the pruner itself.
    """
    out: dict[str, str] = {}
    for n in window_attention_modules(model):
        m = model.get_submodule(n)
        for cn, c in m.named_modules():
            if cn and isinstance(c, (nn.Linear, nn.modules.conv._ConvNd)):
                out[f"{n}.{cn}"] = (f"projection of windowed/relative-position attention {n!r} "
                                    f"({type(m).__name__}): heads are not traceable, the layer is kept")
    return out


def prune_channels(model: nn.Module, cfg: PruneConfig, example_inputs: Any, data: Any) -> tuple[nn.Module, dict]:
    """Remove channels of ``model`` (a private copy; modified and returned) as ``cfg`` asks."""
    ignored_map = match_modules(model, cfg.ignored_layers, "ignored_layers")
    out_name = output_layer(model, example_inputs) if cfg.ignore_output_layer else None
    if out_name:
        ignored_map[out_name] = dict(model.named_modules())[out_name]
    ratio_dict: dict[str, float] = {}
    for pat, r in cfg.layer_ratios.items():
        for n in match_modules(model, [pat], "layer_ratios"):
            ratio_dict[n] = float(r)
    info: dict[str, Any] = {"ignored": sorted(ignored_map), "output_layer": out_name, "skipped": {}}
    for n, why in window_attention_layers(model).items():
        if n not in ignored_map:
            ignored_map[n] = dict(model.named_modules())[n]
            info["skipped"][n] = why

    attn = set(window_attention_modules(model))
    names = {id(m): n for n, m in model.named_modules()}
    opaque = [names[id(m)] for m in functional_attention(model, example_inputs, attn)] if attn else []

    def run(m: nn.Module, ratio: float) -> list:
        mods = dict(m.named_modules())
        # the attention blocks' own tensors (relative position bias tables, V2 logit scales: one per head)
        params = [t for a in attn if a in mods for t in mods[a]._parameters.values() if t is not None]
        return _tp_prune_once(m, cfg, ratio, example_inputs, data, [mods[n] for n in ignored_map] + params,
                              {mods[n]: r for n, r in ratio_dict.items()}, info["skipped"], [mods[n] for n in opaque])

    if cfg.target_macs is None:
        info["history"] = run(model, cfg.ratio)
        info["channel_ratio"] = cfg.ratio
    else:
        base = count_macs(model, example_inputs)
        goal = base * (1 - cfg.target_macs)
        lo, hi = 0.0, cfg.max_layer_ratio
        best: tuple[float, nn.Module, list] | None = None
        best_gap = math.inf
        reached = False
        for _ in range(10):  # bisection on the channel ratio; each trial prunes a fresh copy
            mid = (lo + hi) / 2
            trial = copy.deepcopy(model)
            hist = run(trial, mid)
            macs = count_macs(trial, example_inputs)
            reached = reached or macs <= goal * 1.02
            gap = abs(macs - goal) / base
            if gap < best_gap:  # rounding makes MACs a step function of the ratio: keep the closest trial
                best, best_gap = (mid, trial, hist), gap
            if macs <= goal:
                hi = mid
            else:
                lo = mid
            if best_gap < 0.01:
                break
        if best is None or not reached:
            raise ModelError(
                f"cannot remove {cfg.target_macs:.0%} of the MACs of {type(model).__name__} with max_layer_ratio="
                f"{cfg.max_layer_ratio} and {len(ignored_map)} ignored layers; raise max_layer_ratio or lower target_macs"
            )
        model = best[1]
        info["history"] = best[2]
        info["channel_ratio"] = round(best[0], 4)
    check_not_empty(model)
    with blame_module(model, "running the pruned model"), torch.no_grad():
        call(model.eval(), example_inputs)
    return model, info


# --------------------------------------------------------------------------------- transformer heads/FFN
def bert_layers(model: nn.Module) -> dict[str, nn.Module]:
    """BERT-style encoder layers (``attention.self.query`` ... ``intermediate.dense``, ``output.dense``)."""
    found = {}
    for n, m in model.named_modules():
        att = getattr(m, "attention", None)
        if (att is not None and hasattr(getattr(att, "self", None), "query") and hasattr(att, "output")
                and hasattr(getattr(m, "intermediate", None), "dense") and hasattr(getattr(m, "output", None), "dense")):
            found[n] = m
    return found


def _round_keep(total: int, ratio: float, multiple: int) -> int:
    keep = total - int(math.floor(total * ratio))
    if multiple > 1:
        keep = max(multiple, int(round(keep / multiple)) * multiple)
    return min(max(keep, 1), total)


def _slice_linear(lin: nn.Linear, idx: torch.Tensor, dim: int) -> None:
    with torch.no_grad():
        w = lin.weight.index_select(dim, idx).clone()
        lin.weight = nn.Parameter(w)
        if dim == 0:
            if lin.bias is not None:
                lin.bias = nn.Parameter(lin.bias.index_select(0, idx).clone())
            lin.out_features = len(idx)
        else:
            lin.in_features = len(idx)


def _scores(weights: list[torch.Tensor], cfg: PruneConfig, n: int) -> torch.Tensor:
    """Per-unit scores from weight slices ``(units, ...)`` (their grads for taylor)."""
    if cfg.importance == "random":
        g = torch.Generator().manual_seed(cfg.seed)
        return torch.rand(n, generator=g)
    s = torch.zeros(n)
    for w in weights:
        flat = w.reshape(n, -1)
        if cfg.importance == "taylor":
            grad = getattr(w, "_es_grad", None)
            if grad is None:
                raise DataError("importance='taylor' for a transformer needs data= (batches of model inputs)")
            s += (flat * grad.reshape(n, -1)).abs().sum(1)
        elif cfg.importance == "l1":
            s += flat.abs().sum(1)
        elif cfg.importance in ("l2", "fpgm"):
            if cfg.importance == "fpgm":
                s += torch.cdist(flat, flat).sum(1)
            else:
                s += flat.norm(dim=1)
        else:
            raise ConfigError(f"importance={cfg.importance!r} is not available for transformer heads/FFN; "
                              "valid: l1, l2, fpgm, random")
    return s


def prune_transformer(model: nn.Module, cfg: PruneConfig, example_inputs: Any, data: Any) -> tuple[nn.Module, dict]:
    """Remove attention heads (``heads_ratio``) and FFN neurons (``ratio``) of every BERT-style layer."""
    if cfg.importance in ("taylor", "bn_scale"):
        raise ConfigError(f"PruneConfig.importance={cfg.importance!r} is not available for transformer heads/FFN; "
                          "valid: l1, l2, fpgm, random")
    ignored = match_modules(model, cfg.ignored_layers, "ignored_layers")
    layers = bert_layers(model)
    ratios: dict[str, float] = {}
    for pat, r in cfg.layer_ratios.items():
        for n in match_modules(model, [pat], "layer_ratios"):
            ratios[n] = float(r)
    report: dict[str, Any] = {"layers": {}, "ignored": sorted(ignored)}
    for name, layer in layers.items():
        if name in ignored:
            continue
        att = layer.attention.self
        heads = int(att.num_attention_heads)
        hd = int(att.attention_head_size)
        entry: dict[str, Any] = {}
        if cfg.heads_ratio > 0:
            drop = min(int(math.floor(heads * cfg.heads_ratio)), heads - 1)
            q, k, v, o = att.query.weight, att.key.weight, att.value.weight, layer.attention.output.dense.weight
            per_head = [q.detach().reshape(heads, -1), k.detach().reshape(heads, -1), v.detach().reshape(heads, -1),
                        o.detach().t().reshape(heads, -1)]
            score = _scores(per_head, cfg, heads)
            keep_heads = torch.sort(torch.argsort(score, descending=True)[: heads - drop]).values
            idx = (keep_heads.view(-1, 1) * hd + torch.arange(hd).view(1, -1)).flatten()
            for lin in (att.query, att.key, att.value):
                _slice_linear(lin, idx, 0)
            _slice_linear(layer.attention.output.dense, idx, 1)
            att.num_attention_heads = len(keep_heads)
            att.all_head_size = len(keep_heads) * hd
            entry["heads"] = [heads, len(keep_heads)]
            entry["kept_heads"] = keep_heads.tolist()
        r = ratios.get(f"{name}.intermediate.dense", ratios.get(name, cfg.ratio))
        r = min(r, cfg.max_layer_ratio)
        inter, out = layer.intermediate.dense, layer.output.dense
        width = inter.out_features
        keep = _round_keep(width, r, cfg.round_to)
        score = _scores([inter.weight.detach(), out.weight.detach().t()], cfg, width)
        idx = torch.sort(torch.argsort(score, descending=True)[:keep]).values
        _slice_linear(inter, idx, 0)
        _slice_linear(out, idx, 1)
        entry["ffn"] = [width, keep]
        report["layers"][name] = entry
    if not report["layers"]:
        raise ModelError(f"{type(model).__name__}: no BERT-style encoder layer left to prune (all ignored?)")
    check_not_empty(model)
    with blame_module(model, "running the pruned transformer"), torch.no_grad():
        call(model.eval(), example_inputs)
    return model, report
