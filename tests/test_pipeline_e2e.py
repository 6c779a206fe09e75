"""The main job end to end at a tiny size: pretrain, quantize, export, adapt, report."""

import json
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch

from edgetrain.adapt import DeviceNet
from edgetrain.data import DatasetNotFoundError, load_dataset
from edgetrain.export import IntegerProgram
from edgetrain.pipeline.config import PipelineConfig
from edgetrain.pipeline.run import run_pipeline
from edgetrain.report.browser import find_chromium, screenshot

try:
    load_dataset("fashion-mnist", "test")
    HAVE_FASHION = True
except DatasetNotFoundError:
    HAVE_FASHION = False

pytestmark = pytest.mark.skipif(not HAVE_FASHION, reason="Fashion-MNIST not installed (scripts/setup.sh)")


def tiny_config(out: Path) -> PipelineConfig:
    config = PipelineConfig()
    config.data.train_samples, config.data.test_samples = 400, 200
    config.pretrain.epochs = 1
    config.quantize.calibration_samples, config.quantize.retrain_samples = 64, 200
    config.adapt.samples, config.adapt.shift_block, config.adapt.test_samples = 40, 20, 100
    config.output.dir = str(out)
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[PipelineConfig, dict, list[str]]:
    config = tiny_config(tmp_path_factory.mktemp("pipeline"))
    logs: list[str] = []
    return config, run_pipeline(config, log=logs.append), logs


def test_integer_program_is_bit_exact_and_onnx_agrees(run) -> None:
    _, summary, _ = run
    assert summary["export"]["verified_samples"] == summary["test_images"] == 200
    assert summary["export"]["integer_mismatches"] == 0
    assert summary["export"]["onnx_agreement"] >= 0.999
    export, quantize = summary["export"], summary["quantize"]
    assert export["integer_accuracy"] == pytest.approx(quantize["retrained_accuracy"], abs=1e-6)  # same 200 images
    assert abs(export["onnx_accuracy"] - export["integer_accuracy"]) <= 1 - export["onnx_agreement"]


def test_every_stage_reports_numbers(run) -> None:
    _, summary, _ = run
    assert 0.1 < summary["pretrain"]["test_accuracy"] <= 1.0
    assert summary["quantize"]["retrained"] and len(summary["quantize"]["quantizers"]) > 8
    history = summary["quantize"]["threshold_history"]
    assert history["steps"] and all(len(v) == len(history["steps"]) for v in history["values"].values())
    rules = summary["adapt"]["rules"]
    assert set(rules) == {"lowrank", "sgd", "bias-only"}
    assert rules["bias-only"]["max_writes"] == rules["bias-only"]["total_writes"] == 0
    assert rules["lowrank"]["total_writes"] > 0


def test_adapt_stage_deploys_the_exported_program(run) -> None:
    """Each rule adapted the export stage's integer program; its adapted program is the device, bit for bit."""
    config, summary, _ = run
    out = Path(config.output.dir)
    exported = IntegerProgram.load(out / "export" / "integer")
    images = load_dataset("fashion-mnist", "test").images[:20]
    for rule in summary["adapt"]["rules"]:
        adapted = IntegerProgram.load(out / "adapt" / rule / "program")
        changed = sum(int((adapted.tensors[k] != exported.tensors[k]).sum()) for k in exported.tensors)
        assert (changed > 0) == (rule != "inference")
        with torch.no_grad():
            device = DeviceNet.from_program(adapted).eval()
            assert (device(images).numpy() == adapted.run(images)).all()


def test_report_artifacts(run) -> None:
    config, summary, _ = run
    md, html = Path(summary["report_md"]), Path(summary["report_html"])
    text = md.read_text()
    for needle in (
        "Accuracy through the pipeline",
        "integer program",
        "Quantizers",
        "On-device adaptation",
        "edgetrain run",
        "[adapt]",
        "Test accuracy on 200 test images (a subset of the test split",
        "test acc (100 imgs)",
    ):
        assert needle in text, needle
    pngs = sorted(md.parent.glob("figure_*.png"))
    assert len(pngs) == 3 and all(p.stat().st_size > 10_000 for p in pngs)  # adaptation, thresholds, writes
    page = html.read_text()
    assert page.count("data:image/png;base64,") == 3 and len(page) > 50_000
    assert json.loads((Path(config.output.dir) / "summary.json").read_text())["export"]["integer_mismatches"] == 0


@pytest.mark.skipif(find_chromium() is None, reason="Chromium not installed (scripts/setup.sh installs it)")
def test_report_renders_in_chromium(run, tmp_path: Path) -> None:
    _, summary, _ = run
    png = screenshot(Path(summary["report_html"]), tmp_path / "report.png", width=1100, height=3000)
    image = plt.imread(png)
    ink = (image[..., :3].mean(axis=2) < 0.5).mean()
    assert 0.005 < ink < 0.5  # text, tables and plots drawn, not a blank or broken page


def test_second_run_skips_every_stage_and_a_change_reruns_downstream(run) -> None:
    config, first, _ = run
    logs: list[str] = []
    again = run_pipeline(config, log=logs.append)
    assert sum("up to date, skipped" in line for line in logs) == 4
    assert again["export"] == first["export"]
    stages = ("pretrain", "quantize", "export", "adapt")
    assert all(first["stage_cpu_seconds"][name] > 0 and first["stage_seconds"][name] > 0 for name in stages)
    assert all(again["stage_seconds"][name] == again["stage_cpu_seconds"][name] == 0 for name in stages)  # reused
    recorded = json.loads((Path(config.output.dir) / "export" / "stage.json").read_text())
    assert recorded["seconds"] == first["stage_seconds"]["export"] and recorded["cpu_seconds"] > 0
    config.adapt.rules = ["bias-only"]
    logs.clear()
    run_pipeline(config, log=logs.append)
    skipped = {line.split("]")[0].strip("[") for line in logs if "skipped" in line}
    assert skipped == {"pretrain", "quantize", "export"}
