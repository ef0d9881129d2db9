"""``yolo_mobilenet_v2``: an anchor-free, YOLO-style detector on the ImageNet MobileNetV2 backbone (Apache-2.0).

Backbone: torchvision MobileNetV2 ``features[:18]`` (the 1280-channel last conv dropped), tapped at strides 8, 16
and 32. Neck: a light PAN (1x1 lateral convs, nearest upsampling, concatenation, depthwise-separable blocks,
stride-2 depthwise downsampling). Head: decoupled per level, class logits and four box distances (left, top,
right, bottom, ``softplus`` in stride units) from each anchor point.

Inputs are RGB in ``[0, 1]``; the ImageNet normalisation is inside the model (buffers). The forward returns one
tensor ``[B, A, 4 + C]``: boxes ``x1 y1 x2 y2`` in input pixels and sigmoid class scores
(:data:`edgeslim.core.detection.DETECT_LAYOUT`); NMS stays outside (:func:`edgeslim.models.detect_postprocess`).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch.nn import functional as F

from edgeslim.core.detection import DETECT_LAYOUT
from edgeslim.core.errors import ModelError

#: the backbone blocks whose outputs feed the neck (MobileNetV2 ``features`` indices) and their strides
TAPS = (6, 13, 17)
STRIDES = (8, 16, 32)


def _conv(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU6()
    )


class DWSep(nn.Sequential):
    """Depthwise 3x3 conv-BN-ReLU6 (stride ``stride``), then pointwise 1x1 conv-BN-ReLU6."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(_conv(cin, cin, 3, stride, groups=cin), _conv(cin, cout, 1))


class PAN(nn.Module):
    """Top-down then bottom-up path over three levels, each of ``width`` channels (concat + depthwise-separable)."""

    def __init__(self, channels: tuple[int, int, int], width: int) -> None:
        super().__init__()
        c3, c4, c5 = channels
        self.lat3, self.lat4, self.lat5 = _conv(c3, width), _conv(c4, width), _conv(c5, width)
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.td4 = DWSep(2 * width, width)
        self.td3 = DWSep(2 * width, width)
        self.down3 = _conv(width, width, 3, 2, groups=width)
        self.bu4 = DWSep(2 * width, width)
        self.down4 = _conv(width, width, 3, 2, groups=width)
        self.bu5 = DWSep(2 * width, width)

    def forward(self, c3: torch.Tensor, c4: torch.Tensor, c5: torch.Tensor) -> list[torch.Tensor]:
        p5 = self.lat5(c5)
        p4 = self.td4(torch.cat([self.up(p5), self.lat4(c4)], 1))
        p3 = self.td3(torch.cat([self.up(p4), self.lat3(c3)], 1))
        n4 = self.bu4(torch.cat([self.down3(p3), p4], 1))
        n5 = self.bu5(torch.cat([self.down4(n4), p5], 1))
        return [p3, n4, n5]


class Head(nn.Module):
    """Decoupled head for one level: a class branch and a box branch, each a depthwise-separable block and a 1x1
    prediction conv."""

    def __init__(self, width: int, num_classes: int, prior: float = 0.01) -> None:
        super().__init__()
        self.cls = nn.Sequential(DWSep(width, width), nn.Conv2d(width, num_classes, 1))
        self.box = nn.Sequential(DWSep(width, width), nn.Conv2d(width, 4, 1))
        nn.init.normal_(self.cls[-1].weight, std=0.01)
        nn.init.constant_(self.cls[-1].bias, -math.log((1 - prior) / prior))
        nn.init.normal_(self.box[-1].weight, std=0.01)
        nn.init.constant_(self.box[-1].bias, 1.0)  # softplus(1) ~ 1.3 strides each side at the start

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cls(x), self.box(x)


class YoloMobileNetV2(nn.Module):
    """Anchor-free detector: MobileNetV2 backbone, PAN neck, decoupled heads; forward -> ``[B, A, 4 + C]``.

    Args:
        num_classes: object classes.
        width: channels of the neck and heads.
        width_mult: MobileNetV2 width multiplier (1.0 to use the ImageNet weights; smaller for tests).
        input_size: the square input size it is trained for (recorded; the network itself takes any size
            divisible by 32).
    """

    edgeslim_task = "detect"
    edgeslim_output = DETECT_LAYOUT
    strides = STRIDES

    def __init__(self, num_classes: int = 10, *, width: int = 64, width_mult: float = 1.0, input_size: int = 160):
        super().__init__()
        from torchvision.models import mobilenet_v2

        self.num_classes = int(num_classes)
        self.input_size = int(input_size)
        self.width_mult = float(width_mult)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.backbone = mobilenet_v2(weights=None, width_mult=width_mult).features[: TAPS[-1] + 1]
        chans = tuple(int(self.backbone[i].out_channels) for i in TAPS)
        self.neck = PAN(chans, width)  # type: ignore[arg-type]
        self.heads = nn.ModuleList(Head(width, num_classes) for _ in STRIDES)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The neck's three output maps (strides 8, 16, 32) for a ``[0, 1]`` RGB batch."""
        return self._neck_from([], (x - self.mean) / self.std, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._decode(self.features(x))

    def backbone_state(self, x: torch.Tensor, stop: int) -> list[torch.Tensor]:
        """What the network needs to go on after backbone block ``stop - 1``: the earlier taps' outputs, then
        block ``stop - 1``'s output (see :meth:`forward_from`; trainers cache it for frozen blocks)."""
        x = (x - self.mean) / self.std
        taps = []
        for i, block in enumerate(self.backbone[:stop]):
            x = block(x)
            if i in TAPS and i != stop - 1:
                taps.append(x)
        return [*taps, x]

    def forward_from(self, state: list[torch.Tensor], start: int) -> torch.Tensor:
        """The forward output from :meth:`backbone_state` ``(x, start)``: the blocks from ``start`` on, neck, heads."""
        taps = list(state[:-1])
        if start - 1 in TAPS:
            taps.append(state[-1])
        return self._decode(self._neck_from(taps, state[-1], start))

    def _neck_from(self, taps: list[torch.Tensor], x: torch.Tensor, start: int) -> list[torch.Tensor]:
        taps = list(taps)
        for i in range(start, len(self.backbone)):
            x = self.backbone[i](x)
            if i in TAPS:
                taps.append(x)
        return self.neck(*taps)

    def _decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """All levels at once: one softplus, one sigmoid and the anchor grid as a constant (see :meth:`_grid`)."""
        outs = [head(feat) for feat, head in zip(feats, self.heads, strict=True)]
        sizes = self._sizes(feats)
        if sizes is None:  # torch.fx: sizes are proxies
            cls = torch.cat([c.flatten(2) for c, _ in outs], 2)
            box = torch.cat([b.flatten(2) for _, b in outs], 2)
        else:  # constant shapes: an exported Reshape reads no Shape
            cls = torch.cat([c.reshape(-1, self.num_classes, h * w) for (c, _), (h, w) in zip(outs, sizes)], 2)
            box = torch.cat([b.reshape(-1, 4, h * w) for (_, b), (h, w) in zip(outs, sizes)], 2)
        # cls [B, C, A]; box [B, 4, A]: left, top, right, bottom in strides
        centres, strides = self._grid_traced(feats, box) if sizes is None else self._grid(sizes, box)
        d = F.softplus(box) * strides
        xyxy = torch.cat([centres - d[:, :2], centres + d[:, 2:]], 1)
        return torch.cat([xyxy, torch.sigmoid(cls)], 1).transpose(1, 2)

    @staticmethod
    def _grid(sizes: list[tuple[int, int]], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Anchor centres ``[1, 2, A]`` (pixels) and strides ``[1, 1, A]`` for the levels' sizes.

        Built from the sizes as Python numbers, so an exported graph holds them as constants (its input size is
        fixed; computed from the traced shapes they cost ~60 Shape/Range/Expand/... nodes, about 10% of the
        deployed detector's time). Under torch.fx, whose sizes are proxies, :meth:`_grid_traced` computes them in
        the graph."""
        centres, strides = [], []
        for (h, w), stride in zip(sizes, STRIDES, strict=True):
            ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
            centres.append(torch.stack([xs.reshape(-1), ys.reshape(-1)]) * stride)
            strides.append(torch.full((h * w,), float(stride)))
        c = torch.cat(centres, 1)[None].to(device=like.device, dtype=like.dtype)
        return c, torch.cat(strides)[None, None].to(device=like.device, dtype=like.dtype)

    @staticmethod
    def _sizes(feats: list[torch.Tensor]) -> list[tuple[int, int]] | None:
        """The levels' (height, width) as Python ints (None under torch.fx, whose sizes are proxies)."""
        if any(isinstance(feat, torch.fx.Proxy) for feat in feats):
            return None
        sizes = [feat.shape[-2:] for feat in feats]
        with warnings.catch_warnings():  # a traced size read as a number: intended, the export has a fixed size
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return [(int(h), int(w)) for h, w in sizes]

    def _grid_traced(self, feats: list[torch.Tensor], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        centres, strides = [], []
        for feat, stride in zip(feats, STRIDES, strict=True):
            h, w = feat.shape[-2:]
            ys = (torch.arange(h, device=like.device, dtype=like.dtype) + 0.5) * stride
            xs = (torch.arange(w, device=like.device, dtype=like.dtype) + 0.5) * stride
            cx = xs.view(1, 1, w).expand(1, h, w).reshape(1, 1, h * w)
            cy = ys.view(1, h, 1).expand(1, h, w).reshape(1, 1, h * w)
            centres.append(torch.cat([cx, cy], 1))
            strides.append(torch.ones_like(cx) * stride)
        return torch.cat(centres, 2), torch.cat(strides, 2)

    def anchor_points(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Anchor centres ``[A, 2]`` (x, y pixels) and their strides ``[A]``, in the order of the output rows."""
        pts, strides = [], []
        for s in STRIDES:
            h, w = math.ceil(height / s), math.ceil(width / s)
            ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
            pts.append(torch.stack([xs.reshape(-1), ys.reshape(-1)], 1) * s)
            strides.append(torch.full((h * w,), float(s)))
        return torch.cat(pts), torch.cat(strides)

    def init_backbone_from_imagenet(self) -> YoloMobileNetV2:
        """Copy torchvision's ImageNet MobileNetV2 weights (shipped offline) into the backbone."""
        from edgeslim.models._zoo import imagenet_mobilenet_v2_weights, load_state_dict_file

        if self.width_mult != 1.0:
            raise ModelError(f"ImageNet weights fit width_mult=1.0, this backbone has width_mult={self.width_mult}")
        src = load_state_dict_file(imagenet_mobilenet_v2_weights())
        own = self.backbone.state_dict()
        state = {}
        for k, v in own.items():
            w = src.get(f"features.{k}")
            if w is None or w.shape != v.shape:
                raise ModelError(f"ImageNet weights lack features.{k} of shape {tuple(v.shape)}")
            state[k] = w
        self.backbone.load_state_dict(state)
        return self


def build_yolo_mobilenet_v2(in_channels: int, num_classes: int, input_size: int) -> YoloMobileNetV2:
    if in_channels != 3:
        raise ModelError(f"yolo_mobilenet_v2 takes RGB input (3 channels), not {in_channels}")
    if input_size % 32:
        raise ModelError(f"yolo_mobilenet_v2 needs an input size divisible by 32, not {input_size}")
    return YoloMobileNetV2(num_classes, input_size=input_size)
