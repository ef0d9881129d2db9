"""One candidate of :func:`edgeslim.optimize`: build it from its parameters (every step cached), export it,
and measure it on the budget's target.

``build_candidate(base, params, ctx)`` is deterministic: the same base weights, data, parameters and seed give
the same model, so a candidate's parameters are its recipe. The steps run in order and each is cached under
``out/cache`` by a content key (the key of the step before it + its own settings):

    remove blocks -> prune channels (+ BatchNorm recalibration) -> low-rank factorization
        ->  recovery (fine-tune or distillation from the input model)  ->  weight clustering
        ->  INT8 PTQ (or mixed precision, or FP16) + ONNX export  ->  measurement on the chosen runtime/threads

Multi-fidelity: a pruned (or factorized) candidate's accuracy after its last structural step (BatchNorm
recalibrated after pruning) decides whether it earns its recovery steps
(:class:`Gated` otherwise). Time: with ``Context.deadline`` set, every step checks it before it starts and the
recovery loop before every optimizer step; a candidate the deadline stops raises :class:`DeadlineReached` and
nothing partial is cached (a half-recovered model is not the candidate its parameters describe). With
``Space.recovery_processes > 1`` the recovery runs as torchrun DDP processes (:mod:`._recovery_ddp`), stopped by
the same deadline.

Latency is never inferred from MACs: it is measured on the runtime (``target="host"``) or predicted for a
device profile from the exported graph (roofline calibrated on this host's measured FP32 latency).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeslim.core.artifact import Artifact
from edgeslim.core.metrics import host_info
from edgeslim.core.modules import first_match
from edgeslim.pipeline._budget import MB, Budget
from edgeslim.pipeline._space import CLUSTER_MIN_WEIGHTS_PER_CLUSTER, Space, recovery_steps
from edgeslim.pipeline._store import Cache, key
from edgeslim.pipeline._task import Classify, recovery_train_config  # noqa: F401 - benchmarks import it here

log = logging.getLogger(__name__)

EXPORT_OPSET = 17


@dataclass
class Context:
    """Everything a trial needs besides its parameters (built once per optimize call)."""

    base: nn.Module
    base_key: str
    train: Any
    val: Any
    search_val: Any
    example_inputs: torch.Tensor
    space: Space
    budget: Budget
    seed: int
    cache: Cache
    early_layers: tuple[str, ...] = ()
    device: Any = None  # the target Device for a profile target
    calibration: Any = None  # the roofline's parameters (profile target)
    latency_how: str = ""  # how a profile's latency is predicted
    base_torch_accuracy: float | None = None
    host: dict[str, Any] = field(default_factory=host_info)
    deadline: float | None = None  # time.perf_counter() value after which no step starts and recovery stops
    stage: str = ""  # "structure" while a candidate's structure (blocks, channels, factorization) is being built
    ungated: bool = False  # the current trial skips the multi-fidelity gate (a promoted structure)
    notes: list[str] = field(default_factory=list)  # said in the report (e.g. search choices the model cannot take)
    recal_best: dict[str, float] = field(default_factory=dict)  # best BN-recal accuracy per depth (see depth())
    task: Classify = field(default_factory=Classify)  # what candidates are scored by (accuracy or mAP)

    def past_deadline(self) -> bool:
        return self.deadline is not None and time.perf_counter() >= self.deadline

    def check_deadline(self, step: str) -> None:
        if self.past_deadline():
            raise DeadlineReached(f"stopped before {step}: the run's max_minutes was reached")


def early_layers(model: nn.Module, space: Space) -> tuple[str, ...]:
    """The early layers kept whole when ``keep_early`` is chosen: the space's globs, else the first quarter of the
    convolutions (in definition order)."""
    if space.early_layers:
        return tuple(space.early_layers)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]
    return tuple(convs[: max(1, len(convs) // 4)]) if convs else ()


# ---------------------------------------------------------------------------------------------- build
class Gated(Exception):
    """A candidate the multi-fidelity gate stops before its expensive step (recorded; not an error)."""

    def __init__(self, text: str, recal_accuracy: float | None = None) -> None:
        super().__init__(text)
        self.recal_accuracy = recal_accuracy


class DeadlineReached(Exception):
    """The run's time is up inside a trial: the trial stops cleanly and is recorded as pruned (not cached)."""


#: the steps that change a candidate's layers, in the order they run (the recovery follows the last of them)
STRUCTURAL_STEPS = ("blocks", "prune", "factorize")


def pruned_accuracy(steps: dict[str, Any]) -> float:
    """The torch accuracy (search subset) of a candidate after its last structural step: pruning (BatchNorm
    recalibrated) or factorization."""
    last = [n for n in STRUCTURAL_STEPS if n in steps][-1]
    return steps[last]["torch_accuracy_search"]


def base_accuracy(ctx: Context) -> float:
    """The input model's torch accuracy on the search subset (what a pruned model's is compared with)."""
    if ctx.base_torch_accuracy is None:
        ctx.base_torch_accuracy = ctx.task.score(ctx.base, ctx.search_val)
    return ctx.base_torch_accuracy


def prune_config(ctx: Context, params: dict[str, Any]) -> Any:
    """The channel-pruning config of a candidate (BatchNorm recalibrated after it when chosen)."""
    from edgeslim.prune._config import PruneConfig

    sp = ctx.space
    return PruneConfig(
        method="channel",
        target_macs=params["target_macs"],
        importance=sp.importance,
        scope=params.get("prune_scope") or "layer",
        round_to=sp.round_to,
        exclude=ctx.early_layers if params["keep_early"] else (),
        recalibrate_bn=sp.bn_samples if params["recalibrate_bn"] else 0,
        seed=ctx.seed,
    )


def block_config(ctx: Context, params: dict[str, Any]) -> Any:
    """The depth-pruning config of a candidate. Without BatchNorm recalibration: one cached greedy ranking per depth
    serves the candidates that prune channels after it and those that do not (these recalibrate in a step of their
    own: :func:`_block_recal_step`). The ranking is most of the step's time: 23-31 s per depth for MobileNetV2 on
    Fashion-MNIST on a 2-core AVX2 host, where it ran twice per depth when the config carried the recalibration."""
    from edgeslim.prune._config import PruneConfig

    return PruneConfig(method="block", blocks=int(params["drop_blocks"]), recalibrate_bn=0)


def factorize_config(ctx: Context, params: dict[str, Any], model: nn.Module) -> tuple[Any, dict[str, str]]:
    """The low-rank factorization config of a candidate: every layer of ``model`` the method applies to keeps at
    most ``1 - factorize`` of its MACs; layers where even rank 1 keeps more (a head with one or two outputs) are
    excluded, and returned with the reason (said in the step record)."""
    from edgeslim.share import FactorizeConfig
    from edgeslim.share._factorize import min_mac_ratio

    ratio = round(1.0 - float(params["factorize"]), 9)
    method = ctx.space.factorize_method
    out = {}
    for name, m in model.named_modules():
        low = min_mac_ratio(m, method) if name else None
        if low is not None and ratio < low * (1 + 1e-9):
            out[name] = f"rank 1 keeps {low:.3g} of its MACs, more than {ratio:g}"
    return FactorizeConfig(method=method, mac_ratio=ratio, exclude=tuple(out)), out


def cluster_config(ctx: Context, params: dict[str, Any]) -> Any:
    """The weight-clustering config of a candidate (layers with fewer than 4k weights left dense)."""
    from edgeslim.share import ClusterConfig

    k = int(params["cluster"])
    return ClusterConfig(clusters=k, min_weights=CLUSTER_MIN_WEIGHTS_PER_CLUSTER * k, seed=ctx.seed)


#: the parameters that fix a candidate's structure (built before any recovery or quantization)
STRUCTURE = ("drop_blocks", "target_macs", "prune_scope", "keep_early", "factorize")


def structure_key(params: dict[str, Any]) -> str:
    """A candidate's structure: candidates sharing it fail alike when building it fails (an unreachable target)."""
    return repr({k: params.get(k) for k in STRUCTURE})


def depth(params: dict[str, Any]) -> str:
    """The pruning depth a candidate's recalibrated accuracy is compared at (the relative gate)."""
    d = f"{int(params.get('drop_blocks') or 0)} blocks, {float(params.get('target_macs') or 0):g} MACs"
    return d + (f", factorized {float(params['factorize']):g}" if params.get("factorize") else "")


def gate(ctx: Context, params: dict[str, Any], recal: float) -> None:
    """Multi-fidelity: raise :class:`Gated` when a pruned candidate's BatchNorm-recalibrated accuracy says its
    recovery is not worth the steps: more than ``finetune_gate`` below the input model (absolute rule) or more
    than ``gate_margin`` below the best recalibrated accuracy the study has seen at the same depth (relative)."""
    sp = ctx.space
    if ctx.ungated:  # a promoted structure: chosen for its measured speed, its recovery is the point of the trial
        return
    drop = base_accuracy(ctx) - recal
    what = getattr(ctx.task, "metric_label", "accuracy")  # a detector's is mAP@[.5:.95]
    if sp.finetune_gate is not None and drop > sp.finetune_gate:
        raise Gated(
            f"not fine-tuned: after pruning (and BatchNorm recalibration) the torch model's {what} on the search "
            f"subset is {100 * drop:.1f} pt below the input model's, more than finetune_gate="
            f"{100 * sp.finetune_gate:.0f} pt",
            recal,
        )
    best = ctx.recal_best.get(depth(params))
    if sp.gate_margin is not None and best is not None and recal < best - sp.gate_margin:
        raise Gated(
            f"not recovered: its BatchNorm-recalibrated {what} {100 * recal:.1f}% is {100 * (best - recal):.1f} "
            f"pt below the best seen at the same depth ({depth(params)} removed: {100 * best:.1f}%), "
            f"more than gate_margin={100 * sp.gate_margin:g} pt",
            recal,
        )


def _prune_step(ctx: Context, name: str, model: nn.Module, parent: str, cfg: Any) -> tuple[nn.Module, str, dict]:
    """One cached pruning step (blocks or channels) on ``model`` (whose cache key is ``parent``)."""
    from edgeslim.prune._api import prune

    pk = key("prune", parent, cfg.to_dict())
    with ctx.cache.claim(name, pk) as d:
        meta = Cache.done(d)
        if meta:
            return load_step(ctx.base, d / "model.recipe"), pk, {**meta, "cached": True}
        ctx.check_deadline("pruning" if name == "prune" else "removing blocks")
        t0 = time.perf_counter()
        out = prune(model, cfg, example_inputs=ctx.example_inputs, data=ctx.train)
        rep = out.prune_report
        acc = ctx.task.score(out, ctx.search_val)
        save_step(out, d / "model.recipe")
        return (
            out,
            pk,
            Cache.finish(
                d,
                {
                    "seconds": round(time.perf_counter() - t0, 2),
                    "macs_before": rep.macs_before,
                    "macs_after": rep.macs_after,
                    "params_after": rep.params_after,
                    "config": cfg.to_dict(),
                    "torch_accuracy_search": acc,
                    "summary": rep.summary().splitlines()[0],
                    **({"removed": list(rep.layers)} if name == "blocks" else {}),
                },
            ),
        )


def _block_recal_step(ctx: Context, model: nn.Module, parent: str, meta: dict[str, Any]) -> tuple[nn.Module, str, dict]:
    """BatchNorm recalibrated on the model whose blocks were removed (cache key ``parent``, step record ``meta``):
    cached in the blocks' folder, recorded as the blocks step (its accuracy is the recalibrated one; its seconds
    the ranking's plus the recalibration's)."""
    from edgeslim.train import recalibrate_bn

    n = ctx.space.bn_samples
    rk = key("blocks-bn-recal", parent, n)
    with ctx.cache.claim("blocks", rk) as d:
        done = Cache.done(d)
        if done:
            return load_step(ctx.base, d / "model.recipe"), rk, {**done, "cached": True}
        ctx.check_deadline("recalibrating BatchNorm")
        t0 = time.perf_counter()
        out = recalibrate_bn(model, ctx.train, num_samples=n)  # a copy with the same recipe, new statistics
        acc = ctx.task.score(out, ctx.search_val)
        save_step(out, d / "model.recipe")
        rec = {k: v for k, v in meta.items() if k != "cached"}
        rec.update(
            seconds=round(float(meta.get("seconds") or 0.0) + time.perf_counter() - t0, 2),
            torch_accuracy_search_before_bn_recal=meta.get("torch_accuracy_search"),
            torch_accuracy_search=acc,
            bn_recalibrated_on=n,
        )
        return out, rk, Cache.finish(d, rec)


def _share_step(
    ctx: Context,
    params: dict[str, Any],
    name: str,
    model: nn.Module,
    parent: str,
    cfg: Any,
    excluded: dict[str, str] | None = None,
) -> tuple[nn.Module, str, dict]:
    """One cached share/ step (``factorize``, BatchNorm recalibrated after it when chosen, or ``cluster``) on
    ``model`` (whose cache key is ``parent``); ``excluded``: layers the config leaves out, and why."""
    from edgeslim.core.counting import count_macs, count_params
    from edgeslim.share import cluster, factorize
    from edgeslim.train import recalibrate_bn

    recal = ctx.space.bn_samples if name == "factorize" and params.get("recalibrate_bn") else 0
    sk = key(name, parent, cfg.to_dict(), *((recal,) if recal else ()))
    with ctx.cache.claim(name, sk) as d:
        meta = Cache.done(d)
        if meta:
            return load_step(ctx.base, d / "model.recipe"), sk, {**meta, "cached": True}
        ctx.check_deadline("factorization" if name == "factorize" else "clustering")
        t0 = time.perf_counter()
        macs_before, params_before = count_macs(model, ctx.example_inputs), count_params(model)
        if name == "factorize":
            out = factorize(model, cfg, example_inputs=ctx.example_inputs)
        else:
            out = cluster(model, cfg)
        rep = out.report
        acc_before_recal = None
        if recal:
            acc_before_recal = ctx.task.score(out, ctx.search_val)
            tuned = recalibrate_bn(out, ctx.train, num_samples=recal)  # a copy with the same recipe, new statistics
            tuned.report = rep
            out = tuned
        acc = ctx.task.score(out, ctx.search_val)
        save_step(out, d / "model.recipe")
        rec: dict[str, Any] = {
            "seconds": round(time.perf_counter() - t0, 2),
            "config": cfg.to_dict(),
            "torch_accuracy_search": acc,
            "summary": rep.summary(),
            "left_as_is": {**(excluded or {}), **{r["name"]: r["reason"] for r in rep.skipped()}},
        }
        if recal:
            rec.update(bn_recalibrated_on=recal, torch_accuracy_search_before_bn_recal=acc_before_recal)
        if name == "factorize":  # MACs of the whole model (batch 1): layers the method skips count as they were
            rec.update(
                macs_before=macs_before,
                macs_after=count_macs(out, ctx.example_inputs),
                params_before=params_before,
                params_after=count_params(out),
                ranks={r["name"]: r["rank"] for r in rep.done()},
            )
        else:  # clustering keeps every weight (and so MACs, latency and the file's bytes); the codebooks:
            rec.update(
                clusters=cfg.clusters,
                clustered_layers=[r["name"] for r in rep.done()],
                clustered_weights=sum(r["clustered_weights"] for r in rep.done()),
                weight_mse={r["name"]: r["mse"] for r in rep.done()},
            )
        return out, sk, Cache.finish(d, rec)


def float_model(ctx: Context, params: dict[str, Any]) -> tuple[nn.Module, str, dict[str, Any]]:
    """The float model of a candidate (blocks removed, channels pruned, factorized, recovered, clustered, or the
    base), its cache key and step records."""
    model, pk = ctx.base, ctx.base_key
    steps: dict[str, Any] = {}
    ctx.stage = "structure"  # a failure from here to the recovery is the structure's (see structure_key)
    if params.get("drop_blocks"):
        model, pk, steps["blocks"] = _prune_step(ctx, "blocks", model, pk, block_config(ctx, params))
        if params["recalibrate_bn"] and not params.get("target_macs"):  # channel pruning would recalibrate after it
            model, pk, steps["blocks"] = _block_recal_step(ctx, model, pk, steps["blocks"])
    if params.get("target_macs"):
        cfg = prune_config(ctx, params)
        if cfg.exclude and params.get("drop_blocks"):  # early layers inside a removed block are gone
            names = [n for n, _ in model.named_modules()]
            cfg = cfg.replace(exclude=tuple(e for e in cfg.exclude if any(first_match(n, [e]) for n in names)))
        model, pk, steps["prune"] = _prune_step(ctx, "prune", model, pk, cfg)
    if params.get("factorize"):
        cfg, unreachable = factorize_config(ctx, params, model)
        model, pk, steps["factorize"] = _share_step(ctx, params, "factorize", model, pk, cfg, unreachable)
    ctx.stage = ""
    n_steps = recovery_steps(ctx.space, params)
    if n_steps:
        model, pk = _recovery_step(ctx, params, model, pk, steps, n_steps)
    if params.get("cluster"):
        model, pk, steps["cluster"] = _share_step(ctx, params, "cluster", model, pk, cluster_config(ctx, params))
    return model, pk, steps


def _recovery_step(
    ctx: Context, params: dict[str, Any], model: nn.Module, pk: str, steps: dict[str, Any], n_steps: int
) -> tuple[nn.Module, str]:
    """The cached recovery of ``model`` (its cache key ``pk``); when not cached, gated first; records its step in
    ``steps``."""
    how = params.get("recovery") or "finetune"
    tcfg, cap = recovery_config(ctx, n_steps)
    procs = ctx.space.recovery_processes
    # DDP shards every batch (BatchNorm statistics per shard): not bit-identical to one process, so keyed apart
    rk = key(
        how,
        pk,
        tcfg.to_dict(),
        cap,
        *((ctx.task.distill_kw(),) if how == "distill" else ()),
        *((("processes", procs),) if procs > 1 else ()),
    )
    if not Cache.done(ctx.cache.path(how, rk)):  # the gate weighs steps not spent yet: a done one is served
        gate(ctx, params, pruned_accuracy(steps))
    with ctx.cache.claim(how, rk) as d:
        meta = Cache.done(d)
        if meta:
            tuned = load_step(ctx.base, d / "model.recipe")
            steps[how] = {**meta, "cached": True}
        else:
            ctx.check_deadline(how)
            t0 = time.perf_counter()
            ddp: dict[str, Any] = {}
            if procs > 1:
                from edgeslim.pipeline._recovery_ddp import recover_ddp

                source = ctx.cache.path("prune" if params.get("target_macs") else "blocks", pk) / "model.recipe"
                tuned, stopped_at, ddp = recover_ddp(ctx, d, source, how, tcfg, cap, procs)
            else:
                tuned, stopped_at = ctx.task.recover(ctx.base, ctx.train, model, how, tcfg, cap, ctx.past_deadline)
            if stopped_at is not None:
                raise DeadlineReached(
                    f"{how} stopped at step {stopped_at} of {n_steps}: the run's max_minutes was reached "
                    "(the partly recovered model is not kept)"
                )
            acc = ctx.task.score(tuned, ctx.search_val)
            if procs == 1:  # rank 0 has written it otherwise
                save_step(tuned, d / "model.recipe")
            steps[how] = Cache.finish(
                d,
                {
                    "seconds": round(time.perf_counter() - t0, 2),
                    "steps": tcfg.epochs * cap,
                    "config": tcfg.to_dict(),
                    **({"distill": ctx.task.distill_kw()} if how == "distill" else {}),
                    **ddp,
                    "torch_accuracy_search": acc,
                },
            )
    return tuned, rk


def recovery_config(ctx: Context, n_steps: int) -> tuple[Any, int]:
    """The train config of a recovery of ``n_steps`` optimizer steps (a TrainConfig, or a DetectTrainConfig for
    detectors), and the steps per epoch it is capped at."""
    return ctx.task.train_config(ctx.space, len(ctx.train), n_steps, ctx.seed)


def recover(
    base: nn.Module, train: Any, model: nn.Module, how: str, tcfg: Any, cap: int, stop: Any
) -> tuple[nn.Module, int | None]:
    """Fine-tune a classifier ``model`` on ``train`` or distill the input model ``base`` into it (in this process,
    or in each rank of a torchrun group); ``stop`` (the deadline) ends it before a step (returns that step)."""
    return Classify().recover(base, train, model, how, tcfg, cap, stop)


def quant_config(ctx: Context, params: dict[str, Any]) -> Any:
    """The QuantConfig of a candidate: INT8 static PTQ with its choices, FP16, or None (FP32)."""
    from edgeslim.quantize._config import QuantConfig

    if params.get("quantize"):
        runtime, threads = deployment(ctx, params)
        measured = ctx.space.quant_placement == "measured" and ctx.budget.on_host and runtime == "onnxruntime"
        config = QuantConfig(
            per_channel=params["per_channel"],
            calibration=params["calibration"],
            equalize=bool(params.get("equalize")),
            bias_correction=params["bias_correction"],
            num_samples=ctx.space.calib_samples,
            seed=ctx.seed,
            **({"placement": "measured", "placement_threads": threads} if measured else {}),
        )
        return laid_out_for(config, runtime)
    if params.get("fp16"):
        return QuantConfig(mode="fp16")
    return None


MIXED_SENSITIVITY_SAMPLES = 500  # search-subset images each layer's sensitivity is scored on (mixed precision)


def remaining_drop(ctx: Context, float_steps: dict[str, Any]) -> float:
    """The accuracy drop left for quantization after pruning and recovery (torch, search subset), >= 0."""
    last = [v for v in float_steps.values() if "torch_accuracy_search" in v]
    acc = last[-1]["torch_accuracy_search"] if last else base_accuracy(ctx)
    return max(0.0, float(ctx.budget.max_accuracy_drop or 0.0) - max(0.0, base_accuracy(ctx) - acc))


def candidate_key(ctx: Context, fkey: str, params: dict[str, Any], float_steps: dict[str, Any] | None = None) -> str:
    qcfg = quant_config(ctx, params)
    mixed = None
    if params.get("quantize") and params.get("mixed_precision"):
        mixed = round(remaining_drop(ctx, float_steps or {}), 6), MIXED_SENSITIVITY_SAMPLES
    return key("candidate", fkey, qcfg.to_dict() if qcfg else None, EXPORT_OPSET, *((mixed,) if mixed else ()))


def build_candidate(ctx: Context, params: dict[str, Any]) -> tuple[nn.Module, Artifact, str, dict[str, Any]]:
    """Build (or load from the cache) one candidate: its torch model, its validated ONNX artifact, its cache key
    and the record of every step (time spent, whether it was cached, accuracy after it)."""
    model, fkey, steps = float_model(ctx, params)
    ck = candidate_key(ctx, fkey, params, steps)
    with ctx.cache.claim("candidate", ck) as d:
        return _quantize_export(ctx, params, model, ck, d, steps)


def _quantize(
    ctx: Context, params: dict[str, Any], model: nn.Module, float_steps: dict[str, Any], rec: dict[str, Any]
) -> nn.Module:
    """INT8 PTQ (every layer, or mixed precision under the accuracy budget left) or FP16 of ``model``."""
    from edgeslim.quantize._api import quantize

    qcfg = quant_config(ctx, params)
    if params.get("quantize") and params.get("mixed_precision"):
        from edgeslim.quantize._sensitivity import BudgetConfig, quantize_with_budget

        left = remaining_drop(ctx, float_steps)
        res = quantize_with_budget(
            model,
            BudgetConfig(max_accuracy_drop=left, quant=qcfg, sensitivity_samples=MIXED_SENSITIVITY_SAMPLES),
            data=(ctx.train, ctx.search_val),
        )
        rec["mixed_precision"] = {
            "accuracy_budget_left": left,
            "met": res.met,
            "kept_float": list(res.kept_float),
            "drop_torch": res.drop,
            "scored_on": f"{len(ctx.search_val)} search-subset images (torch)",
        }
        return res.model
    if params.get("quantize"):
        return quantize(model, qcfg, data=ctx.train)
    return quantize(model, qcfg, example_inputs=ctx.example_inputs)


def _dense(model: nn.Module) -> nn.Module:
    """``model`` with clustered layers made plain again (their weights ``centroids[indices]``), for an FP32 file:
    exported as they are, they would be a Gather of int64 indices per layer and BatchNorm left unfolded (a larger
    file). Quantization (INT8, FP16) makes its own copy dense. Other models are returned as they are."""
    from edgeslim.share import ClusteredLayer, strip_clustering

    return strip_clustering(model) if any(isinstance(m, ClusteredLayer) for m in model.modules()) else model


SEARCH_FLOORS_KW = {"float_min_cosine": -1.0, "float_min_sqnr_db": -1e9, "float_top1_agreement": 0.0}


def _quantize_export(
    ctx: Context, params: dict[str, Any], model: nn.Module, ck: str, d: Path, steps: dict[str, Any]
) -> tuple[nn.Module, Artifact, str, dict[str, Any]]:
    from edgeslim.export._api import ValidationFloors, export

    quantized = params.get("quantize") or params.get("fp16")
    if not quantized:
        model = _dense(model)
    meta = Cache.done(d)
    if meta:
        final = load_step(ctx.base, d / "model.recipe") if quantized else model
        steps["export"] = {**meta, "cached": True}
        return final, Artifact.load(d / "model.onnx"), ck, steps
    ctx.check_deadline("quantization and export")
    t0 = time.perf_counter()
    final = model
    rec: dict[str, Any] = {}
    if quantized:
        final = _quantize(ctx, params, model, steps, rec)
        save_step(final, d / "model.recipe")
        rec["quantize_seconds"] = round(time.perf_counter() - t0, 2)
        rec["quantize_summary"] = final.report.summary()
        rec["layers_kept_float"] = [x["name"] for x in getattr(final.report, "skipped_layers", [])]
    t1 = time.perf_counter()
    # the file must compute what the model computes (export's own gate); how much INT8 lost against FP32 is the
    # budget's question, measured on the search data, so export's FP32 floors are off here (still recorded)
    art = export(
        final,
        "onnx",
        example_inputs=ctx.task.validation_inputs(ctx.search_val),
        path=d / "model.onnx",
        force=True,
        opset=EXPORT_OPSET,
        floors=ValidationFloors(**SEARCH_FLOORS_KW),
    )
    rec["export_seconds"] = round(time.perf_counter() - t1, 2)
    rec["validation"] = {k: art.validation.get(k) for k in ("samples", "cosine", "sqnr_db", "top1_agreement")}
    rec["precision"] = art.precision
    steps["export"] = Cache.finish(d, rec)
    return final, art, ck, steps


# ---------------------------------------------------------------------------------------------- measure
#: blocks of timed runs per in-search latency measurement, a short pause between them; the fastest block's median
#: is the figure. A shared host's noise only ever slows a run down (another process, the hypervisor taking the
#: core), and one 50-run block of a 0.1 ms model lasts 5 ms: one such stall moved a whole median by up to 50%
#: (session 12: the same structure measured 0.065 and 0.100 ms in two runs), which misordered candidates in the sweep
#: and the Pareto front. The final choice is re-measured interleaved with the baseline anyway.
LATENCY_BLOCKS = 5
LATENCY_PAUSE_S = 0.02


def block_latency(runner: Any, x: Any, runs: int, blocks: int = LATENCY_BLOCKS) -> tuple[float, list[float]]:
    """(the fastest block's median latency in ms, every block's median): ``blocks`` blocks of ``runs`` timed
    batch-1 runs each (10 warm-up runs before the first, 2 before each other), ``LATENCY_PAUSE_S`` apart."""
    from edgeslim.runtime import latency

    medians = []
    for i in range(blocks):
        if i:
            time.sleep(LATENCY_PAUSE_S)
        medians.append(float(latency(runner, x, warmup=10 if i == 0 else 2, runs=runs)["p50_ms"]))
    return min(medians), medians


def latency_label(ctx: Context, runner_desc: str, runs: int, blocks: list[float] | None = None) -> str:
    b = ctx.budget
    if b.on_host:
        how = f"median of {runs} runs after 10 warm-up"
        if blocks:
            how = (
                f"fastest of {len(blocks)} blocks' medians of {runs} runs each (after 10 warm-up; blocks "
                f"{min(blocks):.4g}-{max(blocks):.4g} ms)"
            )
        return f"measured on {runner_desc}, batch 1, {how}, host {ctx.host['cpu']} ({ctx.host['cores']} cores)"
    return f"predicted for {ctx.device.name}: {ctx.latency_how}; not measured on the device"


def laid_out_for(config: Any, runtime: str) -> Any:
    """``config`` with its Q/DQ pairs laid out for the deployment's ``runtime`` (``QuantConfig.runtime``) when
    edgeslim has a layout for it and the config can take the ONNX capture; else as it is (ORT's layout)."""
    from edgeslim.quantize._layout import LAYOUTS
    from edgeslim.quantize._onnx import needs_fx

    if runtime in LAYOUTS and config.mode == "static" and config.placement == "all" and not needs_fx(config):
        return config.replace(runtime=runtime)
    return config


def deployment(ctx: Context, params: dict[str, Any] | None) -> tuple[str, int]:
    """(runtime, threads) a candidate is deployed on: its searched choices, else the budget's."""
    p = params or {}
    return p.get("runtime") or ctx.budget.runtime, p.get("threads") or ctx.budget.threads


def measure_candidate(
    ctx: Context,
    art: Artifact,
    ck: str,
    *,
    data: Any = None,
    cache: bool = True,
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The figures the budget judges, each with where it came from.

    Accuracy: the task's metric (top-1, or mAP@[.5:.95] for detectors) measured on the candidate's runtime on
    ``data`` (default: the search subset). Latency: median
    batch-1 latency measured on that runtime with its threads (host; :func:`deployment`) or predicted for the
    device. Size: the file's bytes, and its bytes after zlib level 9 (``size_zipped_mb``; a measurement cached
    before that figure existed gets it added from the file). Peak memory and energy only when the budget limits
    them.
    """
    b, sp = ctx.budget, ctx.space
    data = ctx.search_val if data is None else data
    need_mem, need_energy = b.max_peak_memory_mb is not None, b.max_energy_mj is not None
    runtime, threads = deployment(ctx, params)
    mk = key(
        "measure",
        ck,
        f"latency-blocks-{LATENCY_BLOCKS}",
        runtime,
        threads,
        b.target,
        sp.latency_runs,
        need_mem,
        need_energy,
        data.name,
        data.split,
        len(data),
        ctx.host.get("cpu"),
        ctx.calibration.to_dict() if ctx.calibration else None,
    )
    if not cache:
        return _measure(ctx, art, data, None, runtime, threads)
    with ctx.cache.claim("measure", mk) as d:
        got = Cache.done(d)
        if got and "size_zipped_mb" not in got["figures"]:  # measured before the zipped size was a figure
            got["figures"]["size_zipped_mb"] = _zipped_bytes(art, None) / MB
            got["provenance"]["size_zipped_mb"] = ZIPPED_HOW.format(art.precision)
        return got or _measure(ctx, art, data, d, runtime, threads)


ZIPPED_HOW = "bytes of the ONNX file ({}) after zlib level 9 / 2**20"


def _zipped_bytes(art: Artifact, m: Any) -> int:
    """The artifact's bytes after zlib level 9: from the measurement ``m`` when it holds them, else computed."""
    import zlib

    got = m.get("size_zipped_bytes") if m is not None else None
    return int(got) if got is not None else len(zlib.compress(art.path.read_bytes(), 9))


def _measure(ctx: Context, art: Artifact, data: Any, d: Path | None, runtime: str, threads: int) -> dict[str, Any]:
    from edgeslim.runtime._measure import measure

    b, sp = ctx.budget, ctx.space
    need_mem, need_energy = b.max_peak_memory_mb is not None, b.max_energy_mj is not None
    t0 = time.perf_counter()
    detect = ctx.task.kind == "detect"  # mAP comes from the detection evaluation, not from measure's top-1
    m = measure(
        art,
        data=None if detect else data,
        runtime=runtime,
        threads=(threads,),
        runs=1,
        warmup=0,
        peak_memory=need_mem and b.on_host,
        label=art.path.name,
        input_shape=tuple(ctx.example_inputs.shape[1:]) if detect else None,
    )
    if detect:
        acc_value, acc_detail = ctx.task.score_file(art, data, runtime, threads)
    else:
        acc_value, acc_detail = m.figures["accuracy"].value, m.figures["accuracy"].detail
    figs: dict[str, Any] = {
        "accuracy": acc_value,
        "size_mb": art.size_bytes / MB,
        "size_zipped_mb": _zipped_bytes(art, m) / MB,
        "macs": float(art.meta.get("macs") or m.get("macs") or 0),
    }
    prov = {"accuracy": acc_detail, "size_mb": f"bytes of the ONNX file ({art.precision}) / 2**20"}
    prov["size_zipped_mb"] = ZIPPED_HOW.format(art.precision)
    if b.on_host:
        from edgeslim.runtime import RUNTIMES

        runner = RUNTIMES.get(runtime)(art, threads=threads)
        figs["latency_ms"], blocks = block_latency(runner, ctx.task.inputs(data, 1).numpy(), sp.latency_runs)
        prov["latency_ms"] = latency_label(ctx, runner.describe(), sp.latency_runs, blocks)
    else:
        from edgeslim.devices import predict_latency

        figs["latency_ms"] = predict_latency(art, ctx.device, ctx.calibration)["latency_ms"]
        prov["latency_ms"] = latency_label(ctx, "", 0)
    if need_mem:
        if b.on_host:
            figs["peak_memory_mb"] = m["peak_memory_mb"]
            prov["peak_memory_mb"] = m.figures["peak_memory_mb"].detail
        else:
            from edgeslim.devices import memory_fit

            fit = memory_fit(art, ctx.device)
            figs["peak_memory_mb"] = fit["required_mb"]
            prov["peak_memory_mb"] = f"predicted for {ctx.device.name}: weights + peak activations at batch 1"
    if need_energy:
        from edgeslim.devices import estimate_energy, get_device

        dev = ctx.device if ctx.device is not None else get_device("host")
        en = estimate_energy(art, dev)
        figs["energy_mj"] = en["energy_mj"]
        prov["energy_mj"] = f"{en['label']} ({en['source']}; {en['assumption']})"
    out = {
        "figures": figs,
        "provenance": prov,
        "deployment": {"runtime": runtime, "threads": threads},
        "seconds": round(time.perf_counter() - t0, 2),
        "samples": len(data),
        "data": f"{data.name}/{data.split}",
    }
    return Cache.finish(d, out) if d is not None else out


def interleaved_latency(
    ctx: Context, paths: list[Path], rounds: int = 3, deployments: list[tuple[str, int]] | None = None
) -> list[float]:
    """Median batch-1 latency (ms) of each file over ``rounds`` interleaved rounds, each on its (runtime, threads)
    deployment (default: the budget's), so drifting load on a shared host hits every file alike
    (:func:`edgeslim.runtime.interleaved_latency`)."""
    from edgeslim.runtime import RUNTIMES
    from edgeslim.runtime import interleaved_latency as interleaved

    b = ctx.budget
    deps = deployments or [(b.runtime, b.threads)] * len(paths)
    runners = {str(i): RUNTIMES.get(rt)(p, threads=th) for i, (p, (rt, th)) in enumerate(zip(paths, deps, strict=True))}
    got = interleaved(runners, ctx.task.inputs(ctx.val, 1).numpy(), rounds=rounds, runs=ctx.space.latency_runs)
    return [float(got[str(i)]["median_of_rounds_ms"]) for i in range(len(paths))]


# ---------------------------------------------------------------------------------------------- cache files
def save_step(model: nn.Module, path: Path) -> None:
    """A step's output as an edgeslim recipe file (its recorded steps + state_dict)."""
    from edgeslim.core import recipe

    recipe.save(model, path, force=True)


def load_step(base: nn.Module, path: Path) -> nn.Module:
    """A cached step's model: the steps recorded after ``base``'s own replayed on ``base``, then its weights."""
    from edgeslim.core import recipe

    blob = recipe.read(path)
    own = len(recipe.steps_of(base))
    model = recipe.replay(base, blob["steps"][own:])
    setattr(model, recipe.RECIPE_ATTR, [dict(st) for st in blob["steps"]])
    recipe.load_state_strict(model, blob["state_dict"], str(path))
    return model.eval()
