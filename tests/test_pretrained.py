"""A real pretrained CNN from a PyPI package (facenet-pytorch's MTCNN R-Net and O-Net, weights in the
wheel): static INT8 keeps its decisions on real photos; the integer program and the adapting device
are bit-exact."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch

from edgetrain.adapt.device import DeviceNet
from edgetrain.export import to_integer
from edgetrain.graph import quantize
from edgetrain.models.pretrained import PACKAGES, load_pretrained, mtcnn_input, photo_crops

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def facenet() -> None:
    """facenet-pytorch installed without its dependencies (its metadata pins torch < 2.3)."""
    if importlib.util.find_spec("facenet_pytorch") is None:
        install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", PACKAGES["facenet_pytorch"]]
        if subprocess.run(install, capture_output=True, timeout=300).returncode != 0:
            pytest.skip(f"cannot install {PACKAGES['facenet_pytorch']} (no package registry?)")
        importlib.invalidate_caches()


@pytest.mark.parametrize(("name", "side", "calib_count"), [("mtcnn-rnet", 24, 32), ("mtcnn-onet", 48, 16)])
def test_mtcnn_static_int8_is_bit_exact_and_agrees_with_float(facenet, name: str, side: int, calib_count: int) -> None:
    model = load_pretrained(name)
    calib = mtcnn_input(photo_crops(side, calib_count, seed=1))
    test = mtcnn_input(photo_crops(side, 64, seed=2))
    qmodel = quantize(model, calib[:1], calib)
    program = to_integer(qmodel)
    with torch.no_grad():
        reference, fake = model(test), qmodel(test)
    np.testing.assert_array_equal(program.run(test), fake.numpy())
    np.testing.assert_array_equal(DeviceNet.from_program(program)(test).detach().numpy(), fake.numpy())
    assert (reference.argmax(1) == fake.argmax(1)).float().mean() >= 0.95
    ops = {op["op"] for op in program.ops}
    assert {"lookup", "maxpool", "transpose"} <= ops  # PReLU tables, ceil-mode pools, the permute
    assert any(op.get("ceil_mode") for op in program.ops)
