"""Zoo nets with the ops of current mobile CNNs and dense-prediction nets, on 28x28 inputs.

- ``mobilenetv3-tiny``: hard-swish, squeeze-and-excitation (mean with keepdim, hard-sigmoid gate,
  product of two tensors), 5x5 depthwise convs, inverted residuals (Howard et al., "Searching for
  MobileNetV3", 2019)
- ``unet-tiny``: encoder-decoder with nearest upsampling (``nn.Upsample`` and ``F.interpolate``) and
  skip concatenations (Ronneberger et al., "U-Net", 2015), then a classifier on pooled features

Element-wise functions (hard-swish, hard-sigmoid) quantize as exact lookup tables
(docs/quantization.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgetrain.models.registry import register_model
from edgetrain.models.tiny import _check_size, conv_bn


class SqueezeExcite(nn.Module):
    """x * hard_sigmoid(W2 relu(W1 mean_hw(x))): channel gating by a product of two tensors."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels // reduction, 1)
        self.expand = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean((2, 3), keepdim=True)
        scale = F.hardsigmoid(self.expand(F.relu(self.reduce(scale))))
        return x * scale


class MobileNetV3Block(nn.Module):
    """1x1 expand - act, kxk depthwise - act, [SE], 1x1 project; residual add when shapes match."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int, se: bool, act: str) -> None:
        super().__init__()
        hidden = c_in * expand
        activation = nn.Hardswish if act == "hswish" else nn.ReLU
        self.use_residual = stride == 1 and c_in == c_out
        self.expand = nn.Sequential(*conv_bn(c_in, hidden, 1), activation())
        self.depthwise = nn.Sequential(*conv_bn(hidden, hidden, kernel, stride, groups=hidden), activation())
        self.se = SqueezeExcite(hidden) if se else nn.Identity()
        self.project = nn.Sequential(*conv_bn(hidden, c_out, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.use_residual else y


class MobileNetV3Tiny(nn.Module):
    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(in_channels, 16, 3, 2), nn.Hardswish())  # 14x14
        self.blocks = nn.Sequential(
            MobileNetV3Block(16, 16, 3, 1, 2, se=True, act="relu"),
            MobileNetV3Block(16, 24, 3, 2, 3, se=False, act="relu"),  # 7x7
            MobileNetV3Block(24, 24, 5, 1, 3, se=True, act="hswish"),
        )
        self.head = nn.Sequential(*conv_bn(24, 64, 1), nn.Hardswish())
        self.classifier = nn.Sequential(nn.Linear(64, 64), nn.Hardswish(), nn.Dropout(0.1), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(x.mean((2, 3)))


def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(*conv_bn(c_in, c_out, 3), nn.ReLU())


class UNetTiny(nn.Module):
    """Two-level U-Net (28 -> 14 -> 7 -> 14 -> 28) with skip concatenations; the classifier reads the
    pooled decoder output and the pooled bottleneck."""

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.enc1 = conv_bn_relu(in_channels, 8)
        self.enc2 = conv_bn_relu(8, 16)
        self.bottleneck = conv_bn_relu(16, 32)
        self.pool = nn.MaxPool2d(2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec2 = conv_bn_relu(32 + 16, 16)
        self.dec1 = conv_bn_relu(16 + 8, 8)
        self.fc = nn.Linear(8 + 32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        b = self.bottleneck(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up(b), e2], dim=1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2, mode="nearest"), e1], dim=1))
        return self.fc(torch.cat([d1.mean((2, 3)), b.mean((2, 3))], dim=1))


@register_model("mobilenetv3-tiny")
def mobilenetv3_tiny(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    _check_size("mobilenetv3-tiny", image_size, 4)
    return MobileNetV3Tiny(num_classes, in_channels)


@register_model("unet-tiny")
def unet_tiny(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    _check_size("unet-tiny", image_size, 4)
    return UNetTiny(num_classes, in_channels)
