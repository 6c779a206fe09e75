"""Adaptation scenarios: seeded, reproducible sample streams (docs/adaptation.md; LRT v1 section 6).

Each scenario is a stream of elastic-deformed digits (Simard et al.; the (sigma, alpha) pairs of
``ELASTIC_PAIRS``), on which the device predicts first and then learns:

- ``control``: the same distribution as pretraining;
- ``shift``: a different augmentation combination per block of ``block_length`` samples (10k in the
  paper): the ten blocks of ``PAPER_SHIFT_BLOCKS`` (CD, ST, BG, WN; see ``edgetrain.data.shift``),
  repeated when the stream is longer than ten blocks;
- ``analog-drift`` / ``digital-drift``: the control stream plus a ``DriftSpec`` for the weights;
- ``new-user``: a class subset (``classes=``, default 0-4) and/or a fixed input transform
  (``transform="rotate"`` by ``angle`` degrees, or ``"invert"``).

Determinism: sample j lies in block b = j // block_length. The block's pool indices come from
SeedSequence(seed, 1, b) (CD reorders them); its images are generated in chunks of ``CHUNK`` samples,
chunk s from SeedSequence(seed, 2, b, s). ``batch(start, stop)`` therefore returns the same samples for
any chunking, so a resumed run sees the same stream, and a longer stream starts like a shorter one.

The digits: the dataset's train split is divided once (seeded) into pretraining digits and online
digits, like the paper's disjoint 9k offline / 50k online MNIST digits, so the stream shows the
network digits it never saw (``pool="train"`` streams the whole train split instead). The test set is
the test split, each digit deformed once, under the scenario's conditions at its last sample.

Any dataset :func:`~edgetrain.data.load_dataset` returns can feed a stream (a name, or a
:class:`~edgetrain.data.DataSource` for a user's ``folder`` with its ``root`` and ``preprocess``),
grayscale or colour (one deformation per image, shared by its channels). The conditions work on
pixels in [0, 1]: channel c is mapped by x_unit = (x - lo_c) / (hi_c - lo_c) with lo_c = min(0, min x),
hi_c = max(1, max x) over the train split (the identity for data already in [0, 1]; it undoes a
mean/std normalisation up to scale), and mapped back after the conditions.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from scipy.ndimage import rotate

from edgetrain.data.datasets import DATASETS, Dataset, DataSource
from edgetrain.data.elastic import ELASTIC_PAIRS, elastic_deform, elastic_stream
from edgetrain.data.shift import PAPER_SHIFT_BLOCKS, SHIFT_KINDS, apply_shift, class_clustered_order
from edgetrain.nvm import DriftSpec

SCENARIOS = ("control", "shift", "analog-drift", "digital-drift", "new-user")
STREAM_DATASETS = DATASETS  # every dataset load_dataset reads (folder: give root=)
NEW_USER_TRANSFORMS = ("rotate", "invert")
POOLS = ("online", "train")
CHUNK = 100  # samples generated together from one seed
PRETRAIN_SHARE = 0.5  # share of the train-split digits kept for pretraining (the rest feed the streams)
_SPLIT_SEED = 12345  # fixed: the pretraining/online division of the digits never changes


@dataclass(frozen=True)
class ValueRange:
    """Per-channel affine map of a dataset's pixels to [0, 1] and back (module docstring)."""

    lo: np.ndarray  # C x 1 x 1
    span: np.ndarray  # C x 1 x 1

    @classmethod
    def of(cls, images: torch.Tensor) -> ValueRange:
        lo = torch.minimum(images.amin((0, 2, 3)), torch.zeros(())).numpy().astype(np.float32)
        hi = torch.maximum(images.amax((0, 2, 3)), torch.ones(())).numpy().astype(np.float32)
        return cls(lo.reshape(-1, 1, 1), (hi - lo).reshape(-1, 1, 1))

    def to_unit(self, images: np.ndarray) -> np.ndarray:
        return ((images - self.lo) / self.span).astype(np.float32)

    def from_unit(self, images: np.ndarray) -> np.ndarray:
        return (images * self.span + self.lo).astype(np.float32)


@lru_cache(maxsize=2)
def _digit_parts(source: DataSource) -> tuple[Dataset, np.ndarray, np.ndarray, ValueRange]:
    """The train split, its (pretraining, online) index sets and its value range (cached: callers only
    index them)."""
    train = source.load("train")
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(train))
    cut = int(round(PRETRAIN_SHARE * len(train)))
    return train, np.sort(order[:cut]), np.sort(order[cut:]), ValueRange.of(train.images)


def _source(dataset: str | DataSource) -> DataSource:
    """A dataset name (built-in data) or a :class:`DataSource` as a source."""
    source = dataset if isinstance(dataset, DataSource) else DataSource(dataset)
    if source.name not in STREAM_DATASETS:
        raise ValueError(f"unknown stream dataset {source.name!r}; choose one of: {', '.join(STREAM_DATASETS)}")
    return source


def pretraining_set(
    dataset: str | DataSource = "mnist", samples: int = 50_000, seed: int = 0, split: str = "train"
) -> Dataset:
    """Elastic-deformed offline data for pretraining (the authors' code: 50k samples from 9k
    digits). ``split="train"`` draws from the pretraining digits only (disjoint from the online streams);
    ``"val"``/``"test"`` deform the dataset's validation/test split."""
    source = _source(dataset)
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    train, pretrain_idx, _, value_range = _digit_parts(source)
    if split == "train":
        source_images, source_labels = train.images[pretrain_idx], train.labels[pretrain_idx]
        classes = train.classes
    else:
        held_out = source.load(split)
        source_images, source_labels, classes = held_out.images, held_out.labels, held_out.classes
    unit = torch.from_numpy(value_range.to_unit(source_images.numpy()))
    images, labels = elastic_stream(unit, source_labels, samples, seed=seed)
    return Dataset(
        f"{source.name}-elastic", split, torch.from_numpy(value_range.from_unit(images.numpy())), labels, classes
    )


@dataclass
class Scenario:
    """A seeded stream of ``samples`` samples; build it with :func:`make_scenario`."""

    name: str
    dataset: str
    samples: int
    seed: int
    drift: DriftSpec | None
    block_length: int
    blocks: tuple[tuple[str, ...], ...]  # per block the shift kinds (empty tuples outside ``shift``)
    classes: tuple[int, ...]  # the classes the stream shows
    transform: str | None
    angle: float
    pool: str
    num_classes: int
    input_shape: tuple[int, int, int]
    source: DataSource
    _value_range: ValueRange = field(repr=False)
    _pool_images: np.ndarray = field(repr=False)  # N x C x H x W in [0, 1]
    _pool_labels: np.ndarray = field(repr=False)
    _picks: OrderedDict[int, np.ndarray] = field(default_factory=OrderedDict, repr=False)
    _chunks: OrderedDict[tuple[int, int], np.ndarray] = field(default_factory=OrderedDict, repr=False)
    _test: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def block_kinds(self, block: int) -> tuple[str, ...]:
        """Shift kinds of block ``block`` (the block list repeats)."""
        return self.blocks[block % len(self.blocks)]

    def kinds_at(self, index: int) -> tuple[str, ...]:
        """Shift kinds in force at sample ``index``."""
        return self.block_kinds(index // self.block_length)

    def _block_picks(self, block: int) -> np.ndarray:
        """Pool indices of every sample of block ``block`` (class-clustered when CD is on)."""
        if block not in self._picks:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, 1, block]))
            picks = rng.integers(0, self._pool_labels.size, size=self.block_length)
            if "CD" in self.block_kinds(block):
                picks = picks[class_clustered_order(self._pool_labels[picks], rng)]
            self._picks[block] = picks
            if len(self._picks) > 2:
                self._picks.popitem(last=False)
        return self._picks[block]

    def _chunk(self, block: int, sub: int) -> np.ndarray:
        """Images of samples [sub*CHUNK, (sub+1)*CHUNK) of block ``block`` (cut at the block end)."""
        key = (block, sub)
        if key not in self._chunks:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, 2, block, sub]))
            picks = self._block_picks(block)[sub * CHUNK : (sub + 1) * CHUNK]
            pairs = rng.integers(0, len(ELASTIC_PAIRS), size=picks.size)
            images = np.empty((picks.size, *self._pool_images.shape[1:]), dtype=np.float32)
            for i, (pick, pair) in enumerate(zip(picks, pairs, strict=True)):
                sigma, alpha = ELASTIC_PAIRS[pair]
                images[i] = elastic_deform(self._pool_images[pick], sigma, alpha, rng)
            images = np.clip(images, 0.0, 1.0)
            self._chunks[key] = self._condition(images, self.block_kinds(block), rng)
            if len(self._chunks) > 4:
                self._chunks.popitem(last=False)
        return self._chunks[key]

    def _condition(self, images: np.ndarray, kinds: tuple[str, ...], rng: np.random.Generator) -> np.ndarray:
        """The scenario's input conditions on elastic-deformed images (N x C x H x W in [0, 1]), mapped
        back to the dataset's value range."""
        images = apply_shift(images, kinds, rng)
        if self.transform == "rotate":
            images = np.clip(rotate(images, self.angle, axes=(3, 2), reshape=False, order=1), 0.0, 1.0)
        elif self.transform == "invert":
            images = 1.0 - images
        return self._value_range.from_unit(images)

    def batch(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``start .. stop-1``: images float32 (k, C, H, W) in the dataset's range, labels int64 (k,)."""
        if not (isinstance(start, int | np.integer) and isinstance(stop, int | np.integer)):
            raise TypeError(f"start and stop must be ints, got {start!r}, {stop!r}")
        if not 0 <= start <= stop <= self.samples:
            raise ValueError(f"need 0 <= start <= stop <= samples={self.samples}, got start={start}, stop={stop}")
        images, labels = [], []
        j = int(start)
        while j < stop:
            block, offset = divmod(j, self.block_length)
            sub = offset // CHUNK
            lo = offset - sub * CHUNK
            hi = min(CHUNK, self.block_length - sub * CHUNK, lo + (stop - j))
            images.append(self._chunk(block, sub)[lo:hi])
            picks = self._block_picks(block)[sub * CHUNK + lo : sub * CHUNK + hi]
            labels.append(self._pool_labels[picks])
            j += hi - lo
        if not images:
            return torch.empty((0, *self.input_shape)), torch.empty(0, dtype=torch.int64)
        return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels).astype(np.int64))

    @property
    def test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The test split, each digit deformed once, under the conditions at the stream's last sample
        (the shift kinds of its block, CD excepted; the new user's classes and transform)."""
        if self._test is None:
            test = self.source.load("test")
            keep = np.isin(test.labels.numpy(), self.classes)
            images, labels = test.images[torch.from_numpy(keep)], test.labels[torch.from_numpy(keep)]
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, 3]))
            pairs = rng.integers(0, len(ELASTIC_PAIRS), size=labels.numel())
            source = self._value_range.to_unit(images.numpy())
            out = np.empty_like(source)
            for i, pair in enumerate(pairs):
                out[i] = elastic_deform(source[i], *ELASTIC_PAIRS[pair], rng)
            out = self._condition(np.clip(out, 0.0, 1.0), self.kinds_at(self.samples - 1), rng)
            self._test = torch.from_numpy(out), labels.clone()
        return self._test

    def describe(self) -> dict[str, Any]:
        """JSON-able description for run logs."""
        blocks = [
            {"start": b * self.block_length, "kinds": list(self.block_kinds(b))}
            for b in range(-(-self.samples // self.block_length))
        ]
        return {
            "name": self.name,
            "dataset": self.dataset,
            "source": self.source.as_dict(),
            "samples": self.samples,
            "seed": self.seed,
            "drift": None if self.drift is None else self.drift.as_dict(),
            "block_length": self.block_length,
            "blocks": blocks if self.name == "shift" else None,
            "classes": list(self.classes),
            "transform": self.transform,
            "angle": self.angle if self.transform == "rotate" else None,
            "pool": self.pool,
            "pool_digits": int(self._pool_labels.size),
            "elastic_pairs": [list(p) for p in ELASTIC_PAIRS],
        }


def make_scenario(
    name: str, dataset: str | DataSource = "mnist", samples: int = 100_000, seed: int = 0, **options: Any
) -> Scenario:
    """Build scenario ``name`` (one of ``SCENARIOS``) on ``dataset``: a name of ``edgetrain.data.DATASETS``
    or a :class:`~edgetrain.data.DataSource` (e.g. a user's image tree with its root and preprocessing).

    Options: ``block_length`` (shift block, default 10_000), ``blocks`` (a list of kind tuples for
    ``shift``, default ``PAPER_SHIFT_BLOCKS``), ``drift`` (a ``DriftSpec`` or a dict of its fields for
    the drift scenarios; default the paper's d=10, sigma0=10 / p0=10), ``classes`` and ``transform``,
    ``angle`` (``new-user``), ``pool`` ("online" | "train"). ``new-user`` shows the first half of the
    classes by default (0-4 of ten).
    """
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; choose one of: {', '.join(SCENARIOS)}")
    source = _source(dataset)
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an int >= 1, got {samples!r}")
    allowed = {
        "control": {"pool"},
        "shift": {"pool", "block_length", "blocks"},
        "analog-drift": {"pool", "drift"},
        "digital-drift": {"pool", "drift"},
        "new-user": {"pool", "classes", "transform", "angle"},
    }[name]
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"scenario {name!r} takes no option(s) {unknown}; it accepts: {sorted(allowed)}")

    block_length = int(options.get("block_length", 10_000))
    if block_length < 1:
        raise ValueError(f"block_length must be >= 1, got {block_length}")
    blocks: tuple[tuple[str, ...], ...] = ((),)
    if name == "shift":
        blocks = tuple(tuple(kinds) for kinds in options.get("blocks", PAPER_SHIFT_BLOCKS))
        bad = sorted({k for kinds in blocks for k in kinds} - set(SHIFT_KINDS))
        if not blocks or bad:
            raise ValueError(f"blocks must be a non-empty list of tuples of {SHIFT_KINDS}, got unknown {bad}")

    drift = None
    if name in ("analog-drift", "digital-drift"):
        kind = name.removesuffix("-drift")
        drift = options.get("drift", DriftSpec(kind))
        if isinstance(drift, dict):
            drift = DriftSpec(**{"kind": kind, **drift})
        if not isinstance(drift, DriftSpec) or drift.kind != kind:
            raise ValueError(f"drift for {name!r} must be a DriftSpec of kind {kind!r} (or a dict), got {drift!r}")

    pool = options.get("pool", "online")
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; choose one of: {', '.join(POOLS)}")
    train, _, online_idx, value_range = _digit_parts(source)
    idx = online_idx if pool == "online" else np.arange(len(train))
    images, labels = value_range.to_unit(train.images[idx].numpy()), train.labels[idx].numpy()

    classes = tuple(range(train.num_classes))
    transform = None
    angle = float(options.get("angle", 30.0))
    if name == "new-user":
        transform = options.get("transform")
        if transform is not None and transform not in NEW_USER_TRANSFORMS:
            choices = ", ".join(NEW_USER_TRANSFORMS)
            raise ValueError(f"unknown new-user transform {transform!r}; choose one of: {choices}")
        default_subset = tuple(range(max(1, len(classes) // 2))) if transform is None else classes
        subset = tuple(int(c) for c in options.get("classes", default_subset))
        if not subset or len(set(subset)) != len(subset) or not set(subset) <= set(classes):
            raise ValueError(
                f"classes must be distinct class indices of {source.name} (0..{len(classes) - 1}), got {subset}"
            )
        classes = tuple(sorted(subset))
        keep = np.isin(labels, classes)
        images, labels = images[keep], labels[keep]

    return Scenario(
        name=name,
        dataset=source.name,
        samples=samples,
        seed=int(seed),
        drift=drift,
        block_length=block_length,
        blocks=blocks,
        classes=classes,
        transform=transform,
        angle=angle,
        pool=pool,
        num_classes=train.num_classes,
        input_shape=train.input_shape,
        source=source,
        _value_range=value_range,
        _pool_images=images,
        _pool_labels=labels,
    )
