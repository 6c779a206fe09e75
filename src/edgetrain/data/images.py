"""Data a user brings: image trees and arrays, and the preprocessing applied to them (docs/user-guide.md).

An image tree is ``root/<split>/<class>/<file>`` with ``split`` in train / test (val optional) and
files ``.png``, ``.jpg``/``.jpeg``, ``.bmp``, ``.pgm``/``.ppm`` read with Pillow. Class indices follow
the sorted folder names of ``root/train``.

:class:`Preprocess` is applied once, when the split is loaded, so training, calibration, the export
checks, evaluation and the adaptation streams all see the same tensors. In this order:

1. colour: ``"gray"`` (Pillow mode ``L``: L = 0.299 R + 0.587 G + 0.114 B, ITU-R 601-2) or ``"rgb"``;
   by default RGB when any training image has colour, grayscale otherwise. Arrays are converted with
   the same weights;
2. pixels to [0, 1]: 8-bit values / 255 (float arrays are taken as they are);
3. resize: the shorter side to ``resize`` pixels (bilinear, antialiased, aspect ratio kept;
   default ``image_size``), then the centre ``image_size`` x ``image_size`` crop (top-left rounding:
   offset ``(H - size) // 2``). ``image_size = 0`` keeps the stored size (all images must share it);
4. normalisation per channel c: ``x' = (x - mean[c]) / std[c]`` (one value applies to every channel).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm")
COLORS = ("", "gray", "rgb")
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, Pillow's RGB -> L weights
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F", "P")  # "P" is checked for colour below


@dataclass(frozen=True)
class Preprocess:
    """Colour, size and normalisation of the input images (module docstring); the defaults change nothing."""

    image_size: int = 0  # square input side; 0: as stored
    resize: int = 0  # shorter side before the centre crop; 0: image_size
    color: str = ""  # "gray" | "rgb" | "" (RGB when the training images have colour)
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if self.color not in COLORS:
            raise ValueError(f"color must be 'gray', 'rgb' or '' (automatic), got {self.color!r}")
        if self.image_size < 0 or self.resize < 0:
            raise ValueError(f"image_size and resize must be >= 0, got {self.image_size} and {self.resize}")
        if self.resize and not self.image_size:
            raise ValueError("resize needs image_size (the centre crop that follows it)")
        if self.resize and self.resize < self.image_size:
            raise ValueError(f"resize ({self.resize}) must be >= image_size ({self.image_size}) for the crop to fit")
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean and std need one value per channel each, got {self.mean} and {self.std}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be > 0, got {self.std}")

    @property
    def is_identity(self) -> bool:
        return self == Preprocess()

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    def apply(self, images: torch.Tensor, source: str) -> torch.Tensor:
        """Steps 1, 3 and 4 of the module docstring on float N x C x H x W images already in [0, 1]."""
        images = convert_color(images, self.color, source) if self.color else images
        if self.image_size:
            images = resize_center_crop(images, self.image_size, self.resize or self.image_size)
        if self.mean:
            channels = images.shape[1]
            if len(self.mean) not in (1, channels):
                raise ValueError(
                    f"{source}: mean/std have {len(self.mean)} values for {channels} channels; give 1 or {channels}"
                )
            mean = torch.tensor(self.mean, dtype=images.dtype).reshape(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=images.dtype).reshape(1, -1, 1, 1)
            images = (images - mean) / std
        return images.contiguous()


def convert_color(images: torch.Tensor, color: str, source: str) -> torch.Tensor:
    """N x C x H x W to 1 (gray: the luma weights) or 3 (rgb: the gray channel repeated) channels."""
    channels = images.shape[1]
    if color == "gray" and channels == 3:
        weights = torch.tensor(LUMA, dtype=images.dtype).reshape(1, 3, 1, 1)
        return (images * weights).sum(1, keepdim=True)
    if color == "rgb" and channels == 1:
        return images.expand(-1, 3, -1, -1)
    if channels not in (1, 3):
        raise ValueError(f"{source}: color={color!r} needs 1- or 3-channel images, got {channels} channels")
    return images


def resize_center_crop(images: torch.Tensor, size: int, shorter_side: int) -> torch.Tensor:
    """Shorter side to ``shorter_side`` (bilinear, antialiased), then the centre ``size`` x ``size`` crop."""
    height, width = images.shape[-2:]
    if min(height, width) != shorter_side:
        scale = shorter_side / min(height, width)
        target = (max(size, round(height * scale)), max(size, round(width * scale)))
        images = F.interpolate(images, size=target, mode="bilinear", antialias=True, align_corners=False)
        height, width = target
    top, left = (height - size) // 2, (width - size) // 2
    return images[..., top : top + size, left : left + size]


def channels_first(images: np.ndarray, source: str) -> np.ndarray:
    """N x H x W -> N x 1 x H x W; N x H x W x C (C = 1 or 3, channels-last) -> N x C x H x W.

    A 4-D array is read as channels-first when axis 1 has 1 or 3 entries, as channels-last when only
    the last axis does; any other 4-D shape is refused.
    """
    if images.ndim == 3:
        return images[:, None]
    if images.ndim != 4:
        raise ValueError(f"{source}: images must be N x H x W, N x C x H x W or N x H x W x C; got {images.shape}")
    if images.shape[1] in (1, 3):
        return images
    if images.shape[3] in (1, 3):
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    raise ValueError(
        f"{source}: cannot tell the channel axis of images {images.shape}: neither axis 1 (channels-first) "
        "nor axis 3 (channels-last) has 1 or 3 entries; save them as N x C x H x W with C = 1 or 3"
    )


def is_image_tree(root: Path) -> bool:
    """``root/train`` holds class folders."""
    train = root / "train"
    return train.is_dir() and any(p.is_dir() for p in train.iterdir())


def tree_classes(root: Path) -> tuple[str, ...]:
    """The sorted class-folder names of ``root/train``."""
    return tuple(sorted(p.name for p in (root / "train").iterdir() if p.is_dir() and not p.name.startswith(".")))


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _has_color(path: Path) -> bool:
    from PIL import Image

    with Image.open(path) as image:
        if image.mode in GRAY_MODES and image.mode != "P":
            return False
        rgb = np.asarray(image.convert("RGB"))
    return bool((rgb != rgb[..., :1]).any())


def tree_color(root: Path) -> str:
    """``"rgb"`` if any training image has colour (mode and pixels checked), else ``"gray"``."""
    for class_dir in (root / "train").iterdir():
        if class_dir.is_dir() and any(_has_color(path) for path in _files(class_dir)):
            return "rgb"
    return "gray"


@lru_cache(maxsize=8)
def _read_tree_split(
    folder: str, classes: tuple[str, ...], color: str, preprocess: Preprocess, stamp: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of ``folder/<class>/`` preprocessed (cached per folder state ``stamp``)."""
    from PIL import Image, UnidentifiedImageError

    root = Path(folder)
    unknown = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in classes)
    if unknown:
        raise ValueError(f"{root}: class folders {unknown} are not among the training classes {list(classes)}")
    images, labels = [], []
    for index, name in enumerate(classes):
        if not (root / name).is_dir():
            continue
        for path in _files(root / name):
            try:
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("L" if color == "gray" else "RGB"), dtype=np.float32) / 255.0
            except (OSError, UnidentifiedImageError) as err:
                raise ValueError(f"{path} is not a readable image ({err}); remove or replace it") from err
            tensor = torch.from_numpy(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)).unsqueeze(0)
            if preprocess.image_size:
                tensor = resize_center_crop(tensor, preprocess.image_size, preprocess.resize or preprocess.image_size)
            images.append(tensor)
            labels.append(index)
    if not images:
        raise ValueError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    sizes = sorted({tuple(t.shape[-2:]) for t in images})
    if len(sizes) > 1:
        raise ValueError(
            f"{root}: images have different sizes ({sizes[:4]}...); set image_size (and resize) to bring them to one"
        )
    stacked = Preprocess(mean=preprocess.mean, std=preprocess.std).apply(torch.cat(images), str(root))
    return stacked, torch.tensor(labels, dtype=torch.int64)


def read_image_tree(
    root: Path, split: str, preprocess: Preprocess
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """(images N x C x H x W float32, labels, classes) of ``root/<split>``, preprocessed, in file order."""
    folder = root / split
    if not folder.is_dir():
        raise FileNotFoundError(f"image tree {root} has no {split}/ folder (expected {root}/{split}/<class>/*.png)")
    classes = tree_classes(root)
    color = preprocess.color or tree_color(root)
    stamp = max((p.stat().st_mtime_ns for p in folder.rglob("*")), default=0)
    images, labels = _read_tree_split(str(folder.resolve()), classes, color, preprocess, stamp)
    return images.clone(), labels.clone(), classes
