"""Student initialisation: layer-dropped transformers (DistilBERT style) and smaller zoo CNNs."""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn

from edgeslim.core.errors import ConfigError, ModelError


def layer_drop_student(bert_model: nn.Module, keep: Sequence[int] | None = None) -> nn.Module:
    """A copy of a Hugging Face ``BertModel`` keeping only the encoder layers ``keep`` (default every other).

    The embeddings, pooler and kept layers keep the teacher's weights, as in DistilBERT's initialisation.
    """
    enc = getattr(bert_model, "encoder", None)
    layers = getattr(enc, "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise ModelError("layer_drop_student needs a Hugging Face BertModel-like model with .encoder.layer")
    n = len(layers)
    keep = list(range(0, n, 2)) if keep is None else [int(k) for k in keep]
    if not keep or any(k < 0 or k >= n for k in keep) or len(set(keep)) != len(keep) or keep != sorted(keep):
        raise ConfigError(
            f"layer_drop_student: keep={keep!r} is not allowed; give distinct increasing layer indices in 0..{n - 1}"
        )
    student = copy.deepcopy(bert_model)
    student.encoder.layer = nn.ModuleList([student.encoder.layer[k] for k in keep])
    for new_i, layer in enumerate(student.encoder.layer):
        attn = getattr(getattr(layer, "attention", None), "self", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_i
    student.config.num_hidden_layers = len(keep)
    return student


def cnn_student(
    name: str,
    *,
    width: float = 0.5,
    depth: float = 1.0,
    in_channels: int = 1,
    num_classes: int = 10,
    input_size: int = 28,
) -> nn.Module:
    """A width/depth-reduced zoo CNN (random init): ``small_cnn`` by width, ``resnet18`` by width and depth."""
    if not 0 < width <= 4:
        raise ConfigError(f"cnn_student: width={width!r} is not allowed; must be in (0, 4]")
    if not 0 < depth <= 1:
        raise ConfigError(f"cnn_student: depth={depth!r} is not allowed; must be in (0, 1]")
    if name == "small_cnn":
        from edgeslim.models._zoo import SmallCNN

        return SmallCNN(in_channels, num_classes, width=max(1, round(16 * width)))
    if name == "resnet18":
        from torchvision.models.resnet import BasicBlock, ResNet

        blocks = [max(1, round(2 * depth))] * 4
        m = ResNet(BasicBlock, blocks, num_classes=num_classes)
        base = max(4, round(64 * width))
        # rebuild with the reduced width: torchvision's BasicBlock has a fixed base width, so scale the stages
        m.inplanes = base
        m.conv1 = nn.Conv2d(
            in_channels,
            base,
            3 if input_size < 64 else 7,
            1 if input_size < 64 else 2,
            1 if input_size < 64 else 3,
            bias=False,
        )
        m.bn1 = nn.BatchNorm2d(base)
        if input_size < 64:
            m.maxpool = nn.Identity()
        m.layer1 = m._make_layer(BasicBlock, base, blocks[0])
        m.layer2 = m._make_layer(BasicBlock, base * 2, blocks[1], stride=2)
        m.layer3 = m._make_layer(BasicBlock, base * 4, blocks[2], stride=2)
        m.layer4 = m._make_layer(BasicBlock, base * 8, blocks[3], stride=2)
        m.fc = nn.Linear(base * 8, num_classes)
        return m
    raise ConfigError(f"cnn_student: unknown model {name!r}; valid: resnet18, small_cnn")
