"""The one shared file of tiny models for tests; each has ``example_inputs()``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class TinyCNN(nn.Module):
    """Conv-BN-ReLU6, a depthwise conv, a residual add, global pooling and a linear head (1x8x8 input)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = y + self.pw(self.dw(y))
        return self.fc(torch.flatten(self.pool(y), 1))

    @staticmethod
    def example_inputs(batch: int = 4) -> torch.Tensor:
        return torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(0))


class TinyMLP(nn.Module):
    """Flatten, two Linear layers with ReLU (1x8x8 input)."""

    def __init__(self, in_features: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, 32), nn.ReLU(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @staticmethod
    def example_inputs(batch: int = 4) -> torch.Tensor:
        return torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(0))


class NoWeights(nn.Module):
    """A model with nothing to quantize."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x).flatten(1)

    @staticmethod
    def example_inputs(batch: int = 4) -> torch.Tensor:
        return torch.randn(batch, 1, 8, 8)


def trained_tiny_cnn(epochs: int = 15) -> tuple[nn.Module, object, object]:
    """TinyCNN trained on scikit-learn digits for a few epochs (seconds): (model, train, val)."""
    from edgeslim.data import load
    from edgeslim.train import TrainConfig, fit

    train, val = load("digits")
    torch.manual_seed(0)
    res = fit(
        TinyCNN(),
        train,
        val,
        TrainConfig(epochs=epochs, lr=0.1, batch_size=32, augment=False, warmup_steps=20),
        progress=False,
    )
    return res.model, train, val


class TinyChain(nn.Module):
    """conv -> ReLU -> depthwise -> ReLU -> conv -> pool -> linear, with badly balanced channel ranges
    (the case cross-layer equalization is for)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.c2 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 10)
        with torch.no_grad():
            scale = torch.logspace(-2, 1, 8)
            self.c1.weight.mul_(scale.view(-1, 1, 1, 1))
            self.c1.bias.mul_(scale)
            self.dw.weight.div_(scale.view(-1, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c2(torch.relu(self.dw(torch.relu(self.c1(x)))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))

    @staticmethod
    def example_inputs(batch: int = 16) -> torch.Tensor:
        return torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(1))


class TinyRepeat(nn.Module):
    """Flatten, a Linear stem, three identical residual Linear blocks (for tying), a Linear head (1x8x8 input)."""

    class Block(nn.Module):
        def __init__(self, width: int = 16) -> None:
            super().__init__()
            self.fc = nn.Linear(width, width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.relu(self.fc(x))

    def __init__(self, in_features: int = 64, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Flatten(), nn.Linear(in_features, width))
        self.blocks = nn.Sequential(*[TinyRepeat.Block(width) for _ in range(3)])
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))

    @staticmethod
    def example_inputs(batch: int = 4) -> torch.Tensor:
        return torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(0))


class TinyConvNet(nn.Module):
    """Two standard 3x3 convs (1->8, 8->16, the second with bias), pooling and a Linear head (1x8x8 input)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))))

    def make_conv2_separable(self) -> TinyConvNet:
        """Set conv2's weight to an exactly depthwise-separable one: W[o, c] = P[o, c] * D[c]."""
        g = torch.Generator().manual_seed(1)
        d, p = torch.randn(8, 3, 3, generator=g), torch.randn(16, 8, generator=g)
        with torch.no_grad():
            self.conv2.weight.copy_(p[:, :, None, None] * d[None])
        return self

    @staticmethod
    def example_inputs(batch: int = 4) -> torch.Tensor:
        return torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(0))


class TinyRepeatBN(nn.Module):
    """A conv stem and three identical Conv-BN-ReLU blocks (for tying with BatchNorm), pooling, a Linear head."""

    def __init__(self, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.blocks = nn.Sequential(
            *[
                nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
                for _ in range(3)
            ]
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))

    @staticmethod
    def example_inputs(batch: int = 4) -> torch.Tensor:
        return torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(0))


class TinyBlocks(nn.Module):
    """A conv stem, two identical Conv-BN-ReLU blocks (tie-able) under a residual add, a depthwise conv, pooling and
    a two-layer head (1x8x8 input): every technique has something to work on."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.blocks = nn.Sequential(
            *[nn.Sequential(nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()) for _ in range(2)]
        )
        self.dw = nn.Sequential(nn.Conv2d(w, w, 3, padding=1, groups=w, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w, 16), nn.ReLU(), nn.Linear(16, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return self.head(self.dw(y + self.blocks(y)))

    @staticmethod
    def example_inputs(batch: int = 4) -> torch.Tensor:
        return torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(0))


class _TinyBasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock, small: conv-BN-ReLU, conv-BN, residual add (downsampled by a 1x1 conv-BN when
    the shape changes), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    """ResNet-18's structure in miniature (3x32x32 input): conv-BN-ReLU stem, MaxPool, a plain and a downsampling
    BasicBlock, global average pooling, flatten, linear. The Q/DQ placement ORT needs to keep it integer end to end
    (MaxPool on int8, residual adds as QLinearAdd, the pooled tail into QGemm) is tested on it."""

    def __init__(self, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = _TinyBasicBlock(width, width)
        self.layer2 = _TinyBasicBlock(width, 2 * width, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)
        g = torch.Generator().manual_seed(0)
        for m in self.modules():  # non-trivial BatchNorm statistics, so folding and ranges are exercised
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    @staticmethod
    def example_inputs(batch: int = 16) -> torch.Tensor:
        return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class TinyGrouped(nn.Module):
    """A conv stem, a 2-group 3x3 conv, a 4-group 1x1 conv (grouped, not depthwise), pooling, a Linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.g2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.g4 = nn.Conv2d(8, 8, 1, groups=4)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.g4(torch.relu(self.g2(torch.relu(self.stem(x)))))
        return self.fc(y.mean((2, 3)))

    @staticmethod
    def example_inputs(batch: int = 4) -> torch.Tensor:
        return torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(0))


class TinyAttention(nn.Module):
    """Tokens (5 x 8) -> Linear(8, 16) -> one TransformerEncoderLayer (2 heads, FFN 32) -> mean -> Linear head.

    MACs at batch 1: 640 (embed) + 3840 (qkv) + 800 (two attention matmuls) + 1280 (out proj) + 5120 (FFN) +
    160 (head) = 11840.
    """

    MACS = 11840

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.encoder = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))

    @staticmethod
    def example_inputs(batch: int = 4) -> torch.Tensor:
        return torch.randn(batch, 5, 8, generator=torch.Generator().manual_seed(0))


def tiny_rgb_cnn() -> nn.Module:
    """A model factory for ``package.module:function`` specs: TinyCNN on 3x8x8 inputs, 10 classes."""
    return TinyCNN(in_channels=3)


class SameConv2d(nn.Conv2d):
    """A Conv2d subclass with static "same" padding computed in forward and applied by ``F.pad`` before
    ``F.conv2d`` (EfficientNet-Lite's and many timm layers' pattern): invisible to a quantizer matching modules."""

    def __init__(self, *args, image_size: int = 16, **kwargs) -> None:
        super().__init__(*args, padding=0, **kwargs)
        k, s = self.kernel_size[0], self.stride[0]
        out = -(-image_size // s)
        pad = max((out - 1) * s + k - image_size, 0)
        self.static_pad = (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.pad(x, self.static_pad)
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class TinySameConv(nn.Module):
    """An EfficientNet-Lite-like net (3x16x16 input): a stride-2 SameConv2d stem, a depthwise SameConv2d, a 1x1
    SameConv2d with a residual add, BatchNorm and ReLU6, global pooling and a Linear head. Of its MACs, all but
    the head's are functional convolutions."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            SameConv2d(3, 16, 3, stride=2, bias=False, image_size=16), nn.BatchNorm2d(16), nn.ReLU6()
        )
        self.dw = nn.Sequential(
            SameConv2d(16, 16, 3, groups=16, bias=False, image_size=8), nn.BatchNorm2d(16), nn.ReLU6()
        )
        self.pw = nn.Sequential(SameConv2d(16, 16, 1, bias=False, image_size=8), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = y + self.pw(self.dw(y))
        return self.head(y.mean((2, 3)))

    @staticmethod
    def example_inputs(batch: int = 16) -> torch.Tensor:
        return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(0))


class TinyFunctional(nn.Module):
    """Weights as bare ``nn.Parameter`` used through ``F.conv2d`` and ``F.linear`` in forward (1x8x8 input)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(8, 1, 3, 3, generator=g) * 0.4)
        self.b1 = nn.Parameter(torch.randn(8, generator=g) * 0.1)
        self.w2 = nn.Parameter(torch.randn(16, 8, 3, 3, generator=g) * 0.15)
        self.b2 = nn.Parameter(torch.zeros(16))
        self.wf = nn.Parameter(torch.randn(num_classes, 16, generator=g) * 0.25)
        self.bf = nn.Parameter(torch.zeros(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(nn.functional.conv2d(x, self.w1, self.b1, padding=1))
        y = torch.relu(nn.functional.conv2d(y, self.w2, self.b2, stride=2, padding=1))
        return nn.functional.linear(y.mean((2, 3)), self.wf, self.bf)

    @staticmethod
    def example_inputs(batch: int = 16) -> torch.Tensor:
        return torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(0))


class TinyCSP(nn.Module):
    """A YOLOv8-like neck in miniature (3x32x32 input): Conv-BN-SiLU stages, a C2f-style split / bottleneck / concat,
    an SPPF-style max-pool concat, a nearest upsample joined to an earlier level, a HardSwish conv and a conv head."""

    @staticmethod
    def _cba(cin: int, cout: int, k: int = 3, s: int = 1, act: type[nn.Module] = nn.SiLU) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), act())

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = self._cba(3, 16, 3, 2)
        self.cv1 = self._cba(16, 16, 1)
        self.m = nn.Sequential(self._cba(8, 8), self._cba(8, 8))
        self.cv2 = self._cba(24, 16, 1)
        self.down = self._cba(16, 32, 3, 2, nn.Hardswish)
        self.pool = nn.MaxPool2d(5, 1, 2)
        self.sppf = self._cba(64, 32, 1)
        self.fuse = self._cba(48, 16, 1)
        self.head = nn.Conv2d(16, 8, 1)
        for m in self.modules():  # non-trivial BN statistics, so folding and ranges matter
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        a, b = self.cv1(x).chunk(2, 1)
        y = self.cv2(torch.cat((a, b, b + self.m(b)), 1))
        z = self.down(y)
        z = self.sppf(torch.cat((z, self.pool(z)), 1))
        up = nn.functional.interpolate(z, scale_factor=2.0, mode="nearest")
        return self.head(self.fuse(torch.cat((up, y), 1)))

    @staticmethod
    def example_inputs(batch: int = 16) -> torch.Tensor:
        return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class TinyViT(nn.Module):
    """A ViT-like net (3x16x16 input): a 4x4 patch-embedding conv (16 tokens of 32), a class token and position
    embedding, two ``nn.TransformerEncoderLayer`` (2 heads, GELU, pre-norm), a LayerNorm and a Linear head."""

    def __init__(self, num_classes: int = 10, dim: int = 32) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim, generator=torch.Generator().manual_seed(0)) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, 2, 2 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos
        return self.head(self.norm(self.encoder(t))[:, 0])

    @staticmethod
    def example_inputs(batch: int = 16) -> torch.Tensor:
        return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def tiny_bert() -> nn.Module:
    """A Hugging Face ``BertModel`` from a small ``BertConfig`` (hidden 32, 2 layers, 2 heads, vocab 100), random
    weights (nothing downloaded); called with ``input_ids`` and ``attention_mask`` (:func:`tiny_bert_inputs`)."""
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def tiny_bert_inputs(batch: int = 16, length: int = 8) -> dict[str, torch.Tensor]:
    """Token ids (int64) and an attention mask whose last tokens are padding in half of the samples."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[batch // 2 :, length - 3 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


class TinyDetectionSet(torch.utils.data.Dataset):
    """Random detection set for tests: filled rectangles of three colours (the classes) on faint noise.

    ``ds[i] -> (image [3, S, S] in [0, 1], {"boxes" [N, 4] xyxy pixels, "labels" [N], "image_id"})``, with
    ``classes``, ``num_classes``, ``image_size`` and ``annotation_file`` (COCO JSON written to ``folder``), the
    interface of ``edgeslim.data.DetectionDataset``.
    """

    COLOURS = ((1.0, 0.1, 0.1), (0.1, 1.0, 0.1), (0.1, 0.1, 1.0))

    def __init__(self, n: int, folder, *, size: int = 64, seed: int = 0, split: str = "val") -> None:
        import json
        from pathlib import Path

        g = torch.Generator().manual_seed(seed)
        self.image_size = size
        self.classes = ["red", "green", "blue"]
        self.num_classes = 3
        self.images, self.targets = [], []
        images, anns = [], []
        for i in range(n):
            img = torch.rand(3, size, size, generator=g) * 0.3
            boxes, labels = [], []
            for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
                w, h = (int(v) for v in torch.randint(size // 5, size // 2, (2,), generator=g))
                x0 = int(torch.randint(0, size - w, (1,), generator=g))
                y0 = int(torch.randint(0, size - h, (1,), generator=g))
                c = int(torch.randint(0, 3, (1,), generator=g))
                img[:, y0 : y0 + h, x0 : x0 + w] = torch.tensor(self.COLOURS[c]).view(3, 1, 1)
                boxes.append([x0, y0, x0 + w, y0 + h])
                labels.append(c)
            image_id = i + 1
            self.images.append(img)
            self.targets.append(
                {
                    "boxes": torch.tensor(boxes, dtype=torch.float32),
                    "labels": torch.tensor(labels),
                    "image_id": image_id,
                }
            )
            images.append({"id": image_id, "file_name": f"{image_id}.png", "width": size, "height": size})
            for b, c in zip(boxes, labels):
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": image_id,
                        "category_id": c + 1,
                        "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                        "area": (b[2] - b[0]) * (b[3] - b[1]),
                        "iscrowd": 0,
                    }
                )
        cats = [{"id": k + 1, "name": name} for k, name in enumerate(self.classes)]
        self.annotation_file = Path(folder) / f"tiny-detect-{split}-{seed}.json"
        self.annotation_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_ids(self) -> list[int]:
        return [t["image_id"] for t in self.targets]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def __getitem__(self, i: int):
        return self.images[i], self.targets[i]


def tiny_detect_sets(folder) -> tuple[TinyDetectionSet, TinyDetectionSet]:
    """(train, val) tiny detection sets: 96 and 24 images of 64x64 (see :class:`TinyDetectionSet`)."""
    return TinyDetectionSet(96, folder, seed=1, split="train"), TinyDetectionSet(24, folder, seed=2, split="val")


def tiny_detector(num_classes: int = 3) -> nn.Module:
    """``yolo_mobilenet_v2`` narrowed for tests (MobileNetV2 x0.25, 16-channel neck), random init; 64x64 input."""
    from edgeslim.models import YoloMobileNetV2

    torch.manual_seed(0)
    return YoloMobileNetV2(num_classes, width=16, width_mult=0.25, input_size=64).eval()


class TinyDetector(nn.Module):
    """A detector-shaped conv net (3x32x32 input): ``[N, 4 + 3, 64]`` like a YOLOv8 export, box pixels in [0, 160]
    (a sigmoid times 160) concatenated with 3 sigmoid class scores in [0, 1] along axis 1."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU()
        )
        self.box = nn.Conv2d(16, 4, 1)
        self.cls = nn.Conv2d(16, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.body(x)
        boxes = torch.sigmoid(self.box(f)).flatten(2) * 160.0
        scores = torch.sigmoid(self.cls(f)).flatten(2)
        return torch.cat([boxes, scores], 1)

    @staticmethod
    def example_inputs(batch: int = 32) -> torch.Tensor:
        return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def wide_channel_convs() -> tuple[nn.Module, torch.Tensor]:
    """Three convolutions (3x3, then two 1x1, 64 channels) whose middle one has 8 of 64 output channels 40x wider:
    one weight scale for that tensor ruins the other 56; the other two keep their SQNR with one scale. With data."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 1), nn.ReLU(), nn.Conv2d(64, 64, 1)
    ).eval()
    with torch.no_grad():
        model[2].weight[:8] *= 40.0
    return model, torch.randn(64, 3, 8, 8)


def _saturating(width: int, middle: Callable[[], nn.Conv2d], lift: float) -> tuple[nn.Module, torch.Tensor]:
    """conv 3->width, ReLU, ``middle`` (width->16), ReLU, conv 16->10: the first conv's outputs near their maximum
    (u8 near 255), ``middle``'s weights near-equal in magnitude (int8 near 127), one sign per output channel."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.ReLU(),
        middle(),
        nn.ReLU(),
        nn.Conv2d(16, 10, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ).eval()
    with torch.no_grad():
        model[0].weight.mul_(0.1)
        model[0].bias.fill_(2.0)  # activations near their maximum
        model[2].weight.copy_(model[2].weight.abs() + lift)  # near-equal weights: int8 values near the top
        model[2].weight[8:] *= -1
    return model, torch.randn(64, 3, 8, 8)


def saturating_convs() -> tuple[nn.Module, torch.Tensor]:
    """A 1x1 convolution whose u8 inputs sit near 255 and whose int8 weights near 127 (same sign within each output
    channel): on an x86 CPU without VNNI, ONNX Runtime's u8 x s8 kernels saturate the 16-bit sum of each pair of
    products (2 x 255 x 127 > 32767) unless the weights take the 7-bit range. With data."""
    return _saturating(32, lambda: nn.Conv2d(32, 16, 1), 0.2)


def saturating_depthwise() -> tuple[nn.Module, torch.Tensor]:
    """:func:`saturating_convs` with a 3x3 depthwise convolution in the middle: u8 inputs near 255, int8 weights
    near 127 of one sign per channel, so a kernel summing pairs of products in 16 bits would saturate. ONNX
    Runtime's depthwise kernel sums in 32 bits: its weights keep the full range under ``reduce_range``. With data."""
    model, x = _saturating(16, lambda: nn.Conv2d(16, 16, 3, padding=1, groups=16), 0.3)
    with torch.no_grad():
        model[2].bias.zero_()
    return model, x


def tiny_coco(folder, n_train: int = 96, n_val: int = 24, *, size: int = 64):
    """A COCO folder of :class:`TinyDetectionSet` images (PNG under ``images/``, ``annotations/{train,val}.json``),
    for code that needs a real ``edgeslim.data.DetectionDataset``: ``edgeslim.data.load(f"coco:{folder}",
    size=size)``. Returns the folder."""
    import json
    from pathlib import Path

    import numpy as np
    from PIL import Image

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "annotations").mkdir(exist_ok=True)
    for split, n, seed, first_id in (("train", n_train, 1, 1), ("val", n_val, 2, 10_000)):
        ds = TinyDetectionSet(n, folder, size=size, seed=seed, split=split)
        doc = json.loads(ds.annotation_file.read_text())
        ds.annotation_file.unlink()
        for im, (pixels, _) in zip(doc["images"], (ds[i] for i in range(len(ds))), strict=True):
            im["id"] += first_id
            im["file_name"] = f"{split}-{im['file_name']}"
            a = (pixels.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            Image.fromarray(np.ascontiguousarray(a)).save(folder / "images" / im["file_name"])
        for ann in doc["annotations"]:
            ann["image_id"] += first_id
        (folder / "annotations" / f"{split}.json").write_text(json.dumps(doc))
    return folder
