"""The user's own model and data through every entry point: config import specs (module or file, from
the working directory, no PYTHONPATH), ``edgetrain train / quantize / eval`` with a model file and an
image folder, calibration method and ``--analyze`` on the command line."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgetrain.data import Preprocess
from edgetrain.pipeline.config import DataSection, ModelSection, QuantizeSection
from edgetrain.pipeline.models import build_model, data_source, model_from_spec, quant_settings

NETS = """
from torch import nn


def build(num_classes, in_channels):
    return nn.Sequential(
        nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, num_classes)
    )
"""


def _tree(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", 40), ("test", 10)):
        for label in range(2):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count // 2):
                image = rng.integers(0, 90, (10, 10)) + 150 * label * (np.arange(10) < 5)[:, None]
                Image.fromarray(image.astype(np.uint8)).save(folder / f"{i}.png")


def test_import_specs_resolve_from_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mynets_cwd.py").write_text(NETS)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.py").write_text(NETS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    for spec in ("mynets_cwd:build", "models/tiny.py:build", str(tmp_path / "models" / "tiny.py") + ":build"):
        model = model_from_spec(spec, num_classes=3, in_channels=2, image_size=8)
        assert model(torch.zeros(1, 2, 8, 8)).shape == (1, 3)
    with pytest.raises(ValueError, match="no file"):
        model_from_spec("models/missing.py:build", 3, 1, 8)
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        model_from_spec("mynets_cwd:nope", 3, 1, 8)
    with pytest.raises(ValueError, match="unknown zoo model"):
        model_from_spec("resnet-huge", 3, 1, 8)


def test_config_sections_build_the_data_source_and_quantizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tree(tmp_path / "data")
    (tmp_path / "nets.py").write_text(NETS)
    monkeypatch.chdir(tmp_path)
    section = DataSection(dataset="folder", root="data", image_size=8, resize=9, mean=[0.5], std=[0.5])
    source = data_source(section)
    assert source.preprocess == Preprocess(image_size=8, resize=9, mean=(0.5,), std=(0.5,))
    train = source.load("train")
    assert train.input_shape == (1, 8, 8) and train.classes == ("class0", "class1")
    model = build_model(ModelSection(import_path="nets.py:build"), train)
    assert model(train.images[:2]).shape == (2, 2)
    settings = quant_settings(QuantizeSection(calibration="max", weight_calibration="mse", allow_float=True))
    assert (settings.activation_calibration, settings.weight_calibration, settings.allow_float) == ("max", "mse", True)
    assert quant_settings(QuantizeSection()).activation_calibration == "auto"


def test_train_quantize_eval_a_users_model_file_on_an_image_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgetrain.cli import main

    _tree(tmp_path / "data")
    (tmp_path / "nets.py").write_text(NETS)
    monkeypatch.chdir(tmp_path)
    data = ["--data", "folder", "--root", "data", "--image-size", "8", "--mean", "0.5", "--std", "0.5"]
    common = ["--threads", "1"]
    assert main(["train", "--model", "nets.py:build", *data, "--epochs", "2", "--out", "float.pt", *common]) == 0
    quantize = ["quantize", "--float", "float.pt", "--calibration", "auto", "--out", "int8.pt", "--calib", "32"]
    assert main([*quantize, "--analyze", "analysis.png", *common]) == 0
    out = capsys.readouterr().out
    assert "SQNR dB" in out and "layer kept in float" in out and (tmp_path / "analysis.png").exists()
    assert main(["eval", "--checkpoint", "int8.pt", "--float", "float.pt", *common]) == 0
    out = capsys.readouterr().out
    assert "folder/test (10 images)" in out  # the data spec recorded by `train` is reused


def test_config_keys_for_data_and_calibration_are_checked() -> None:
    from edgetrain.pipeline.config import ConfigError, config_from_dict, validate_config

    config = config_from_dict({"data": {"image_size": 32, "mean": [0.5, 1], "std": [0.25, 0.5]}})
    assert config.data.mean == [0.5, 1.0] and "mean = [0.5, 1.0]" in config.to_toml()
    with pytest.raises(ConfigError, match="list of numbers"):
        config_from_dict({"data": {"std": ["wide"]}})
    bad = config_from_dict({"quantize": {"calibration": "klj"}, "data": {"color": "bgr"}, "adapt": {"rules": []}})
    with pytest.raises(ConfigError, match="did you mean 'kl_j'") as err:
        validate_config(bad)
    assert "[data] color = 'bgr' is unknown" in str(err.value)
