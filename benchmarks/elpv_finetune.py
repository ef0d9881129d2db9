"""Fine-tune ImageNet MobileNetV2 and EfficientNet-Lite0 at 224x224 on ELPV solar cells (functional vs defective).

The recipe is benchmarks/configs/elpv_finetune.yaml (preprocessing and edgeslim TrainConfig per model); training is
edgeslim's own trainer (``edgeslim.train.fit``: AdamW, linear warm-up then cosine, random 2-pixel shifts and flips)
with a class-weighted cross-entropy, the early high-resolution stages frozen (``frozen`` in the recipe: they hold
3/4 of the backward cost on a 2-core CPU), a checkpoint every epoch, and resume after an interruption. The best epoch by
validation accuracy is kept (with 4 epochs this selects on the validation split the benchmark reports: say so
when quoting the figure).

The weights are derived from CC-BY-NC-SA data: they go to ``$EDGESLIM_CACHE/elpv/`` (default ~/.cache/edgeslim/elpv/)
with a JSON record (recipe, history, minutes, host), never into the repository. ``benchmarks/elpv_int8.py`` reuses
them when the record's recipe matches, and fine-tunes otherwise.

    python benchmarks/elpv_finetune.py                          # both models (CPU: tens of minutes each)
    python benchmarks/elpv_finetune.py --models mobilenet_v2    # one
    python benchmarks/elpv_finetune.py --force                  # ignore cached weights (checkpoints still resume)
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

import edgeslim as es  # noqa: E402
from edgeslim.core.config import load_yaml  # noqa: E402
from edgeslim.core.io import save_torch, write_json  # noqa: E402
from edgeslim.core.metrics import host_info  # noqa: E402
from edgeslim.core.seed import seed_everything  # noqa: E402
from edgeslim.data import ImagePreprocess  # noqa: E402
from edgeslim.data._sources import cache_dir  # noqa: E402
from edgeslim.train import TrainConfig  # noqa: E402
from edgeslim.train._trainer import fit  # noqa: E402

RECIPE = Path(__file__).parent / "configs" / "elpv_finetune.yaml"
log = logging.getLogger("elpv_finetune")


def load_recipe(path: Path = RECIPE) -> dict[str, Any]:
    """The YAML recipe, with each model's ``preprocess`` and ``train`` as edgeslim configs (validated)."""
    raw = load_yaml(path.read_text(), source=str(path))
    models = {}
    for name, block in raw["models"].items():
        models[name] = {
            **block,
            "preprocess": ImagePreprocess.from_dict(block["preprocess"], source=f"{path}: models.{name}.preprocess"),
            "train": TrainConfig.from_dict(block["train"], source=f"{path}: models.{name}.train"),
        }
    return {**raw, "models": models}


def recipe_key(recipe: dict[str, Any], name: str) -> str:
    """A short hash of what determines a model's fine-tuned weights (its block, the split seed, the loss)."""
    block = recipe["models"][name]
    what = {
        "spec": block["spec"],
        "init": block["init"],
        "frozen": list(block.get("frozen", [])),
        "preprocess": block["preprocess"].to_dict(),
        "train": block["train"].to_dict(),
        "split_seed": recipe["split_seed"],
        "class_weighted_loss": recipe["class_weighted_loss"],
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


def build(name: str, recipe: dict[str, Any], weights: str | Path | None = None) -> nn.Module:
    """The model of ``name``: ImageNet-initialised with a fresh 2-class classifier, or loaded from ``weights``."""
    block = recipe["models"][name]
    spec, pre = block["spec"], block["preprocess"]
    if spec == "mobilenet_v2":
        if weights is not None:
            return es.models.load("mobilenet_v2", "elpv", weights=weights, preprocess=pre)
        return es.models.load("mobilenet_v2", "elpv", pretrained="imagenet", preprocess=pre)
    if spec == "timm:tf_efficientnet_lite0":
        if weights is not None:
            return es.models.load(f"{spec}(num_classes=2)", weights=weights)
        from edgeslim.models._sources import parse_spec
        from edgeslim.models._zoo import imagenet_efficientnet_lite0_weights

        model = es.models.load(spec, weights=imagenet_efficientnet_lite0_weights())
        model.reset_classifier(2)
        model.edgeslim_source = parse_spec(f"{spec}(num_classes=2)").record()  # as it is rebuilt from its weights
        return model
    raise SystemExit(f"{RECIPE}: models.{name}.spec {spec!r} is not one this script builds")


def paths(name: str) -> dict[str, Path]:
    root = cache_dir() / "elpv"
    return {"weights": root / f"{name}.pt", "record": root / f"{name}.json", "checkpoints": root / f"{name}-ckpt"}


def cached(name: str, recipe: dict[str, Any]) -> dict[str, Any] | None:
    """The cached record of ``name`` if its weights exist and were trained with this recipe, else None."""
    p = paths(name)
    if not (p["weights"].is_file() and p["record"].is_file()):
        return None
    rec = json.loads(p["record"].read_text())
    return rec if rec.get("recipe_key") == recipe_key(recipe, name) else None


def weighted_step(weights: torch.Tensor):
    """A trainer step_fn: cross-entropy weighted by ``weights`` per class."""
    criterion = nn.CrossEntropyLoss(weight=weights)

    def step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, Any]:
        out = model(x)
        return criterion(out, y), out

    return step


def finetune(name: str, recipe: dict[str, Any], *, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Fine-tune ``name`` (or reuse the cached weights); returns the record written beside the weights."""
    if not force and (rec := cached(name, recipe)) is not None:
        log.warning("%s: reusing fine-tuned weights %s (val accuracy %.4f)", name, rec["weights"], rec["val_accuracy"])
        return rec
    block = recipe["models"][name]
    cfg: TrainConfig = block["train"]
    torch.set_num_threads(int(recipe.get("torch_threads", 2)))
    t0 = time.perf_counter()
    train, val = es.data.load("elpv", seed=recipe["split_seed"], preprocess=block["preprocess"])
    val.normalized()  # decoded once, evaluated every epoch
    counts = torch.bincount(train.labels, minlength=train.num_classes).float()
    class_w = counts.sum() / (len(counts) * counts) if recipe["class_weighted_loss"] else torch.ones_like(counts)
    seed_everything(cfg.seed)  # the new classifier's initialisation
    model = build(name, recipe)
    frozen = tuple(block.get("frozen", []))
    n_frozen = 0
    for pname, param in model.named_parameters():
        if pname.startswith(frozen):
            param.requires_grad_(False)
            n_frozen += param.numel()
    if frozen and not n_frozen:
        raise SystemExit(f"{RECIPE}: models.{name}.frozen {list(frozen)} matches no parameter")
    p = paths(name)
    res = fit(
        model,
        train,
        val,
        cfg,
        checkpoint_dir=p["checkpoints"],
        resume=True,
        progress=progress,
        step_fn=weighted_step(class_w),
        channels_last=True,
    )
    minutes = (time.perf_counter() - t0) / 60
    final = res.history[-1]["val_accuracy"] if res.history else float("nan")
    save_torch(res.model.state_dict(), p["weights"], force=True)
    rec = {
        "model": name,
        "spec": block["spec"],
        "weights": str(p["weights"]),
        "recipe": str(RECIPE.name),
        "recipe_key": recipe_key(recipe, name),
        "train_config": cfg.to_dict(),
        "preprocess": block["preprocess"].to_dict(),
        "frozen_parameters": n_frozen,
        "trained_parameters": sum(q.numel() for q in model.parameters()) - n_frozen,
        "class_weights": [round(float(v), 4) for v in class_w],
        "train_size": len(train),
        "val_size": len(val),
        "val_accuracy": res.best_accuracy,
        "val_accuracy_last_epoch": final,
        "history": res.history,
        "resumed_from_epoch": res.resumed_from_epoch,
        "minutes": round(minutes, 1),
        "minutes_note": "wall time of this call (data decoding + training + per-epoch validation); a resumed run "
        "counts only its own part; CPU shared with other jobs (under load)",
        "torch_threads": torch.get_num_threads(),
        "host": host_info(),
        "load_avg": [round(v, 2) for v in os.getloadavg()],
    }
    write_json(p["record"], rec, force=True)
    log.warning("%s: val accuracy %.4f (best epoch), %.1f min", name, res.best_accuracy, minutes)
    return rec


def finetuned_model(name: str, recipe: dict[str, Any], *, progress: bool = False) -> tuple[nn.Module, dict]:
    """The fine-tuned model of ``name`` (training it first if the cache lacks it) and its record."""
    rec = finetune(name, recipe, progress=progress)
    return build(name, recipe, weights=rec["weights"]), copy.deepcopy(rec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=None, help="models of the recipe (default: all)")
    ap.add_argument("--force", action="store_true", help="train even when cached weights match the recipe")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("edgeslim.train").setLevel(logging.INFO)  # one line per epoch
    recipe = load_recipe()
    for name in args.models or list(recipe["models"]):
        if name not in recipe["models"]:
            raise SystemExit(f"unknown model {name!r}; the recipe has {', '.join(recipe['models'])}")
        finetune(name, recipe, force=args.force, progress=not args.no_progress)


if __name__ == "__main__":
    main()
