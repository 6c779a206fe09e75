"""Offline datasets, image trees, preprocessing, seeded batching, elastic streams (docs/user-guide.md)."""

from edgetrain.data.datasets import (
    DATASETS,
    Dataset,
    DatasetNotFoundError,
    DataSource,
    load_dataset,
    unlabelled,
    validate_arrays,
)
from edgetrain.data.elastic import ELASTIC_PAIRS, elastic_deform, elastic_stream
from edgetrain.data.images import Preprocess, read_image_tree
from edgetrain.data.loader import epoch_batches, num_batches
from edgetrain.data.shift import PAPER_SHIFT_BLOCKS, SHIFT_KINDS, apply_shift, class_clustered_order

__all__ = [
    "DATASETS",
    "ELASTIC_PAIRS",
    "PAPER_SHIFT_BLOCKS",
    "Preprocess",
    "SHIFT_KINDS",
    "DataSource",
    "Dataset",
    "DatasetNotFoundError",
    "apply_shift",
    "class_clustered_order",
    "elastic_deform",
    "elastic_stream",
    "epoch_batches",
    "load_dataset",
    "num_batches",
    "read_image_tree",
    "unlabelled",
    "validate_arrays",
]
