"""A user's own data: image trees (Pillow), channels-last arrays, preprocessing, scenarios on a folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgetrain.adapt.scenarios import make_scenario
from edgetrain.data import DataSource, Preprocess, load_dataset
from edgetrain.data.images import resize_center_crop

OPENCV_DIGITS = Path("/usr/share/doc/opencv-doc/examples/data/digits.png")


def write_tree(root: Path, split: str, images: np.ndarray, labels: np.ndarray, names: list[str], ext: str) -> None:
    """``root/split/<names[label]>/<i>.<ext>`` for uint8 H x W or H x W x 3 images."""
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / split / names[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}.{ext}")


def test_gray_png_tree_splits_classes_and_normalisation(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    names = ["cat", "ant", "bee"]  # classes follow the sorted folder names: ant 0, bee 1, cat 2
    labels = np.repeat([0, 1, 2], 10)
    images = (labels[:, None, None] * 100 + rng.integers(0, 3, (30, 12, 10))).astype(np.uint8)
    write_tree(tmp_path, "train", images, labels, names, "png")
    write_tree(tmp_path, "test", images[::5], labels[::5], names, "png")
    train = load_dataset("folder", "train", root=tmp_path)
    val = load_dataset("folder", "val", root=tmp_path)
    test = load_dataset("folder", "test", root=tmp_path)
    assert (len(train), len(val), len(test)) == (27, 3, 6)
    assert train.classes == ("ant", "bee", "cat") and train.input_shape == (1, 12, 10)
    # the label is the sorted position of the folder name, the pixels are value / 255
    folder_index = {"cat": 2, "ant": 0, "bee": 1}
    expected_level = {folder_index[n]: 100 * k for k, n in enumerate(names)}
    for image, label in zip(test.images, test.labels, strict=True):
        assert float(image.min()) * 255 == pytest.approx(expected_level[int(label)], abs=2.5)
    # train and val are disjoint and together hold every training image
    pixels = {tuple(x.flatten().tolist()) for x in torch.cat([train.images, val.images])}
    assert len(pixels) == 30
    normalised = load_dataset("folder", "test", root=tmp_path, preprocess=Preprocess(mean=(0.5,), std=(0.25,)))
    assert torch.equal(normalised.images, (test.images - 0.5) / 0.25)


def test_rgb_jpg_tree_is_detected_and_converted_to_gray_on_request(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (8, 9, 9, 3)).astype(np.uint8)
    labels = np.arange(8) % 2
    write_tree(tmp_path, "train", images, labels, ["a", "b"], "jpg")
    write_tree(tmp_path, "test", images[:2], labels[:2], ["a", "b"], "jpg")
    rgb = load_dataset("folder", "test", root=tmp_path)
    assert rgb.input_shape == (3, 9, 9)
    gray = load_dataset("folder", "test", root=tmp_path, preprocess=Preprocess(color="gray"))
    assert gray.input_shape == (1, 9, 9)
    files = sorted((tmp_path / "test").rglob("*.jpg"))
    expected = {np.asarray(Image.open(f).convert("L")).tobytes() for f in files}
    got = {np.rint(x[0].numpy() * 255).astype(np.uint8).tobytes() for x in gray.images}
    assert got == expected


def test_resize_then_centre_crop() -> None:
    image = torch.arange(6 * 10, dtype=torch.float32).reshape(1, 1, 6, 10)
    # shorter side already 6: only the centre 6 x 6 crop, columns 2..7
    assert torch.equal(resize_center_crop(image, 6, 6), image[..., 2:8])
    constant = torch.full((1, 3, 20, 30), 0.25)
    resized = resize_center_crop(constant, 8, 10)  # 20 x 30 -> 10 x 15 -> crop 8 x 8
    assert resized.shape == (1, 3, 8, 8) and torch.allclose(resized, torch.full_like(resized, 0.25))


def test_tree_with_mixed_sizes_needs_image_size(tmp_path: Path) -> None:
    for i, size in enumerate((10, 14)):
        write_tree(tmp_path, "train", np.zeros((1, size, size), np.uint8), np.zeros(1, int), [f"c{i}"], "png")
    with pytest.raises(ValueError, match="set image_size"):
        load_dataset("folder", "train", root=tmp_path)
    train = load_dataset("folder", "train", root=tmp_path, preprocess=Preprocess(image_size=8))
    assert train.input_shape == (1, 8, 8)


def test_channels_last_arrays_are_transposed_or_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (20, 28, 28, 1)).astype(np.uint8)
    np.save(tmp_path / "test_images.npy", images)
    np.save(tmp_path / "test_labels.npy", rng.integers(0, 10, 20))
    test = load_dataset("folder", "test", root=tmp_path)
    assert test.input_shape == (1, 28, 28)
    assert torch.equal(test.images[:, 0], torch.from_numpy(images[..., 0].astype(np.float32) / 255))
    np.save(tmp_path / "test_images.npy", np.zeros((20, 28, 28, 5), np.uint8))
    with pytest.raises(ValueError, match="cannot tell the channel axis"):
        load_dataset("folder", "test", root=tmp_path)


def test_scenarios_run_on_a_normalised_colour_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    labels = np.arange(40) % 4
    images = rng.integers(0, 256, (40, 12, 12, 3)).astype(np.uint8)
    write_tree(tmp_path, "train", images, labels, ["w", "x", "y", "z"], "png")
    write_tree(tmp_path, "test", images[:8], labels[:8], ["w", "x", "y", "z"], "png")
    source = DataSource("folder", str(tmp_path), Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
    for name, options in (("control", {}), ("shift", {"block_length": 10}), ("new-user", {}), ("digital-drift", {})):
        scenario = make_scenario(name, dataset=source, samples=25, seed=0, **options)
        x, y = scenario.batch(0, 25)
        assert x.shape == (25, 3, 12, 12) and y.shape == (25,)
        # the conditions run on [0, 1] pixels and come back in the normalised range [-1, 1]
        assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
        assert scenario.test_set[0].shape[1:] == (3, 12, 12)
        assert torch.equal(scenario.batch(10, 20)[0], x[10:20])  # any chunking, same samples
    assert set(make_scenario("new-user", dataset=source, samples=30).batch(0, 30)[1].tolist()) <= {0, 1}


def test_fashion_mnist_written_as_pngs_reads_back_pixel_exact(tmp_path: Path) -> None:
    from edgetrain.data import DatasetNotFoundError

    try:
        idx_train, idx_test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    except DatasetNotFoundError as err:
        pytest.skip(f"Fashion-MNIST is not installed: {err}")
    names = [n.replace("/", "-") for n in idx_train.classes]  # class folders: "T-shirt-top", "Trouser", ...
    for split, data in (("train", idx_train.subset(200)), ("test", idx_test.subset(50))):
        pixels = np.rint(data.images[:, 0].numpy() * 255).astype(np.uint8)
        write_tree(tmp_path, split, pixels, data.labels.numpy(), names, "png")
    test = load_dataset("folder", "test", root=tmp_path)
    assert test.classes == tuple(sorted(names)) and test.input_shape == (1, 28, 28)
    # PNG is lossless: every image comes back exactly, under the label of its folder
    original = {idx_test.images[i].numpy().tobytes(): names[int(idx_test.labels[i])] for i in range(50)}
    for image, label in zip(test.images, test.labels, strict=True):
        assert original[image.numpy().tobytes()] == test.classes[int(label)]
    scenario = make_scenario("shift", dataset=DataSource("folder", str(tmp_path)), samples=20, block_length=10)
    assert scenario.batch(0, 20)[0].shape == (20, 1, 28, 28)


def cut_opencv_digits(root: Path, per_class_train: int, per_class_test: int) -> None:
    """OpenCV's digits sheet (50 rows x 100 columns of 20 x 20 digits, 5 rows per class) as a PNG tree."""
    sheet = np.asarray(Image.open(OPENCV_DIGITS).convert("L"))
    cells = sheet.reshape(50, 20, 100, 20).transpose(0, 2, 1, 3).reshape(10, 500, 20, 20)
    for digit in range(10):
        for split, picks in (("train", range(per_class_train)), ("test", range(500 - per_class_test, 500))):
            folder = root / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for i in picks:
                Image.fromarray(cells[digit, i]).save(folder / f"{i:03d}.png")


@pytest.mark.skipif(
    not OPENCV_DIGITS.exists(), reason=f"{OPENCV_DIGITS} is absent: apt-get install opencv-doc (95 MB) to run this"
)
def test_opencv_digits_sheet_as_a_folder_trains_and_streams(tmp_path: Path) -> None:
    from edgetrain.training import evaluate, train_float

    cut_opencv_digits(tmp_path, per_class_train=60, per_class_test=20)
    source = DataSource("folder", str(tmp_path), Preprocess(image_size=16, resize=18, mean=(0.1,), std=(0.3,)))
    train, test = source.load("train"), source.load("test")
    assert train.input_shape == (1, 16, 16) and train.classes == tuple(str(d) for d in range(10))
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(512, 10),
    )
    train_float(model, train, None, epochs=5, lr=1e-2, batch_size=32, progress=False)
    assert evaluate(model, test) > 0.8  # real handwritten digits: well above the 0.1 of chance
    scenario = make_scenario("shift", dataset=source, samples=40, block_length=20)
    assert scenario.batch(0, 40)[0].shape == (40, 1, 16, 16)
