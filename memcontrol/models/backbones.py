"""The two CNN architectures the embedders load packaged or user weights into, with the parameter
names of their origin (torchvision's MobileNetV2, torchxrayvision's DenseNet-121) so a state dict
loads strictly. No weights here: memcontrol/embed.py loads them and defines the preprocessing."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn_relu6(inp: int, oup: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    # torchvision's Conv2dNormActivation: indices 0/1/2 give the state-dict names.
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU6(inplace=True),
    )


class _InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_relu6(inp, hidden, kernel=1))
        layers += [
            _conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 (width 1.0) with its parameter names, so its state dict loads strictly."""

    # (expand ratio t, channels c, repeats n, first stride s), torchvision mobilenetv2.py
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_relu6(3, 32, stride=2)]
        inp = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(_InvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        layers.append(_conv_bn_relu6(inp, 1280, kernel=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) ImageNet-normalised -> (b, 1280) globally average-pooled features."""
        return F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class _DenseLayer(nn.Sequential):
    def __init__(self, inp: int, growth: int, bn_size: int) -> None:
        super().__init__(
            OrderedDict(
                norm1=nn.BatchNorm2d(inp),
                relu1=nn.ReLU(inplace=True),
                conv1=nn.Conv2d(inp, bn_size * growth, 1, 1, bias=False),
                norm2=nn.BatchNorm2d(bn_size * growth),
                relu2=nn.ReLU(inplace=True),
                conv2=nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, super().forward(x)], 1)


class XrvDenseNet(nn.Module):
    """torchxrayvision's DenseNet-121 (1-channel input) with its parameter names.

    Only ``features`` is needed for embeddings; the pathology head (``classifier.*``) and the
    ``op_threshs`` buffer of a full xrv state dict are accepted and ignored.
    """

    def __init__(self, growth: int = 32, blocks: tuple[int, ...] = (6, 12, 24, 16), init_features: int = 64, bn_size: int = 4) -> None:
        super().__init__()
        f = nn.Sequential(
            OrderedDict(
                conv0=nn.Conv2d(1, init_features, 7, 2, 3, bias=False),
                norm0=nn.BatchNorm2d(init_features),
                relu0=nn.ReLU(inplace=True),
                pool0=nn.MaxPool2d(3, 2, 1),
            )
        )
        n = init_features
        for i, layers in enumerate(blocks):
            block = nn.Sequential(
                OrderedDict((f"denselayer{j + 1}", _DenseLayer(n + j * growth, growth, bn_size)) for j in range(layers))
            )
            f.add_module(f"denseblock{i + 1}", block)
            n += layers * growth
            if i != len(blocks) - 1:
                trans = nn.Sequential(
                    OrderedDict(
                        norm=nn.BatchNorm2d(n),
                        relu=nn.ReLU(inplace=True),
                        conv=nn.Conv2d(n, n // 2, 1, 1, bias=False),
                        pool=nn.AvgPool2d(2, 2),
                    )
                )
                f.add_module(f"transition{i + 1}", trans)
                n //= 2
        f.add_module("norm5", nn.BatchNorm2d(n))
        self.features = f
        self.num_features = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, 1, 224, 224) scaled to [-1024, 1024] -> (b, 1024): features -> relu -> GAP (xrv features2)."""
        return F.adaptive_avg_pool2d(F.relu(self.features(x)), 1).flatten(1)
