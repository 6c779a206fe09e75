"""Small zoo nets that exercise every graph rule of docs/quantization.md on 28x28 inputs.

- ``mobilenetv2-tiny``: depthwise convs, ReLU6, inverted residuals (add without ReLU), spatial mean head
- ``resnet-tiny``: residual adds followed by ReLU, identity and projection shortcuts, adaptive avg-pool
- ``inception-tiny``: concat with a bare max-pool branch and a concat of concat, adaptive avg-pool
- ``darknet-tiny``: conv-BN-LeakyReLU, max-pool, 1x1 classifier conv and an avg-pool head

Each has about 1-2 M multiply-accumulates per image, so an epoch of Fashion-MNIST takes a minute or
two on 2 CPU cores.
"""

from __future__ import annotations

import torch
from torch import nn

from edgetrain.models.registry import register_model


def conv_bn(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    """Conv (no bias, 'same' padding) followed by BatchNorm."""
    return [
        nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]


def _check_size(name: str, image_size: int, divisor: int) -> None:
    if image_size % divisor:
        raise ValueError(f"{name} needs an image size divisible by {divisor}, got {image_size}")


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand-ReLU6, 3x3 depthwise-ReLU6, 1x1 project; add when shapes match."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.use_residual = stride == 1 and c_in == c_out
        self.block = nn.Sequential(
            *conv_bn(c_in, hidden, 1),
            nn.ReLU6(),
            *conv_bn(hidden, hidden, 3, stride, groups=hidden),
            nn.ReLU6(),
            *conv_bn(hidden, c_out, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_residual else y


class MobileNetV2Tiny(nn.Module):
    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(in_channels, 16, 3, 2), nn.ReLU6())
        self.blocks = nn.Sequential(
            InvertedResidual(16, 16, 1, 2),
            InvertedResidual(16, 24, 2, 4),
            InvertedResidual(24, 24, 1, 4),
        )
        self.head = nn.Sequential(*conv_bn(24, 64, 1), nn.ReLU6())
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(self.dropout(x.mean((2, 3))))


class BasicBlock(nn.Module):
    """ResNet v1 block: relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)), projection when shapes change."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*conv_bn(c_in, c_out, 3, stride), nn.ReLU(), *conv_bn(c_out, c_out, 3))
        self.shortcut = (
            nn.Sequential(*conv_bn(c_in, c_out, 1, stride)) if stride != 1 or c_in != c_out else nn.Identity()
        )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class ResNetTiny(nn.Module):
    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(in_channels, 16, 3), nn.ReLU(), nn.MaxPool2d(2))
        self.layers = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 32, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class InceptionBlock(nn.Module):
    """Branches 1x1 | 1x1-3x3 | 3x3 max-pool (bare), concatenated; the first two joined by a nested cat."""

    def __init__(self, c_in: int, c1: int, c3: int) -> None:
        super().__init__()
        self.branch1 = nn.Sequential(*conv_bn(c_in, c1, 1), nn.ReLU())
        self.branch3 = nn.Sequential(*conv_bn(c_in, c3 // 2, 1), nn.ReLU(), *conv_bn(c3 // 2, c3, 3), nn.ReLU())
        self.branch_pool = nn.MaxPool2d(3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        convs = torch.cat([self.branch1(x), self.branch3(x)], dim=1)
        return torch.cat([convs, self.branch_pool(x)], dim=1)


class InceptionTiny(nn.Module):
    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(in_channels, 16, 3), nn.ReLU(), nn.MaxPool2d(2))
        self.mixed1 = InceptionBlock(16, 8, 16)  # 16 -> 40 channels, 14x14
        self.pool = nn.MaxPool2d(2)
        self.mixed2 = InceptionBlock(40, 16, 24)  # 40 -> 80 channels, 7x7
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(80, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mixed2(self.pool(self.mixed1(self.stem(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class DarkNetTiny(nn.Module):
    """DarkNet-19 in miniature: conv-BN-LeakyReLU(0.1) and max-pools, a 1x1 conv to the classes, avg-pool."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn(in_channels, 16),
            nn.LeakyReLU(0.1),
            nn.MaxPool2d(2),
            *conv_bn(16, 32),
            nn.LeakyReLU(0.1),
            nn.MaxPool2d(2),
            *conv_bn(32, 64),
            nn.LeakyReLU(0.1),
        )
        self.classifier = nn.Conv2d(64, num_classes, 1)
        self.avgpool = nn.AvgPool2d(image_size // 4)
        self.flatten = nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.avgpool(self.classifier(self.features(x))))


@register_model("mobilenetv2-tiny")
def mobilenetv2_tiny(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    _check_size("mobilenetv2-tiny", image_size, 4)
    return MobileNetV2Tiny(num_classes, in_channels)


@register_model("resnet-tiny")
def resnet_tiny(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    _check_size("resnet-tiny", image_size, 4)
    return ResNetTiny(num_classes, in_channels)


@register_model("inception-tiny")
def inception_tiny(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    _check_size("inception-tiny", image_size, 4)
    return InceptionTiny(num_classes, in_channels)


@register_model("darknet-tiny")
def darknet_tiny(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    _check_size("darknet-tiny", image_size, 4)
    return DarkNetTiny(num_classes, in_channels, image_size)
