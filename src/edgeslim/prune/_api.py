"""The ``prune`` verb, its report and recipe, save/load, and the iterative prune -> fine-tune loop."""

from __future__ import annotations

import copy
import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from edgeslim.core import recipe as _recipe
from edgeslim.core.counting import call, count_macs, count_params
from edgeslim.core.errors import ConfigError, DataError, ModelError
from edgeslim.core.io import save_torch, write_json
from edgeslim.prune._blocks import drop_blocks, remove_block
from edgeslim.prune._channels import prune_channels
from edgeslim.prune._config import PruneConfig, PruneMethod, Schedule, Scope
from edgeslim.prune._inspect import blame_module, match_modules, output_layers
from edgeslim.prune._sparse import (
    PRUNABLE,
    attach_mask,
    get_mask,
    magnitude_mask,
    masked_layers,
    nm_mask,
    strip_masks,
)
from edgeslim.prune._structure import apply_structure, snapshot, structure_diff
from edgeslim.prune._transformer import bert_layers, prune_transformer
from edgeslim.train import TrainConfig, fit, recalibrate_bn

log = logging.getLogger(__name__)

RECIPE_FORMAT = "edgeslim.prune/1"


@dataclass
class PruneReport:
    """What one :func:`prune` call did.

    Attributes:
        method: the method used.
        macs_before, macs_after: multiply-accumulates at batch 1 (torch.utils.flop_counter).
        params_before, params_after: parameter counts (unstructured/N:M: unchanged; see ``sparsity``).
        sparsity: fraction of zero weights over the masked layers (``magnitude``/``nm``).
        layers: per layer, ``[channels_before, channels_after]`` or its sparsity.
        skipped: layers left untouched, each with the reason (nothing is skipped silently).
        ignored: layers the config asked to leave alone (and the auto-ignored output layer).
        recipe: the replayable steps so far (see :func:`save_pruned`).
        note: what the numbers mean for speed.
    """

    technique: ClassVar[str] = "prune"
    method: str
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    sparsity: float = 0.0
    layers: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    recipe: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    note: str = ""

    @property
    def mac_reduction(self) -> float:
        return 1 - self.macs_after / self.macs_before if self.macs_before else 0.0

    def to_dict(self) -> dict:
        d = {"technique": self.technique, **{k: v for k, v in self.__dict__.items() if k != "recipe"}}
        d["mac_reduction"] = round(self.mac_reduction, 4)
        return d

    def summary(self) -> str:
        lines = [
            f"prune ({self.method}): MACs {self.macs_before:,} -> {self.macs_after:,} "
            f"(-{self.mac_reduction:.1%}), params {self.params_before:,} -> {self.params_after:,}"
        ]
        if self.sparsity:
            lines.append(f"  weight sparsity over masked layers: {self.sparsity:.1%}")
        if self.ignored:
            lines.append(f"  ignored: {', '.join(self.ignored)}")
        for n, why in self.skipped.items():
            lines.append(f"  skipped {n}: {why}")
        if self.note:
            lines.append(f"  note: {self.note}")
        return "\n".join(lines)


def prune(model: nn.Module, config: PruneConfig = PruneConfig(), *, example_inputs: Any, data: Any = None) -> nn.Module:
    """Prune a copy of ``model``; the input model is not modified.

    Args:
        model: any ``nn.Module`` (a CNN, or a BERT-style Hugging Face encoder for heads/FFN pruning).
        config: what to remove and how to rank it.
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs, used to trace
            the dependency graph and count MACs (batch 1 is used for MACs).
        data: labelled batches (an :class:`~edgeslim.data.ImageDataset` or an iterable of ``(x, y)``) for
            data-driven criteria (``taylor``) and for ``config.recalibrate_bn``.

    Returns:
        A new model. ``magnitude``/``nm`` keep masks as weight parametrizations (fine-tuning keeps the zeros;
        :func:`strip_masks` bakes them for export); ``channel`` returns a physically smaller model. Its
        ``prune_report`` attribute is a :class:`PruneReport` holding the replayable recipe.

    Raises:
        ConfigError: bad config values, globs that match no module, a criterion that needs ``data``.
        DataError: ``recalibrate_bn`` set without ``data``.
        ModelError: the model cannot be traced or pruned; the message names the module.
    """
    if not isinstance(model, nn.Module):
        raise ModelError(f"prune() needs a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, PruneConfig):
        raise ConfigError(f"prune() needs a PruneConfig, got {type(config).__name__}")
    _recipe.check_next(model, "prune")
    if config.recalibrate_bn and data is None:
        raise DataError(
            f"PruneConfig.recalibrate_bn={config.recalibrate_bn} needs data= (an ImageDataset or an "
            "iterable of inputs / (inputs, labels)) to re-estimate BatchNorm statistics on"
        )
    t0 = time.perf_counter()
    model = copy.deepcopy(model)
    prev = list(getattr(getattr(model, "prune_report", None), "recipe", []) or [])
    was_training = model.training
    model.eval()
    with blame_module(model, "running the model on example_inputs"), torch.no_grad():
        call(model, example_inputs)
    macs0, params0 = count_macs(model, example_inputs), count_params(model)
    remask: list[str] = []
    if config.method == PruneMethod.CHANNEL:
        # masks from an earlier magnitude/N:M step: bake them, remove channels, then mask the surviving zeros again
        remask = masked_layers(model)
        strip_masks(model)
        before = snapshot(model)
        if bert_layers(model):
            model, info = prune_transformer(model, config, example_inputs, data)
            history: list = []
        else:
            model, info = prune_channels(model, config, example_inputs, data)
            history = info.pop("history")
        structure = structure_diff(before, model)
        layers = _width_changes(before, model)
        if "layers" in info:
            layers = info["layers"]
        modules = dict(model.named_modules())
        remask = [n for n in remask if n in modules]
        for n in remask:
            attach_mask(modules[n], (modules[n].weight.detach() != 0).float())
        step = {
            "method": "channel",
            "config": config.to_dict(),
            "structure": structure,
            "history": history,
            "remask": remask,
        }
        report = PruneReport(
            "channel",
            macs0,
            count_macs(model, example_inputs),
            params0,
            count_params(model),
            layers=layers,
            ignored=info.get("ignored", []),
            skipped=info.get("skipped", {}),
            note="channels physically removed: dense runtimes get faster; measure to see how much",
        )
        if "channel_ratio" in info:
            report.layers["_channel_ratio"] = info["channel_ratio"]
    elif config.method == PruneMethod.BLOCK:
        model, info = drop_blocks(
            model, config.blocks, example_inputs, data, samples=config.block_samples, exclude=config.exclude
        )
        step = {"method": "block", "config": config.to_dict(), "dropped": info["dropped"]}
        report = PruneReport(
            "block",
            macs0,
            count_macs(model, example_inputs),
            params0,
            count_params(model),
            layers={n: {"removed": True, "output_distance": info["scores"][n]} for n in info["dropped"]},
            skipped={n: f"not a removable residual block: {why}" for n, why in info["not_blocks"].items()},
            ignored=list(config.exclude),
            note=f"{len(info['dropped'])} of {info['candidates']} residual blocks removed (their layers no longer "
            "run: fewer kernels launched); measure to see how much faster",
        )
    else:
        report = _mask_prune(model, config, example_inputs, macs0, params0)
        step = {
            "method": str(config.method),
            "config": config.to_dict(),
            "masked": sorted(n for n, m in model.named_modules() if get_mask(m) is not None),
        }
    if config.recalibrate_bn:
        model = recalibrate_bn(model, data, num_samples=config.recalibrate_bn)
        report.note += f"; BatchNorm statistics re-estimated on {config.recalibrate_bn} inputs"
    with blame_module(model, "running the pruned model"), torch.no_grad():
        call(model.eval(), example_inputs)
    model.train(was_training)
    report.recipe = prev + [step]
    report.seconds = round(time.perf_counter() - t0, 2)
    model.prune_report = report
    model.report = report
    _recipe.record(model, "prune", config, {k: v for k, v in step.items() if k != "config"}, report)
    log.info("%s", report.summary())
    return model


def _width_changes(before: dict, model: nn.Module) -> dict[str, list[int]]:
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            old = before[n]["attrs"].get("out_channels")
            if old != m.out_channels:
                out[n] = [old, m.out_channels]
        elif isinstance(m, nn.Linear):
            old = before[n]["attrs"].get("out_features")
            if old != m.out_features:
                out[n] = [old, m.out_features]
    return out


def _mask_prune(model: nn.Module, cfg: PruneConfig, example_inputs: Any, macs0: int, params0: int) -> PruneReport:
    ignored = match_modules(model, cfg.exclude, "exclude")
    outs = output_layers(model, example_inputs) if cfg.ignore_output_layer else []
    ratios: dict[str, float] = {}
    for pat, r in cfg.layer_ratios.items():
        for n in match_modules(model, [pat], "layer_ratios"):
            ratios[n] = min(float(r), cfg.max_layer_ratio)
    targets = {n: m for n, m in model.named_modules() if isinstance(m, PRUNABLE) and n not in ignored and n not in outs}
    skipped: dict[str, str] = {}
    for out_name in outs:
        if out_name not in ignored:
            skipped[out_name] = "output layer (ignore_output_layer=True)"
    if not targets:
        raise ModelError(
            f"{type(model).__name__}: no Linear/Conv layer left to prune "
            f"({len(ignored)} ignored{', output layers ' + ', '.join(outs) if outs else ''})"
        )
    layers: dict[str, float] = {}
    if cfg.method == PruneMethod.NM:
        for n, m in targets.items():
            w = m.weight.detach()
            k = w[0].numel()
            if k % cfg.m:
                skipped[n] = f"input size {k} is not a multiple of m={cfg.m}"
                continue
            attach_mask(m, nm_mask(w, cfg.n, cfg.m))
            layers[n] = round(1 - cfg.n / cfg.m, 4)
        if not layers:
            raise ModelError(f"no layer of {type(model).__name__} has an input size that is a multiple of m={cfg.m}")
        note = (
            f"{cfg.n}:{cfg.m} masks; dense CPU runtimes (ONNX Runtime included) do not run faster on them, "
            "only sparse tensor cores (e.g. NVIDIA Ampere+) do"
        )
    else:
        weights = {n: m.weight.detach() for n, m in targets.items()}
        if cfg.scope == Scope.GLOBAL and not ratios:
            allw = torch.cat([w.abs().flatten() for w in weights.values()])
            k = int(round(cfg.ratio * allw.numel()))
            thr = torch.kthvalue(allw, k).values if k > 0 else torch.tensor(-1.0)
            per = {n: min(float((w.abs() <= thr).float().mean()), cfg.max_layer_ratio) for n, w in weights.items()}
        else:
            per = {n: min(ratios.get(n, cfg.ratio), cfg.max_layer_ratio) for n in weights}
        for n, m in targets.items():
            s = per[n]
            if cfg.schedule == Schedule.AGP:
                attach_mask(m, torch.ones_like(weights[n]), final=s, steps=cfg.schedule_steps, every=cfg.schedule_every)
            else:
                attach_mask(m, magnitude_mask(weights[n], s))
            layers[n] = round(s, 4)
        note = (
            "zeros do not speed up dense runtimes (ONNX Runtime, CPU BLAS compute them anyway); they save storage "
            "in a sparse/compressed format (see sparse_storage)"
        )
        if cfg.schedule == Schedule.AGP:
            note += f"; AGP: sparsity ramps to the targets over {cfg.schedule_steps} training steps (now 0)"
    zeros = total = 0
    for n in layers:
        w = targets[n].weight.detach()
        zeros += int((w == 0).sum())
        total += w.numel()
    return PruneReport(
        str(cfg.method),
        macs0,
        macs0,
        params0,
        params0,
        sparsity=zeros / total if total else 0.0,
        layers=layers,
        skipped=skipped,
        ignored=sorted(ignored),
        note=note,
    )


# ---------------------------------------------------------------------------------------- save / load
def save_pruned(model: nn.Module, path: str | Path, *, force: bool = False, half: bool = False) -> tuple[Path, Path]:
    """Write ``<path>.json`` (the replayable recipe) and ``<path>.pt`` (the state_dict), atomically.

    ``half=True`` stores floating-point tensors as FP16 (half the file; :func:`load_pruned` casts back).

    No module is pickled: :func:`load_pruned` rebuilds the pruned architecture from the recipe on a fresh
    instance of the original model, then loads the weights.
    """
    warnings.warn(
        "save_pruned() is deprecated; edgeslim.save(model, path) writes one recipe file for any chain "
        "(edgeslim.save(model, path, half=True) for FP16 storage)",
        DeprecationWarning,
        stacklevel=2,
    )
    rep = getattr(model, "prune_report", None)
    if rep is None or not rep.recipe:
        raise ModelError("save_pruned() needs a model returned by edgeslim.prune (it carries the recipe)")
    base = Path(path)
    base = base.with_suffix("") if base.suffix in (".pt", ".json") else base
    recipe = {"format": RECIPE_FORMAT, "steps": rep.recipe, "report": rep.to_dict()}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    pt = save_torch(state, base.with_suffix(".pt"), force=force)
    js = write_json(base.with_suffix(".json"), recipe, force=force)
    return js, pt


def read_recipe(path: str | Path) -> dict:
    p = Path(path)
    p = p.with_suffix(".json") if p.suffix != ".json" else p
    if not p.is_file():
        raise ModelError(f"prune recipe {str(p)!r} does not exist")
    try:
        recipe = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"prune recipe {str(p)!r} is not valid JSON: {e}") from None
    if recipe.get("format") != RECIPE_FORMAT:
        raise ModelError(
            f"{str(p)!r} is not an edgeslim prune recipe (format {recipe.get('format')!r}, expected {RECIPE_FORMAT!r})"
        )
    return recipe


def load_pruned(model: nn.Module, path: str | Path) -> nn.Module:
    """Rebuild a pruned model: replay the recipe at ``<path>.json`` on a copy of ``model`` (a fresh instance of
    the original architecture; its weights do not matter) and load ``<path>.pt``. ``model`` is not modified."""
    from edgeslim.models._zoo import apply_state_dict, load_state_dict_file

    warnings.warn(
        "load_pruned() is deprecated; edgeslim.load(path, model=...) reads one recipe file for any chain",
        DeprecationWarning,
        stacklevel=2,
    )
    if str(path).endswith(".recipe"):
        return _recipe.load(path, model)
    base = Path(path)
    base = base.with_suffix("") if base.suffix in (".pt", ".json") else base
    recipe = read_recipe(base.with_suffix(".json"))
    model = apply_recipe(model, recipe["steps"])
    apply_state_dict(model, load_state_dict_file(base.with_suffix(".pt")), str(base.with_suffix(".pt")))
    rep = recipe.get("report", {})
    model.prune_report = PruneReport(
        rep.get("method", "?"),
        rep.get("macs_before", 0),
        rep.get("macs_after", 0),
        rep.get("params_before", 0),
        rep.get("params_after", 0),
        sparsity=rep.get("sparsity", 0.0),
        recipe=recipe["steps"],
        note="loaded from " + str(base),
    )
    return model.eval()


def apply_recipe(model: nn.Module, steps: list[dict]) -> nn.Module:
    """A copy of ``model`` with the recorded structure and masks of ``steps`` (weights not loaded)."""
    return _apply_steps(copy.deepcopy(model), steps)


def _apply_steps(model: nn.Module, steps: list[dict]) -> nn.Module:
    modules = dict(model.named_modules())
    for i, step in enumerate(steps):
        if step.get("method") == "block":
            for n in step["dropped"]:
                remove_block(model, n)
            modules = dict(model.named_modules())
        elif step.get("method") == "channel":
            strip_masks(model)
            apply_structure(model, step["structure"])
            for n in step.get("remask", []):
                attach_mask(modules[n], torch.ones_like(modules[n].weight))
        elif step.get("method") in ("magnitude", "nm"):
            cfg = PruneConfig.from_dict(step["config"], source=f"recipe step {i}")
            agp = cfg.schedule == Schedule.AGP
            for n in step["masked"]:
                if n not in modules:
                    raise ModelError(f"recipe step {i} masks module {n!r}, which this model lacks")
                w = modules[n].weight.detach()
                attach_mask(
                    modules[n],
                    torch.ones_like(w),
                    final=cfg.ratio if agp else 0.0,
                    steps=cfg.schedule_steps,
                    every=cfg.schedule_every,
                )
        else:
            raise ModelError(f"recipe step {i} has unknown method {step.get('method')!r}")
    return model


@_recipe.STEPS.register("prune")
def _replay_step(model: nn.Module, step: dict) -> nn.Module:
    """Rebuild one recorded prune step's structure (removed channels, or masks) on ``model`` in place."""
    state = dict(step.get("state", {}))
    return _apply_steps(model, [{**state, "config": step.get("config", {})}])


def replay(model: nn.Module, recipe_path: str | Path, *, example_inputs: Any) -> nn.Module:
    """Re-apply a channel-pruning recipe to ``model`` *with its own weights* (Torch-Pruning history replay):
    the same channels are removed, the surviving weights are ``model``'s. Returns a new model."""
    from edgeslim.prune._importance import torch_pruning

    tp = torch_pruning()
    recipe = read_recipe(recipe_path)
    model = copy.deepcopy(model).eval()
    for i, step in enumerate(recipe["steps"]):
        if step["method"] == "block":
            for n in step["dropped"]:
                remove_block(model, n)
            continue
        if step["method"] != "channel" or not step.get("history"):
            raise ModelError(
                f"replay() handles CNN channel and block steps only; step {i} is {step['method']!r}"
                f"{' (transformer)' if step['method'] == 'channel' else ''}: use load_pruned()"
            )
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
        dg.load_pruning_history(step["history"])
    return model


# ------------------------------------------------------------------------------ prune -> fine-tune loop
def prune_finetune(
    model: nn.Module,
    config: PruneConfig,
    *,
    train: Any,
    val: Any = None,
    steps: int = 3,
    train_config: Any = None,
    example_inputs: Any,
    checkpoint_dir: str | Path | None = None,
    device: str = "cpu",
    max_steps_per_epoch: int | None = None,
    progress: bool = False,
) -> nn.Module:
    """Reach ``config``'s target in ``steps`` rounds of prune -> :func:`edgeslim.train.fit`.

    Each round removes an equal share (geometric for channel/MAC targets, linear for sparsity). With
    ``checkpoint_dir`` every finished round is saved (``round_<i>.json/.pt``) and fit checkpoints each epoch,
    so an interrupted run picks up where it stopped. Returns the final model (with ``prune_report``;
    ``prune_history`` lists each round's MACs and accuracy).
    """
    if steps < 1:
        raise ConfigError(f"prune_finetune(steps={steps}) must be >= 1")
    if config.method == PruneMethod.BLOCK and steps > config.blocks:
        raise ConfigError(
            f"prune_finetune(steps={steps}) with PruneConfig(method='block', blocks={config.blocks}): each round "
            "removes at least one block, so steps must be <= blocks"
        )
    train_config = train_config or TrainConfig(epochs=1)
    ck = Path(checkpoint_dir) if checkpoint_dir else None
    original = model
    current = model
    macs0 = count_macs(model, example_inputs)
    history: list[dict] = []
    start = 0
    if ck:
        done = sorted(int(p.stem.split("_")[1]) for p in ck.glob("round_*.recipe"))
        if done:
            start = done[-1]
            current = _recipe.load(ck / f"round_{start}.recipe", original)
            history = json.loads((ck / "history.json").read_text()) if (ck / "history.json").is_file() else []
            history = [r for r in history if r["round"] <= start]
            log.info("resuming prune_finetune after round %d from %s", start, ck)
    for i in range(start + 1, steps + 1):
        if config.method == PruneMethod.CHANNEL:
            if config.target_macs is not None:
                goal = 1 - (1 - config.target_macs) ** (i / steps)
                now = 1 - count_macs(current, example_inputs) / macs0
                step_cfg = config.replace(target_macs=max(1e-3, 1 - (1 - goal) / (1 - now)))
            else:
                step_cfg = config.replace(ratio=1 - (1 - config.ratio) ** (1 / steps))
        elif config.method == PruneMethod.BLOCK:
            step_cfg = config.replace(blocks=config.blocks * i // steps - config.blocks * (i - 1) // steps)
        else:
            step_cfg = config.replace(ratio=config.ratio * i / steps, schedule=Schedule.ONESHOT)
        pruned = prune(current, step_cfg, example_inputs=example_inputs, data=train)
        res = fit(
            pruned,
            train,
            val,
            train_config,
            checkpoint_dir=ck / f"fit_{i}" if ck else None,
            device=device,
            max_steps_per_epoch=max_steps_per_epoch,
            progress=progress,
        )
        current = res.model
        current.prune_report = pruned.prune_report
        row = {"round": i, "macs": count_macs(current, example_inputs), "val_accuracy": res.best_accuracy}
        history.append(row)
        if ck:
            _recipe.save(current, ck / f"round_{i}.recipe", force=True)
            write_json(ck / "history.json", history, force=True)
    current.prune_history = history
    return current
