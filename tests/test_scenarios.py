"""Shift transforms and adaptation scenarios: determinism, block boundaries, subsets, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgetrain.adapt.scenarios import SCENARIOS, _digit_parts, make_scenario, pretraining_set
from edgetrain.data import DatasetNotFoundError, DataSource
from edgetrain.data.shift import (
    PAPER_SHIFT_BLOCKS,
    apply_shift,
    background,
    class_clustered_order,
    scale_rotate_shift,
    white_noise,
)
from edgetrain.nvm import DriftSpec


def _label_changes(labels: np.ndarray) -> float:
    return float(np.mean(labels[1:] != labels[:-1]))


def _ring_mean(images: torch.Tensor) -> np.ndarray:
    """Mean of the outer 2-pixel ring of each image: small on digits, raised by a background."""
    x = images[:, 0].numpy()
    ring = np.ones(x.shape[1:], dtype=bool)
    ring[2:-2, 2:-2] = False
    return x[:, ring].mean(axis=1)


# -- transforms ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(16, 1, 28, 28), (16, 28, 28), (28, 28)])
@pytest.mark.parametrize("kinds", [("ST",), ("BG",), ("WN",), ("CD", "ST", "BG", "WN")])
def test_transforms_keep_shape_and_range(shape: tuple[int, ...], kinds: tuple[str, ...]) -> None:
    x = np.random.default_rng(0).random(shape).astype(np.float32)
    y = apply_shift(x, kinds, np.random.default_rng(1))
    assert y.shape == x.shape and y.dtype == np.float32
    assert y.min() >= 0.0 and y.max() <= 1.0
    assert not np.array_equal(y, x)


def test_transforms_reduce_to_identity_and_match_their_parameters() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((8, 1, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(scale_rotate_shift(x, rng, 0.0, 0.0, 0.0), x, atol=1e-6)
    np.testing.assert_allclose(background(x, rng, (1.0, 1.0), (0.0, 0.0), 0.0), x, atol=1e-6)
    # a pure translation by N(0, 2^2) px moves a centred dot's centroid by about 2 px per axis
    dot = np.zeros((400, 28, 28), dtype=np.float32)
    dot[:, 13:15, 13:15] = 1.0
    moved = scale_rotate_shift(dot, np.random.default_rng(1), 0.0, 0.0, 2.0)
    cy = (moved.sum(axis=2) * np.arange(28)).sum(axis=1) / moved.sum(axis=(1, 2))
    assert np.std(cy - 13.5) == pytest.approx(2.0, rel=0.2)
    # white noise: sigma fixed at 0.1 on mid-grey images (no clipping) gives a pixel std of 0.1
    grey = np.full((50, 28, 28), 0.5, dtype=np.float32)
    assert white_noise(grey, rng, (0.1, 0.1)).std() == pytest.approx(0.1, rel=0.03)
    # background on a black image: mean = offset mean (0.35) since the plane averages to zero
    black = np.zeros((2000, 28, 28), dtype=np.float32)
    assert background(black, rng, offset=(0.2, 0.5), dev_max=0.1).mean() == pytest.approx(0.35, abs=0.01)


def test_class_clustered_order() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=5000)
    order = class_clustered_order(labels, rng)
    assert np.array_equal(np.sort(order), np.arange(5000))
    assert _label_changes(labels) > 0.85
    assert _label_changes(labels[order]) < 0.6  # classes come in clusters
    grouped = class_clustered_order(labels, rng, spread=0.0, eps=0.0)
    assert np.count_nonzero(np.diff(labels[grouped])) == 9  # one run per class
    assert _label_changes(labels[class_clustered_order(labels, rng, eps=1.0)]) > 0.85
    with pytest.raises(ValueError, match="eps"):
        class_clustered_order(labels, rng, eps=2.0)


# -- scenarios ----------------------------------------------------------------------------------------
def test_stream_is_identical_for_any_chunking() -> None:
    full = make_scenario("shift", samples=700, seed=3, block_length=250)
    x, y = full.batch(0, 700)
    assert x.shape == (700, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    other = make_scenario("shift", samples=700, seed=3, block_length=250)
    bounds = [0, 1, 2, 99, 100, 101, 249, 250, 251, 333, 499, 500, 650, 700]
    parts = [other.batch(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    assert torch.equal(torch.cat([p[1] for p in parts]), y)
    singles = [other.batch(i, i + 1) for i in range(240, 260)]  # per-sample calls, across a block boundary
    assert torch.equal(torch.cat([s[0] for s in singles]), x[240:260])
    longer = make_scenario("shift", samples=1500, seed=3, block_length=250)
    assert torch.equal(longer.batch(0, 700)[0], x)  # a longer stream starts like a shorter one
    assert not torch.equal(make_scenario("shift", samples=700, seed=4, block_length=250).batch(0, 700)[0], x)
    assert other.batch(5, 5)[0].shape == (0, 1, 28, 28)


def test_shift_blocks_change_at_the_boundaries() -> None:
    sc = make_scenario("shift", samples=900, seed=1, block_length=300, blocks=[(), ("BG",), ("CD",)])
    assert [sc.kinds_at(i) for i in (0, 299, 300, 599, 600, 899)] == [(), (), ("BG",), ("BG",), ("CD",), ("CD",)]
    x, y = sc.batch(0, 900)
    # the same stream without shifts: every block draws from its own seeds, so only block 1's images
    # and block 2's order may differ, and they differ from the first sample to the last
    px, py = make_scenario("shift", samples=900, seed=1, block_length=300, blocks=[(), (), ()]).batch(0, 900)
    assert torch.equal(x[:300], px[:300]) and torch.equal(y[:600], py[:600])
    assert all(not torch.equal(x[i], px[i]) for i in range(300, 600))
    assert np.median(_ring_mean(x[300:600])) > 0.25 > 0.05 > np.median(_ring_mean(px[300:600]))
    assert sorted(y[600:].tolist()) == sorted(py[600:].tolist())  # CD reorders the same samples
    assert _label_changes(py[600:].numpy()) > 0.8 and _label_changes(y[600:].numpy()) < 0.6
    assert [b["kinds"] for b in sc.describe()["blocks"]] == [[], ["BG"], ["CD"]]


def test_paper_blocks_and_scale_rotate_shift_block() -> None:
    sc = make_scenario("shift", samples=20_000, block_length=1000)
    assert sc.blocks == PAPER_SHIFT_BLOCKS
    assert [sc.kinds_at(1000 * b) for b in range(10)] == list(PAPER_SHIFT_BLOCKS)
    assert sc.kinds_at(10_500) == ("CD",)  # the ten blocks repeat
    # same seed, same picks and elastic noise: ST only moves the digits around
    plain = make_scenario("shift", samples=200, block_length=200, blocks=[()]).batch(0, 200)[0]
    st = make_scenario("shift", samples=200, block_length=200, blocks=[("ST",)]).batch(0, 200)[0]

    def centroid(images: torch.Tensor) -> np.ndarray:
        x = images[:, 0].numpy().astype(np.float64)
        return (x.sum(axis=2) * np.arange(28)).sum(axis=1) / np.maximum(x.sum(axis=(1, 2)), 1e-9)

    visible = (st.sum(dim=(1, 2, 3)) > 1.0).numpy()  # ST may push a digit out of the frame
    assert 1.0 < np.std((centroid(st) - centroid(plain))[visible]) < 4.0


def test_drift_scenarios_use_the_control_stream() -> None:
    control = make_scenario("control", samples=150, seed=2)
    analog = make_scenario("analog-drift", samples=150, seed=2)
    digital = make_scenario("digital-drift", samples=150, seed=2, drift={"period": 5, "p0": 20.0})
    assert control.drift is None and analog.drift == DriftSpec("analog")
    assert digital.drift == DriftSpec("digital", period=5, p0=20.0)
    for sc in (analog, digital):
        assert torch.equal(sc.batch(0, 150)[0], control.batch(0, 150)[0])
    assert json.loads(json.dumps(digital.describe()))["drift"]["p"] == pytest.approx(20.0 / 2e5)
    assert (control.num_classes, control.input_shape, control.samples) == (10, (1, 28, 28), 150)


def test_new_user_class_subset_and_transforms() -> None:
    sc = make_scenario("new-user", samples=400, seed=0, classes=[7, 2, 9])
    _, y = sc.batch(0, 400)
    assert set(y.tolist()) == {2, 7, 9} and sc.classes == (2, 7, 9)
    _, test_labels = sc.test_set
    assert set(test_labels.tolist()) == {2, 7, 9}
    default = make_scenario("new-user", samples=200)
    assert set(default.batch(0, 200)[1].tolist()) <= set(range(5))
    control = make_scenario("control", samples=100, seed=5).batch(0, 100)
    inverted = make_scenario("new-user", samples=100, seed=5, transform="invert").batch(0, 100)
    torch.testing.assert_close(inverted[0], 1.0 - control[0])
    assert torch.equal(inverted[1], control[1])
    rotated = make_scenario("new-user", samples=100, seed=5, transform="rotate", angle=40.0).batch(0, 100)[0]
    assert rotated.shape == control[0].shape and 0.0 <= rotated.min() and rotated.max() <= 1.0
    assert not torch.allclose(rotated, control[0])


def test_test_set_follows_the_final_conditions() -> None:
    tail_bg = make_scenario("shift", samples=250, block_length=100, blocks=[(), (), ("BG",)])
    images, labels = tail_bg.test_set
    assert images.shape == (labels.numel(), 1, 28, 28) and labels.numel() == 2000
    clean, clean_labels = make_scenario("control", samples=10).test_set
    assert np.median(_ring_mean(images)) > 0.25 > 0.05 > np.median(_ring_mean(clean))
    assert torch.equal(clean_labels, labels)


def test_pretraining_set_is_seeded_and_disjoint_from_the_stream_digits() -> None:
    first = pretraining_set("mnist", samples=300, seed=1)
    again = pretraining_set("mnist", samples=300, seed=1)
    assert first.images.shape == (300, 1, 28, 28) and first.labels.shape == (300,)
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert 0.0 <= first.images.min() and first.images.max() <= 1.0
    train, pretrain_idx, online_idx, _ = _digit_parts(DataSource("mnist"))
    assert np.intersect1d(pretrain_idx, online_idx).size == 0
    assert pretrain_idx.size + online_idx.size == len(train)
    assert pretraining_set("mnist", samples=20, split="val").split == "val"


def test_fashion_mnist_stream() -> None:
    try:
        sc = make_scenario("control", dataset="fashion-mnist", samples=50)
    except DatasetNotFoundError:
        pytest.skip("Fashion-MNIST is not installed")
    x, y = sc.batch(0, 50)
    assert x.shape == (50, 1, 28, 28) and int(y.max()) < 10


def test_bad_arguments_give_clear_errors() -> None:
    assert SCENARIOS == ("control", "shift", "analog-drift", "digital-drift", "new-user")
    with pytest.raises(ValueError, match="unknown scenario 'drift'"):
        make_scenario("drift")
    with pytest.raises(ValueError, match="unknown stream dataset"):
        make_scenario("control", dataset="cifar10")
    with pytest.raises(ValueError, match="takes no option"):
        make_scenario("control", classes=[1, 2])
    with pytest.raises(ValueError, match="samples"):
        make_scenario("control", samples=0)
    with pytest.raises(ValueError, match="blocks"):
        make_scenario("shift", blocks=[("XY",)])
    with pytest.raises(ValueError, match="classes"):
        make_scenario("new-user", classes=[3, 11])
    with pytest.raises(ValueError, match="transform"):
        make_scenario("new-user", transform="mirror")
    with pytest.raises(ValueError, match="DriftSpec"):
        make_scenario("analog-drift", drift=DriftSpec("digital"))
    sc = make_scenario("control", samples=10)
    with pytest.raises(ValueError, match="stop"):
        sc.batch(5, 11)
    with pytest.raises(ValueError, match="start"):
        sc.batch(6, 5)
    with pytest.raises(ValueError, match="unknown shift kind"):
        apply_shift(np.zeros((1, 28, 28)), ("NOISE",), np.random.default_rng(0))
